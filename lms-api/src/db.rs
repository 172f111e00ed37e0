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
    BatchOp, Client, ClientError, Compare, KeyValue, ReadConsistency, ScanOptions, ServedBy,
    ServerError, SessionToken, WriteOptions,
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

/// Longest a SESSION read waits for a replica to reach the caller's token
/// before it is read STRONG instead. A token names a log position; one
/// that the cluster has not reached (forged, or from another cluster)
/// would otherwise hold the read for the whole call deadline.
pub const SESSION_WAIT_MAX: Duration = Duration::from_secs(1);

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
    /// `client` with [`SESSION_WAIT_MAX`] as its deadline, for SESSION reads.
    session_client: Client,
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
        let session_client = client
            .with_deadline(SESSION_WAIT_MAX)
            .expect("SESSION_WAIT_MAX is a valid call deadline");
        Db {
            client,
            session_client,
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
        let kv = match c {
            ReadConsistency::Session(token) => self.session_get(key.clone(), token).await?,
            c => self.client.get(key.clone(), c).await?,
        };
        match kv {
            None => Ok(None),
            Some(kv) => Ok(Some(Versioned {
                value: decode(&key, &kv.value)?,
                version: kv.version,
            })),
        }
    }

    /// A SESSION read of `key` that waits at most [`SESSION_WAIT_MAX`] for
    /// a replica to reach `token`, then reads STRONG (which sees every
    /// write, so read-your-writes holds either way). A token that names a
    /// position beyond the leader's is refused ([`check_session_reached`]).
    async fn session_get(&self, key: Bytes, token: SessionToken) -> AppResult<Option<KeyValue>> {
        match self
            .session_client
            .get(key.clone(), ReadConsistency::Session(token.clone()))
            .await
        {
            Ok(kv) => Ok(kv),
            Err(e) if !session_waited_out(&e) => Err(e.into()),
            Err(e) => {
                tracing::debug!(error = %e, "SESSION read not served in time; reading STRONG");
                let out = self
                    .client
                    .get_detailed(key, ReadConsistency::Strong)
                    .await?;
                check_session_reached(&token, out.served_by)?;
                Ok(out.kv)
            }
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

    /// Deletes `key` if its version is still `version` (the one read);
    /// whether it deleted. A record rewritten since it was read stays.
    pub async fn delete_if_version(&self, key: Bytes, version: u64) -> AppResult<bool> {
        if version == 0 {
            // Version 0 means "absent": there is nothing to delete.
            return Ok(false);
        }
        let out = self
            .client
            .compare_and_swap(
                key,
                Compare::Version(version),
                None,
                &WriteOptions::default(),
            )
            .await?;
        Ok(out.succeeded)
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
        let token = match &c {
            ReadConsistency::Session(t) => t.clone(),
            _ => return self.page_with(&self.client, prefix, q, c, keep).await,
        };
        // As [`Db::get`] does with a SESSION read: at most
        // [`SESSION_WAIT_MAX`] for a replica to reach the token, then STRONG
        // after checking the token against the leader of the page's start.
        let session = ReadConsistency::Session(token.clone());
        match self
            .page_with(&self.session_client, prefix, q, session, &keep)
            .await
        {
            Err(AppError::Unavailable(e)) if session_waited_out(&e) => {
                tracing::debug!(error = %e, "SESSION scan not served in time; reading STRONG");
                let probe = self
                    .client
                    .get_detailed(q.start_key(prefix)?, ReadConsistency::Strong)
                    .await?;
                check_session_reached(&token, probe.served_by)?;
                self.page_with(&self.client, prefix, q, ReadConsistency::Strong, keep)
                    .await
            }
            other => other,
        }
    }

    /// [`Db::page`] through `client`.
    async fn page_with<T: DeserializeOwned>(
        &self,
        client: &Client,
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
            let page = client.scan(&opts).await?;
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

/// Whether a SESSION read failed by running out of time: the replica did
/// not reach the token's position in time (a node's timeout), or no answer
/// came before [`SESSION_WAIT_MAX`] (the call's deadline, its last try
/// having timed out). Only then is the read tried STRONG. A node that sheds
/// load (`Overloaded`) or cannot serve (`Unavailable`), on its own or as
/// the last error before the deadline, is the caller's error (503 with
/// `Retry-After`): a STRONG read would add load where there is too much.
fn session_waited_out(e: &ClientError) -> bool {
    match e {
        ClientError::Server(ServerError::Timeout { .. }) => true,
        ClientError::DeadlineExceeded { last, .. } => {
            matches!(**last, ClientError::Server(ServerError::Timeout { .. }))
        }
        _ => false,
    }
}

/// Refuses a session token that names a log position beyond the one the
/// range's leader (`served`, the answer to a STRONG read) has reached: no
/// write of this cluster returned it. A token naming other ranges, or a
/// range since split (the key's range is then another one), passes.
pub fn check_session_reached(token: &SessionToken, served: Option<ServedBy>) -> AppResult<()> {
    let Some(s) = served else { return Ok(()) };
    let want = token.index_for(s.range_id);
    if want > s.applied_index {
        return Err(AppError::BadRequest(format!(
            "x-session-token names position {want} of range {}, which the database has not \
             reached (it is at {}): send the token a write of this service returned, or none",
            s.range_id, s.applied_index
        )));
    }
    Ok(())
}

#[cfg(test)]
mod session_tests {
    use super::*;

    fn served(range_id: u64, applied_index: u64) -> Option<ServedBy> {
        Some(ServedBy {
            node_id: 1,
            range_id,
            applied_index,
            leader_id: 1,
        })
    }

    #[test]
    fn only_running_out_of_time_turns_a_session_read_strong() {
        let deadline = |last: ServerError| ClientError::DeadlineExceeded {
            deadline_ms: 1_000,
            attempts: 3,
            last: Box::new(ClientError::Server(last)),
        };
        let timeout = || ServerError::Timeout {
            reason: "replica did not reach the session's index 9 in time".into(),
        };
        let overloaded = || ServerError::Overloaded { retry_after_ms: 50 };
        let unavailable = || ServerError::unavailable("no quorum");
        // The replica had not reached the token in time.
        assert!(session_waited_out(&ClientError::Server(timeout())));
        assert!(session_waited_out(&deadline(timeout())));
        // Load shedding and unavailability are the caller's 503.
        assert!(!session_waited_out(&ClientError::Server(overloaded())));
        assert!(!session_waited_out(&deadline(overloaded())));
        assert!(!session_waited_out(&ClientError::Server(unavailable())));
        assert!(!session_waited_out(&deadline(unavailable())));
        assert!(!session_waited_out(&ClientError::Unreachable {
            endpoint: "n1".into(),
            reason: "refused".into(),
        }));
        let e = AppError::from(ClientError::Server(overloaded()));
        assert!(matches!(e, AppError::Unavailable(_)), "{e:?}");
        // Nor are errors a retry cannot mend.
        assert!(!session_waited_out(&ClientError::Server(
            ServerError::invalid_argument("key", "too long")
        )));
    }

    #[test]
    fn a_token_beyond_the_leader_is_refused_and_a_reached_one_passes() {
        let t: SessionToken = "7:120,9:5".parse().unwrap();
        assert!(check_session_reached(&t, served(7, 120)).is_ok());
        assert!(check_session_reached(&t, served(7, 500)).is_ok());
        // Another range (the key's range was split off): nothing to compare.
        assert!(check_session_reached(&t, served(12, 1)).is_ok());
        assert!(check_session_reached(&t, None).is_ok());
        let e = check_session_reached(&t, served(7, 119)).unwrap_err();
        assert!(matches!(e, AppError::BadRequest(_)), "{e:?}");
        assert!(e.to_string().contains("range 7"), "{e}");
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
