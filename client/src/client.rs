//! [`Client`]: the typed key-value API of one key at a time, its types, the
//! builder, and the read cache bookkeeping.
//!
//! Every call is routed by key to the range that holds it (see `call.rs`):
//! writes and STRONG reads to the range's leader, reads at the other levels
//! to the range's replicas in rotation ([`ReplicaSelector`]), each try bounded
//! by the replica attempt timeout, then the leader. EVENTUAL and
//! BOUNDED_STALENESS reads are answered from the [`ReadCache`] when an entry
//! is fresh enough for them. Calls over many keys (`batch_get`, `batch_put`,
//! `scan`) live in `fanout.rs` and `scan.rs`; operator calls in `admin.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant as StdInstant;

use bytes::Bytes;
use lmskv_proto::error::Error as ServerError;
use lmskv_proto::keys::validate_user_key;
use lmskv_proto::limits::{GRPC_MESSAGE_BYTES_MAX, REQUEST_ID_BYTES_MAX, VALUE_BYTES_MAX};
use lmskv_proto::range;
use lmskv_proto::v1::kv_client::KvClient;
use lmskv_proto::v1::{self, batch_op, compare, RangeDescriptor};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::bundle::{BundleStats, Bundles, Conn};
use crate::call::{Budget, RangeCallError};
use crate::error::ClientError;
use crate::read_cache::{fresh_at, CacheStats, CachedRead, ReadCache, ReadCacheConfig};
use crate::replica_selector::ReplicaSelector;
use crate::retry::RetryPolicy;
use crate::route_cache::RouteCache;
use crate::session_token::{SessionBound, SessionToken};

/// Endpoints a client may be configured with at most.
pub const ENDPOINTS_MAX: usize = 64;
/// How long one try of a read on one replica may take by default before the
/// read moves on to another replica.
pub const REPLICA_ATTEMPT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(1);
/// How long one try on a range's leader may take by default before the call
/// looks for the leader again. A node's followers elect another leader after
/// 600-800 ms without hearing from it by default (the 400 ms lease plus a
/// 200-400 ms election timeout); a try given up on after 700 ms goes to
/// another replica, which holds it until that election is over (see
/// `RequestHeader.suspect_leader`), so a stopped (paused) leader costs a call
/// about the election and no more. A live leader slower than this costs a
/// retry: the replica asked names it again as soon as it hears from it.
/// Retried writes keep their request id, so a try given up on is never
/// applied twice.
///
/// Writes that need longer by nature get more: a
/// [`Durability::All`] write's try lasts at least
/// [`ALL_DURABILITY_ATTEMPT_TIMEOUT_MIN`], and a write of more than
/// [`ATTEMPT_BYTES_FREE`] bytes of keys and values one second more per
/// [`ATTEMPT_BYTES_PER_EXTRA_SECOND`]; every try still ends by the call's
/// deadline. Reads and ordinary writes keep this limit, and so the failover
/// above.
pub const LEADER_ATTEMPT_TIMEOUT_DEFAULT: Duration = Duration::from_millis(700);
/// The least time one try of a [`Durability::All`] write on a range's
/// leader may take. Such a write is answered once every voter has it on
/// disk: on a voter whose disk is slow (a second per sync under load) that
/// is a sync in progress and then its own, well past the leader attempt
/// timeout. Given up on sooner, every try would fail the same way (a retry
/// proposes the write again, and waits for every voter again), the leader
/// would be suspected for nothing, and the call would end at its deadline
/// although its first try had been applied.
pub const ALL_DURABILITY_ATTEMPT_TIMEOUT_MIN: Duration = Duration::from_secs(3);
/// Bytes of keys and values a write may carry before its tries on the
/// leader get more time than the leader attempt timeout.
pub const ATTEMPT_BYTES_FREE: usize = 64 * 1024;
/// Bytes of keys and values (beyond [`ATTEMPT_BYTES_FREE`]) that give a try
/// on the leader one more second: a rate slow disks and links keep while
/// the leader logs the write, sends it to every follower and applies it
/// (an 8 MiB batch gets 2 s more).
pub const ATTEMPT_BYTES_PER_EXTRA_SECOND: usize = 4 * 1024 * 1024;
/// Longest overall deadline a call may be given.
pub const CALL_DEADLINE_MAX: Duration = Duration::from_secs(600);

/// Read consistency level, chosen per read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// Linearizable: the read sees every write acknowledged before it started.
    #[default]
    Strong,
    /// At most this far behind the leader.
    BoundedStaleness(Duration),
    /// Sees at least the state this session token names, per range: a
    /// write's [`WriteResult::session_token`], a read's
    /// [`ServedBy::session_token`], [`Client::session_token`] (everything this
    /// client has seen), or several merged. A range the token does not name
    /// is read from any replica, unless the token is truncated
    /// ([`SessionToken::bound_for`]): then that range is read STRONG.
    Session(SessionToken),
    /// Some replica's applied state: a prefix of the log, possibly old.
    ConsistentPrefix,
    /// Possibly old; may be served from a cache.
    Eventual,
}

/// Where a request may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// To the leader, following `NotLeader` hints.
    Leader,
    /// To any replica first, then the leader.
    AnyReplica,
}

impl ReadConsistency {
    pub(crate) fn route(&self) -> Route {
        match self {
            ReadConsistency::Strong => Route::Leader,
            // A truncated token may have forgotten the range the call lands
            // on; only the leader can serve that as STRONG.
            ReadConsistency::Session(t) if t.is_truncated() => Route::Leader,
            _ => Route::AnyReplica,
        }
    }

