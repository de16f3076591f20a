//! The I/O shell of delivery: one task per appservice that takes a batch from its
//! [`AppserviceQueue`], builds the transaction once, and PUTs it until the appservice accepts it.
//!
//! One transaction is in flight per appservice; while it is, new changes coalesce in the queue,
//! and the next transaction leaves as soon as this one is accepted (no fixed wait). Failures are
//! retried forever with the appservice's own backoff, so a slow or failing appservice delays
//! nobody else. The body and its txnId never change between retries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::config::{AppserviceSettings, DeliverySettings};
use crate::delivery::queue::{AppserviceQueue, Batch};
use crate::delivery::retry::{AttemptOutcome, RetryPolicy, classify_response};
use crate::delivery::transaction::{ResolvedEntry, build_body, transaction_id};
use crate::model::{AccountDataKey, ChangeContent, SourceTable};
use crate::pgconfig::PgConnectionConfig;
use crate::synapse::current::{ReadError, read_current};

/// What an appservice worker has been doing, for logs, `check` and (later) metrics.
#[derive(Debug, Clone, Default)]
pub struct DeliveryStats {
    pub transactions_sent: u64,
    pub attempts_failed: u64,
    pub entries_sent: u64,
    pub bytes_sent: u64,
    /// Consecutive failures of the transaction in flight.
    pub current_failures: u32,
    pub last_error: Option<String>,
}

