//! Outgoing appends over one long-lived stream per peer (`Raft.AppendStream`).
//!
//! Every range's AppendEntries to a peer (entries and heartbeats) share one
//! bidirectional gRPC stream instead of one HTTP/2 request each: a request is
//! a frame on the stream, its reply a frame back, paired by a call id. This
//! saves the per-request work of both ends (HTTP/2 stream set-up, headers
//! and trailers, a server task per request). The peer serves the frames of a
//! stream concurrently, so ranges do not wait for one another, and each
//! range's in the order they came (see `AppendPipe`), so a leader may keep
//! several appends of a range in flight (see `Pipeline` in `network.rs`).
//!
//! A driver task per peer owns the stream, opens it on first use and again
//! after it breaks (the calls in flight on a broken stream fail; openraft
//! retries them). Everything is bounded: a call that finds the driver's
//! queue full, too many calls waiting for replies, or a peer without the
//! streaming call is sent alone (unary) instead; such a peer is asked again
//! every [`STREAM_UNSUPPORTED_RETRY`], so one upgraded in place gets its
//! stream without a restart of this node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lmskv_proto::limits::GRPC_MESSAGE_BYTES_MAX;
use lmskv_proto::v1::raft_client::RaftClient;
use lmskv_proto::v1::{RaftMessage, RaftStreamFrame};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Status;

/// Larger appends go alone, so a big batch of entries for one range does not
/// hold up the heartbeats of others queued behind it on the stream.
pub const APPEND_STREAM_PAYLOAD_BYTES_MAX: usize = 1 << 20;
/// Calls waiting for the driver task; more go alone.
const STREAM_QUEUE_MAX: usize = 1_024;
/// Calls sent on a stream and not answered yet; more go alone.
const STREAM_PENDING_MAX: usize = 4_096;
/// Frames buffered between the driver and the HTTP/2 stream; when full the
/// call goes alone (the driver never blocks on the peer, so it always
/// reads the replies that free the peer's side).
const STREAM_FRAMES_MAX: usize = 512;
/// How long opening a stream may take before the calls on it fail.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that answered the streaming call `Unimplemented` gets every call
/// alone for this long, then the next call tries the stream again.
pub const STREAM_UNSUPPORTED_RETRY: Duration = Duration::from_secs(30);

/// What a streamed call comes back with.
pub type Reply = Result<RaftMessage, StreamError>;

/// Why a streamed call has no reply.
#[derive(Debug)]
pub enum StreamError {
    /// The stream could not take the call (full, or the peer does not serve
    /// streams): the caller sends it alone instead.
    Refused,
    /// The peer answered with an error, or the stream broke or did not open.
    Failed(Status),
}

/// A message, when a quorum last acknowledged its sender (see
/// [`stamp`]), and where its reply goes.
type Call = (
    RaftMessage,
    Option<tokio::time::Instant>,
    oneshot::Sender<Reply>,
);

/// A frame waiting to go out, with its message's proof (see [`stamp`]).
type OutFrame = (RaftStreamFrame, Option<tokio::time::Instant>);

/// Sets `msg`'s `quorum_acked_age_us` from `proof` (when a quorum last
/// acknowledged the sending leader, or `None`: no proof) as the message
/// leaves: the receiver dates its contact with the leader back by this age
/// from arrival, so the age must not be taken before a wait. Tokio's clock,
/// like openraft's (the simulation pauses it).
pub(crate) fn stamp(msg: &mut RaftMessage, proof: Option<tokio::time::Instant>) {
    msg.quorum_acked_age_us =
        proof.map(|p| u64::try_from(p.elapsed().as_micros()).unwrap_or(u64::MAX));
}

/// Whether the peer serves `AppendStream`, as last learned: until when
/// (milliseconds after `since`) every call goes alone; 0 while it does.
#[derive(Debug)]
struct Support {
    since: Instant,
    alone_until_ms: AtomicU64,
    retry: Duration,
}

impl Support {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether calls go alone now.
    fn alone(&self) -> bool {
        let until = self.alone_until_ms.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    /// The peer answered `Unimplemented`: calls go alone for `retry`.
    fn refused_by_peer(&self) {
        let retry = u64::try_from(self.retry.as_millis()).unwrap_or(u64::MAX);
        let until = self.now_ms().saturating_add(retry).max(1);
        self.alone_until_ms.store(until, Ordering::Relaxed);
    }
}

/// The append stream to one peer.
#[derive(Debug)]
pub struct AppendStream {
    calls: mpsc::Sender<Call>,
    support: Arc<Support>,
}

impl AppendStream {
    /// Starts the driver task for the peer behind `channel`; must be called
    /// within a tokio runtime.
    pub fn start(channel: Channel) -> Self {
        Self::start_with(channel, STREAM_UNSUPPORTED_RETRY)
    }

