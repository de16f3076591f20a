//! The pipeline: takes in the resolved settings and the replication slot; gives out every change
//! pushed to the appservices that want it, and the checkpoint confirmed back to PostgreSQL.
//!
//! Wiring: replication stream → pgoutput decoder → row mapping → routing → per-appservice state
//! → workers and recorder ([`supervisor`]), and the checkpoint back to PostgreSQL.
//!
//! One task ([`Relay::run`]) owns the replication connection, the decoder state, the router and
//! the [`CheckpointTracker`]; it hands each change to every interested appservice and never waits
//! for one. It sends a standby status update at least every `status_interval` (1 s), at once when
//! a keepalive asks for one, and a last one on shutdown; it confirms only what
//! [`CheckpointTracker::safe_lsn`] allows. At each status update it also applies the retention
//! budget: an appservice failing for too long, or holding back too much WAL, is switched to
//! recording mode (see [`crate::delivery::state`]).
//!
//! Life cycle: wait for the slot (a slot in use by another relay, SQLSTATE 55006, is waited for
//! calmly: a standby); become active (decide each appservice's mode, request backfills for
//! appservices opting in for the first time, start the workers and the recorder; a failing
//! statement there lets the slot go and is retried with backoff); stream,
//! reconnecting with backoff after connection losses and resuming after the last transaction
//! received (a 55006 then is usually our own old walsender, still waiting for
//! `wal_sender_timeout`: see `Relay::on_slot_busy`); if the slot is lost (invalidated or dropped), re-create it and resync every
//! appservice (or stop, with `on_slot_lost = "fail"`); if another relay took the slot over, drop
//! everything in memory and go back to waiting.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use tokio::sync::{Notify, watch};

use crate::checkpoint::CheckpointTracker;
use crate::config::{Settings, SlotLostPolicy};
use crate::delivery::handle::AppserviceHandle;
use crate::delivery::retry::RetryPolicy;
use crate::delivery::state::{DeliveryMode, Pushed};
use crate::delivery::synapse_db::SynapseDb;
use crate::delivery::worker::{DeliveryContext, DeliveryError, http_client};
use crate::failover::inspect::FailoverWatch;
use crate::failover::timeline::{ServerChange, ServerIdentity};
use crate::model::{ChangeContent, Lsn, SourceTable};
use crate::ops::health::Health;
use crate::ops::metrics::{DECODE_MESSAGE, DECODE_ROW, KindLabel, Metrics, ServedAppservices, SlotStatus};
use crate::ops::reload::Reload;
use crate::pipeline::supervisor::Workers;
use crate::replication::connection::{LogicalReplicationStream, ReplicationConnection};
use crate::replication::error::ReplicationError;
use crate::replication::pgoutput::{self, DecodeError, PgOutputMessage};
use crate::replication::wire::{self, ReplicationMessage, StandbyStatusUpdate, WireError};
use crate::resync::backfill::request_backfill;
use crate::resync::store::{MESSAGE_PREFIX, RelayMessage, StateStore, StoreError};
use crate::routing::{Router, RoutingError, is_local_user};
use crate::setup::checks::{Problem, Severity, problems};
use crate::setup::inspect::{ProvisionError, inspect};
use crate::synapse::rows::{MappingError, RowMapper, RowOutcome};

mod operations;
pub mod supervisor;

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
    #[error(
        "the replication slot {slot:?} was lost ({what}) and replication.on_slot_lost = \"fail\": changes since its last \
             confirmed position are gone from the stream. Re-create it with `setup` and resync the appservices with `backfill`"
    )]
    SlotLost { slot: String, what: String },
    #[error("state store: {0}")]
    Store(#[from] StoreError),
}

/// How long the relay keeps a replication connection whose server keeps asking for confirmations
/// it cannot give (see [`SessionError::ServerWaiting`]).
const SERVER_WAIT_LIMIT: Duration = Duration::from_secs(2);

/// Whether the server *keeps* asking for confirmations the relay cannot give (see
/// [`SessionError::ServerWaiting`]). A walsender that waits before exiting asks again as soon as
/// each reply arrives (every round trip); an ordinary keepalive asks once in a while. So a run of
/// requests only counts while each comes within [`SERVER_WAIT_LIMIT`] of the previous one, and
/// data or a request with nothing pending ends it: an old request never makes a new one look like
/// the server has been waiting all along. Pure (the caller passes the time).
#[derive(Debug, Default)]
struct ServerWaitWatch {
    /// Since when, and the last request of the run.
    run: Option<(Instant, Instant)>,
}

impl ServerWaitWatch {
    /// A keepalive asking for a reply arrived at `now`, with `pending` = the relay could not
    /// confirm everything the server sent. True when the server has been asking for longer than
    /// [`SERVER_WAIT_LIMIT`] without a pause.
    fn request(&mut self, now: Instant, pending: bool) -> bool {
        if !pending {
            self.run = None;
            return false;
        }
        let since = match self.run {
            Some((since, last)) if now.saturating_duration_since(last) <= SERVER_WAIT_LIMIT => since,
            _ => now,
        };
        self.run = Some((since, now));
        now.saturating_duration_since(since) > SERVER_WAIT_LIMIT
    }

    /// Changes arrived: the server is streaming, not waiting.
    fn data(&mut self) {
        self.run = None;
    }
}

/// The transaction being received.
#[derive(Debug, Clone, Copy, Default)]
struct OpenTx {
    commit_lsn: Lsn,
    commit_time_micros: i64,
    xid: u32,
    /// Whether any of its changes went to an appservice.
    routed: bool,
    /// Whether its commit time was kept for the latency metric (see [`crate::delivery::metrics::CommitTimes`]).
    timed: bool,
}

/// How long the stream waits at most for an appservice whose live queue is full before its keys
/// are recorded instead (see `Relay::wait_for_room`).
pub const QUEUE_FULL_WAIT: Duration = Duration::from_secs(1);

/// Wake-ups owed after the messages being handled (see [`Relay::flush_wakes`]).
#[derive(Debug, Default)]
struct PendingWakes {
    marked: Vec<bool>,
    list: Vec<usize>,
    recorder: bool,
}

impl PendingWakes {
    fn worker(&mut self, i: usize) {
        if self.marked.len() <= i {
            self.marked.resize(i + 1, false);
        }
        if !self.marked[i] {
            self.marked[i] = true;
            self.list.push(i);
        }
    }
}

