//! [`Db`]: the LMS's typed access to lmskv — JSON records with versions,
//! compare-and-swap, atomic batches within one course, paged prefix scans and
//! the ID allocator.
//!
//! Every call states its read consistency; the reasons for each choice are
//! written where the call is made (in the route handlers). Batches and CAS
//! only ever touch keys of one table prefix (see [`crate::keys`]), so they stay
//! valid when lmskv splits the key space into ranges.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use lmskv_client::{
    BatchOp, Client, Compare, ReadConsistency, ScanOptions, SessionToken, WriteOptions,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{AppError, AppResult};
use crate::keys;
use crate::pagination::{Cursor, PageQuery};

/// IDs reserved from a table's counter at once; fewer round trips to the
/// shared `seq/` key, at the cost of gaps when a process restarts.
pub const ID_BLOCK_SIZE: u64 = 32;
/// Compare-and-swap tries on a contended key before giving up with 503.
pub const CAS_ATTEMPTS_MAX: u32 = 64;
/// First pause between compare-and-swap tries; it doubles per try up to
/// [`CAS_PAUSE_MAX`].
pub const CAS_PAUSE_FIRST: Duration = Duration::from_millis(2);
/// Longest pause between compare-and-swap tries: 64 tries then pause at
/// most about 3 s in all, well inside a request's time limit.
pub const CAS_PAUSE_MAX: Duration = Duration::from_millis(50);

/// Waits before compare-and-swap try `attempt` (none before the first): a
/// pause that doubles per try, each drawn between half and all of it, so
/// requests that lost a race on one key (a rush of enrollments in one
/// course) spread out instead of trying again all at once and using up
/// their tries together.
pub async fn cas_pause(attempt: u32) {
    let full = cas_pause_longest(attempt);
    if full.is_zero() {
        return;
    }
    let factor = rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0);
    tokio::time::sleep(full.mul_f64(factor)).await;
}

/// The longest pause [`cas_pause`] makes before try `attempt`.
fn cas_pause_longest(attempt: u32) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    CAS_PAUSE_FIRST
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(CAS_PAUSE_MAX)
}

/// Keys fetched per scan call when a list is filtered.
pub const SCAN_BATCH: u32 = 256;
/// Keys a filtered list examines at most for one page; the page then ends
/// early with a cursor, so a sparse filter cannot make one request unbounded.
pub const PAGE_SCAN_KEYS_MAX: usize = 5_000;
/// Records a full-prefix read (gradebook, export) may return at most; a
/// prefix holding more fails the read.
pub const PREFIX_READ_MAX: usize = 100_000;

/// The outcome of writing a derived copy (an index or catalogue entry)
/// after its source committed. A failure is logged, not returned: the
/// request's own write is done, and failing the request would make a client
/// retry a write that happened; the repair task re-derives the copy.
pub fn derived<T>(what: &'static str, r: AppResult<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, what, "writing a derived copy failed; the repair task will write it");
            None
        }
    }
}

/// A decoded record and its lmskv version.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub version: u64,
}

/// One decoded record of a scan, with its key.
#[derive(Debug, Clone)]
pub struct Row<T> {
    pub key: Bytes,
    pub value: T,
    pub version: u64,
}

/// The outcome of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cas {
    /// Written: the write's session token (for read-your-writes on any
    /// replica) and the key's new version.
    Done { token: SessionToken, version: u64 },
    /// The condition did not hold; nothing was written.
    Conflict,
}

/// Typed lmskv access for the LMS.
pub struct Db {
    client: Client,
    ids: tokio::sync::Mutex<HashMap<&'static str, (u64, u64)>>,
}

/// Encodes a record.
pub fn encode<T: Serialize>(v: &T) -> AppResult<Bytes> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| AppError::Internal(format!("encode: {e}")))
}

/// Decodes a record read from `key`.
pub fn decode<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> AppResult<T> {
    serde_json::from_slice(v).map_err(|e| {
        AppError::Internal(format!(
            "undecodable record at {}: {e}",
            String::from_utf8_lossy(key)
        ))
    })
}

