//! The operations endpoint (`[http] listen`; off unless configured):
//!
//! - `GET /metrics`: Prometheus text format 0.0.4, or OpenMetrics when the scraper asks for it
//!   (`Accept: application/openmetrics-text`);
//! - `GET /healthz`: 200 while the process answers;
//! - `GET /readyz`: 200 while the pipeline makes progress (streaming, looping, and, with work
//!   pending, confirming), else 503 with the reasons; either way followed by notes on the
//!   failover slot when a promotion now would cost a resync (`- note: failover slot not safe
//!   yet: …`);
//! - `GET /status.json`: what `status` shows of a running relay.
//!
//! Connections are bounded ([`serve`], `[http]` `header_read_timeout`, `idle_timeout`,
//! `max_connections`), so whoever can reach the endpoint cannot hold the relay's file
//! descriptors with idle or slow-loris connections.
//!
//! Nothing here ever holds a token or password: metric labels are appservice ids, and the
//! status carries ids, counts, positions and error summaries that never include URLs.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use crate::config::HttpLimits;
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
    /// Whether the failover slot is safe (with `replication.failover`).
    pub failover: Arc<crate::failover::inspect::FailoverWatch>,
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
    /// Whether a promotion now keeps the slot (with `replication.failover`; read every few
    /// seconds from the primary and the standbys among the relay's hosts).
    #[serde(default)]
    pub failover: Option<crate::failover::slots::Readiness>,
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
            failover: self.failover.get().map(|(r, _)| r),
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

/// Ready or not with the reasons; then, either way, notes that do not make the relay unready
/// (a failover slot that is not safe yet: the relay delivers all the same).
async fn readyz(State(e): State<Endpoint>) -> Response {
    let report = e.health.report(&e.limits);
    let mut body = String::from(if report.ready { "ready\n" } else { "not ready:\n" });
    for r in &report.reasons {
        body.push_str("- ");
        body.push_str(r);
        body.push('\n');
    }
    for n in e.failover.notes() {
        body.push_str("- note: ");
        body.push_str(&n);
        body.push('\n');
    }
    let code = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body).into_response()
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

/// Serve until the process ends, within `limits` (see [`serve`]).
pub fn spawn(listener: tokio::net::TcpListener, endpoint: Endpoint, limits: HttpLimits) -> tokio::task::JoinHandle<()> {
    tokio::spawn(serve(listener, router(endpoint), limits))
}

/// Serve `app` on `listener` (HTTP/1.1) with `limits`: at most `max_connections` connections at
/// once (more wait in the listen queue, holding no descriptor of the relay's); each must send a
/// request's headers within `header_read_timeout` of its start or of the previous answer
/// (hyper's timer: an idle keep-alive connection or a slow-loris header is closed), and one that
/// moves no byte for `idle_timeout` (say, a client that does not read its answer) is closed.
pub async fn serve(listener: tokio::net::TcpListener, app: axum::Router, limits: HttpLimits) {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut full_since_logged: Option<Instant> = None;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if full_since_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "the operations endpoint has http.max_connections connections open; new ones wait"
                    );
                    full_since_logged = Some(Instant::now());
                }
                match permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: wait instead of spinning.
                tracing::warn!(error = %e, "the operations endpoint cannot accept a connection; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let io = ActivityIo::new(stream);
            let activity = io.activity.clone();
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
            tokio::select! {
                result = connection => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "operations endpoint connection ended");
                    }
                }
                () = activity.idle_for(limits.idle_timeout) => {
                    tracing::debug!("operations endpoint connection idle: closed");
                }
            }
        });
    }
}

/// When a connection last moved a byte.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once no byte has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let idle = last.elapsed();
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit - idle).await;
        }
    }
}

/// A TCP stream that notes each read or write that moves bytes.
struct ActivityIo {
    stream: tokio::net::TcpStream,
    activity: Arc<Activity>,
}

impl ActivityIo {
    fn new(stream: tokio::net::TcpStream) -> ActivityIo {
        ActivityIo {
            stream,
            activity: Arc::new(Activity {
                start: Instant::now(),
                last_ms: AtomicU64::new(0),
            }),
        }
    }
}

impl AsyncRead for ActivityIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl AsyncWrite for ActivityIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(limits: HttpLimits) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", axum::routing::get(healthz));
        tokio::spawn(serve(listener, app, limits));
        addr
    }

    /// `GET /healthz` on a new connection: the status line.
    async fn get_healthz(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        answer.lines().next().unwrap_or_default().to_owned()
    }

    /// Whether the server closes `s` within `within` (EOF or reset).
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(tokio::time::timeout(within, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    /// Many idle sockets (more than the connection limit) and a slow-loris header: each is
    /// closed after the header-read timeout, and the endpoint still answers.
    #[tokio::test]
    async fn idle_and_slow_loris_connections_are_closed() {
        let addr = start(HttpLimits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_connections: 16,
        })
        .await;
        let mut loris = TcpStream::connect(addr).await.unwrap();
        loris.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        let loris = tokio::spawn(async move {
            let started = Instant::now();
            // One header byte every 100 ms: never a complete header.
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if loris.write_all(b"X").await.is_err() || started.elapsed() > Duration::from_secs(20) {
                    return started.elapsed();
                }
                let mut buf = [0u8; 64];
                if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(1), loris.read(&mut buf)).await {
                    return started.elapsed();
                }
            }
        });
        let mut idle = Vec::new();
        for _ in 0..40 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let answered = tokio::time::timeout(Duration::from_secs(15), get_healthz(addr)).await;
        assert_eq!(answered.as_deref().ok(), Some("HTTP/1.1 200 OK"), "{answered:?}");
        for (i, s) in idle.iter_mut().enumerate() {
            assert!(
                closed_within(s, Duration::from_secs(15)).await,
                "idle socket {i} was kept open"
            );
        }
        let loris_for = loris.await.unwrap();
        assert!(
            loris_for < Duration::from_secs(10),
            "slow-loris header kept open for {loris_for:?}"
        );
    }

    /// A connection that moves no byte for `idle_timeout` is closed, even before the header
    /// timeout; connections beyond `max_connections` wait until one is closed.
    #[tokio::test]
    async fn idle_timeout_and_connection_limit() {
        let addr = start(HttpLimits {
            header_read_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(2),
            max_connections: 2,
        })
        .await;
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        // Let both be accepted, then a third waits for a free connection.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let waiting = tokio::spawn(get_healthz(addr));
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            !waiting.is_finished(),
            "a third connection was served beyond max_connections = 2"
        );
        assert!(
            closed_within(&mut a, Duration::from_secs(10)).await,
            "idle connection kept open"
        );
        assert!(
            closed_within(&mut b, Duration::from_secs(10)).await,
            "idle connection kept open"
        );
        let status = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
    }
}