/// How a streaming session ended.
enum SessionEnd {
    Shutdown,
    /// Another process holds the slot now.
    SlotTaken,
    /// The slot is gone or invalidated.
    SlotLost(String),
    /// The server is another timeline's or cluster's (see [`crate::failover::timeline`]): what is
    /// in memory is dropped, and streaming starts again from the slot's confirmed position;
    /// `resync`: the old primary had sent changes the new one never had.
    ServerChanged {
        resync: bool,
    },
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
    #[error("the publications to stream changed (reload)")]
    Restream,
    #[error("nothing received from the server for {0:?} (replication.timeout): taking the connection for dead")]
    Silent(Duration),
    #[error(
        "the server keeps asking for confirmations the relay cannot give yet (it is shutting down, or waiting for \
         undelivered changes): releasing the connection so it can go on; the unconfirmed changes will be streamed again"
    )]
    ServerWaiting,
    /// A reconnect reached another timeline or cluster (see [`SessionEnd::ServerChanged`]).
    #[error("the server changed (promotion or another cluster)")]
    ServerChanged { resync: bool },
    /// A former primary (an older timeline): not streamed from.
    #[error("{0}")]
    FormerPrimary(String),
}

/// Say at start which namespaces need the fallback regex engine.
pub(crate) fn log_fallback_namespaces(router: &Router) {
    for f in router.fallback_namespaces() {
        tracing::info!(
            appservice = %f.appservice,
            pattern = %f.pattern,
            "users namespace regex needs the fallback engine (fancy-regex: lookaround or backreferences): checked on its own, with a backtrack limit; a user id that exceeds it counts as outside the namespace (logged, metric routing_backtrack_limit_exceeded_total)"
        );
    }
}

/// The running relay: settings, router, appservice handles, checkpoint.
pub struct Relay {
    settings: Settings,
    router: Router,
    handles: Vec<Arc<AppserviceHandle>>,
    by_id: HashMap<String, usize>,
    tracker: CheckpointTracker,
    targets: Vec<usize>,
    /// Workers (and the recorder) to wake once the messages already read are handled.
    wakes: PendingWakes,
    last_status: Option<(Lsn, Lsn)>,
    store: StateStore,
    health: Arc<Health>,
    recorder_wake: Arc<Notify>,
    /// Signalled by the workers after each delivered transaction.
    progress: Arc<Notify>,
    /// Appservices whose live queue outgrew `max_queued_keys` while they accept what they are
    /// sent: the stream waits for them (see [`Relay::wait_for_room`]) before reading on.
    full: Vec<usize>,
    metrics: Arc<Metrics>,
    served: Arc<ServedAppservices>,
    slot_status: Arc<SlotStatus>,
    /// This session's workers and recorder.
    workers: Option<Workers>,
    reloads: Option<tokio::sync::mpsc::Receiver<Reload>>,
    /// A reload received inside a transaction, applied at its end.
    pending_reload: Option<Reload>,
    /// Chosen at each activation; part of every transaction id.
    epoch: u64,
    /// When a backtrack-limit failure of a fallback namespace was last logged, and how many
    /// happened since (logged at most once a minute; all are counted in the metric).
    backtrack_limit_log: (Option<Instant>, u64),
    /// The server PIDs of this process's latest replication connections (their walsenders), to
    /// recognise our own stale walsender behind a 55006 (see [`Relay::on_slot_busy`]).
    own_walsenders: Vec<i32>,
    /// A reload changed the publications to stream: the session restarts the stream.
    restream: bool,
    /// The server last streamed from (see [`crate::failover::timeline`]).
    server: Option<ServerIdentity>,
    /// What changed about the server since the last stream started (a promotion), for the
    /// lost-slot log line; cleared once streaming starts.
    server_change: Option<String>,
    /// Whether the failover slot is safe (with `replication.failover`).
    failover: Arc<FailoverWatch>,
}

/// How many of our replication connections' PIDs are remembered.
const OWN_WALSENDERS_KEPT: usize = 8;

/// How long the relay waits, beyond `wal_sender_timeout`, for a walsender it cannot identify to
/// let the slot go after a reconnect, before it concludes another process took the slot over.
const STALE_WALSENDER_MARGIN: Duration = Duration::from_secs(5);

/// What a 55006 on reconnecting means.
#[derive(Debug, PartialEq, Eq)]
enum SlotBusy {
    /// Our own earlier connection (or one we cannot tell): try again after this long.
    Retry(Duration),
    /// Another process holds the slot.
    Taken,
}

