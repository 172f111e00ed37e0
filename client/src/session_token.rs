//! [`SessionToken`]: what a session has seen, per range, so that a later
//! SESSION read can ask any replica for state at least that new.
//!
//! A token maps a range id to the highest applied log index the session has
//! observed on that range (from its writes and reads). Log indexes of different
//! ranges are unrelated (a range made by a split starts its own log), so an
//! index is only ever compared with the log of the range it came from.
//!
//! The map is bounded by [`SESSION_TOKEN_RANGES_MAX`]. When a session touches
//! more ranges, the entry with the lowest index is dropped and the token
//! remembers that it is *truncated*: a range it has no entry for may then
//! hold one of the session's writes, so reads of such ranges go to the leader
//! as STRONG reads, which see every write. Read-your-writes is never lost,
//! only made slower for the forgotten ranges.
//!
//! The string form is what the CLI prints and accepts: `RANGE:INDEX` pairs
//! separated by commas (`1:42,7:99`), with a final `*` when the token is
//! truncated (`1:42,7:99,*`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Ranges one token remembers at most. Beyond this, the entry with the lowest
/// index is dropped and the token is marked truncated.
pub const SESSION_TOKEN_RANGES_MAX: usize = 64;

/// Longest string form accepted by [`SessionToken::from_str`], in bytes.
const SESSION_TOKEN_TEXT_BYTES_MAX: usize = SESSION_TOKEN_RANGES_MAX * 42 + 2;

/// The applied index a session has observed, per range.
///
/// Tokens only grow: [`SessionToken::observe`] and [`SessionToken::merge`]
/// keep the higher index of each range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SessionToken {
    indexes: BTreeMap<u64, u64>,
    /// Entries were dropped to keep the map bounded: ranges without an entry
    /// may hold writes of this session.
    truncated: bool,
}

/// What a SESSION read of one range must wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionBound {
    /// A replica that has applied at least this index may serve the read
    /// (0: any replica).
    AppliedIndex(u64),
    /// The token forgot this range: only a STRONG read is sure to see the
    /// session's writes there.
    Leader,
}

/// Why a string is not a [`SessionToken`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSessionTokenError {
    /// The text is empty.
    #[error("empty session token")]
    Empty,
    /// The text is longer than any valid token.
    #[error("session token is longer than {SESSION_TOKEN_TEXT_BYTES_MAX} bytes")]
    TooLong,
    /// A part is not `RANGE:INDEX` (or the final `*`).
    #[error(
        "bad session token part {part:?}: use RANGE:INDEX[,RANGE:INDEX...] as printed by a write"
    )]
    BadPart { part: String },
    /// More ranges than a token holds.
    #[error("session token names more than {SESSION_TOKEN_RANGES_MAX} ranges")]
    TooManyRanges,
}

impl SessionToken {
    /// An empty token: it constrains no read.
    pub fn new() -> Self {
        SessionToken::default()
    }

    /// A token for one range.
    pub fn for_range(range_id: u64, index: u64) -> Self {
        let mut t = SessionToken::new();
        t.observe(range_id, index);
        t
    }

    /// Records that the session has seen `range_id` at `index`. Index 0 is
    /// the empty log and records nothing.
    pub fn observe(&mut self, range_id: u64, index: u64) {
        if index == 0 {
            return;
        }
        let e = self.indexes.entry(range_id).or_insert(0);
        *e = (*e).max(index);
        self.enforce_bound(range_id);
    }

    /// Keeps, for every range, the higher index of `self` and `other`.
    pub fn merge(&mut self, other: &SessionToken) {
        self.truncated |= other.truncated;
        for (&range_id, &index) in &other.indexes {
            self.observe(range_id, index);
        }
    }

    /// The index a replica of `range_id` must have applied to serve this
    /// session (0 when the session has seen nothing of that range).
    pub fn index_for(&self, range_id: u64) -> u64 {
        self.indexes.get(&range_id).copied().unwrap_or(0)
    }

    /// What a SESSION read of `range_id` must wait for.
    pub fn bound_for(&self, range_id: u64) -> SessionBound {
        match self.indexes.get(&range_id) {
            Some(&i) => SessionBound::AppliedIndex(i),
            None if self.truncated => SessionBound::Leader,
            None => SessionBound::AppliedIndex(0),
        }
    }

    /// Whether entries were dropped to keep the token bounded.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Whether the token constrains nothing.
    pub fn is_empty(&self) -> bool {
        self.indexes.is_empty() && !self.truncated
    }

    /// Ranges the token names.
    pub fn len(&self) -> usize {
        self.indexes.len()
    }

    /// `(range_id, index)` pairs in range order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.indexes.iter().map(|(r, i)| (*r, *i))
    }

    /// The read level that asks for at least this token's state.
    pub fn read_consistency(&self) -> crate::ReadConsistency {
        crate::ReadConsistency::Session(self.clone())
    }

    fn enforce_bound(&mut self, keep: u64) {
        while self.indexes.len() > SESSION_TOKEN_RANGES_MAX {
            let victim = self
                .indexes
                .iter()
                .filter(|(r, _)| **r != keep)
                .min_by_key(|(_, i)| **i)
                .map(|(r, _)| *r);
            match victim {
                Some(r) => {
                    self.indexes.remove(&r);
                    self.truncated = true;
                }
                None => break,
            }
        }
        debug_assert!(self.indexes.len() <= SESSION_TOKEN_RANGES_MAX);
    }
}

impl fmt::Display for SessionToken {
    /// `1:42,7:99`, with `,*` appended when truncated (`*` alone when it
    /// names no range); the empty token prints as nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, (r, i)) in self.indexes.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}:{i}")?;
        }
        if self.truncated {
            if !self.indexes.is_empty() {
                f.write_str(",")?;
            }
            f.write_str("*")?;
        }
        Ok(())
    }
}

