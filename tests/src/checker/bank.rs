//! [`check_bank`]: the checker for a bank-transfer workload.
//!
//! Clients move money between accounts with atomic transfers that never
//! overdraw, and read all balances now and then in one consistent snapshot.
//! Whatever faults happen, every snapshot and the final state must hold the
//! same accounts as at the start, with the same total, and no balance may be
//! negative. A transfer whose outcome is unknown changes nothing here: it
//! either happened whole or not at all, and both keep the total.
//!
//! Every account must appear in every read: a workload that stores a zero
//! balance by deleting the key must fill the zero in before checking.

use std::collections::BTreeMap;
use std::fmt;

/// How many anomalies a report lists; the rest are only counted.
pub const BANK_ANOMALIES_MAX: usize = 1_000;

/// Which read of the balances an anomaly was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReadLabel {
    /// The initial balances the caller passed in.
    Initial,
    /// The intermediate snapshot at this index of the caller's list.
    Snapshot(usize),
    /// The final balances.
    Final,
}

impl fmt::Display for ReadLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadLabel::Initial => write!(f, "initial balances"),
            ReadLabel::Snapshot(i) => write!(f, "snapshot {i}"),
            ReadLabel::Final => write!(f, "final balances"),
        }
    }
}

/// One thing wrong with one read of the balances.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BankAnomaly<A: fmt::Debug> {
    /// The balances do not add up to the initial total.
    #[error("{read}: total is {total}, expected {expected}")]
    WrongTotal {
        /// The read.
        read: ReadLabel,
        /// Its total.
        total: i128,
        /// The initial total.
        expected: i128,
    },
    /// An account is overdrawn.
    #[error("{read}: account {account:?} has negative balance {balance}")]
    NegativeBalance {
        /// The read.
        read: ReadLabel,
        /// The account.
        account: A,
        /// Its balance.
        balance: i64,
    },
    /// An account that did not exist at the start.
    #[error("{read}: unexpected account {account:?} with balance {balance}")]
    UnexpectedAccount {
        /// The read.
        read: ReadLabel,
        /// The account.
        account: A,
        /// Its balance.
        balance: i64,
    },
    /// An account of the initial balances is not in the read.
    #[error("{read}: account {account:?} is missing")]
    MissingAccount {
        /// The read.
        read: ReadLabel,
        /// The account.
        account: A,
    },
}

/// What [`check_bank`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BankReport<A: fmt::Debug> {
    /// The total of the initial balances, which every read must have.
    pub expected_total: i128,
    /// How many reads were checked (snapshots and the final one).
    pub reads_checked: usize,
    /// The anomalies, in read order, at most [`BANK_ANOMALIES_MAX`].
    pub anomalies: Vec<BankAnomaly<A>>,
    /// How many more anomalies were found and not listed.
    pub anomalies_omitted: usize,
}

impl<A: fmt::Debug> BankReport<A> {
    /// Whether every read conserved the total with no negative balance.
    pub fn is_ok(&self) -> bool {
        self.anomalies.is_empty() && self.anomalies_omitted == 0
    }
}

impl<A: fmt::Debug> fmt::Display for BankReport<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ok() {
            return write!(
                f,
                "ok: {} read(s) keep the total of {}",
                self.reads_checked, self.expected_total
            );
        }
        let n = self.anomalies.len() + self.anomalies_omitted;
        write!(
            f,
            "{n} {} in {} read(s)",
            if n == 1 { "anomaly" } else { "anomalies" },
            self.reads_checked
        )?;
        for a in &self.anomalies {
            write!(f, "\n  {a}")?;
        }
        if self.anomalies_omitted > 0 {
            write!(f, "\n  ... and {} more", self.anomalies_omitted)?;
        }
        Ok(())
    }
}

