//! [`AppserviceHandle`]: one appservice as the rest of the relay sees it: its settings, the state
//! its changes wait in, its worker's wake-up signal and statistics, and its metric handles. The
//! replication task pushes into it, the worker takes from it, `crate::ops` reads it.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::config::AppserviceSettings;
use crate::delivery::metrics::AppserviceMetrics;
use crate::delivery::state::{AppserviceState, DeliveryMode};
use crate::model::Lsn;

/// What an appservice worker has been doing, for logs, `check` and (later) metrics.
#[derive(Debug, Clone, Default)]
pub struct DeliveryStats {
    pub transactions_sent: u64,
    pub attempts_failed: u64,
    pub entries_sent: u64,
    pub bytes_sent: u64,
    /// Consecutive failures of the transaction in flight.
    pub current_failures: u32,
    pub last_error: Option<String>,
    /// Pages of recorded keys delivered.
    pub resync_pages: u64,
    /// Failed attempts to fetch push rules from Synapse's client API.
    pub push_rule_fetches_failed: u64,
    /// Consecutive resync pages whose push rules could not all be fetched (sets the backoff).
    pub push_rules_failing_passes: u32,
}

/// One appservice as the pipeline sees it: its settings, shared state and wake-up signal.
#[derive(Debug)]
pub struct AppserviceHandle {
    pub settings: AppserviceSettings,
    queue_limit: usize,
    /// Shared with a handle that replaces this one on a reload ([`AppserviceHandle::replacing`]).
    state: Arc<Mutex<AppserviceState>>,
    /// The position at which the state would switch back to live (`u64::MAX`: none), kept
    /// beside the state so the replication task, which reports every commit's position, takes
    /// the lock only when that can change something.
    switch_at: Arc<AtomicU64>,
    pub(super) wake: Notify,
    pub(super) stats: Mutex<DeliveryStats>,
    /// This appservice's metric handles (see [`crate::ops::metrics`]).
    pub metrics: AppserviceMetrics,
    /// The keys recorded for this appservice in the state store, as the relay counts them
    /// (see [`AppserviceHandle::recorded_keys`]); `UNKNOWN_COUNT` until counted.
    recorded_keys: Arc<AtomicI64>,
}

const UNKNOWN_COUNT: i64 = -1;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AppserviceHandle {
    pub fn new(settings: AppserviceSettings, queue_limit: usize) -> AppserviceHandle {
        AppserviceHandle::with_metrics(settings, queue_limit, AppserviceMetrics::default())
    }

    /// A handle whose deliveries update `metrics`.
    pub fn with_metrics(
        settings: AppserviceSettings,
        queue_limit: usize,
        metrics: AppserviceMetrics,
    ) -> AppserviceHandle {
        AppserviceHandle {
            settings,
            queue_limit,
            state: Arc::new(Mutex::new(
                AppserviceState::new(DeliveryMode::Live).with_queue_limit(queue_limit),
            )),
            switch_at: Arc::new(AtomicU64::new(u64::MAX)),
            wake: Notify::new(),
            stats: Mutex::new(DeliveryStats::default()),
            metrics,
            recorded_keys: Arc::new(AtomicI64::new(UNKNOWN_COUNT)),
        }
    }

    /// A handle with new settings sharing this one's state (queue, mode, keys to record), for a
    /// reload. Stop this handle's worker first; a recorder still holding this handle keeps
    /// updating the same state.
    pub fn replacing(&self, settings: AppserviceSettings, metrics: AppserviceMetrics) -> AppserviceHandle {
        AppserviceHandle {
            settings,
            queue_limit: self.queue_limit,
            state: self.state.clone(),
            switch_at: self.switch_at.clone(),
            wake: Notify::new(),
            stats: Mutex::new(lock(&self.stats).clone()),
            metrics,
            recorded_keys: self.recorded_keys.clone(),
        }
    }

    /// The keys recorded for this appservice in the state store, without asking the database:
    /// counted once (by the metrics poll, when not known: after a start, a reload or a resync
    /// request, whose keys another process may have written), then kept up to date by the keys
    /// the recorder inserts and the drain deletes, and exact again (zero) whenever a drain finds
    /// nothing left. `None` until counted.
    pub fn recorded_keys(&self) -> Option<i64> {
        let n = self.recorded_keys.load(Ordering::Acquire);
        (n != UNKNOWN_COUNT).then_some(n.max(0))
    }

    /// Set the count of recorded keys (see [`AppserviceHandle::recorded_keys`]).
    pub fn set_recorded_keys(&self, n: i64) {
        self.recorded_keys.store(n.max(0), Ordering::Release);
    }

    /// Forget the count: keys may have been written that the relay did not count.
    pub fn forget_recorded_keys(&self) {
        self.recorded_keys.store(UNKNOWN_COUNT, Ordering::Release);
    }

    /// Adjust a known count by `delta`.
    pub(super) fn adjust_recorded_keys(&self, delta: i64) {
        let _ = self
            .recorded_keys
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != UNKNOWN_COUNT).then(|| (n + delta).max(0))
            });
    }

    /// Run `f` on the shared state (briefly: the lock is shared with the replication task).
    pub fn with_state<R>(&self, f: impl FnOnce(&mut AppserviceState) -> R) -> R {
        let mut state = lock(&self.state);
        let r = f(&mut state);
        self.publish_switch_at(&state);
        r
    }

    fn publish_switch_at(&self, state: &AppserviceState) {
        let at = state.next_position_of_interest().map_or(u64::MAX, |l| l.0);
        self.switch_at.store(at, Ordering::Release);
    }

    /// The stream has passed `position`: returns true if that switched the appservice back to
    /// live (see [`AppserviceState::observe_position`]). Lock-free unless it can.
    pub fn observe_position(&self, position: Lsn) -> bool {
        if position.0 < self.switch_at.load(Ordering::Acquire) {
            return false;
        }
        self.with_state(|s| s.observe_position(position))
    }

    /// Forget everything in memory and start over in `mode` (after losing the slot).
    pub fn reset(&self, mode: DeliveryMode) {
        self.forget_recorded_keys();
        let mut state = lock(&self.state);
        *state = AppserviceState::new(mode).with_queue_limit(self.queue_limit);
        self.publish_switch_at(&state);
    }

    /// Forget everything in memory and start over live, catching up from `position` (see
    /// [`AppserviceState::catching_up_from`]).
    pub fn reset_catching_up_from(&self, position: Lsn) {
        self.forget_recorded_keys();
        let mut state = lock(&self.state);
        *state = AppserviceState::new(DeliveryMode::Live)
            .with_queue_limit(self.queue_limit)
            .catching_up_from(position);
        self.publish_switch_at(&state);
    }

    /// Wake the worker (new changes, or a mode change).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    pub fn stats(&self) -> DeliveryStats {
        lock(&self.stats).clone()
    }

    pub(super) fn mode(&self) -> DeliveryMode {
        self.with_state(|s| s.mode())
    }
}
