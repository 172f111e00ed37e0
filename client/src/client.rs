//! [`Client`]: leader discovery, retries and the typed key-value API.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lmskv_proto::error::Error as ServerError;
use lmskv_proto::keys::validate_user_key;
use lmskv_proto::limits::{GRPC_MESSAGE_BYTES_MAX, VALUE_BYTES_MAX};
use lmskv_proto::v1::admin_client::AdminClient;
use lmskv_proto::v1::kv_client::KvClient;
use lmskv_proto::v1::{self, batch_op, compare, StatusRequest, StatusResponse};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::error::ClientError;
use crate::retry::RetryPolicy;

/// Endpoints a client may be configured with at most.
pub const ENDPOINTS_MAX: usize = 64;

/// Read consistency level, chosen per read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// Linearizable: the read sees every write acknowledged before it started.
    #[default]
    Strong,
    /// At most this far behind the leader.
    BoundedStaleness(Duration),
    /// Sees at least the state at this session token (a write's `index`).
    Session(u64),
    /// Some replica's applied state: a prefix of the log, possibly old.
    ConsistentPrefix,
    /// Possibly old; may be served from a cache.
    Eventual,
}

impl ReadConsistency {
    fn to_proto(self) -> v1::ReadOptions {
        use v1::Consistency as C;
        let (c, max, min) = match self {
            ReadConsistency::Strong => (C::Strong, 0, 0),
            ReadConsistency::BoundedStaleness(d) => {
                (C::BoundedStaleness, d.as_millis().max(1) as u64, 0)
            }
            ReadConsistency::Session(t) => (C::Session, 0, t),
            ReadConsistency::ConsistentPrefix => (C::ConsistentPrefix, 0, 0),
            ReadConsistency::Eventual => (C::Eventual, 0, 0),
        };
        v1::ReadOptions {
            consistency: c as i32,
            max_staleness_ms: max,
            min_applied_index: min,
        }
    }
}

/// Write durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Committed by a quorum and applied on the leader.
    #[default]
    Majority,
    /// Durable on every voter.
    All,
}

/// Options of one write.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub durability: Durability,
    /// The request id; a random one is chosen when `None`. Reuse an id only to
    /// retry the same logical write.
    pub request_id: Option<Bytes>,
}

/// A key with its value and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Bytes,
    pub value: Bytes,
    /// The log index of the key's last write.
    pub version: u64,
}

impl From<v1::KeyValue> for KeyValue {
    fn from(kv: v1::KeyValue) -> Self {
        KeyValue {
            key: kv.key,
            value: kv.value,
            version: kv.version,
        }
    }
}

/// What an acknowledged write returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteResult {
    /// The key's new version (for deletes: the log index of the delete).
    pub version: u64,
    /// The write's log index: pass it as a [`ReadConsistency::Session`] token
    /// to read your own write from any replica.
    pub index: u64,
}

/// A condition for [`Client::compare_and_swap`] and [`Client::batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's version equals this (0: the key is absent).
    Version(u64),
    /// The key's value equals this.
    Value(Bytes),
}

/// The outcome of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOutcome {
    pub succeeded: bool,
    /// The key's state after the call (success) or the state that failed the compare.
    pub current: Option<KeyValue>,
    pub index: u64,
}

/// One write inside an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    Put(Bytes, Bytes),
    Delete(Bytes),
}

/// The outcome of an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// False when a condition failed; then nothing was written.
    pub succeeded: bool,
    /// On failure, the current state of the condition keys that exist.
    pub current: Vec<KeyValue>,
    pub index: u64,
}

/// What a scan covers.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Inclusive start; empty: from the first key.
    pub start: Bytes,
    /// Exclusive end; empty: to the last key.
    pub end: Bytes,
    /// Pairs per page; 0: the server default.
    pub limit: u32,
    pub reverse: bool,
    pub keys_only: bool,
    pub consistency: ReadConsistency,
    /// Resume token from a previous page.
    pub page_token: Bytes,
}

/// One page of a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    pub kvs: Vec<KeyValue>,
    /// Pass as `page_token` to get the next page; `None` when the scan is complete.
    pub next_page_token: Option<Bytes>,
}

/// Builds a [`Client`].
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    retry: RetryPolicy,
}

