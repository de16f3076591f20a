//! Which LSN is safe to confirm to PostgreSQL. Pure arithmetic, owned by the replication task.
//!
//! **The invariant.** The LSN confirmed to PostgreSQL is the end LSN of the newest transaction T
//! such that every transaction committed at or before T has been delivered at every appservice it
//! was routed to. A transaction routed to no appservice is complete the moment its commit is
//! seen. A keepalive's `wal_end` may be confirmed only when nothing is pending or in flight and
//! no transaction is half received.
//!
//! The tracker is fed the stream of Begin/Commit messages and, when asked, the oldest commit LSN
//! that still has an undelivered change anywhere (the minimum over the appservice queues). It
//! keeps one entry per received transaction that had routed changes and is not yet confirmed.

use std::collections::VecDeque;

use crate::model::Lsn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpenTransaction {
    commit_lsn: Lsn,
    /// End LSN of the last transaction fully received before this one.
    previous_end: Lsn,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct CheckpointTracker {
    open: VecDeque<OpenTransaction>,
    /// End LSN of the newest transaction whose Commit was received.
    last_end: Lsn,
    /// `final_lsn` of the transaction between its Begin and Commit, if any.
    in_transaction: Option<Lsn>,
    /// The newest keepalive `wal_end`, not yet known to be confirmable.
    keepalive_end: Lsn,
    /// What has been reported safe so far; never goes backwards.
    safe: Lsn,
}

impl CheckpointTracker {
    /// A tracker for a stream starting at `start` (the slot's `confirmed_flush_lsn`).
    pub fn new(start: Lsn) -> CheckpointTracker {
        CheckpointTracker {
            open: VecDeque::new(),
            last_end: start,
            in_transaction: None,
            keepalive_end: start,
            safe: start,
        }
    }

    /// A Begin message: the transaction will commit at `final_lsn`.
    pub fn begin(&mut self, final_lsn: Lsn) {
        self.in_transaction = Some(final_lsn);
    }

    /// A Commit message. `routed` says whether any change of the transaction went to an appservice queue.
    pub fn commit(&mut self, commit_lsn: Lsn, end_lsn: Lsn, routed: bool) {
        if routed {
            self.open.push_back(OpenTransaction {
                commit_lsn,
                previous_end: self.last_end,
            });
        }
        self.in_transaction = None;
        if end_lsn > self.last_end {
            self.last_end = end_lsn;
        }
    }

    /// A keepalive reported the server's position `wal_end`.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        if wal_end > self.keepalive_end {
            self.keepalive_end = wal_end;
        }
    }

    /// Whether a transaction is between its Begin and Commit.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction.is_some()
    }

    /// The end LSN of the newest Commit received (the "write" position of a status update).
    pub fn received(&self) -> Lsn {
        self.last_end.max(self.keepalive_end)
    }

    /// The end LSN of the newest Commit received: where a reconnect resumes streaming (the
    /// transactions before it are already in the queues or delivered).
    pub fn last_commit_end(&self) -> Lsn {
        self.last_end
    }

    /// Received transactions with routed changes, not yet confirmed.
    pub fn open_transactions(&self) -> usize {
        self.open.len()
    }

    /// The LSN safe to confirm, given `oldest_undelivered`: the smallest commit LSN that still has
    /// a change waiting or in flight at some appservice (`None` when every queue is empty).
    pub fn safe_lsn(&mut self, oldest_undelivered: Option<Lsn>) -> Lsn {
        while let Some(front) = self.open.front() {
            match oldest_undelivered {
                Some(oldest) if front.commit_lsn >= oldest => break,
                _ => {
                    self.open.pop_front();
                }
            }
        }
        let candidate = match self.open.front() {
            Some(front) => front.previous_end,
            None if self.in_transaction.is_none() && oldest_undelivered.is_none() => {
                self.last_end.max(self.keepalive_end)
            }
            None => self.last_end,
        };
        if candidate > self.safe {
            self.safe = candidate;
        }
        self.safe
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn idle_stream_confirms_keepalive_positions() {
        let mut t = CheckpointTracker::new(Lsn(100));
        t.keepalive(Lsn(500));
        assert_eq!(t.safe_lsn(None), Lsn(500));
    }

    #[test]
    fn pending_transaction_holds_the_checkpoint_at_the_previous_commit() {
        let mut t = CheckpointTracker::new(Lsn(100));
        t.begin(Lsn(150));
        t.commit(Lsn(150), Lsn(160), false);
        t.begin(Lsn(200));
        t.commit(Lsn(200), Lsn(210), true);
        t.begin(Lsn(300));
        t.commit(Lsn(300), Lsn(310), true);
        t.keepalive(Lsn(1000));
        assert_eq!(
            t.safe_lsn(Some(Lsn(200))),
            Lsn(160),
            "tx 200 undelivered: confirm only through tx 150"
        );
        assert_eq!(t.safe_lsn(Some(Lsn(300))), Lsn(210));
        assert_eq!(
            t.safe_lsn(None),
            Lsn(1000),
            "all delivered and idle: the keepalive position"
        );
    }

    #[test]
    fn keepalive_is_not_confirmed_inside_a_transaction() {
        let mut t = CheckpointTracker::new(Lsn(100));
        t.begin(Lsn(200));
        t.keepalive(Lsn(190));
        assert_eq!(t.safe_lsn(None), Lsn(100));
        t.commit(Lsn(200), Lsn(210), true);
        assert_eq!(t.safe_lsn(None), Lsn(210));
    }

    #[test]
    fn keepalive_is_not_confirmed_while_changes_are_pending() {
        let mut t = CheckpointTracker::new(Lsn(100));
        t.begin(Lsn(200));
        t.commit(Lsn(200), Lsn(210), true);
        t.keepalive(Lsn(900));
        assert_eq!(t.safe_lsn(Some(Lsn(200))), Lsn(100));
    }

    #[test]
    fn safe_lsn_never_goes_backwards() {
        let mut t = CheckpointTracker::new(Lsn(100));
        t.keepalive(Lsn(500));
        assert_eq!(t.safe_lsn(None), Lsn(500));
        // A transaction whose commit precedes the keepalive position cannot appear after it in
        // one stream, but even if asked, the answer does not go back.
        t.begin(Lsn(600));
        t.commit(Lsn(600), Lsn(610), true);
        assert_eq!(t.safe_lsn(Some(Lsn(600))), Lsn(500));
    }

    /// A random stream of transactions, some routed; deliveries complete in a random order per
    /// transaction. Checks the invariant against a brute-force model.
    #[derive(Debug, Clone)]
    enum Step {
        Transaction { routed: bool },
        Keepalive,
        DeliverOldest,
        Check,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => any::<bool>().prop_map(|routed| Step::Transaction { routed }),
            1 => Just(Step::Keepalive),
            2 => Just(Step::DeliverOldest),
            2 => Just(Step::Check),
        ]
    }

    proptest! {
        #[test]
        fn invariant_holds_on_random_streams(steps in proptest::collection::vec(step(), 1..200)) {
            let mut t = CheckpointTracker::new(Lsn(10));
            let mut next = 10u64;
            // (commit, end, delivered?) for every routed transaction
            let mut routed: Vec<(Lsn, Lsn, bool)> = Vec::new();
            let mut all_ends: Vec<Lsn> = Vec::new();
            let mut last_safe = Lsn(10);
            let mut last_keepalive = Lsn(10);
            for s in steps {
                match s {
                    Step::Transaction { routed: r } => {
                        let commit = Lsn(next + 5);
                        let end = Lsn(next + 8);
                        next += 10;
                        t.begin(commit);
                        t.commit(commit, end, r);
                        if r { routed.push((commit, end, false)); }
                        all_ends.push(end);
                    }
                    Step::Keepalive => {
                        next += 3;
                        last_keepalive = Lsn(next);
                        t.keepalive(last_keepalive);
                    }
                    Step::DeliverOldest => {
                        if let Some(x) = routed.iter_mut().find(|x| !x.2) { x.2 = true; }
                    }
                    Step::Check => {
                        let oldest = routed.iter().filter(|x| !x.2).map(|x| x.0).min();
                        let safe = t.safe_lsn(oldest);
                        prop_assert!(safe >= last_safe, "went backwards");
                        last_safe = safe;
                        if let Some(o) = oldest {
                            // Never past the oldest incomplete transaction's commit.
                            prop_assert!(safe < o, "safe {safe} passes undelivered commit {o}");
                            // And as far as possible: the end of the newest commit before it.
                            let best = all_ends.iter().filter(|e| **e < o).max().copied().unwrap_or(Lsn(10));
                            prop_assert_eq!(safe, best.max(last_safe));
                        } else {
                            let best = all_ends.last().copied().unwrap_or(Lsn(10)).max(last_keepalive);
                            prop_assert_eq!(safe, best, "everything delivered: reach the last position");
                        }
                    }
                }
            }
        }
    }
}
