//! Incoming Raft transport: the gRPC `Raft` service, which routes each message
//! to the replica of the range it names.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use lmskv_proto::error::Error;
use lmskv_proto::v1::raft_server::Raft;
use lmskv_proto::v1::{RaftMessage, RaftStreamFrame, SnapshotChunk};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::replica::{AppendPipe, PipeRefusal, PipedReply, RangeReplica, ReplicaMap};

/// Appends of one `AppendStream` served at once; the stream is read no
/// further until one is done (back-pressure on the sending peer).
const APPEND_STREAM_CALLS_MAX: usize = 512;
/// Replies of one `AppendStream` waiting to be written to it.
const APPEND_STREAM_REPLIES_MAX: usize = 512;
/// How often an `AppendStream` drops the append pipes of parked, removed
/// or ended ranges.
const APPEND_PIPES_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves Raft messages for every range hosted by this node.
#[derive(Debug, Clone)]
pub struct RaftService {
    node_id: u64,
    replicas: Arc<ReplicaMap>,
}

impl RaftService {
    /// A service for `replicas` of node `node_id`.
    pub fn new(node_id: u64, replicas: Arc<ReplicaMap>) -> Self {
        RaftService { node_id, replicas }
    }

    async fn route(&self, msg: &RaftMessage) -> Result<Arc<RangeReplica>, Status> {
        if msg.to_node != self.node_id {
            return Err(Error::invalid_argument(
                "to_node",
                format!(
                    "message for node {} reached node {}",
                    msg.to_node, self.node_id
                ),
            )
            .into());
        }
        if crc32fast::hash(&msg.payload) != msg.crc32 {
            return Err(Error::invalid_argument("payload", "checksum mismatch").into());
        }
        Ok(self.replicas.get_or_create(msg.range_id).await?)
    }

    /// Claims the snapshot's span for its install, refusing it while the
    /// span overlaps another range that is ready on this node (it has not
    /// applied the split that created this one yet, and installing now would
    /// let its older entries overwrite newer data) or that is being
    /// installed or removed here right now (two installs of overlapping
    /// spans, or a removal deleting data under an install). The sender
    /// retries; by then the other range has caught up or finished.
    fn claim_snapshot_span(
        &self,
        replica: &RangeReplica,
        path: &std::path::Path,
    ) -> Result<super::replica::SpanClaim, Error> {
        let incoming = super::state_machine::snapshot_meta(path)
            .map_err(|e| Error::invalid_argument("snapshot", e.to_string()))?;
        self.replicas
            .claim_span(replica.range_id(), &incoming.start, &incoming.end)
            .map_err(|other| {
                Error::unavailable(format!(
                    "snapshot of range {} overlaps local range {other}, which has not caught up yet or is being installed or removed; retry",
                    replica.range_id(),
                ))
            })
    }

    fn reply(&self, msg: &RaftMessage, payload: Vec<u8>) -> Response<RaftMessage> {
        Response::new(reply_message(
            msg.range_id,
            self.node_id,
            msg.from_node,
            payload,
        ))
    }

    /// Serves one frame of an append stream as a unary AppendEntries.
    async fn stream_append(&self, frame: RaftStreamFrame) -> RaftStreamFrame {
        let served = match frame.message {
            Some(msg) => Raft::append_entries(self, Request::new(msg))
                .await
                .map(Response::into_inner),
            None => Err(Error::invalid_argument("message", "frame carries no message").into()),
        };
        frame_of(frame.call_id, served)
    }

