//! The node's gRPC server: the `Kv`, `Admin` and `Raft` services on one port.

mod admin;
mod kv;

use std::sync::Arc;

use lmskv_proto::limits::GRPC_MESSAGE_BYTES_MAX;
use lmskv_proto::v1::admin_server::AdminServer;
use lmskv_proto::v1::kv_server::KvServer;
use lmskv_proto::v1::raft_server::RaftServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::node::Node;
use crate::raft::RaftService;

pub use admin::AdminService;
pub use kv::KvService;

/// Serves every service of `node` on `listener` until `stop` turns true.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let kv = KvService::new(node.clone());
    let admin = AdminService::new(node.clone());
    let raft = RaftService::new(node.node_id(), node.replicas.clone());
    // Nagle's algorithm with delayed ACKs adds ~40 ms to small request/response
    // exchanges; every accepted connection turns it off.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY");
            }
        })
    });
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(
            KvServer::new(kv)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(AdminServer::new(admin))
        .add_service(
            RaftServer::new(raft)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}