impl ClientBuilder {
    /// Seed endpoints (`HOST:PORT`); the client finds the leader from them.
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// The retry policy for every call.
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.retry = p;
        self
    }

    /// The overall deadline of each call, retries included.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.retry.deadline = d;
        self
    }

    /// Checks the configuration and creates the client. No connection is made
    /// until the first call.
    pub fn build(self) -> Result<Client, ClientError> {
        let endpoints: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.trim().trim_start_matches("http://").to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints given".into()));
        }
        if endpoints.len() > ENDPOINTS_MAX {
            return Err(ClientError::Config(format!(
                "more than {ENDPOINTS_MAX} endpoints"
            )));
        }
        for e in &endpoints {
            Endpoint::from_shared(format!("http://{e}"))
                .map_err(|err| ClientError::Config(format!("bad endpoint {e:?}: {err}")))?;
        }
        if self.retry.attempts_max == 0 {
            return Err(ClientError::Config(
                "attempts_max must be at least 1".into(),
            ));
        }
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints,
                retry: self.retry,
                channels: Mutex::new(HashMap::new()),
                leader: Mutex::new(None),
                next: AtomicUsize::new(0),
            }),
        })
    }
}

/// An lmskv client. Cheap to clone; clones share connections and the leader cache.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoints: Vec<String>,
    retry: RetryPolicy,
    /// One HTTP/2 channel per node address, including leaders learnt from hints.
    channels: Mutex<HashMap<String, Channel>>,
    /// The address believed to be the leader.
    leader: Mutex<Option<String>>,
    next: AtomicUsize,
}

/// Addresses learnt from hints kept at most, beyond the seed endpoints.
const CHANNELS_MAX: usize = 256;

fn new_request_id() -> Bytes {
    Bytes::copy_from_slice(&rand::random::<[u8; 16]>())
}

fn check_key(field: &str, key: &[u8]) -> Result<(), ClientError> {
    validate_user_key(field, key).map_err(|e| match e {
        ServerError::InvalidArgument { field, reason } => {
            ClientError::InvalidArgument { field, reason }
        }
        other => ClientError::Server(other),
    })
}

fn check_value(field: &str, v: &[u8]) -> Result<(), ClientError> {
    if v.len() > VALUE_BYTES_MAX {
        return Err(ClientError::InvalidArgument {
            field: field.into(),
            reason: format!("value is {} bytes, the limit is {VALUE_BYTES_MAX}", v.len()),
        });
    }
    Ok(())
}

fn write_opts(o: &WriteOptions) -> v1::WriteOptions {
    v1::WriteOptions {
        request_id: o.request_id.clone().unwrap_or_else(new_request_id),
        durability: match o.durability {
            Durability::Majority => v1::Durability::Majority,
            Durability::All => v1::Durability::All,
        } as i32,
    }
}

fn compare_proto(key: Bytes, c: Compare) -> v1::Compare {
    v1::Compare {
        key,
        target: Some(match c {
            Compare::Version(v) => compare::Target::Version(v),
            Compare::Value(v) => compare::Target::Value(v),
        }),
    }
}