    /// Serves one frame of an append stream: through the pipe of its range
    /// when the range's group is live, so that its appends reach the group
    /// in the order they came; alone otherwise (a parked group is loaded,
    /// a range this node does not host yet is created, a bad frame is
    /// answered with its error).
    fn serve_frame(
        &self,
        frame: RaftStreamFrame,
        pipes: &mut Pipes,
    ) -> BoxFuture<'static, RaftStreamFrame> {
        let call_id = frame.call_id;
        if let Some(msg) = &frame.message {
            if let Some(sent) = self.pipe(msg, pipes) {
                let (range_id, to_node) = (msg.range_id, msg.from_node);
                let me = self.node_id;
                return Box::pin(async move {
                    let served = match sent {
                        Ok(answer) => match answer.await {
                            Ok(Ok(payload)) => Ok(reply_message(range_id, me, to_node, payload)),
                            Ok(Err(e)) => Err(e.into()),
                            Err(_) => {
                                Err(Status::unavailable("the append pipe dropped the append"))
                            }
                        },
                        Err(status) => Err(status),
                    };
                    frame_of(call_id, served)
                });
            }
        }
        let svc = self.clone();
        Box::pin(async move { svc.stream_append(frame).await })
    }

    /// Sends `msg` into its range's pipe, opening one when needed; `None`
    /// when it is to be served alone.
    fn pipe(&self, msg: &RaftMessage, pipes: &mut Pipes) -> Option<Result<PipedReply, Status>> {
        // A message that `route` refuses is served alone, to be refused there.
        if msg.to_node != self.node_id || crc32fast::hash(&msg.payload) != msg.crc32 {
            return None;
        }
        let replica = self.replicas.get(msg.range_id).ok()?;
        for _ in 0..2 {
            let stale = pipes
                .get(&msg.range_id)
                .is_some_and(|(r, _)| !Arc::ptr_eq(r, &replica));
            if stale || !pipes.contains_key(&msg.range_id) {
                let pipe = replica.open_append_pipe()?;
                pipes.insert(msg.range_id, (replica.clone(), pipe));
            }
            let (_, pipe) = pipes.get(&msg.range_id)?;
            match pipe.send(
                &replica,
                &msg.payload,
                msg.hibernate,
                msg.quorum_acked_age_us,
            ) {
                Ok(answer) => return Some(Ok(answer)),
                Err(PipeRefusal::Refused(e)) => return Some(Err(e.into())),
                Err(PipeRefusal::Ended) => {
                    pipes.remove(&msg.range_id);
                }
            }
        }
        None
    }

    /// Drops the pipes of ranges this node no longer hosts, of parked
    /// groups and those that ended, so that idle ranges keep no pipe (and
    /// no task) for long.
    fn prune_pipes(&self, pipes: &mut Pipes) {
        pipes.retain(|id, (r, pipe)| {
            !pipe.is_ended()
                && !r.is_parked()
                && self.replicas.get(*id).is_ok_and(|now| Arc::ptr_eq(r, &now))
        });
    }
}

/// The append pipes of one append stream, by range.
type Pipes = HashMap<u64, (Arc<RangeReplica>, AppendPipe)>;

/// A reply of node `from_node` to `to_node` about range `range_id`.
fn reply_message(range_id: u64, from_node: u64, to_node: u64, payload: Vec<u8>) -> RaftMessage {
    RaftMessage {
        range_id,
        from_node,
        to_node,
        crc32: crc32fast::hash(&payload),
        payload: Bytes::from(payload),
        hibernate: false,
        quorum_acked_age_us: None,
    }
}

/// The reply frame of call `call_id`.
fn frame_of(call_id: u64, served: Result<RaftMessage, Status>) -> RaftStreamFrame {
    match served {
        Ok(m) => RaftStreamFrame {
            call_id,
            message: Some(m),
            ..Default::default()
        },
        Err(s) => RaftStreamFrame {
            call_id,
            error_code: s.code() as i32,
            error_message: s.message().to_string(),
            ..Default::default()
        },
    }
}

#[tonic::async_trait]
impl Raft for RaftService {
    type AppendStreamStream = futures::stream::BoxStream<'static, Result<RaftStreamFrame, Status>>;

