//! Runs openraft's own storage test suite against the log store and state
//! machine on a real RocksDB engine.

use std::sync::Arc;
use std::time::Duration;

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

use super::log_store::LogStore;
use super::state_machine::StateMachine;
use super::TypeConfig;
use crate::storage::{Engine, EngineOptions};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = EngineOptions {
            block_cache_bytes: 4 << 20,
            write_buffer_bytes: 4 << 20,
            ..EngineOptions::default()
        };
        let engine = Arc::new(Engine::open(&dir.path().join("db"), &opts).expect("open engine"));
        let log = LogStore::new(engine.clone(), 7, Some(1));
        let sm = StateMachine::open(
            engine,
            7,
            dir.path().join("snapshots"),
            Duration::from_secs(60),
            Arc::new(|_| {}),
            true,
            Arc::default(),
        )
        .expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes() {
    Suite::test_all(RocksBuilder)
        .await
        .expect("openraft storage suite");
}
