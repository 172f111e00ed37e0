//! Outgoing Raft transport: one HTTP/2 channel per peer node, shared by every
//! range, with the range id in every message.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use lmskv_proto::limits::GRPC_MESSAGE_BYTES_MAX;
use lmskv_proto::v1::raft_client::RaftClient;
use lmskv_proto::v1::{RaftMessage, SnapshotChunk};
use openraft::alias::{LogIdOf, SnapshotOf, VoteOf};
use openraft::async_runtime::WatchReceiver;
use openraft::base::{BoxFuture, BoxStream};
use openraft::entry::RaftEntry;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest,
    VoteResponse,
};
use openraft::vote::RaftLeaderId;
use openraft::{OptionalSend, RaftNetworkV2};
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, Endpoint};

use super::codec::{decode, encode};
use super::state_machine::SnapshotFile;
use super::stream::{AppendStream, Reply, StreamError, APPEND_STREAM_PAYLOAD_BYTES_MAX};
use super::TypeConfig;
use crate::storage::SNAPSHOT_CHUNK_BYTES;

/// Snapshot chunks buffered between the file reader and the gRPC stream.
const SNAPSHOT_STREAM_CHUNKS_MAX: usize = 4;
/// Shortest time a Raft RPC is given. openraft asks for the heartbeat
/// interval (50 ms by default) for every AppendEntries; an append that
/// waits on a follower's fsync a little longer was then abandoned and sent
/// again, its work wasted. openraft's heartbeat worker keeps its own
/// timeout, so heartbeats are unaffected.
pub const RAFT_RPC_TIMEOUT_MIN: Duration = Duration::from_millis(500);
/// Most appends of one range a leader keeps in flight to a peer.
pub const APPEND_PIPELINE_MAX: usize = 32;
/// Longest an entry-less append that only tells a follower the new commit
/// index waits for the range's next append, which carries that index too
/// and goes in its place (see [`one_at_a_time`]).
pub const COMMIT_NOTICE_WAIT: Duration = Duration::from_millis(1);

/// Makes the channel to a peer from its configured endpoint, in place of a
/// TCP connection: the simulation (crate `lmskv-sim`) carries Raft traffic
/// over its simulated network this way.
pub type ChannelMaker = Arc<dyn Fn(Endpoint) -> Channel + Send + Sync>;

/// The node's connections to its peers: one lazily connected HTTP/2 channel
/// per peer address, multiplexing the traffic of every range.
pub struct PeerPool {
    local_id: u64,
    /// The local address connections to peers are made from, when set.
    source_ip: Option<std::net::IpAddr>,
    channels: Mutex<HashMap<String, Channel>>,
    /// How channels connect; `None`: TCP.
    maker: Option<ChannelMaker>,
    /// Snapshot files are read on the sending task instead of blocking
    /// threads (the simulation: see `Engine::runs_inline`).
    inline_reads: bool,
    /// The shortest time a Raft RPC is given (see [`RAFT_RPC_TIMEOUT_MIN`]).
    rpc_timeout_min: Duration,
    /// Whether appends go over one stream per peer (see [`super::stream`]).
    append_stream: bool,
    /// Appends of one range kept in flight to a peer on its stream (1: one
    /// at a time, each sent when the last is answered).
    append_pipeline: usize,
    streams: Mutex<HashMap<String, Arc<AppendStream>>>,
}

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPool")
            .field("local_id", &self.local_id)
            .field("source_ip", &self.source_ip)
            .finish()
    }
}