    async fn append_stream(
        &self,
        req: Request<Streaming<RaftStreamFrame>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        use futures::stream::FuturesUnordered;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(APPEND_STREAM_REPLIES_MAX);
        let svc = self.clone();
        tokio::spawn(async move {
            let mut running = FuturesUnordered::new();
            let mut pipes = Pipes::new();
            let mut prune = tokio::time::interval(APPEND_PIPES_PRUNE_EVERY);
            prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut open = true;
            loop {
                tokio::select! {
                    f = inbound.next(), if open && running.len() < APPEND_STREAM_CALLS_MAX => match f {
                        Some(Ok(frame)) => running.push(svc.serve_frame(frame, &mut pipes)),
                        // The peer closed or broke its side: finish what runs.
                        Some(Err(_)) | None => open = false,
                    },
                    _ = prune.tick(), if open => svc.prune_pipes(&mut pipes),
                    Some(reply) = running.next(), if !running.is_empty() => {
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                    else => return,
                }
            }
        });
        Ok(Response::new(futures::StreamExt::boxed(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let msg = req.into_inner();
        let r = self.route(&msg).await?;
        let out = r
            .handle_append(&msg.payload, msg.hibernate, msg.quorum_acked_age_us)
            .await?;
        Ok(self.reply(&msg, out))
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = req.into_inner();
        let r = self.route(&msg).await?;
        let out = r.handle_vote(&msg.payload).await?;
        Ok(self.reply(&msg, out))
    }

    async fn pre_vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = req.into_inner();
        let r = self.route(&msg).await?;
        let out = r.handle_pre_vote(&msg.payload).await?;
        Ok(self.reply(&msg, out))
    }

    async fn transfer_leader(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let msg = req.into_inner();
        let r = self.route(&msg).await?;
        let out = r.handle_transfer_leader(&msg.payload).await?;
        Ok(self.reply(&msg, out))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut stream = req.into_inner();
        let first = match stream.next().await {
            Some(c) => c?,
            None => return Err(Error::invalid_argument("stream", "empty snapshot stream").into()),
        };
        if first.to_node != self.node_id {
            return Err(Error::invalid_argument("to_node", "snapshot for another node").into());
        }
        let replica = self.replicas.get_or_create(first.range_id).await?;
        let header = first.header.clone();
        if header.is_empty() {
            return Err(Error::invalid_argument("header", "first chunk carries no header").into());
        }
        let path = replica.incoming_snapshot_path();
        let inline = replica.engine().runs_inline();
        let received = receive_chunks(first, &mut stream, &path, inline).await;
        let bytes = match received {
            Ok(b) => b,
            Err(e) => {
                remove_file(&path, inline).await;
                return Err(e.into());
            }
        };
        tracing::info!(range_id = replica.range_id(), bytes, "received snapshot");
        let claim = match self.claim_snapshot_span(&replica, &path) {
            Ok(claim) => claim,
            Err(e) => {
                remove_file(&path, inline).await;
                return Err(e.into());
            }
        };
        // The install runs on its own task holding the claim: a sender that
        // gives up drops this call, but openraft has queued the install by
        // then and it goes on, so the claim must last as long as it does.
        let result = {
            let (replica, path) = (replica.clone(), path.clone());
            tokio::spawn(async move {
                let _claim = claim;
                let result = replica.handle_snapshot(&header, path).await;
                // openraft's call can end (its group shut down) while the
                // blocking import still writes into the span.
                replica.installs_idle().await;
                result
            })
            .await
            .unwrap_or_else(|e| Err(Error::internal(format!("snapshot install task: {e}"))))
        };
        // On success the state machine moved the file; on failure drop it.
        if result.is_err() {
            remove_file(&path, inline).await;
        }
        let payload = result?;
        Ok(Response::new(reply_message(
            replica.range_id(),
            self.node_id,
            0,
            payload,
        )))
    }
}

/// Removes a received snapshot file that will not be installed (inline: on
/// this task, see `Engine::runs_inline`).
async fn remove_file(path: &std::path::Path, inline: bool) {
    if inline {
        let _ = std::fs::remove_file(path);
    } else {
        let _ = tokio::fs::remove_file(path).await;
    }
}

/// A snapshot file being received: written through tokio (each write on a
/// blocking thread), or with plain writes on the receiving task (inline).
enum SnapshotWriter {
    Threaded(tokio::fs::File),
    Inline(std::fs::File),
}

impl SnapshotWriter {
    async fn create(path: &std::path::Path, inline: bool) -> std::io::Result<Self> {
        Ok(if inline {
            SnapshotWriter::Inline(std::fs::File::create(path)?)
        } else {
            SnapshotWriter::Threaded(tokio::fs::File::create(path).await?)
        })
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            SnapshotWriter::Threaded(f) => f.write_all(data).await,
            SnapshotWriter::Inline(f) => std::io::Write::write_all(f, data),
        }
    }

    async fn sync_all(&mut self) -> std::io::Result<()> {
        match self {
            SnapshotWriter::Threaded(f) => f.sync_all().await,
            SnapshotWriter::Inline(f) => f.sync_all(),
        }
    }
}

/// Writes the chunks of one snapshot stream to `path`, checking order and
/// checksums; `inline` as in `Engine::runs_inline`.
async fn receive_chunks(
    first: SnapshotChunk,
    stream: &mut Streaming<SnapshotChunk>,
    path: &std::path::Path,
    inline: bool,
) -> Result<u64, Error> {
    let io = |e: std::io::Error| Error::internal(format!("writing snapshot: {e}"));
    let mut file = SnapshotWriter::create(path, inline).await.map_err(io)?;
    let mut offset = 0u64;
    let mut chunk = first;
    loop {
        if chunk.offset != offset {
            return Err(Error::invalid_argument(
                "offset",
                format!("expected chunk at {offset}, got {}", chunk.offset),
            ));
        }
        if crc32fast::hash(&chunk.data) != chunk.crc32 {
            return Err(Error::invalid_argument(
                "data",
                "snapshot chunk checksum mismatch",
            ));
        }
        file.write_all(&chunk.data).await.map_err(io)?;
        offset += chunk.data.len() as u64;
        if chunk.done {
            break;
        }
        chunk = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(s)) => {
                return Err(Error::unavailable(format!(
                    "snapshot stream: {}",
                    s.message()
                )))
            }
            None => {
                return Err(Error::unavailable(
                    "snapshot stream ended before its last chunk",
                ))
            }
        };
    }
    file.sync_all().await.map_err(io)?;
    Ok(offset)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::raft::codec::{decode, encode};
    use crate::raft::replica::tests::{small_engine, status_once, tuning};
    use crate::raft::stream::AppendStream;
    use crate::raft::{PeerPool, TypeConfig};
    use lmskv_proto::v1::raft_server::RaftServer;
    use openraft::alias::{EntryOf, LeaderIdOf, LogIdOf, VoteOf};
    use openraft::entry::RaftEntry;
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
    use openraft::vote::RaftLeaderId;
    use std::time::Duration;

