//! Outgoing Raft transport: one HTTP/2 channel per peer node, shared by every
//! range, with the range id in every message.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lmskv_proto::limits::GRPC_MESSAGE_BYTES_MAX;
use lmskv_proto::v1::raft_client::RaftClient;
use lmskv_proto::v1::{RaftMessage, SnapshotChunk};
use openraft::alias::{SnapshotOf, VoteOf};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::RaftNetworkV2;
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, Endpoint};

use super::codec::{decode, encode};
use super::state_machine::SnapshotFile;
use super::stream::{is_refusal, AppendStream, APPEND_STREAM_PAYLOAD_BYTES_MAX};
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
    /// to each peer share one long-lived stream (see [`super::stream`]).
    pub fn new(
        local_id: u64,
        source_ip: Option<std::net::IpAddr>,
        append_stream: bool,
    ) -> Arc<Self> {
        Arc::new(PeerPool {
            local_id,
            source_ip,
            channels: Mutex::new(HashMap::new()),
            maker: None,
            inline_reads: false,
            rpc_timeout_min: RAFT_RPC_TIMEOUT_MIN,
            append_stream,
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

/// Creates per-peer Raft clients for one range.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    pub(crate) pool: Arc<PeerPool>,
    pub(crate) range_id: u64,
    /// Set while the range's leader hibernates (see `RangeReplica::hibernate`).
    pub(crate) hibernating: Arc<std::sync::atomic::AtomicBool>,
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
            inline_reads: self.pool.inline_reads,
            rpc_timeout_min: self.pool.rpc_timeout_min,
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
    /// See [`PeerPool::with_channel_maker`].
    inline_reads: bool,
    /// See [`PeerPool::with_channel_maker`].
    rpc_timeout_min: Duration,
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
        }
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
            Ok(Err(status)) => return Err(status_to_rpc_error(status)),
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

fn status_to_rpc_error(status: tonic::Status) -> RPCError<TypeConfig> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::NotFound => RPCError::Unreachable(unreachable(
            format!("{:?}: {}", status.code(), status.message()),
        )),
        _ => RPCError::Network(NetworkError::from_string(format!(
            "{:?}: {}",
            status.code(),
            status.message()
        ))),
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let hibernate =
            rpc.entries.is_empty() && self.hibernating.load(std::sync::atomic::Ordering::Relaxed);
        let stream = self.stream.clone();
        self.call(&rpc, &option, |mut c, mut m| async move {
            m.hibernate = hibernate;
            if let Some(s) = stream.filter(|_| m.payload.len() <= APPEND_STREAM_PAYLOAD_BYTES_MAX) {
                if let Some(rx) = s.call(m.clone()) {
                    match rx.await {
                        Ok(Ok(reply)) => return Ok(tonic::Response::new(reply)),
                        Ok(Err(status)) if !is_refusal(&status) => return Err(status),
                        // Refused (the stream is full) or the driver is
                        // gone: the append goes alone.
                        _ => {}
                    }
                }
            }
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
                return Err(StreamingError::Network(NetworkError::from_string(format!(
                    "snapshot transfer failed: {:?}: {}",
                    status.code(),
                    status.message()
                ))))
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