    /// The read options of a request to `range_id`: a SESSION read waits for
    /// the token's index of that range only.
    pub(crate) fn to_proto(&self, range_id: u64) -> v1::ReadOptions {
        use v1::Consistency as C;
        let (c, max, min) = match self {
            ReadConsistency::Strong => (C::Strong, 0, 0),
            ReadConsistency::BoundedStaleness(d) => {
                (C::BoundedStaleness, d.as_millis().max(1) as u64, 0)
            }
            ReadConsistency::Session(t) => match t.bound_for(range_id) {
                SessionBound::AppliedIndex(i) => (C::Session, 0, i),
                SessionBound::Leader => (C::Strong, 0, 0),
            },
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
    /// Durable on every voter. Each try of such a write on the leader may
    /// take [`ALL_DURABILITY_ATTEMPT_TIMEOUT_MIN`] at least: one slow voter
    /// holds up its answer.
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
    /// The write's log index in its range's log.
    pub index: u64,
    /// The range that took the write.
    pub range_id: u64,
}

impl WriteResult {
    /// The session token of this write: a SESSION read at it
    /// ([`ReadConsistency::Session`]) sees the write, on any replica.
    pub fn session_token(&self) -> SessionToken {
        SessionToken::for_range(self.range_id, self.index)
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
    /// The range that took the call.
    pub range_id: u64,
}

impl CasOutcome {
    /// The session token of this call: a SESSION read at it sees its outcome.
    pub fn session_token(&self) -> SessionToken {
        SessionToken::for_range(self.range_id, self.index)
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
    /// The range that took the call.
    pub range_id: u64,
}

impl BatchOutcome {
    /// The session token of this batch: a SESSION read at it sees its outcome.
    pub fn session_token(&self) -> SessionToken {
        SessionToken::for_range(self.range_id, self.index)
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
///
/// ```
/// use std::time::Duration;
/// use lmskv_client::Client;
///
/// // Building connects lazily: nothing is sent until the first call.
/// let client = Client::builder()
///     .endpoints(["127.0.0.1:7001", "127.0.0.1:7002"])
///     .deadline(Duration::from_secs(5))
///     .read_cache(10_000, 64 << 20, Duration::from_secs(2))
///     .build()?;
/// assert_eq!(client.cache_stats().entries, 0);
///
/// // Bad settings are refused before anything is sent.
/// assert!(Client::builder().build().is_err(), "no endpoints");
/// assert!(Client::builder()
///     .endpoints(["127.0.0.1:7001"])
///     .deadline(Duration::ZERO)
///     .build()
///     .is_err());
/// # Ok::<(), lmskv_client::ClientError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    retry: RetryPolicy,
    read_cache: Option<ReadCacheConfig>,
    replica_attempt_timeout: Duration,
    leader_attempt_timeout: Duration,
    bundle_requests: bool,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            endpoints: Vec::new(),
            retry: RetryPolicy::default(),
            read_cache: Some(ReadCacheConfig::default()),
            replica_attempt_timeout: REPLICA_ATTEMPT_TIMEOUT_DEFAULT,
            leader_attempt_timeout: LEADER_ATTEMPT_TIMEOUT_DEFAULT,
            bundle_requests: true,
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

    /// How long one try on a range's leader waits before the call asks
    /// another replica who leads (see [`LEADER_ATTEMPT_TIMEOUT_DEFAULT`]).
    /// [`Durability::All`] writes and writes of more than
    /// [`ATTEMPT_BYTES_FREE`] bytes get longer tries on top of this.
    pub fn leader_attempt_timeout(mut self, d: Duration) -> Self {
        self.leader_attempt_timeout = d;
        self
    }

    /// Whether concurrent puts, deletes and gets to one node may share one
    /// call (on by default; see [`crate::bundle`]). Off, every request is
    /// its own call.
    pub fn bundle_requests(mut self, on: bool) -> Self {
        self.bundle_requests = on;
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
        if self.retry.deadline.is_zero() || self.retry.deadline > CALL_DEADLINE_MAX {
            return Err(ClientError::Config(format!(
                "deadline must be above zero and at most {CALL_DEADLINE_MAX:?}"
            )));
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
        if self.leader_attempt_timeout.is_zero() {
            return Err(ClientError::Config(
                "leader_attempt_timeout must be positive".into(),
            ));
        }
        if let Some(cfg) = &self.read_cache {
            cfg.validate().map_err(ClientError::Config)?;
        }
        Ok(Client {
            retry: self.retry,
            inner: Arc::new(Inner {
                replicas: ReplicaSelector::new(),
                routes: RouteCache::default(),
                endpoints,
                replica_attempt_timeout: self.replica_attempt_timeout,
                leader_attempt_timeout: self.leader_attempt_timeout,
                channels: Mutex::new(HashMap::new()),
                meta_leader: Mutex::new(None),
                next: AtomicUsize::new(0),
                cache: self.read_cache.as_ref().map(ReadCache::new),
                session: Mutex::new(SessionToken::new()),
                bundles: self.bundle_requests.then(Bundles::default),
            }),
        })
    }
}

/// An lmskv client. Cheap to clone; clones share connections, the leader,
/// the read cache and the session token.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    /// This handle's retry policy (see [`Client::with_deadline`]).
    pub(crate) retry: RetryPolicy,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub endpoints: Vec<String>,
    /// Longest one try of a read on one replica may take.
    pub replica_attempt_timeout: Duration,
    /// Longest one try on a range's leader may take, unless its call's
    /// budget allows more (a write that needs it: `leader_try_extra`).
    pub leader_attempt_timeout: Duration,
    /// One HTTP/2 channel per node address.
    pub channels: Mutex<HashMap<String, Channel>>,
    /// The address believed to lead the meta range.
    pub meta_leader: Mutex<Option<String>>,
    /// Rotation over the seed endpoints while the meta leader is unknown.
    pub next: AtomicUsize,
    /// Where reads that any replica may serve go.
    pub replicas: ReplicaSelector,
    /// Range descriptors, leaders and node addresses.
    pub routes: RouteCache,
    /// `None` when the read cache is off.
    pub cache: Option<ReadCache>,
    /// What this client has seen: grows with every response.
    pub session: Mutex<SessionToken>,
    /// Per-node lanes that bundle concurrent requests; `None` when off.
    pub bundles: Option<Bundles>,
}

/// A response that says where it was served.
pub(crate) trait Served {
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
    v1::BatchResponse,
    v1::BatchGetResponse
);

/// Node channels kept at most, beyond the seed endpoints.
const CHANNELS_MAX: usize = 1_024;

/// This process's client session: a random 8-byte id, the next request
/// number, and the numbers of the generated request ids still in flight.
struct Session {
    id: [u8; 8],
    next: u64,
    in_flight: std::collections::BTreeSet<u64>,
}

impl Session {
    fn new(id: [u8; 8]) -> Self {
        Session {
            id,
            next: 1,
            in_flight: std::collections::BTreeSet::new(),
        }
    }

    /// Numbers a request and registers it in flight, under one lock: a
    /// mark taken by another request never passes a number handed out but
    /// not yet registered. Returns the number and the completed mark: the
    /// lowest number in flight, this one included.
    fn start(&mut self) -> (u64, u64) {
        let n = self.next;
        self.next += 1;
        self.in_flight.insert(n);
        (n, *self.in_flight.first().expect("n is in flight"))
    }

    fn finish(&mut self, n: u64) {
        self.in_flight.remove(&n);
    }
}

fn session() -> &'static std::sync::Mutex<Session> {
    static SESSION: std::sync::OnceLock<std::sync::Mutex<Session>> = std::sync::OnceLock::new();
    SESSION.get_or_init(|| std::sync::Mutex::new(Session::new(rand::random())))
}

/// A generated request id, in flight until dropped: hold it until the
/// call that sends it returns, so that no request id sent later marks it
/// completed while it may still be retried.
#[derive(Debug)]
pub(crate) struct InFlight(u64);

impl Drop for InFlight {
    fn drop(&mut self) {
        session()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finish(self.0);
    }
}

/// A generated request id and the session's completed mark sent with it.
#[derive(Debug)]
pub(crate) struct RequestId {
    /// The session's id (8 bytes), then this request's number (big-endian).
    pub id: Bytes,
    /// The lowest number in flight when the id was made (its own at most):
    /// every request of the session numbered below it has returned, so the
    /// ranges may drop their dedup records and refuse late copies of them
    /// (`WriteOptions.completed_below`).
    pub completed_below: u64,
    pub in_flight: InFlight,
}

/// A fresh request id: this process's session id, then a counter. Unique
/// across processes (the session id) and increasing within one, so the
/// dedup records a busy client leaves on a range are inserted in key order,
/// which RocksDB's memtable does far more cheaply than random keys.
pub(crate) fn new_request_id() -> RequestId {
    let mut s = session().lock().unwrap_or_else(|e| e.into_inner());
    let (n, completed_below) = s.start();
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&s.id);
    id[8..].copy_from_slice(&n.to_be_bytes());
    RequestId {
        id: Bytes::copy_from_slice(&id),
        completed_below,
        in_flight: InFlight(n),
    }
}

pub(crate) fn check_key(field: &str, key: &[u8]) -> Result<(), ClientError> {
    validate_user_key(field, key).map_err(|e| match e {
        ServerError::InvalidArgument { field, reason } => {
            ClientError::InvalidArgument { field, reason }
        }
        other => ClientError::Server(other),
    })
}

pub(crate) fn check_value(field: &str, v: &[u8]) -> Result<(), ClientError> {
    if v.len() > VALUE_BYTES_MAX {
        return Err(ClientError::InvalidArgument {
            field: field.into(),
            reason: format!("value is {} bytes, the limit is {VALUE_BYTES_MAX}", v.len()),
        });
    }
    Ok(())
}

/// Refuses a request id the node could not deduplicate by: an empty one
/// (which the node takes for "no id", so a retry could apply the write
/// twice) or one over [`REQUEST_ID_BYTES_MAX`].
pub(crate) fn check_write_opts(o: &WriteOptions) -> Result<(), ClientError> {
    let Some(id) = &o.request_id else {
        return Ok(());
    };
    let reason = if id.is_empty() {
        "an empty request id turns off deduplication; leave it unset for a generated one"
            .to_string()
    } else if id.len() > REQUEST_ID_BYTES_MAX {
        format!(
            "request id is {} bytes, the limit is {REQUEST_ID_BYTES_MAX}",
            id.len()
        )
    } else {
        return Ok(());
    };
    Err(ClientError::InvalidArgument {
        field: "request_id".into(),
        reason,
    })
}

/// The options of a write as sent, once [`check_write_opts`] passed, and
/// the generated request id's hold on its number (none when the caller
/// chose the id): keep it until the call returns.
pub(crate) fn write_opts(
    o: &WriteOptions,
) -> Result<(v1::WriteOptions, Option<InFlight>), ClientError> {
    check_write_opts(o)?;
    let durability = durability_proto(o.durability);
    Ok(match &o.request_id {
        Some(id) => (
            v1::WriteOptions {
                request_id: id.clone(),
                durability,
                completed_below: 0,
            },
            None,
        ),
        None => {
            let r = new_request_id();
            (
                v1::WriteOptions {
                    request_id: r.id,
                    durability,
                    completed_below: r.completed_below,
                },
                Some(r.in_flight),
            )
        }
    })
}

/// How much longer than `base` (the client's leader attempt timeout) one
/// try of a write on its range's leader may take: enough for
/// [`Durability::All`] ([`ALL_DURABILITY_ATTEMPT_TIMEOUT_MIN`] in all) and
/// for `bytes` of keys and values (see [`ATTEMPT_BYTES_PER_EXTRA_SECOND`]).
/// Zero for a small write of majority durability.
pub(crate) fn leader_try_extra(base: Duration, bytes: usize, durability: Durability) -> Duration {
    let mut t = base;
    if durability == Durability::All {
        t = t.max(ALL_DURABILITY_ATTEMPT_TIMEOUT_MIN);
    }
    let large = bytes.saturating_sub(ATTEMPT_BYTES_FREE) as u128;
    let per_second = ATTEMPT_BYTES_PER_EXTRA_SECOND as u128;
    let ms = large.saturating_mul(1_000).div_ceil(per_second);
    t = t.saturating_add(Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)));
    // The deadline bounds every try anyway; this keeps the sum in range.
    t.min(CALL_DEADLINE_MAX).saturating_sub(base)
}

pub(crate) fn durability_proto(d: Durability) -> i32 {
    let d = match d {
        Durability::Majority => v1::Durability::Majority,
        Durability::All => v1::Durability::All,
    };
    d as i32
}

/// The state an acknowledged write left its key in, for the read cache.
/// The write was applied after `started`, and its state was the latest then.
/// The state is as of the key's version when it has one: a retry answered
/// from the dedup table carries the log index of the retry, not of the write.
/// When the caller chose the request id, the call may be the retry of a write
/// applied long ago and overwritten since, so the key is only forgotten.
fn written_state(
    kv: Option<KeyValue>,
    range_id: u64,
    index: u64,
    opts: &WriteOptions,
    started: StdInstant,
) -> Option<CachedRead> {
    if index == 0 || opts.request_id.is_some() {
        return None;
    }
    let as_of = kv.as_ref().map_or(index, |kv| kv.version.min(index));
    Some(CachedRead::new(kv, range_id, as_of, Some(started)))
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

    /// The HTTP/2 channel to the node at `addr`: one per node, reused by
    /// every call.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
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

    pub(crate) fn kv_client(&self, target: &str) -> Result<KvClient<Channel>, ClientError> {
        Ok(KvClient::new(self.channel(target)?)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX))
    }

