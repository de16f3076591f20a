//! [`AppserviceState`]: everything the replication task and an appservice's worker share about
//! that appservice, and the rules that bound what a failing appservice can hold back. Pure: no
//! I/O; time and positions are arguments.
//!
//! **Live** mode: changes wait in the [`AppserviceQueue`] with their values, and the slot is not
//! confirmed past the oldest undelivered one.
//!
//! **Recording** mode (entered when the appservice has failed for longer than the time budget,
//! or holds back more WAL than the byte budget; or when a resync is requested): a change is
//! reduced to its key (user, room, type). Keys collect in memory for a moment, then the recorder
//! writes them to the relay's table in the homeserver's database; from then on they no longer
//! hold the slot, which moves on. The worker drains the recorded keys in pages, reading each key's
//! *current* value from Synapse's tables, so memory and durable state grow with the number of
//! distinct keys, never with the number of changes.
//!
//! **Catching up** (live, see [`AppserviceState::catching_up_from`] and
//! [`AppserviceState::begin_read`]): a change committed below the *read horizon* waits in the
//! queue as its key only, and its *current* value is read from Synapse's tables when its
//! transaction is built. The horizon starts at the WAL position found at start (the slot streams
//! again changes an earlier run may have delivered, possibly followed by newer values, so a value
//! taken from that part of the stream could be older than what the appservice has), and moves to
//! the WAL position read after each such read (a value taken from the stream below it could be
//! older than the one just read). A stream that has caught up passes the horizon, and changes go
//! out with their own values again. Memory holds keys, never values, and nothing is written to
//! the state store unless the queue outgrows `max_queued_keys`.
//!
//! **Back to live** without loss or regression: when a drain finds nothing left, the worker
//! reports the WAL position `L` read after its last snapshot (every commit that snapshot saw is
//! below `L`). Changes committed below `L` that still arrive are recorded (and drained again);
//! the first change at or after `L`, or the stream passing `L`, switches the appservice back to
//! live: such changes are newer than anything a drain read.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::delivery::queue::AppserviceQueue;
use crate::model::{AccountDataChange, AccountDataKey, ChangeContent, Lsn};

/// How changes for an appservice are handled now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Live,
    Recording {
        /// Set by the worker when its drain came up empty: switch to live at this position.
        switch_at: Option<Lsn>,
    },
}

/// Which recorded keys the worker's drain has read in its current pass over the table (keys are
/// read in key order), as the recorder must know it: a key recorded again that the drain has
/// read (or may be reading) needs a new version, so the drain's delete leaves it for the next
/// pass; one it has not read yet will be read with a newer snapshot anyway, so the row written
/// before is enough (one write per key and recovery, not one per change).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DrainRead {
    /// A pass is starting, or none runs: nothing read yet.
    #[default]
    Nothing,
    /// Every key up to this one (in key order).
    UpTo(AccountDataKey),
    /// A page is being read: any key may be.
    Everything,
}

impl DrainRead {
    /// Whether the drain may have read `key` in its current pass.
    pub fn covers(&self, key: &AccountDataKey) -> bool {
        match self {
            DrainRead::Nothing => false,
            DrainRead::UpTo(last) => key <= last,
            DrainRead::Everything => true,
        }
    }
}

/// What the replication task should do after [`AppserviceState::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for live delivery: wake the worker.
    Queued,
    /// Reduced to a key to record: wake the recorder.
    Recorded,
    /// This change made the live queue outgrow `max_queued_keys`: the appservice switched to
    /// recording mode, its waiting changes reduced to keys to record (wake the recorder).
    Spilled,
    /// Queued, but the queue outgrew `max_queued_keys` while the appservice is accepting what it
    /// is sent: the stream should wait a moment for it (see [`AppserviceState::has_room`])
    /// before recording its keys instead ([`AppserviceState::spill_if_full`]).
    Full,
}

/// Why an appservice was switched to recording mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpillReason {
    FailingFor(Duration),
    RetainedBytes(u64),
}

