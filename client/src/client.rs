//! [`Client`]: leader discovery, read routing by consistency level, retries,
//! the read cache and the typed key-value API.
//!
//! Writes and STRONG reads go to the leader, following `NotLeader` hints.
//! Reads at the other levels may be served by any replica: they go to the
//! seed endpoints in rotation ([`ReplicaSelector`]), each try bounded by the
//! replica attempt timeout, and fall back to the leader. EVENTUAL and
//! BOUNDED_STALENESS reads are answered from the [`ReadCache`] when an entry
//! is fresh enough for them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant as StdInstant;

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
use crate::read_cache::{fresh_at, CacheStats, CachedRead, ReadCache, ReadCacheConfig};
use crate::replica_selector::{ReplicaSelector, REPLICA_TRIES_MAX};
use crate::retry::RetryPolicy;
use crate::session_token::SessionToken;

/// Endpoints a client may be configured with at most.
pub const ENDPOINTS_MAX: usize = 64;
/// How long one try of a read on one replica may take by default before the
/// read moves on to another replica.
pub const REPLICA_ATTEMPT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(1);

/// Read consistency level, chosen per read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// Linearizable: the read sees every write acknowledged before it started.
    #[default]
    Strong,
    /// At most this far behind the leader.
    BoundedStaleness(Duration),
    /// Sees at least the state at this session token (a write's `index`, or
    /// [`SessionToken::read_consistency`]).
    Session(u64),
    /// Some replica's applied state: a prefix of the log, possibly old.
    ConsistentPrefix,
    /// Possibly old; may be served from a cache.
    Eventual,
}

/// Where a request may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// To the leader, following `NotLeader` hints.
    Leader,
    /// To any replica first, then the leader.
    AnyReplica,
}

impl ReadConsistency {
    fn route(self) -> Route {
        match self {
            ReadConsistency::Strong => Route::Leader,
            _ => Route::AnyReplica,
        }
    }

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

impl WriteResult {
    /// The session token of this write: a SESSION read at it sees the write.
    pub fn session_token(&self) -> SessionToken {
        SessionToken::from_index(self.index)
    }
}

/// The node that served a read, as its response header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedBy {
    /// The serving node.
    pub node_id: u64,
    /// The range the key belongs to.
    pub range_id: u64,
    /// The serving replica's applied index when it answered.
    pub applied_index: u64,
    /// The range's leader as the serving node knew it (0: unknown).
    pub leader_id: u64,
}

impl ServedBy {
    /// The session token of this read: a later SESSION read at it sees at
    /// least the state this read saw.
    pub fn session_token(&self) -> SessionToken {
        SessionToken::for_range(self.range_id, self.applied_index)
    }
}

impl From<&v1::ResponseHeader> for ServedBy {
    fn from(h: &v1::ResponseHeader) -> Self {
        ServedBy {
            node_id: h.node_id,
            range_id: h.range_id,
            applied_index: h.applied_index,
            leader_id: h.leader_id,
        }
    }
}

/// A read of one key with where it was served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetOutcome {
    /// The key's state; `None` when it does not exist.
    pub kv: Option<KeyValue>,
    /// The node that answered; `None` when the read cache answered.
    pub served_by: Option<ServedBy>,
}

impl GetOutcome {
    /// Whether the client's read cache answered, without a network call.
    pub fn from_cache(&self) -> bool {
        self.served_by.is_none()
    }
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

impl CasOutcome {
    /// The session token of this call: a SESSION read at it sees its outcome.
    pub fn session_token(&self) -> SessionToken {
        SessionToken::from_index(self.index)
    }
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

impl BatchOutcome {
    /// The session token of this batch: a SESSION read at it sees its outcome.
    pub fn session_token(&self) -> SessionToken {
        SessionToken::from_index(self.index)
    }
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
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    retry: RetryPolicy,
    read_cache: Option<ReadCacheConfig>,
    replica_attempt_timeout: Duration,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            endpoints: Vec::new(),
            retry: RetryPolicy::default(),
            read_cache: Some(ReadCacheConfig::default()),
            replica_attempt_timeout: REPLICA_ATTEMPT_TIMEOUT_DEFAULT,
        }
    }
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

