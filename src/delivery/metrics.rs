//! One appservice's metric handles, which its worker updates once per HTTP attempt
//! ([`AppserviceMetrics`], registered by `crate::ops::metrics`), and the commit times its
//! commit-to-acknowledgement latency is measured from ([`CommitTimes`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::model::Lsn;
use crate::replication::wire::pg_micros_to_system_time;

/// Latency buckets: 5 ms doubling to about 82 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.005, 2.0, 15)
}

pub(crate) fn new_latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// Commit timestamps of the transactions with a change queued for live delivery to at least one
/// appservice and not yet behind the confirmed position, by commit LSN (changes reduced to keys
/// in recording mode are not timed). Pushed by the replication task (once per such
/// transaction), looked up by workers (once per accepted transaction), pruned at each status
/// update. Its size is bounded by what the checkpoint holds back, which the retention budget
/// bounds.
#[derive(Debug, Default)]
pub struct CommitTimes {
    inner: Mutex<VecDeque<(Lsn, i64)>>,
}

impl CommitTimes {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Lsn, i64)>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A transaction committed at `lsn` (increasing) at `micros` (µs since 2000-01-01).
    pub fn push(&self, lsn: Lsn, micros: i64) {
        let mut q = self.lock();
        if q.back().is_none_or(|(last, _)| *last < lsn) {
            q.push_back((lsn, micros));
        }
    }

    /// Forget commits below `lsn` (the confirmed position: nothing below it is pending).
    pub fn prune_below(&self, lsn: Lsn) {
        let mut q = self.lock();
        while q.front().is_some_and(|(l, _)| *l < lsn) {
            q.pop_front();
        }
    }

    /// Forget everything (the stream restarts from the slot).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The commit time of the transaction that committed at `lsn`.
    pub fn get(&self, lsn: Lsn) -> Option<SystemTime> {
        let q = self.lock();
        find(&q, lsn)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

fn find(q: &VecDeque<(Lsn, i64)>, lsn: Lsn) -> Option<SystemTime> {
    q.binary_search_by(|(l, _)| l.cmp(&lsn))
        .ok()
        .and_then(|i| q.get(i))
        .and_then(|(_, micros)| pg_micros_to_system_time(*micros))
}

/// One appservice's metric handles, looked up once. A default value is detached from any
/// registry (for handles built outside a running relay).
#[derive(Debug, Clone)]
pub struct AppserviceMetrics {
    pub(crate) latency: Histogram,
    pub(crate) sent: Counter,
    pub(crate) failed: Counter,
    pub(crate) retried: Counter,
    pub(crate) bytes: Counter,
    pub(crate) entries: Counter,
    pub(crate) oversized: Counter,
    pub(crate) push_rules_failed: Counter,
    pub(crate) worker_restarts: Counter,
    pub(crate) commit_times: Arc<CommitTimes>,
}

impl Default for AppserviceMetrics {
    fn default() -> Self {
        AppserviceMetrics {
            latency: new_latency_histogram(),
            sent: Counter::default(),
            failed: Counter::default(),
            retried: Counter::default(),
            bytes: Counter::default(),
            entries: Counter::default(),
            oversized: Counter::default(),
            push_rules_failed: Counter::default(),
            worker_restarts: Counter::default(),
            commit_times: Arc::new(CommitTimes::default()),
        }
    }
}

impl AppserviceMetrics {
    /// A transaction was accepted after `attempts` attempts.
    pub fn delivered(&self, bytes: usize, entries: usize, attempts: u32) {
        self.sent.inc();
        self.bytes.inc_by(bytes as u64);
        self.entries.inc_by(entries as u64);
        if attempts > 1 {
            self.retried.inc();
        }
    }

    /// One attempt failed (it will be retried).
    pub fn attempt_failed(&self) {
        self.failed.inc();
    }

    /// An entry larger than `delivery.max_transaction_bytes` is sent in a transaction of its own.
    pub fn oversized_entry(&self) {
        self.oversized.inc();
    }

    /// Fetching one user's push rules from Synapse's client API failed.
    pub fn push_rules_fetch_failed(&self) {
        self.push_rules_failed.inc();
    }

    /// The appservice's worker task died (panicked) and was started again.
    pub fn worker_restarted(&self) {
        self.worker_restarts.inc();
    }

    /// Restarts of the appservice's worker so far.
    pub fn worker_restarts(&self) -> u64 {
        self.worker_restarts.get()
    }

    /// Observe the commit-to-acknowledgement latency of the entries of an accepted live
    /// transaction, given the commit LSN of the oldest change each entry stands for. Call before
    /// the transaction is marked complete (while its commits still hold the checkpoint).
    pub fn observe_commit_latency(&self, first_lsns: impl Iterator<Item = Lsn>) {
        let now = SystemTime::now();
        let q = self.commit_times.lock();
        for lsn in first_lsns {
            if let Some(t) = find(&q, lsn) {
                self.latency
                    .observe(now.duration_since(t).unwrap_or(Duration::ZERO).as_secs_f64());
            }
        }
    }

    /// Transactions accepted so far.
    pub fn transactions_sent(&self) -> u64 {
        self.sent.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_times_are_found_by_lsn_and_pruned_below_the_checkpoint() {
        let t = CommitTimes::default();
        t.push(Lsn(10), 1_000_000);
        t.push(Lsn(20), 2_000_000);
        t.push(Lsn(15), 5); // out of order: ignored
        assert_eq!(t.get(Lsn(20)), pg_micros_to_system_time(2_000_000));
        assert_eq!(t.get(Lsn(15)), None);
        t.prune_below(Lsn(20));
        assert_eq!((t.get(Lsn(10)), t.len()), (None, 1));
        t.clear();
        assert!(t.is_empty());
    }
}