    /// The connection one try of a call uses on the node at `target`, until
    /// `until`: with bundling on, its puts, deletes and gets may share a
    /// call with other requests to that node (see [`crate::bundle`]).
    pub(crate) fn conn(&self, target: &str, until: Instant) -> Result<Conn, ClientError> {
        let kv = self.kv_client(target)?;
        let lanes = self.inner.bundles.as_ref().map(|b| b.lanes(target, &kv));
        Ok(Conn::new(kv, lanes, until))
    }

    /// How this client's puts, deletes and gets went out so far: alone or in
    /// bundles (all zero when bundling is off).
    pub fn bundle_stats(&self) -> BundleStats {
        self.inner
            .bundles
            .as_ref()
            .map(Bundles::stats)
            .unwrap_or_default()
    }

    /// Where a read at `consistency` goes first: as
    /// [`ReadConsistency::route`], but a SESSION read whose token names a
    /// range this client's route cache does not hold goes to the leader
    /// (see [`Client::read_options`]).
    pub(crate) fn read_route(&self, consistency: &ReadConsistency) -> Route {
        match consistency {
            ReadConsistency::Session(t)
                if !self.inner.routes.holds_all(t.iter().map(|(r, _)| r)) =>
            {
                Route::Leader
            }
            c => c.route(),
        }
    }

