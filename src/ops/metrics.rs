//! Prometheus metrics: one explicit [`Registry`] holding typed families, created once per
//! process and shared through `Arc<Metrics>`.
//!
//! Hot paths stay cheap: per-change work touches no metric at all; the replication task updates
//! a few gauges once per status update (≤ 1 s) and records one `(commit LSN, commit time)` pair
//! per transaction that was routed somewhere ([`CommitTimes`]); a worker updates its
//! appservice's counters once per HTTP attempt through [`AppserviceMetrics`], whose metric
//! handles were looked up once, when the appservice was set up. Queue-derived gauges (pending
//! keys, age of the oldest pending change, up, mode) are computed when `/metrics` is scraped
//! ([`Metrics::refresh`]), so they stay true even when the replication task is stuck. The slot's
//! retained WAL and lag are read from `pg_replication_slots` every few seconds ([`poll_slot`]).
//!
//! Names follow Prometheus conventions: prefix `synapse_account_data_relay_`, base units
//! (`_seconds`, `_bytes`), counters end in `_total`.
//!
//! **Commit-to-acknowledgement latency** (`…_commit_to_ack_latency_seconds`, per appservice): for
//! every entry of a live transaction the appservice accepted, the time from the commit of the
//! oldest change the entry stands for (pgoutput's commit timestamp, PostgreSQL's clock) to the
//! 2xx answer (the relay's clock). A coalesced entry counts once, from its oldest change: the
//! longest any of its changes waited. Recording-mode drains send the keys' *current* values, read
//! from the tables, which have no single commit: they are not observed here (they show in
//! `…_appservice_recorded_keys` and `…_appservice_recording`).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::delivery::handle::AppserviceHandle;
use crate::delivery::metrics::{AppserviceMetrics, CommitTimes, new_latency_histogram};
use crate::delivery::state::DeliveryMode;
use crate::delivery::synapse_db::{SQL_TIMEOUT, SynapseDb};
use crate::resync::store::StateStore;

/// Prefix of every metric name.
pub const PREFIX: &str = "synapse_account_data_relay";

/// The `appservice` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppserviceLabel {
    pub appservice: String,
}

/// The `kind` label of decode errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// The `result` label of reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily = Family<AppserviceLabel, Histogram, fn() -> Histogram>;

/// Every metric of the relay. See the module documentation.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub commit_times: Arc<CommitTimes>,
    pub slot_retained_wal: Gauge,
    pub slot_confirmed_flush_lag: Gauge,
    pub slot_active: Gauge,
    pub slot_poll_errors: Counter,
    pub received_position: Gauge,
    pub confirmed_position: Gauge,
    pub connected: Gauge,
    pub ready: Gauge,
    pub decode_errors: Family<KindLabel, Counter>,
    pub reconnects: Counter,
    /// User ids a fallback (fancy-regex) namespace could not answer for: backtrack limit exceeded.
    pub routing_backtrack_limit: Counter,
    pub reloads: Family<ResultLabel, Counter>,
    latency: HistogramFamily,
    pending_keys: Family<AppserviceLabel, Gauge>,
    recorded_keys: Family<AppserviceLabel, Gauge>,
    oldest_pending_age: Family<AppserviceLabel, FloatGauge>,
    up: Family<AppserviceLabel, Gauge>,
    recording: Family<AppserviceLabel, Gauge>,
    sent: Family<AppserviceLabel, Counter>,
    failed: Family<AppserviceLabel, Counter>,
    retried: Family<AppserviceLabel, Counter>,
    bytes: Family<AppserviceLabel, Counter>,
    entries: Family<AppserviceLabel, Counter>,
    oversized: Family<AppserviceLabel, Counter>,
    push_rules_failed: Family<AppserviceLabel, Counter>,
    worker_restarts: Family<AppserviceLabel, Counter>,
    /// Whether the failover slot is safe (see `crate::failover::inspect`).
    pub failover: crate::failover::metrics::FailoverMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The `decode_errors_total` kinds.
