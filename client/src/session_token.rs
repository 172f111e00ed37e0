//! [`SessionToken`]: what a session has seen, per range, so that a later
//! SESSION read can ask any replica for state at least that new.
//!
//! A token maps a range id to the highest applied log index the session has
//! observed on that range (from its writes and reads). Log indexes of different
//! ranges are unrelated, so the map is kept per range; it is small and bounded
//! by [`SESSION_TOKEN_RANGES_MAX`].
//!
//! The string form is what the CLI prints and accepts: a token for one range
//! is just the decimal index (`42`); the general form lists `RANGE:INDEX` pairs
//! (`1:42,7:99`). A bare index names no range ([`ANY_RANGE`]) and binds every
//! range, which is exact while the key space is one range.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Ranges one token remembers at most. Beyond this, the entry with the lowest
/// index is dropped: being the oldest write it is the most likely to be
/// applied everywhere already, so dropping it costs the least.
pub const SESSION_TOKEN_RANGES_MAX: usize = 64;

/// The range id of an entry that binds whichever range serves a read (the
/// same meaning `range_id = 0` has in a request header).
pub const ANY_RANGE: u64 = 0;

/// Longest string form accepted by [`SessionToken::from_str`], in bytes.
const SESSION_TOKEN_TEXT_BYTES_MAX: usize = SESSION_TOKEN_RANGES_MAX * 42;

/// The applied index a session has observed, per range.
///
/// Tokens only grow: [`SessionToken::observe`] and [`SessionToken::merge`]
/// keep the higher index of each range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SessionToken {
    indexes: BTreeMap<u64, u64>,
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
    /// A part is neither `INDEX` (alone) nor `RANGE:INDEX`.
    #[error("bad session token part {part:?}: use INDEX or RANGE:INDEX[,RANGE:INDEX...]")]
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

    /// A token that binds every range to `index` (what a bare `42` parses to).
    pub fn from_index(index: u64) -> Self {
        SessionToken::for_range(ANY_RANGE, index)
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
        for (&range_id, &index) in &other.indexes {
            self.observe(range_id, index);
        }
    }

    /// The index a replica of `range_id` must have applied to serve this
    /// session: the range's own entry or the range-less one, whichever is higher.
    pub fn index_for(&self, range_id: u64) -> u64 {
        let own = self.indexes.get(&range_id).copied().unwrap_or(0);
        let any = self.indexes.get(&ANY_RANGE).copied().unwrap_or(0);
        own.max(any)
    }

    /// The highest index of any range. While the client lets the node pick
    /// the range (the key space is one range), this is the bound a SESSION
    /// read needs.
    pub fn max_index(&self) -> u64 {
        self.indexes.values().copied().max().unwrap_or(0)
    }

    /// Whether the token constrains nothing.
    pub fn is_empty(&self) -> bool {
        self.indexes.is_empty()
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
        crate::ReadConsistency::Session(self.max_index())
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
                }
                None => break,
            }
        }
        debug_assert!(self.indexes.len() <= SESSION_TOKEN_RANGES_MAX);
    }
}

impl fmt::Display for SessionToken {
    /// One range: the bare index (`42`); several: `1:42,7:99`; none: `0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.indexes.len() <= 1 {
            return write!(f, "{}", self.max_index());
        }
        for (n, (r, i)) in self.indexes.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}:{i}")?;
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
        if !s.contains([':', ',']) {
            return Ok(SessionToken::from_index(number(s, s)?));
        }
        let mut t = SessionToken::new();
        for part in s.split(',') {
            let (r, i) = part.split_once(':').ok_or_else(|| bad(part))?;
            let (r, i) = (number(part, r)?, number(part, i)?);
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
        assert_eq!(a.max_index(), 99);
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
        assert_eq!(t.to_string(), "0");
        assert_eq!("0".parse::<SessionToken>(), Ok(SessionToken::new()));
    }

    #[test]
    fn a_range_less_entry_binds_every_range() {
        let mut t = SessionToken::from_index(40);
        t.observe(1, 30);
        t.observe(2, 50);
        assert_eq!(t.index_for(1), 40);
        assert_eq!(t.index_for(2), 50);
        assert_eq!(t.index_for(9), 40);
    }

    #[test]
    fn one_range_prints_as_the_bare_index() {
        assert_eq!(SessionToken::for_range(1, 42).to_string(), "42");
        let parsed: SessionToken = "42".parse().unwrap();
        assert_eq!(parsed, SessionToken::from_index(42));
        assert_eq!(parsed.index_for(1), 42);
        assert_eq!(
            parsed.read_consistency(),
            crate::ReadConsistency::Session(42)
        );
    }

    #[test]
    fn the_general_form_round_trips() {
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
            "1:",
            ":5",
            "1:2,",
            "1:2,3",
            "1:2:3",
            "18446744073709551616",
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
    fn the_map_is_bounded_and_drops_the_lowest_index() {
        let mut t = SessionToken::new();
        for r in 1..=SESSION_TOKEN_RANGES_MAX as u64 {
            t.observe(r, 100 + r);
        }
        assert_eq!(t.len(), SESSION_TOKEN_RANGES_MAX);
        t.observe(1_000, 5);
        assert_eq!(t.len(), SESSION_TOKEN_RANGES_MAX);
        assert_eq!(t.index_for(1_000), 5, "the entry just observed stays");
        assert_eq!(t.index_for(1), 0, "the lowest other index was dropped");
        assert_eq!(t.index_for(2), 102);
    }
}