impl FromStr for SessionToken {
    type Err = ParseSessionTokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ParseSessionTokenError::Empty);
        }
        if s.len() > SESSION_TOKEN_TEXT_BYTES_MAX {
            return Err(ParseSessionTokenError::TooLong);
        }
        let bad = |part: &str| ParseSessionTokenError::BadPart { part: part.into() };
        let number = |part: &str, text: &str| text.trim().parse::<u64>().map_err(|_| bad(part));
        let mut t = SessionToken::new();
        let parts: Vec<&str> = s.split(',').collect();
        for (n, part) in parts.iter().enumerate() {
            if part.trim() == "*" && n == parts.len() - 1 {
                t.truncated = true;
                continue;
            }
            let (r, i) = part.split_once(':').ok_or_else(|| bad(part))?;
            let (r, i) = (number(part, r)?, number(part, i)?);
            if r == 0 {
                return Err(bad(part));
            }
            if i == 0 {
                continue;
            }
            if !t.indexes.contains_key(&r) && t.indexes.len() == SESSION_TOKEN_RANGES_MAX {
                return Err(ParseSessionTokenError::TooManyRanges);
            }
            t.observe(r, i);
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observe_and_merge_keep_the_highest_index_per_range() {
        let mut a = SessionToken::for_range(1, 10);
        a.observe(1, 7);
        assert_eq!(a.index_for(1), 10);
        let mut b = SessionToken::for_range(1, 12);
        b.observe(7, 99);
        a.merge(&b);
        assert_eq!(a.index_for(1), 12);
        assert_eq!(a.index_for(7), 99);
        assert_eq!(a.index_for(3), 0);
        // Merging is commutative and idempotent.
        let mut c = b.clone();
        c.merge(&SessionToken::for_range(1, 10));
        assert_eq!(a, c);
        c.merge(&a.clone());
        assert_eq!(a, c);
    }

    #[test]
    fn index_zero_records_nothing() {
        let mut t = SessionToken::new();
        t.observe(1, 0);
        assert!(t.is_empty());
        assert_eq!(t.to_string(), "");
        assert_eq!("1:0".parse::<SessionToken>(), Ok(SessionToken::new()));
    }

    #[test]
    fn an_index_binds_only_its_own_range() {
        // A split's right-hand range starts a new log: a high index seen on
        // another range must not hold its reads back.
        let t = SessionToken::for_range(1, 5_000);
        assert_eq!(t.bound_for(1), SessionBound::AppliedIndex(5_000));
        assert_eq!(t.bound_for(2), SessionBound::AppliedIndex(0));
    }

    #[test]
    fn the_text_form_round_trips() {
        assert_eq!(SessionToken::for_range(3, 42).to_string(), "3:42");
        let t: SessionToken = " 1:42, 7:99 ".parse().unwrap();
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![(1, 42), (7, 99)]);
        assert_eq!(t.to_string(), "1:42,7:99");
        assert_eq!(t.to_string().parse::<SessionToken>(), Ok(t));
        // A repeated range keeps its highest index.
        let t: SessionToken = "3:5,3:9,3:1".parse().unwrap();
        assert_eq!(t.index_for(3), 9);
    }

    #[test]
    fn bad_text_is_rejected() {
        for bad in [
            "x",
            "-1",
            "42",
            "0:42",
            "1:",
            ":5",
            "1:2,",
            "1:2,3",
            "1:2:3",
            "*,1:2",
            "1:18446744073709551616",
        ] {
            assert!(bad.parse::<SessionToken>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            "  ".parse::<SessionToken>(),
            Err(ParseSessionTokenError::Empty)
        );
        let too_many: Vec<String> = (1..=SESSION_TOKEN_RANGES_MAX as u64 + 1)
            .map(|r| format!("{r}:1"))
            .collect();
        assert_eq!(
            too_many.join(",").parse::<SessionToken>(),
            Err(ParseSessionTokenError::TooManyRanges)
        );
        assert_eq!(
            "1".repeat(SESSION_TOKEN_TEXT_BYTES_MAX + 1)
                .parse::<SessionToken>(),
            Err(ParseSessionTokenError::TooLong)
        );
    }

    #[test]
    fn a_bounded_token_sends_forgotten_ranges_to_the_leader() {
        let mut t = SessionToken::new();
        for r in 1..=SESSION_TOKEN_RANGES_MAX as u64 {
            t.observe(r, 100 + r);
        }
        assert!(!t.is_truncated());
        assert_eq!(t.bound_for(1_000), SessionBound::AppliedIndex(0));
        t.observe(1_000, 5);
        assert_eq!(t.len(), SESSION_TOKEN_RANGES_MAX);
        assert!(t.is_truncated());
        assert_eq!(t.index_for(1_000), 5, "the entry just observed stays");
        assert_eq!(
            t.bound_for(1),
            SessionBound::Leader,
            "the lowest other index was dropped"
        );
        assert_eq!(t.bound_for(2), SessionBound::AppliedIndex(102));
        assert_eq!(t.bound_for(5_000), SessionBound::Leader);
        // The mark survives the text form and merges.
        let text = t.to_string();
        assert!(text.ends_with(",*"), "{text}");
        let parsed: SessionToken = text.parse().unwrap();
        assert_eq!(parsed, t);
        let mut fresh = SessionToken::for_range(9, 1);
        fresh.merge(&parsed);
        assert!(fresh.is_truncated());
        assert_eq!(
            "*".parse::<SessionToken>().unwrap().bound_for(1),
            SessionBound::Leader
        );
    }
}
