//! The tasks of one streaming session: a worker per appservice, the recorder, and background
//! requests (first-opt-in backfills). The replication task owns a [`Workers`]; a reload replaces
//! single workers and the recorder, and shutdown stops them all, giving requests in flight a
//! bounded time to finish.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::delivery::worker::{AppserviceHandle, DeliveryContext, SynapseDb, run_recorder, run_worker};

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
    })
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
        let task = tokio::spawn(run_worker(handle, self.ctx.clone()));
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
            .spawn(run_recorder(handles, context_with(&self.ctx, both_rx)));
        // Reap what has finished.
        while self.others.try_join_next().is_some() {}
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