pub const DECODE_MESSAGE: &str = "message";
pub const DECODE_ROW: &str = "row";

impl Metrics {
    pub fn new() -> Metrics {
        let mut root = Registry::with_prefix(PREFIX);
        root.register(
            "build",
            "The relay's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let m = Metrics {
            registry: Registry::default(),
            commit_times: Arc::new(CommitTimes::default()),
            slot_retained_wal: Gauge::default(),
            slot_confirmed_flush_lag: Gauge::default(),
            slot_active: Gauge::default(),
            slot_poll_errors: Counter::default(),
            received_position: Gauge::default(),
            confirmed_position: Gauge::default(),
            connected: Gauge::default(),
            ready: Gauge::default(),
            decode_errors: Family::default(),
            reconnects: Counter::default(),
            routing_backtrack_limit: Counter::default(),
            reloads: Family::default(),
            latency: HistogramFamily::new_with_constructor(new_latency_histogram),
            pending_keys: Family::default(),
            recorded_keys: Family::default(),
            oldest_pending_age: Family::default(),
            up: Family::default(),
            recording: Family::default(),
            sent: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            bytes: Family::default(),
            entries: Family::default(),
            oversized: Family::default(),
            push_rules_failed: Family::default(),
            worker_restarts: Family::default(),
            failover: Default::default(),
        };
        let r = &mut root;
        m.failover.register(r);
        r.register_with_unit(
            "slot_retained_wal",
            "WAL the server keeps for the replication slot (current WAL position minus the slot's restart_lsn), read from pg_replication_slots every few seconds",
            Unit::Bytes,
            m.slot_retained_wal.clone(),
        );
        r.register_with_unit(
            "slot_confirmed_flush_lag",
            "Current WAL position minus the slot's confirmed_flush_lsn, read from pg_replication_slots every few seconds",
            Unit::Bytes,
            m.slot_confirmed_flush_lag.clone(),
        );
        r.register(
            "slot_active",
            "1 if a process streams from the replication slot (this relay or another), per pg_replication_slots",
            m.slot_active.clone(),
        );
        r.register(
            "slot_poll_errors",
            "Failed reads of pg_replication_slots (the slot gauges keep their last values)",
            m.slot_poll_errors.clone(),
        );
        r.register_with_unit(
            "replication_received_position",
            "WAL position (LSN as a number) the relay has received up to",
            Unit::Bytes,
            m.received_position.clone(),
        );
        r.register_with_unit(
            "replication_confirmed_position",
            "WAL position (LSN as a number) the relay last confirmed to PostgreSQL",
            Unit::Bytes,
            m.confirmed_position.clone(),
        );
        r.register(
            "replication_connected",
            "1 while the replication connection is streaming",
            m.connected.clone(),
        );
        r.register(
            "ready",
            "1 while the pipeline is making progress (as /readyz)",
            m.ready.clone(),
        );
        r.register(
            "decode_errors",
            "Replication messages that could not be decoded (kind=message; the connection is re-established) and rows that could not be mapped (kind=row; logged and skipped)",
            m.decode_errors.clone(),
        );
        r.register(
            "reconnects",
            "Replication connections re-established after a failure",
            m.reconnects.clone(),
        );
        r.register(
            "routing_backtrack_limit_exceeded",
            "Times a users namespace regex that needs the fallback engine (fancy-regex) exceeded its backtrack limit on a user id; the user counts as outside that namespace",
            m.routing_backtrack_limit.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads (SIGHUP) by result (ok, failed)",
            m.reloads.clone(),
        );
        r.register_with_unit(
            "commit_to_ack_latency",
            "Time from the commit of a change (PostgreSQL's commit timestamp) to the appservice's 2xx for the transaction carrying it; one observation per entry of a live transaction, from the oldest change it stands for",
            Unit::Seconds,
            m.latency.clone(),
        );
        r.register(
            "appservice_pending_keys",
            "Keys waiting in memory for the appservice: queued, in flight, or waiting to be recorded",
            m.pending_keys.clone(),
        );
        r.register(
            "appservice_recorded_keys",
            "Keys recorded in the relay's state schema for the appservice, to resync with their current values (read every few seconds)",
            m.recorded_keys.clone(),
        );
        r.register_with_unit(
            "appservice_oldest_pending_age",
            "Age of the oldest change held in memory for the appservice (since its commit); 0 when none",
            Unit::Seconds,
            m.oldest_pending_age.clone(),
        );
        r.register(
            "appservice_up",
            "1 unless the appservice's last attempt failed",
            m.up.clone(),
        );
        r.register(
            "appservice_recording",
            "1 while the appservice is in recording mode (its changes are recorded as keys and resent with their current values)",
            m.recording.clone(),
        );
        r.register(
            "appservice_transactions_sent",
            "Transactions the appservice accepted",
            m.sent.clone(),
        );
        r.register(
            "appservice_transactions_failed",
            "Failed attempts to deliver a transaction (each is retried with backoff)",
            m.failed.clone(),
        );
        r.register(
            "appservice_transactions_retried",
            "Transactions the appservice accepted only after at least one retry",
            m.retried.clone(),
        );
        r.register_with_unit(
            "appservice_sent",
            "Request body bytes of the transactions the appservice accepted",
            Unit::Bytes,
            m.bytes.clone(),
        );
        r.register(
            "appservice_sent_entries",
            "Account-data entries in the transactions the appservice accepted",
            m.entries.clone(),
        );
        r.register(
            "appservice_oversized_entries",
            "Entries larger than delivery.max_transaction_bytes by themselves, each sent alone in a transaction over the budget",
            m.oversized.clone(),
        );
        r.register(
            "appservice_push_rules_fetches_failed",
            "Failed fetches of a user's push rules from Synapse's client API (retried with backoff, or the user skipped on a lasting 4xx)",
            m.push_rules_failed.clone(),
        );
        r.register(
            "appservice_worker_restarts",
            "Times the appservice's delivery worker died (a panic) and was started again",
            m.worker_restarts.clone(),
        );
        Metrics { registry: root, ..m }
    }

