//! The `Kv` service: validates each request against the named limits, routes
//! it to the range replica that owns its keys, and proposes writes or serves
//! reads at the requested consistency level.
//!
//! Every check happens before anything is proposed, so a rejected request
//! writes nothing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lmskv_proto::error::Error;
use lmskv_proto::keys::{validate_scan_bound, validate_user_key};
use lmskv_proto::limits::{
    BATCH_BYTES_MAX, BATCH_CONDITIONS_MAX, BATCH_OPS_MAX, BUNDLE_REQUESTS_MAX,
    BUNDLE_RESPONSE_BYTES_TARGET, REQUEST_ID_BYTES_MAX, SCAN_BYTES_MAX, SCAN_LIMIT_DEFAULT,
    SCAN_LIMIT_MAX, VALUE_BYTES_MAX,
};
use lmskv_proto::v1::kv_server::Kv;
use lmskv_proto::v1::{
    self, batch_op, compare, BatchGetRequest, BatchGetResponse, BatchRequest, BatchResponse,
    BundleRequest, BundleResponse, BundledRequest, BundledResponse, BundledStatus,
    CompareAndSwapRequest, CompareAndSwapResponse, Consistency, DeleteRequest, DeleteResponse,
    Durability, GetRequest, GetResponse, KeyValue, PutRequest, PutResponse, ReadOptions,
    RequestHeader, ResponseHeader, ScanRequest, ScanResponse, WriteOptions,
};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::raft::command::{session_of, CommandResponse, Condition, Expect, KvRecord, Op, WriteOp};
use crate::raft::{RangeReplica, ReadLevel, SpanMismatch};

/// Serves key-value requests.
#[derive(Debug, Clone)]
pub struct KvService {
    node: Arc<Node>,
    inflight: Arc<Semaphore>,
}

/// A request admitted: it holds one of the in-flight slots and marks the
/// node as serving.
struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _serving: crate::storage::Foreground,
}

/// Delay suggested to clients turned away because too many requests are in flight.
const OVERLOADED_RETRY_AFTER_MS: u64 = 50;
/// Longest a request naming a suspect leader is held for a new one,
/// whatever the client asked (clients ask for most of one try's time).
pub const LEADER_WAIT_MAX: Duration = Duration::from_secs(10);