    /// As [`AppendStream::start`], asking a peer that does not serve the
    /// stream again after `retry`.
    fn start_with(channel: Channel, retry: Duration) -> Self {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE_MAX);
        let support = Arc::new(Support {
            since: Instant::now(),
            alone_until_ms: AtomicU64::new(0),
            retry,
        });
        tokio::spawn(drive(channel, rx, support.clone()));
        AppendStream { calls: tx, support }
    }

    /// Queues `msg` on the stream, its age of `proof` stamped when its
    /// frame is sent (see [`stamp`]); `None` when it must go alone instead.
    pub fn call(
        &self,
        msg: RaftMessage,
        proof: Option<tokio::time::Instant>,
    ) -> Option<oneshot::Receiver<Reply>> {
        if self.support.alone() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.calls.try_send((msg, proof, tx)).ok()?;
        Some(rx)
    }
}

fn refuse(tx: oneshot::Sender<Reply>) {
    let _ = tx.send(Err(StreamError::Refused));
}

fn fail_all(pending: &mut HashMap<u64, oneshot::Sender<Reply>>, status: &Status) {
    for (_, tx) in pending.drain() {
        let _ = tx.send(Err(StreamError::Failed(Status::new(
            status.code(),
            status.message(),
        ))));
    }
}

/// The peer's reply frame as the caller's result.
fn reply_of(frame: RaftStreamFrame) -> Reply {
    if frame.error_code != 0 {
        return Err(StreamError::Failed(Status::new(
            tonic::Code::from(frame.error_code),
            frame.error_message,
        )));
    }
    frame.message.ok_or_else(|| {
        StreamError::Failed(Status::internal("append stream reply carries no message"))
    })
}

/// Sends one call's frame, or refuses it (the caller then sends it alone).
fn send(
    out: &mpsc::Sender<OutFrame>,
    pending: &mut HashMap<u64, oneshot::Sender<Reply>>,
    next_id: &mut u64,
    (msg, proof, tx): Call,
) {
    if tx.is_closed() {
        return;
    }
    if pending.len() >= STREAM_PENDING_MAX {
        // Calls whose callers gave up (timed out) free their places.
        pending.retain(|_, tx| !tx.is_closed());
        if pending.len() >= STREAM_PENDING_MAX {
            return refuse(tx);
        }
    }
    *next_id += 1;
    let frame = RaftStreamFrame {
        call_id: *next_id,
        message: Some(msg),
        ..Default::default()
    };
    match out.try_send((frame, proof)) {
        Ok(()) => {
            pending.insert(*next_id, tx);
        }
        Err(_) => refuse(tx),
    }
}