    /// The metric handles of one appservice (looked up once; cheap to use afterwards).
    pub fn appservice(&self, id: &str) -> AppserviceMetrics {
        let l = label(id);
        AppserviceMetrics {
            latency: self.latency.get_or_create_owned(&l),
            sent: self.sent.get_or_create_owned(&l),
            failed: self.failed.get_or_create_owned(&l),
            retried: self.retried.get_or_create_owned(&l),
            bytes: self.bytes.get_or_create_owned(&l),
            entries: self.entries.get_or_create_owned(&l),
            oversized: self.oversized.get_or_create_owned(&l),
            push_rules_failed: self.push_rules_failed.get_or_create_owned(&l),
            worker_restarts: self.worker_restarts.get_or_create_owned(&l),
            commit_times: self.commit_times.clone(),
        }
    }

    /// An appservice is no longer served: drop its series.
    pub fn remove_appservice(&self, id: &str) {
        let l = label(id);
        self.latency.remove(&l);
        self.sent.remove(&l);
        self.failed.remove(&l);
        self.retried.remove(&l);
        self.bytes.remove(&l);
        self.entries.remove(&l);
        self.oversized.remove(&l);
        self.push_rules_failed.remove(&l);
        self.worker_restarts.remove(&l);
        self.pending_keys.remove(&l);
        self.recorded_keys.remove(&l);
        self.oldest_pending_age.remove(&l);
        self.up.remove(&l);
        self.recording.remove(&l);
    }

