//! Incoming Raft transport: the gRPC `Raft` service, which routes each message
//! to the replica of the range it names.

use std::sync::Arc;

use bytes::Bytes;
use lmskv_proto::error::Error;
use lmskv_proto::v1::raft_server::Raft;
use lmskv_proto::v1::{RaftMessage, RaftStreamFrame, SnapshotChunk};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::replica::{RangeReplica, ReplicaMap};

/// Appends of one `AppendStream` served at once; the stream is read no
/// further until one is done (back-pressure on the sending peer).
const APPEND_STREAM_CALLS_MAX: usize = 512;
/// Replies of one `AppendStream` waiting to be written to it.
const APPEND_STREAM_REPLIES_MAX: usize = 512;

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

    /// Refuses a snapshot whose span overlaps another ready range on this
    /// node: that range has not applied the split that created this one yet,
    /// and installing now would let its older entries overwrite newer data.
    /// The sender retries; by then the other range has caught up.
    fn check_snapshot_span(
        &self,
        replica: &RangeReplica,
        path: &std::path::Path,
    ) -> Result<(), Error> {
        let incoming = super::state_machine::snapshot_meta(path)
            .map_err(|e| Error::invalid_argument("snapshot", e.to_string()))?;
        for other in self.replicas.all() {
            if other.range_id() == replica.range_id() || !other.is_ready() {
                continue;
            }
            let m = other.effective_span();
            if lmskv_proto::range::spans_overlap((&m.0, &m.1), (&incoming.start, &incoming.end)) {
                return Err(Error::unavailable(format!(
                    "snapshot of range {} overlaps local range {} that has not caught up yet; retry",
                    replica.range_id(),
                    other.range_id()
                )));
            }
        }
        Ok(())
    }

    fn reply(&self, msg: &RaftMessage, payload: Vec<u8>) -> Response<RaftMessage> {
        Response::new(RaftMessage {
            range_id: msg.range_id,
            from_node: self.node_id,
            to_node: msg.from_node,
            crc32: crc32fast::hash(&payload),
            payload: Bytes::from(payload),
            hibernate: false,
        })
    }

    /// Serves one frame of an append stream as a unary AppendEntries.
    async fn stream_append(&self, frame: RaftStreamFrame) -> RaftStreamFrame {
        let call_id = frame.call_id;
        let served = match frame.message {
            Some(msg) => Raft::append_entries(self, Request::new(msg))
                .await
                .map(Response::into_inner),
            None => Err(Error::invalid_argument("message", "frame carries no message").into()),
        };
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
            let mut open = true;
            loop {
                tokio::select! {
                    f = inbound.next(), if open && running.len() < APPEND_STREAM_CALLS_MAX => match f {
                        Some(Ok(frame)) => {
                            let svc = svc.clone();
                            running.push(async move { svc.stream_append(frame).await });
                        }
                        // The peer closed or broke its side: finish what runs.
                        Some(Err(_)) | None => open = false,
                    },
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
        let out = r.handle_append(&msg.payload, msg.hibernate).await?;
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
        if let Err(e) = self.check_snapshot_span(&replica, &path) {
            remove_file(&path, inline).await;
            return Err(e.into());
        }
        let result = replica.handle_snapshot(&header, path.clone()).await;
        // On success the state machine moved the file; on failure drop it.
        if result.is_err() {
            remove_file(&path, inline).await;
        }
        let payload = result?;
        Ok(Response::new(RaftMessage {
            range_id: replica.range_id(),
            from_node: self.node_id,
            to_node: 0,
            crc32: crc32fast::hash(&payload),
            payload: Bytes::from(payload),
            hibernate: false,
        }))
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
