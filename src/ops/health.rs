//! Whether the pipeline is making progress: the replication connection is up, the replication
//! task is looping (messages arriving or status updates leaving), and, when there is work, the
//! confirmed LSN keeps moving. A stalled loop reads as not ready even while the process is alive.
//! [`assess`] is pure; [`Health`] is the shared cell the replication task updates.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::Lsn;

/// What the replication task (and the worker supervisor) reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub started: Instant,
    pub connected: bool,
    /// The last message received or status update sent.
    pub last_activity: Option<Instant>,
    pub confirmed: Lsn,
    /// When `confirmed` last changed.
    pub confirmed_changed: Option<Instant>,
    /// Whether undelivered changes held the checkpoint at the last status update.
    pub work_pending: bool,
    /// Whether the relay is waiting as the standby of another process holding the slot.
    pub standby: bool,
    /// The last time an appservice's delivery worker died and was started again.
    pub last_worker_restart: Option<WorkerRestart>,
}

/// A delivery worker that died (panicked) and was started again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRestart {
    pub appservice: String,
    pub at: Instant,
    /// Restarts of any worker since the relay started.
    pub total: u64,
}

/// How long `/readyz` reports a worker restart (not ready): long enough for a probe or an alert
/// to see it; the restarts also count in `appservice_worker_restarts_total`.
pub const WORKER_RESTART_NOTICE: Duration = Duration::from_secs(60);

/// Limits for [`assess`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthLimits {
    /// The replication task must show activity at least this often (it sends a status update
    /// every second).
    pub max_silence: Duration,
    /// With work pending, the confirmed LSN must move at least this often. Set it above the
    /// retention budget's time, after which a failing appservice stops holding the slot.
    pub max_stall: Duration,
}

impl HealthLimits {
    /// The limits for a relay running with `settings`: the task sends a status update at least
    /// every second, so 10 s of silence means it is stuck; with work pending, the confirmed
    /// position may stand still while an appservice fails (up to `retention.max_failing`, plus a
    /// request timeout, after which its changes are recorded and the slot moves on), and one
    /// more minute.
    pub fn for_settings(settings: &crate::config::Settings) -> HealthLimits {
        HealthLimits {
            max_silence: Duration::from_secs(10),
            max_stall: settings.retention.max_failing + settings.delivery.request_timeout + Duration::from_secs(60),
        }
    }
}

/// Whether a systemd watchdog ping is deserved: the replication task is not stuck. While the
/// replication connection is down the relay is reconnecting with bounded backoff, or waiting
/// as a standby, and a restart would not help: the ping goes on (readiness says "not ready").
/// While connected, it is the readiness verdict: a task that shows no activity, or holds
/// pending work without confirming anything for too long, is stuck, and systemd restarts it.
///
/// A worker restart does not withhold the ping: the worker is running again, and restarting the
/// whole relay would not help.
pub fn watchdog_ok(s: &HealthSnapshot, now: Instant, limits: &HealthLimits) -> bool {
    let s = HealthSnapshot {
        last_worker_restart: None,
        ..s.clone()
    };
    !s.connected || assess(&s, now, limits).ready
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub ready: bool,
    pub reasons: Vec<String>,
}

/// Judge a snapshot at `now`.
pub fn assess(s: &HealthSnapshot, now: Instant, limits: &HealthLimits) -> HealthReport {
    let mut reasons = Vec::new();
    if !s.connected {
        reasons.push("the replication connection is down".to_owned());
    }
    let since = |t: Option<Instant>| now.saturating_duration_since(t.unwrap_or(s.started));
    let silent = since(s.last_activity);
    if silent > limits.max_silence {
        reasons.push(format!("the replication task has shown no activity for {silent:?}"));
    }
    let stalled = since(s.confirmed_changed);
    if s.work_pending && stalled > limits.max_stall {
        reasons.push(format!(
            "changes are pending and the confirmed position has not moved for {stalled:?}"
        ));
    }
    if let Some(r) = &s.last_worker_restart {
        let ago = now.saturating_duration_since(r.at);
        if ago < WORKER_RESTART_NOTICE {
            reasons.push(format!(
                "the delivery worker of appservice {} died (a panic, see the log) {ago:?} ago and was started again \
                 ({} worker restarts since the relay started)",
                r.appservice, r.total
            ));
        }
    }
    HealthReport {
        ready: reasons.is_empty(),
        reasons,
    }
}

