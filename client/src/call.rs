//! How one request finds its range and node, and how it is retried.
//!
//! A key-addressed request looks its range up in the [`RouteCache`] (a miss
//! asks the meta range with `Locate`), sends the range id and epoch it
//! believes in, and picks a node: the range's leader for writes and STRONG
//! reads, the range's replicas in rotation for weaker reads (each try bounded
//! by the replica attempt timeout, then the leader). A refused request heals
//! the cache from what the error carries and is sent again at once; transient
//! failures back off (capped exponential, full jitter). Every try of one
//! logical call shares a [`Budget`]: the client's deadline and attempt limit.
//!
//! Calls served by the meta range's leader (`Locate` and the operator calls)
//! go through [`Client::meta_call`], which follows `NotLeader` hints.
//!
//! [`RouteCache`]: crate::route_cache::RouteCache

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use lmskv_proto::error::Error as ServerError;
use lmskv_proto::range::epoch;
use lmskv_proto::v1::admin_client::AdminClient;
use lmskv_proto::v1::{self, LocateRequest, RangeDescriptor, RangeInfo};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::bundle::Conn;
use crate::client::{Client, Route, Served};
use crate::error::ClientError;
use crate::replica_selector::REPLICA_TRIES_MAX;
use crate::retry::RetryPolicy;
use crate::route_cache::{CachedRange, LOCATE_DEADLINE};

/// Ranges a `Locate` asks for beyond the one holding the key.
pub const LOCATE_PREFETCH: u32 = 16;
/// How long one try of a `Locate` on one node may take.
pub const META_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Refusals healed from the error itself that are resent at once; beyond
/// this many in a row the call backs off (the cluster is mid-change).
const HEALED_RETRIES_BEFORE_BACKOFF: u32 = 3;
/// A `NotLeader` hint naming a node whose last try just timed out is most
/// likely stale (a follower that has not yet heard of the new leader): it
/// is not followed at once, but at most this many times in a row the call
/// asks another replica first; after that the hint is followed (the node
/// may really lead again, e.g. after a short pause).
const SUSPECT_HINTS_SKIPPED_MAX: u32 = 3;

/// The shortest try that asks a replica to hold the request until a leader
/// other than the suspect is elected. Such a replica answers as soon as the
/// election is decided, so a long try costs nothing when it goes well; it
/// must outlast the election, which openraft calls only after the lease and
/// an election timeout of silence (600-800 ms after the lost leader's last
/// heartbeat with the node's default 200-400 ms timeouts), or the replica
/// answers with the lost leader's name just before and the call spends
/// another try.
pub const HELD_ATTEMPT_TIMEOUT_MIN: Duration = Duration::from_millis(1_500);

/// Replicas of one cached descriptor a call skips after each answered
/// that it does not hold the range, before it looks the range up again.
const NOT_FOUND_TRIED_MAX: usize = 4;

/// Takes off the replicas a call skips (see [`NOT_FOUND_TRIED_MAX`]) those
/// an answer other than `RangeNotFound` shows to hold the range after all:
/// the leader a `NotLeader` names (right after a split the new range opens
/// on each node a moment apart, so a node that had not opened it yet may
/// lead it a moment later), and every one once the answer brings a new
/// descriptor (`EpochMismatch`, `KeyNotInRange`). Without this a call kept
/// asking a follower that named the skipped leader until its deadline.
fn unskip(not_found: &mut Vec<u64>, err: &ServerError) {
    match err {
        ServerError::NotLeader {
            leader: Some(h), ..
        } => not_found.retain(|n| *n != h.node_id),
        ServerError::EpochMismatch { .. } | ServerError::KeyNotInRange { .. } => not_found.clear(),
        _ => {}
    }
}

/// How long a try that names a suspect leader lets the replica hold it
/// for a new leader: most of the try's time, leaving room for the answer
/// (a replica that holds it the whole try would look unreachable too).
fn leader_wait_ms(try_time: Duration) -> u32 {
    let ms = try_time.as_millis().saturating_mul(3) / 4;
    u32::try_from(ms).unwrap_or(u32::MAX)
}