impl PeerPool {
    /// An empty pool for the node `local_id`; with `append_stream`, appends
    /// to each peer share one long-lived stream (see [`super::stream`]), on
    /// which each range keeps up to `append_pipeline` appends in flight
    /// (at least 1, at most [`APPEND_PIPELINE_MAX`]).
    pub fn new(
        local_id: u64,
        source_ip: Option<std::net::IpAddr>,
        append_stream: bool,
        append_pipeline: usize,
    ) -> Arc<Self> {
        Arc::new(PeerPool {
            local_id,
            source_ip,
            channels: Mutex::new(HashMap::new()),
            maker: None,
            inline_reads: false,
            rpc_timeout_min: RAFT_RPC_TIMEOUT_MIN,
            append_stream,
            append_pipeline: append_pipeline.clamp(1, APPEND_PIPELINE_MAX),
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// An empty pool for the node `local_id` whose channels `maker` connects
    /// (the same endpoint settings, another transport). With `inline_reads`,
    /// a snapshot being sent is read from its file on the sending task, not
    /// on blocking threads, so that each read finishes at a definite point
    /// of a simulation's time. Every Raft RPC gets at least `rpc_timeout_min`
    /// (the node uses [`RAFT_RPC_TIMEOUT_MIN`]; zero leaves openraft's own
    /// timeouts, the heartbeat interval for appends, which a simulation uses
    /// to reach the paths that abandoned appends take).
    pub fn with_channel_maker(
        local_id: u64,
        maker: ChannelMaker,
        inline_reads: bool,
        rpc_timeout_min: Duration,
    ) -> Arc<Self> {
        Arc::new(PeerPool {
            local_id,
            source_ip: None,
            channels: Mutex::new(HashMap::new()),
            maker: Some(maker),
            inline_reads,
            rpc_timeout_min,
            append_stream: false,
            append_pipeline: 1,
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// The channel to `addr` (`HOST:PORT`), created on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut map = self.channels.lock().expect("peer pool lock");
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad peer address {addr}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .local_address(self.source_ip)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let ch = match &self.maker {
            Some(make) => make(ep),
            None => ep.connect_lazy(),
        };
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// The append stream to `addr`, started on first use; `None` when
    /// appends go alone.
    fn stream(&self, addr: &str) -> Option<Arc<AppendStream>> {
        if !self.append_stream {
            return None;
        }
        let mut map = self.streams.lock().expect("stream map lock");
        if let Some(s) = map.get(addr) {
            return Some(s.clone());
        }
        let channel = self.channel(addr).ok()?;
        tokio::runtime::Handle::try_current().ok()?;
        let s = Arc::new(AppendStream::start(channel));
        map.insert(addr.to_string(), s.clone());
        Some(s)
    }

    /// This node's id.
    pub fn local_id(&self) -> u64 {
        self.local_id
    }
}

/// Peers whose replica of one range answered that it refuses to serve
/// (`DataLoss`: it faulted), each with when it last did. A leader adding a
/// replica reads it to give up on a new replica that faulted instead of
/// waiting for it to catch up (see `RangeReplica::change_voters`).
#[derive(Debug, Default)]
pub struct FaultedPeers(Mutex<HashMap<u64, std::time::Instant>>);

/// Peers remembered per range at most; the oldest go first. A range has a
/// handful of members, so this only bounds a range whose members kept
/// changing while they faulted.
const FAULTED_PEERS_MAX: usize = 64;

impl FaultedPeers {
    /// Records that `peer` refused as faulted just now.
    pub fn note(&self, peer: u64) {
        let mut m = self.0.lock().expect("faulted peers lock");
        if m.len() >= FAULTED_PEERS_MAX && !m.contains_key(&peer) {
            if let Some(oldest) = m.iter().min_by_key(|(_, t)| **t).map(|(id, _)| *id) {
                m.remove(&oldest);
            }
        }
        m.insert(peer, std::time::Instant::now());
    }

    /// Whether `peer` refused as faulted at or after `since`.
    pub fn refused_since(&self, peer: u64, since: std::time::Instant) -> bool {
        self.0
            .lock()
            .expect("faulted peers lock")
            .get(&peer)
            .is_some_and(|t| *t >= since)
    }
}

/// A group's metrics channel.
pub(crate) type MetricsRx =
    openraft::alias::WatchReceiverOf<TypeConfig, openraft::RaftMetrics<TypeConfig>>;

/// A group's metrics, once the group is built (see
/// [`NetworkFactory::metrics`]).
#[derive(Clone, Default)]
pub(crate) struct GroupMetrics(pub(crate) Arc<std::sync::OnceLock<MetricsRx>>);

impl std::fmt::Debug for GroupMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "GroupMetrics(set)"
        } else {
            "GroupMetrics(unset)"
        })
    }
}

/// Creates per-peer Raft clients for one range.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    pub(crate) pool: Arc<PeerPool>,
    pub(crate) range_id: u64,
    /// Set while the range's leader hibernates (see `RangeReplica::hibernate`).
    pub(crate) hibernating: Arc<std::sync::atomic::AtomicBool>,
    /// Peers that refused as faulted (shared with the replica).
    pub(crate) faulted_peers: Arc<FaultedPeers>,
    /// The group's metrics, set once the group is built: each append says
    /// how long ago a quorum last acknowledged this leader.
    pub(crate) metrics: GroupMetrics,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &openraft::impls::BasicNode) -> PeerClient {
        PeerClient {
            channel: self.pool.channel(&node.addr),
            stream: self.pool.stream(&node.addr),
            range_id: self.range_id,
            from: self.pool.local_id(),
            target,
            hibernating: self.hibernating.clone(),
            faulted_peers: self.faulted_peers.clone(),
            metrics: self.metrics.clone(),
            inline_reads: self.pool.inline_reads,
            rpc_timeout_min: self.pool.rpc_timeout_min,
            pipeline: self.pool.append_pipeline,
        }
    }
}

