//! The tasks of one streaming session: a worker per appservice, the recorder, and background
//! requests (first-opt-in backfills). The replication task owns a [`Workers`]; a reload replaces
//! single workers and the recorder, and shutdown stops them all, giving requests in flight a
//! bounded time to finish.
//!
//! A worker that dies (a panic: a bug) is started again, after the appservice's retry backoff
//! (reset once a worker has run for a minute), rather than the whole relay exiting: the other
//! appservices and the stream carry on, and a relay restarted by systemd would only redo what
//! a worker restart does, after losing every queue. The transaction it had in flight is
//! recorded as keys and resent with current values (nothing is lost); the restart is logged with
//! the panic's message, counted in `appservice_worker_restarts_total` and shown by `/readyz`
//! (not ready for [`crate::ops::health::WORKER_RESTART_NOTICE`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::delivery::handle::AppserviceHandle;
use crate::delivery::synapse_db::SynapseDb;
use crate::delivery::worker::{DeliveryContext, run_recorder, run_worker};

/// See the module documentation.
pub struct Workers {
    /// The context every worker gets (its `shutdown` is this session's stop signal).
    ctx: Arc<DeliveryContext>,
    stop: watch::Sender<bool>,
    workers: HashMap<String, JoinHandle<()>>,
    /// The recorders (the current one, and old ones finishing their round) and background requests.
    others: JoinSet<()>,
    recorder_stop: watch::Sender<bool>,
}

fn context_with(base: &DeliveryContext, shutdown: watch::Receiver<bool>) -> Arc<DeliveryContext> {
    Arc::new(DeliveryContext {
        http: base.http.clone(),
        settings: base.settings.clone(),
        db: base.db.clone(),
        store: base.store.clone(),
        client_url: base.client_url.clone(),
        epoch: base.epoch,
        progress: base.progress.clone(),
        recorder_wake: base.recorder_wake.clone(),
        shutdown,
        health: base.health.clone(),
    })
}

/// A worker that ran this long before dying starts again after the shortest backoff.
const WORKER_HEALTHY_AFTER: Duration = Duration::from_secs(60);

