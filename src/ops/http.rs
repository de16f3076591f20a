//! The operations endpoint (`[http] listen`; off unless configured):
//!
//! - `GET /metrics`: Prometheus text format 0.0.4, or OpenMetrics when the scraper asks for it
//!   (`Accept: application/openmetrics-text`);
//! - `GET /healthz`: 200 while the process answers;
//! - `GET /readyz`: 200 while the pipeline makes progress (streaming, looping, and, with work
//!   pending, confirming), else 503 with the reasons;
//! - `GET /status.json`: what `status` shows of a running relay.
//!
//! Nothing here ever holds a token or password: metric labels are appservice ids, and the
//! status carries ids, counts, positions and error summaries that never include URLs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::ops::health::{Health, HealthLimits};
use crate::ops::metrics::{AppserviceView, Metrics, ServedAppservices, SlotReading, SlotStatus};

/// What the endpoint reads.
#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub limits: HealthLimits,
    pub served: Arc<ServedAppservices>,
    pub slot: Arc<SlotStatus>,
    pub slot_name: String,
}

/// `/status.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayStatus {
    pub version: String,
    pub ready: bool,
    pub reasons: Vec<String>,
    pub replication_connected: bool,
    pub standby: bool,
    pub slot_name: String,
    /// The last position confirmed to PostgreSQL (`X/Y`).
    pub confirmed_lsn: String,
    /// The slot as last read from `pg_replication_slots` (every few seconds).
    pub slot: Option<SlotJson>,
    pub appservices: Vec<AppserviceJson>,
}

/// The slot part of [`RelayStatus`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotJson {
    pub exists: bool,
    pub active: bool,
    pub wal_status: Option<String>,
    pub retained_wal_bytes: Option<i64>,
    pub confirmed_flush_lag_bytes: Option<i64>,
    pub read_seconds_ago: f64,
}

/// One appservice in [`RelayStatus`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppserviceJson {
    pub id: String,
    pub up: bool,
    pub mode: String,
    pub pending_keys: usize,
    pub oldest_pending_age_seconds: Option<f64>,
    pub failing_for_seconds: Option<f64>,
    pub recorded_keys: Option<i64>,
    pub transactions_sent: u64,
    pub attempts_failed: u64,
    pub bytes_sent: u64,
    pub last_error: Option<String>,
}

impl Endpoint {
    /// The status of the running relay.
    pub fn status(&self) -> RelayStatus {
        let snapshot = self.health.snapshot();
        let report = crate::ops::health::assess(&snapshot, Instant::now(), &self.limits);
        let now = SystemTime::now();
        let slot = self.slot.get();
        let counts = slot.as_ref().map(|s| s.1.clone());
        let appservices = self
            .served
            .get()
            .iter()
            .map(|h| {
                let v = AppserviceView::of(h, &self.metrics.commit_times, now);
                AppserviceJson {
                    recorded_keys: counts.as_ref().map(|c| c.get(&v.id).copied().unwrap_or(0)),
                    id: v.id,
                    up: v.up,
                    mode: if v.recording { "recording" } else { "live" }.into(),
                    pending_keys: v.pending_keys,
                    oldest_pending_age_seconds: v.oldest_pending_age.map(|d| round3(d.as_secs_f64())),
                    failing_for_seconds: v.failing_for_seconds.map(round3),
                    transactions_sent: v.transactions_sent,
                    attempts_failed: v.attempts_failed,
                    bytes_sent: v.bytes_sent,
                    last_error: v.last_error,
                }
            })
            .collect();
        RelayStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            ready: report.ready,
            reasons: report.reasons,
            replication_connected: snapshot.connected,
            standby: snapshot.standby,
            slot_name: self.slot_name.clone(),
            confirmed_lsn: snapshot.confirmed.to_string(),
            slot: slot.map(|(r, _, at): (SlotReading, _, SystemTime)| SlotJson {
                exists: r.exists,
                active: r.active,
                wal_status: r.wal_status,
                retained_wal_bytes: r.retained_wal_bytes,
                confirmed_flush_lag_bytes: r.confirmed_flush_lag_bytes,
                read_seconds_ago: round3(now.duration_since(at).unwrap_or_default().as_secs_f64()),
            }),
            appservices,
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn metrics(State(e): State<Endpoint>, headers: HeaderMap) -> Response {
    e.metrics.refresh(&e.served.get());
    let report = e.health.report(&e.limits);
    e.metrics.ready.set(i64::from(report.ready));
    e.metrics.connected.set(i64::from(e.health.snapshot().connected));
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            e.metrics.encode_openmetrics(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            e.metrics.encode_prometheus(),
        )
            .into_response()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(e): State<Endpoint>) -> Response {
    let report = e.health.report(&e.limits);
    if report.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut body = String::from("not ready:\n");
        for r in &report.reasons {
            body.push_str("- ");
            body.push_str(r);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn status_json(State(e): State<Endpoint>) -> Response {
    match serde_json::to_string_pretty(&e.status()) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the status: {err}\n"),
        )
            .into_response(),
    }
}

/// The routes.
pub fn router(endpoint: Endpoint) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .route("/status.json", axum::routing::get(status_json))
        .with_state(endpoint)
}

/// Bind `addr` (errors name it).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on http.listen {addr}: {e}"))
}

/// Serve until the process ends.
pub fn spawn(listener: tokio::net::TcpListener, endpoint: Endpoint) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(endpoint)).await {
            tracing::error!(error = %e, "the operations endpoint stopped");
        }
    })
}