/// Sends one range's Raft messages to one peer.
pub struct PeerClient {
    channel: Result<Channel, String>,
    /// The peer's append stream, when appends use one.
    stream: Option<Arc<AppendStream>>,
    range_id: u64,
    from: u64,
    target: u64,
    hibernating: Arc<std::sync::atomic::AtomicBool>,
    faulted_peers: Arc<FaultedPeers>,
    /// See [`NetworkFactory::metrics`].
    metrics: GroupMetrics,
    /// See [`PeerPool::with_channel_maker`].
    inline_reads: bool,
    /// See [`PeerPool::with_channel_maker`].
    rpc_timeout_min: Duration,
    /// Appends kept in flight on the stream (see [`PeerPool::new`]).
    pipeline: usize,
}

/// A snapshot file being sent: read through tokio (each read on a blocking
/// thread), or with plain reads on the sending task (inline).
enum SnapshotReader {
    Threaded(tokio::fs::File),
    Inline(std::fs::File),
}

impl SnapshotReader {
    async fn open(path: &std::path::Path, inline: bool) -> std::io::Result<Self> {
        Ok(if inline {
            SnapshotReader::Inline(std::fs::File::open(path)?)
        } else {
            SnapshotReader::Threaded(tokio::fs::File::open(path).await?)
        })
    }

    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            SnapshotReader::Threaded(f) => f.read(buf).await,
            SnapshotReader::Inline(f) => std::io::Read::read(f, buf),
        }
    }
}

fn unreachable<E: std::fmt::Display>(e: E) -> Unreachable<TypeConfig> {
    Unreachable::from_string(e)
}

impl PeerClient {
    /// Notes the peer as faulted when `status` says its replica refuses to
    /// serve (`DataLoss`).
    fn note_refusal(&self, status: &tonic::Status) {
        if status.code() == tonic::Code::DataLoss {
            self.faulted_peers.note(self.target);
        }
    }

    /// The Raft error for a peer's refusal, noting a faulted peer's.
    fn rpc_error(&self, status: tonic::Status) -> RPCError<TypeConfig> {
        self.note_refusal(&status);
        status_to_rpc_error(status)
    }

