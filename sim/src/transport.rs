//! Raft traffic over the simulated network: the node's real gRPC `Raft`
//! service and client, with turmoil's TCP streams in place of the kernel's.
//!
//! The node's [`PeerPool`] takes a [`ChannelMaker`] that connects each
//! channel through [`connector`]; the server side accepts turmoil streams
//! with [`serve_raft`]. Everything above the byte stream (HTTP/2, tonic,
//! encoding, checksums) is the production code.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use lmskv_node::raft::{ChannelMaker, RaftService};
use lmskv_proto::limits::GRPC_MESSAGE_BYTES_MAX;
use lmskv_proto::v1::raft_server::RaftServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::transport::{Endpoint, Uri};

/// The port every simulated host serves Raft on.
pub const RAFT_PORT: u16 = 7100;

/// A turmoil TCP stream that tonic's server accepts.
pub struct SimStream(turmoil::net::TcpStream);

impl Connected for SimStream {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Connects a peer channel over the simulated network: `http://HOST:PORT`
/// becomes a turmoil TCP connection to the simulated host `HOST`.
pub fn channel_maker() -> ChannelMaker {
    Arc::new(|ep: Endpoint| {
        ep.connect_with_connector_lazy(tower::service_fn(|uri: Uri| async move {
            let host = uri
                .host()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "peer uri without host")
                })?
                .to_string();
            let port = uri.port_u16().unwrap_or(RAFT_PORT);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
        }))
    })
}

/// Serves the node's `Raft` gRPC service on [`RAFT_PORT`] of the current
/// simulated host until the host stops.
pub async fn serve_raft(service: RaftService) -> io::Result<()> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", RAFT_PORT)).await?;
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(s, _)| SimStream(s));
        Some((next, listener))
    });
    tonic::transport::Server::builder()
        .add_service(
            RaftServer::new(service)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .serve_with_incoming(incoming)
        .await
        .map_err(io::Error::other)
}
