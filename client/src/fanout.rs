//! Calls over many keys that may live in many ranges: [`Client::batch_get`]
//! and [`Client::batch_put`].
//!
//! The keys are sorted, grouped by the range that holds them (from the route
//! cache), and each group is sent to its range as one request, at most
//! [`FANOUT_CONCURRENCY_MAX`] at a time. A group refused because its range
//! split is regrouped and sent again; the results are put back in key order.

use std::collections::{HashMap, HashSet};
use std::time::Instant as StdInstant;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use lmskv_proto::error::Error as ServerError;
use lmskv_proto::limits::{BATCH_BYTES_MAX, BATCH_OPS_MAX};
use lmskv_proto::range;
use lmskv_proto::v1::{self, batch_op, RangeDescriptor};

use crate::call::{Budget, RangeCallError};
use crate::client::{
    check_key, check_value, durability_proto, leader_try_extra, new_request_id, Client, KeyValue,
    ReadConsistency, Route, WriteOptions, WriteResult,
};
use crate::error::ClientError;
use crate::read_cache::{fresh_at, CachedRead, Fence};

/// Range requests one multi-range call has in flight at most.
pub const FANOUT_CONCURRENCY_MAX: usize = 16;
/// Keys one [`Client::batch_get`] reads at most.
pub const BATCH_GET_KEYS_MAX: usize = 10_000;
/// Keys sent to one range in one `BatchGet` request at most.
pub const BATCH_GET_KEYS_PER_REQUEST_MAX: usize = 1_000;
/// Pairs one [`Client::batch_put`] writes at most (and their key and value
/// bytes at most `BATCH_BYTES_MAX`), so that each range's share fits one
/// atomic batch.
pub const BATCH_PUT_PAIRS_MAX: usize = BATCH_OPS_MAX;
/// Times the keys of one call are regrouped after ranges split under it.
const REGROUP_ROUNDS_MAX: u32 = 16;

/// Keys of one range, in key order.
struct Group {
    keys: Vec<Bytes>,
}

/// The keys one range's batch wrote and what it returned.
type Written = (Vec<Bytes>, WriteResult);

/// What one range's request gave back.
enum GroupResult<T> {
    Done(T),
    /// The range split: these keys must be grouped again.
    Regroup(Vec<Bytes>),
    /// Their values pass one answer's limit: they go again in smaller groups.
    TooLarge(Vec<Bytes>),
}

impl Client {
    /// Sorted keys grouped by the range that holds them (each group at most
    /// `per_group_max` keys).
    async fn group_by_range(
        &self,
        keys: &[Bytes],
        budget: &Budget,
        per_group_max: usize,
    ) -> Result<Vec<Group>, ClientError> {
        let mut groups: Vec<Group> = Vec::new();
        let mut current: Option<RangeDescriptor> = None;
        for k in keys {
            let same = current.as_ref().is_some_and(|d| range::contains(d, k));
            let full = groups.last().is_some_and(|g| g.keys.len() >= per_group_max);
            if !same {
                current = Some(self.locate(k, false, budget.deadline).await?.desc);
            }
            if !same || full {
                groups.push(Group { keys: Vec::new() });
            }
            groups.last_mut().expect("a group").keys.push(k.clone());
        }
        Ok(groups)
    }