    fn client(&self) -> Result<RaftClient<Channel>, RPCError<TypeConfig>> {
        match &self.channel {
            Ok(c) => Ok(RaftClient::new(c.clone())
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)),
            Err(e) => Err(RPCError::Unreachable(unreachable(e))),
        }
    }

    fn message(&self, payload: Vec<u8>) -> RaftMessage {
        RaftMessage {
            range_id: self.range_id,
            from_node: self.from,
            to_node: self.target,
            crc32: crc32fast::hash(&payload),
            payload: Bytes::from(payload),
            hibernate: false,
            quorum_acked_age_us: None,
        }
    }

    /// When a quorum last acknowledged this leader, if the append `req`
    /// may carry it as its proof of freshness (see
    /// `RaftMessage::quorum_acked_age_us`, and [`stream::stamp`], which
    /// turns it into an age as the append leaves). The follower that
    /// accepts the append treats every write acknowledged before that
    /// moment as at or below `req`'s commit index, so there is no proof:
    /// - while the commit index is not of the leader's own term: a new
    ///   leader's can be behind writes its predecessor committed and
    ///   acknowledged, until an entry of its own commits;
    /// - when the group had committed past it by the acknowledgement it
    ///   reports: openraft read the commit index into `req` earlier (and
    ///   may have waited out a backoff since), and writes acknowledged in
    ///   between are not in it.
    ///
    /// Also `None` before the group is built, when it does not lead in
    /// `req`'s term, and for appends that go as unary calls (their age
    /// would be taken before tonic waits for a connection; they are rare,
    /// and the follower keeps its last proof meanwhile).
    ///
    /// [`stream::stamp`]: super::stream::stamp
    fn quorum_proof(&self, req: &AppendEntriesRequest<TypeConfig>) -> Option<tokio::time::Instant> {
        let commit = req.leader_commit.as_ref()?;
        if *commit.committed_leader_id() != req.vote.leader_id().to_committed() {
            return None;
        }
        let rx = self.metrics.0.get()?;
        let m = rx.borrow_watched();
        if m.vote.leader_id() != req.vote.leader_id() {
            return None;
        }
        let newer = |c: &Option<LogIdOf<TypeConfig>>| {
            c.as_ref().is_some_and(|c| c.index() > commit.index())
        };
        if newer(&m.local_committed) || newer(&m.cluster_committed) {
            return None;
        }
        let at = m.last_quorum_acked.as_ref()?;
        tokio::time::Instant::now().checked_sub(openraft::Instant::elapsed(&**at))
    }

    async fn call<Req, Resp, F, Fut>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        f: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, RaftMessage) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftMessage>, tonic::Status>>,
    {
        let client = self.client()?;
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let msg = self.message(payload);
        let ttl = option.hard_ttl().max(self.rpc_timeout_min);
        let resp = match tokio::time::timeout(ttl, f(client, msg)).await {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::from_string(format!(
                    "raft rpc to node {} timed out after {ttl:?}",
                    self.target,
                ))))
            }
            Ok(Err(status)) => return Err(self.rpc_error(status)),
            Ok(Ok(r)) => r.into_inner(),
        };
        if crc32fast::hash(&resp.payload) != resp.crc32 {
            return Err(RPCError::Network(NetworkError::from_string(
                "raft response checksum mismatch",
            )));
        }
        decode("raft response", &resp.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

/// One append's outcome as openraft's streams carry it.
type Appended = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

/// An append ready to go: its message and the log ids it covers.
struct Outgoing {
    msg: RaftMessage,
    prev: Option<LogIdOf<TypeConfig>>,
    last: Option<LogIdOf<TypeConfig>>,
    /// See [`PeerClient::quorum_proof`].
    proof: Option<tokio::time::Instant>,
}

/// An append sent and not answered yet.
struct InFlight {
    prev: Option<LogIdOf<TypeConfig>>,
    last: Option<LogIdOf<TypeConfig>>,
    deadline: tokio::time::Instant,
    reply: Pending,
}

/// Where an append's answer comes from.
enum Pending {
    /// A frame on the peer's append stream.
    Streamed(tokio::sync::oneshot::Receiver<Reply>),
    /// A call of its own.
    Alone(futures::future::BoxFuture<'static, Result<RaftMessage, tonic::Status>>),
}

/// One range's appends to one peer, up to `PeerClient::pipeline` in
/// flight on the peer's append stream, their results yielded in the order
/// they were sent (the peer's `AppendPipe` serves them in that order).
///
/// The leader's next append thus reaches the follower while it still
/// syncs the last one, instead of a round trip after. An append too large
/// for the stream, or one the stream cannot take, goes alone once every
/// append before it is answered, and the next waits for it: the order
/// holds either way. The stream ends after an error, a refusal (conflict,
/// higher vote) or a partial success; openraft starts a new one from the
/// answer.
struct Pipeline<'s, S> {
    peer: &'s PeerClient,
    stream: Arc<AppendStream>,
    input: S,
    input_done: bool,
    /// Longest an append may wait for its answer once sent.
    ttl: Duration,
    in_flight: VecDeque<InFlight>,
    /// An append to send alone once `in_flight` is empty.
    held: Option<Outgoing>,
}

impl<'s, S> Pipeline<'s, S>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin + Send + 's,
{
    fn into_stream(self) -> BoxStream<'s, Appended> {
        Box::pin(futures::stream::unfold(Some(self), |p| async move {
            let mut p = p?;
            let (item, more) = p.next_result().await?;
            Some((item, more.then_some(p)))
        }))
    }

    /// The next append's result, and whether the stream goes on after it;
    /// `None` once the input is done and every append answered.
    async fn next_result(&mut self) -> Option<(Appended, bool)> {
        loop {
            if self.in_flight.is_empty() {
                if let Some(out) = self.held.take() {
                    if let Err(e) = self.send_alone(out) {
                        return Some((Err(e), false));
                    }
                }
            }
            let alone_first = matches!(
                self.in_flight.front(),
                Some(InFlight {
                    reply: Pending::Alone(_),
                    ..
                })
            );
            let fill = !self.input_done
                && self.held.is_none()
                && !alone_first
                && self.in_flight.len() < self.peer.pipeline;
            if self.in_flight.is_empty() && !fill {
                return None;
            }
            tokio::select! {
                biased;
                answered = first_answer(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    let sent = self.in_flight.pop_front().expect("the first append was answered");
                    return Some(self.result_of(sent, answered));
                }
                next = self.input.next(), if fill => match next {
                    None => self.input_done = true,
                    Some(req) => {
                        if let Err(e) = self.send(req) {
                            return Some((Err(e), false));
                        }
                    }
                },
            }
        }
    }

    fn send(&mut self, req: AppendEntriesRequest<TypeConfig>) -> Result<(), RPCError<TypeConfig>> {
        let (prev, last) = covered(&req);
        let proof = self.peer.quorum_proof(&req);
        let hibernate = req.entries.is_empty()
            && self
                .peer
                .hibernating
                .load(std::sync::atomic::Ordering::Relaxed);
        let payload = encode(&req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut msg = self.peer.message(payload);
        msg.hibernate = hibernate;
        let out = Outgoing {
            msg,
            prev,
            last,
            proof,
        };
        if out.msg.payload.len() <= APPEND_STREAM_PAYLOAD_BYTES_MAX {
            if let Some(rx) = self.stream.call(out.msg.clone(), out.proof) {
                self.in_flight.push_back(InFlight {
                    prev: out.prev,
                    last: out.last,
                    deadline: tokio::time::Instant::now() + self.ttl,
                    reply: Pending::Streamed(rx),
                });
                return Ok(());
            }
        }
        if self.in_flight.is_empty() {
            self.send_alone(out)
        } else {
            self.held = Some(out);
            Ok(())
        }
    }

    fn send_alone(&mut self, out: Outgoing) -> Result<(), RPCError<TypeConfig>> {
        let mut client = self.peer.client()?;
        // No proof of freshness on a unary call (see `quorum_proof`).
        let msg = out.msg;
        self.in_flight.push_back(InFlight {
            prev: out.prev,
            last: out.last,
            deadline: tokio::time::Instant::now() + self.ttl,
            reply: Pending::Alone(Box::pin(async move {
                client
                    .append_entries(msg)
                    .await
                    .map(tonic::Response::into_inner)
            })),
        });
        Ok(())
    }

    /// What the peer's answer (`None`: none in time) to `sent` means.
    fn result_of(&self, sent: InFlight, answered: Option<Reply>) -> (Appended, bool) {
        let failed = |e: String| (Err(RPCError::Network(NetworkError::from_string(e))), false);
        let target = self.peer.target;
        let reply = match answered {
            None => {
                return failed(format!(
                    "raft append to node {target} timed out after {:?}",
                    self.ttl
                ))
            }
            Some(Err(StreamError::Refused)) => {
                return failed(format!("the append stream to node {target} is full"))
            }
            Some(Err(StreamError::Failed(status))) => {
                return (Err(self.peer.rpc_error(status)), false)
            }
            Some(Ok(reply)) => reply,
        };
        if crc32fast::hash(&reply.payload) != reply.crc32 {
            return failed("raft response checksum mismatch".into());
        }
        let resp: AppendEntriesResponse<TypeConfig> = match decode("raft response", &reply.payload)
        {
            Ok(r) => r,
            Err(e) => return (Err(RPCError::Network(NetworkError::new(&e))), false),
        };
        let (result, more) = stream_result(resp, sent.prev, sent.last);
        (Ok(result), more)
    }
}

/// The log ids an append covers: the one before its entries and its last
/// (the one before, for an entry-less append).
fn covered(
    req: &AppendEntriesRequest<TypeConfig>,
) -> (Option<LogIdOf<TypeConfig>>, Option<LogIdOf<TypeConfig>>) {
    let prev = req.prev_log_id;
    (prev, req.entries.last().map(|e| e.log_id()).or(prev))
}

/// An append's answer as openraft's streams carry it, and whether the
/// stream may go on after it: not after a refusal or a partial success.
fn stream_result(
    resp: AppendEntriesResponse<TypeConfig>,
    prev: Option<LogIdOf<TypeConfig>>,
    last: Option<LogIdOf<TypeConfig>>,
) -> (StreamAppendResult<TypeConfig>, bool) {
    let partial = match &resp {
        AppendEntriesResponse::PartialSuccess(l) => Some(*l),
        _ => None,
    };
    let result = resp.into_stream_result(prev, last);
    let more = result.is_ok() && partial.is_none_or(|p| p == last);
    (result, more)
}

/// The answer to the first append in flight; `None` when its time is up.
async fn first_answer(in_flight: &mut VecDeque<InFlight>) -> Option<Reply> {
    let first = in_flight.front_mut().expect("an append in flight");
    let deadline = first.deadline;
    let answer = match &mut first.reply {
        Pending::Streamed(rx) => tokio::time::timeout_at(deadline, rx).await.map(|r| {
            r.unwrap_or_else(|_| {
                Err(StreamError::Failed(tonic::Status::unavailable(
                    "the append stream stopped",
                )))
            })
        }),
        Pending::Alone(call) => tokio::time::timeout_at(deadline, call)
            .await
            .map(|r| r.map_err(StreamError::Failed)),
    };
    answer.ok()
}

/// A range's appends to one peer one at a time, each sent when the last is
/// answered, as openraft's own sequential stream does, with one change: an
/// entry-less append that only carries a new commit index waits up to
/// [`COMMIT_NOTICE_WAIT`] for the range's next append and is dropped when
/// one comes.
///
/// On a steady leader every commit is followed by such a notice, and the
/// next append (the next client write) often comes a fraction of a
/// millisecond later. Sent at once, the notice is a round trip of its own
/// that the next append has to wait behind; dropped, the next append
/// carries the newer commit index instead (openraft fills in the latest one
/// when it makes the request) and its answer acknowledges both: the
/// notice's log id is the next append's previous one, and openraft's
/// in-flight queue drains every request an answer covers. A follower
/// therefore learns of a commit up to [`COMMIT_NOTICE_WAIT`] later when no
/// write follows. Hibernation heartbeats are never held, and neither is a
/// notice that ends the input (a one-request probe).
fn one_at_a_time<'s, S>(
    peer: &'s mut PeerClient,
    input: S,
    option: RPCOption,
) -> BoxFuture<'s, Result<BoxStream<'s, Appended>, RPCError<TypeConfig>>>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
{
    let strm = futures::stream::unfold(Some((peer, input)), move |state| {
        let option = option.clone();
        async move {
            let (peer, mut input) = state?;
            let mut req = input.next().await?;
            let mut input_done = false;
            if req.entries.is_empty()
                && !peer.hibernating.load(std::sync::atomic::Ordering::Relaxed)
            {
                let until = tokio::time::Instant::now() + COMMIT_NOTICE_WAIT;
                while req.entries.is_empty() {
                    match tokio::time::timeout_at(until, input.next()).await {
                        // A later request carries a commit index at least
                        // as new, from the same previous log id on.
                        Ok(Some(next)) => req = next,
                        Ok(None) => {
                            input_done = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            let (prev, last) = covered(&req);
            match peer.append_entries(req, option).await {
                Ok(resp) => {
                    let (result, more) = stream_result(resp, prev, last);
                    let more = more && !input_done;
                    Some((Ok(result), more.then_some((peer, input))))
                }
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    let strm: BoxStream<'s, Appended> = Box::pin(strm);
    Box::pin(async move { Ok(strm) })
}

/// A peer that is down, hosts no replica of the range, or whose replica
/// refuses to serve (it faulted: `DataLoss`) is unreachable for the range:
/// openraft then backs off between tries instead of retrying at once, which
/// for a faulted voter would spin until the placement driver removes it.
fn status_to_rpc_error(status: tonic::Status) -> RPCError<TypeConfig> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::NotFound | tonic::Code::DataLoss => {
            RPCError::Unreachable(unreachable(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            )))
        }
        _ => RPCError::Network(NetworkError::from_string(format!(
            "{:?}: {}",
            status.code(),
            status.message()
        ))),
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    /// With a pipeline deeper than one on the peer's append stream, the
    /// range's appends go as [`Pipeline`] sends them; otherwise one at a
    /// time, each when the last is answered (openraft's sequential way).
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Appended>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        let stream = match &self.stream {
            Some(s) if self.pipeline > 1 => s.clone(),
            _ => return one_at_a_time(self, input, option),
        };
        let pipeline = Pipeline {
            ttl: option.hard_ttl().max(self.rpc_timeout_min),
            peer: self,
            stream,
            input,
            input_done: false,
            in_flight: VecDeque::new(),
            held: None,
        };
        Box::pin(async move { Ok(pipeline.into_stream()) })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let hibernate =
            rpc.entries.is_empty() && self.hibernating.load(std::sync::atomic::Ordering::Relaxed);
        let stream = self.stream.clone();
        let proof = self.quorum_proof(&rpc);
        self.call(&rpc, &option, |mut c, mut m| async move {
            m.hibernate = hibernate;
            if let Some(s) = stream.filter(|_| m.payload.len() <= APPEND_STREAM_PAYLOAD_BYTES_MAX) {
                if let Some(rx) = s.call(m.clone(), proof) {
                    match rx.await {
                        Ok(Ok(reply)) => return Ok(tonic::Response::new(reply)),
                        Ok(Err(StreamError::Failed(status))) => return Err(status),
                        // Refused (the stream is full) or the driver is
                        // gone: the append goes alone.
                        _ => {}
                    }
                }
            }
            // No proof of freshness on a unary call (see `quorum_proof`).
            c.append_entries(m).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, &option, |mut c, m| async move { c.vote(m).await })
            .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, &option, |mut c, m| async move { c.pre_vote(m).await })
            .await
    }

    async fn transfer_leader(
        &mut self,
        req: openraft::raft::TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<openraft::raft::TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&req, &option, |mut c, m| async move {
            c.transfer_leader(m).await
        })
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self
            .client()
            .map_err(|e| StreamingError::Unreachable(unreachable(e)))?;
        let header = encode(&(vote, snapshot.meta.clone()))
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(SNAPSHOT_STREAM_CHUNKS_MAX);
        let (range_id, from, to) = (self.range_id, self.from, self.target);
        let path = snapshot.snapshot.path.clone();
        let inline = self.inline_reads;
        let reader = tokio::spawn(async move {
            let mut file = SnapshotReader::open(&path, inline).await?;
            let mut offset = 0u64;
            let mut header = Some(Bytes::from(header));
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                let mut filled = 0;
                while filled < buf.len() {
                    let n = file.read(&mut buf[filled..]).await?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                let done = filled < SNAPSHOT_CHUNK_BYTES;
                let chunk = SnapshotChunk {
                    range_id,
                    from_node: from,
                    to_node: to,
                    header: header.take().unwrap_or_default(),
                    offset,
                    crc32: crc32fast::hash(&buf),
                    data: Bytes::from(buf),
                    done,
                };
                offset += filled as u64;
                if tx.send(chunk).await.is_err() || done {
                    return Ok::<u64, std::io::Error>(offset);
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let call = async {
            tokio::time::timeout(
                option.hard_ttl().max(Duration::from_secs(600)),
                client.install_snapshot(stream),
            )
            .await
        };
        let resp = tokio::select! {
            closed = cancel => {
                reader.abort();
                return Err(StreamingError::Closed(closed));
            }
            r = call => r,
        };
        let sent = reader.await;
        let resp = match resp {
            Err(_) => {
                return Err(StreamingError::Network(NetworkError::from_string(
                    "snapshot transfer timed out",
                )))
            }
            Ok(Err(status)) => {
                self.note_refusal(&status);
                return Err(StreamingError::Network(NetworkError::from_string(format!(
                    "snapshot transfer failed: {:?}: {}",
                    status.code(),
                    status.message()
                ))));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        match sent {
            Ok(Ok(bytes)) => tracing::info!(range_id, to, bytes, "sent snapshot"),
            Ok(Err(e)) => {
                return Err(StreamingError::Network(NetworkError::from_string(format!(
                    "reading snapshot file: {e}"
                ))))
            }
            Err(e) => {
                return Err(StreamingError::Network(NetworkError::from_string(format!(
                    "snapshot reader task: {e}"
                ))))
            }
        }
        if crc32fast::hash(&resp.payload) != resp.crc32 {
            return Err(StreamingError::Network(NetworkError::from_string(
                "snapshot response checksum mismatch",
            )));
        }
        decode("snapshot response", &resp.payload)
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::replica::tests::status_once;
    use crate::raft::service::tests::serve_follower;
    use openraft::alias::{EntryOf, LeaderIdOf};
    use openraft::vote::RaftLeaderId;
    use std::sync::atomic::{AtomicBool, Ordering};

    const RANGE: u64 = 9;

    fn log_id(index: u64) -> LogIdOf<TypeConfig> {
        LogIdOf::<TypeConfig>::new(LeaderIdOf::<TypeConfig>::new(1, 1).to_committed(), index)
    }

    /// Node 1's append, as leader of term 1, of the blank entries
    /// `entries` after `prev`, telling the follower `commit` is committed.
    fn append(
        prev: Option<u64>,
        entries: std::ops::Range<u64>,
        commit: Option<u64>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: VoteOf::<TypeConfig>::new_committed(1, 1),
            prev_log_id: prev.map(log_id),
            entries: entries
                .map(|i| EntryOf::<TypeConfig>::new_blank(log_id(i)))
                .collect(),
            leader_commit: commit.map(log_id),
        }
    }

    /// The index the follower acknowledged, or what went wrong.
    async fn next_ack(results: &mut BoxStream<'_, Appended>) -> Result<Option<u64>, String> {
        let r = tokio::time::timeout(Duration::from_secs(10), results.next())
            .await
            .map_err(|_| "no answer in time".to_string())?
            .ok_or("the result stream ended")?;
        match r {
            Ok(Ok(matching)) => Ok(matching.map(|l| l.index)),
            other => Err(format!("{other:?}")),
        }
    }

    /// A leader's entry-less commit notice is dropped when the range's next
    /// append is already waiting (that append carries the commit index and
    /// its answer covers both), is sent on its own when nothing follows,
    /// and is never held while the leader hibernates. The follower is node
    /// 2's real replica behind its real Raft service.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_notice_gives_way_to_the_next_append_and_goes_alone_otherwise() {
        let f = serve_follower(RANGE).await;
        let (follower, server, channel) = (f.replica.clone(), f.server, f.channel);
        let hibernating = Arc::new(AtomicBool::new(false));
        let mut peer = PeerClient {
            stream: Some(Arc::new(AppendStream::start(channel.clone()))),
            channel: Ok(channel),
            range_id: RANGE,
            from: 1,
            target: 2,
            hibernating: hibernating.clone(),
            faulted_peers: Arc::default(),
            metrics: GroupMetrics::default(),
            inline_reads: false,
            rpc_timeout_min: RAFT_RPC_TIMEOUT_MIN,
            pipeline: 1,
        };
        let (input, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut results = one_at_a_time(
            &mut peer,
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            RPCOption::new(Duration::from_secs(5)),
        )
        .await
        .unwrap();

        // Entries 0..=4, then a notice that 4 is committed with the next
        // append (5..=9, committing 4 as well) already queued behind it: the
        // next answer is the append's.
        input.send(append(None, 0..5, None)).unwrap();
        input.send(append(Some(4), 5..5, Some(4))).unwrap();
        input.send(append(Some(4), 5..10, Some(4))).unwrap();
        assert_eq!(next_ack(&mut results).await, Ok(Some(4)));
        assert_eq!(
            next_ack(&mut results).await,
            Ok(Some(9)),
            "the notice went on its own"
        );
        let s = status_once(&follower, |s| s.last_log_index >= 9 && s.commit_index >= 4).await;
        assert_eq!((s.last_log_index, s.commit_index), (9, 4));

        // Two notices and nothing after them: the newer one goes, after
        // the wait, and the follower learns that 9 is committed.
        input.send(append(Some(9), 10..10, Some(8))).unwrap();
        input.send(append(Some(9), 10..10, Some(9))).unwrap();
        assert_eq!(next_ack(&mut results).await, Ok(Some(9)));
        let s = status_once(&follower, |s| s.commit_index >= 9).await;
        assert_eq!(s.commit_index, 9);

        // While the leader hibernates a notice goes at once, even with an
        // append queued behind it: each is answered on its own.
        hibernating.store(true, Ordering::Relaxed);
        input.send(append(Some(9), 10..10, Some(9))).unwrap();
        input.send(append(Some(9), 10..12, Some(9))).unwrap();
        assert_eq!(next_ack(&mut results).await, Ok(Some(9)));
        assert_eq!(next_ack(&mut results).await, Ok(Some(11)));

        // A notice that ends the input goes at once, and the results end
        // with its answer.
        hibernating.store(false, Ordering::Relaxed);
        input.send(append(Some(11), 12..12, Some(11))).unwrap();
        drop(input);
        assert_eq!(next_ack(&mut results).await, Ok(Some(11)));
        let s = status_once(&follower, |s| s.commit_index >= 11).await;
        assert_eq!(s.commit_index, 11);
        assert!(results.next().await.is_none());

        drop(results);
        follower.shutdown().await;
        server.abort();
    }

    /// A follower whose replica faulted refuses appends as `DataLoss`: the
    /// leader's side sees it unreachable (so openraft backs off) and notes
    /// the peer as faulted, from that moment on, for a replica change
    /// waiting on it; a healthy peer's answers note nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_faulted_peer_is_unreachable_and_noted_as_faulted() {
        let f = serve_follower(RANGE).await;
        let faulted_peers = Arc::new(FaultedPeers::default());
        let mut peer = PeerClient {
            stream: Some(Arc::new(AppendStream::start(f.channel.clone()))),
            channel: Ok(f.channel.clone()),
            range_id: RANGE,
            from: 1,
            target: 2,
            hibernating: Arc::new(AtomicBool::new(false)),
            faulted_peers: faulted_peers.clone(),
            metrics: GroupMetrics::default(),
            inline_reads: false,
            rpc_timeout_min: RAFT_RPC_TIMEOUT_MIN,
            pipeline: 1,
        };
        let opt = || RPCOption::new(Duration::from_secs(5));
        let before = std::time::Instant::now();
        peer.append_entries(append(None, 0..2, None), opt())
            .await
            .expect("a healthy follower takes the append");
        assert!(!faulted_peers.refused_since(2, before));

        let _ = f.replica.refuse(&crate::storage::StorageError::Corruption(
            "injected by the test".into(),
        ));
        let faulted_at = std::time::Instant::now();
        let e = peer
            .append_entries(append(Some(1), 2..3, None), opt())
            .await
            .expect_err("a faulted follower refuses the append");
        assert!(
            matches!(e, RPCError::Unreachable(_)),
            "unreachable, not {e:?}"
        );
        assert!(faulted_peers.refused_since(2, before));
        assert!(faulted_peers.refused_since(2, faulted_at));
        assert!(
            !faulted_peers.refused_since(3, before),
            "only the peer that refused"
        );
        assert!(
            !faulted_peers.refused_since(2, std::time::Instant::now() + Duration::from_secs(1)),
            "a refusal counts from when it came"
        );
        f.server.abort();
    }

    /// The record of faulted peers stays bounded: past its size the
    /// oldest refusal goes first.
    #[test]
    fn faulted_peers_are_bounded_and_drop_the_oldest() {
        let p = FaultedPeers::default();
        let t0 = std::time::Instant::now();
        p.note(0);
        std::thread::sleep(Duration::from_millis(2));
        for id in 1..FAULTED_PEERS_MAX as u64 {
            p.note(id);
        }
        p.note(1_000);
        assert_eq!(p.0.lock().unwrap().len(), FAULTED_PEERS_MAX);
        assert!(p.refused_since(1_000, t0));
        assert!(!p.refused_since(0, t0), "the oldest refusal was dropped");
        assert!(p.refused_since(1, t0));
    }
}