impl std::fmt::Display for SpillReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpillReason::FailingFor(d) => write!(f, "failing for {d:?}"),
            SpillReason::RetainedBytes(b) => write!(f, "holding back {b} bytes of WAL"),
        }
    }
}

/// The budgets of bounded retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionBudget {
    pub max_failing: Duration,
    pub max_retained_bytes: u64,
    /// Keys an appservice may have waiting with their values in memory (a huge transaction, a
    /// slow appservice); past it, they are recorded as keys instead.
    pub max_queued_keys: usize,
}

/// See the module documentation.
#[derive(Debug)]
pub struct AppserviceState {
    pub queue: AppserviceQueue,
    mode: DeliveryMode,
    /// Keys to record, with the transaction of their latest change.
    unrecorded: HashMap<AccountDataKey, u32>,
    unrecorded_oldest: Option<Lsn>,
    /// The oldest commit among keys being written by the recorder right now.
    recording_oldest: Option<Lsn>,
    /// Completed recorder writes (lets the worker tell whether keys arrived during a drain).
    flushes: u64,
    /// When the transaction in flight first failed (None while deliveries succeed).
    failing_since: Option<Instant>,
    /// See [`RetentionBudget::max_queued_keys`].
    queue_limit: usize,
    /// The read horizon: live changes committed below it are sent with their current values
    /// (see the module documentation). `Lsn::ZERO`: none.
    read_below: Lsn,
    /// Reads of current values under way (see [`AppserviceState::begin_read`]): while one is,
    /// every change is sent with its current value.
    reads_in_progress: u32,
    /// Backfill requests to look up in the relay's table (see [`AppserviceState::backfill_lookup`]).
    backfill_requests: BackfillRequests,
    /// See [`DrainRead`].
    drain_read: DrainRead,
}

/// Resync requests seen in the stream, and how far the worker has looked them up in the relay's
/// table of backfills. A new state counts one request, so a start (or a reset) looks once.
#[derive(Debug)]
struct BackfillRequests {
    seen: u64,
    looked_up: u64,
    /// The transactions of requests not looked up yet, by request number: their rows may not
    /// be visible to other sessions yet when the message is decoded.
    xids: Vec<(u64, u32)>,
}

impl AppserviceState {
    pub fn new(mode: DeliveryMode) -> AppserviceState {
        AppserviceState {
            queue: AppserviceQueue::new(),
            mode,
            unrecorded: HashMap::new(),
            unrecorded_oldest: None,
            recording_oldest: None,
            flushes: 0,
            failing_since: None,
            queue_limit: usize::MAX,
            backfill_requests: BackfillRequests {
                seen: 1,
                looked_up: 0,
                xids: Vec::new(),
            },
            read_below: Lsn::ZERO,
            reads_in_progress: 0,
            drain_read: DrainRead::Nothing,
        }
    }

    /// Start (live) catching up from `position`, the WAL position found at start: the slot
    /// streams again everything after its confirmed position, some of which an earlier run may
    /// already have delivered, possibly with newer values after it. Every change committed below
    /// `position` is sent with the current value of its key, which is at least as new as anything
    /// an earlier run sent (those were all committed, or read, before `position`), so nothing
    /// older than what an appservice already had reaches it, and nothing is written to the state
    /// store. Past `max_queued_keys` waiting keys (or the retention budget) the appservice spills
    /// to recording mode as ever.
    pub fn catching_up_from(mut self, position: Lsn) -> AppserviceState {
        if self.mode == DeliveryMode::Live {
            self.read_below = position;
        }
        self
    }

    /// The read horizon (see the module documentation).
    pub fn read_horizon(&self) -> Lsn {
        self.read_below
    }

    /// The worker is about to read current values for a batch it took (call it under the same
    /// lock as the take): until [`AppserviceState::end_read`], every change is queued to be read
    /// too, as its value in the stream may be older than the one being read.
    pub fn begin_read(&mut self) {
        self.reads_in_progress += 1;
    }