    /// Reads several keys at one consistency level and returns those that
    /// exist, in key order (each once). The keys may live in many ranges:
    /// each range is asked once, in parallel (at most
    /// [`FANOUT_CONCURRENCY_MAX`] at a time). Each range's answer is
    /// consistent at the level asked; different ranges are read at
    /// different moments.
    ///
    /// ```no_run
    /// # async fn demo(client: lmskv_client::Client) -> Result<(), lmskv_client::ClientError> {
    /// use lmskv_client::ReadConsistency;
    ///
    /// let found = client
    ///     .batch_get(["user/1", "user/2", "course/9"], ReadConsistency::Strong)
    ///     .await?;
    /// for kv in found {
    ///     println!("{:?} has version {}", kv.key, kv.version);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn batch_get<I, K>(
        &self,
        keys: I,
        consistency: ReadConsistency,
    ) -> Result<Vec<KeyValue>, ClientError>
    where
        I: IntoIterator<Item = K>,
        K: Into<Bytes>,
    {
        let mut keys: Vec<Bytes> = keys.into_iter().map(Into::into).collect();
        if keys.len() > BATCH_GET_KEYS_MAX {
            return Err(ClientError::InvalidArgument {
                field: "keys".into(),
                reason: format!(
                    "{} keys; one batch_get reads at most {BATCH_GET_KEYS_MAX}",
                    keys.len()
                ),
            });
        }
        for k in &keys {
            check_key("keys", k)?;
        }
        keys.sort();
        keys.dedup();
        let mut found = Vec::with_capacity(keys.len());
        if let Some(cache) = &self.inner.cache {
            keys.retain(|k| match cache.lookup(k, &consistency) {
                Some(hit) => {
                    found.extend(hit);
                    false
                }
                None => true,
            });
        }
        let budget = Budget::new(&self.retry);
        let route = self.read_route(&consistency);
        let consistency = &consistency;
        let mut pending = keys;
        let mut rounds = 0;
        // Keys per request: halved for a round after a group's values passed
        // the limit of one answer (`SCAN_BYTES_MAX`), down to one key.
        let mut per_request = BATCH_GET_KEYS_PER_REQUEST_MAX;
        while !pending.is_empty() {
            rounds += 1;
            if rounds > REGROUP_ROUNDS_MAX {
                return Err(budget.exceeded());
            }
            let groups = self.group_by_range(&pending, &budget, per_request).await?;
            let results: Vec<Result<GroupResult<Vec<v1::KeyValue>>, ClientError>> =
                stream::iter(groups)
                    .map(|g| {
                        let mut b = budget.fork();
                        async move {
                            let (first, last) =
                                (g.keys[0].clone(), g.keys[g.keys.len() - 1].clone());
                            let fits = move |d: &RangeDescriptor| {
                                range::contains(d, &first) && range::contains(d, &last)
                            };
                            // Fences taken before sending: a write of one of
                            // these keys meanwhile keeps its answer out of the cache.
                            let fences: Option<Vec<Fence>> = self
                                .inner
                                .cache
                                .as_ref()
                                .map(|c| g.keys.iter().map(|k| c.fence(k)).collect());
                            let started = StdInstant::now();
                            match self
                                .range_call(
                                    &mut b,
                                    &g.keys[0],
                                    false,
                                    route,
                                    &fits,
                                    |mut c, header| {
                                        let req = v1::BatchGetRequest {
                                            read: Some(self.read_options(consistency, &header)),
                                            header: Some(header),
                                            keys: g.keys.clone(),
                                        };
                                        async move { c.batch_get(req).await }
                                    },
                                )
                                .await
                            {
                                Ok((resp, _)) => {
                                    if let (Some(c), Some(fences), Some(h)) =
                                        (&self.inner.cache, fences, &resp.header)
                                    {
                                        // Keys the range does not hold are cached as absent.
                                        let fresh = fresh_at(consistency, started);
                                        let got: HashMap<&Bytes, &v1::KeyValue> =
                                            resp.kvs.iter().map(|kv| (&kv.key, kv)).collect();
                                        for (k, fence) in g.keys.iter().zip(fences) {
                                            let kv =
                                                got.get(k).map(|kv| KeyValue::from((*kv).clone()));
                                            c.fill(
                                                k.clone(),
                                                fence,
                                                CachedRead::new(
                                                    kv,
                                                    h.range_id,
                                                    h.applied_index,
                                                    fresh,
                                                ),
                                            );
                                        }
                                    }
                                    Ok(GroupResult::Done(resp.kvs))
                                }
                                Err(RangeCallError::Regroup(_)) => Ok(GroupResult::Regroup(g.keys)),
                                Err(RangeCallError::Failed(ClientError::Server(
                                    ServerError::InvalidArgument { field, .. },
                                ))) if field == "keys" && g.keys.len() > 1 => {
                                    Ok(GroupResult::TooLarge(g.keys))
                                }
                                Err(RangeCallError::Failed(e)) => Err(e),
                            }
                        }
                    })
                    .buffer_unordered(FANOUT_CONCURRENCY_MAX)
                    .collect()
                    .await;
            pending = Vec::new();
            let mut too_large = 0;
            for r in results {
                match r? {
                    GroupResult::Done(kvs) => found.extend(kvs.into_iter().map(KeyValue::from)),
                    GroupResult::Regroup(keys) => pending.extend(keys),
                    GroupResult::TooLarge(keys) => {
                        too_large = too_large.max(keys.len());
                        pending.extend(keys);
                    }
                }
            }
            if too_large > 0 {
                per_request = per_request.min(too_large.div_ceil(2)).max(1);
            }
            pending.sort();
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        found.dedup_by(|a, b| a.key == b.key);
        Ok(found)
    }

    /// Sets several keys, which may live in many ranges. The pairs of each
    /// range are written as one atomic batch, the ranges in parallel (at most
    /// [`FANOUT_CONCURRENCY_MAX`] at a time).
    ///
    /// **Not atomic across ranges**: when the call fails, the pairs of some
    /// ranges may have been written and others not; sending the same pairs
    /// again is safe. The error says so ([`ClientError::is_outcome_unknown`])
    /// whenever some range's pairs were written or may have been, even if
    /// another range's batch was refused outright; only a call none of
    /// whose batches can have been applied fails with a definite error.
    /// Each range's batch carries its own request id, so a
    /// batch retried after a lost reply is applied once. A range that splits
    /// under a batch has its pairs regrouped and sent under new ids, unless
    /// an earlier try may have been applied (it timed out or its connection
    /// broke): then the call fails with an outcome-unknown error
    /// ([`ClientError::is_outcome_unknown`]) rather than write those pairs twice.
    /// Returns one result per pair, in the order given. Keys must be unique.
    pub async fn batch_put<I, K, V>(
        &self,
        pairs: I,
        opts: &WriteOptions,
    ) -> Result<Vec<WriteResult>, ClientError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<Bytes>,
        V: Into<Bytes>,
    {
        crate::client::check_write_opts(opts)?;
        let pairs: Vec<(Bytes, Bytes)> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        if pairs.len() > BATCH_PUT_PAIRS_MAX {
            return Err(ClientError::InvalidArgument {
                field: "pairs".into(),
                reason: format!(
                    "{} pairs; one batch_put writes at most {BATCH_PUT_PAIRS_MAX}",
                    pairs.len()
                ),
            });
        }
        let mut bytes = 0usize;
        let mut seen = HashSet::with_capacity(pairs.len());
        for (k, v) in &pairs {
            check_key("pairs.key", k)?;
            check_value("pairs.value", v)?;
            bytes += k.len() + v.len();
            if !seen.insert(k.clone()) {
                return Err(ClientError::InvalidArgument {
                    field: "pairs.key".into(),
                    reason: format!("key {:?} appears twice", lmskv_proto::keys::escape(k)),
                });
            }
        }
        if bytes > BATCH_BYTES_MAX {
            return Err(ClientError::InvalidArgument {
                field: "pairs".into(),
                reason: format!("{bytes} bytes of keys and values; the limit is {BATCH_BYTES_MAX}"),
            });
        }
        if opts.request_id.is_some() {
            return Err(ClientError::InvalidArgument {
                field: "request_id".into(),
                reason: "batch_put chooses one request id per range; leave it unset".into(),
            });
        }
        let values: std::collections::HashMap<Bytes, Bytes> = pairs.iter().cloned().collect();
        let mut keys: Vec<Bytes> = pairs.iter().map(|(k, _)| k.clone()).collect();
        keys.sort();
        self.invalidate(&keys);
        let result = self.batch_put_sorted(keys.clone(), &values, opts).await;
        // Forgotten again whatever the outcome: a read in flight meanwhile
        // must not cache older state.
        self.invalidate(&keys);
        let written = result?;
        pairs
            .iter()
            .map(|(k, _)| {
                written.get(k).copied().ok_or_else(|| {
                    ClientError::Server(ServerError::internal(format!(
                        "no result for key {:?}",
                        lmskv_proto::keys::escape(k)
                    )))
                })
            })
            .collect()
    }

    async fn batch_put_sorted(
        &self,
        keys: Vec<Bytes>,
        values: &std::collections::HashMap<Bytes, Bytes>,
        opts: &WriteOptions,
    ) -> Result<std::collections::HashMap<Bytes, WriteResult>, ClientError> {
        let budget = Budget::new(&self.retry);
        let mut written = std::collections::HashMap::with_capacity(keys.len());
        let mut pending = keys;
        let mut rounds = 0;
        while !pending.is_empty() {
            rounds += 1;
            if rounds > REGROUP_ROUNDS_MAX {
                return Err(budget.exceeded());
            }
            // A lookup failing after earlier rounds wrote some pairs leaves
            // the call written in part: not a definite failure.
            let groups = match self.group_by_range(&pending, &budget, usize::MAX).await {
                Ok(groups) => groups,
                Err(e) => {
                    return Err(
                        batch_put_error(vec![e], written.len()).expect("one error was given")
                    )
                }
            };
            let results: Vec<Result<GroupResult<Written>, ClientError>> = stream::iter(groups)
                .map(|g| {
                    let bytes: usize = g.keys.iter().map(|k| k.len() + values[k].len()).sum();
                    let extra =
                        leader_try_extra(self.inner.leader_attempt_timeout, bytes, opts.durability);
                    let mut b = budget.fork().with_leader_try_extra(extra);
                    let ops: Vec<v1::BatchOp> = g
                        .keys
                        .iter()
                        .map(|k| v1::BatchOp {
                            op: Some(batch_op::Op::Put(v1::KeyValue {
                                key: k.clone(),
                                value: values[k].clone(),
                                version: 0,
                            })),
                        })
                        .collect();
                    // One id for every retry of this range's batch, held
                    // in flight until the batch's call returns.
                    let id = new_request_id();
                    let write = v1::WriteOptions {
                        request_id: id.id,
                        durability: durability_proto(opts.durability),
                        completed_below: id.completed_below,
                    };
                    let in_flight = id.in_flight;
                    async move {
                        let _in_flight = in_flight;
                        let (first, last) = (g.keys[0].clone(), g.keys[g.keys.len() - 1].clone());
                        let fits = move |d: &RangeDescriptor| {
                            range::contains(d, &first) && range::contains(d, &last)
                        };
                        let req = v1::BatchRequest {
                            header: None,
                            conditions: Vec::new(),
                            ops,
                            write: Some(write),
                        };
                        match self
                            .range_call(
                                &mut b,
                                &g.keys[0],
                                false,
                                Route::Leader,
                                &fits,
                                |mut c, header| {
                                    let req = v1::BatchRequest {
                                        header: Some(header),
                                        ..req.clone()
                                    };
                                    async move { c.batch(req).await }
                                },
                            )
                            .await
                        {
                            Ok((resp, _)) => {
                                let (range_id, index) = resp
                                    .header
                                    .map(|h| (h.range_id, h.applied_index))
                                    .unwrap_or((0, 0));
                                let version = if resp.version != 0 {
                                    resp.version
                                } else {
                                    index
                                };
                                let written = WriteResult {
                                    version,
                                    index,
                                    range_id,
                                };
                                Ok(GroupResult::Done((g.keys, written)))
                            }
                            // The keys now span ranges. Re-sending them under
                            // new request ids is safe only if no earlier try
                            // can have been applied: the new right-hand range
                            // has no record of the old id.
                            Err(RangeCallError::Regroup(d)) if b.maybe_applied() => {
                                Err(ClientError::Server(ServerError::Timeout {
                                    reason: format!(
                                        "a try of {} pairs has an unknown outcome and range {} \
                                         changed since; they may or may not be written",
                                        g.keys.len(),
                                        d.range_id
                                    ),
                                }))
                            }
                            Err(RangeCallError::Regroup(_)) => Ok(GroupResult::Regroup(g.keys)),
                            Err(RangeCallError::Failed(e)) => Err(b.settle(e)),
                        }
                    }
                })
                .buffer_unordered(FANOUT_CONCURRENCY_MAX)
                .collect()
                .await;
            pending = Vec::new();
            let mut errors = Vec::new();
            for r in results {
                match r {
                    Ok(GroupResult::Done((keys, w))) => {
                        for k in keys {
                            written.insert(k, w);
                        }
                    }
                    Ok(GroupResult::Regroup(keys)) => pending.extend(keys),
                    Ok(GroupResult::TooLarge(_)) => {
                        unreachable!("only reads are split for their answer's size")
                    }
                    Err(e) => errors.push(e),
                }
            }
            if let Some(e) = batch_put_error(errors, written.len()) {
                return Err(e);
            }
            pending.sort();
        }
        Ok(written)
    }
}