/// The retry budget of one logical call, shared by every request it makes.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    pub deadline: Instant,
    deadline_ms: u64,
    attempts: u32,
    attempts_max: u32,
    backoffs: u32,
    last: Option<ServerError>,
    /// A try failed in a way that leaves its outcome unknown (it may have
    /// been applied): a write must not be re-sent under a new request id.
    maybe_applied: bool,
    /// How much longer than the client's leader attempt timeout one try on
    /// a leader may take (see `leader_try_extra` in `client.rs`): zero for
    /// ordinary calls.
    leader_try_extra: Duration,
}

impl Budget {
    pub fn new(policy: &RetryPolicy) -> Self {
        Budget {
            deadline: Instant::now() + policy.deadline,
            deadline_ms: policy.deadline.as_millis() as u64,
            attempts: 0,
            attempts_max: policy.attempts_max,
            backoffs: 0,
            last: None,
            maybe_applied: false,
            leader_try_extra: Duration::ZERO,
        }
    }

    /// A fresh attempt count under the same deadline (for one range of a fan-out).
    pub fn fork(&self) -> Self {
        Budget {
            attempts: 0,
            backoffs: 0,
            last: None,
            maybe_applied: false,
            ..self.clone()
        }
    }

    /// Lets each try on a leader take `extra` longer than the client's
    /// leader attempt timeout: a write that needs it (see
    /// [`crate::client::leader_try_extra`]).
    pub fn with_leader_try_extra(mut self, extra: Duration) -> Self {
        self.leader_try_extra = extra;
        self
    }

    /// How much longer than the leader attempt timeout a try on a leader
    /// may take.
    pub fn leader_try_extra(&self) -> Duration {
        self.leader_try_extra
    }

    /// The error a spent budget ends the call with.
    pub fn exceeded(&self) -> ClientError {
        let last = self.last.clone().unwrap_or_else(|| ServerError::Timeout {
            reason: "no answer before the deadline".into(),
        });
        ClientError::DeadlineExceeded {
            deadline_ms: self.deadline_ms,
            attempts: self.attempts,
            last: Box::new(ClientError::Server(last)),
        }
    }

    /// Counts one more try; fails when attempts or time are spent.
    pub fn attempt(&mut self) -> Result<(), ClientError> {
        if self.attempts >= self.attempts_max || Instant::now() >= self.deadline {
            return Err(self.exceeded());
        }
        self.attempts += 1;
        Ok(())
    }

    /// Records why the last try failed.
    pub fn failed(&mut self, e: ServerError) {
        if matches!(
            e,
            ServerError::Timeout { .. } | ServerError::Unavailable { .. }
        ) {
            self.maybe_applied = true;
        }
        self.last = Some(e);
    }

    /// Records why a call could not send its try at all (the route lookup
    /// failed): the error is reported, but nothing can have been applied.
    pub fn unsent(&mut self, e: ServerError) {
        self.last = Some(e);
    }

    /// Whether some try of this budget may have been applied although it
    /// failed (a timeout, a lost connection).
    pub fn maybe_applied(&self) -> bool {
        self.maybe_applied
    }

    /// The error a write's call ends with when its last try failed with
    /// `e`: `e` itself, unless an earlier try may have been applied and `e`
    /// does not settle that ([`ClientError::settles_earlier_tries`]; a late
    /// copy refused by its session's mark, say, or an error made before
    /// the try reached the range): then a [`ServerError::Timeout`] that
    /// says the write's outcome is unknown and names `e`.
    pub fn settle(&self, e: ClientError) -> ClientError {
        if !self.maybe_applied || e.is_outcome_unknown() || e.settles_earlier_tries() {
            return e;
        }
        ClientError::Server(ServerError::Timeout {
            reason: format!(
                "an earlier try timed out or lost its connection, so the write may or may not \
                 have been applied; the last try failed with: {e}"
            ),
        })
    }

    /// Sleeps a backoff step, or fails when it would pass the deadline.
    pub async fn backoff(&mut self, policy: &RetryPolicy) -> Result<(), ClientError> {
        self.backoffs += 1;
        self.sleep(policy.backoff(self.backoffs)).await
    }