fn panic_message(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Run the worker of `handle`, starting it again whenever it dies (see the module documentation).
async fn supervise_worker(handle: Arc<AppserviceHandle>, ctx: Arc<DeliveryContext>) {
    let id = handle.settings.id.clone();
    let mut schedule = ctx.policy().schedule();
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let started = Instant::now();
        // Polled in this task (not spawned), so aborting this task drops the worker at once.
        let run = std::panic::AssertUnwindSafe(run_worker(handle.clone(), ctx.clone()));
        let Err(panic) = run.catch_unwind().await else {
            return;
        };
        let message = panic_message(&*panic).to_owned();
        // The batch in flight died with the task: record its keys, to resend current values.
        let recorded = handle.with_state(|s| {
            let in_flight = s.queue.in_flight_len();
            if in_flight > 0 {
                s.spill();
            }
            in_flight
        });
        ctx.recorder_wake.notify_one();
        handle.metrics.worker_restarted();
        ctx.health.worker_restarted(&id);
        if started.elapsed() >= WORKER_HEALTHY_AFTER {
            schedule = ctx.policy().schedule();
        }
        let wait = schedule.next_delay(None);
        tracing::error!(
            appservice = %id,
            panic = %message,
            keys_in_flight_recorded = recorded,
            restart_in = ?wait,
            restarts = handle.metrics.worker_restarts(),
            "the appservice's delivery worker died; starting it again"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Run the recorder; if it dies (a panic: a bug), the relay exits with a failure, for systemd
/// (`Restart=always`) to start it again. Restarting the recorder in-process would not do: the
/// keys it was writing died with it, and they hold the checkpoint until written. Nothing is lost
/// by exiting (the slot is confirmed only past keys written). A background request that panics
/// (a first-opt-in backfill request) is only logged: the request is made again at the next start.
async fn supervise_recorder(handles: Vec<Arc<AppserviceHandle>>, ctx: Arc<DeliveryContext>) {
    let run = std::panic::AssertUnwindSafe(run_recorder(handles, ctx));
    if let Err(panic) = run.catch_unwind().await {
        tracing::error!(
            panic = %panic_message(&*panic),
            "the recorder died; exiting so that the service manager starts the relay again \
             (nothing is lost: the slot is confirmed only past keys written)"
        );
        std::process::exit(crate::cmd::EXIT_FAILURE.into());
    }
}

impl Workers {
    /// Start a worker for each handle, and the recorder.
    pub fn start(base: &DeliveryContext, handles: &[Arc<AppserviceHandle>]) -> Workers {
        let (stop, stop_rx) = watch::channel(false);
        let (recorder_stop, _) = watch::channel(false);
        let mut w = Workers {
            ctx: context_with(base, stop_rx),
            stop,
            workers: HashMap::new(),
            others: JoinSet::new(),
            recorder_stop,
        };
        for h in handles {
            w.spawn_worker(h.clone());
        }
        w.restart_recorder(handles.to_vec());
        w
    }

    /// The shared SQL connection.
    pub fn db(&self) -> Arc<SynapseDb> {
        self.ctx.db.clone()
    }

    /// Where background requests go.
    pub fn background(&mut self) -> &mut JoinSet<()> {
        &mut self.others
    }

    /// Start the worker of `handle`.
    pub fn spawn_worker(&mut self, handle: Arc<AppserviceHandle>) {
        let id = handle.settings.id.clone();
        let task = tokio::spawn(supervise_worker(handle, self.ctx.clone()));
        if let Some(old) = self.workers.insert(id, task) {
            old.abort();
        }
    }

    /// Stop the worker of `id` now (a request in flight is abandoned) and wait until it is gone,
    /// so it touches its appservice's state no more.
    pub async fn abort_worker(&mut self, id: &str) {
        if let Some(task) = self.workers.remove(id) {
            task.abort();
            let _ = task.await;
        }
    }

    /// Start a recorder over `handles`; the previous one finishes the round it is in and stops
    /// (two recorders never write the same appservice's keys at once: see
    /// `AppserviceState::take_unrecorded`).
    pub fn restart_recorder(&mut self, handles: Vec<Arc<AppserviceHandle>>) {
        let _ = self.recorder_stop.send(true);
        let (tx, mut rx) = watch::channel(false);
        self.recorder_stop = tx;
        // The recorder also stops with the session.
        let mut session = self.ctx.shutdown.clone();
        let (both_tx, both_rx) = watch::channel(false);
        self.others.spawn(async move {
            tokio::select! {
                _ = rx.wait_for(|s| *s) => {}
                _ = session.wait_for(|s| *s) => {}
            }
            let _ = both_tx.send(true);
        });
        self.others
            .spawn(supervise_recorder(handles, context_with(&self.ctx, both_rx)));
        // Reap what has finished.
        while let Some(r) = self.others.try_join_next() {
            if let Err(e) = r
                && e.is_panic()
            {
                tracing::error!(error = %e, "a background request of the relay died (a bug); it is made again at the next start");
            }
        }
    }

    /// Stop everything: workers finish the request in flight (or give up at their next wait),
    /// the recorder finishes its write; whatever still runs after `timeout` is aborted. Returns
    /// whether everything finished in time.
    pub async fn stop(mut self, timeout: Duration) -> bool {
        let _ = self.stop.send(true);
        let _ = self.recorder_stop.send(true);
        let workers: Vec<JoinHandle<()>> = self.workers.drain().map(|(_, t)| t).collect();
        let aborts: Vec<_> = workers.iter().map(|t| t.abort_handle()).collect();
        let finished = tokio::time::timeout(timeout, async {
            for t in workers {
                let _ = t.await;
            }
            while self.others.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        for a in aborts {
            a.abort();
        }
        self.others.shutdown().await;
        finished
    }
}

impl Drop for Workers {
    /// Never leave tasks running without a session: they stop at their next wait.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = self.recorder_stop.send(true);
        for task in self.workers.values() {
            task.abort();
        }
    }
}