    /// Set the queue-derived gauges from the appservices' current state (at scrape time).
    pub fn refresh(&self, appservices: &[Arc<AppserviceHandle>]) {
        let now = SystemTime::now();
        for v in appservices
            .iter()
            .map(|h| AppserviceView::of(h, &self.commit_times, now))
        {
            let l = label(&v.id);
            self.pending_keys.get_or_create(&l).set(v.pending_keys as i64);
            self.oldest_pending_age
                .get_or_create(&l)
                .set(v.oldest_pending_age.map(|d| d.as_secs_f64()).unwrap_or(0.0));
            self.up.get_or_create(&l).set(i64::from(v.up));
            self.recording.get_or_create(&l).set(i64::from(v.recording));
        }
    }

    /// Set the recorded-keys gauges (from the state store).
    pub fn set_recorded_keys(&self, counts: &BTreeMap<String, i64>, appservices: &[Arc<AppserviceHandle>]) {
        for h in appservices {
            let n = counts.get(&h.settings.id).copied().unwrap_or(0);
            self.recorded_keys.get_or_create(&label(&h.settings.id)).set(n);
        }
    }

    /// The Prometheus text format (0.0.4).
    pub fn encode_prometheus(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// The OpenMetrics text format.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn label(id: &str) -> AppserviceLabel {
    AppserviceLabel { appservice: id.into() }
}

/// What `/status.json`, STATUS lines and the gauges show of one appservice.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppserviceView {
    pub id: String,
    pub up: bool,
    pub recording: bool,
    pub pending_keys: usize,
    #[serde(serialize_with = "seconds")]
    pub oldest_pending_age: Option<Duration>,
    pub failing_for_seconds: Option<f64>,
    pub transactions_sent: u64,
    pub attempts_failed: u64,
    pub bytes_sent: u64,
    pub entries_sent: u64,
    pub resync_pages: u64,
    pub last_error: Option<String>,
}

fn seconds<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0),
        None => s.serialize_none(),
    }
}

impl AppserviceView {
    pub fn of(h: &AppserviceHandle, commit_times: &CommitTimes, now: SystemTime) -> AppserviceView {
        let (pending, oldest, failing_since, mode) = h.with_state(|s| {
            (
                s.queue.waiting_len() + s.queue.in_flight_len() + s.unrecorded_len(),
                s.oldest_undelivered(),
                s.failing_since(),
                s.mode(),
            )
        });
        let stats = h.stats();
        let oldest_pending_age = oldest
            .and_then(|l| commit_times.get(l))
            .map(|t| now.duration_since(t).unwrap_or(Duration::ZERO));
        AppserviceView {
            id: h.settings.id.clone(),
            up: failing_since.is_none(),
            recording: mode != DeliveryMode::Live,
            pending_keys: pending,
            oldest_pending_age,
            failing_for_seconds: failing_since.map(|t| t.elapsed().as_secs_f64()),
            transactions_sent: stats.transactions_sent,
            attempts_failed: stats.attempts_failed,
            bytes_sent: stats.bytes_sent,
            entries_sent: stats.entries_sent,
            resync_pages: stats.resync_pages,
            last_error: stats.last_error,
        }
    }
}

/// The appservices being served now (the relay replaces the list on reload), for the endpoint
/// and the systemd status.
#[derive(Debug, Default)]
pub struct ServedAppservices {
    inner: RwLock<Vec<Arc<AppserviceHandle>>>,
}