    /// The read begun by [`AppserviceState::begin_read`] is over; `horizon`: the WAL position
    /// read after it (every commit it saw lies below), `None` if it did not happen.
    pub fn end_read(&mut self, horizon: Option<Lsn>) {
        self.reads_in_progress = self.reads_in_progress.saturating_sub(1);
        if let Some(h) = horizon
            && self.mode == DeliveryMode::Live
        {
            self.read_below = self.read_below.max(h);
        }
    }

    /// The position at which the state changes by itself when the stream reaches it: the
    /// switch point back to live.
    pub fn next_position_of_interest(&self) -> Option<Lsn> {
        match self.mode {
            DeliveryMode::Recording { switch_at } => switch_at,
            DeliveryMode::Live => None,
        }
    }

    /// Limit the keys waiting in memory (see [`RetentionBudget::max_queued_keys`]).
    pub fn with_queue_limit(mut self, limit: usize) -> AppserviceState {
        self.queue_limit = limit.max(1);
        self
    }

    pub fn mode(&self) -> DeliveryMode {
        self.mode
    }

    /// Route one change into this appservice.
    pub fn push(&mut self, change: AccountDataChange) -> Pushed {
        if let DeliveryMode::Recording { switch_at } = self.mode {
            match switch_at {
                Some(l) if change.commit_lsn >= l => self.mode = DeliveryMode::Live,
                _ => {
                    // A change older than the last drain's snapshot: record it and drain again.
                    self.mode = DeliveryMode::Recording { switch_at: None };
                    self.record(change.key, change.xid, change.commit_lsn);
                    return Pushed::Recorded;
                }
            }
        }
        let mut change = change;
        if (change.commit_lsn < self.read_below || self.reads_in_progress > 0)
            && matches!(change.content, ChangeContent::Json(_))
        {
            // Below the read horizon: the value in the stream may be older than one already
            // read (or being read); send the key's current value instead.
            change.content = ChangeContent::ReadCurrent(change.key.source_table());
        }
        self.queue.push(change);
        if self.queue.waiting_len() > self.queue_limit {
            if self.failing_since.is_none() {
                // Busy, not failing: worth a short wait (a backlog streams in faster than any
                // appservice takes it; recording its keys would cost Synapse's database writes).
                return Pushed::Full;
            }
            // Memory stays bounded: from here on, keys only.
            self.spill();
            return Pushed::Spilled;
        }
        Pushed::Queued
    }

    fn record(&mut self, key: AccountDataKey, xid: u32, commit_lsn: Lsn) {
        if self.unrecorded.is_empty() && self.unrecorded_oldest.is_none() {
            self.unrecorded_oldest = Some(commit_lsn);
        }
        self.unrecorded.insert(key, xid);
    }

    /// The stream has passed `position` (a commit's end, or a keepalive outside a transaction):
    /// returns true if that switched the appservice back to live.
    pub fn observe_position(&mut self, position: Lsn) -> bool {
        if let DeliveryMode::Recording { switch_at: Some(l) } = self.mode
            && position >= l
        {
            self.mode = DeliveryMode::Live;
            return true;
        }
        false
    }

    /// Whether the stream may go on after [`Pushed::Full`]: the queue is down to half of
    /// `max_queued_keys`, or the appservice left live mode or started failing (its next change
    /// over the limit is then recorded).
    pub fn has_room(&self) -> bool {
        self.mode != DeliveryMode::Live
            || self.failing_since.is_some()
            || self.queue.waiting_len() <= self.queue_limit / 2
    }

    /// After [`Pushed::Full`] and a wait that did not make room: switch to recording mode if
    /// the queue is still over `max_queued_keys`. Returns whether it did.
    pub fn spill_if_full(&mut self) -> bool {
        if self.mode == DeliveryMode::Live && self.queue.waiting_len() > self.queue_limit {
            self.spill();
            return true;
        }
        false
    }

