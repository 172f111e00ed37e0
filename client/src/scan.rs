//! Scans across range boundaries.
//!
//! A node scans one range at a time, clamped to that range's span. The
//! client cuts `[start, end)` at the range boundaries its route cache knows
//! into pieces, scans up to [`SCAN_FANOUT_CONCURRENCY_MAX`] pieces at once
//! (each asked for the whole page), and joins their answers in key order
//! (reverse order for reverse scans) until the page is full; pieces not
//! needed any more are dropped, which cancels their calls. Inside a piece
//! the client walks whatever ranges cover it now, asking each for what is
//! left of the page, so a stale cache only costs calls, never keys: a page
//! holds every key of the span at most once and in order. The page token the
//! client hands out is a key, not a range: one direction byte (1 forward,
//! 2 reverse) then the resume key — for a forward scan the next key to read
//! (inclusive), for a reverse scan the key below which to continue
//! (exclusive). Because it names no range, it stays correct while ranges
//! split or merge: a request refused for a stale range view refreshes the
//! route cache and is sent again from the same resume key.

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::{self, StreamExt};
use lmskv_proto::keys::validate_scan_bound;
use lmskv_proto::limits::{SCAN_LIMIT_DEFAULT, SCAN_LIMIT_MAX};
use lmskv_proto::range::USER_SPACE_START;
use lmskv_proto::v1;

use crate::call::{Budget, RangeCallError};
use crate::client::{Client, KeyValue, ScanOptions, ScanPage};
use crate::error::ClientError;

const TOKEN_FORWARD: u8 = 1;
const TOKEN_REVERSE: u8 = 2;

/// Pieces (ranges) of one scan page read at once. Every piece is asked for
/// the whole page, so a page may read up to this many times its limit; the
/// surplus is bounded and traded for latency across range boundaries.
pub const SCAN_FANOUT_CONCURRENCY_MAX: usize = 4;

/// Pieces one scan page is cut into at most (range boundaries beyond this
/// are walked in the last piece).
const SCAN_PIECES_MAX: usize = 256;

/// Where a scan continues.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    /// Inclusive lower bound (never below the user key space).
    lo: Bytes,
    /// Exclusive upper bound; empty: the end of the key space.
    hi: Bytes,
}

