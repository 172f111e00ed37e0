//! One simulated host: the node's real storage engine (RocksDB in the
//! host's own directory, which survives crashes), its real replica of the
//! simulated range, and its real Raft gRPC service, started afresh each time
//! the host boots.
//!
//! Client requests reach a host's request task over an in-memory channel
//! (the simulated network carries only Raft traffic), and the host publishes
//! its replica's Raft state for the invariant checks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lmskv_node::raft::command::{CommandResponse, Condition, Expect, Op};
use lmskv_node::raft::{PeerPool, RaftService, RaftTuning, RangeReplica, ReadLevel, ReplicaMap};
use lmskv_node::storage::{Engine, EngineOptions};
use lmskv_proto::error::Error;
use tokio::sync::{mpsc, oneshot};

use crate::state::{HostView, Shared};
use crate::transport::{channel_maker, serve_raft, RAFT_PORT};

/// The range every simulated host replicates (the meta range: it is ready
/// from its first membership, with the whole key space).
pub const RANGE_ID: u64 = lmskv_proto::range::META_RANGE_ID;

/// Requests a host's request task may hold queued at once.
const REQUESTS_QUEUED_MAX: usize = 64;

/// How often a host publishes its replica's Raft state.
const STATUS_EVERY: Duration = Duration::from_millis(2);

/// Keys a dump returns at most (the workload uses a handful).
const DUMP_KEYS_MAX: usize = 10_000;

/// A key's value and version as one replica holds them.
pub type Dump = BTreeMap<Bytes, (u64, Bytes)>;