    /// Whether the budget says this appservice must stop holding the slot, given the time and
    /// the position the stream has reached.
    pub fn over_budget(&self, now: Instant, received: Lsn, budget: &RetentionBudget) -> Option<SpillReason> {
        if self.mode != DeliveryMode::Live {
            return None;
        }
        if let Some(since) = self.failing_since {
            let failing = now.saturating_duration_since(since);
            if failing > budget.max_failing {
                return Some(SpillReason::FailingFor(failing));
            }
        }
        let oldest = self.queue.oldest_undelivered()?;
        let held = received.0.saturating_sub(oldest.0);
        (held > budget.max_retained_bytes).then_some(SpillReason::RetainedBytes(held))
    }

    /// Switch to recording mode: every queued change (waiting or in flight) becomes a key to record.
    pub fn spill(&mut self) {
        let (keys, oldest) = self.queue.drain_keys();
        if let Some(oldest) = oldest {
            for (k, xid) in keys {
                self.record(k, xid, oldest);
            }
            if let Some(o) = self.unrecorded_oldest.as_mut() {
                *o = (*o).min(oldest);
            }
        }
        // Recording mode reads current values, and its switch back to live is at a position
        // past every read so far: the read horizon is not needed any more.
        self.read_below = Lsn::ZERO;
        self.reads_in_progress = 0;
        self.mode = DeliveryMode::Recording { switch_at: None };
    }

    /// Switch to recording mode because a resync was requested at `at` (keys are in the table
    /// already); changes after this are recorded until a drain completes.
    pub fn request_resync(&mut self) {
        if self.mode == DeliveryMode::Live {
            self.spill();
        } else {
            self.mode = DeliveryMode::Recording { switch_at: None };
        }
    }

    /// A resync (backfill) request, written by transaction `xid`, reached the stream: the worker
    /// must look it up before it may switch back to live (see [`AppserviceState::backfill_lookup`]).
    pub fn note_backfill_request(&mut self, xid: u32) {
        let r = &mut self.backfill_requests;
        r.seen += 1;
        r.xids.push((r.seen, xid));
    }

    /// Backfill requests seen so far (a drain that saw this number change must not switch to
    /// live: the request may not have been looked up).
    pub fn backfill_requests_seen(&self) -> u64 {
        self.backfill_requests.seen
    }

    /// For the worker: whether requests wait to be looked up in the relay's table, as the
    /// request number to report to [`AppserviceState::backfills_looked_up`] once the table shows
    /// none left, and the transactions that must be visible before the table is read.
    pub fn backfill_lookup(&self) -> Option<(u64, Vec<u32>)> {
        let r = &self.backfill_requests;
        (r.looked_up < r.seen).then(|| (r.seen, r.xids.iter().map(|(_, x)| *x).collect()))
    }

    /// The table held no backfill for this appservice after every request up to `upto` was
    /// visible.
    pub fn backfills_looked_up(&mut self, upto: u64) {
        let r = &mut self.backfill_requests;
        r.looked_up = r.looked_up.max(upto);
        let done = r.looked_up;
        r.xids.retain(|(n, _)| *n > done);
    }

    /// For the recorder: the keys to write now (they keep holding the slot until
    /// [`AppserviceState::recorded`]).
    pub fn take_unrecorded(&mut self) -> Option<Vec<(AccountDataKey, u32)>> {
        if self.unrecorded.is_empty() || self.recording_oldest.is_some() {
            return None;
        }
        self.recording_oldest = self.unrecorded_oldest.take();
        Some(self.unrecorded.drain().collect())
    }

    /// What the drain has read in its current pass (set by the worker; see [`DrainRead`]).
    pub fn set_drain_read(&mut self, read: DrainRead) {
        self.drain_read = read;
    }

    /// Split keys to record into those whose existing row needs a new version (the drain may
    /// have read it) and those whose existing row may stay as it is (see [`DrainRead`]). Call it
    /// after their changes are visible, right before writing them.
    pub fn split_for_recording(&self, keys: Vec<AccountDataKey>) -> (Vec<AccountDataKey>, Vec<AccountDataKey>) {
        keys.into_iter().partition(|k| self.drain_read.covers(k))
    }

