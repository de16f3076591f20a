//! systemd's notify protocol (`Type=notify`), through the `sd-notify` crate; nothing happens
//! unless systemd (or a test) sets `NOTIFY_SOCKET`.
//!
//! - `READY=1` once the relay streams from its slot, or knows it is the standby of another
//!   relay holding the slot (a standby is a healthy, started service);
//! - `STATUS=…` when what it says changes: slot, confirmed position and lag, appservices up;
//! - `WATCHDOG=1` every half `WatchdogSec` while [`watchdog_ok`] holds: a relay whose pipeline
//!   is stuck stops pinging and systemd restarts it;
//! - `STOPPING=1` when SIGTERM or SIGINT arrives ([`notify_stopping`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::ops::health::{Health, HealthLimits, watchdog_ok};
use crate::ops::metrics::{AppserviceView, Metrics, ServedAppservices, SlotStatus};

/// Whether a notify socket is set.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot write to systemd's notify socket");
    }
}

/// `STOPPING=1` and a last status line.
pub fn notify_stopping(why: &str) {
    if enabled() {
        let status = format!("stopping ({why})");
        send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
    }
}

/// A free-form `STATUS=` line (e.g. after a reload).
pub fn notify_status(text: &str) {
    if enabled() {
        send(&[NotifyState::Status(text)]);
    }
}

/// What the supervisor reads.
pub struct Supervised {
    pub health: Arc<Health>,
    pub limits: HealthLimits,
    pub metrics: Arc<Metrics>,
    pub served: Arc<ServedAppservices>,
    pub slot: Arc<SlotStatus>,
    pub slot_name: String,
}

impl Supervised {
    /// The `STATUS=` text now.
    pub fn status_line(&self) -> String {
        let h = self.health.snapshot();
        let views: Vec<AppserviceView> = self
            .served
            .get()
            .iter()
            .map(|a| AppserviceView::of(a, &self.metrics.commit_times, std::time::SystemTime::now()))
            .collect();
        let up = views.iter().filter(|v| v.up).count();
        let recording = views.iter().filter(|v| v.recording).count();
        let what = if h.connected {
            let lag = self
                .slot
                .get()
                .and_then(|(r, _, _)| r.confirmed_flush_lag_bytes)
                .map(|b| format!(", lag {b} bytes"))
                .unwrap_or_default();
            format!("streaming from slot {}; confirmed {}{lag}", self.slot_name, h.confirmed)
        } else if h.standby {
            format!("standby: slot {} is in use by another process", self.slot_name)
        } else {
            format!("replication connection down (slot {}); reconnecting", self.slot_name)
        };
        let mut line = format!("{what}; appservices up {up}/{}", views.len());
        if recording > 0 {
            line.push_str(&format!(", {recording} recording"));
        }
        line
    }
}

/// Send READY, STATUS and WATCHDOG as described in the module documentation, until `stop`.
pub async fn supervise(s: Supervised, mut stop: watch::Receiver<bool>) {
    if !enabled() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog
        .map(|w| (w / 2).min(Duration::from_secs(1)))
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_millis(50));
    let mut ready_sent = false;
    let mut last_status = String::new();
    let mut withheld_logged = false;
    loop {
        let snapshot = s.health.snapshot();
        if !ready_sent && (snapshot.connected || snapshot.standby) {
            send(&[NotifyState::Ready]);
            ready_sent = true;
        }
        let line = s.status_line();
        if line != last_status {
            send(&[NotifyState::Status(&line)]);
            last_status = line;
        }
        if watchdog.is_some() {
            if watchdog_ok(&snapshot, Instant::now(), &s.limits) {
                send(&[NotifyState::Watchdog]);
                withheld_logged = false;
            } else if !withheld_logged {
                let reasons = s.health.report(&s.limits).reasons.join("; ");
                tracing::error!(reasons = %reasons, "the pipeline is stuck: no longer pinging systemd's watchdog, which will restart the relay");
                withheld_logged = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