impl Client {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The seed endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut map = self.inner.channels.lock().expect("channel lock");
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        if map.len() >= CHANNELS_MAX {
            map.retain(|a, _| self.inner.endpoints.contains(a));
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ClientError::Config(format!("bad address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    fn pick_target(&self) -> String {
        if let Some(l) = self.inner.leader.lock().expect("leader lock").clone() {
            return l;
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.endpoints[i % self.inner.endpoints.len()].clone()
    }

    fn forget_leader(&self, addr: &str) {
        let mut l = self.inner.leader.lock().expect("leader lock");
        if l.as_deref() == Some(addr) {
            *l = None;
        }
        // Move on to another endpoint next time.
        self.inner.next.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `f` against the leader, following hints and retrying retryable
    /// errors with backoff until the deadline.
    async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let policy = &self.inner.retry;
        let start = Instant::now();
        let deadline = start + policy.deadline;
        let mut attempts = 0u32;
        let mut backoffs = 0u32;
        loop {
            attempts += 1;
            let target = self.pick_target();
            let client = KvClient::new(self.channel(&target)?)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
            let err = match tokio::time::timeout_at(deadline, f(client)).await {
                Ok(Ok(resp)) => {
                    let mut l = self.inner.leader.lock().expect("leader lock");
                    if l.is_none() {
                        *l = Some(target);
                    }
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) => ServerError::from_status(&status),
                Err(_) => ServerError::Timeout {
                    reason: format!("no answer from {target} before the deadline"),
                },
            };
            let mut sleep = None;
            match &err {
                ServerError::NotLeader {
                    leader: Some(h), ..
                } if !h.address.is_empty() && h.address != target => {
                    *self.inner.leader.lock().expect("leader lock") = Some(h.address.clone());
                }
                ServerError::Overloaded { retry_after_ms } => {
                    sleep = Some(Duration::from_millis((*retry_after_ms).clamp(1, 5_000)));
                }
                e if e.is_retryable() => {
                    self.forget_leader(&target);
                    backoffs += 1;
                    sleep = Some(policy.backoff(backoffs));
                }
                _ => return Err(ClientError::Server(err)),
            }
            let now = Instant::now();
            let out_of_time = match sleep {
                Some(s) => now + s >= deadline,
                None => now >= deadline,
            };
            if attempts >= policy.attempts_max || out_of_time {
                return Err(ClientError::DeadlineExceeded {
                    deadline_ms: policy.deadline.as_millis() as u64,
                    attempts,
                    last: Box::new(ClientError::Server(err)),
                });
            }
            if let Some(s) = sleep {
                tokio::time::sleep(s).await;
            }
        }
    }

    /// Reads a key; `None` when it does not exist.
    pub async fn get(
        &self,
        key: impl Into<Bytes>,
        consistency: ReadConsistency,
    ) -> Result<Option<KeyValue>, ClientError> {
        let key = key.into();
        check_key("key", &key)?;
        let req = v1::GetRequest {
            header: None,
            key,
            read: Some(consistency.to_proto()),
        };
        let resp = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.get(req).await }
            })
            .await?;
        Ok(resp.kv.map(Into::into))
    }

    /// Sets a key (majority durability, a fresh request id).
    pub async fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<WriteResult, ClientError> {
        self.put_with(key, value, &WriteOptions::default()).await
    }