    /// The read options of a try addressed under `header` at `consistency`.
    ///
    /// A SESSION read sends the range only its own index from the token. If
    /// the token also names a range with a higher id than the addressed
    /// one, that range may have been split from it (range ids only grow,
    /// and a split's new range takes a new one), and the token may record a
    /// write to a key this try still routes to the addressed range: a
    /// replica that has not applied the split would serve the key without
    /// that write. Unless the route cache holds, at one moment, the
    /// addressed range at the try's split version and every such range
    /// (cached ranges never overlap, so none of them was then split from
    /// the range as addressed), the try is sent STRONG: the leader applies
    /// the split in its read barrier and answers `KeyNotInRange` with the
    /// new descriptors, and the client reads the range that holds the key.
    pub(crate) fn read_options(
        &self,
        consistency: &ReadConsistency,
        header: &v1::RequestHeader,
    ) -> v1::ReadOptions {
        let range_id = header.range_id;
        match consistency {
            // A truncated token may have dropped the very range split from
            // this one: only STRONG is sure to see the session's writes.
            ReadConsistency::Session(t) if t.is_truncated() => {
                ReadConsistency::Strong.to_proto(range_id)
            }
            ReadConsistency::Session(t) if t.iter().any(|(r, _)| r > range_id) => {
                let version = header.epoch.map(|e| e.version).unwrap_or_default();
                let newer = t.iter().map(|(r, _)| r).filter(|r| *r > range_id);
                if self
                    .inner
                    .routes
                    .holds_at_version_and_all(range_id, version, newer)
                {
                    consistency.to_proto(range_id)
                } else {
                    ReadConsistency::Strong.to_proto(range_id)
                }
            }
            c => c.to_proto(range_id),
        }
    }

    /// Adds a response's applied index to the client's session token.
    pub(crate) fn observe(&self, header: Option<&v1::ResponseHeader>) {
        if let Some(h) = header {
            self.inner
                .session
                .lock()
                .expect("session lock")
                .observe(h.range_id, h.applied_index);
        }
    }