    /// Bounds the read cache: at most `entries_max` entries and `bytes_max`
    /// bytes, each usable by EVENTUAL reads for `ttl` after it was stored. The
    /// cache is on by default (see [`ReadCacheConfig::default`]).
    pub fn read_cache(mut self, entries_max: u64, bytes_max: u64, ttl: Duration) -> Self {
        self.read_cache = Some(ReadCacheConfig {
            entries_max,
            bytes_max,
            ttl,
        });
        self
    }

    /// Turns the read cache off: every read goes to a node.
    pub fn without_read_cache(mut self) -> Self {
        self.read_cache = None;
        self
    }

    /// How long a read that any replica may serve waits for one replica
    /// before it tries another (and finally the leader).
    pub fn replica_attempt_timeout(mut self, d: Duration) -> Self {
        self.replica_attempt_timeout = d;
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
        if self.replica_attempt_timeout.is_zero() {
            return Err(ClientError::Config(
                "replica_attempt_timeout must be positive".into(),
            ));
        }
        if let Some(cfg) = &self.read_cache {
            cfg.validate().map_err(ClientError::Config)?;
        }
        Ok(Client {
            inner: Arc::new(Inner {
                replicas: ReplicaSelector::new(endpoints.clone()),
                endpoints,
                retry: self.retry,
                replica_attempt_timeout: self.replica_attempt_timeout,
                channels: Mutex::new(HashMap::new()),
                leader: Mutex::new(None),
                next: AtomicUsize::new(0),
                cache: self.read_cache.as_ref().map(ReadCache::new),
                session: Mutex::new(SessionToken::new()),
            }),
        })
    }
}

/// An lmskv client. Cheap to clone; clones share connections, the leader,
/// the read cache and the session token.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoints: Vec<String>,
    retry: RetryPolicy,
    /// Longest one try of a read on one replica may take.
    replica_attempt_timeout: Duration,
    /// One HTTP/2 channel per node address, including leaders learnt from hints.
    channels: Mutex<HashMap<String, Channel>>,
    /// The address believed to be the leader.
    leader: Mutex<Option<String>>,
    next: AtomicUsize,
    /// Where reads that any replica may serve go.
    replicas: ReplicaSelector,
    /// `None` when the read cache is off.
    cache: Option<ReadCache>,
    /// What this client has seen: grows with every response.
    session: Mutex<SessionToken>,
}

/// A response that says where it was served.
trait Served {
    fn header(&self) -> Option<&v1::ResponseHeader>;
}

macro_rules! served {
    ($($t:ty),*) => {
        $(impl Served for $t {
            fn header(&self) -> Option<&v1::ResponseHeader> {
                self.header.as_ref()
            }
        })*
    };
}

served!(
    v1::GetResponse,
    v1::PutResponse,
    v1::DeleteResponse,
    v1::ScanResponse,
    v1::CompareAndSwapResponse,
    v1::BatchResponse
);

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

