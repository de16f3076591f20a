//! The replication task's operational duties, kept apart from the streaming code: applying a
//! configuration reload at a transaction boundary (see [`crate::ops::reload`]), and checking
//! after the last status update that PostgreSQL recorded the confirmed position.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Relay;
use crate::delivery::handle::AppserviceHandle;
use crate::delivery::state::DeliveryMode;
use crate::delivery::synapse_db::SynapseDb;

impl Relay {
    /// Apply the pending reload, at a transaction boundary (see [`crate::ops::reload`]).
    pub(super) async fn apply_reload(&mut self) {
        let Some(reload) = self.pending_reload.take() else {
            return;
        };
        let Some(mut workers) = self.workers.take() else {
            // Only sessions apply reloads, and they have workers; keep it for the next one.
            self.pending_reload = Some(reload);
            return;
        };
        let plan = crate::ops::reload::plan(&self.settings, &reload.settings);
        for key in &plan.needs_restart {
            tracing::warn!(setting = %key, "reload: this setting changed, but it takes a restart to apply; keeping the running value");
        }
        let next = crate::ops::reload::merged(&self.settings, &reload.settings);
        let old: HashMap<String, Arc<AppserviceHandle>> = self
            .handles
            .iter()
            .map(|h| (h.settings.id.clone(), h.clone()))
            .collect();
        let mut handles = Vec::with_capacity(next.appservices.len());
        for a in &next.appservices {
            let handle = match old.get(&a.id) {
                Some(h) if h.settings == *a => {
                    handles.push(h.clone());
                    continue;
                }
                Some(h) => {
                    // Same queue, new settings. A transaction the old worker had in flight is
                    // resent with its keys' current values.
                    workers.abort_worker(&a.id).await;
                    let new = Arc::new(h.replacing(a.clone(), self.metrics.appservice(&a.id)));
                    let resent = new.with_state(|s| {
                        let in_flight = s.queue.in_flight_len() > 0;
                        if in_flight {
                            s.spill();
                        }
                        in_flight
                    });
                    if resent {
                        tracing::info!(appservice = %a.id, "reload: the transaction in flight will be resent with its keys' current values");
                    }
                    new
                }
                None => {
                    let new = Arc::new(AppserviceHandle::with_metrics(
                        a.clone(),
                        next.retention.max_queued_keys,
                        self.metrics.appservice(&a.id),
                    ));
                    if reload.with_pending.as_ref().is_some_and(|p| p.contains(&a.id)) {
                        tracing::info!(appservice = %a.id, "keys recorded for resync are waiting: resuming their delivery");
                        new.reset(DeliveryMode::Recording { switch_at: None });
                    }
                    new
                }
            };
            workers.spawn_worker(handle.clone());
            handle.notify();
            handles.push(handle);
        }
        for id in &plan.removed {
            workers.abort_worker(id).await;
            self.metrics.remove_appservice(id);
        }
        workers.restart_recorder(handles.clone());
        self.recorder_wake.notify_one();
        self.by_id = handles
            .iter()
            .enumerate()
            .map(|(i, h)| (h.settings.id.clone(), i))
            .collect();
        self.handles = handles;
        self.router = reload.router;
        self.settings = next;
        self.served.set(self.handles.clone());
        // The session restarts the stream with the new publications (see `SessionError::Restream`).
        self.restream = plan.restart_stream;
        for w in self.router.warnings() {
            tracing::warn!(appservice = %w.appservice, pattern = %w.pattern, "{}", w.message);
        }
        super::log_fallback_namespaces(&self.router);
        let changed: Vec<String> = plan
            .changed
            .iter()
            .map(|(id, what)| format!("{id} ({})", what.join(", ")))
            .collect();
        tracing::info!(
            added = %plan.added.join(", "),
            removed = %plan.removed.join(", "),
            changed = %changed.join("; "),
            also_applied = %plan.applied.join(", "),
            appservices = self.handles.len(),
            "configuration reloaded{}",
            if plan.is_noop() { ": nothing to change" } else { "" }
        );
        for id in &plan.removed {
            tracing::info!(appservice = %id, "reload: no longer served; its queued changes are let go (keys recorded for it stay for when it comes back)");
        }
        if !plan.added.is_empty() {
            self.spawn_first_opt_in_backfills(&workers.db(), workers.background())
                .await;
        }
        self.workers = Some(workers);
        self.metrics
            .reloads
            .get_or_create(&crate::ops::metrics::ResultLabel { result: "ok" })
            .inc();
        crate::ops::systemd::notify_status(&format!(
            "configuration reloaded; {} appservice(s) served",
            self.handles.len()
        ));
    }

    /// After the last status update and the end of the stream: check that PostgreSQL recorded
    /// the confirmed position, and if the released slot is still behind it (a server can lose a
    /// message sent just before a connection closes), advance the slot there. Bounded to a few
    /// seconds; a slot taken over by another relay meanwhile is left to it.
    pub(super) async fn verify_final_confirmation(&self, db: &SynapseDb) {
        let Some((_, confirmed)) = self.last_status else {
            return;
        };
        let slot = &self.settings.slot_name;
        let target = confirmed.to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let client = match db.client().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot check the slot's confirmed position after stopping");
                    return;
                }
            };
            let row = tokio::time::timeout(
                Duration::from_secs(5),
                client.query_opt(
                    "SELECT active, confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                    &[slot, &target],
                ),
            )
            .await;
            let Ok(row) = row else {
                tracing::debug!("no answer checking the slot's confirmed position after stopping");
                return;
            };
            match row {
                Ok(Some(r)) => {
                    let (active, recorded): (bool, Option<bool>) = (r.get(0), r.get(1));
                    if recorded == Some(true) {
                        return;
                    }
                    if !active {
                        let advance = tokio::time::timeout(
                            Duration::from_secs(5),
                            client.execute(
                                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                                &[slot, &target],
                            ),
                        )
                        .await
                        .map_err(|_| "no answer within 5 s".to_owned())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                        match advance {
                            Ok(_) => {
                                tracing::info!(slot = %slot, confirmed = %target, "the server had not recorded the last confirmation; advanced the slot to it")
                            }
                            Err(e) => {
                                tracing::warn!(slot = %slot, error = %e, "cannot advance the slot to the last confirmed position; what follows it will be sent again")
                            }
                        }
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot check the slot's confirmed position after stopping");
                    return;
                }
            }
            // The walsender is still releasing the slot (or another relay took it over).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