impl KvService {
    /// A service for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        let max = node.cfg.file.inflight_requests_max;
        KvService {
            node,
            inflight: Arc::new(Semaphore::new(max)),
        }
    }

    /// Admits a request if fewer than the most allowed are in flight. While
    /// any is, the node's appends as a follower are synced by the syncer
    /// thread rather than in place (see [`Engine::foreground`]).
    ///
    /// [`Engine::foreground`]: crate::storage::Engine::foreground
    fn admit(&self) -> Result<Admitted, Error> {
        let permit = self
            .inflight
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Overloaded {
                retry_after_ms: OVERLOADED_RETRY_AFTER_MS,
            })?;
        Ok(Admitted {
            _permit: permit,
            _serving: self.node.engine.foreground(),
        })
    }

    /// Finds the replica for a request touching `keys` and checks the
    /// client's view of it: a stale epoch or a key outside the range is
    /// refused with the current descriptors, never served.
    ///
    /// A request that names a leader the client suspects is gone
    /// (`suspect_leader`) may be held here, for at most `leader_wait_ms`
    /// (and [`LEADER_WAIT_MAX`]), until this replica learns of another
    /// leader (see [`RangeReplica::await_leader_other_than`]): the client
    /// then finds the new leader as soon as it is elected, instead of
    /// polling the followers with backoff.
    async fn route(
        &self,
        header: &Option<RequestHeader>,
        keys: &[&[u8]],
    ) -> Result<Arc<RangeReplica>, Error> {
        let h = header.unwrap_or_default();
        let replica = match keys.first() {
            Some(k) if h.range_id == 0 => self.node.replica_for_key(k)?,
            _ if h.range_id == 0 => {
                return Err(Error::invalid_argument(
                    "header.range_id",
                    "a request without keys must name its range",
                ))
            }
            _ => self.node.replica(h.range_id)?,
        };
        self.check_span(&replica, keys, h.epoch.map(|e| e.version))?;
        if h.suspect_leader != 0 && h.leader_wait_ms > 0 {
            let wait = Duration::from_millis(u64::from(h.leader_wait_ms)).min(LEADER_WAIT_MAX);
            replica
                .await_leader_other_than(h.suspect_leader, wait)
                .await;
        }
        replica.count_request();
        Ok(replica)
    }

    /// Refuses a request whose view of the range is not the range's now:
    /// `version` (when given) is the span version it was routed or cut by,
    /// `keys` must be in the span. Checked when a request is routed, and
    /// again by reads after their read barrier: a split the barrier applied
    /// (a new leader catching up with it, say) can have moved keys to the
    /// new range, whose writes since the split this replica's engine may
    /// not hold yet. Either way the caller refreshes its route and retries.
    fn check_span(
        &self,
        r: &Arc<RangeReplica>,
        keys: &[&[u8]],
        version: Option<u64>,
    ) -> Result<(), Error> {
        // The hot path builds no descriptor: only errors carry one.
        match r.check_span(keys, version) {
            Ok(()) => Ok(()),
            Err(SpanMismatch::Version) => Err(Error::EpochMismatch {
                range_id: r.range_id(),
                current: self.node.current_descriptors(r),
            }),
            Err(SpanMismatch::Key) => Err(Error::KeyNotInRange {
                range_id: r.range_id(),
                current: Some(self.node.descriptor(r)),
            }),
        }
    }

    fn header(&self, r: &RangeReplica, applied_index: u64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            range_id: r.range_id(),
            node_id: self.node.node_id(),
            applied_index,
            leader_id: r.leader_id(),
        })
    }
}

/// A write's options, checked.
struct CheckedWrite {
    request_id: Bytes,
    /// Durability::All.
    all: bool,
    /// The session's completed mark (`WriteOptions.completed_below`), 0: none.
    completed_below: u64,
}

fn check_request_id(w: &Option<WriteOptions>) -> Result<CheckedWrite, Error> {
    let w = w.clone().unwrap_or_default();
    if w.request_id.len() > REQUEST_ID_BYTES_MAX {
        return Err(Error::invalid_argument(
            "write.request_id",
            format!(
                "request id is {} bytes, the limit is {REQUEST_ID_BYTES_MAX}",
                w.request_id.len()
            ),
        ));
    }
    let all = match Durability::try_from(w.durability) {
        Ok(Durability::Majority) => false,
        Ok(Durability::All) => true,
        Err(_) => {
            return Err(Error::invalid_argument(
                "write.durability",
                "unknown durability",
            ))
        }
    };
    if w.completed_below != 0 {
        let Some((_, seq)) = session_of(&w.request_id) else {
            return Err(Error::invalid_argument(
                "write.completed_below",
                format!(
                    "a completed mark needs a 16-byte request id (session, then number), not {} bytes",
                    w.request_id.len()
                ),
            ));
        };
        if seq < w.completed_below {
            return Err(Error::invalid_argument(
                "write.completed_below",
                format!(
                    "the completed mark {} is above the request's own number {seq}",
                    w.completed_below
                ),
            ));
        }
    }
    Ok(CheckedWrite {
        request_id: w.request_id,
        all,
        completed_below: w.completed_below,
    })
}

fn check_value(field: &str, v: &[u8]) -> Result<(), Error> {
    if v.len() > VALUE_BYTES_MAX {
        return Err(Error::invalid_argument(
            field,
            format!("value is {} bytes, the limit is {VALUE_BYTES_MAX}", v.len()),
        ));
    }
    Ok(())
}