impl ServedAppservices {
    pub fn set(&self, handles: Vec<Arc<AppserviceHandle>>) {
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = handles;
    }
    pub fn get(&self) -> Vec<Arc<AppserviceHandle>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SlotReading {
    pub exists: bool,
    pub active: bool,
    pub wal_status: Option<String>,
    pub retained_wal_bytes: Option<i64>,
    pub confirmed_flush_lag_bytes: Option<i64>,
}

/// The query behind [`SlotReading`] (`$1`: slot name).
pub const SLOT_QUERY: &str = "SELECT s.active, s.wal_status, \
     pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, \
     pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint \
     FROM pg_replication_slots s WHERE s.slot_name = $1";

/// Read the slot (`pg_current_wal_lsn()` fails on a standby server: then the lags are unknown).
pub async fn read_slot(c: &tokio_postgres::Client, slot: &str) -> Result<SlotReading, tokio_postgres::Error> {
    let rows = c.query(SLOT_QUERY, &[&slot]).await?;
    Ok(match rows.first() {
        None => SlotReading::default(),
        Some(r) => SlotReading {
            exists: true,
            active: r.try_get(0)?,
            wal_status: r.try_get(1)?,
            retained_wal_bytes: r.try_get(2)?,
            confirmed_flush_lag_bytes: r.try_get(3)?,
        },
    })
}

/// Recorded keys per appservice id.
pub type RecordedCounts = BTreeMap<String, i64>;

/// Shared by the slot poller and `/status.json`: the last reading of the slot and of the
/// recorded keys, and when it was taken.
#[derive(Debug, Default)]
pub struct SlotStatus {
    inner: Mutex<Option<(SlotReading, RecordedCounts, SystemTime)>>,
}

impl SlotStatus {
    pub fn set(&self, r: SlotReading, counts: RecordedCounts) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some((r, counts, SystemTime::now()));
    }
    pub fn get(&self) -> Option<(SlotReading, RecordedCounts, SystemTime)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// How often [`poll_slot`] reads the slot and the recorded keys.
pub const SLOT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Read the slot every [`SLOT_POLL_INTERVAL`] until `stop`, over the workers' shared SQL
/// connection, each reading bounded by [`SQL_TIMEOUT`]. The recorded-key counts come from the
/// relay's own counters (see [`AppserviceHandle::recorded_keys`]), not from a scan of
/// `pending_keys`: an appservice whose count is not known yet (after a start, a reload or a
/// resync request) is counted once, through the primary key's index.
pub async fn poll_slot(
    db: Arc<SynapseDb>,
    store: StateStore,
    slot: String,
    metrics: Arc<Metrics>,
    status: Arc<SlotStatus>,
    served: Arc<ServedAppservices>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut logged = false;
    loop {
        let handles = served.get();
        let result = async {
            let c = db.client().await.map_err(|e| e.to_string())?;
            let reading = read_slot(&c, &slot).await.map_err(|e| e.to_string())?;
            for h in handles.iter().filter(|h| h.recorded_keys().is_none()) {
                let n = store
                    .pending_count(&*c, &h.settings.id)
                    .await
                    .map_err(|e| e.to_string())?;
                h.set_recorded_keys(n);
            }
            Ok::<_, String>(reading)
        };
        let result = match tokio::time::timeout(SQL_TIMEOUT, result).await {
            Ok(r) => r,
            Err(_) => {
                db.forget().await;
                Err(format!("no answer within {SQL_TIMEOUT:?}"))
            }
        }
        .map(|reading| {
            let counts: RecordedCounts = handles
                .iter()
                .filter_map(|h| Some((h.settings.id.clone(), h.recorded_keys()?)))
                .collect();
            (reading, counts)
        });
        match result {
            Ok((r, counts)) => {
                logged = false;
                metrics.slot_retained_wal.set(r.retained_wal_bytes.unwrap_or(0));
                metrics
                    .slot_confirmed_flush_lag
                    .set(r.confirmed_flush_lag_bytes.unwrap_or(0));
                metrics.slot_active.set(i64::from(r.active));
                metrics.set_recorded_keys(&counts, &handles);
                status.set(r, counts);
            }
            Err(e) => {
                metrics.slot_poll_errors.inc();
                if !logged {
                    tracing::warn!(error = %e, "cannot read the replication slot's state for metrics; retrying");
                    logged = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SLOT_POLL_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AppserviceSettings;
    use crate::model::Lsn;

    fn handle(id: &str, metrics: &Metrics) -> Arc<AppserviceHandle> {
        Arc::new(AppserviceHandle::with_metrics(
            AppserviceSettings {
                id: id.into(),
                url: "http://localhost:1".into(),
                hs_token: crate::model::Secret::new("secret-token"),
                sender_user_id: "@bot:x".into(),
                user_regexes: vec![],
                room_account_data: true,
                field_names: Default::default(),
                push_rules: false,
                as_token: crate::model::Secret::new("secret-as-token"),
                legacy_authorization: false,
                registration_path: "r.yaml".into(),
            },
            1000,
            metrics.appservice(id),
        ))
    }

    /// The alert rules and the dashboard only use metrics that exist.
    #[test]
    fn the_examples_use_existing_metric_names() {
        let m = Metrics::new();
        let h = handle("bridge", &m);
        m.refresh(std::slice::from_ref(&h));
        m.set_recorded_keys(&BTreeMap::new(), std::slice::from_ref(&h));
        m.decode_errors.get_or_create(&KindLabel { kind: DECODE_ROW }).inc();
        m.reloads.get_or_create(&ResultLabel { result: "ok" }).inc();
        let text = m.encode_prometheus();
        let names: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let re = regex::Regex::new(r"synapse_account_data_relay_[a-z_]+").unwrap();
        for (file, content) in [
            (
                "prometheus-alerts.yml",
                include_str!("../../examples/prometheus-alerts.yml"),
            ),
            (
                "grafana-dashboard.json",
                include_str!("../../examples/grafana-dashboard.json"),
            ),
        ] {
            let used: Vec<&str> = re.find_iter(content).map(|x| x.as_str()).collect();
            assert!(used.len() > 5, "{file}");
            for name in used {
                assert!(
                    names.contains(name),
                    "{file} uses {name}, which the relay does not export:\n{text}"
                );
            }
        }
    }

    #[test]
    fn the_text_format_has_the_documented_families_and_no_secret() {
        let m = Metrics::new();
        let h = handle("bridge", &m);
        h.metrics.delivered(100, 3, 2);
        h.metrics.attempt_failed();
        m.commit_times.push(Lsn(5), 0);
        h.metrics.observe_commit_latency([Lsn(5), Lsn(6)].into_iter());
        m.decode_errors.get_or_create(&KindLabel { kind: DECODE_ROW }).inc();
        m.routing_backtrack_limit.inc();
        m.refresh(std::slice::from_ref(&h));
        let text = m.encode_prometheus();
        for needle in [
            "# TYPE synapse_account_data_relay_commit_to_ack_latency_seconds histogram",
            "synapse_account_data_relay_commit_to_ack_latency_seconds_count{appservice=\"bridge\"} 1",
            "synapse_account_data_relay_appservice_transactions_sent_total{appservice=\"bridge\"} 1",
            "synapse_account_data_relay_appservice_transactions_retried_total{appservice=\"bridge\"} 1",
            "synapse_account_data_relay_appservice_transactions_failed_total{appservice=\"bridge\"} 1",
            "synapse_account_data_relay_appservice_sent_bytes_total{appservice=\"bridge\"} 100",
            "synapse_account_data_relay_appservice_up{appservice=\"bridge\"} 1",
            "synapse_account_data_relay_appservice_pending_keys{appservice=\"bridge\"} 0",
            "synapse_account_data_relay_decode_errors_total{kind=\"row\"} 1",
            "synapse_account_data_relay_routing_backtrack_limit_exceeded_total 1",
            "synapse_account_data_relay_slot_retained_wal_bytes 0",
            "synapse_account_data_relay_build_info{version=",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert!(!text.contains("secret-token"));
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())));
        assert!(parsed.is_ok(), "{text}");
        m.remove_appservice("bridge");
        assert!(!m.encode_prometheus().contains("bridge"));
        assert!(m.encode_openmetrics().ends_with("# EOF\n"));
    }
}