impl Db {
    /// Wraps a connected client.
    pub fn new(client: Client) -> Db {
        Db {
            client,
            ids: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Reads and decodes one record.
    pub async fn get<T: DeserializeOwned>(
        &self,
        key: Bytes,
        c: ReadConsistency,
    ) -> AppResult<Option<Versioned<T>>> {
        match self.client.get(key.clone(), c).await? {
            None => Ok(None),
            Some(kv) => Ok(Some(Versioned {
                value: decode(&key, &kv.value)?,
                version: kv.version,
            })),
        }
    }

    /// Writes one record unconditionally; returns the write's session token.
    pub async fn put<T: Serialize>(&self, key: Bytes, v: &T) -> AppResult<SessionToken> {
        Ok(self.client.put(key, encode(v)?).await?.session_token())
    }

    /// Writes raw bytes unconditionally; returns the write's session token.
    pub async fn put_raw(&self, key: Bytes, v: Bytes) -> AppResult<SessionToken> {
        Ok(self.client.put(key, v).await?.session_token())
    }

    /// Deletes one key; returns the write's session token.
    pub async fn delete(&self, key: Bytes) -> AppResult<SessionToken> {
        Ok(self
            .client
            .delete_with(key, &WriteOptions::default())
            .await?
            .1
            .session_token())
    }

    /// Writes `v` (or deletes when `None`) if the key's version is `version`
    /// (0: the key must be absent).
    pub async fn cas<T: Serialize>(
        &self,
        key: Bytes,
        version: u64,
        v: Option<&T>,
    ) -> AppResult<Cas> {
        let value = v.map(encode).transpose()?;
        let out = self
            .client
            .compare_and_swap(
                key,
                Compare::Version(version),
                value,
                &WriteOptions::default(),
            )
            .await?;
        Ok(if out.succeeded {
            Cas::Done {
                token: out.session_token(),
                version: out.current.map(|c| c.version).unwrap_or(out.index),
            }
        } else {
            Cas::Conflict
        })
    }

    /// Applies `ops` atomically if every `(key, version)` condition holds.
    /// All keys must share one table prefix (one course).
    pub async fn batch(&self, conditions: Vec<(Bytes, u64)>, ops: Vec<BatchOp>) -> AppResult<Cas> {
        let conditions = conditions
            .into_iter()
            .map(|(k, v)| (k, Compare::Version(v)))
            .collect();
        let out = self
            .client
            .batch(conditions, ops, &WriteOptions::default())
            .await?;
        Ok(if out.succeeded {
            Cas::Done {
                token: out.session_token(),
                version: out.index,
            }
        } else {
            Cas::Conflict
        })
    }

    /// Reads every record under `prefix`; fails (never returns a part) when
    /// there are more than [`PREFIX_READ_MAX`].
    pub async fn scan_prefix<T: DeserializeOwned>(
        &self,
        prefix: &Bytes,
        c: ReadConsistency,
    ) -> AppResult<Vec<Row<T>>> {
        let opts = ScanOptions {
            start: prefix.clone(),
            end: keys::prefix_end(prefix),
            limit: 1_000,
            consistency: c,
            ..ScanOptions::default()
        };
        // Decoded page by page: only one page's raw values are held at a
        // time (a `T` that leaves out large fields, like a submission's
        // body, keeps the whole read small).
        let mut rows = Vec::new();
        let mut o = opts;
        loop {
            let page = self.client.scan(&o).await?;
            if rows.len() + page.kvs.len() > PREFIX_READ_MAX {
                // A gradebook or an export built from part of its records
                // would be wrong without saying so.
                tracing::warn!(prefix = %prefix.escape_ascii(), "more than {PREFIX_READ_MAX} records under one prefix");
                return Err(AppError::TooManyRecords(format!(
                    "more than {PREFIX_READ_MAX} records: too many to read at once"
                )));
            }
            for kv in page.kvs {
                rows.push(Row {
                    value: decode(&kv.key, &kv.value)?,
                    key: kv.key,
                    version: kv.version,
                });
            }
            match page.next_page_token {
                Some(t) => o.page_token = t,
                None => return Ok(rows),
            }
        }
    }

    /// Reads one page of records under `prefix` that pass `keep`, starting
    /// after the query's cursor. Returns the page and the cursor of the next
    /// page (`None` when nothing follows).
    pub async fn page<T: DeserializeOwned>(
        &self,
        prefix: &Bytes,
        q: &PageQuery,
        c: ReadConsistency,
        keep: impl Fn(&T) -> bool,
    ) -> AppResult<(Vec<Row<T>>, Option<Cursor>)> {
        let per_page = q.per_page()? as usize;
        let mut opts = ScanOptions {
            start: q.start_key(prefix)?,
            end: keys::prefix_end(prefix),
            limit: SCAN_BATCH.min(per_page as u32 + 1),
            consistency: c,
            ..ScanOptions::default()
        };
        let mut out: Vec<Row<T>> = Vec::new();
        let mut examined = 0usize;
        let mut last_key: Option<Bytes> = None;
        loop {
            let page = self.client.scan(&opts).await?;
            for kv in page.kvs {
                examined += 1;
                last_key = Some(kv.key.clone());
                let value: T = decode(&kv.key, &kv.value)?;
                if keep(&value) {
                    out.push(Row {
                        key: kv.key,
                        value,
                        version: kv.version,
                    });
                    if out.len() > per_page {
                        out.truncate(per_page);
                        let next = out.last().map(|r| Cursor::after(prefix, &r.key));
                        return Ok((out, next));
                    }
                }
            }
            match page.next_page_token {
                None => return Ok((out, None)),
                Some(t) => opts.page_token = t,
            }
            if examined >= PAGE_SCAN_KEYS_MAX {
                return Ok((out, last_key.map(|k| Cursor::after(prefix, &k))));
            }
            opts.limit = SCAN_BATCH;
        }
    }

    /// Allocates a fresh ID of `table` (1, 2, 3, … with gaps).
    pub async fn next_id(&self, table: &'static str) -> AppResult<u64> {
        // The lock is held across the refill: one refill per process at a
        // time, so concurrent requests wait for the new block instead of all
        // racing on the shared counter.
        let mut ids = self.ids.lock().await;
        if let Some((next, end)) = ids.get_mut(table) {
            if *next <= *end {
                let id = *next;
                *next += 1;
                return Ok(id);
            }
        }
        let key = keys::seq(table);
        // No pause between tries: the lock already makes this process's
        // refills one at a time, and a pause would hold every table's
        // allocations behind it.
        for _ in 0..CAS_ATTEMPTS_MAX {
            // STRONG: a stale counter would only make the CAS fail and retry,
            // but reading the leader's value makes the first try succeed.
            let cur = self
                .get::<u64>(key.clone(), ReadConsistency::Strong)
                .await?;
            let (last, version) = cur.map(|v| (v.value, v.version)).unwrap_or((0, 0));
            let reserved = last + ID_BLOCK_SIZE;
            if let Cas::Done { .. } = self.cas(key.clone(), version, Some(&reserved)).await? {
                ids.insert(table, (last + 2, reserved));
                return Ok(last + 1);
            }
        }
        Err(AppError::Busy(format!(
            "the ID counter of {table} is contended"
        )))
    }
}

#[cfg(test)]
mod cas_pause_tests {
    use super::*;

    #[test]
    fn cas_pauses_grow_from_none_to_a_bound_that_keeps_every_try_inside_a_request() {
        assert_eq!(cas_pause_longest(0), Duration::ZERO);
        assert_eq!(cas_pause_longest(1), CAS_PAUSE_FIRST);
        let pauses: Vec<Duration> = (0..CAS_ATTEMPTS_MAX).map(cas_pause_longest).collect();
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(*pauses.last().unwrap(), CAS_PAUSE_MAX);
        let total: Duration = pauses.iter().sum();
        assert!(total <= Duration::from_secs(3), "{total:?} of pauses");
        assert_eq!(cas_pause_longest(u32::MAX), CAS_PAUSE_MAX, "no overflow");
    }
}