fn read_level(r: &Option<ReadOptions>) -> Result<ReadLevel, Error> {
    let r = r.unwrap_or_default();
    Ok(match Consistency::try_from(r.consistency) {
        Ok(Consistency::Strong) => ReadLevel::Strong,
        Ok(Consistency::BoundedStaleness) => {
            if r.max_staleness_ms == 0 {
                return Err(Error::invalid_argument(
                    "read.max_staleness_ms",
                    "bounded staleness needs a positive bound",
                ));
            }
            ReadLevel::BoundedStaleness {
                max_ms: r.max_staleness_ms,
            }
        }
        Ok(Consistency::Session) => ReadLevel::Session {
            min_applied: r.min_applied_index,
        },
        Ok(Consistency::ConsistentPrefix) | Ok(Consistency::Eventual) => ReadLevel::Local,
        Err(_) => {
            return Err(Error::invalid_argument(
                "read.consistency",
                "unknown consistency level",
            ))
        }
    })
}

fn condition(c: &v1::Compare, field: &str) -> Result<Condition, Error> {
    validate_user_key(&format!("{field}.key"), &c.key)?;
    let expect = match &c.target {
        Some(compare::Target::Value(v)) => {
            check_value(&format!("{field}.value"), v)?;
            Expect::Value(v.clone())
        }
        Some(compare::Target::Version(v)) => Expect::Version(*v),
        None => {
            return Err(Error::invalid_argument(
                field,
                "a compare needs a value or a version",
            ))
        }
    };
    Ok(Condition {
        key: c.key.clone(),
        expect,
    })
}

fn kv(r: KvRecord) -> KeyValue {
    KeyValue {
        key: r.key,
        value: r.value,
        version: r.version,
    }
}

fn unexpected(resp: CommandResponse) -> Status {
    Error::internal(format!("unexpected apply result {resp:?}")).into()
}

impl KvService {
    /// Proposes `op` on `r`; a write that reached the range after a split moved
    /// its keys away is answered with the range's current descriptor.
    ///
    /// A write with a session mark goes as [`Op::Session`] once the whole
    /// cluster runs a version that applies it
    /// ([`crate::version::SESSION_MARKS`]); before, without its mark.
    async fn propose(
        &self,
        r: &RangeReplica,
        w: CheckedWrite,
        op: Op,
    ) -> Result<(u64, CommandResponse), Status> {
        let op = if w.completed_below != 0
            && self.node.cluster_version_seen() >= crate::version::SESSION_MARKS
        {
            Op::Session {
                completed_below: w.completed_below,
                op: Box::new(op),
            }
        } else {
            op
        };
        match r.propose(w.request_id, op, w.all).await? {
            (_, CommandResponse::KeyNotInRange) => Err(Error::KeyNotInRange {
                range_id: r.range_id(),
                current: Some(self.node.descriptor(r)),
            }
            .into()),
            (_, CommandResponse::Superseded) => Err(Error::invalid_argument(
                "write.request_id",
                "the request's number is below its session's completed mark: a late copy of a \
                 request whose outcome the client already has or gave up on; nothing was applied",
            )
            .into()),
            other => Ok(other),
        }
    }
}

/// A scan page token: direction byte, then the key to resume from
/// (forward: inclusive start; reverse: exclusive end).
fn decode_page_token(token: &[u8], reverse: bool) -> Result<Option<&[u8]>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let dir = if reverse { 2 } else { 1 };
    if token[0] != dir || token.len() < 2 {
        return Err(Error::invalid_argument(
            "page_token",
            "not a token from a scan in this direction",
        ));
    }
    Ok(Some(&token[1..]))
}

/// A Get's read of its key from the store (fail point `kv-get-read`).
fn read_key(
    engine: &crate::storage::Engine,
    key: &[u8],
) -> Result<Option<crate::storage::StoredValue>, crate::storage::StorageError> {
    crate::fail_point!("kv-get-read");
    engine.get(key)
}