/// What a client or the nemesis asks of a host.
pub enum Request {
    /// Put `value` at `key`; answers the write's version (its log index).
    Write {
        key: Bytes,
        value: Bytes,
        request_id: Bytes,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    /// Set `key` to `new` if it holds `expected` (`None`: absent); answers
    /// whether it swapped.
    Cas {
        key: Bytes,
        expected: Option<Bytes>,
        new: Bytes,
        request_id: Bytes,
        reply: oneshot::Sender<Result<bool, Error>>,
    },
    /// A linearizable read of `key`.
    Read {
        key: Bytes,
        reply: oneshot::Sender<Result<Option<Bytes>, Error>>,
    },
    /// Make `voters` (node id → address) the range's voters.
    ChangeVoters {
        voters: BTreeMap<u64, String>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Every key this replica holds, with its applied index.
    Dump {
        reply: oneshot::Sender<Result<(u64, Dump), Error>>,
    },
}

/// The simulated host name of node `id`.
pub fn host_name(id: u64) -> String {
    format!("n{id}")
}

/// The Raft address of node `id`, as its membership records it.
pub fn address(id: u64) -> String {
    format!("{}:{RAFT_PORT}", host_name(id))
}

/// Log entries between snapshots when a run takes them.
const SNAPSHOT_LOGS_SINCE_LAST: u64 = 64;

/// Raft timing for the simulation: the node's defaults, shortened so that
/// a simulated minute holds many elections and (with `snapshots`) many
/// snapshots, purges and installs.
pub fn tuning(snapshots: bool) -> RaftTuning {
    RaftTuning {
        election_timeout_ms_min: 150,
        election_timeout_ms_max: 300,
        heartbeat_interval_ms: 50,
        snapshot_logs_since_last: if snapshots {
            SNAPSHOT_LOGS_SINCE_LAST
        } else {
            u64::MAX / 2
        },
        snapshot_logs_to_keep: 16,
        write_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(1),
        dedup_window: Duration::from_secs(600),
        proposals_in_flight_max: lmskv_node::raft::PROPOSALS_IN_FLIGHT_MAX,
        park_after: Duration::from_secs(10),
    }
}

/// Boots node `id` from `dir`: the host's software, run again by every restart.
pub async fn boot(
    id: u64,
    dir: PathBuf,
    shared: Arc<Shared>,
    snapshots: bool,
    rpc_timeout_min: Duration,
) -> turmoil::Result {
    let opts = EngineOptions {
        block_cache_bytes: 4 << 20,
        write_buffer_bytes: 4 << 20,
        ..EngineOptions::default()
    };
    let engine = Arc::new(Engine::open_inline_sync(&dir.join("db"), &opts)?);
    let pool = PeerPool::with_channel_maker(id, channel_maker(), true, rpc_timeout_min);
    let replica = RangeReplica::open(
        engine,
        pool,
        RANGE_ID,
        &dir,
        tuning(snapshots),
        Arc::new(|_| {}),
    )
    .await
    .map_err(|e| format!("node {id}: open replica: {e}"))?;
    let replicas = Arc::new(ReplicaMap::default());
    replicas.insert(replica.clone());
    tokio::spawn(async move {
        if let Err(e) = serve_raft(RaftService::new(id, replicas)).await {
            tracing::error!(node = id, error = %e, "raft server stopped");
        }
    });
    if id == 1 && !replica.is_initialized().await && shared.take_bootstrap() {
        let members = shared.initial_voters().map(|v| (v, address(v))).collect();
        replica
            .initialize(members)
            .await
            .map_err(|e| format!("node {id}: initialize: {e}"))?;
    }
    let (tx, mut rx) = mpsc::channel(REQUESTS_QUEUED_MAX);
    shared.host(id).started(tx);
    let watcher = replica.clone();
    let watch_shared = shared.clone();
    tokio::spawn(async move {
        loop {
            watch_shared.observe(id, HostView::of(&watcher.status()));
            tokio::time::sleep(STATUS_EVERY).await;
        }
    });
    while let Some(req) = rx.recv().await {
        tokio::spawn(serve(replica.clone(), req));
    }
    Ok(())
}

async fn serve(replica: Arc<RangeReplica>, req: Request) {
    match req {
        Request::Write {
            key,
            value,
            request_id,
            reply,
        } => {
            let r = replica
                .propose(request_id, Op::Put { key, value }, false)
                .await
                .and_then(|(_, resp)| match resp {
                    CommandResponse::Put { version } => Ok(version),
                    other => Err(Error::internal(format!("put answered {other:?}"))),
                });
            let _ = reply.send(r);
        }
        Request::Cas {
            key,
            expected,
            new,
            request_id,
            reply,
        } => {
            let expect = match expected {
                Some(v) => Expect::Value(v),
                None => Expect::Version(0),
            };
            let op = Op::CompareAndSwap {
                compare: Condition { key, expect },
                new_value: Some(new),
            };
            let r = replica
                .propose(request_id, op, false)
                .await
                .and_then(|(_, resp)| match resp {
                    CommandResponse::CompareAndSwap { succeeded, .. } => Ok(succeeded),
                    other => Err(Error::internal(format!("cas answered {other:?}"))),
                });
            let _ = reply.send(r);
        }
        Request::Read { key, reply } => {
            let r = match replica.read_barrier(ReadLevel::Strong).await {
                Ok(_) => replica
                    .engine()
                    .get(&key)
                    .map(|v| v.map(|v| v.value))
                    .map_err(|e| replica.refuse(&e)),
                Err(e) => Err(e),
            };
            let _ = reply.send(r);
        }
        Request::ChangeVoters { voters, reply } => {
            let _ = reply.send(replica.change_voters(voters).await);
        }
        Request::Dump { reply } => {
            let applied = replica.status().applied_index;
            let r = replica
                .engine()
                .scan(b"", b"", DUMP_KEYS_MAX, false, usize::MAX)
                .map(|(items, _)| {
                    items
                        .into_iter()
                        .map(|i| (i.key, (i.value.version, i.value.value)))
                        .collect()
                })
                .map(|d| (applied, d))
                .map_err(|e| replica.refuse(&e));
            let _ = reply.send(r);
        }
    }
}