impl Cursor {
    fn is_empty(&self) -> bool {
        !self.hi.is_empty() && self.lo >= self.hi
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ClientError {
    ClientError::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

fn encode_token(reverse: bool, key: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(key.len() + 1);
    b.put_u8(if reverse {
        TOKEN_REVERSE
    } else {
        TOKEN_FORWARD
    });
    b.put_slice(key);
    b.freeze()
}

/// The smallest key after `key`.
fn successor(key: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(key.len() + 1);
    b.put_slice(key);
    b.put_u8(0);
    b.freeze()
}

/// The span a scan request still covers, from its bounds and page token.
fn start_cursor(opts: &ScanOptions) -> Result<Cursor, ClientError> {
    validate_scan_bound("start", &opts.start).map_err(|e| invalid("start", e.to_string()))?;
    validate_scan_bound("end", &opts.end).map_err(|e| invalid("end", e.to_string()))?;
    if opts.limit > SCAN_LIMIT_MAX {
        return Err(invalid(
            "limit",
            format!("{} is above the limit of {SCAN_LIMIT_MAX}", opts.limit),
        ));
    }
    let mut c = Cursor {
        lo: if opts.start.is_empty() {
            Bytes::from_static(USER_SPACE_START)
        } else {
            opts.start.clone()
        },
        hi: opts.end.clone(),
    };
    if opts.page_token.is_empty() {
        return Ok(c);
    }
    let (dir, key) = opts.page_token.split_at(1);
    let want = if opts.reverse {
        TOKEN_REVERSE
    } else {
        TOKEN_FORWARD
    };
    if dir[0] != want {
        return Err(invalid(
            "page_token",
            "the token is not from a scan in this direction",
        ));
    }
    let key = opts.page_token.slice(1..1 + key.len());
    if opts.reverse {
        if key.is_empty() || (!c.hi.is_empty() && key > c.hi) {
            return Err(invalid(
                "page_token",
                "the token is outside the scan's span",
            ));
        }
        c.hi = key;
    } else {
        if key < c.lo || (!c.hi.is_empty() && key > c.hi) {
            return Err(invalid(
                "page_token",
                "the token is outside the scan's span",
            ));
        }
        c.lo = key;
    }
    Ok(c)
}

/// Cuts `cursor`'s span at `bounds` (keys strictly inside it, ascending)
/// into pieces in scan order: ascending, or descending for reverse scans.
fn cut(cursor: &Cursor, bounds: &[Bytes], reverse: bool) -> Vec<Cursor> {
    let mut pieces = Vec::with_capacity(bounds.len() + 1);
    let mut lo = cursor.lo.clone();
    for b in bounds {
        debug_assert!(*b > lo && (cursor.hi.is_empty() || *b < cursor.hi));
        pieces.push(Cursor {
            lo: std::mem::replace(&mut lo, b.clone()),
            hi: b.clone(),
        });
    }
    pieces.push(Cursor {
        lo,
        hi: cursor.hi.clone(),
    });
    if reverse {
        pieces.reverse();
    }
    pieces
}

impl Client {
    /// Reads one page of keys in `[start, end)`, in key order (descending
    /// with `reverse`), across range boundaries.
    ///
    /// Pass the page's `next_page_token` as `page_token` to continue. The
    /// token names a key, not a range, so a scan paged while ranges split or
    /// merge still returns every key of the span exactly once.
    ///
    /// ```no_run
    /// # async fn demo(client: lmskv_client::Client) -> Result<(), lmskv_client::ClientError> {
    /// use lmskv_client::{ReadConsistency, ScanOptions};
    ///
    /// let mut opts = ScanOptions {
    ///     start: "course/".into(),
    ///     end: "course0".into(),
    ///     limit: 100,
    ///     consistency: ReadConsistency::ConsistentPrefix,
    ///     ..Default::default()
    /// };
    /// loop {
    ///     let page = client.scan(&opts).await?;
    ///     for kv in &page.kvs {
    ///         println!("{:?} = {:?}", kv.key, kv.value);
    ///     }
    ///     match page.next_page_token {
    ///         Some(t) => opts.page_token = t,
    ///         None => break,
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn scan(&self, opts: &ScanOptions) -> Result<ScanPage, ClientError> {
        let cursor = start_cursor(opts)?;
        let limit = if opts.limit == 0 {
            SCAN_LIMIT_DEFAULT
        } else {
            opts.limit
        } as usize;
        let budget = Budget::new(&self.retry);
        if cursor.is_empty() {
            return Ok(ScanPage {
                kvs: Vec::new(),
                next_page_token: None,
            });
        }
        // Locating the first range also caches the ranges after it, so the
        // cut below usually sees the boundaries the page will cross.
        // A failure here is retried inside the pieces.
        let anchor = if opts.reverse { &cursor.hi } else { &cursor.lo };
        let _ = self.locate(anchor, opts.reverse, budget.deadline).await;
        let pieces = cut(
            &cursor,
            &self
                .inner
                .routes
                .boundaries(&cursor.lo, &cursor.hi, SCAN_PIECES_MAX),
            opts.reverse,
        );
        if pieces.len() == 1 {
            return self.scan_piece(cursor, limit, opts, budget).await;
        }
        let last_piece = pieces.len() - 1;
        let mut results = stream::iter(pieces.into_iter().enumerate())
            .map(|(i, piece)| {
                let b = budget.fork();
                async move {
                    let page = self.scan_piece(piece.clone(), limit, opts, b).await;
                    (i, piece, page)
                }
            })
            .buffered(SCAN_FANOUT_CONCURRENCY_MAX);
        let mut kvs: Vec<KeyValue> = Vec::new();
        while let Some((i, piece, page)) = results.next().await {
            let page = page?;
            let room = limit - kvs.len();
            if page.kvs.len() < room {
                // The piece is exhausted (it stops early only at the limit).
                debug_assert!(page.next_page_token.is_none());
                kvs.extend(page.kvs);
                continue;
            }
            let truncated = page.kvs.len() > room;
            kvs.extend(page.kvs.into_iter().take(room));
            let next_page_token = if truncated {
                let last = &kvs[kvs.len() - 1].key;
                Some(if opts.reverse {
                    encode_token(true, last)
                } else {
                    encode_token(false, &successor(last))
                })
            } else if page.next_page_token.is_some() {
                page.next_page_token
            } else if i < last_piece {
                // Exactly full at the piece's end: go on with the next piece.
                Some(if opts.reverse {
                    encode_token(true, &piece.lo)
                } else {
                    encode_token(false, &piece.hi)
                })
            } else {
                None
            };
            return Ok(ScanPage {
                kvs,
                next_page_token,
            });
        }
        Ok(ScanPage {
            kvs,
            next_page_token: None,
        })
    }

    /// Reads up to `limit` keys of `cursor`'s span in scan order, walking the
    /// ranges that cover it one after another. The page token it returns
    /// (when it stopped at the limit) resumes within the span.
    async fn scan_piece(
        &self,
        mut cursor: Cursor,
        limit: usize,
        opts: &ScanOptions,
        mut budget: Budget,
    ) -> Result<ScanPage, ClientError> {
        let mut kvs: Vec<KeyValue> = Vec::new();
        loop {
            if cursor.is_empty() {
                return Ok(ScanPage {
                    kvs,
                    next_page_token: None,
                });
            }
            if kvs.len() >= limit {
                let resume = if opts.reverse { &cursor.hi } else { &cursor.lo };
                return Ok(ScanPage {
                    kvs,
                    next_page_token: Some(encode_token(opts.reverse, resume)),
                });
            }
            let req = v1::ScanRequest {
                header: None,
                start_key: cursor.lo.clone(),
                end_key: cursor.hi.clone(),
                limit: (limit - kvs.len()) as u32,
                reverse: opts.reverse,
                page_token: Bytes::new(),
                read: None,
                keys_only: opts.keys_only,
            };
            let anchor = if opts.reverse {
                cursor.hi.clone()
            } else {
                cursor.lo.clone()
            };
            let mut range_budget = budget.fork();
            let (resp, desc) = match self
                .range_call(
                    &mut range_budget,
                    &anchor,
                    opts.reverse,
                    self.read_route(&opts.consistency),
                    &|_| true,
                    |mut c, header| {
                        let req = v1::ScanRequest {
                            read: Some(self.read_options(&opts.consistency, &header)),
                            header: Some(header),
                            ..req.clone()
                        };
                        async move { c.scan(req).await }
                    },
                )
                .await
            {
                Ok(r) => r,
                Err(RangeCallError::Failed(e)) => return Err(e),
                Err(RangeCallError::Regroup(_)) => unreachable!("every range fits a scan"),
            };
            budget = range_budget;
            let got: Vec<KeyValue> = resp.kvs.into_iter().map(Into::into).collect();
            // Keys must come in order and inside what is left of the span;
            // anything else would repeat or skip keys.
            let in_span = |k: &[u8]| {
                k >= cursor.lo.as_ref() && (cursor.hi.is_empty() || k < cursor.hi.as_ref())
            };
            let mut prev: Option<&Bytes> = kvs.last().map(|kv| &kv.key);
            for kv in &got {
                let ordered = prev.is_none_or(|p| {
                    if opts.reverse {
                        kv.key < *p
                    } else {
                        kv.key > *p
                    }
                });
                if !in_span(&kv.key) || !ordered {
                    return Err(ClientError::Server(lmskv_proto::error::Error::internal(
                        format!(
                            "range {} returned key {:?} out of order or outside the scan",
                            desc.range_id,
                            lmskv_proto::keys::escape(&kv.key)
                        ),
                    )));
                }
                prev = Some(&kv.key);
            }
            let last = got.last().map(|kv| kv.key.clone());
            kvs.extend(got);
            if !resp.next_page_token.is_empty() {
                // The range has more: continue after the last key it sent,
                // or from where its own token says when it sent none.
                let resume = match last {
                    Some(k) => k,
                    None => resp.next_page_token.slice(1..),
                };
                if opts.reverse {
                    cursor.hi = resume;
                } else {
                    cursor.lo = match kvs.last() {
                        Some(kv) if kv.key == resume => successor(&resume),
                        _ => resume,
                    };
                }
                continue;
            }
            // The range is done: move to its neighbour.
            if opts.reverse {
                if desc.start_key.as_ref() <= cursor.lo.as_ref() {
                    cursor.hi = cursor.lo.clone();
                } else {
                    cursor.hi = desc.start_key.clone();
                }
            } else if desc.end_key.is_empty()
                || (!cursor.hi.is_empty() && desc.end_key >= cursor.hi)
            {
                cursor.lo = if cursor.hi.is_empty() {
                    // Past the last range: nothing is left.
                    return Ok(ScanPage {
                        kvs,
                        next_page_token: None,
                    });
                } else {
                    cursor.hi.clone()
                };
            } else {
                cursor.lo = desc.end_key.clone();
            }
        }
    }

    /// Reads up to `max` pairs of a scan, following pages.
    pub async fn scan_all(
        &self,
        opts: &ScanOptions,
        max: usize,
    ) -> Result<Vec<KeyValue>, ClientError> {
        let mut out = Vec::new();
        let mut o = opts.clone();
        loop {
            let page = self.scan(&o).await?;
            out.extend(page.kvs);
            if out.len() >= max {
                out.truncate(max);
                return Ok(out);
            }
            match page.next_page_token {
                Some(t) => o.page_token = t,
                None => return Ok(out),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(start: &str, end: &str, reverse: bool, token: Bytes) -> ScanOptions {
        ScanOptions {
            start: Bytes::copy_from_slice(start.as_bytes()),
            end: Bytes::copy_from_slice(end.as_bytes()),
            reverse,
            page_token: token,
            ..Default::default()
        }
    }

    #[test]
    fn tokens_resume_where_they_say() {
        let c = start_cursor(&opts("a", "z", false, encode_token(false, b"m"))).unwrap();
        assert_eq!((c.lo.as_ref(), c.hi.as_ref()), (&b"m"[..], &b"z"[..]));
        let c = start_cursor(&opts("a", "", true, encode_token(true, b"m"))).unwrap();
        assert_eq!((c.lo.as_ref(), c.hi.as_ref()), (&b"a"[..], &b"m"[..]));
        let c = start_cursor(&opts("", "", false, Bytes::new())).unwrap();
        assert_eq!(c.lo.as_ref(), USER_SPACE_START);
    }

    #[test]
    fn bad_tokens_and_bounds_are_refused() {
        let wrong_dir = opts("a", "z", true, encode_token(false, b"m"));
        assert!(start_cursor(&wrong_dir).is_err());
        let outside = opts("a", "c", false, encode_token(false, b"x"));
        assert!(start_cursor(&outside).is_err());
        let system = opts("\x00meta", "", false, Bytes::new());
        assert!(start_cursor(&system).is_err());
        let big = ScanOptions {
            limit: SCAN_LIMIT_MAX + 1,
            ..Default::default()
        };
        assert!(start_cursor(&big).is_err());
    }

    #[test]
    fn an_exhausted_span_is_empty() {
        let c = Cursor {
            lo: Bytes::from_static(b"m"),
            hi: Bytes::from_static(b"m"),
        };
        assert!(c.is_empty());
        let c = Cursor {
            lo: Bytes::from_static(b"m"),
            hi: Bytes::new(),
        };
        assert!(!c.is_empty());
    }

    #[test]
    fn a_span_is_cut_at_known_boundaries_in_scan_order() {
        let c = Cursor {
            lo: Bytes::from_static(b"a"),
            hi: Bytes::new(),
        };
        let bounds = [Bytes::from_static(b"f"), Bytes::from_static(b"m")];
        let spans = |v: Vec<Cursor>| -> Vec<(String, String)> {
            v.into_iter()
                .map(|c| {
                    (
                        String::from_utf8(c.lo.to_vec()).unwrap(),
                        String::from_utf8(c.hi.to_vec()).unwrap(),
                    )
                })
                .collect()
        };
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            spans(cut(&c, &bounds, false)),
            vec![s("a", "f"), s("f", "m"), s("m", "")]
        );
        assert_eq!(
            spans(cut(&c, &bounds, true)),
            vec![s("m", ""), s("f", "m"), s("a", "f")]
        );
        assert_eq!(spans(cut(&c, &[], false)), vec![s("a", "")]);
    }
}