    /// Sets a key with explicit options.
    pub async fn put_with(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        opts: &WriteOptions,
    ) -> Result<WriteResult, ClientError> {
        let (key, value) = (key.into(), value.into());
        check_key("key", &key)?;
        check_value("value", &value)?;
        // One request id for every retry of this call: applied at most once.
        let req = v1::PutRequest {
            header: None,
            key,
            value,
            write: Some(write_opts(opts)),
        };
        let resp = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.put(req).await }
            })
            .await?;
        Ok(WriteResult {
            version: resp.version,
            index: resp.header.map(|h| h.applied_index).unwrap_or(resp.version),
        })
    }

    /// Deletes a key; returns whether it existed.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool, ClientError> {
        self.delete_with(key, &WriteOptions::default())
            .await
            .map(|(d, _)| d)
    }

    /// Deletes a key with explicit options; returns whether it existed and the write's index.
    pub async fn delete_with(
        &self,
        key: impl Into<Bytes>,
        opts: &WriteOptions,
    ) -> Result<(bool, u64), ClientError> {
        let key = key.into();
        check_key("key", &key)?;
        let req = v1::DeleteRequest {
            header: None,
            key,
            write: Some(write_opts(opts)),
        };
        let resp = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.delete(req).await }
            })
            .await?;
        Ok((
            resp.deleted,
            resp.header.map(|h| h.applied_index).unwrap_or(0),
        ))
    }

    /// Sets `key` to `new_value` (or deletes it when `None`) if `compare` holds.
    pub async fn compare_and_swap(
        &self,
        key: impl Into<Bytes>,
        compare: Compare,
        new_value: Option<Bytes>,
        opts: &WriteOptions,
    ) -> Result<CasOutcome, ClientError> {
        let key = key.into();
        check_key("key", &key)?;
        if let Some(v) = &new_value {
            check_value("new_value", v)?;
        }
        let req = v1::CompareAndSwapRequest {
            header: None,
            compare: Some(compare_proto(key, compare)),
            delete: new_value.is_none(),
            new_value: new_value.unwrap_or_default(),
            write: Some(write_opts(opts)),
        };
        let resp = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.compare_and_swap(req).await }
            })
            .await?;
        Ok(CasOutcome {
            succeeded: resp.succeeded,
            current: resp.current.map(Into::into),
            index: resp.header.map(|h| h.applied_index).unwrap_or(0),
        })
    }

    /// Applies `ops` atomically if every condition holds (keys of one range).
    pub async fn batch(
        &self,
        conditions: Vec<(Bytes, Compare)>,
        ops: Vec<BatchOp>,
        opts: &WriteOptions,
    ) -> Result<BatchOutcome, ClientError> {
        for (k, _) in &conditions {
            check_key("conditions.key", k)?;
        }
        let ops: Vec<v1::BatchOp> = ops
            .into_iter()
            .map(|o| {
                Ok(v1::BatchOp {
                    op: Some(match o {
                        BatchOp::Put(k, v) => {
                            check_key("ops.key", &k)?;
                            check_value("ops.value", &v)?;
                            batch_op::Op::Put(v1::KeyValue {
                                key: k,
                                value: v,
                                version: 0,
                            })
                        }
                        BatchOp::Delete(k) => {
                            check_key("ops.key", &k)?;
                            batch_op::Op::Delete(k)
                        }
                    }),
                })
            })
            .collect::<Result<_, ClientError>>()?;
        let req = v1::BatchRequest {
            header: None,
            conditions: conditions
                .into_iter()
                .map(|(k, c)| compare_proto(k, c))
                .collect(),
            ops,
            write: Some(write_opts(opts)),
        };
        let resp = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.batch(req).await }
            })
            .await?;
        Ok(BatchOutcome {
            succeeded: resp.succeeded,
            current: resp.current.into_iter().map(Into::into).collect(),
            index: resp.header.map(|h| h.applied_index).unwrap_or(0),
        })
    }

    /// Reads one page of keys in `[start, end)`.
    pub async fn scan(&self, opts: &ScanOptions) -> Result<ScanPage, ClientError> {
        let req = v1::ScanRequest {
            header: None,
            start_key: opts.start.clone(),
            end_key: opts.end.clone(),
            limit: opts.limit,
            reverse: opts.reverse,
            page_token: opts.page_token.clone(),
            read: Some(opts.consistency.to_proto()),
            keys_only: opts.keys_only,
        };
        let resp = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.scan(req).await }
            })
            .await?;
        Ok(ScanPage {
            kvs: resp.kvs.into_iter().map(Into::into).collect(),
            next_page_token: (!resp.next_page_token.is_empty()).then_some(resp.next_page_token),
        })
    }

    /// Reads up to `max` pairs of a scan, following pages.
    pub async fn scan_all(
        &self,
        opts: &ScanOptions,
        max: usize,
    ) -> Result<Vec<KeyValue>, ClientError> {
        let mut out = Vec::new();
        let mut o = opts.clone();
        loop {
            let page = self.scan(&o).await?;
            out.extend(page.kvs);
            if out.len() >= max {
                out.truncate(max);
                return Ok(out);
            }
            match page.next_page_token {
                Some(t) => o.page_token = t,
                None => return Ok(out),
            }
        }
    }

    /// The status report of the node at `endpoint`.
    pub async fn node_status(&self, endpoint: &str) -> Result<StatusResponse, ClientError> {
        let mut c = AdminClient::new(self.channel(endpoint)?);
        match tokio::time::timeout(Duration::from_secs(3), c.status(StatusRequest {})).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(ClientError::Unreachable {
                endpoint: endpoint.into(),
                reason: ServerError::from_status(&s).to_string(),
            }),
            Err(_) => Err(ClientError::Unreachable {
                endpoint: endpoint.into(),
                reason: "timed out".into(),
            }),
        }
    }

    /// The cluster's status as seen by the leader of the first range, or by
    /// the first endpoint that answers when no leader is known.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        let calls = self.inner.endpoints.iter().map(|e| self.node_status(e));
        let results = futures::future::join_all(calls).await;
        let mut first_ok = None;
        let mut last_err = None;
        for r in results {
            match r {
                Ok(s) => {
                    let leads = s.ranges.iter().any(|r| r.local_role == "leader");
                    if leads {
                        return Ok(s);
                    }
                    first_ok.get_or_insert(s);
                }
                Err(e) => last_err = Some(e),
            }
        }
        if let Some(s) = first_ok {
            // Ask the node the answering one believes is leader, for its authoritative view.
            if let Some(addr) = s
                .ranges
                .first()
                .and_then(|r| s.nodes.iter().find(|n| n.node_id == r.leader_id))
                .map(|n| n.address.clone())
            {
                if let Ok(ls) = self.node_status(&addr).await {
                    return Ok(ls);
                }
            }
            return Ok(s);
        }
        Err(last_err.unwrap_or_else(|| ClientError::Config("no endpoints".into())))
    }
}