/// The shared cell.
#[derive(Debug)]
pub struct Health {
    inner: Mutex<HealthSnapshot>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    pub fn new() -> Health {
        Health {
            inner: Mutex::new(HealthSnapshot {
                started: Instant::now(),
                connected: false,
                last_activity: None,
                confirmed: Lsn::ZERO,
                confirmed_changed: None,
                work_pending: false,
                standby: false,
                last_worker_restart: None,
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut HealthSnapshot)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn set_connected(&self, connected: bool) {
        self.update(|s| {
            s.connected = connected;
            if connected {
                s.standby = false;
            }
            s.last_activity = Some(Instant::now());
        });
    }

    /// The slot is held by another process and this relay waits for it.
    pub fn set_standby(&self) {
        self.update(|s| {
            s.standby = true;
            s.last_activity = Some(Instant::now());
        });
    }

    pub fn activity(&self) {
        self.update(|s| s.last_activity = Some(Instant::now()));
    }

    pub fn status_sent(&self, confirmed: Lsn, work_pending: bool) {
        self.update(|s| {
            let now = Instant::now();
            s.last_activity = Some(now);
            if confirmed != s.confirmed || s.confirmed_changed.is_none() {
                s.confirmed = confirmed;
                s.confirmed_changed = Some(now);
            }
            s.work_pending = work_pending;
        });
    }

    /// The worker of `appservice` died and is being started again.
    pub fn worker_restarted(&self, appservice: &str) {
        self.update(|s| {
            let total = s.last_worker_restart.as_ref().map(|r| r.total).unwrap_or(0) + 1;
            s.last_worker_restart = Some(WorkerRestart {
                appservice: appservice.to_owned(),
                at: Instant::now(),
                total,
            });
        });
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn report(&self, limits: &HealthLimits) -> HealthReport {
        assess(&self.snapshot(), Instant::now(), limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HealthLimits = HealthLimits {
        max_silence: Duration::from_secs(10),
        max_stall: Duration::from_secs(60),
    };

    fn snapshot(t0: Instant) -> HealthSnapshot {
        HealthSnapshot {
            started: t0,
            connected: true,
            last_activity: Some(t0),
            confirmed: Lsn(100),
            confirmed_changed: Some(t0),
            work_pending: false,
            standby: false,
            last_worker_restart: None,
        }
    }

    #[test]
    fn a_worker_restart_shows_for_a_while_without_stopping_the_watchdog() {
        let t0 = Instant::now();
        let health = Health::new();
        health.set_connected(true);
        health.worker_restarted("bridge");
        health.worker_restarted("bridge");
        let mut s = health.snapshot();
        s.started = t0;
        s.last_activity = Some(t0);
        s.confirmed_changed = Some(t0);
        let at = s.last_worker_restart.as_ref().unwrap().at;
        let r = assess(&s, at + Duration::from_secs(5), &LIMITS);
        assert!(!r.ready, "{r:?}");
        assert!(
            r.reasons[0].contains("appservice bridge") && r.reasons[0].contains("2 worker restarts"),
            "{r:?}"
        );
        assert!(watchdog_ok(&s, at + Duration::from_secs(5), &LIMITS));
        s.last_activity = Some(at + WORKER_RESTART_NOTICE);
        assert!(assess(&s, at + WORKER_RESTART_NOTICE + Duration::from_secs(1), &LIMITS).ready);
    }

    #[test]
    fn the_watchdog_is_fed_while_reconnecting_but_not_when_stuck_while_connected() {
        let t0 = Instant::now();
        let mut s = snapshot(t0);
        let late = t0 + Duration::from_secs(3600);
        assert!(!watchdog_ok(&s, late, &LIMITS), "connected and silent: stuck");
        s.connected = false;
        assert!(
            watchdog_ok(&s, late, &LIMITS),
            "reconnecting or standby: a restart would not help"
        );
        let s = snapshot(t0);
        assert!(watchdog_ok(&s, t0 + Duration::from_secs(1), &LIMITS));
    }

    #[test]
    fn a_connected_looping_pipeline_is_ready() {
        let t0 = Instant::now();
        assert!(assess(&snapshot(t0), t0 + Duration::from_secs(5), &LIMITS).ready);
    }

    #[test]
    fn idle_without_work_stays_ready_even_if_the_position_does_not_move() {
        let t0 = Instant::now();
        let mut s = snapshot(t0);
        s.last_activity = Some(t0 + Duration::from_secs(995));
        assert!(assess(&s, t0 + Duration::from_secs(1000), &LIMITS).ready);
    }

    #[test]
    fn disconnected_silent_or_stalled_is_not_ready() {
        let t0 = Instant::now();
        let mut s = snapshot(t0);
        s.connected = false;
        let r = assess(&s, t0, &LIMITS);
        assert!(!r.ready && r.reasons[0].contains("connection"));
        let s = snapshot(t0);
        let r = assess(&s, t0 + Duration::from_secs(11), &LIMITS);
        assert!(!r.ready && r.reasons[0].contains("no activity"), "{r:?}");
        let mut s = snapshot(t0);
        s.work_pending = true;
        s.last_activity = Some(t0 + Duration::from_secs(60));
        let r = assess(&s, t0 + Duration::from_secs(61), &LIMITS);
        assert!(!r.ready && r.reasons[0].contains("not moved"), "{r:?}");
    }

    #[test]
    fn the_cell_tracks_when_the_position_moved() {
        let h = Health::new();
        h.set_connected(true);
        h.status_sent(Lsn(5), true);
        let first = h.snapshot().confirmed_changed;
        h.status_sent(Lsn(5), true);
        assert_eq!(h.snapshot().confirmed_changed, first);
        h.status_sent(Lsn(6), false);
        assert!(h.snapshot().confirmed_changed >= first);
        assert_eq!(h.snapshot().confirmed, Lsn(6));
    }
}
