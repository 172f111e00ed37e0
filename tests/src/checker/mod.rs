//! Correctness checkers for histories that chaos and simulation runs record.
//!
//! Each checker takes what clients observed and says whether the store
//! behaved correctly, with enough detail to debug it when it did not:
//!
//! - [`check_history`]: linearizability of single-key reads, writes,
//!   compare-and-swaps and deletes. The history is recorded with a
//!   [`HistoryRecorder`] (thread-safe, usable from many async tasks) or built
//!   op by op as a [`History`]. Each key is checked as an independent register
//!   by a bounded Wing–Gong–Lowe search (see [`linearizability`]).
//! - [`check_set`]: a grow-only set workload: no acknowledged add lost, no
//!   element that nobody tried to add.
//! - [`check_bank`]: a bank-transfer workload: the total is conserved and no
//!   balance goes negative, in every snapshot read and in the final state.
//!
//! The checkers are pure functions of their input: they do no I/O and can run
//! on histories from real clusters and from simulations alike.

pub mod bank;
pub mod history;
pub mod linearizability;
mod search;
pub mod set;

#[cfg(test)]
mod crosscheck;

pub use bank::{check_bank, BankAnomaly, BankReport, ReadLabel};
pub use history::{
    History, HistoryError, HistoryOp, HistoryRecorder, Invocation, Op, OpId, Outcome, Ret,
};
pub use linearizability::{check_history, Budget, BudgetExceeded, Report, Verdict, Violation};
pub use set::{check_set, SetReport};