/// The error a `batch_put` ends with when some of its ranges' batches
/// failed with `errors` (in the order they ended) after `written` pairs of
/// others were written: one whose outcome is unknown if there is one (a
/// definite failure of one range must not hide that another's batch may
/// have been applied), else the first, reported as of unknown outcome when
/// pairs were written: the call as a whole then did part of its work, and
/// which part its error does not say. `None` when nothing failed.
fn batch_put_error(errors: Vec<ClientError>, written: usize) -> Option<ClientError> {
    let failed = errors.len();
    let mut errors = errors.into_iter();
    let first = errors.next()?;
    if first.is_outcome_unknown() {
        return Some(first);
    }
    if let Some(unknown) = errors.find(ClientError::is_outcome_unknown) {
        return Some(unknown);
    }
    if written == 0 {
        return Some(first);
    }
    Some(ClientError::Server(ServerError::Timeout {
        reason: format!(
            "{written} pairs were written, but the batches of {failed} ranges failed, so the \
             pairs may be written in part; the first failure: {first}"
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> ClientError {
        ClientError::Server(ServerError::invalid_argument("ops[0].value", "too large"))
    }

    fn timed_out() -> ClientError {
        ClientError::Server(ServerError::Timeout {
            reason: "no answer".into(),
        })
    }

    #[test]
    fn an_unknown_outcome_in_one_range_is_not_hidden_by_a_refusal_in_another() {
        assert!(batch_put_error(Vec::new(), 3).is_none());
        // The refusal ended first; the other range's batch may have been applied.
        let e = batch_put_error(vec![refused(), timed_out()], 0).unwrap();
        assert!(e.is_outcome_unknown(), "{e}");
        let e = batch_put_error(
            vec![
                refused(),
                ClientError::DeadlineExceeded {
                    deadline_ms: 100,
                    attempts: 2,
                    last: Box::new(timed_out()),
                },
            ],
            0,
        )
        .unwrap();
        assert!(matches!(e, ClientError::DeadlineExceeded { .. }), "{e}");
        // Only refusals, nothing written: the call did nothing.
        let e = batch_put_error(vec![refused(), refused()], 0).unwrap();
        assert!(!e.is_outcome_unknown(), "{e}");
        assert!(matches!(
            e,
            ClientError::Server(ServerError::InvalidArgument { .. })
        ));
        // Refused after other ranges' pairs were written: written in part.
        let e = batch_put_error(vec![refused()], 5).unwrap();
        assert!(e.is_outcome_unknown(), "{e}");
        assert!(e.to_string().contains("5 pairs were written"), "{e}");
    }
}