    const RANGE: u64 = 7;

    /// Node 2 with a fresh replica of `range` (not initialized: it follows
    /// whichever leader appends first), behind its real Raft service on a
    /// free loopback port.
    pub(crate) struct Follower {
        /// Holds the replica's data; removed when the follower is dropped.
        pub _dir: tempfile::TempDir,
        pub replica: Arc<RangeReplica>,
        pub server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
        /// A lazily connecting channel to the service.
        pub channel: tonic::transport::Channel,
    }

    pub(crate) async fn serve_follower(range: u64) -> Follower {
        let dir = tempfile::tempdir().unwrap();
        let replica = RangeReplica::open(
            small_engine(dir.path()),
            PeerPool::new(2, None, false, 1),
            range,
            dir.path(),
            tuning(),
            Arc::new(|_| {}),
        )
        .await
        .unwrap();
        let replicas = Arc::new(ReplicaMap::default());
        replicas.insert(replica.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServer::new(RaftService::new(2, replicas)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        Follower {
            _dir: dir,
            replica,
            server,
            channel,
        }
    }

    fn log_id(index: u64) -> LogIdOf<TypeConfig> {
        LogIdOf::<TypeConfig>::new(LeaderIdOf::<TypeConfig>::new(1, 1).to_committed(), index)
    }

    /// Node 1's append to node 2 of the blank entries `first..=last`,
    /// after `prev`, as leader of term 1.
    fn append(prev: Option<u64>, first: u64, last: u64) -> RaftMessage {
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: VoteOf::<TypeConfig>::new_committed(1, 1),
            prev_log_id: prev.map(log_id),
            entries: (first..=last)
                .map(|i| EntryOf::<TypeConfig>::new_blank(log_id(i)))
                .collect(),
            leader_commit: None,
        };
        let payload = Bytes::from(encode(&req).unwrap());
        RaftMessage {
            range_id: RANGE,
            from_node: 1,
            to_node: 2,
            crc32: crc32fast::hash(&payload),
            payload,
            hibernate: false,
            quorum_acked_age_us: None,
        }
    }

    async fn answer(rx: tokio::sync::oneshot::Receiver<super::super::stream::Reply>) -> String {
        let reply = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("answered in time")
            .expect("the driver answers every call")
            .expect("the follower serves the append");
        let resp: AppendEntriesResponse<TypeConfig> =
            decode("append response", &reply.payload).unwrap();
        resp.to_string()
    }

    /// A leader's appends of one range, sent back to back on an append
    /// stream without waiting for answers (a pipelined leader), reach the
    /// follower's group in the order they were sent: every one is accepted,
    /// none refused as a conflict for a gap a later append would leave if
    /// it overtook an earlier one. An append the group refuses ends the
    /// range's pipe, and the next append, in order again, is served by a
    /// new one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_streams_appends_reach_the_group_in_the_order_sent() {
        let f = serve_follower(RANGE).await;
        let (replica, server) = (f.replica.clone(), f.server);
        let stream = AppendStream::start(f.channel);

        // As many at once as a leader keeps in flight at most.
        const APPENDS: u64 = 10 * crate::raft::APPEND_PIPELINE_MAX as u64;
        for burst in (0..APPENDS).step_by(crate::raft::APPEND_PIPELINE_MAX) {
            let sent: Vec<_> = (burst..burst + crate::raft::APPEND_PIPELINE_MAX as u64)
                .map(|i| {
                    let m = append(i.checked_sub(1), i, i);
                    (
                        i,
                        stream.call(m, None).expect("the stream takes the append"),
                    )
                })
                .collect();
            for (i, rx) in sent {
                let a = answer(rx).await;
                assert_eq!(a, "Success", "append {i} was answered {a}");
            }
        }
        let s = status_once(&replica, |s| s.last_log_index >= APPENDS - 1).await;
        assert_eq!(s.last_log_index, APPENDS - 1);

        // An append after entries the follower lacks is refused; the pipe
        // that served it has ended.
        let gap = answer(
            stream
                .call(append(Some(APPENDS + 10), APPENDS + 11, APPENDS + 11), None)
                .unwrap(),
        )
        .await;
        assert_eq!(gap, "Conflict");
        // The next ones, in order, are served (by a new pipe).
        for i in APPENDS..APPENDS + 3 {
            let a = answer(stream.call(append(Some(i - 1), i, i), None).unwrap()).await;
            assert_eq!(
                a, "Success",
                "append {i} after the refusal was answered {a}"
            );
        }
        let s = status_once(&replica, |s| s.last_log_index >= APPENDS + 2).await;
        assert_eq!(s.last_log_index, APPENDS + 2);

        replica.shutdown().await;
        server.abort();
    }
}