/// One appservice as the pipeline sees it: its settings, queue and wake-up signal.
#[derive(Debug)]
pub struct AppserviceHandle {
    pub settings: AppserviceSettings,
    queue: Mutex<AppserviceQueue>,
    wake: Notify,
    stats: Mutex<DeliveryStats>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AppserviceHandle {
    pub fn new(settings: AppserviceSettings) -> AppserviceHandle {
        AppserviceHandle {
            settings,
            queue: Mutex::new(AppserviceQueue::new()),
            wake: Notify::new(),
            stats: Mutex::new(DeliveryStats::default()),
        }
    }

    /// Run `f` on the queue (briefly: the lock is shared with the replication task).
    pub fn with_queue<R>(&self, f: impl FnOnce(&mut AppserviceQueue) -> R) -> R {
        f(&mut lock(&self.queue))
    }

    /// Wake the worker after pushing changes.
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    pub fn stats(&self) -> DeliveryStats {
        lock(&self.stats).clone()
    }
}

/// Why the HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("cannot read delivery.ca_file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Make sure rustls has its process-wide crypto provider (ring) installed; reqwest needs it.
pub fn install_crypto_provider() {
    // Err means one is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The HTTP client for appservices: system trust roots plus the optional CA file.
pub fn http_client(settings: &DeliverySettings) -> Result<reqwest::Client, DeliveryError> {
    install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .timeout(settings.request_timeout)
        .connect_timeout(settings.connect_timeout)
        .user_agent(concat!("synapse-account-data-relay/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path).map_err(|e| DeliveryError::CaFile {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| DeliveryError::CaFile {
            path: path.display().to_string(),
            message: e.without_url().to_string(),
        })?;
        b = b.tls_certs_merge(certs);
    }
    b.build()
        .map_err(|e| DeliveryError::Client(e.without_url().to_string()))
}

/// A lazily (re)connected SQL connection for reading current content.
pub struct CurrentContentReader {
    config: PgConnectionConfig,
    client: tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
}

impl CurrentContentReader {
    pub fn new(config: PgConnectionConfig) -> CurrentContentReader {
        CurrentContentReader {
            config,
            client: tokio::sync::Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Arc<tokio_postgres::Client>, ReadError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let c = crate::postgres_sql::connect_sql(&self.config)
            .await
            .map_err(|e| ReadError {
                table: "(connecting)",
                message: e.to_string(),
                sqlstate: None,
                connection_lost: true,
            })?;
        let c = Arc::new(c);
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Read the current content of `keys` from `table` (see [`read_current`]).
    pub async fn read(
        &self,
        table: SourceTable,
        keys: &[&AccountDataKey],
    ) -> Result<HashMap<AccountDataKey, Arc<str>>, ReadError> {
        let client = self.client().await?;
        let result = read_current(&client, table, keys).await;
        if let Err(e) = &result
            && e.connection_lost
        {
            *self.client.lock().await = None;
        }
        result
    }
}

/// What every worker shares.
pub struct DeliveryContext {
    pub http: reqwest::Client,
    pub settings: DeliverySettings,
    pub current: Arc<CurrentContentReader>,
    /// Signalled after each delivered transaction, so the checkpoint can move at once.
    pub progress: Arc<Notify>,
    pub shutdown: watch::Receiver<bool>,
}

/// Resolve the batch's contents: raw JSON as queued, or read from the tables (one query per
/// table). Entries whose row is gone are dropped.
async fn resolve(batch: &Batch, current: &CurrentContentReader) -> Result<Vec<(AccountDataKey, Arc<str>)>, ReadError> {
    let mut by_table: HashMap<SourceTable, Vec<&AccountDataKey>> = HashMap::new();
    for e in &batch.entries {
        if let ChangeContent::ReadCurrent(t) = &e.content {
            by_table.entry(*t).or_default().push(&e.key);
        }
    }
    let mut read: HashMap<SourceTable, HashMap<AccountDataKey, Arc<str>>> = HashMap::new();
    for (table, keys) in by_table {
        read.insert(table, current.read(table, &keys).await?);
    }
    Ok(batch
        .entries
        .iter()
        .filter_map(|e| match &e.content {
            ChangeContent::Json(j) => Some((e.key.clone(), j.clone())),
            ChangeContent::ReadCurrent(t) => read
                .get(t)
                .and_then(|m| m.get(&e.key))
                .map(|c| (e.key.clone(), c.clone())),
        })
        .collect())
}

/// Wait `d`, or less if shutdown is requested; returns false on shutdown.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.changed() => !*shutdown.borrow(),
    }
}

/// The worker loop of one appservice. Returns when shutdown is requested.
pub async fn run_worker(handle: Arc<AppserviceHandle>, ctx: Arc<DeliveryContext>) {
    let mut shutdown = ctx.shutdown.clone();
    let policy = RetryPolicy {
        initial: ctx.settings.retry_initial_delay,
        max: ctx.settings.retry_max_delay,
    };
    let id = handle.settings.id.clone();
    let base = format!("{}/_matrix/app/v1/transactions/", handle.settings.url);
    loop {
        let batch = loop {
            if *shutdown.borrow() {
                return;
            }
            if let Some(b) = handle.with_queue(|q| q.take_batch(ctx.settings.max_entries_per_transaction)) {
                break b;
            }
            tokio::select! {
                _ = handle.wake.notified() => {}
                _ = shutdown.changed() => {}
            }
        };

        let mut schedule = policy.schedule();
        let resolved = loop {
            match resolve(&batch, &ctx.current).await {
                Ok(r) => break r,
                Err(e) => {
                    let wait = schedule.next_delay(None);
                    tracing::warn!(appservice = %id, error = %e, retry_in = ?wait, "cannot build the next transaction; retrying");
                    if !sleep_or_shutdown(wait, &mut shutdown).await {
                        return;
                    }
                }
            }
        };
        if resolved.is_empty() {
            handle.with_queue(|q| q.complete_in_flight());
            ctx.progress.notify_one();
            continue;
        }
        let entries: Vec<ResolvedEntry<'_>> = resolved
            .iter()
            .map(|(k, c)| ResolvedEntry { key: k, content: c })
            .collect();
        let body = bytes::Bytes::from(build_body(&entries));
        let txn_id = transaction_id(batch.first_lsn(), batch.last_lsn(), &body);
        let url = format!("{base}{txn_id}");

        let mut schedule = policy.schedule();
        let mut attempt: u32 = 0;
        let started = Instant::now();
        loop {
            attempt += 1;
            let outcome = put_transaction(&ctx.http, &url, &handle.settings, body.clone()).await;
            match outcome {
                AttemptOutcome::Delivered => {
                    if attempt > 1 {
                        tracing::info!(appservice = %id, txn_id = %txn_id, attempts = attempt, after = ?started.elapsed(), "appservice accepted the transaction again");
                    } else {
                        tracing::debug!(appservice = %id, txn_id = %txn_id, entries = entries.len(), bytes = body.len(), "transaction delivered");
                    }
                    let mut s = lock(&handle.stats);
                    s.transactions_sent += 1;
                    s.entries_sent += entries.len() as u64;
                    s.bytes_sent += body.len() as u64;
                    s.current_failures = 0;
                    break;
                }
                AttemptOutcome::Retry { reason, retry_after } => {
                    let wait = schedule.next_delay(retry_after);
                    {
                        let mut s = lock(&handle.stats);
                        s.attempts_failed += 1;
                        s.current_failures = attempt;
                        s.last_error = Some(reason.clone());
                    }
                    tracing::warn!(
                        appservice = %id,
                        url = %handle.settings.url,
                        txn_id = %txn_id,
                        attempt,
                        error = %reason,
                        retry_in = ?wait,
                        "appservice did not accept the transaction; retrying with the same txnId"
                    );
                    if !sleep_or_shutdown(wait, &mut shutdown).await {
                        return;
                    }
                }
            }
        }
        handle.with_queue(|q| q.complete_in_flight());
        ctx.progress.notify_one();
    }
}

async fn put_transaction(
    http: &reqwest::Client,
    url: &str,
    settings: &AppserviceSettings,
    body: bytes::Bytes,
) -> AttemptOutcome {
    let mut target = match reqwest::Url::parse(url) {
        Ok(u) => u,
        Err(e) => {
            return AttemptOutcome::Retry {
                reason: format!("invalid appservice URL: {e}"),
                retry_after: None,
            };
        }
    };
    if settings.legacy_authorization {
        target
            .query_pairs_mut()
            .append_pair("access_token", settings.hs_token.expose());
    }
    let req = http
        .put(target)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", settings.hs_token.expose()),
        )
        .body(body);
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            return AttemptOutcome::Retry {
                reason: describe_http_error(e),
                retry_after: None,
            };
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match resp.bytes().await {
        Ok(b) => classify_response(status, retry_after.as_deref(), &b),
        Err(e) => AttemptOutcome::Retry {
            reason: format!(
                "HTTP status {status}, reading the body failed: {}",
                describe_http_error(e)
            ),
            retry_after: None,
        },
    }
}

/// A reqwest error without its URL (which may carry `access_token`), with its cause chain.
fn describe_http_error(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