/// The state an acknowledged write left its key in, for the read cache.
/// The write was applied after `started`, and its state was the latest then.
/// The state is as of the key's version when it has one: a retry answered
/// from the dedup table carries the log index of the retry, not of the write.
/// When the caller chose the request id, the call may be the retry of a write
/// applied long ago and overwritten since, so the key is only forgotten.
fn written_state(
    kv: Option<KeyValue>,
    index: u64,
    opts: &WriteOptions,
    started: StdInstant,
) -> Option<CachedRead> {
    if index == 0 || opts.request_id.is_some() {
        return None;
    }
    let as_of = kv.as_ref().map_or(index, |kv| kv.version.min(index));
    Some(CachedRead::new(kv, as_of, Some(started)))
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

    fn kv_client(&self, target: &str) -> Result<KvClient<Channel>, ClientError> {
        Ok(KvClient::new(self.channel(target)?)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX))
    }

    /// Sends one try to `target`, giving up at `until`.
    async fn send<T, Fut>(target: &str, until: Instant, fut: Fut) -> Result<T, ServerError>
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

    fn follow_hint(&self, err: &ServerError, target: &str) -> bool {
        match err {
            ServerError::NotLeader {
                leader: Some(h), ..
            } if !h.address.is_empty() && h.address != target => {
                *self.inner.leader.lock().expect("leader lock") = Some(h.address.clone());
                true
            }
            _ => false,
        }
    }

    /// Adds a response's applied index to the client's session token.
    fn observe(&self, header: Option<&v1::ResponseHeader>) {
        if let Some(h) = header {
            self.inner
                .session
                .lock()
                .expect("session lock")
                .observe(h.range_id, h.applied_index);
        }
    }

    /// Runs `f` where `route` allows, retrying retryable errors with backoff
    /// until the attempts or the deadline run out.
    ///
    /// [`Route::AnyReplica`] first tries up to [`REPLICA_TRIES_MAX`] replicas
    /// in rotation, each for at most the replica attempt timeout and without
    /// backoff (each try goes to another node), then continues as
    /// [`Route::Leader`] does: to the leader, following hints.
    async fn call<T, F, Fut>(&self, route: Route, mut f: F) -> Result<T, ClientError>
    where
        T: Served,
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let policy = &self.inner.retry;
        let start = Instant::now();
        let deadline = start + policy.deadline;
        let deadline_exceeded = |attempts, err| ClientError::DeadlineExceeded {
            deadline_ms: policy.deadline.as_millis() as u64,
            attempts,
            last: Box::new(ClientError::Server(err)),
        };
        // A read may give up on one node early; a write waits for its answer.
        let until = |now: Instant| match route {
            Route::AnyReplica => deadline.min(now + self.inner.replica_attempt_timeout),
            Route::Leader => deadline,
        };
        let mut attempts = 0u32;
        if route == Route::AnyReplica {
            let mut last = None;
            for target in self.inner.replicas.order(REPLICA_TRIES_MAX) {
                let now = Instant::now();
                if attempts >= policy.attempts_max || now >= deadline {
                    break;
                }
                attempts += 1;
                let client = self.kv_client(&target)?;
                match Self::send(&target, until(now), f(client)).await {
                    Ok(resp) => {
                        self.inner.replicas.clear(&target);
                        self.observe(resp.header());
                        return Ok(resp);
                    }
                    // A replica that refuses its corrupt copy of the range
                    // is no reason to fail a read another replica can serve.
                    Err(e) if e.is_retryable() || matches!(e, ServerError::Corruption { .. }) => {
                        self.follow_hint(&e, &target);
                        self.inner.replicas.suspect(&target);
                        last = Some(e);
                    }
                    Err(e) => return Err(ClientError::Server(e)),
                }
            }
            if let Some(e) = last {
                if attempts >= policy.attempts_max || Instant::now() >= deadline {
                    return Err(deadline_exceeded(attempts, e));
                }
            }
        }
        let mut backoffs = 0u32;
        loop {
            attempts += 1;
            let target = self.pick_target();
            let client = self.kv_client(&target)?;
            let err = match Self::send(&target, until(Instant::now()), f(client)).await {
                Ok(resp) => {
                    // Any replica answers a read at a weak level: only a
                    // node that says it leads is taken for the leader.
                    let leads = match route {
                        Route::Leader => true,
                        Route::AnyReplica => resp
                            .header()
                            .is_some_and(|h| h.node_id != 0 && h.node_id == h.leader_id),
                    };
                    if leads {
                        let mut l = self.inner.leader.lock().expect("leader lock");
                        if l.is_none() {
                            *l = Some(target);
                        }
                    }
                    self.observe(resp.header());
                    return Ok(resp);
                }
                Err(e) => e,
            };
            let mut sleep = None;
            match &err {
                e if self.follow_hint(e, &target) => {}
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
                return Err(deadline_exceeded(attempts, err));
            }
            if let Some(s) = sleep {
                tokio::time::sleep(s).await;
            }
        }
    }

    /// What this client has seen so far (its writes and reads), per range.
    /// A SESSION read at this token sees every write this client made.
    pub fn session_token(&self) -> SessionToken {
        self.inner.session.lock().expect("session lock").clone()
    }

    /// The read cache's counters and size; all zero when the cache is off.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner
            .cache
            .as_ref()
            .map(ReadCache::stats)
            .unwrap_or_default()
    }

    /// Forgets `keys` in the read cache before a write to them is sent.
    fn invalidate(&self, keys: &[Bytes]) {
        if let Some(c) = &self.inner.cache {
            for k in keys {
                c.invalidate(k);
            }
        }
    }

    /// After a write to `key` was answered: records the state it left, or
    /// forgets the key when the outcome is unknown or not known exactly.
    /// Sends a write of one key to the leader, keeping the read cache honest:
    /// the key is forgotten before sending and again if the write fails.
    /// Returns the response and when the write was sent.
    async fn write_key<T, F, Fut>(&self, key: &Bytes, f: F) -> Result<(T, StdInstant), ClientError>
    where
        T: Served,
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.invalidate(std::slice::from_ref(key));
        let started = StdInstant::now();
        match self.call(Route::Leader, f).await {
            Ok(r) => Ok((r, started)),
            Err(e) => {
                self.after_write(key.clone(), None);
                Err(e)
            }
        }
    }

    fn after_write(&self, key: Bytes, state: Option<CachedRead>) {
        if let Some(c) = &self.inner.cache {
            match state {
                Some(st) => c.store_written(key, st),
                None => c.invalidate(&key),
            }
        }
    }

    /// Reads a key; `None` when it does not exist.
    ///
    /// STRONG reads go to the leader; the other levels may be served by any
    /// replica, and EVENTUAL and BOUNDED_STALENESS reads by the read cache.
    pub async fn get(
        &self,
        key: impl Into<Bytes>,
        consistency: ReadConsistency,
    ) -> Result<Option<KeyValue>, ClientError> {
        self.get_detailed(key, consistency).await.map(|o| o.kv)
    }

    /// Reads a key like [`Client::get`] and says who served it: a node (its
    /// id, applied index and leader) or the read cache.
    pub async fn get_detailed(
        &self,
        key: impl Into<Bytes>,
        consistency: ReadConsistency,
    ) -> Result<GetOutcome, ClientError> {
        let key = key.into();
        check_key("key", &key)?;
        let cache = self.inner.cache.as_ref();
        if let Some(kv) = cache.and_then(|c| c.lookup(&key, consistency)) {
            return Ok(GetOutcome {
                kv,
                served_by: None,
            });
        }
        let fence = cache.map(|c| c.fence(&key));
        let started = StdInstant::now();
        let req = v1::GetRequest {
            header: None,
            key: key.clone(),
            read: Some(consistency.to_proto()),
        };
        let resp = self
            .call(consistency.route(), |mut c| {
                let req = req.clone();
                async move { c.get(req).await }
            })
            .await?;
        let kv: Option<KeyValue> = resp.kv.map(Into::into);
        if let (Some(c), Some(fence), Some(h)) = (cache, fence, &resp.header) {
            let fresh = fresh_at(consistency, started);
            c.fill(
                key,
                fence,
                CachedRead::new(kv.clone(), h.applied_index, fresh),
            );
        }
        Ok(GetOutcome {
            kv,
            served_by: resp.header.as_ref().map(ServedBy::from),
        })
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
            key: key.clone(),
            value: value.clone(),
            write: Some(write_opts(opts)),
        };
        let (resp, started) = self
            .write_key(&key, |mut c| {
                let req = req.clone();
                async move { c.put(req).await }
            })
            .await?;
        let index = resp
            .header
            .as_ref()
            .map(|h| h.applied_index)
            .unwrap_or(resp.version);
        let state = Some(KeyValue {
            key: key.clone(),
            value,
            version: resp.version,
        });
        self.after_write(key, written_state(state, index, opts, started));
        Ok(WriteResult {
            version: resp.version,
            index,
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
            key: key.clone(),
            write: Some(write_opts(opts)),
        };
        let (resp, started) = self
            .write_key(&key, |mut c| {
                let req = req.clone();
                async move { c.delete(req).await }
            })
            .await?;
        let index = resp.header.map(|h| h.applied_index).unwrap_or(0);
        self.after_write(key, written_state(None, index, opts, started));
        Ok((resp.deleted, index))
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
            compare: Some(compare_proto(key.clone(), compare)),
            delete: new_value.is_none(),
            new_value: new_value.unwrap_or_default(),
            write: Some(write_opts(opts)),
        };
        let (resp, started) = self
            .write_key(&key, |mut c| {
                let req = req.clone();
                async move { c.compare_and_swap(req).await }
            })
            .await?;
        let index = resp.header.map(|h| h.applied_index).unwrap_or(0);
        let current: Option<KeyValue> = resp.current.map(Into::into);
        // Either way the response holds the key's state as of the call.
        self.after_write(key, written_state(current.clone(), index, opts, started));
        Ok(CasOutcome {
            succeeded: resp.succeeded,
            current,
            index,
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
        let mut written = Vec::with_capacity(ops.len());
        let ops: Vec<v1::BatchOp> = ops
            .into_iter()
            .map(|o| {
                Ok(v1::BatchOp {
                    op: Some(match o {
                        BatchOp::Put(k, v) => {
                            check_key("ops.key", &k)?;
                            check_value("ops.value", &v)?;
                            written.push(k.clone());
                            batch_op::Op::Put(v1::KeyValue {
                                key: k,
                                value: v,
                                version: 0,
                            })
                        }
                        BatchOp::Delete(k) => {
                            check_key("ops.key", &k)?;
                            written.push(k.clone());
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
        self.invalidate(&written);
        let resp = self
            .call(Route::Leader, |mut c| {
                let req = req.clone();
                async move { c.batch(req).await }
            })
            .await;
        // The batch's keys are forgotten again whatever the outcome: a read
        // sent while the batch was in flight must not cache older state.
        self.invalidate(&written);
        let resp = resp?;
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
            .call(opts.consistency.route(), |mut c| {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn builder() -> ClientBuilder {
        Client::builder().endpoints(["127.0.0.1:1", "127.0.0.1:2"])
    }

    #[test]
    fn only_strong_reads_are_routed_to_the_leader() {
        assert_eq!(ReadConsistency::Strong.route(), Route::Leader);
        for level in [
            ReadConsistency::BoundedStaleness(Duration::from_millis(5)),
            ReadConsistency::Session(3),
            ReadConsistency::ConsistentPrefix,
            ReadConsistency::Eventual,
        ] {
            assert_eq!(level.route(), Route::AnyReplica, "{level:?}");
        }
    }

    #[test]
    fn the_read_cache_is_on_by_default_and_can_be_turned_off() {
        let on = builder().build().unwrap();
        assert!(on.inner.cache.is_some());
        assert_eq!(on.cache_stats(), CacheStats::default());
        let off = builder().without_read_cache().build().unwrap();
        assert!(off.inner.cache.is_none());
        assert_eq!(off.cache_stats(), CacheStats::default());
    }

    #[test]
    fn bad_cache_and_timeout_settings_are_refused() {
        let bad = [
            builder().read_cache(0, 1 << 20, Duration::from_secs(1)),
            builder().read_cache(10, 0, Duration::from_secs(1)),
            builder().read_cache(10, 1 << 20, Duration::ZERO),
            builder().read_cache(10, 1 << 20, Duration::from_secs(100_000)),
            builder().replica_attempt_timeout(Duration::ZERO),
        ];
        for b in bad {
            assert!(matches!(b.build(), Err(ClientError::Config(_))));
        }
    }

    #[tokio::test]
    async fn a_cached_eventual_read_makes_no_call() {
        // The endpoints are unreachable: only the cache can answer.
        let c = builder().build().unwrap();
        let cache = c.inner.cache.as_ref().unwrap();
        let key = Bytes::from_static(b"k");
        let kv = KeyValue {
            key: key.clone(),
            value: Bytes::from_static(b"v"),
            version: 4,
        };
        cache.fill(
            key.clone(),
            cache.fence(&key),
            CachedRead::new(Some(kv.clone()), 4, None),
        );
        let got = c
            .get_detailed(key.clone(), ReadConsistency::Eventual)
            .await
            .unwrap();
        assert!(got.from_cache());
        assert_eq!(got.kv, Some(kv));
        assert_eq!(c.cache_stats().hits, 1);
    }

    #[test]
    fn write_results_carry_their_session_token() {
        let w = WriteResult {
            version: 7,
            index: 42,
        };
        assert_eq!(w.session_token().to_string(), "42");
        assert_eq!(
            w.session_token().read_consistency(),
            ReadConsistency::Session(42)
        );
    }
}