/// Checks `snapshots` (intermediate reads, each of all accounts at one
/// moment) and `final_balances` against `initial`: same accounts, same
/// total, no negative balance. The initial balances are checked for negative
/// balances too.
pub fn check_bank<A: Ord + Clone + fmt::Debug>(
    initial: &BTreeMap<A, i64>,
    snapshots: &[BTreeMap<A, i64>],
    final_balances: &BTreeMap<A, i64>,
) -> BankReport<A> {
    let expected: i128 = initial.values().map(|&b| i128::from(b)).sum();
    let mut report = BankReport {
        expected_total: expected,
        reads_checked: snapshots.len() + 1,
        anomalies: Vec::new(),
        anomalies_omitted: 0,
    };
    let mut found = |a: BankAnomaly<A>| {
        if report.anomalies.len() < BANK_ANOMALIES_MAX {
            report.anomalies.push(a);
        } else {
            report.anomalies_omitted += 1;
        }
    };
    let reads = std::iter::once((ReadLabel::Initial, initial))
        .chain(
            snapshots
                .iter()
                .enumerate()
                .map(|(i, s)| (ReadLabel::Snapshot(i), s)),
        )
        .chain(std::iter::once((ReadLabel::Final, final_balances)));
    for (read, balances) in reads {
        for (account, &balance) in balances {
            if balance < 0 {
                found(BankAnomaly::NegativeBalance {
                    read,
                    account: account.clone(),
                    balance,
                });
            }
            if !initial.contains_key(account) {
                found(BankAnomaly::UnexpectedAccount {
                    read,
                    account: account.clone(),
                    balance,
                });
            }
        }
        if read == ReadLabel::Initial {
            continue;
        }
        for account in initial.keys().filter(|a| !balances.contains_key(*a)) {
            found(BankAnomaly::MissingAccount {
                read,
                account: account.clone(),
            });
        }
        let total: i128 = balances.values().map(|&b| i128::from(b)).sum();
        if total != expected {
            found(BankAnomaly::WrongTotal {
                read,
                total,
                expected,
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn accounts(bs: &[i64]) -> BTreeMap<u32, i64> {
        bs.iter().enumerate().map(|(i, &b)| (i as u32, b)).collect()
    }

    #[test]
    fn conserved_totals_are_ok() {
        let r = check_bank(
            &accounts(&[10, 10, 10]),
            &[accounts(&[5, 15, 10]), accounts(&[0, 0, 30])],
            &accounts(&[1, 2, 27]),
        );
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.expected_total, 30);
        assert_eq!(r.reads_checked, 3);
    }

    #[test]
    fn wrong_total_in_snapshot_is_reported() {
        let r = check_bank(
            &accounts(&[10, 10]),
            &[accounts(&[10, 10]), accounts(&[5, 10])],
            &accounts(&[10, 10]),
        );
        assert_eq!(
            r.anomalies,
            vec![BankAnomaly::WrongTotal {
                read: ReadLabel::Snapshot(1),
                total: 15,
                expected: 20
            }]
        );
        assert_eq!(
            r.to_string(),
            "1 anomaly in 3 read(s)\n  snapshot 1: total is 15, expected 20"
        );
    }

    #[test]
    fn negative_balance_is_reported_even_when_total_holds() {
        let r = check_bank(&accounts(&[10, 10]), &[], &accounts(&[-5, 25]));
        assert_eq!(
            r.anomalies,
            vec![BankAnomaly::NegativeBalance {
                read: ReadLabel::Final,
                account: 0,
                balance: -5
            }]
        );
    }

    #[test]
    fn missing_and_unexpected_accounts_are_reported() {
        let mut fin = accounts(&[10]);
        fin.insert(7, 10);
        let r = check_bank(&accounts(&[10, 10]), &[], &fin);
        assert_eq!(
            r.anomalies,
            vec![
                BankAnomaly::UnexpectedAccount {
                    read: ReadLabel::Final,
                    account: 7,
                    balance: 10
                },
                BankAnomaly::MissingAccount {
                    read: ReadLabel::Final,
                    account: 1
                },
            ]
        );
    }

    #[test]
    fn anomalies_past_the_limit_are_counted() {
        let snapshots = vec![accounts(&[1]); BANK_ANOMALIES_MAX + 5];
        let r = check_bank(&accounts(&[2]), &snapshots, &accounts(&[2]));
        assert_eq!(r.anomalies.len(), BANK_ANOMALIES_MAX);
        assert_eq!(r.anomalies_omitted, 5);
        assert!(!r.is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any sequence of non-overdrawing transfers keeps every read ok.
        #[test]
        fn transfers_keep_the_bank_ok(
            initial in proptest::collection::vec(0i64..100, 1..6),
            transfers in proptest::collection::vec((0usize..6, 0usize..6, 0i64..50), 0..30),
        ) {
            let start = accounts(&initial);
            let mut now = start.clone();
            let mut snapshots = Vec::new();
            for (from, to, amount) in transfers {
                let (from, to) = ((from % initial.len()) as u32, (to % initial.len()) as u32);
                if now[&from] >= amount {
                    *now.get_mut(&from).unwrap() -= amount;
                    *now.get_mut(&to).unwrap() += amount;
                }
                snapshots.push(now.clone());
            }
            let r = check_bank(&start, &snapshots, &now);
            prop_assert!(r.is_ok(), "{}", r);
        }
    }
}