fn encode_page_token(resume: &[u8], reverse: bool) -> Bytes {
    let mut t = Vec::with_capacity(resume.len() + 1);
    t.push(if reverse { 2 } else { 1 });
    t.extend_from_slice(resume);
    Bytes::from(t)
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let _permit = self.admit()?;
        let req = req.into_inner();
        validate_user_key("key", &req.key)?;
        let level = read_level(&req.read)?;
        let r = self.route(&req.header, &[&req.key]).await?;
        let applied = r.read_barrier(level).await?;
        self.check_span(&r, &[&req.key], None)?;
        let found = r.read_local(|| read_key(r.engine(), &req.key).map_err(|e| r.refuse(&e)))?;
        Ok(Response::new(GetResponse {
            header: self.header(&r, applied),
            kv: found.map(|v| KeyValue {
                key: req.key.clone(),
                value: v.value,
                version: v.version,
            }),
        }))
    }

    async fn batch_get(
        &self,
        req: Request<BatchGetRequest>,
    ) -> Result<Response<BatchGetResponse>, Status> {
        let _permit = self.admit()?;
        let req = req.into_inner();
        if req.keys.is_empty() {
            return Err(Error::invalid_argument("keys", "at least one key is needed").into());
        }
        if req.keys.len() > BATCH_OPS_MAX {
            return Err(Error::invalid_argument(
                "keys",
                format!(
                    "{} keys exceed the batch limit {BATCH_OPS_MAX}",
                    req.keys.len()
                ),
            )
            .into());
        }
        for (i, k) in req.keys.iter().enumerate() {
            validate_user_key(&format!("keys[{i}]"), k)?;
        }
        let level = read_level(&req.read)?;
        let keys: Vec<&[u8]> = req.keys.iter().map(|k| k.as_ref()).collect();
        let r = self.route(&req.header, &keys).await?;
        let applied = r.read_barrier(level).await?;
        self.check_span(&r, &keys, None)?;
        let mut kvs = Vec::new();
        let mut bytes = 0usize;
        // One snapshot for every key: the keys are read as of one applied state.
        let values = r.read_local(|| r.engine().get_many(&req.keys).map_err(|e| r.refuse(&e)))?;
        for (k, v) in req.keys.iter().zip(values) {
            if let Some(v) = v {
                bytes += k.len() + v.value.len();
                if bytes > SCAN_BYTES_MAX {
                    return Err(Error::invalid_argument(
                        "keys",
                        format!("the values exceed the response limit of {SCAN_BYTES_MAX} bytes; ask for fewer keys"),
                    )
                    .into());
                }
                kvs.push(KeyValue {
                    key: k.clone(),
                    value: v.value,
                    version: v.version,
                });
            }
        }
        Ok(Response::new(BatchGetResponse {
            header: self.header(&r, applied),
            kvs,
        }))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let _permit = self.admit()?;
        let req = req.into_inner();
        validate_user_key("key", &req.key)?;
        check_value("value", &req.value)?;
        let w = check_request_id(&req.write)?;
        let r = self.route(&req.header, &[&req.key]).await?;
        let op = Op::Put {
            key: req.key,
            value: req.value,
        };
        let (index, resp) = self.propose(&r, w, op).await?;
        match resp {
            CommandResponse::Put { version } => Ok(Response::new(PutResponse {
                header: self.header(&r, index),
                version,
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let _permit = self.admit()?;
        let req = req.into_inner();
        validate_user_key("key", &req.key)?;
        let w = check_request_id(&req.write)?;
        let r = self.route(&req.header, &[&req.key]).await?;
        let (index, resp) = self.propose(&r, w, Op::Delete { key: req.key }).await?;
        match resp {
            CommandResponse::Delete { deleted } => Ok(Response::new(DeleteResponse {
                header: self.header(&r, index),
                deleted,
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let _permit = self.admit()?;
        let req = req.into_inner();
        validate_scan_bound("start_key", &req.start_key)?;
        validate_scan_bound("end_key", &req.end_key)?;
        if !req.end_key.is_empty() && req.start_key >= req.end_key {
            return Err(
                Error::invalid_argument("end_key", "must be greater than start_key").into(),
            );
        }
        let limit = match req.limit {
            0 => SCAN_LIMIT_DEFAULT,
            n if n > SCAN_LIMIT_MAX => {
                return Err(Error::invalid_argument(
                    "limit",
                    format!("{n} exceeds the scan limit {SCAN_LIMIT_MAX}"),
                )
                .into())
            }
            n => n,
        } as usize;
        let level = read_level(&req.read)?;
        // User scans never see the system key space (keys starting with 0x00).
        let mut start: Vec<u8> = if req.start_key.is_empty() {
            vec![0x01]
        } else {
            req.start_key.to_vec()
        };
        let mut end: Vec<u8> = req.end_key.to_vec();
        if let Some(resume) = decode_page_token(&req.page_token, req.reverse)? {
            let in_bounds =
                resume >= start.as_slice() && (end.is_empty() || resume <= end.as_slice());
            if !in_bounds {
                return Err(Error::invalid_argument(
                    "page_token",
                    "token lies outside the scan bounds",
                )
                .into());
            }
            if req.reverse {
                end = resume.to_vec();
            } else {
                start = resume.to_vec();
            }
        }
        let h = req.header.unwrap_or_default();
        let r = if h.range_id == 0 {
            // No range named: the one holding the first key of the scan.
            let probe: &[u8] = if req.reverse && !end.is_empty() {
                &end
            } else {
                &start
            };
            let r = self.node.replica_for_key(probe)?;
            self.route(
                &Some(RequestHeader {
                    range_id: r.range_id(),
                    epoch: h.epoch,
                    suspect_leader: h.suspect_leader,
                    leader_wait_ms: h.leader_wait_ms,
                }),
                &[],
            )
            .await?
        } else {
            self.route(&req.header, &[]).await?
        };
        // Serve only the part of the scan inside this range; a scan that
        // starts past the range's end (forward) or ends at or before its start
        // (reverse) was routed by a stale or wrong view and is refused, never
        // answered with an empty page the caller would read as "no keys".
        let m = r.meta();
        let outside = if req.reverse {
            !end.is_empty() && end.as_slice() <= m.start.as_ref()
        } else {
            !m.end.is_empty() && start.as_slice() >= m.end.as_ref()
        };
        if outside {
            return Err(Error::KeyNotInRange {
                range_id: r.range_id(),
                current: Some(self.node.descriptor(&r)),
            }
            .into());
        }
        if start.as_slice() < m.start.as_ref() {
            start = m.start.to_vec();
        }
        if !m.end.is_empty() && (end.is_empty() || end.as_slice() > m.end.as_ref()) {
            end = m.end.to_vec();
        }
        let applied = r.read_barrier(level).await?;
        // The span was cut to the range before the barrier.
        self.check_span(&r, &[], Some(m.version))?;
        let (items, more) = if !end.is_empty() && start >= end {
            (Vec::new(), false)
        } else {
            r.read_local(|| {
                r.engine()
                    .scan(&start, &end, limit, req.reverse, SCAN_BYTES_MAX)
                    .map_err(|e| r.refuse(&e))
            })?
        };
        let next_page_token = match (more, items.last()) {
            (true, Some(last)) => {
                if req.reverse {
                    encode_page_token(&last.key, true)
                } else {
                    let mut next = last.key.to_vec();
                    next.push(0);
                    encode_page_token(&next, false)
                }
            }
            _ => Bytes::new(),
        };
        let kvs = items
            .into_iter()
            .map(|i| KeyValue {
                key: i.key,
                value: if req.keys_only {
                    Bytes::new()
                } else {
                    i.value.value
                },
                version: i.value.version,
            })
            .collect();
        Ok(Response::new(ScanResponse {
            header: self.header(&r, applied),
            kvs,
            next_page_token,
        }))
    }

    async fn compare_and_swap(
        &self,
        req: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        let _permit = self.admit()?;
        let req = req.into_inner();
        let Some(cmp) = &req.compare else {
            return Err(Error::invalid_argument("compare", "missing").into());
        };
        let cond = condition(cmp, "compare")?;
        if !req.delete {
            check_value("new_value", &req.new_value)?;
        }
        let w = check_request_id(&req.write)?;
        let r = self.route(&req.header, &[&cond.key]).await?;
        let op = Op::CompareAndSwap {
            compare: cond,
            new_value: (!req.delete).then(|| req.new_value.clone()),
        };
        let (index, resp) = self.propose(&r, w, op).await?;
        match resp {
            CommandResponse::CompareAndSwap { succeeded, current } => {
                Ok(Response::new(CompareAndSwapResponse {
                    header: self.header(&r, index),
                    succeeded,
                    current: current.map(kv),
                }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn batch(&self, req: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
        let _permit = self.admit()?;
        let req = req.into_inner();
        if req.ops.is_empty() {
            return Err(
                Error::invalid_argument("ops", "a batch needs at least one operation").into(),
            );
        }
        if req.ops.len() > BATCH_OPS_MAX {
            return Err(Error::invalid_argument(
                "ops",
                format!(
                    "{} operations exceed the batch limit {BATCH_OPS_MAX}",
                    req.ops.len()
                ),
            )
            .into());
        }
        if req.conditions.len() > BATCH_CONDITIONS_MAX {
            return Err(Error::invalid_argument(
                "conditions",
                format!(
                    "{} conditions exceed the limit {BATCH_CONDITIONS_MAX}",
                    req.conditions.len()
                ),
            )
            .into());
        }
        let mut total = 0usize;
        let mut ops = Vec::with_capacity(req.ops.len());
        for (i, op) in req.ops.iter().enumerate() {
            match &op.op {
                Some(batch_op::Op::Put(p)) => {
                    validate_user_key(&format!("ops[{i}].key"), &p.key)?;
                    check_value(&format!("ops[{i}].value"), &p.value)?;
                    total += p.key.len() + p.value.len();
                    ops.push(WriteOp::Put {
                        key: p.key.clone(),
                        value: p.value.clone(),
                    });
                }
                Some(batch_op::Op::Delete(k)) => {
                    validate_user_key(&format!("ops[{i}].key"), k)?;
                    total += k.len();
                    ops.push(WriteOp::Delete { key: k.clone() });
                }
                None => {
                    return Err(
                        Error::invalid_argument(format!("ops[{i}]"), "empty operation").into(),
                    )
                }
            }
        }
        if total > BATCH_BYTES_MAX {
            return Err(Error::invalid_argument(
                "ops",
                format!("batch is {total} bytes, the limit is {BATCH_BYTES_MAX}"),
            )
            .into());
        }
        let conditions = req
            .conditions
            .iter()
            .enumerate()
            .map(|(i, c)| condition(c, &format!("conditions[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let w = check_request_id(&req.write)?;
        let keys: Vec<&[u8]> = ops
            .iter()
            .map(|o| match o {
                WriteOp::Put { key, .. } | WriteOp::Delete { key } => key.as_ref(),
            })
            .chain(conditions.iter().map(|c| c.key.as_ref()))
            .collect();
        let r = self.route(&req.header, &keys).await?;
        let (index, resp) = self.propose(&r, w, Op::Batch { conditions, ops }).await?;
        match resp {
            CommandResponse::Batch {
                succeeded,
                current,
                version,
            } => Ok(Response::new(BatchResponse {
                header: self.header(&r, index),
                succeeded,
                current: current.into_iter().map(kv).collect(),
                version,
            })),
            other => Err(unexpected(other)),
        }
    }

    type BundleStream = futures::stream::BoxStream<'static, Result<BundleResponse, Status>>;

    async fn bundle(
        &self,
        req: Request<BundleRequest>,
    ) -> Result<Response<Self::BundleStream>, Status> {
        use futures::{FutureExt, StreamExt};
        use prost::Message;
        let req = req.into_inner();
        if req.requests.len() > BUNDLE_REQUESTS_MAX {
            return Err(Error::invalid_argument(
                "requests",
                format!(
                    "{} requests exceed the bundle limit {BUNDLE_REQUESTS_MAX}",
                    req.requests.len()
                ),
            )
            .into());
        }
        // Every request runs as if it had come alone (its own admission,
        // routing, checks and proposal), all at once: the writes among them
        // meet in their ranges' proposal queues and share log entries there.
        // Answers go out as they are ready, those ready together in one
        // message. The client dropping the stream drops what is unanswered,
        // as it would drop a unary call.
        let pending: futures::stream::FuturesUnordered<_> = req
            .requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let svc = self.clone();
                async move { svc.bundled(i as u32, r).await }.boxed()
            })
            .collect();
        // A message gathers ready answers up to BUNDLE_RESPONSE_BYTES_TARGET;
        // an answer that would take it past that starts the next one.
        let stream = futures::stream::unfold((pending, None), |(mut pending, carry)| async move {
            let first: BundledResponse = match carry {
                Some(r) => r,
                None => pending.next().await?,
            };
            let mut bytes = first.encoded_len();
            let mut responses = vec![first];
            let mut carry = None;
            while bytes < BUNDLE_RESPONSE_BYTES_TARGET {
                let Some(Some(r)) = pending.next().now_or_never() else {
                    break;
                };
                let n = r.encoded_len();
                if bytes + n > BUNDLE_RESPONSE_BYTES_TARGET {
                    carry = Some(r);
                    break;
                }
                bytes += n;
                responses.push(r);
            }
            Some((Ok(BundleResponse { responses }), (pending, carry)))
        });
        Ok(Response::new(stream.boxed()))
    }
}

impl KvService {
    /// Serves one request of a bundle by the handler that serves it alone.
    async fn bundled(&self, index: u32, req: BundledRequest) -> BundledResponse {
        use v1::bundled_request::Request as In;
        use v1::bundled_response::Response as Out;
        fn held(h: &Option<RequestHeader>) -> Result<(), Status> {
            if h.as_ref().is_some_and(|h| h.suspect_leader != 0) {
                return Err(Error::invalid_argument(
                    "header.suspect_leader",
                    "a request held for a new leader must be sent alone, not in a bundle",
                )
                .into());
            }
            Ok(())
        }
        let out = match req.request {
            Some(In::Put(r)) => match held(&r.header) {
                Ok(()) => self
                    .put(Request::new(r))
                    .await
                    .map(|r| Out::Put(r.into_inner())),
                Err(e) => Err(e),
            },
            Some(In::Delete(r)) => match held(&r.header) {
                Ok(()) => self
                    .delete(Request::new(r))
                    .await
                    .map(|r| Out::Delete(r.into_inner())),
                Err(e) => Err(e),
            },
            Some(In::Get(r)) => match held(&r.header) {
                Ok(()) => self
                    .get(Request::new(r))
                    .await
                    .map(|r| Out::Get(r.into_inner())),
                Err(e) => Err(e),
            },
            None => Err(Error::invalid_argument("requests[].request", "empty request").into()),
        };
        BundledResponse {
            index,
            response: Some(out.unwrap_or_else(|status| {
                Out::Error(BundledStatus {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                    details: Bytes::copy_from_slice(status.details()),
                })
            })),
        }
    }
}