    /// Sleeps `d`, or fails when it would pass the deadline.
    pub async fn sleep(&mut self, d: Duration) -> Result<(), ClientError> {
        if Instant::now() + d >= self.deadline {
            return Err(self.exceeded());
        }
        tokio::time::sleep(d).await;
        Ok(())
    }
}

/// Why a range-addressed request did not succeed.
#[derive(Debug)]
pub(crate) enum RangeCallError {
    /// The keys no longer fit in one range (it split): regroup them.
    Regroup(RangeDescriptor),
    /// The call failed.
    Failed(ClientError),
}

impl From<ClientError> for RangeCallError {
    fn from(e: ClientError) -> Self {
        RangeCallError::Failed(e)
    }
}

/// Sends one try to `target`, giving up at `until`.
pub(crate) async fn send<T, Fut>(target: &str, until: Instant, fut: Fut) -> Result<T, ServerError>
where
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout_at(until, fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(ServerError::from_status(&status)),
        Err(_) => Err(ServerError::Timeout {
            reason: format!("no answer from {target} in time"),
        }),
    }
}

impl Client {
    /// The range holding `key` (`reverse`: the keys just below `key`), from
    /// the route cache or the meta range.
    pub(crate) async fn locate(
        &self,
        key: &[u8],
        reverse: bool,
        deadline: Instant,
    ) -> Result<CachedRange, ClientError> {
        // The lookup may be shared with other callers (clones of this client
        // with other deadlines among them) and outlive this one, so it runs
        // to a deadline of its own, not to this caller's.
        let mut this = self.clone();
        this.retry.deadline = LOCATE_DEADLINE;
        let k = Bytes::copy_from_slice(key);
        let lookup = self
            .inner
            .routes
            .locate(key, reverse, move |until| async move {
                this.fetch_ranges(k, reverse, until).await
            });
        let timed_out = || {
            ClientError::Server(ServerError::Timeout {
                reason: "locating the range took until the deadline".into(),
            })
        };
        match tokio::time::timeout_at(deadline, lookup).await {
            // A shared lookup that ran out of its own time fails this caller
            // only as one more try: it may have time for another.
            Ok(Err(ClientError::DeadlineExceeded { .. })) => Err(timed_out()),
            Ok(r) => r,
            Err(_) => Err(timed_out()),
        }
    }

    pub(crate) async fn fetch_ranges(
        &self,
        key: Bytes,
        reverse: bool,
        deadline: Instant,
    ) -> Result<Vec<RangeInfo>, ClientError> {
        let req = LocateRequest {
            key,
            prefetch: LOCATE_PREFETCH,
            reverse,
        };
        let resp = self
            .meta_call(deadline, Some(META_ATTEMPT_TIMEOUT), |mut c| {
                let req = req.clone();
                async move { c.locate(req).await }
            })
            .await?;
        Ok(resp.ranges)
    }

    fn meta_target(&self) -> String {
        if let Some(l) = self.inner.meta_leader.lock().expect("meta lock").clone() {
            return l;
        }
        let i = self
            .inner
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.endpoints[i % self.inner.endpoints.len()].clone()
    }

