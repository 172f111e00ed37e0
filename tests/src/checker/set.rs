//! [`check_set`]: the checker for a grow-only set workload.
//!
//! Clients add distinct elements (for example one key per element, or
//! elements appended to a value) and, at the end, one read returns the whole
//! set. An add the store acknowledged must be in that read; an add whose
//! outcome is unknown may or may not be; nothing may appear that no client
//! tried to add. Adds that definitely failed are simply left out of both
//! input sets: finding them in the read makes them phantoms.

use std::collections::BTreeSet;

/// What [`check_set`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetReport<T> {
    /// Acknowledged adds missing from the final read.
    pub lost: BTreeSet<T>,
    /// Elements in the final read that no client tried to add.
    pub phantom: BTreeSet<T>,
    /// Adds with an unknown outcome that the final read shows took effect.
    pub recovered: BTreeSet<T>,
    /// How many acknowledged adds the final read has.
    pub acknowledged_present: usize,
    /// How many adds with an unknown outcome the final read lacks (allowed).
    pub unknown_absent: usize,
}

impl<T> SetReport<T> {
    /// Whether the set behaved correctly: nothing lost, nothing phantom.
    pub fn is_ok(&self) -> bool {
        self.lost.is_empty() && self.phantom.is_empty()
    }
}

/// Compares the final read of a set with the adds clients attempted.
///
/// `acknowledged` are the adds the store confirmed, `unknown` those whose
/// outcome the client could not learn (an element in both counts as
/// acknowledged), and `final_read` what the last read returned.
pub fn check_set<T: Ord + Clone>(
    acknowledged: &BTreeSet<T>,
    unknown: &BTreeSet<T>,
    final_read: &BTreeSet<T>,
) -> SetReport<T> {
    let lost: BTreeSet<T> = acknowledged.difference(final_read).cloned().collect();
    let phantom: BTreeSet<T> = final_read
        .iter()
        .filter(|e| !acknowledged.contains(e) && !unknown.contains(e))
        .cloned()
        .collect();
    let recovered: BTreeSet<T> = unknown
        .iter()
        .filter(|e| !acknowledged.contains(e) && final_read.contains(e))
        .cloned()
        .collect();
    let unknown_absent = unknown
        .iter()
        .filter(|e| !acknowledged.contains(e) && !final_read.contains(e))
        .count();
    SetReport {
        acknowledged_present: acknowledged.len() - lost.len(),
        lost,
        phantom,
        recovered,
        unknown_absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(xs: &[u32]) -> BTreeSet<u32> {
        xs.iter().copied().collect()
    }

    #[test]
    fn complete_read_is_ok() {
        let r = check_set(&set(&[1, 2, 3]), &set(&[4, 5]), &set(&[1, 2, 3, 5]));
        assert!(r.is_ok());
        assert_eq!(r.recovered, set(&[5]));
        assert_eq!(r.acknowledged_present, 3);
        assert_eq!(r.unknown_absent, 1);
    }

    #[test]
    fn missing_acknowledged_add_is_lost() {
        let r = check_set(&set(&[1, 2, 3]), &set(&[]), &set(&[1, 3]));
        assert!(!r.is_ok());
        assert_eq!(r.lost, set(&[2]));
        assert!(r.phantom.is_empty());
    }

    #[test]
    fn unattempted_element_is_phantom() {
        let r = check_set(&set(&[1]), &set(&[2]), &set(&[1, 2, 7]));
        assert!(!r.is_ok());
        assert_eq!(r.phantom, set(&[7]));
        assert!(r.lost.is_empty());
    }

    #[test]
    fn element_both_acknowledged_and_unknown_counts_as_acknowledged() {
        let r = check_set(&set(&[1]), &set(&[1]), &set(&[]));
        assert_eq!(r.lost, set(&[1]));
        assert!(r.recovered.is_empty());
        assert_eq!(r.unknown_absent, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every attempted element lands in exactly one bucket, and the
        /// verdict is the definition.
        #[test]
        fn buckets_partition_the_elements(
            acked in proptest::collection::btree_set(0u8..32, 0..16),
            unknown in proptest::collection::btree_set(0u8..32, 0..16),
            read in proptest::collection::btree_set(0u8..32, 0..16),
        ) {
            let r = check_set(&acked, &unknown, &read);
            prop_assert_eq!(r.acknowledged_present + r.lost.len(), acked.len());
            let unknown_only = unknown.difference(&acked).count();
            prop_assert_eq!(r.recovered.len() + r.unknown_absent, unknown_only);
            prop_assert_eq!(
                r.acknowledged_present + r.recovered.len() + r.phantom.len(),
                read.len()
            );
            let expect_ok = acked.is_subset(&read)
                && read.iter().all(|e| acked.contains(e) || unknown.contains(e));
            prop_assert_eq!(r.is_ok(), expect_ok);
        }
    }
}
