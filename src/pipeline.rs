//! Wiring: replication stream → pgoutput decoder → row mapping → routing → per-appservice queues
//! → workers, and the checkpoint back to PostgreSQL.
//!
//! One task (this module's [`Relay::run`]) owns the replication connection, the decoder state,
//! the router and the [`CheckpointTracker`]; it pushes each change into the queue of every
//! interested appservice and never waits for an appservice. Each appservice has its own worker
//! task ([`crate::delivery::worker`]). The replication task sends a standby status update at
//! least every `status_interval` (1 s), at once when a keepalive asks for one, and a last one on
//! shutdown; it confirms only what [`CheckpointTracker::safe_lsn`] allows.
//!
//! When the connection fails, the task reconnects with backoff and resumes streaming after the
//! last transaction it received (what it already has waits in the queues); the relation map is
//! rebuilt from the Relation messages PostgreSQL sends again. After a restart of the process,
//! streaming resumes from the slot's confirmed position, so nothing confirmed is undelivered.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::sync::{Notify, watch};

use crate::checkpoint::CheckpointTracker;
use crate::config::Settings;
use crate::delivery::retry::RetryPolicy;
use crate::delivery::worker::{
    AppserviceHandle, CurrentContentReader, DeliveryContext, DeliveryError, http_client, run_worker,
};
use crate::model::Lsn;
use crate::provision::{Names, Problem, ProvisionError, Severity, inspect, problems};
use crate::replication::connection::{LogicalReplicationStream, ReplicationConnection};
use crate::replication::error::ReplicationError;
use crate::replication::pgoutput::{self, DecodeError, PgOutputMessage};
use crate::replication::wire::{self, ReplicationMessage, StandbyStatusUpdate, WireError};
use crate::routing::{AppserviceInterest, Router, RoutingError};
use crate::synapse::rows::{MappingError, RowMapper, RowOutcome};

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error("cannot inspect the database: {0}")]
    Provision(#[from] ProvisionError),
    #[error("cannot connect to PostgreSQL ({target}) to check the database: {message}")]
    Connect { target: String, message: String },
    #[error("refusing to start, nothing was changed:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Refused(Vec<Problem>),
    #[error("replication failed: {0}")]
    Replication(#[from] ReplicationError),
    #[error("{0}")]
    Mapping(#[from] MappingError),
}

/// How one replication session ended (other than by an error).
enum SessionEnd {
    Shutdown,
}

/// Errors inside a session, with what to do about them.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("malformed replication message: {0}")]
    Wire(#[from] WireError),
    #[error("malformed pgoutput message: {0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error("the server ended the replication stream")]
    StreamEnded,
}

/// The running relay: settings, router and appservice handles.
pub struct Relay {
    settings: Settings,
    router: Router,
    handles: Vec<Arc<AppserviceHandle>>,
    tracker: CheckpointTracker,
    targets: Vec<usize>,
    last_status: Option<(Lsn, Lsn)>,
}

impl Relay {
    /// Build the router and handles (no I/O). Errors name the registration file and pattern.
    pub fn new(settings: Settings) -> Result<Relay, RunError> {
        let interests: Vec<AppserviceInterest> = settings.appservices.iter().map(|a| a.interest()).collect();
        let router = Router::new(&interests)?;
        let handles = settings
            .appservices
            .iter()
            .map(|a| Arc::new(AppserviceHandle::new(a.clone())))
            .collect();
        Ok(Relay {
            settings,
            router,
            handles,
            tracker: CheckpointTracker::new(Lsn::ZERO),
            targets: Vec::new(),
            last_status: None,
        })
    }

    /// The appservice handles (for status and tests).
    pub fn handles(&self) -> &[Arc<AppserviceHandle>] {
        &self.handles
    }

    /// Log which appservices are served and which are skipped, and routing warnings.
    pub fn log_appservices(&self) {
        for a in &self.settings.appservices {
            tracing::info!(
                appservice = %a.id,
                url = %a.url,
                registration = %a.registration_path.display(),
                namespaces = a.user_regexes.len(),
                room_account_data = a.room_account_data,
                "serving appservice"
            );
        }
        for s in &self.settings.skipped {
            tracing::info!(appservice = %s.id, registration = %s.registration_path.display(), reason = %s.reason, "skipping appservice");
        }
        if self.settings.appservices.is_empty() {
            tracing::warn!("no appservice has opted in: the relay will confirm the slot and send nothing");
        }
        for w in self.router.warnings() {
            tracing::warn!(appservice = %w.appservice, pattern = %w.pattern, "{}", w.message);
        }
    }

    /// Check the database before streaming: refuse to start (changing nothing) if a published
    /// table lacks its replica identity or the publication or slot is missing or unusable.
    pub async fn preflight(&self) -> Result<Lsn, RunError> {
        let client = crate::postgres_sql::connect_sql(&self.settings.postgres)
            .await
            .map_err(|e| RunError::Connect {
                target: self.settings.postgres.describe(),
                message: e.to_string(),
            })?;
        let state = inspect(&client, &self.settings.slot_name, &self.settings.publication_name).await?;
        let names = Names {
            slot: &self.settings.slot_name,
            publication: &self.settings.publication_name,
        };
        let all = problems(&state, names);
        for p in all.iter().filter(|p| p.severity == Severity::Warning) {
            tracing::warn!("{}", p.message);
        }
        let blocking: Vec<Problem> = all.into_iter().filter(|p| p.severity != Severity::Warning).collect();
        if !blocking.is_empty() {
            return Err(RunError::Refused(blocking));
        }
        Ok(state.slot.and_then(|s| s.confirmed_flush_lsn).unwrap_or_default())
    }

    /// Stream until `shutdown` becomes true. Spawns one worker per appservice.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
        self.log_appservices();
        let start = self.preflight().await?;
        self.tracker = CheckpointTracker::new(start);
        let ctx = Arc::new(DeliveryContext {
            http: http_client(&self.settings.delivery)?,
            settings: self.settings.delivery.clone(),
            current: Arc::new(CurrentContentReader::new(self.settings.postgres.clone())),
            progress: Arc::new(Notify::new()),
            shutdown: shutdown.clone(),
        });
        let mut workers = tokio::task::JoinSet::new();
        for h in &self.handles {
            workers.spawn(run_worker(h.clone(), ctx.clone()));
        }
        let result = self.replicate(shutdown).await;
        workers.shutdown().await;
        result
    }

    async fn replicate(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
        let reconnect = RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        };
        let mut schedule = reconnect.schedule();
        let mut slot_busy_logged = false;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let resume_at = self.tracker.last_commit_end();
            let result = self.session(resume_at, &mut shutdown).await;
            let err = match result {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Err(e) => e,
            };
            match err {
                SessionError::Replication(r) if r.is_slot_in_use() => {
                    if !slot_busy_logged {
                        tracing::warn!(slot = %self.settings.slot_name, error = %r, "the replication slot is in use by another process (another relay?); waiting for it to become free");
                        slot_busy_logged = true;
                    }
                }
                SessionError::Replication(r) if r.is_slot_missing() || r.is_slot_invalidated() || !r.is_transient() => {
                    return Err(RunError::Replication(r));
                }
                SessionError::Mapping(m @ MappingError::MissingColumn { .. }) => return Err(RunError::Mapping(m)),
                other => {
                    slot_busy_logged = false;
                    tracing::warn!(error = %other, "replication connection lost; reconnecting");
                }
            }
            let wait = schedule.next_delay(None);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn session(
        &mut self,
        resume_at: Lsn,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, SessionError> {
        let mut conn = ReplicationConnection::connect(&self.settings.postgres).await?;
        let ident = conn.identify_system().await?;
        let mut stream = conn
            .start_logical_replication(&self.settings.slot_name, resume_at, &self.settings.publication_name)
            .await?;
        tracing::info!(
            slot = %self.settings.slot_name,
            publication = %self.settings.publication_name,
            server = %stream.target(),
            server_wal = %ident.xlogpos,
            resume_after = %resume_at,
            "streaming account-data changes"
        );
        let mut mapper = RowMapper::new();
        let mut current_commit = Lsn::ZERO;
        let mut routed = false;
        let mut interval = tokio::time::interval(self.settings.status_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        self.send_status(&mut stream, false).await?;
                        stream.finish().await;
                        tracing::info!(confirmed = %self.last_status.map(|s| s.1).unwrap_or_default(), "replication stopped");
                        return Ok(SessionEnd::Shutdown);
                    }
                }
                _ = interval.tick() => {
                    self.send_status(&mut stream, false).await?;
                }
                payload = stream.next_copy_data() => {
                    let Some(payload) = payload? else { return Err(SessionError::StreamEnded) };
                    match wire::parse_copy_data(payload)? {
                        ReplicationMessage::PrimaryKeepalive { wal_end, reply_requested, .. } => {
                            self.tracker.keepalive(wal_end);
                            if reply_requested {
                                self.send_status(&mut stream, true).await?;
                            }
                        }
                        ReplicationMessage::XLogData { data, .. } => {
                            let message = pgoutput::decode(data)?;
                            self.on_message(&message, &mut mapper, &mut current_commit, &mut routed)?;
                        }
                    }
                }
            }
        }
    }

    fn on_message(
        &mut self,
        message: &PgOutputMessage,
        mapper: &mut RowMapper,
        current_commit: &mut Lsn,
        routed: &mut bool,
    ) -> Result<(), SessionError> {
        match message {
            PgOutputMessage::Begin { final_lsn, .. } => {
                *current_commit = *final_lsn;
                *routed = false;
                self.tracker.begin(*final_lsn);
            }
            PgOutputMessage::Commit {
                commit_lsn, end_lsn, ..
            } => {
                self.tracker.commit(*commit_lsn, *end_lsn, *routed);
            }
            other => match mapper.map(other, *current_commit) {
                Ok(RowOutcome::Change(change)) => {
                    self.router.route_into(&change.key.user_id, &mut self.targets);
                    for &i in &self.targets {
                        let h = &self.handles[i];
                        if change.key.room_id.is_some() && !h.settings.room_account_data {
                            continue;
                        }
                        h.with_queue(|q| q.push(change.clone()));
                        h.notify();
                        *routed = true;
                    }
                }
                Ok(RowOutcome::Truncated(tables)) if !tables.is_empty() => {
                    tracing::warn!(tables = %tables.join(", "), "TRUNCATE of account-data tables: appservices are not told (nothing to show in /sync either)");
                }
                Ok(RowOutcome::ForeignRelation { namespace, name }) => {
                    tracing::warn!(table = %format!("{namespace}.{name}"), publication = %self.settings.publication_name, "a table the relay does not read is in its publication; its rows are ignored");
                }
                Ok(RowOutcome::RelationUpdated(t)) => tracing::debug!(table = t.name(), "relation described"),
                Ok(_) => {}
                Err(e) if e.is_row_level() => tracing::error!(commit_lsn = %current_commit, "{e}"),
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    }

    /// The oldest commit LSN with an undelivered change, over all appservices.
    fn oldest_undelivered(&self) -> Option<Lsn> {
        self.handles
            .iter()
            .filter_map(|h| h.with_queue(|q| q.oldest_undelivered()))
            .min()
    }

    async fn send_status(
        &mut self,
        stream: &mut LogicalReplicationStream,
        asked: bool,
    ) -> Result<(), ReplicationError> {
        let oldest = self.oldest_undelivered();
        let safe = self.tracker.safe_lsn(oldest);
        let write = self.tracker.received().max(safe);
        let update = StandbyStatusUpdate {
            write,
            flush: safe,
            apply: safe,
            client_time_micros: wire::micros_since_pg_epoch(SystemTime::now()),
            reply_requested: false,
        };
        let mut buf = BytesMut::with_capacity(34);
        update.encode(&mut buf);
        stream.send_copy_data(&buf).await?;
        if self.last_status.map(|s| s.1) != Some(safe) {
            tracing::debug!(confirmed = %safe, received = %write, asked, "standby status update");
        }
        self.last_status = Some((write, safe));
        Ok(())
    }
}