async fn drive(channel: Channel, mut calls: mpsc::Receiver<Call>, support: Arc<Support>) {
    let mut next_id = 0u64;
    loop {
        // A stream is opened when there is something to send.
        let Some(first) = calls.recv().await else {
            return;
        };
        if support.alone() {
            refuse(first.2);
            continue;
        }
        let (out, out_rx) = mpsc::channel::<OutFrame>(STREAM_FRAMES_MAX);
        let mut pending: HashMap<u64, oneshot::Sender<Reply>> = HashMap::new();
        send(&out, &mut pending, &mut next_id, first);
        let mut client = RaftClient::new(channel.clone())
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
        let opened = tokio::time::timeout(
            STREAM_OPEN_TIMEOUT,
            // Each frame's age is taken as the body hands it to the
            // transport: after the stream opened, and after any wait in
            // the frames buffer.
            client.append_stream(tokio_stream::wrappers::ReceiverStream::new(out_rx).map(
                |(mut frame, proof)| {
                    if let Some(m) = frame.message.as_mut() {
                        stamp(m, proof);
                    }
                    frame
                },
            )),
        )
        .await;
        let mut inbound = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                if status.code() == tonic::Code::Unimplemented {
                    // An older peer: send everything alone for a while.
                    support.refused_by_peer();
                    for (_, tx) in pending.drain() {
                        refuse(tx);
                    }
                } else {
                    fail_all(&mut pending, &status);
                }
                continue;
            }
            Err(_) => {
                fail_all(
                    &mut pending,
                    &Status::unavailable("the append stream did not open in time"),
                );
                continue;
            }
        };
        loop {
            tokio::select! {
                c = calls.recv() => match c {
                    Some(c) => send(&out, &mut pending, &mut next_id, c),
                    None => return,
                },
                r = inbound.next() => match r {
                    Some(Ok(frame)) => {
                        if let Some(tx) = pending.remove(&frame.call_id) {
                            let _ = tx.send(reply_of(frame));
                        }
                    }
                    Some(Err(status)) => {
                        tracing::debug!(error = %status, "append stream broke");
                        fail_all(&mut pending, &status);
                        break;
                    }
                    None => {
                        fail_all(&mut pending, &Status::unavailable("the append stream ended"));
                        break;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::replica::ReplicaMap;
    use crate::raft::service::RaftService;
    use bytes::Bytes;
    use lmskv_proto::v1::raft_server::RaftServer;
    use std::net::SocketAddr;
    use tonic::transport::Endpoint;

    /// Serves node 2's Raft service (hosting no range) on `addr` from its
    /// own runtime on a thread; sending on the returned channel stops it and
    /// drops every connection at once.
    fn serve(addr: SocketAddr) -> std::sync::mpsc::Sender<()> {
        serve_with(addr, true)
    }

    /// As [`serve`]; without `raft`, a server that knows no Raft call, as a
    /// peer without the streaming call answers it.
    fn serve_with(addr: SocketAddr, raft: bool) -> std::sync::mpsc::Sender<()> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                ready_tx.send(()).unwrap();
                let svc = RaftService::new(2, Arc::new(ReplicaMap::default()));
                let server = tonic::transport::Server::builder()
                    .add_optional_service(raft.then(|| RaftServer::new(svc)))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
                let stop = tokio::task::spawn_blocking(move || stopped.recv());
                tokio::select! {
                    _ = server => {}
                    _ = stop => {}
                }
            });
            // Dropping the runtime drops the server and its connections.
        });
        ready.recv().unwrap();
        stop
    }

    fn message(range_id: u64, to_node: u64) -> RaftMessage {
        let payload = Bytes::from_static(b"not a raft message");
        RaftMessage {
            range_id,
            from_node: 1,
            to_node,
            crc32: crc32fast::hash(&payload),
            payload,
            hibernate: false,
            quorum_acked_age_us: None,
        }
    }

    /// The peer's error in `r`; panics on a reply or a refusal.
    fn failed(r: Reply) -> Status {
        match r {
            Err(StreamError::Failed(status)) => status,
            other => panic!("expected the peer's error, got {other:?}"),
        }
    }

    async fn answer(s: &AppendStream, m: RaftMessage) -> Reply {
        let rx = s.call(m, None).expect("the stream takes the call");
        tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("answered in time")
            .expect("the driver answers every call")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replies_pair_with_their_calls_and_a_broken_stream_is_opened_again() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let stop = serve(addr);
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let s = AppendStream::start(channel);

        // Many calls at once, each refused for naming another node: every
        // reply is the one for its own call.
        let calls: Vec<_> = (0..300u64)
            .map(|i| (i, s.call(message(7, 100 + i), None).expect("queued")))
            .collect();
        for (i, rx) in calls {
            let status = failed(rx.await.unwrap());
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status
                    .message()
                    .contains(&format!("message for node {} reached node 2", 100 + i)),
                "call {i} got {status:?}"
            );
        }
        // The peer's own answers come back as they are, not as refusals.
        let status = failed(answer(&s, message(77, 2)).await);
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        let mut corrupt = message(7, 2);
        corrupt.crc32 ^= 1;
        let status = failed(answer(&s, corrupt).await);
        assert!(status.message().contains("checksum"), "{status:?}");

        // The peer goes away: calls fail instead of hanging.
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = failed(answer(&s, message(77, 2)).await);
        assert_ne!(status.code(), tonic::Code::NotFound, "{status:?}");

        // It comes back on the same address: a new stream serves again.
        let _stop = serve(addr);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = answer(&s, message(77, 2)).await;
            if matches!(&r, Err(StreamError::Failed(st)) if st.code() == tonic::Code::NotFound) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stream did not serve again: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_without_the_streaming_call_gets_calls_alone_until_it_serves_it() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let stop = serve_with(addr, false);
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let retry = Duration::from_millis(500);
        let s = AppendStream::start_with(channel, retry);
        // The first call opens the stream, learns the peer cannot take it
        // and is refused (the caller then sends it alone), not failed.
        let r = answer(&s, message(7, 2)).await;
        assert!(matches!(r, Err(StreamError::Refused)), "{r:?}");
        // For a while the stream takes no call at all.
        assert!(s.call(message(7, 2), None).is_none());

        // Once that while is over, the next call asks the same peer again,
        // which still does not serve streams.
        tokio::time::sleep(retry + Duration::from_millis(100)).await;
        let r = answer(&s, message(7, 2)).await;
        assert!(matches!(r, Err(StreamError::Refused)), "{r:?}");
        assert!(s.call(message(7, 2), None).is_none());

        // The peer is upgraded in place (same address, now with the Raft
        // service): after the next wait the stream serves it.
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _stop = serve(addr);
        tokio::time::sleep(retry + Duration::from_millis(100)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(rx) = s.call(message(77, 2), None) {
                let r = tokio::time::timeout(Duration::from_secs(10), rx)
                    .await
                    .expect("answered in time")
                    .expect("the driver answers every call");
                // Range 77 is not hosted there: the peer's own answer,
                // carried by the stream.
                if matches!(&r, Err(StreamError::Failed(st)) if st.code() == tonic::Code::NotFound)
                {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the upgraded peer got no stream"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