    /// The keys from [`AppserviceState::take_unrecorded`] are durably written.
    pub fn recorded(&mut self) {
        self.recording_oldest = None;
        self.flushes += 1;
    }

    /// Writing the keys failed: keep them for the next attempt.
    pub fn recording_failed(&mut self, keys: Vec<(AccountDataKey, u32)>) {
        let oldest = self.recording_oldest.take();
        self.unrecorded.extend(keys);
        self.unrecorded_oldest = match (self.unrecorded_oldest, oldest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Recorder writes completed so far.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// Keys not yet durably written (waiting or being written).
    pub fn unrecorded_len(&self) -> usize {
        self.unrecorded.len()
    }

    /// Called by the worker after a drain found the table empty, having read the flush count
    /// `flushes_before` before the read and the WAL position `at` after it. Returns whether this
    /// set the switch point to `at` (the worker then writes one horizon marker); false: keys
    /// arrived meanwhile (drain again), or a switch point is set already. A switch point, once
    /// set, is kept until the stream reaches it or an older change is recorded: moving it to
    /// every newer empty drain would keep an appservice whose stream lags the WAL by more than
    /// the drain's poll interval in recording mode for ever.
    pub fn drained(&mut self, flushes_before: u64, at: Lsn) -> bool {
        let quiet = self.flushes == flushes_before && self.unrecorded.is_empty() && self.recording_oldest.is_none();
        if quiet && self.mode == (DeliveryMode::Recording { switch_at: None }) {
            self.mode = DeliveryMode::Recording { switch_at: Some(at) };
            return true;
        }
        false
    }

    /// The worker's transaction failed (first failure starts the clock).
    pub fn delivery_failed(&mut self, now: Instant) {
        self.failing_since.get_or_insert(now);
    }

    /// The worker's transaction was accepted.
    pub fn delivery_succeeded(&mut self) {
        self.failing_since = None;
    }

    /// Since when deliveries have been failing, if they are.
    pub fn failing_since(&self) -> Option<Instant> {
        self.failing_since
    }

    /// The smallest commit LSN this appservice still needs: undelivered live changes, and keys not
    /// yet durably recorded.
    pub fn oldest_undelivered(&self) -> Option<Lsn> {
        [
            self.queue.oldest_undelivered(),
            self.unrecorded_oldest,
            self.recording_oldest,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ChangeContent;

    fn change(user: &str, lsn: u64) -> AccountDataChange {
        AccountDataChange {
            key: AccountDataKey {
                user_id: user.into(),
                room_id: None,
                data_type: "t".into(),
            },
            content: ChangeContent::Json("{}".into()),
            commit_lsn: Lsn(lsn),
            xid: 1,
        }
    }

    const BUDGET: RetentionBudget = RetentionBudget {
        max_failing: Duration::from_secs(300),
        max_retained_bytes: 1000,
        max_queued_keys: 100,
    };

    #[test]
    fn too_many_queued_keys_spill_to_recording() {
        let mut s = AppserviceState::new(DeliveryMode::Live).with_queue_limit(3);
        for i in 0..3 {
            assert_eq!(s.push(change(&format!("@u{i}:x"), 10 + i)), Pushed::Queued);
        }
        // Accepting what it is sent: the stream waits a moment for it.
        assert_eq!(s.push(change("@u3:x", 20)), Pushed::Full);
        assert!(!s.has_room());
        assert_eq!(s.mode(), DeliveryMode::Live);
        // It did not make room in time: keys only from here on.
        assert!(s.spill_if_full());
        assert_eq!(s.mode(), DeliveryMode::Recording { switch_at: None });
        assert_eq!(s.unrecorded_len(), 4);
        assert_eq!(s.push(change("@u4:x", 21)), Pushed::Recorded);
        assert!(s.queue.is_idle());
    }

    #[test]
    fn live_changes_queue_and_hold_the_slot() {
        let mut s = AppserviceState::new(DeliveryMode::Live);
        assert_eq!(s.push(change("@a:x", 10)), Pushed::Queued);
        assert_eq!(s.oldest_undelivered(), Some(Lsn(10)));
        assert_eq!(s.queue.waiting_len(), 1);
    }

    #[test]
    fn failing_past_the_time_budget_spills() {
        let mut s = AppserviceState::new(DeliveryMode::Live);
        s.push(change("@a:x", 10));
        let t0 = Instant::now();
        s.delivery_failed(t0);
        s.delivery_failed(t0 + Duration::from_secs(100));
        assert_eq!(s.over_budget(t0 + Duration::from_secs(200), Lsn(20), &BUDGET), None);
        assert!(matches!(
            s.over_budget(t0 + Duration::from_secs(301), Lsn(20), &BUDGET),
            Some(SpillReason::FailingFor(_))
        ));
        s.delivery_succeeded();
        assert_eq!(s.over_budget(t0 + Duration::from_secs(999), Lsn(20), &BUDGET), None);
    }

    #[test]
    fn holding_too_much_wal_spills_even_without_failures() {
        let mut s = AppserviceState::new(DeliveryMode::Live);
        s.push(change("@a:x", 10));
        assert_eq!(s.over_budget(Instant::now(), Lsn(1010), &BUDGET), None);
        assert_eq!(
            s.over_budget(Instant::now(), Lsn(1011), &BUDGET),
            Some(SpillReason::RetainedBytes(1001))
        );
    }

    #[test]
    fn spilled_keys_hold_the_slot_only_until_recorded() {
        let mut s = AppserviceState::new(DeliveryMode::Live);
        s.push(change("@a:x", 10));
        s.push(change("@b:x", 20));
        let _in_flight = s.queue.take_batch(1);
        s.spill();
        assert_eq!(s.mode(), DeliveryMode::Recording { switch_at: None });
        assert_eq!(s.oldest_undelivered(), Some(Lsn(10)));
        assert_eq!(s.push(change("@a:x", 30)), Pushed::Recorded);
        let keys = s.take_unrecorded().unwrap();
        assert_eq!(keys.len(), 2, "one entry per distinct key");
        assert!(s.take_unrecorded().is_none(), "one write at a time");
        s.push(change("@c:x", 40));
        assert_eq!(s.oldest_undelivered(), Some(Lsn(10)), "still being written");
        s.recorded();
        assert_eq!(s.oldest_undelivered(), Some(Lsn(40)));
        let keys = s.take_unrecorded().unwrap();
        s.recording_failed(keys);
        assert_eq!(s.oldest_undelivered(), Some(Lsn(40)));
        s.take_unrecorded().unwrap();
        s.recorded();
        assert_eq!(
            s.oldest_undelivered(),
            None,
            "everything recorded: the slot may move on"
        );
    }

    #[test]
    fn back_to_live_only_after_the_drain_horizon() {
        let mut s = AppserviceState::new(DeliveryMode::Recording { switch_at: None });
        let before = s.flushes();
        assert!(s.drained(before, Lsn(100)));
        assert_eq!(
            s.mode(),
            DeliveryMode::Recording {
                switch_at: Some(Lsn(100))
            }
        );
        // A change committed before the drain's snapshot horizon: recorded, drain again.
        assert_eq!(s.push(change("@a:x", 90)), Pushed::Recorded);
        assert_eq!(s.mode(), DeliveryMode::Recording { switch_at: None });
        let keys = s.take_unrecorded().unwrap();
        assert_eq!(keys.len(), 1);
        s.recorded();
        assert!(!s.drained(before, Lsn(120)), "keys were recorded during the drain");
        let before = s.flushes();
        assert!(s.drained(before, Lsn(150)));
        // A change at or after the horizon goes live.
        assert_eq!(s.push(change("@a:x", 150)), Pushed::Queued);
        assert_eq!(s.mode(), DeliveryMode::Live);
    }

    fn content_of(s: &AppserviceState, user: &str) -> ChangeContent {
        s.queue
            .waiting_content(&AccountDataKey {
                user_id: user.into(),
                room_id: None,
                data_type: "t".into(),
            })
            .cloned()
            .expect("waiting")
    }

    const READ: ChangeContent = ChangeContent::ReadCurrent(crate::model::SourceTable::AccountData);

    #[test]
    fn catching_up_reads_current_values_below_the_start_position() {
        let mut s = AppserviceState::new(DeliveryMode::Live)
            .with_queue_limit(3)
            .catching_up_from(Lsn(100));
        for (user, lsn) in [("@a:x", 10), ("@b:x", 20), ("@a:x", 30)] {
            assert_eq!(s.push(change(user, lsn)), Pushed::Queued);
        }
        assert_eq!(s.queue.waiting_len(), 2, "coalesced per key");
        assert_eq!(
            content_of(&s, "@a:x"),
            READ,
            "below the start: its current value is sent"
        );
        assert_eq!(s.unrecorded_len(), 0, "nothing to write to the state store");
        assert_eq!(
            s.oldest_undelivered(),
            Some(Lsn(10)),
            "they hold the slot until delivered"
        );
        // At or past the start position, a change's own value is newer than anything sent before.
        s.push(change("@c:x", 100));
        assert_eq!(content_of(&s, "@c:x"), ChangeContent::Json("{}".into()));
        // A key waiting to be read stays read, whatever comes after it.
        s.push(change("@a:x", 110));
        assert_eq!(content_of(&s, "@a:x"), READ);
        assert_eq!(s.next_position_of_interest(), None, "nothing to wait for");
    }

    #[test]
    fn a_read_moves_the_horizon_and_changes_during_it_are_read_too() {
        let mut s = AppserviceState::new(DeliveryMode::Live).catching_up_from(Lsn(100));
        s.push(change("@a:x", 10));
        let batch = s.queue.take_batch(10).unwrap();
        assert_eq!(batch.entries[0].content, READ);
        s.begin_read();
        // The read is under way: a value from the stream may be older than the one being read.
        s.push(change("@b:x", 150));
        assert_eq!(content_of(&s, "@b:x"), READ);
        s.end_read(Some(Lsn(300)));
        assert_eq!(s.read_horizon(), Lsn(300));
        s.push(change("@c:x", 200));
        assert_eq!(
            content_of(&s, "@c:x"),
            READ,
            "below the WAL position read after the read"
        );
        s.push(change("@d:x", 300));
        assert_eq!(content_of(&s, "@d:x"), ChangeContent::Json("{}".into()));
        // A failed read (none happened) does not move the horizon, but ends the read.
        s.begin_read();
        s.end_read(None);
        assert_eq!(s.read_horizon(), Lsn(300));
        s.push(change("@e:x", 400));
        assert_eq!(content_of(&s, "@e:x"), ChangeContent::Json("{}".into()));
    }

    #[test]
    fn catching_up_past_the_queue_limit_spills_to_recording() {
        let mut s = AppserviceState::new(DeliveryMode::Live)
            .with_queue_limit(2)
            .catching_up_from(Lsn(100));
        s.push(change("@a:x", 10));
        s.push(change("@b:x", 20));
        s.begin_read();
        // Failing: recorded at once, no wait.
        s.delivery_failed(Instant::now());
        assert_eq!(s.push(change("@c:x", 30)), Pushed::Spilled);
        assert_eq!(s.mode(), DeliveryMode::Recording { switch_at: None });
        assert_eq!(s.unrecorded_len(), 3);
        assert_eq!(s.read_horizon(), Lsn::ZERO, "recording mode needs no read horizon");
        // Back to live after a drain: values from the stream go out as they are.
        assert_eq!(s.take_unrecorded().map(|k| k.len()), Some(3));
        s.recorded();
        assert!(s.drained(s.flushes(), Lsn(500)));
        assert!(s.observe_position(Lsn(500)));
        s.push(change("@d:x", 600));
        assert_eq!(content_of(&s, "@d:x"), ChangeContent::Json("{}".into()));
    }

    #[test]
    fn keys_the_drain_has_not_read_are_written_once() {
        let key = |u: &str| AccountDataKey {
            user_id: u.into(),
            room_id: None,
            data_type: "t".into(),
        };
        let mut s = AppserviceState::new(DeliveryMode::Recording { switch_at: None });
        let keys = || vec![key("@a:x"), key("@m:x"), key("@z:x")];
        // No pass has read anything: rows already written stay as they are.
        assert_eq!(s.split_for_recording(keys()), (vec![], keys()));
        // A page is being read: every row needs a new version (it may be in the page).
        s.set_drain_read(DrainRead::Everything);
        assert_eq!(s.split_for_recording(keys()), (keys(), vec![]));
        // The pass has read up to @m:x: those need a new version, @z:x will be read later.
        s.set_drain_read(DrainRead::UpTo(key("@m:x")));
        assert_eq!(
            s.split_for_recording(keys()),
            (vec![key("@a:x"), key("@m:x")], vec![key("@z:x")])
        );
    }

    #[test]
    fn a_switch_point_once_set_is_kept() {
        let mut s = AppserviceState::new(DeliveryMode::Recording { switch_at: None });
        assert!(s.drained(0, Lsn(600)), "the first empty drain sets the switch point");
        // Later empty drains (about once a second) while the stream lags behind the WAL tip:
        // the switch point stays, and no further horizon marker is asked for.
        assert!(!s.drained(0, Lsn(700)));
        assert!(!s.drained(0, Lsn(800)));
        assert_eq!(
            s.mode(),
            DeliveryMode::Recording {
                switch_at: Some(Lsn(600))
            }
        );
        assert!(!s.observe_position(Lsn(599)));
        assert!(
            s.observe_position(Lsn(650)),
            "the stream passing the first switch point is enough"
        );
        assert_eq!(s.mode(), DeliveryMode::Live);
    }

    #[test]
    fn the_stream_passing_the_horizon_switches_to_live() {
        let mut s = AppserviceState::new(DeliveryMode::Recording { switch_at: None });
        assert!(!s.observe_position(Lsn(500)));
        assert!(s.drained(0, Lsn(600)));
        assert!(!s.observe_position(Lsn(599)));
        assert!(s.observe_position(Lsn(600)));
        assert_eq!(s.mode(), DeliveryMode::Live);
    }

    #[test]
    fn unrecorded_keys_during_a_drain_prevent_the_switch() {
        let mut s = AppserviceState::new(DeliveryMode::Recording { switch_at: None });
        s.push(change("@a:x", 10));
        assert!(!s.drained(s.flushes(), Lsn(100)));
    }

    #[test]
    fn backfill_requests_are_looked_up_once_each() {
        let mut s = AppserviceState::new(DeliveryMode::Live);
        // A new state looks once (a backfill may have been requested while the relay was down).
        assert_eq!(s.backfill_lookup(), Some((1, vec![])));
        s.backfills_looked_up(1);
        assert_eq!(s.backfill_lookup(), None);
        s.note_backfill_request(77);
        let (upto, xids) = s.backfill_lookup().unwrap();
        assert_eq!(
            xids,
            vec![77],
            "the request's transaction must be visible before the lookup"
        );
        // Another request arrives while the worker looks: looking up the first is not enough.
        s.note_backfill_request(78);
        assert_eq!(s.backfill_requests_seen(), upto + 1);
        s.backfills_looked_up(upto);
        assert_eq!(s.backfill_lookup(), Some((upto + 1, vec![78])));
        s.backfills_looked_up(upto + 1);
        assert_eq!(s.backfill_lookup(), None);
        // A stale report never undoes a newer one.
        s.backfills_looked_up(upto);
        assert_eq!(s.backfill_lookup(), None);
    }

    #[test]
    fn a_resync_request_records_what_was_queued() {
        let mut s = AppserviceState::new(DeliveryMode::Live);
        s.push(change("@a:x", 10));
        s.request_resync();
        assert_eq!(s.unrecorded_len(), 1);
        assert!(s.queue.is_idle());
    }
}
