//! [`StateMachine`]: applies a range's committed commands to the storage
//! engine and builds and installs its snapshots.
//!
//! Each apply call writes the data mutations, the dedup records and the
//! applied log id in one atomic batch, so after a crash the range resumes
//! from exactly the last applied entry: every entry is applied once.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};

use super::codec::{decode, encode};
use super::command::{Command, CommandResponse, KvRecord, Op, WriteOp};
use super::TypeConfig;
use crate::storage::keys::RangeStateField;
use crate::storage::{ApplyBatch, Engine, StorageError};

/// Dedup records expired per apply call at most, so expiry never stalls apply.
const DEDUP_EXPIRE_PER_APPLY_MAX: usize = 256;

/// A snapshot: a file in the range's snapshot directory, streamed in chunks.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    /// Where the snapshot file is.
    pub path: PathBuf,
}

/// The range's current snapshot: its metadata and file.
type CurrentSnapshot = (SnapshotMetaOf<TypeConfig>, PathBuf);

type AppliedState = (Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>);

/// The state machine of one range.
#[derive(Clone)]
pub struct StateMachine {
    engine: Arc<Engine>,
    range_id: u64,
    /// Inclusive start and exclusive end (empty: unbounded) of the range's keys.
    span: (Bytes, Bytes),
    snapshot_dir: PathBuf,
    dedup_window: Duration,
    current_snapshot: Arc<Mutex<Option<CurrentSnapshot>>>,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("range_id", &self.range_id)
            .finish()
    }
}

fn meta_path(snap: &Path) -> PathBuf {
    snap.with_extension("meta")
}