    /// The descriptor of the range that holds `key`, from the client's route
    /// cache or, on a miss, from the meta range.
    pub async fn range_for_key(
        &self,
        key: impl AsRef<[u8]>,
    ) -> Result<RangeDescriptor, ClientError> {
        let key = key.as_ref();
        check_key("key", key)?;
        let deadline = Instant::now() + self.retry.deadline;
        Ok(self.locate(key, false, deadline).await?.desc)
    }

    /// A handle to this client whose calls each get `deadline` for all their
    /// tries, instead of the builder's. It shares everything else with
    /// `self` (connections, routes, read cache, session token), so making one
    /// per call is cheap.
    ///
    /// ```no_run
    /// # async fn demo(client: lmskv_client::Client) -> Result<(), lmskv_client::ClientError> {
    /// use std::time::Duration;
    /// use lmskv_client::ReadConsistency;
    ///
    /// // A page view would rather fail fast than wait out a failover.
    /// let quick = client.with_deadline(Duration::from_millis(300))?;
    /// let course = quick.get("course/7", ReadConsistency::Eventual).await?;
    /// # let _ = course;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_deadline(&self, deadline: Duration) -> Result<Client, ClientError> {
        if deadline.is_zero() || deadline > CALL_DEADLINE_MAX {
            return Err(ClientError::InvalidArgument {
                field: "deadline".into(),
                reason: format!(
                    "{deadline:?}: a call's deadline must be above zero and at most {CALL_DEADLINE_MAX:?}"
                ),
            });
        }
        let mut c = self.clone();
        c.retry.deadline = deadline;
        Ok(c)
    }

    /// Ranges in the client's route cache.
    pub fn cached_ranges(&self) -> usize {
        self.inner.routes.len()
    }

    /// `Locate` calls this client has made to the meta range (cache misses
    /// that were not answered by a call already in flight).
    pub fn locate_calls(&self) -> u64 {
        self.inner.routes.locates()
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
    pub(crate) fn invalidate(&self, keys: &[Bytes]) {
        if let Some(c) = &self.inner.cache {
            for k in keys {
                c.invalidate(k);
            }
        }
    }

    /// The budget of a write call carrying `bytes` of keys and values at
    /// `durability`: its tries on the leader get the time such a write
    /// needs (see [`leader_try_extra`]).
    pub(crate) fn write_budget(&self, bytes: usize, durability: Durability) -> Budget {
        let extra = leader_try_extra(self.inner.leader_attempt_timeout, bytes, durability);
        Budget::new(&self.retry).with_leader_try_extra(extra)
    }

    /// Sends a write of one key to the leader, keeping the read cache honest:
    /// the key is forgotten before sending and again if the write fails.
    /// `bytes` is what the write carries (for its tries' time). A failure
    /// after a try that may have been applied reports an unknown outcome
    /// unless the last answer settles it ([`Budget::settle`]). Returns the
    /// response and when the write was sent.
    async fn write_key<T, F, Fut>(
        &self,
        key: &Bytes,
        (bytes, durability): (usize, Durability),
        f: F,
    ) -> Result<(T, StdInstant), ClientError>
    where
        T: Served,
        F: FnMut(Conn, v1::RequestHeader) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.invalidate(std::slice::from_ref(key));
        let started = StdInstant::now();
        let mut budget = self.write_budget(bytes, durability);
        match self.key_call_in(&mut budget, key, Route::Leader, f).await {
            Ok(r) => Ok((r, started)),
            Err(e) => {
                self.after_write(key.clone(), None);
                Err(budget.settle(e))
            }
        }
    }

    /// After a write to `key` was answered: records the state it left, or
    /// forgets the key when the outcome is unknown or not known exactly.
    pub(crate) fn after_write(&self, key: Bytes, state: Option<CachedRead>) {
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
    ///
    /// ```no_run
    /// # async fn demo(client: lmskv_client::Client) -> Result<(), lmskv_client::ClientError> {
    /// use std::time::Duration;
    /// use lmskv_client::ReadConsistency;
    ///
    /// let written = client.put("grade/7/42", "A").await?;
    /// // Read-your-writes from whichever replica is nearest:
    /// let mine = client
    ///     .get("grade/7/42", ReadConsistency::Session(written.session_token()))
    ///     .await?;
    /// assert_eq!(mine.map(|kv| kv.value), Some("A".into()));
    /// // At most half a second old, from any replica (or the read cache):
    /// let recent = client
    ///     .get("grade/7/42", ReadConsistency::BoundedStaleness(Duration::from_millis(500)))
    ///     .await?;
    /// # let _ = recent;
    /// # Ok(())
    /// # }
    /// ```
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
        if let Some(kv) = cache.and_then(|c| c.lookup(&key, &consistency)) {
            return Ok(GetOutcome {
                kv,
                served_by: None,
            });
        }
        let fence = cache.map(|c| c.fence(&key));
        let started = StdInstant::now();
        let resp = self
            .key_call(&key, self.read_route(&consistency), |mut c, header| {
                let req = v1::GetRequest {
                    read: Some(self.read_options(&consistency, &header)),
                    header: Some(header),
                    key: key.clone(),
                };
                async move { c.get(req).await }
            })
            .await?;
        let kv: Option<KeyValue> = resp.kv.map(Into::into);
        if let (Some(c), Some(fence), Some(h)) = (cache, fence, &resp.header) {
            let fresh = fresh_at(&consistency, started);
            c.fill(
                key,
                fence,
                CachedRead::new(kv.clone(), h.range_id, h.applied_index, fresh),
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
        let (write, _in_flight) = write_opts(opts)?;
        let req = v1::PutRequest {
            header: None,
            key: key.clone(),
            value: value.clone(),
            write: Some(write),
        };
        let (resp, started) = self
            .write_key(
                &key,
                (key.len() + value.len(), opts.durability),
                |mut c, header| {
                    let mut req = req.clone();
                    req.header = Some(header);
                    async move { c.put(req).await }
                },
            )
            .await?;
        let (range_id, index) = resp
            .header
            .as_ref()
            .map(|h| (h.range_id, h.applied_index))
            .unwrap_or((0, resp.version));
        let state = Some(KeyValue {
            key: key.clone(),
            value,
            version: resp.version,
        });
        self.after_write(key, written_state(state, range_id, index, opts, started));
        Ok(WriteResult {
            version: resp.version,
            index,
            range_id,
        })
    }

    /// Deletes a key; returns whether it existed.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool, ClientError> {
        self.delete_with(key, &WriteOptions::default())
            .await
            .map(|(d, _)| d)
    }

    /// Deletes a key with explicit options; returns whether it existed and
    /// the write (its `version` is the delete's log index).
    pub async fn delete_with(
        &self,
        key: impl Into<Bytes>,
        opts: &WriteOptions,
    ) -> Result<(bool, WriteResult), ClientError> {
        let key = key.into();
        check_key("key", &key)?;
        let (write, _in_flight) = write_opts(opts)?;
        let req = v1::DeleteRequest {
            header: None,
            key: key.clone(),
            write: Some(write),
        };
        let (resp, started) = self
            .write_key(&key, (key.len(), opts.durability), |mut c, header| {
                let mut req = req.clone();
                req.header = Some(header);
                async move { c.delete(req).await }
            })
            .await?;
        let (range_id, index) = resp
            .header
            .map(|h| (h.range_id, h.applied_index))
            .unwrap_or((0, 0));
        self.after_write(key, written_state(None, range_id, index, opts, started));
        let written = WriteResult {
            version: index,
            index,
            range_id,
        };
        Ok((resp.deleted, written))
    }

    /// Sets `key` to `new_value` (or deletes it when `None`) if `compare` holds.
    ///
    /// ```no_run
    /// # async fn demo(client: lmskv_client::Client) -> Result<(), lmskv_client::ClientError> {
    /// use lmskv_client::{Compare, ReadConsistency, WriteOptions};
    ///
    /// // Create only if absent (version 0 means "no such key").
    /// let out = client
    ///     .compare_and_swap("seat/7", Compare::Version(0), Some("1".into()), &WriteOptions::default())
    ///     .await?;
    /// if !out.succeeded {
    ///     println!("taken: {:?}", out.current);
    /// }
    /// # Ok(())
    /// # }
    /// ```
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
        let (write, _in_flight) = write_opts(opts)?;
        let req = v1::CompareAndSwapRequest {
            header: None,
            compare: Some(compare_proto(key.clone(), compare)),
            delete: new_value.is_none(),
            new_value: new_value.unwrap_or_default(),
            write: Some(write),
        };
        let compared = match req.compare.as_ref().and_then(|c| c.target.as_ref()) {
            Some(compare::Target::Value(v)) => v.len(),
            _ => 0,
        };
        let bytes = key.len() + compared + req.new_value.len();
        let (resp, started) = self
            .write_key(&key, (bytes, opts.durability), |mut c, header| {
                let mut req = req.clone();
                req.header = Some(header);
                async move { c.compare_and_swap(req).await }
            })
            .await?;
        let (range_id, index) = resp
            .header
            .map(|h| (h.range_id, h.applied_index))
            .unwrap_or((0, 0));
        let current: Option<KeyValue> = resp.current.map(Into::into);
        // Either way the response holds the key's state as of the call.
        self.after_write(
            key,
            written_state(current.clone(), range_id, index, opts, started),
        );
        Ok(CasOutcome {
            succeeded: resp.succeeded,
            current,
            index,
            range_id,
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
        let (write, _in_flight) = write_opts(opts)?;
        let req = v1::BatchRequest {
            header: None,
            conditions: conditions
                .into_iter()
                .map(|(k, c)| compare_proto(k, c))
                .collect(),
            ops,
            write: Some(write),
        };
        let mut keys: Vec<Bytes> = req
            .conditions
            .iter()
            .map(|c| c.key.clone())
            .chain(written.iter().cloned())
            .collect();
        keys.sort();
        keys.dedup();
        let Some(anchor) = keys.first().cloned() else {
            return Err(ClientError::InvalidArgument {
                field: "ops".into(),
                reason: "a batch needs at least one operation or condition".into(),
            });
        };
        self.invalidate(&written);
        let bytes: usize = req
            .ops
            .iter()
            .map(|o| match &o.op {
                Some(batch_op::Op::Put(kv)) => kv.key.len() + kv.value.len(),
                Some(batch_op::Op::Delete(k)) => k.len(),
                None => 0,
            })
            .chain(req.conditions.iter().map(|c| {
                c.key.len()
                    + match &c.target {
                        Some(compare::Target::Value(v)) => v.len(),
                        _ => 0,
                    }
            }))
            .sum();
        let mut budget = self.write_budget(bytes, opts.durability);
        let fits = |d: &RangeDescriptor| keys.iter().all(|k| range::contains(d, k));
        let resp = match self
            .range_call(
                &mut budget,
                &anchor,
                false,
                Route::Leader,
                &fits,
                |mut c, header| {
                    let mut req = req.clone();
                    req.header = Some(header);
                    async move { c.batch(req).await }
                },
            )
            .await
        {
            Ok((r, _)) => Ok(r),
            Err(RangeCallError::Failed(e)) => Err(budget.settle(e)),
            // The range split after a try whose outcome is unknown: that try
            // may have been applied, so this is not the caller's bad input.
            Err(RangeCallError::Regroup(d)) if budget.maybe_applied() => {
                Err(ClientError::Server(ServerError::Timeout {
                    reason: format!(
                        "a try of the batch has an unknown outcome and range {} split since; \
                         the batch may or may not be applied",
                        d.range_id
                    ),
                }))
            }
            Err(RangeCallError::Regroup(d)) => Err(ClientError::InvalidArgument {
                field: "ops".into(),
                reason: format!(
                    "the batch's keys span more than one range (range {} ends at {:?}); \
                     an atomic batch must stay within one range",
                    d.range_id,
                    lmskv_proto::keys::escape(&d.end_key)
                ),
            }),
        };
        // The batch's keys are forgotten again whatever the outcome: a read
        // sent while the batch was in flight must not cache older state.
        self.invalidate(&written);
        let resp = resp?;
        let (range_id, index) = resp
            .header
            .map(|h| (h.range_id, h.applied_index))
            .unwrap_or((0, 0));
        Ok(BatchOutcome {
            succeeded: resp.succeeded,
            current: resp.current.into_iter().map(Into::into).collect(),
            index,
            range_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder() -> ClientBuilder {
        Client::builder().endpoints(["127.0.0.1:1", "127.0.0.1:2"])
    }

    #[test]
    fn request_ids_are_distinct_and_increase_within_a_process() {
        let reqs: Vec<RequestId> = (0..1000).map(|_| new_request_id()).collect();
        let ids: Vec<&Bytes> = reqs.iter().map(|r| &r.id).collect();
        assert!(ids
            .iter()
            .all(|id| id.len() == 16 && id[..8] == ids[0][..8]));
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids not increasing");
        for r in &reqs {
            let n = u64::from_be_bytes(r.id[8..].try_into().unwrap());
            assert!(
                (1..=n).contains(&r.completed_below),
                "mark {} of request {n}",
                r.completed_below
            );
        }
    }

    /// The mark sent with a request never passes a request still in
    /// flight, and rises as soon as the oldest ones return.
    #[test]
    fn the_completed_mark_is_the_oldest_request_in_flight() {
        let mut s = Session::new([7; 8]);
        let (a, mark_a) = s.start();
        assert_eq!(mark_a, a, "alone in flight");
        let (b, mark_b) = s.start();
        let (c, _) = s.start();
        assert_eq!(mark_b, a, "a is still in flight");
        s.finish(b);
        let (x, mark_x) = s.start();
        assert_eq!(mark_x, a, "b returned, a not yet");
        s.finish(a);
        s.finish(x);
        let (d, mark_d) = s.start();
        assert_eq!(mark_d, c, "a and b returned: the oldest in flight is c");
        s.finish(c);
        s.finish(d);
        let (e, mark_e) = s.start();
        assert_eq!(mark_e, e, "nothing else in flight");
        assert!(a < b && b < c && c < d && d < e);
    }

    #[test]
    fn only_strong_reads_are_routed_to_the_leader() {
        assert_eq!(ReadConsistency::Strong.route(), Route::Leader);
        for level in [
            ReadConsistency::BoundedStaleness(Duration::from_millis(5)),
            ReadConsistency::Session(SessionToken::for_range(2, 3)),
            ReadConsistency::ConsistentPrefix,
            ReadConsistency::Eventual,
        ] {
            assert_eq!(level.route(), Route::AnyReplica, "{level:?}");
        }
    }

    #[test]
    fn a_session_read_waits_only_for_the_index_of_the_range_it_reads() {
        let mut t = SessionToken::for_range(2, 900);
        t.observe(5, 7);
        let level = ReadConsistency::Session(t);
        let session = v1::Consistency::Session as i32;
        let (a, b, c) = (level.to_proto(2), level.to_proto(5), level.to_proto(9));
        assert_eq!((a.consistency, a.min_applied_index), (session, 900));
        assert_eq!((b.consistency, b.min_applied_index), (session, 7));
        assert_eq!((c.consistency, c.min_applied_index), (session, 0));
        // A truncated token sends ranges it forgot to the leader, STRONG.
        let truncated: SessionToken = "2:900,*".parse().unwrap();
        let level = ReadConsistency::Session(truncated);
        assert_eq!(level.route(), Route::Leader);
        assert_eq!(level.to_proto(2).min_applied_index, 900);
        assert_eq!(
            level.to_proto(9).consistency,
            v1::Consistency::Strong as i32
        );
    }

    #[test]
    fn a_session_token_naming_a_range_the_cache_lacks_reads_older_ranges_strong() {
        let c = builder().build().unwrap();
        let desc =
            |id: u64, start: &'static [u8], end: &'static [u8], version: u64| RangeDescriptor {
                range_id: id,
                start_key: Bytes::from_static(start),
                end_key: Bytes::from_static(end),
                epoch: Some(v1::RangeEpoch {
                    conf_ver: 1,
                    version,
                }),
                replicas: Vec::new(),
            };
        // The client knows range 2 before its split; another client wrote
        // at range 7, which this one has never seen.
        c.inner.routes.insert(desc(2, b"a", b"z", 1));
        let mut t = SessionToken::for_range(2, 40);
        t.observe(7, 3);
        let level = ReadConsistency::Session(t);
        let (session, strong) = (
            v1::Consistency::Session as i32,
            v1::Consistency::Strong as i32,
        );
        let h = |range_id: u64, version: u64| v1::RequestHeader {
            range_id,
            epoch: Some(v1::RangeEpoch {
                conf_ver: 1,
                version,
            }),
            ..Default::default()
        };
        assert_eq!(c.read_route(&level), Route::Leader);
        assert_eq!(c.read_options(&level, &h(2, 1)).consistency, strong);
        // Range 9 is newer than range 7: 7 cannot have been split from it.
        let o = c.read_options(&level, &h(9, 1));
        assert_eq!((o.consistency, o.min_applied_index), (session, 0));

        // Once the cache holds range 7 (the split's new range), the token
        // is read as usual: the cache no longer routes 7's keys to 2.
        c.inner.routes.insert(desc(2, b"a", b"m", 2));
        c.inner.routes.insert(desc(7, b"m", b"z", 1));
        assert_eq!(c.read_route(&level), Route::AnyReplica);
        let o = c.read_options(&level, &h(2, 2));
        assert_eq!((o.consistency, o.min_applied_index), (session, 40));
        let o = c.read_options(&level, &h(7, 1));
        assert_eq!((o.consistency, o.min_applied_index), (session, 3));
        // A try still addressed to range 2 as it was before the split (a
        // stale answer the cache refused) goes STRONG.
        assert_eq!(c.read_options(&level, &h(2, 1)).consistency, strong);
        // A truncated token may have dropped a range split from any other.
        let truncated = ReadConsistency::Session("2:40,7:3,*".parse().unwrap());
        assert_eq!(c.read_options(&truncated, &h(7, 1)).consistency, strong);
        assert_eq!(c.read_route(&truncated), Route::Leader);
        // Other levels are untouched.
        assert_eq!(c.read_route(&ReadConsistency::Eventual), Route::AnyReplica);
        assert_eq!(c.read_route(&ReadConsistency::Strong), Route::Leader);
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
            builder().leader_attempt_timeout(Duration::ZERO),
            builder().deadline(Duration::ZERO),
            builder().deadline(CALL_DEADLINE_MAX + Duration::from_secs(1)),
        ];
        for b in bad {
            assert!(matches!(b.build(), Err(ClientError::Config(_))));
        }
    }

    #[tokio::test]
    async fn a_request_id_the_node_cannot_deduplicate_by_is_refused_before_sending() {
        // The endpoints are unreachable: a write that went out would fail
        // with another error, after its deadline.
        let c = builder().build().unwrap();
        for id in [
            Bytes::new(),
            Bytes::from(vec![b'x'; REQUEST_ID_BYTES_MAX + 1]),
        ] {
            let opts = WriteOptions {
                request_id: Some(id),
                ..Default::default()
            };
            let refused = |e: ClientError| matches!(&e, ClientError::InvalidArgument { field, .. } if field == "request_id");
            assert!(refused(c.put_with("k", "v", &opts).await.unwrap_err()));
            assert!(refused(c.delete_with("k", &opts).await.unwrap_err()));
            assert!(refused(c.batch_put([("k", "v")], &opts).await.unwrap_err()));
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
            CachedRead::new(Some(kv.clone()), 1, 4, None),
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
            range_id: 3,
        };
        assert_eq!(w.session_token().to_string(), "3:42");
        assert_eq!(
            w.session_token().read_consistency(),
            ReadConsistency::Session(SessionToken::for_range(3, 42))
        );
    }

    #[test]
    fn only_writes_that_need_it_get_longer_tries_on_the_leader() {
        use lmskv_proto::limits::BATCH_BYTES_MAX;
        let base = LEADER_ATTEMPT_TIMEOUT_DEFAULT;
        let (majority, all) = (Durability::Majority, Durability::All);
        // Ordinary writes keep the leader attempt timeout, and so the failover.
        assert_eq!(leader_try_extra(base, 0, majority), Duration::ZERO);
        assert_eq!(
            leader_try_extra(base, ATTEMPT_BYTES_FREE, majority),
            Duration::ZERO
        );
        // A write durable on every voter gets the time a slow voter needs.
        assert_eq!(
            base + leader_try_extra(base, 100, all),
            ALL_DURABILITY_ATTEMPT_TIMEOUT_MIN
        );
        // A client whose leader tries are longer than that keeps its own.
        let long = Duration::from_secs(5);
        assert_eq!(leader_try_extra(long, 100, all), Duration::ZERO);
        // Large writes get time for their bytes: 2 s for the largest batch.
        let largest = leader_try_extra(base, BATCH_BYTES_MAX, majority);
        assert!(
            largest > Duration::from_millis(1_950) && largest <= Duration::from_secs(2),
            "{largest:?}"
        );
        assert!(leader_try_extra(base, ATTEMPT_BYTES_FREE + 1, majority) > Duration::ZERO);
        assert_eq!(
            base + leader_try_extra(base, BATCH_BYTES_MAX, all),
            ALL_DURABILITY_ATTEMPT_TIMEOUT_MIN + largest
        );
        // Never past the longest deadline a call may have.
        assert!(base + leader_try_extra(base, usize::MAX, all) <= CALL_DEADLINE_MAX);

        let c = builder().build().unwrap();
        let b = c.write_budget(10, all);
        assert_eq!(
            b.leader_try_extra(),
            ALL_DURABILITY_ATTEMPT_TIMEOUT_MIN - base
        );
        assert_eq!(
            c.write_budget(10, majority).leader_try_extra(),
            Duration::ZERO
        );
    }

    #[test]
    fn a_handle_with_its_own_deadline_shares_the_client() {
        let c = builder().build().unwrap();
        let quick = c.with_deadline(Duration::from_millis(250)).unwrap();
        assert_eq!(quick.retry.deadline, Duration::from_millis(250));
        assert_eq!(c.retry.deadline, RetryPolicy::default().deadline);
        assert!(Arc::ptr_eq(&c.inner, &quick.inner));
        assert!(c.with_deadline(Duration::ZERO).is_err());
        assert!(c.with_deadline(CALL_DEADLINE_MAX * 2).is_err());
    }
}