impl Relay {
    /// Build the router and handles (no I/O). Errors name the registration file and pattern.
    pub fn new(settings: Settings) -> Result<Relay, RunError> {
        let interests: Vec<_> = settings.appservices.iter().map(|a| a.interest()).collect();
        let router = Router::new(&interests)?;
        let metrics = Arc::new(Metrics::new());
        let handles: Vec<Arc<AppserviceHandle>> = settings
            .appservices
            .iter()
            .map(|a| {
                Arc::new(AppserviceHandle::with_metrics(
                    a.clone(),
                    settings.retention.max_queued_keys,
                    metrics.appservice(&a.id),
                ))
            })
            .collect();
        let served = Arc::new(ServedAppservices::default());
        served.set(handles.clone());
        let by_id = settings
            .appservices
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.clone(), i))
            .collect();
        let store = StateStore::new(&settings.state_schema);
        Ok(Relay {
            settings,
            router,
            handles,
            by_id,
            tracker: CheckpointTracker::new(Lsn::ZERO),
            targets: Vec::new(),
            wakes: PendingWakes::default(),
            last_status: None,
            store,
            health: Arc::new(Health::new()),
            recorder_wake: Arc::new(Notify::new()),
            progress: Arc::new(Notify::new()),
            full: Vec::new(),
            metrics,
            served,
            slot_status: Arc::new(SlotStatus::default()),
            workers: None,
            reloads: None,
            pending_reload: None,
            epoch: 0,
            backtrack_limit_log: (None, 0),
            own_walsenders: Vec::new(),
            restream: false,
            server: None,
            server_change: None,
            failover: Arc::new(FailoverWatch::default()),
        })
    }

    /// The metrics registry.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The appservices served now (replaced on reload).
    pub fn served(&self) -> Arc<ServedAppservices> {
        self.served.clone()
    }

    /// The slot as last read from PostgreSQL (every few seconds while running).
    pub fn slot_status(&self) -> Arc<SlotStatus> {
        self.slot_status.clone()
    }

    /// Whether the failover slot is safe (read every few seconds with `replication.failover`).
    pub fn failover(&self) -> Arc<FailoverWatch> {
        self.failover.clone()
    }

    /// Apply the validated configurations received on `reloads` (see [`crate::ops::reload`]).
    pub fn with_reloads(mut self, reloads: tokio::sync::mpsc::Receiver<Reload>) -> Relay {
        self.reloads = Some(reloads);
        self
    }

    /// The appservice handles (for status and tests).
    pub fn handles(&self) -> &[Arc<AppserviceHandle>] {
        &self.handles
    }

    /// Whether the pipeline is making progress (for readiness checks).
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Log which appservices are served and which are skipped, and routing warnings.
    pub fn log_appservices(&self) {
        for a in &self.settings.appservices {
            tracing::info!(
                appservice = %a.id,
                url = %crate::config::redacted_url(&a.url),
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
        log_fallback_namespaces(&self.router);
    }

    /// Check the database before streaming: refuse to start (changing nothing) if a published
    /// table lacks its replica identity, or the publication or the state schema is missing. A
    /// missing or invalidated slot is handled by the slot-lost policy instead.
    pub async fn preflight(&self) -> Result<(), RunError> {
        let client = crate::postgres::sql::connect_sql_bounded(
            &self.settings.postgres,
            crate::delivery::synapse_db::SQL_TIMEOUT,
        )
        .await
        .map_err(|e| RunError::Connect {
            target: self.settings.postgres.describe(),
            message: e.to_string(),
        })?;
        let state = inspect(&client, self.settings.names()).await?;
        let all = problems(&state, self.settings.names());
        for p in all.iter().filter(|p| p.severity == Severity::Warning) {
            tracing::warn!("{}", p.message);
        }
        let slot_recoverable = |p: &Problem| {
            self.settings.on_slot_lost == SlotLostPolicy::Resync
                && (p.message.contains("does not exist") || p.message.contains("wal_status = lost"))
                && p.message.starts_with("replication slot")
        };
        let blocking: Vec<Problem> = all
            .into_iter()
            .filter(|p| p.severity != Severity::Warning && !slot_recoverable(p))
            .collect();
        if !blocking.is_empty() {
            return Err(RunError::Refused(blocking));
        }
        Ok(())
    }

    /// Stream until `shutdown` becomes true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
        self.log_appservices();
        // PostgreSQL may not be up yet (the relay started first, or it is restarting): wait for it.
        let mut startup = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
        .schedule();
        loop {
            match self.preflight().await {
                Ok(()) => break,
                Err(e @ RunError::Connect { .. }) => {
                    let wait = startup.next_delay(None);
                    tracing::warn!(error = %e, retry_in = ?wait, "PostgreSQL is not reachable yet; waiting for it");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {}
                    }
                    if *shutdown.borrow() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let db = Arc::new(SynapseDb::new(self.settings.postgres.clone()));
        let http = http_client(&self.settings.delivery)?;
        let progress = self.progress.clone();
        let (poll_stop, poll_stop_rx) = watch::channel(false);
        tokio::spawn(crate::ops::metrics::poll_slot(
            db.clone(),
            self.store.clone(),
            self.settings.slot_name.clone(),
            self.metrics.clone(),
            self.slot_status.clone(),
            self.served.clone(),
            poll_stop_rx,
        ));
        if self.settings.failover_slot {
            tokio::spawn(crate::failover::inspect::watch(
                db.clone(),
                self.settings.postgres.clone(),
                self.settings.slot_name.clone(),
                self.metrics.clone(),
                self.failover.clone(),
                poll_stop.subscribe(),
            ));
        }
        let _poll_stop = poll_stop;
        let mut activation_retry = RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
        .schedule();
        loop {
            let Some(stream) = self.acquire_slot(&mut shutdown).await? else {
                return Ok(());
            };
            if let Err(e) = self.activate(&db).await {
                // Like every other transient fault (the database restarting, a statement
                // cancelled, a lock timeout): let the slot go and try again.
                stream.finish().await;
                if let RunError::Store(s) = &e {
                    db.forget_if_lost(s).await;
                }
                let wait = activation_retry.next_delay(None);
                tracing::warn!(error = %e, retry_in = ?wait, "cannot start the session (reading the relay's state failed); retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            activation_retry = RetryPolicy {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
            }
            .schedule();
            let ctx = DeliveryContext {
                http: http.clone(),
                settings: self.settings.delivery.clone(),
                db: db.clone(),
                store: self.store.clone(),
                client_url: self.settings.client_url.clone(),
                epoch: self.epoch,
                progress: progress.clone(),
                recorder_wake: self.recorder_wake.clone(),
                // Replaced by the workers' own stop signal.
                shutdown: shutdown.clone(),
                health: self.health.clone(),
            };
            let mut workers = Workers::start(&ctx, &self.handles);
            self.spawn_first_opt_in_backfills(&db, workers.background()).await;
            self.workers = Some(workers);
            let result = self.replicate(stream, &mut shutdown).await;
            // On shutdown the session already stopped them (before its last status update).
            if let Some(workers) = self.workers.take() {
                let wait = match &result {
                    Ok(SessionEnd::Shutdown) => self.settings.shutdown_timeout,
                    // Requests in flight are abandoned: nothing they did is confirmed.
                    _ => Duration::from_secs(2),
                };
                workers.stop(wait).await;
            }
            self.health.set_connected(false);
            match result? {
                SessionEnd::Shutdown => {
                    // Bounded as a whole: the shared SQL connection may be one a partition left
                    // hanging, and shutdown must not wait for it.
                    if tokio::time::timeout(Duration::from_secs(10), self.verify_final_confirmation(&db))
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            "cannot check the slot's confirmed position after stopping: no answer within 10s"
                        );
                    }
                    return Ok(());
                }
                SessionEnd::SlotTaken => {
                    tracing::warn!(slot = %self.settings.slot_name, "another process took the replication slot over; dropping what was in memory (it is not confirmed, so the slot still has it) and waiting as a standby");
                    self.deactivate();
                }
                SessionEnd::ServerChanged { resync } => {
                    // Nothing in memory is confirmed: the new server's slot still has it all (or
                    // it never had it). The shared SQL connection went to the old server.
                    self.deactivate();
                    db.forget().await;
                    if resync
                        && let Err(e) = self
                            .resync_all("the old primary had sent changes the new one never had")
                            .await
                    {
                        tracing::error!(error = %e, "requesting the resync of every appservice failed; run `backfill` for each");
                    }
                }
                SessionEnd::SlotLost(what) => {
                    self.deactivate();
                    match self.recover_slot(&what).await {
                        Ok(()) => {}
                        Err(e @ RunError::SlotLost { .. }) => return Err(e),
                        // Waiting for the slot tries again (and recovers again if still needed).
                        Err(e) => tracing::error!(error = %e, "re-creating the replication slot failed; retrying"),
                    }
                }
            }
        }
    }

    /// Forget in-memory state: nothing of it is confirmed, so the slot holds it all.
    fn deactivate(&mut self) {
        for h in &self.handles {
            h.reset(DeliveryMode::Live);
        }
        self.metrics.commit_times.clear();
        self.tracker = CheckpointTracker::new(Lsn::ZERO);
        self.last_status = None;
        self.full.clear();
    }

    /// Connect and start replication, waiting while another process holds the slot. Handles a
    /// lost slot by the policy. `None` on shutdown.
    async fn acquire_slot(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<LogicalReplicationStream>, RunError> {
        let mut schedule = RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(2),
        }
        .schedule();
        let mut errors = RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
        .schedule();
        let mut busy_logged = false;
        loop {
            if *shutdown.borrow() {
                return Ok(None);
            }
            let wait = match self.start_stream(Lsn::ZERO).await {
                Ok(s) => {
                    if busy_logged {
                        tracing::info!(slot = %self.settings.slot_name, "the replication slot is free: taking over");
                    }
                    return Ok(Some(s));
                }
                Err(SessionError::Replication(r)) if r.is_slot_in_use() => {
                    self.health.set_standby();
                    if !busy_logged {
                        tracing::warn!(slot = %self.settings.slot_name, error = %r, "the replication slot is in use by another process (another relay?): waiting as a standby until it is free");
                        busy_logged = true;
                    }
                    schedule.next_delay(None)
                }
                Err(SessionError::Replication(r)) if r.is_slot_missing() || r.is_slot_invalidated() => {
                    let what = if r.is_slot_missing() {
                        "it does not exist"
                    } else {
                        "PostgreSQL invalidated it"
                    };
                    match self.recover_slot(&format!("{what}: {r}")).await {
                        Ok(()) => continue,
                        Err(e @ RunError::SlotLost { .. }) => return Err(e),
                        Err(e) => {
                            let wait = errors.next_delay(None);
                            tracing::error!(error = %e, retry_in = ?wait, "re-creating the replication slot failed; retrying");
                            wait
                        }
                    }
                }
                Err(SessionError::Replication(r)) if is_fatal(&r) => return Err(RunError::Replication(r)),
                Err(e) => {
                    let wait = errors.next_delay(None);
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot start replication; retrying");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn start_stream(&mut self, resume_at: Lsn) -> Result<LogicalReplicationStream, SessionError> {
        let mut conn = ReplicationConnection::connect(&self.settings.postgres).await?;
        // Remembered before START_REPLICATION: from then on this walsender may hold the slot,
        // even if we never hear back.
        if let Some(pid) = conn.backend_pid() {
            if self.own_walsenders.len() >= OWN_WALSENDERS_KEPT {
                self.own_walsenders.remove(0);
            }
            self.own_walsenders.push(pid);
        }
        let ident = conn.identify_system().await?;
        if let Err(e) = self.note_server(&mut conn, &ident).await {
            conn.close().await;
            return Err(e);
        }
        let stream = conn
            .start_logical_replication_of(&self.settings.slot_name, resume_at, &self.publications())
            .await?;
        self.health.set_connected(true);
        tracing::info!(
            slot = %self.settings.slot_name,
            publication = %self.settings.publication_name,
            server = %stream.target(),
            server_wal = %ident.xlogpos,
            resume_after = %resume_at,
            timeline = ident.timeline,
            "streaming account-data changes"
        );
        self.server_change = None;
        Ok(stream)
    }

    /// Compares the server `conn` reached with the last one streamed from (see
    /// [`crate::failover::timeline`]) and logs what changed. A promotion or another cluster
    /// while something received from the old server is held (a reconnect) ends the session, so
    /// that no position of the old server's history is confirmed to the new one; a former
    /// primary (an older timeline) is not streamed from.
    async fn note_server(
        &mut self,
        conn: &mut ReplicationConnection,
        ident: &crate::replication::connection::SystemIdentity,
    ) -> Result<(), SessionError> {
        let now = ServerIdentity {
            system_id: ident.system_id.clone(),
            timeline: ident.timeline,
            server: conn.target().to_owned(),
        };
        let history = match &self.server {
            Some(last) if last.system_id == now.system_id && now.timeline > last.timeline => {
                crate::failover::inspect::timeline_history(conn, &now).await
            }
            _ => None,
        };
        let change = crate::failover::timeline::assess(
            self.server.as_ref(),
            &now,
            history.as_deref(),
            self.tracker.last_commit_end(),
        );
        let line = change.describe(&now);
        match &change {
            ServerChange::First | ServerChange::Same => {
                self.server = Some(now);
                Ok(())
            }
            ServerChange::FormerPrimary { .. } => {
                let line = line.unwrap_or_default();
                tracing::error!(server = %now.server, "{line}");
                Err(SessionError::FormerPrimary(line))
            }
            ServerChange::Promoted { .. } | ServerChange::OtherCluster { .. } => {
                let line = line.unwrap_or_default();
                tracing::warn!(server = %now.server, system_id = %now.system_id, timeline = now.timeline, "{line}");
                self.server_change = Some(line);
                self.server = Some(now);
                let resync = matches!(
                    change,
                    ServerChange::Promoted {
                        received_past_switch: Some(_),
                        ..
                    }
                );
                if self.tracker.received() == Lsn::ZERO && !resync {
                    // Nothing received from the old server (not even a keepalive's position):
                    // stream from the slot's position right away.
                    return Ok(());
                }
                Err(SessionError::ServerChanged { resync })
            }
        }
    }

    /// The slot is gone: by policy, stop, or re-create it and resync every appservice. One log
    /// line says what happened: why PostgreSQL invalidated it (`invalidation_reason`, e.g.
    /// `idle_timeout` on PostgreSQL 18), or that no synchronised copy survived a promotion.
    async fn recover_slot(&mut self, what: &str) -> Result<(), RunError> {
        let slot = self.settings.slot_name.clone();
        let connected = crate::postgres::sql::connect_sql(&self.settings.postgres).await;
        let reason = match &connected {
            Ok(c) => tokio::time::timeout(
                Duration::from_secs(10),
                c.query_opt(
                    "SELECT to_jsonb(s) ->> 'invalidation_reason' FROM pg_catalog.pg_replication_slots s \
                     WHERE s.slot_name = $1",
                    &[&slot],
                ),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .and_then(|r| r.get::<_, Option<String>>(0)),
            Err(_) => None,
        };
        let line = crate::failover::slots::lost_slot_line(
            &slot,
            what,
            reason.as_deref(),
            self.server_change.as_deref(),
            self.settings.on_slot_lost == SlotLostPolicy::Resync,
        );
        tracing::error!(slot = %slot, "{line}");
        if self.settings.on_slot_lost == SlotLostPolicy::Fail {
            return Err(RunError::SlotLost { slot, what: line });
        }
        let mut client = connected.map_err(|e| RunError::Connect {
            target: self.settings.postgres.describe(),
            message: e.to_string(),
        })?;
        let sql_err = |what: &'static str| {
            move |e: tokio_postgres::Error| StoreError {
                what,
                message: e
                    .as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_else(|| e.to_string()),
                sqlstate: e.code().map(|c| c.code().to_owned()),
                connection_lost: e.is_closed(),
            }
        };
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&slot],
            )
            .await
            .map_err(sql_err("dropping the lost replication slot"))?;
        let created = if self.settings.failover_slot {
            client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)",
                    &[&slot],
                )
                .await
        } else {
            client
                .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
                .await
        };
        match created {
            Ok(_) => tracing::warn!(slot = %slot, "re-created the replication slot; resyncing every appservice"),
            // Another relay re-created it first: it resyncs, and we will be its standby.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => return Ok(()),
            Err(e) => return Err(sql_err("re-creating the replication slot")(e).into()),
        }
        self.request_resyncs(&mut client, "resync requested after the slot was lost")
            .await
    }

    /// Request a resync of every appservice (a backfill each, written into the stream).
    async fn request_resyncs(&self, client: &mut tokio_postgres::Client, log: &str) -> Result<(), RunError> {
        for a in &self.settings.appservices {
            let request = request_backfill(client, &self.store, a, None)
                .await
                .map_err(|e| match e {
                    crate::resync::backfill::ResyncError::Store(s) => RunError::Store(s),
                    crate::resync::backfill::ResyncError::Routing(r) => RunError::Routing(r),
                })?;
            tracing::warn!(appservice = %a.id, backfill = request, "{log}");
        }
        Ok(())
    }

    /// After a promotion that lost changes the relay had received (see
    /// [`crate::failover::timeline::ServerChange::Promoted`]): resync every appservice.
    async fn resync_all(&self, why: &str) -> Result<(), RunError> {
        let mut client = crate::postgres::sql::connect_sql(&self.settings.postgres)
            .await
            .map_err(|e| RunError::Connect {
                target: self.settings.postgres.describe(),
                message: e.to_string(),
            })?;
        self.request_resyncs(&mut client, &format!("resync requested: {why}"))
            .await
    }

    /// Decide each appservice's mode from the state store.
    ///
    /// The slot streams again everything after its confirmed position, some of which an earlier
    /// run (or the relay that held the slot before) may already have delivered, possibly with
    /// newer values after it. So an appservice catches up live from the WAL position read now
    /// (every commit so far lies below it): each change committed below it is sent with its
    /// key's *current* value (at least as new as anything sent before), read when its
    /// transaction is built, and nothing is written to the state store (see
    /// [`crate::delivery::state`]). More than `retention.max_queued_keys` waiting keys spill to
    /// recording mode. An appservice with keys recorded in the state store or a backfill under
    /// way (or when the position cannot be read) starts in recording mode instead: its keys and
    /// backfills are served first, with current values, and the first drain that finds nothing
    /// left switches it to live.
    async fn activate(&mut self, db: &SynapseDb) -> Result<(), RunError> {
        let client = db.client().await?;
        let ids: Vec<&str> = self.handles.iter().map(|h| h.settings.id.as_str()).collect();
        let pending = crate::delivery::synapse_db::bounded(self.store.appservices_with_pending(&*client, &ids)).await?;
        let start = match crate::delivery::synapse_db::bounded(self.store.current_wal_position(&*client)).await {
            Ok(lsn) if lsn > Lsn::ZERO => Some(lsn),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the WAL position; every appservice starts in recording mode");
                None
            }
        };
        for h in &self.handles {
            match start {
                Some(at) if !pending.contains(&h.settings.id) => {
                    tracing::debug!(appservice = %h.settings.id, below = %at, "catching up: changes committed below the start position are sent with their current values");
                    h.reset_catching_up_from(at);
                }
                _ => {
                    if pending.contains(&h.settings.id) {
                        tracing::info!(appservice = %h.settings.id, "keys recorded for resync are waiting (or a backfill is under way): resuming their delivery");
                    }
                    h.reset(DeliveryMode::Recording { switch_at: None });
                }
            }
            h.notify();
        }
        self.tracker = CheckpointTracker::new(Lsn::ZERO);
        self.full.clear();
        self.epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default()
            ^ u64::from(std::process::id()).rotate_left(32);
        Ok(())
    }

    /// Request a backfill for appservices served for the first time (in the background: the
    /// request reaches the stream as a message, in order).
    async fn spawn_first_opt_in_backfills(&self, db: &SynapseDb, tasks: &mut tokio::task::JoinSet<()>) {
        let known = match db.client().await {
            Ok(c) => self.store.known_appservices(&*c).await,
            Err(e) => Err(e),
        };
        let known = match known {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read which appservices were served before; no first-opt-in backfill this time");
                return;
            }
        };
        for a in self.settings.appservices.iter().filter(|a| !known.contains(&a.id)) {
            let (a, store, pg) = (a.clone(), self.store.clone(), self.settings.postgres.clone());
            let backfill = self.settings.delivery.backfill_new_appservices;
            tasks.spawn(async move {
                let mut client = match crate::postgres::sql::connect_sql(&pg).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(appservice = %a.id, error = %e, "cannot connect to request the first-opt-in backfill");
                        return;
                    }
                };
                if !backfill {
                    if let Err(e) = store.mark_served(&client, &a.id).await {
                        tracing::warn!(appservice = %a.id, error = %e, "cannot record the appservice as served");
                    }
                    return;
                }
                match request_backfill(&mut client, &store, &a, None).await {
                    Ok(request) => tracing::info!(appservice = %a.id, backfill = request, "first opt-in: backfill of its users' current account data requested"),
                    Err(e) => tracing::warn!(appservice = %a.id, error = %e, "first-opt-in backfill could not be requested; it will be tried at the next start"),
                }
            });
        }
    }

    /// Stream, reconnecting after transient failures, until shutdown or the slot is lost or taken.
    async fn replicate(
        &mut self,
        first: LogicalReplicationStream,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, RunError> {
        let mut schedule = RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
        .schedule();
        let mut stream = Some(first);
        // Since when reconnecting has found the slot busy.
        let mut busy_since: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                return Ok(SessionEnd::Shutdown);
            }
            let s = match stream.take() {
                Some(s) => Ok(s),
                None => self.start_stream(self.tracker.last_commit_end()).await,
            };
            if s.is_ok() {
                busy_since = None;
            }
            let result = match s {
                Ok(s) => self.session(s, shutdown).await,
                Err(e) => Err(e),
            };
            // However the session ended, changes it queued must not wait for the next one.
            self.flush_wakes();
            let err = match result {
                Ok(end) => return Ok(end),
                Err(e) => e,
            };
            self.health.set_connected(false);
            match err {
                // Reconnecting after a silent partition or a decode error, PostgreSQL often
                // still runs our previous walsender (until wal_sender_timeout): not a takeover.
                SessionError::Replication(r) if r.is_slot_in_use() => {
                    let first = busy_since.is_none();
                    let since = *busy_since.get_or_insert_with(Instant::now);
                    match self.on_slot_busy(since, first).await {
                        SlotBusy::Taken => return Ok(SessionEnd::SlotTaken),
                        SlotBusy::Retry(wait) => {
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = shutdown.changed() => {}
                            }
                        }
                    }
                }
                SessionError::Replication(r) if r.is_slot_missing() || r.is_slot_invalidated() => {
                    return Ok(SessionEnd::SlotLost(r.to_string()));
                }
                SessionError::ServerChanged { resync } => return Ok(SessionEnd::ServerChanged { resync }),
                SessionError::Replication(r) if is_fatal(&r) => return Err(RunError::Replication(r)),
                SessionError::Mapping(m @ MappingError::MissingColumn { .. }) => return Err(RunError::Mapping(m)),
                SessionError::Restream => {
                    tracing::info!(publications = %self.publications().join(", "), resume_after = %self.tracker.last_commit_end(), "reload: restarting the replication stream with the new publications");
                }
                other => {
                    if matches!(other, SessionError::Wire(_) | SessionError::Decode(_)) {
                        self.metrics
                            .decode_errors
                            .get_or_create(&KindLabel { kind: DECODE_MESSAGE })
                            .inc();
                    }
                    self.metrics.reconnects.inc();
                    let wait = schedule.next_delay(None);
                    tracing::warn!(error = %other, retry_in = ?wait, "replication connection lost; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
    }

    /// Reconnecting found the slot in use (SQLSTATE 55006) since `since`. If its walsender is one
    /// of ours (its PID is one of our connections'), end it and retry; if it is another process's,
    /// the slot was taken over; if the relay cannot tell (the slot's holder cannot be read), retry
    /// until `wal_sender_timeout` (read from the server) has passed, by which time PostgreSQL has
    /// ended a walsender of ours that lost its client.
    async fn on_slot_busy(&self, since: Instant, first: bool) -> SlotBusy {
        let slot = self.settings.slot_name.as_str();
        let own = &self.own_walsenders;
        let probe = tokio::time::timeout(Duration::from_secs(10), async {
            let client = crate::postgres::sql::connect_sql(&self.settings.postgres)
                .await
                .map_err(|e| e.to_string())?;
            let row = client
                .query_one(
                    "SELECT (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1), \
                            (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout')",
                    &[&slot],
                )
                .await
                .map_err(|e| e.to_string())?;
            let holder: Option<i32> = row.get(0);
            let timeout_ms: Option<i64> = row.get(1);
            let ended = match holder {
                Some(pid) if own.contains(&pid) => client
                    .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .map(|r| r.get::<_, bool>(0))
                    .map_err(|e| format!("ending our previous walsender (PID {pid}): {e}"))?,
                _ => false,
            };
            Ok::<_, String>((holder, timeout_ms, ended))
        })
        .await
        .unwrap_or_else(|_| Err("timed out after 10s".into()));
        let retry = Duration::from_millis(250);
        let patience = |timeout_ms: Option<i64>| {
            // 0 disables the timeout: then TCP alone ends the walsender; give it a minute.
            let t = match timeout_ms {
                Some(ms) if ms > 0 => Duration::from_millis(ms as u64),
                _ => Duration::from_secs(60),
            };
            t + STALE_WALSENDER_MARGIN
        };
        match probe {
            Ok((Some(_), timeout_ms, _)) if since.elapsed() > patience(timeout_ms) => SlotBusy::Taken,
            Ok((Some(pid), _, ended)) if own.contains(&pid) => {
                if ended {
                    tracing::warn!(slot = %slot, pid, "our previous replication connection still held the slot (PostgreSQL had not noticed it was gone): ended its walsender; resuming");
                }
                SlotBusy::Retry(retry)
            }
            Ok((Some(pid), _, _)) => {
                tracing::info!(slot = %slot, pid, "the replication slot is held by a walsender that is not one of ours");
                SlotBusy::Taken
            }
            // Released meanwhile.
            Ok((None, timeout_ms, _)) if since.elapsed() < patience(timeout_ms) => SlotBusy::Retry(retry),
            Ok((None, _, _)) => SlotBusy::Taken,
            Err(e) if since.elapsed() < patience(None) => {
                if first {
                    tracing::warn!(slot = %slot, error = %e, "the replication slot is still in use, and which process holds it cannot be read: \
                        waiting for PostgreSQL to end our previous walsender (wal_sender_timeout) before concluding another process took it over");
                }
                SlotBusy::Retry(Duration::from_secs(1))
            }
            Err(_) => SlotBusy::Taken,
        }
    }

    async fn session(
        &mut self,
        mut stream: LogicalReplicationStream,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, SessionError> {
        let mut mapper = RowMapper::new();
        let mut tx = OpenTx::default();
        let mut interval = tokio::time::interval(self.settings.status_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether the server keeps asking for replies we cannot fully give.
        let mut server_waiting = ServerWaitWatch::default();
        let mut last_received = Instant::now();
        let timeout = self.settings.replication_timeout;
        loop {
            // Wake each worker once per burst of messages, not once per change (a wake-up costs
            // more than handling a change): only when no complete message is left to handle
            // without waiting.
            if !stream.has_buffered_message() {
                self.flush_wakes();
            }
            if !self.full.is_empty() {
                self.wait_for_room().await;
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        // Stop reading; let the workers finish their requests in flight (or give
                        // up after shutdown.timeout), then confirm what was delivered.
                        if let Some(workers) = self.workers.take() {
                            let timeout = self.settings.shutdown_timeout;
                            if !workers.stop(timeout).await {
                                tracing::warn!(timeout = ?timeout, "requests still in flight after shutdown.timeout were given up; their changes stay unconfirmed and will be sent again");
                            }
                        }
                        self.send_status(&mut stream, false).await?;
                        stream.finish().await;
                        tracing::info!(confirmed = %self.last_status.map(|s| s.1).unwrap_or_default(), "replication stopped");
                        return Ok(SessionEnd::Shutdown);
                    }
                }
                _ = interval.tick() => {
                    self.apply_budget();
                    let silent = last_received.elapsed();
                    if silent > timeout {
                        return Err(SessionError::Silent(silent));
                    }
                    // Half way to the timeout, ask the server for a reply (a keepalive).
                    self.send_status(&mut stream, silent > timeout / 2).await?;
                }
                reload = next_reload(&mut self.reloads) => match reload {
                    Some(r) => {
                        self.pending_reload = Some(r);
                        if !self.tracker.in_transaction() {
                            self.apply_reload().await;
                            if std::mem::take(&mut self.restream) {
                                stream.finish().await;
                                return Err(SessionError::Restream);
                            }
                        }
                    }
                    None => self.reloads = None,
                },
                payload = stream.next_copy_data() => {
                    let Some(payload) = payload? else { return Err(SessionError::StreamEnded) };
                    last_received = Instant::now();
                    self.health.activity();
                    match wire::parse_copy_data(payload)? {
                        ReplicationMessage::PrimaryKeepalive { wal_end, reply_requested, .. } => {
                            self.tracker.keepalive(wal_end);
                            if !self.tracker.in_transaction() {
                                self.observe_position(wal_end);
                            }
                            if reply_requested {
                                self.send_status(&mut stream, false).await?;
                                // A walsender asks for replies like this while it waits, before
                                // exiting, for everything it sent to be confirmed (a fast shutdown or
                                // restart). Holding the connection would hold the server.
                                let confirmed = self.last_status.map(|s| s.1).unwrap_or_default();
                                if server_waiting.request(Instant::now(), confirmed < wal_end) {
                                    stream.finish().await;
                                    return Err(SessionError::ServerWaiting);
                                }
                            }
                        }
                        ReplicationMessage::XLogData { data, .. } => {
                            server_waiting.data();
                            let message = pgoutput::decode(data)?;
                            self.on_message(&message, &mut mapper, &mut tx)?;
                            if self.pending_reload.is_some() && !self.tracker.in_transaction() {
                                self.apply_reload().await;
                                if std::mem::take(&mut self.restream) {
                                    stream.finish().await;
                                    return Err(SessionError::Restream);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Some appservices' live queues outgrew `retention.max_queued_keys` while they accept what
    /// they are sent (a backlog streams in faster than they take it): stop reading the stream
    /// until each is down to half of the limit, for [`QUEUE_FULL_WAIT`] at most; one still over
    /// the limit then has its keys recorded (recording mode), so a slow appservice holds the
    /// others back for that long at most, and memory stays bounded either way.
    async fn wait_for_room(&mut self) {
        self.flush_wakes();
        let started = Instant::now();
        loop {
            let handles = &self.handles;
            self.full
                .retain(|&i| handles.get(i).is_some_and(|h| !h.with_state(|s| s.has_room())));
            if self.full.is_empty() {
                tracing::trace!(waited = ?started.elapsed(), "appservice queues have room again");
                return;
            }
            let left = QUEUE_FULL_WAIT.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), self.progress.notified()).await;
        }
        for i in std::mem::take(&mut self.full) {
            let Some(h) = self.handles.get(i) else { continue };
            if h.with_state(|s| s.spill_if_full()) {
                tracing::warn!(
                    appservice = %h.settings.id,
                    max_queued_keys = self.settings.retention.max_queued_keys,
                    waited = ?QUEUE_FULL_WAIT,
                    "more keys wait for this appservice than retention.max_queued_keys, and it did not take them fast enough: \
                     they are recorded as keys and the slot moves on; they will be sent with their current values"
                );
                self.wakes.recorder = true;
                self.wakes.worker(i);
            }
        }
        self.flush_wakes();
    }

    fn flush_wakes(&mut self) {
        for i in self.wakes.list.drain(..) {
            if let Some(h) = self.handles.get(i) {
                h.notify();
            }
            if let Some(m) = self.wakes.marked.get_mut(i) {
                *m = false;
            }
        }
        if std::mem::take(&mut self.wakes.recorder) {
            self.recorder_wake.notify_one();
        }
    }

    /// A fallback namespace exceeded its backtrack limit on `user_id`: count it, and log it at
    /// most once a minute (with how many were not logged).
    fn note_backtrack_limit(&mut self, user_id: &str) {
        self.metrics.routing_backtrack_limit.inc();
        let (last, suppressed) = &mut self.backtrack_limit_log;
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(60)) {
            *suppressed += 1;
            return;
        }
        for f in self.router.backtrack_limit_exceeded(user_id) {
            tracing::warn!(
                appservice = %f.appservice,
                pattern = %f.pattern,
                %user_id,
                not_logged_before = *suppressed,
                "users namespace regex exceeded the fallback engine's backtrack limit on this user id: counted as outside the namespace (as Synapse's re.match might not); simplify the regex"
            );
        }
        *last = Some(now);
        *suppressed = 0;
    }

    fn observe_position(&self, position: Lsn) {
        for h in &self.handles {
            if h.observe_position(position) {
                tracing::info!(appservice = %h.settings.id, position = %position, "back to live delivery");
                h.notify();
            }
        }
    }

    fn on_message(
        &mut self,
        message: &PgOutputMessage,
        mapper: &mut RowMapper,
        tx: &mut OpenTx,
    ) -> Result<(), SessionError> {
        match message {
            PgOutputMessage::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                *tx = OpenTx {
                    commit_lsn: *final_lsn,
                    commit_time_micros: *commit_time_micros,
                    xid: *xid,
                    routed: false,
                    timed: false,
                };
                self.tracker.begin(*final_lsn);
            }
            PgOutputMessage::Commit {
                commit_lsn, end_lsn, ..
            } => {
                self.tracker.commit(*commit_lsn, *end_lsn, tx.routed);
                self.observe_position(*end_lsn);
            }
            PgOutputMessage::Message {
                prefix,
                content,
                lsn,
                transactional,
            } if prefix == MESSAGE_PREFIX => match RelayMessage::parse(content) {
                Some(RelayMessage::Resync(id)) => match self.by_id.get(&id).map(|i| &self.handles[*i]) {
                    Some(h) => {
                        tracing::info!(appservice = %id, at = %lsn, "resync requested: delivering the recorded keys' current values");
                        let xid = tx.xid;
                        h.with_state(|s| {
                            s.request_resync();
                            s.note_backfill_request(xid);
                        });
                        // Its keys were written by another session: count them again.
                        h.forget_recorded_keys();
                        h.notify();
                        self.recorder_wake.notify_one();
                    }
                    None => {
                        tracing::warn!(appservice = %id, "resync requested for an appservice this relay does not serve")
                    }
                },
                Some(RelayMessage::Horizon) if !*transactional => self.observe_position(*lsn),
                Some(RelayMessage::Horizon) => {}
                None => tracing::warn!(at = %lsn, "unreadable relay message in the stream; ignored"),
            },
            other => match mapper.map(other, tx.commit_lsn, tx.xid) {
                Ok(RowOutcome::Change(change)) => {
                    if !is_local_user(&change.key.user_id, &self.settings.server_name) {
                        tracing::debug!(user_id = %change.key.user_id, "not a local user: ignored");
                        return Ok(());
                    }
                    if self.router.route_into(&change.key.user_id, &mut self.targets) > 0 {
                        self.note_backtrack_limit(&change.key.user_id);
                    }
                    for &i in &self.targets {
                        let h = &self.handles[i];
                        if change.key.room_id.is_some() && !h.settings.room_account_data {
                            continue;
                        }
                        if change.content == ChangeContent::ReadCurrent(SourceTable::PushRules)
                            && !h.settings.push_rules
                        {
                            continue;
                        }
                        match h.with_state(|s| s.push(change.clone())) {
                            Pushed::Queued => {
                                // Only changes delivered live are timed: a recorded one leaves
                                // later with its current value, and keeping the commit times of
                                // a whole backlog cost megabytes. The worker that takes this
                                // change runs on this thread, after this message: it finds it.
                                if !tx.timed {
                                    self.metrics.commit_times.push(tx.commit_lsn, tx.commit_time_micros);
                                    tx.timed = true;
                                }
                                self.wakes.worker(i)
                            }
                            Pushed::Recorded => self.wakes.recorder = true,
                            Pushed::Full => {
                                self.wakes.worker(i);
                                if !self.full.contains(&i) {
                                    self.full.push(i);
                                }
                            }
                            Pushed::Spilled => {
                                tracing::warn!(
                                    appservice = %h.settings.id,
                                    max_queued_keys = self.settings.retention.max_queued_keys,
                                    "more keys wait for this appservice than retention.max_queued_keys: they are recorded as keys \
                                     and the slot moves on; they will be sent with their current values"
                                );
                                self.wakes.recorder = true;
                                self.wakes.worker(i);
                            }
                        }
                        tx.routed = true;
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
                Err(e) if e.is_row_level() => {
                    self.metrics
                        .decode_errors
                        .get_or_create(&KindLabel { kind: DECODE_ROW })
                        .inc();
                    tracing::error!(commit_lsn = %tx.commit_lsn, "{e}")
                }
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    }

    /// Switch appservices over the retention budget to recording mode.
    fn apply_budget(&self) {
        let now = Instant::now();
        let received = self.tracker.received();
        for h in &self.handles {
            let spilled = h.with_state(|s| {
                let reason = s.over_budget(now, received, &self.settings.retention)?;
                s.spill();
                Some((reason, s.unrecorded_len()))
            });
            if let Some((reason, keys)) = spilled {
                tracing::warn!(
                    appservice = %h.settings.id,
                    reason = %reason,
                    keys,
                    "appservice over its retention budget: its pending changes are recorded as keys and the slot moves on; \
                     they will be resent with their current values when it answers again"
                );
                h.notify();
                self.recorder_wake.notify_one();
            }
        }
    }

    /// The publications to stream: the push-rules one only when an appservice wants push rules.
    fn publications(&self) -> Vec<&str> {
        let mut v = vec![self.settings.publication_name.as_str()];
        if self.settings.appservices.iter().any(|a| a.push_rules) {
            v.push(self.settings.push_publication_name.as_str());
        }
        v
    }

    /// The oldest commit LSN with an undelivered change, over all appservices.
    fn oldest_undelivered(&self) -> Option<Lsn> {
        self.handles
            .iter()
            .filter_map(|h| h.with_state(|s| s.oldest_undelivered()))
            .min()
    }

    async fn send_status(
        &mut self,
        stream: &mut LogicalReplicationStream,
        request_reply: bool,
    ) -> Result<(), ReplicationError> {
        let oldest = self.oldest_undelivered();
        let safe = self.tracker.safe_lsn(oldest);
        let write = self.tracker.received().max(safe);
        let update = StandbyStatusUpdate {
            write,
            flush: safe,
            apply: safe,
            client_time_micros: wire::micros_since_pg_epoch(SystemTime::now()),
            reply_requested: request_reply,
        };
        let mut buf = BytesMut::with_capacity(StandbyStatusUpdate::ENCODED_LEN);
        update.encode(&mut buf);
        stream.send_copy_data(&buf).await?;
        if self.last_status.map(|s| s.1) != Some(safe) {
            tracing::debug!(confirmed = %safe, received = %write, "standby status update");
        }
        self.last_status = Some((write, safe));
        self.health.status_sent(safe, oldest.is_some());
        self.metrics.commit_times.prune_below(safe);
        self.metrics.received_position.set(write.0 as i64);
        self.metrics.confirmed_position.set(safe.0 as i64);
        Ok(())
    }
}

/// The next validated configuration, if reloads are wired up.
async fn next_reload(reloads: &mut Option<tokio::sync::mpsc::Receiver<Reload>>) -> Option<Reload> {
    match reloads {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Errors no reconnect can cure: authentication, TLS set-up, and server errors that are not about
/// the connection (privileges, a missing publication). Protocol surprises and I/O are retried.
fn is_fatal(e: &ReplicationError) -> bool {
    match e {
        ReplicationError::Auth { .. } | ReplicationError::Tls { .. } => true,
        ReplicationError::Server(_) | ReplicationError::NoHostAccepted { .. } => !e.is_transient(),
        ReplicationError::Io { .. } | ReplicationError::Timeout { .. } | ReplicationError::Protocol { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_request_does_not_make_the_server_look_waiting() {
        let t0 = Instant::now();
        let mut w = ServerWaitWatch::default();
        // An ordinary keepalive asking for a reply while a change is undelivered...
        assert!(!w.request(t0, true));
        // ...and the next one, minutes later, still with something undelivered: not a server
        // that kept asking for minutes.
        assert!(!w.request(t0 + Duration::from_secs(300), true));
        assert!(!w.request(t0 + Duration::from_secs(600), true));
    }

    #[test]
    fn a_server_asking_without_pause_is_released_after_the_limit() {
        let t0 = Instant::now();
        let mut w = ServerWaitWatch::default();
        let step = Duration::from_millis(100);
        let mut released = None;
        for i in 0..100u32 {
            if w.request(t0 + step * i, true) {
                released = Some(step * i);
                break;
            }
        }
        let after = released.expect("a server asking every 100 ms is released");
        assert!(
            after > SERVER_WAIT_LIMIT && after <= SERVER_WAIT_LIMIT + step,
            "{after:?}"
        );
    }

    #[test]
    fn data_or_nothing_pending_ends_a_run() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let mut w = ServerWaitWatch::default();
        assert!(!w.request(t0, true));
        assert!(!w.request(t0 + second, true));
        w.data();
        assert!(!w.request(t0 + second * 2, true));
        assert!(!w.request(t0 + second * 3, true));
        assert!(!w.request(t0 + second * 4, false));
        assert!(!w.request(t0 + second * 5, true));
        assert!(!w.request(t0 + second * 6, true));
        assert!(w.request(t0 + second * 7 + Duration::from_millis(1), true));
    }
}