impl StateMachine {
    /// Opens the state machine of `range_id`, finishing a snapshot install
    /// that a crash interrupted.
    pub fn open(
        engine: Arc<Engine>,
        range_id: u64,
        span: (Bytes, Bytes),
        snapshot_dir: PathBuf,
        dedup_window: Duration,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(&snapshot_dir)?;
        let sm = StateMachine {
            engine,
            range_id,
            span,
            snapshot_dir,
            dedup_window,
            current_snapshot: Arc::new(Mutex::new(None)),
        };
        // Remove partial files of builds or transfers that did not finish.
        for entry in std::fs::read_dir(&sm.snapshot_dir)? {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(&p);
            }
        }
        let current = sm.latest_snapshot_on_disk()?;
        if let Some(path) = sm.engine.pending_snapshot_install(range_id)? {
            let Some((meta, cur_path)) = current.clone().filter(|(_, p)| *p == path) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "range {range_id}: interrupted snapshot install of {} cannot be resumed: file missing",
                        path.display()
                    ),
                ));
            };
            tracing::warn!(range_id, path = %cur_path.display(), "resuming interrupted snapshot install");
            sm.import(&meta, &cur_path)?;
        }
        *sm.current_snapshot.lock().expect("snapshot lock") = current;
        Ok(sm)
    }

    fn latest_snapshot_on_disk(&self) -> io::Result<Option<(SnapshotMetaOf<TypeConfig>, PathBuf)>> {
        let mut best: Option<(SnapshotMetaOf<TypeConfig>, PathBuf)> = None;
        for entry in std::fs::read_dir(&self.snapshot_dir)? {
            let p = entry?.path();
            if p.extension().is_none_or(|e| e != "snap") {
                continue;
            }
            let Ok(raw) = std::fs::read(meta_path(&p)) else {
                continue;
            };
            let meta: SnapshotMetaOf<TypeConfig> = match crate::storage::value::unframe(
                "snapshot meta",
                &raw,
            )
            .map_err(io::Error::from)
            .and_then(|b| decode("snapshot meta", b))
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "ignoring unreadable snapshot meta");
                    continue;
                }
            };
            if best
                .as_ref()
                .is_none_or(|(b, _)| meta.last_log_id > b.last_log_id)
            {
                best = Some((meta, p));
            }
        }
        Ok(best)
    }

    fn applied(&self) -> io::Result<AppliedState> {
        match self
            .engine
            .range_state(self.range_id, RangeStateField::Applied)?
        {
            Some(b) => decode("applied state", &b),
            None => Ok((None, Default::default())),
        }
    }

    /// Makes `path` (with `meta`) the range's current snapshot and deletes older ones.
    fn keep_snapshot(&self, meta: &SnapshotMetaOf<TypeConfig>, path: &Path) -> io::Result<()> {
        let framed = crate::storage::value::frame(&encode(meta)?);
        let mp = meta_path(path);
        let tmp = mp.with_extension("meta.tmp");
        std::fs::write(&tmp, framed)?;
        std::fs::rename(&tmp, &mp)?;
        let mut cur = self.current_snapshot.lock().expect("snapshot lock");
        let old = cur.replace((meta.clone(), path.to_path_buf()));
        if let Some((_, old_path)) = old {
            if old_path != path {
                let _ = std::fs::remove_file(meta_path(&old_path));
                let _ = std::fs::remove_file(&old_path);
            }
        }
        Ok(())
    }

    fn snapshot_file_name(meta: &SnapshotMetaOf<TypeConfig>) -> String {
        match &meta.last_log_id {
            Some(l) => format!("{:020}-{}.snap", l.index(), l.committed_leader_id()),
            None => "empty.snap".to_string(),
        }
        .replace(['/', ' ', ':'], "_")
    }

    fn import(&self, meta: &SnapshotMetaOf<TypeConfig>, path: &Path) -> io::Result<()> {
        let applied: AppliedState = (meta.last_log_id, meta.last_membership.clone());
        self.engine.import_snapshot(
            self.range_id,
            &self.span.0,
            &self.span.1,
            path,
            &encode(&applied)?,
        )?;
        Ok(())
    }

    fn execute(
        &self,
        batch: &mut ApplyBatch<'_>,
        index: u64,
        cmd: &Command,
    ) -> Result<CommandResponse, StorageError> {
        let record = |key: &Bytes, v: crate::storage::StoredValue| KvRecord {
            key: key.clone(),
            value: v.value,
            version: v.version,
        };
        Ok(match &cmd.op {
            Op::Put { key, value } => {
                batch.put(key, index, value.clone());
                CommandResponse::Put { version: index }
            }
            Op::Delete { key } => {
                let existed = batch.get(key)?.is_some();
                if existed {
                    batch.delete(key);
                }
                CommandResponse::Delete { deleted: existed }
            }
            Op::CompareAndSwap { compare, new_value } => {
                let cur = batch.get(&compare.key)?;
                let holds = compare.holds(cur.as_ref().map(|v| (v.value.as_ref(), v.version)));
                if holds {
                    match new_value {
                        Some(v) => {
                            batch.put(&compare.key, index, v.clone());
                            CommandResponse::CompareAndSwap {
                                succeeded: true,
                                current: Some(KvRecord {
                                    key: compare.key.clone(),
                                    value: v.clone(),
                                    version: index,
                                }),
                            }
                        }
                        None => {
                            if cur.is_some() {
                                batch.delete(&compare.key);
                            }
                            CommandResponse::CompareAndSwap {
                                succeeded: true,
                                current: None,
                            }
                        }
                    }
                } else {
                    CommandResponse::CompareAndSwap {
                        succeeded: false,
                        current: cur.map(|v| record(&compare.key, v)),
                    }
                }
            }
            Op::Batch { conditions, ops } => {
                let mut failed = Vec::new();
                let mut all_hold = true;
                for c in conditions {
                    let cur = batch.get(&c.key)?;
                    if !c.holds(cur.as_ref().map(|v| (v.value.as_ref(), v.version))) {
                        all_hold = false;
                    }
                    if let Some(v) = cur {
                        failed.push(record(&c.key, v));
                    }
                }
                if !all_hold {
                    return Ok(CommandResponse::Batch {
                        succeeded: false,
                        current: failed,
                        version: 0,
                    });
                }
                for op in ops {
                    match op {
                        WriteOp::Put { key, value } => batch.put(key, index, value.clone()),
                        WriteOp::Delete { key } => batch.delete(key),
                    }
                }
                CommandResponse::Batch {
                    succeeded: true,
                    current: Vec::new(),
                    version: index,
                }
            }
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotFile>, io::Error> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let tmp = this
                .snapshot_dir
                .join(format!("build-{}.tmp", rand::random::<u64>()));
            let export =
                this.engine
                    .export_snapshot(this.range_id, &this.span.0, &this.span.1, &tmp)?;
            let (last_log_id, last_membership): AppliedState = match &export.applied {
                Some(b) => decode("applied state", b)?,
                None => (None, Default::default()),
            };
            let meta = SnapshotMetaOf::<TypeConfig> {
                last_log_id,
                last_membership,
            };
            let path = this.snapshot_dir.join(Self::snapshot_file_name(&meta));
            std::fs::rename(&tmp, &path)?;
            this.keep_snapshot(&meta, &path)?;
            tracing::info!(
                range_id = this.range_id,
                records = export.records,
                bytes = export.bytes,
                last_log_id = ?meta.last_log_id,
                "built snapshot"
            );
            Ok(SnapshotOf::<TypeConfig, SnapshotFile> {
                meta,
                snapshot: SnapshotFile { path },
            })
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<AppliedState, io::Error> {
        self.applied()
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let (mut last_applied, mut membership) = self.applied()?;
        let mut batch = self.engine.apply_batch(self.range_id);
        let mut responders = Vec::new();
        let mut last_time_ms = 0u64;
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = entry.index();
            let resp = match &entry.payload {
                EntryPayload::Blank => CommandResponse::None,
                EntryPayload::Membership(m) => {
                    membership =
                        StoredMembershipOf::<TypeConfig>::new(Some(entry.log_id()), m.clone());
                    CommandResponse::None
                }
                EntryPayload::Normal(cmd) => {
                    last_time_ms = last_time_ms.max(cmd.proposed_at_ms);
                    let seen = if cmd.request_id.is_empty() {
                        None
                    } else {
                        batch.dedup_get(&cmd.request_id)?
                    };
                    match seen {
                        // A retry of a write already applied: answer as the first time.
                        Some(rec) => decode("dedup record", &rec)?,
                        None => {
                            let resp = self.execute(&mut batch, index, cmd)?;
                            if !cmd.request_id.is_empty() {
                                let expires =
                                    cmd.proposed_at_ms + self.dedup_window.as_millis() as u64;
                                batch.dedup_put(&cmd.request_id, expires, encode(&resp)?);
                            }
                            resp
                        }
                    }
                }
            };
            last_applied = Some(entry.log_id());
            if let Some(r) = responder {
                responders.push((r, resp));
            }
        }
        if last_time_ms > 0 {
            batch.dedup_expire(last_time_ms, DEDUP_EXPIRE_PER_APPLY_MAX)?;
        }
        batch.set_applied(&encode(&(last_applied, membership))?);
        batch.commit()?;
        for (r, resp) in responders {
            r.send(resp);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let final_path = self.snapshot_dir.join(Self::snapshot_file_name(meta));
        if snapshot.path != final_path {
            std::fs::rename(&snapshot.path, &final_path)?;
        }
        // Record the snapshot first: an interrupted import resumes from it.
        self.keep_snapshot(meta, &final_path)?;
        let this = self.clone();
        let meta2 = meta.clone();
        let fp = final_path.clone();
        tokio::task::spawn_blocking(move || this.import(&meta2, &fp))
            .await
            .map_err(io::Error::other)??;
        tracing::info!(range_id = self.range_id, last_log_id = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>, io::Error> {
        let cur = self.current_snapshot.lock().expect("snapshot lock").clone();
        Ok(
            cur.map(|(meta, path)| SnapshotOf::<TypeConfig, SnapshotFile> {
                meta,
                snapshot: SnapshotFile { path },
            }),
        )
    }
}
