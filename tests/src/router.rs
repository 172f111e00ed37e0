//! A small, independent router for sharding tests: it asks the meta leader
//! where a key lives and talks to that range's leader over raw gRPC, so the
//! tests of placement and splits do not depend on the client library's cache.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use lmskv_proto::error::Error;
use lmskv_proto::v1::admin_client::AdminClient;
use lmskv_proto::v1::kv_client::KvClient;
use lmskv_proto::v1::{
    Consistency, GetRequest, LocateRequest, NodeInfo, NodeListRequest, PutRequest, RangeInfo,
    RangeListRequest, ReadOptions, RequestHeader, ScanRequest, SplitRequest, WriteOptions,
};
use tonic::transport::Channel;

use crate::cluster::TestCluster;

/// The voters a listed range's descriptor names.
pub fn voters(r: &RangeInfo) -> Vec<u64> {
    r.descriptor
        .as_ref()
        .map(|d| {
            d.replicas
                .iter()
                .filter(|x| x.role == lmskv_proto::v1::ReplicaRole::Voter as i32)
                .map(|x| x.node_id)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every range has exactly three voters on distinct nodes out of `nodes`.
pub fn fully_replicated_on(ranges: &[RangeInfo], nodes: &std::collections::BTreeSet<u64>) -> bool {
    ranges.iter().all(|r| {
        let v = voters(r);
        let distinct: std::collections::BTreeSet<u64> = v.iter().copied().collect();
        v.len() == 3 && distinct.len() == 3 && distinct.is_subset(nodes)
    })
}

/// Attempts of one routed call before it fails the test.
const ROUTED_ATTEMPTS_MAX: usize = 300;
/// Pause between attempts.
const ROUTED_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Longest one gRPC call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_millis(500))
        .timeout(CALL_TIMEOUT)
        .connect_lazy()
}

impl TestCluster {
    /// Calls the meta leader: tries every running node, following hints.
    pub async fn meta_call<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = String::new();
        for _ in 0..ROUTED_ATTEMPTS_MAX {
            let mut addrs: Vec<String> = self.running().iter().map(|id| self.addr(*id)).collect();
            while let Some(a) = addrs.first().cloned() {
                addrs.remove(0);
                match f(AdminClient::new(channel(&a))).await {
                    Ok(r) => return Ok(r.into_inner()),
                    Err(s) => match Error::from_status(&s) {
                        Error::NotLeader {
                            leader: Some(h), ..
                        } if !h.address.is_empty() && !addrs.contains(&h.address) => {
                            addrs.insert(0, h.address);
                        }
                        // A refused argument is the answer (e.g. a range
                        // already starts at the split key): retrying it for
                        // the whole attempt budget only stalls the caller.
                        // A split refused at apply time (field `split`: the
                        // range changed version under it) is worth a retry.
                        Error::InvalidArgument { field, reason } if field != "split" => {
                            bail!("meta call failed: invalid argument `{field}`: {reason}")
                        }
                        e => last = e.to_string(),
                    },
                }
            }
            tokio::time::sleep(ROUTED_RETRY_PAUSE).await;
        }
        bail!("meta call failed: {last}")
    }

    /// The range holding `key`.
    pub async fn locate(&self, key: &[u8]) -> anyhow::Result<RangeInfo> {
        let key = Bytes::copy_from_slice(key);
        let resp = self
            .meta_call(|mut c| {
                let key = key.clone();
                async move {
                    c.locate(LocateRequest {
                        key,
                        prefetch: 0,
                        reverse: false,
                    })
                    .await
                }
            })
            .await?;
        resp.ranges.into_iter().next().context("no range")
    }

    /// Every range the meta range knows, in key order.
    pub async fn range_list(&self) -> anyhow::Result<Vec<RangeInfo>> {
        Ok(self
            .meta_call(|mut c| async move { c.range_list(RangeListRequest {}).await })
            .await?
            .ranges)
    }

    /// The node registry.
    pub async fn node_list(&self) -> anyhow::Result<Vec<NodeInfo>> {
        Ok(self
            .meta_call(|mut c| async move { c.node_list(NodeListRequest {}).await })
            .await?
            .nodes)
    }

    /// Splits the range holding `key` at `key`.
    pub async fn split_at(&self, key: &[u8]) -> anyhow::Result<()> {
        let key = Bytes::copy_from_slice(key);
        self.meta_call(|mut c| {
            let key = key.clone();
            async move { c.split(SplitRequest { key }).await }
        })
        .await
        .map(|_| ())
    }

    async fn routed<T, F, Fut>(&self, key: &[u8], f: F) -> anyhow::Result<T>
    where
        F: Fn(KvClient<Channel>, RequestHeader) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = String::new();
        for _ in 0..ROUTED_ATTEMPTS_MAX {
            match self.locate(key).await {
                Ok(info) => {
                    let d = info.descriptor.clone().unwrap_or_default();
                    let header = RequestHeader {
                        range_id: d.range_id,
                        epoch: d.epoch,
                        ..Default::default()
                    };
                    let mut targets: Vec<String> = Vec::new();
                    if let Some(a) = info.addresses.get(&info.leader_id) {
                        targets.push(a.clone());
                    }
                    targets.extend(info.addresses.values().cloned());
                    for a in targets {
                        match f(KvClient::new(channel(&a)), header).await {
                            Ok(r) => return Ok(r.into_inner()),
                            Err(s) => last = Error::from_status(&s).to_string(),
                        }
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(ROUTED_RETRY_PAUSE).await;
        }
        bail!(
            "routed call for key {:?} failed: {last}",
            String::from_utf8_lossy(key)
        )
    }

    /// A STRONG read of `key` through the range's leader.
    pub async fn routed_get(&self, key: &[u8]) -> anyhow::Result<Option<(Bytes, u64)>> {
        let k = Bytes::copy_from_slice(key);
        let resp = self
            .routed(key, |mut c, header| {
                let k = k.clone();
                async move {
                    c.get(GetRequest {
                        header: Some(header),
                        key: k,
                        read: Some(ReadOptions {
                            consistency: Consistency::Strong as i32,
                            ..Default::default()
                        }),
                    })
                    .await
                }
            })
            .await?;
        Ok(resp.kv.map(|kv| (kv.value, kv.version)))
    }

    /// A put through the range's leader; retries reuse one request id.
    pub async fn routed_put(&self, key: &[u8], value: &[u8]) -> anyhow::Result<u64> {
        let k = Bytes::copy_from_slice(key);
        let v = Bytes::copy_from_slice(value);
        let id = Bytes::from(rand::random::<[u8; 16]>().to_vec());
        let resp = self
            .routed(key, |mut c, header| {
                let (k, v, id) = (k.clone(), v.clone(), id.clone());
                async move {
                    c.put(PutRequest {
                        header: Some(header),
                        key: k,
                        value: v,
                        write: Some(WriteOptions {
                            request_id: id,
                            ..Default::default()
                        }),
                    })
                    .await
                }
            })
            .await?;
        Ok(resp.version)
    }

    /// Every key in `[start, end)` (empty `end`: to the end), range by range,
    /// each through its leader at the epoch it was located with, so a range
    /// that split meanwhile refuses the page and is located again.
    pub async fn routed_scan_keys(&self, start: &[u8], end: &[u8]) -> anyhow::Result<Vec<Bytes>> {
        Ok(self
            .routed_scan(start, end)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// Every key in `[start, end)` with its version, as [`Self::routed_scan_keys`].
    pub async fn routed_scan(&self, start: &[u8], end: &[u8]) -> anyhow::Result<Vec<(Bytes, u64)>> {
        let mut out = Vec::new();
        let mut cur = Bytes::copy_from_slice(start);
        let end = Bytes::copy_from_slice(end);
        let mut failures = 0;
        loop {
            let info = self.locate(&cur).await?;
            let d = info.descriptor.clone().unwrap_or_default();
            let header = RequestHeader {
                range_id: d.range_id,
                epoch: d.epoch,
                ..Default::default()
            };
            let mut targets: Vec<String> = Vec::new();
            if let Some(a) = info.addresses.get(&info.leader_id) {
                targets.push(a.clone());
            }
            targets.extend(info.addresses.values().cloned());
            let mut page = None;
            let mut last = String::new();
            for a in targets {
                let req = ScanRequest {
                    header: Some(header),
                    start_key: cur.clone(),
                    end_key: end.clone(),
                    limit: 100,
                    keys_only: true,
                    ..Default::default()
                };
                match KvClient::new(channel(&a)).scan(req).await {
                    Ok(r) => {
                        page = Some(r.into_inner());
                        break;
                    }
                    Err(s) => last = Error::from_status(&s).to_string(),
                }
            }
            let Some(resp) = page else {
                failures += 1;
                if failures > ROUTED_ATTEMPTS_MAX {
                    bail!("scan at {:?} failed: {last}", String::from_utf8_lossy(&cur));
                }
                tokio::time::sleep(ROUTED_RETRY_PAUSE).await;
                continue;
            };
            out.extend(resp.kvs.into_iter().map(|kv| (kv.key, kv.version)));
            if !resp.next_page_token.is_empty() {
                cur = Bytes::copy_from_slice(&resp.next_page_token[1..]);
                continue;
            }
            // The epoch matched, so the range's span is the located one.
            if d.end_key.is_empty() || (!end.is_empty() && d.end_key >= end) {
                return Ok(out);
            }
            cur = d.end_key;
        }
    }
}
