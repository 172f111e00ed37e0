//! [`LogStore`]: a range's Raft log and vote on the node's storage engine.
//!
//! Appends are written at once (readable immediately) and reported flushed
//! only after the engine's group-commit fsync covers them.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use super::codec::{decode, encode};
use super::TypeConfig;
use crate::storage::keys::RaftStateField;
use crate::storage::Engine;

/// Entries read from the log in one call at most; openraft asks again for more.
const LOG_READ_ENTRIES_MAX: u64 = 4_096;

/// The Raft log of one range.
#[derive(Debug, Clone)]
pub struct LogStore {
    engine: Arc<Engine>,
    range_id: u64,
}

impl LogStore {
    /// The log of `range_id` in `engine`.
    pub fn new(engine: Arc<Engine>, range_id: u64) -> Self {
        LogStore { engine, range_id }
    }

    fn state<T: serde::de::DeserializeOwned>(
        &self,
        field: RaftStateField,
    ) -> io::Result<Option<T>> {
        match self.engine.raft_state(self.range_id, field)? {
            Some(b) => Ok(Some(decode("raft state", &b)?)),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => *x + 1,
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        let end = end.min(start.saturating_add(LOG_READ_ENTRIES_MAX));
        let raw = self.engine.log_entries(self.range_id, start, end)?;
        let mut out = Vec::with_capacity(raw.len());
        for (index, payload) in raw {
            let entry: EntryOf<TypeConfig> = decode("raft log entry", &payload)?;
            if entry.index() != index {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "range {} log key {index} holds entry {}",
                        self.range_id,
                        entry.index()
                    ),
                ));
            }
            out.push(entry);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.state(RaftStateField::Vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogIdOf<TypeConfig>> = self.state(RaftStateField::Purged)?;
        let last = match self.engine.log_last(self.range_id)? {
            Some((_, payload)) => {
                let e: EntryOf<TypeConfig> = decode("raft log entry", &payload)?;
                Some(e.log_id())
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        // A vote must be durable before it is acted on: sync now.
        self.engine
            .put_raft_state(self.range_id, RaftStateField::Vote, &encode(vote)?, true)?;
        Ok(())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        // Durability is not required: it only speeds up recovery.
        self.engine.put_raft_state(
            self.range_id,
            RaftStateField::Committed,
            &encode(&committed)?,
            false,
        )?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self
            .state::<Option<LogIdOf<TypeConfig>>>(RaftStateField::Committed)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Vec::new();
        for e in entries {
            batch.push((e.index(), encode(&e)?));
        }
        self.engine.log_append(self.range_id, &batch)?;
        self.engine.sync_then(Box::new(move |res| {
            callback.io_completed(res.map_err(io::Error::from));
        }));
        Ok(())
    }

    async fn truncate_after(
        &mut self,
        last_log_id: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        self.engine.log_truncate_from(self.range_id, from)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        self.engine
            .log_purge_through(self.range_id, log_id.index(), &encode(&log_id)?)?;
        Ok(())
    }
}