    fn forget_meta_leader(&self, addr: &str) {
        let mut l = self.inner.meta_leader.lock().expect("meta lock");
        if l.as_deref() == Some(addr) {
            *l = None;
        }
        self.inner
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn admin_client(&self, target: &str) -> Result<AdminClient<Channel>, ClientError> {
        Ok(AdminClient::new(self.channel(target)?)
            .max_decoding_message_size(lmskv_proto::limits::GRPC_MESSAGE_BYTES_MAX))
    }

    /// Runs an `Admin` call that the meta range's leader serves, following
    /// `NotLeader` hints and retrying transient failures until `deadline`.
    /// Each try waits at most `attempt_timeout` when given.
    pub(crate) async fn meta_call<T, F, Fut>(
        &self,
        deadline: Instant,
        attempt_timeout: Option<Duration>,
        f: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut budget = self.meta_budget(deadline);
        self.meta_call_in(&mut budget, attempt_timeout, f).await
    }

    /// A budget for meta calls that end at `deadline`: the caller's, not
    /// the policy's, since a replica move may take longer than a request
    /// (`MOVE_REPLICA_ATTEMPT_TIMEOUT`).
    pub(crate) fn meta_budget(&self, deadline: Instant) -> Budget {
        let mut budget = Budget::new(&self.retry);
        budget.deadline = deadline;
        budget.deadline_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        budget
    }

    /// [`Client::meta_call`] within `budget`, which tells the caller
    /// afterwards whether a failed try may have been applied.
    pub(crate) async fn meta_call_in<T, F, Fut>(
        &self,
        budget: &mut Budget,
        attempt_timeout: Option<Duration>,
        mut f: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        loop {
            budget.attempt()?;
            let target = self.meta_target();
            let now = Instant::now();
            let until = attempt_timeout.map_or(budget.deadline, |t| budget.deadline.min(now + t));
            let err = match send(&target, until, f(self.admin_client(&target)?)).await {
                Ok(r) => {
                    let mut l = self.inner.meta_leader.lock().expect("meta lock");
                    if l.is_none() {
                        *l = Some(target);
                    }
                    return Ok(r);
                }
                Err(e) => e,
            };
            tracing::debug!(%target, error = %err, "meta call try failed");
            match &err {
                ServerError::NotLeader {
                    leader: Some(h), ..
                } if !h.address.is_empty() && h.address != target => {
                    self.inner.routes.set_address(h.node_id, &h.address);
                    *self.inner.meta_leader.lock().expect("meta lock") = Some(h.address.clone());
                    budget.failed(err);
                }
                ServerError::Overloaded { retry_after_ms } => {
                    let d = Duration::from_millis((*retry_after_ms).clamp(1, 5_000));
                    budget.failed(err);
                    budget.sleep(d).await?;
                }
                e if e.is_retryable() => {
                    self.forget_meta_leader(&target);
                    budget.failed(err);
                    budget.backoff(&self.retry).await?;
                }
                _ => return Err(ClientError::Server(err)),
            }
        }
    }

    /// The node to send a try to, and its address: a replica in rotation for
    /// a weak read, else the leader (or, when unknown, some replica, which
    /// answers with a hint).
    fn pick(&self, range: &CachedRange, weak: bool, skip: &[u64]) -> Option<(u64, String)> {
        let routes = &self.inner.routes;
        let known: Vec<(u64, String)> = range
            .desc
            .replicas
            .iter()
            .filter(|r| !skip.contains(&r.node_id))
            .filter_map(|r| routes.address(r.node_id).map(|a| (r.node_id, a)))
            .collect();
        if weak {
            let addrs: Vec<String> = known.iter().map(|(_, a)| a.clone()).collect();
            if let Some(a) = self.inner.replicas.order(&addrs, 1).into_iter().next() {
                return known.into_iter().find(|(_, k)| *k == a);
            }
        }
        if range.leader_id != 0 && !skip.contains(&range.leader_id) {
            if let Some(a) = routes.address(range.leader_id) {
                return Some((range.leader_id, a));
            }
        }
        let addrs: Vec<String> = known.iter().map(|(_, a)| a.clone()).collect();
        let a = self
            .inner
            .replicas
            .order(&addrs, 1)
            .into_iter()
            .next()
            .or_else(|| addrs.first().cloned())?;
        known.into_iter().find(|(_, k)| *k == a)
    }

    /// Sends a request for the range holding `anchor` (`reverse`: the keys
    /// just below it) where `route` allows, healing the route cache from
    /// refusals and retrying within `budget`. `fits` says whether a range
    /// still holds every key of the request; when a refreshed range does not,
    /// the caller must regroup. Returns the response and the descriptor it
    /// was sent under.
    pub(crate) async fn range_call<T, F, Fut>(
        &self,
        budget: &mut Budget,
        anchor: &[u8],
        reverse: bool,
        route: Route,
        fits: &(dyn Fn(&RangeDescriptor) -> bool + Send + Sync),
        mut f: F,
    ) -> Result<(T, RangeDescriptor), RangeCallError>
    where
        T: Served,
        F: FnMut(Conn, v1::RequestHeader) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let policy = &self.retry;
        let mut replica_tries = 0usize;
        let mut healed_in_a_row = 0u32;
        let mut suspect_hints = 0u32;
        // A node this call's last try on the leader could not reach (or a
        // hint named after that): the next tries ask the other replicas to
        // hold the request until an election replaces it.
        let mut suspect = 0u64;
        // Replicas of the cached descriptor that answered that they do not
        // hold the range (it moved away from them): the others are tried
        // before the route is looked up again.
        let mut not_found: Vec<u64> = Vec::new();
        loop {
            budget.attempt()?;
            let range = match self.locate(anchor, reverse, budget.deadline).await {
                Ok(r) => r,
                Err(ClientError::Server(e)) if e.is_retryable() => {
                    tracing::debug!(error = %e, "locate failed");
                    budget.unsent(e);
                    budget.backoff(policy).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if !fits(&range.desc) {
                return Err(RangeCallError::Regroup(range.desc));
            }
            let range_id = range.desc.range_id;
            let weak = route == Route::AnyReplica && replica_tries < REPLICA_TRIES_MAX;
            let Some((node_id, addr)) = self.pick(&range, weak, &not_found) else {
                // No replica's address is known: ask the meta range again.
                self.inner.routes.evict(range_id);
                budget.unsent(ServerError::unavailable(format!(
                    "no address known for a replica of range {range_id}"
                )));
                budget.backoff(policy).await?;
                continue;
            };
            if weak {
                replica_tries += 1;
            }
            let now = Instant::now();
            let asks_elsewhere = !weak && suspect != 0 && suspect != node_id;
            // A try on the leader, or held for one, gets the extra time its
            // write needs (none for ordinary calls) on top of the usual.
            let extra = budget.leader_try_extra();
            let held = self
                .inner
                .leader_attempt_timeout
                .max(HELD_ATTEMPT_TIMEOUT_MIN);
            let until = if weak {
                budget
                    .deadline
                    .min(now + self.inner.replica_attempt_timeout)
            } else if asks_elsewhere {
                budget.deadline.min(now + held + extra)
            } else {
                budget
                    .deadline
                    .min(now + self.inner.leader_attempt_timeout + extra)
            };
            let header = v1::RequestHeader {
                range_id,
                epoch: Some(epoch(&range.desc)),
                suspect_leader: if asks_elsewhere { suspect } else { 0 },
                // The hold is the usual part of the try: the extra time is
                // for serving the write once a leader is known.
                leader_wait_ms: if asks_elsewhere {
                    leader_wait_ms(until.saturating_duration_since(now).min(held))
                } else {
                    0
                },
            };
            let client = self.conn(&addr, until)?;
            let err = match send(&addr, until, f(client, header)).await {
                Ok(resp) => {
                    if let Some(h) = resp.header() {
                        if h.leader_id != 0 {
                            self.inner.routes.set_leader(range_id, h.leader_id, None);
                        }
                    } else if route == Route::Leader {
                        self.inner.routes.set_leader(range_id, node_id, None);
                    }
                    self.inner.replicas.clear(&addr);
                    self.observe(resp.header());
                    if !not_found.is_empty() {
                        // A replica the cached descriptor names no longer
                        // holds the range (it moved; a move changes the
                        // members, not the span, so no request is refused
                        // with the new descriptor): the next call locates
                        // the range afresh instead of asking that node
                        // again, and reaches the replica that took its place.
                        self.inner.routes.evict_after_not_found(range_id);
                    }
                    return Ok((resp, range.desc));
                }
                Err(e) => e,
            };
            tracing::debug!(range_id, node_id, %addr, leader_id = range.leader_id, weak, error = %err, "range call try failed");
            // A replica that no longer holds the range does not drop the
            // cached route at once (see the `RangeNotFound` arm below).
            let healed = !matches!(err, ServerError::RangeNotFound { .. })
                && self.inner.routes.heal(&err, node_id);
            unskip(&mut not_found, &err);
            match &err {
                ServerError::NotLeader { leader, .. } => {
                    healed_in_a_row += 1;
                    let hinted_suspect = leader.as_ref().is_some_and(|h| {
                        !h.address.is_empty() && self.inner.replicas.is_suspect(&h.address)
                    });
                    if hinted_suspect && suspect_hints < SUSPECT_HINTS_SKIPPED_MAX {
                        // The hinted node just failed on this client: ask
                        // another replica instead of waiting a whole try on
                        // it again. A replica that was asked to hold the
                        // request for a new leader (and still names this
                        // one) has paced the call already; otherwise back
                        // off first.
                        suspect_hints += 1;
                        let waited =
                            asks_elsewhere && leader.as_ref().is_some_and(|h| h.node_id == suspect);
                        if let Some(h) = leader {
                            self.inner.routes.clear_leader(range_id, h.node_id);
                            suspect = h.node_id;
                        }
                        budget.failed(err);
                        if !waited {
                            budget.backoff(policy).await?;
                        }
                        continue;
                    }
                    let useful = healed && leader.as_ref().is_some_and(|h| h.node_id != node_id);
                    if !(weak || useful && healed_in_a_row <= HEALED_RETRIES_BEFORE_BACKOFF) {
                        budget.failed(err);
                        budget.backoff(policy).await?;
                        continue;
                    }
                }
                ServerError::EpochMismatch { .. } | ServerError::KeyNotInRange { .. } => {
                    healed_in_a_row += 1;
                    if !healed || healed_in_a_row > HEALED_RETRIES_BEFORE_BACKOFF {
                        budget.failed(err);
                        budget.backoff(policy).await?;
                        continue;
                    }
                }
                ServerError::RangeNotFound { .. } => {
                    // The descriptor is stale, but its other replicas most
                    // likely still hold the range (a replica move changes
                    // one at a time): ask them before the meta range, whose
                    // own leader may be what just failed.
                    let others_left = range.desc.replicas.iter().any(|r| {
                        r.node_id != node_id
                            && !not_found.contains(&r.node_id)
                            && self.inner.routes.address(r.node_id).is_some()
                    });
                    if others_left && not_found.len() < NOT_FOUND_TRIED_MAX {
                        not_found.push(node_id);
                        budget.failed(err);
                        continue;
                    }
                    not_found.clear();
                    self.inner.routes.evict(range_id);
                    budget.failed(err);
                    budget.backoff(policy).await?;
                    continue;
                }
                ServerError::Overloaded { retry_after_ms } => {
                    let d = Duration::from_millis((*retry_after_ms).clamp(1, 5_000));
                    budget.failed(err);
                    budget.sleep(d).await?;
                    continue;
                }
                e if e.is_retryable() || matches!(e, ServerError::Corruption { .. }) => {
                    // A replica that refuses its corrupt copy is no reason
                    // to fail a read another replica can serve; and a
                    // leader that refuses one stops leading (its node stops
                    // the range's group there), so a request that needs the
                    // leader goes on to the one its peers elect.
                    self.inner.replicas.suspect(&addr);
                    self.inner.routes.clear_leader(range_id, node_id);
                    if !weak {
                        suspect = node_id;
                    }
                    // With some replica's address unknown the next try could
                    // only pick this node again: locate the range afresh,
                    // which brings every replica's address.
                    let routes = &self.inner.routes;
                    if range
                        .desc
                        .replicas
                        .iter()
                        .any(|r| routes.address(r.node_id).is_none())
                    {
                        routes.evict(range_id);
                    }
                    if !weak {
                        budget.failed(err);
                        budget.backoff(policy).await?;
                        continue;
                    }
                }
                _ => return Err(ClientError::Server(err).into()),
            }
            budget.failed(err);
        }
    }

    /// [`Client::range_call`] for a request about one key.
    pub(crate) async fn key_call<T, F, Fut>(
        &self,
        key: &[u8],
        route: Route,
        f: F,
    ) -> Result<T, ClientError>
    where
        T: Served,
        F: FnMut(Conn, v1::RequestHeader) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.key_call_in(&mut Budget::new(&self.retry), key, route, f)
            .await
    }

    /// [`Client::key_call`] within `budget`.
    pub(crate) async fn key_call_in<T, F, Fut>(
        &self,
        budget: &mut Budget,
        key: &[u8],
        route: Route,
        f: F,
    ) -> Result<T, ClientError>
    where
        T: Served,
        F: FnMut(Conn, v1::RequestHeader) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self
            .range_call(budget, key, false, route, &|_| true, f)
            .await
        {
            Ok((t, _)) => Ok(t),
            Err(RangeCallError::Failed(e)) => Err(e),
            Err(RangeCallError::Regroup(_)) => Err(ClientError::Server(ServerError::internal(
                "a one-key request cannot span ranges",
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmskv_proto::error::LeaderHint;

    fn not_leader(leader: Option<u64>) -> ServerError {
        ServerError::NotLeader {
            range_id: 3,
            leader: leader.map(|node_id| LeaderHint {
                node_id,
                address: format!("127.0.0.1:{}", 7000 + node_id),
            }),
        }
    }

    #[test]
    fn a_skipped_replica_named_leader_is_asked_again() {
        // Node 1 had not opened the new range yet; node 2 then names it leader.
        let mut skipped = vec![1, 3];
        unskip(&mut skipped, &not_leader(Some(1)));
        assert_eq!(skipped, vec![3]);
        // A hint naming another node, or none, leaves the list as it is.
        unskip(&mut skipped, &not_leader(Some(2)));
        unskip(&mut skipped, &not_leader(None));
        assert_eq!(skipped, vec![3]);
        unskip(&mut skipped, &ServerError::unavailable("busy"));
        assert_eq!(skipped, vec![3]);
    }

    #[test]
    fn a_refusal_that_does_not_settle_an_earlier_lost_try_reports_an_unknown_outcome() {
        let policy = RetryPolicy::default();
        let late_copy = || {
            ClientError::Server(ServerError::invalid_argument(
                "write.request_id",
                "below its session's completed mark",
            ))
        };
        // No try may have been applied: the refusal is the outcome.
        let mut b = Budget::new(&policy);
        b.failed(not_leader(Some(2)));
        b.unsent(ServerError::unavailable("no address known"));
        assert!(!b.maybe_applied());
        assert!(!b.settle(late_copy()).is_outcome_unknown());

        for lost in [
            ServerError::Timeout {
                reason: "no answer in time".into(),
            },
            ServerError::unavailable("connection reset"),
        ] {
            let mut b = Budget::new(&policy);
            b.failed(lost);
            assert!(b.maybe_applied());
            let e = b.settle(late_copy());
            assert!(e.is_outcome_unknown(), "{e:?}");
            assert!(e.to_string().contains("write.request_id"), "{e}");
            let e = b.settle(ClientError::Config("bad address".into()));
            assert!(e.is_outcome_unknown(), "{e:?}");
            // The state machine's answer for the request id, and a refusal of
            // the content every try carried, settle it.
            let cas = ClientError::Server(ServerError::CasFailed { current: None });
            assert!(matches!(
                b.settle(cas),
                ClientError::Server(ServerError::CasFailed { .. })
            ));
            let content = ClientError::Server(ServerError::invalid_argument("value", "too large"));
            assert!(matches!(
                b.settle(content),
                ClientError::Server(ServerError::InvalidArgument { .. })
            ));
            // An error of unknown outcome is kept as it is.
            let internal = ClientError::Server(ServerError::internal("boom"));
            assert!(matches!(
                b.settle(internal),
                ClientError::Server(ServerError::Internal { .. })
            ));
            // A fan-out's fork starts with no try of its own.
            assert!(!b.fork().maybe_applied());
        }
    }

    #[test]
    fn a_new_descriptor_ends_every_skip() {
        let mut skipped = vec![1, 2];
        unskip(
            &mut skipped,
            &ServerError::EpochMismatch {
                range_id: 3,
                current: Vec::new(),
            },
        );
        assert!(skipped.is_empty());
        let mut skipped = vec![2];
        unskip(
            &mut skipped,
            &ServerError::KeyNotInRange {
                range_id: 3,
                current: None,
            },
        );
        assert!(skipped.is_empty());
        // A RangeNotFound answer is what adds to the list, never removes.
        let mut skipped = vec![2];
        unskip(&mut skipped, &ServerError::RangeNotFound { range_id: 3 });
        assert_eq!(skipped, vec![2]);
    }
}
