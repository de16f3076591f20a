//! The I/O shell of delivery.
//!
//! - One **worker** task per appservice. In live mode it takes a batch from the appservice's
//!   queue (up to 40 transactions' worth when that many wait), reads the values that must be
//!   read back (a group of 10 transactions' worth per query, the next group read while the one
//!   before is delivered), builds each transaction once, and PUTs it until the appservice accepts
//!   it; meanwhile new changes coalesce in the queue, and the next batch leaves as soon as this
//!   one is accepted (no fixed wait). In recording mode it drains the recorded keys in pages,
//!   reading their current values, and deletes each page once delivered. Failures are retried
//!   forever with the appservice's own backoff, so a slow or failing appservice delays nobody
//!   else; the body and its txnId never change between retries.
//! - One **recorder** task writes the keys of appservices in recording mode to the state store,
//!   so that the slot can move past them.
//!
//! See [`crate::delivery::state`] for the rules these follow.

mod backfill;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::config::{AppserviceSettings, DeliverySettings};
use crate::delivery::handle::{AppserviceHandle, lock};
use crate::delivery::queue::QueuedChange;
use crate::delivery::response_body::{BodyError, MAX_RESPONSE_BODY, read_bounded};
use crate::delivery::retry::{AttemptOutcome, RetryPolicy, RetrySchedule, classify_response};
use crate::delivery::state::{DeliveryMode, DrainRead};
use crate::delivery::synapse_db::{SynapseDb, bounded};
use crate::delivery::transaction::{ResolvedEntry, build_body, split_by_size, transaction_id};
use crate::model::{AccountDataKey, ChangeContent, Lsn, SourceTable};
use crate::resync::store::source_of;
use crate::resync::store::{RelayMessage, StateStore, StoreError};
use crate::synapse::client_api::fetch_push_rules;
use crate::synapse::current::{read_current, wait_until_visible};

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

/// What every worker shares.
pub struct DeliveryContext {
    pub http: reqwest::Client,
    pub settings: DeliverySettings,
    pub db: Arc<SynapseDb>,
    pub store: StateStore,
    /// Synapse's client API, for push rules.
    pub client_url: Option<String>,
    /// Chosen when streaming starts; part of every transaction id (see `transaction_id`).
    pub epoch: u64,
    /// Signalled after each delivered transaction or recorded batch, so the checkpoint can move.
    pub progress: Arc<Notify>,
    /// Wakes the recorder.
    pub recorder_wake: Arc<Notify>,
    pub shutdown: watch::Receiver<bool>,
    /// Where a worker that died is reported (see [`crate::pipeline::supervisor`]).
    pub health: Arc<crate::ops::health::Health>,
}

impl DeliveryContext {
    /// The backoff of deliveries.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            initial: self.settings.retry_initial_delay,
            max: self.settings.retry_max_delay,
        }
    }
}

/// Wait `d`, or until `wake` fires or shutdown is requested. Returns false on shutdown.
async fn pause(d: Duration, wake: Option<&Notify>, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    match wake {
        Some(w) => tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = w.notified() => {}
            _ = shutdown.changed() => {}
        },
        None => tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = shutdown.changed() => {}
        },
    }
    !*shutdown.borrow()
}

/// Run a database operation until it succeeds (backing off, reconnecting) or shutdown.
async fn with_db_retry<T, F, Fut>(ctx: &DeliveryContext, id: &str, what: &str, mut op: F) -> Option<T>
where
    F: FnMut(Arc<tokio_postgres::Client>) -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut shutdown = ctx.shutdown.clone();
    let mut schedule = ctx.policy().schedule();
    loop {
        let result = match ctx.db.client().await {
            Ok(c) => bounded(op(c)).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => return Some(v),
            Err(e) => {
                ctx.db.forget_if_lost(&e).await;
                let wait = schedule.next_delay(None);
                tracing::warn!(appservice = %id, error = %e, retry_in = ?wait, "{what} failed; retrying");
                if !pause(wait, None, &mut shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// The worker loop of one appservice. Returns when shutdown is requested.
pub async fn run_worker(handle: Arc<AppserviceHandle>, ctx: Arc<DeliveryContext>) {
    // Where the current pass over the recorded keys is (see `drain_step`).
    let mut cursor: Option<AccountDataKey> = None;
    loop {
        if *ctx.shutdown.borrow() {
            return;
        }
        let go_on = match handle.mode() {
            DeliveryMode::Live => {
                cursor = None;
                live_step(&handle, &ctx).await
            }
            DeliveryMode::Recording { .. } => drain_step(&handle, &ctx, &mut cursor).await,
        };
        if !go_on {
            return;
        }
    }
}

/// Resolve a live batch's contents: raw JSON as queued, or read from the tables (one query per
/// table). Entries whose row is gone are dropped.
async fn resolve(
    entries: &[QueuedChange],
    client: &tokio_postgres::Client,
) -> Result<Vec<(AccountDataKey, Arc<str>)>, StoreError> {
    let mut by_table: HashMap<SourceTable, Vec<&AccountDataKey>> = HashMap::new();
    let mut xids = Vec::new();
    for e in entries {
        if let ChangeContent::ReadCurrent(t) = &e.content {
            by_table.entry(*t).or_default().push(&e.key);
            xids.push(e.xid);
        }
    }
    wait_until_visible(client, &xids).await.map_err(|e| StoreError {
        what: "waiting for changes to become visible",
        message: e.to_string(),
        sqlstate: e.sqlstate.clone(),
        connection_lost: e.connection_lost,
    })?;
    let mut read: HashMap<SourceTable, HashMap<AccountDataKey, Arc<str>>> = HashMap::new();
    for (table, keys) in by_table {
        let values = read_current(client, table, &keys).await.map_err(|e| StoreError {
            what: "reading current values",
            message: e.to_string(),
            sqlstate: e.sqlstate.clone(),
            connection_lost: e.connection_lost,
        })?;
        read.insert(table, values);
    }
    Ok(with_values(entries, &read))
}

/// Each entry with its value: the JSON it was queued with, or the one `read` holds for it
/// (entries whose value was not read, or whose row is gone, are dropped).
fn with_values(
    entries: &[QueuedChange],
    read: &HashMap<SourceTable, HashMap<AccountDataKey, Arc<str>>>,
) -> Vec<(AccountDataKey, Arc<str>)> {
    entries
        .iter()
        .filter_map(|e| match &e.content {
            ChangeContent::Json(j) => Some((e.key.clone(), j.clone())),
            ChangeContent::ReadCurrent(t) => read
                .get(t)
                .and_then(|m| m.get(&e.key))
                .map(|c| (e.key.clone(), c.clone())),
        })
        .collect()
}

/// For tests of the worker supervisor only: the environment variable naming an account-data type
/// whose first transaction (live or resync) makes the worker panic (once per process), as a bug would. Never set it
/// in production.
pub const TEST_PANIC_ON_TYPE_ENV: &str = "SYNAPSE_ACCOUNT_DATA_RELAY_TEST_PANIC_ON_TYPE";

fn panic_if_told_to(entries: &[ResolvedEntry<'_>]) {
    static TYPE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(ty) = TYPE.get_or_init(|| std::env::var(TEST_PANIC_ON_TYPE_ENV).ok()) else {
        return;
    };
    if entries.iter().any(|e| *e.key.data_type == **ty) && !FIRED.swap(true, Ordering::SeqCst) {
        panic!("{TEST_PANIC_ON_TYPE_ENV} is set and a batch holds a change of type {ty}");
    }
}

/// Transactions' worth of entries whose values are read back in one query per table (when
/// that many wait: a backlog).
const TRANSACTIONS_PER_READ: usize = 10;

/// Reads per live step: while one group of entries is delivered, the next group's values are
/// read, so the database and the appservice work at the same time.
const READS_PER_STEP: usize = 4;

/// Whether `e` is sent with a value read back because it was below the read horizon (or
/// changed during a read; see [`crate::delivery::state`]).
fn read_back(e: &QueuedChange) -> bool {
    matches!(
        e.content,
        ChangeContent::ReadCurrent(SourceTable::AccountData | SourceTable::RoomAccountData)
    )
}

/// One live step: take up to [`READS_PER_STEP`] × [`TRANSACTIONS_PER_READ`] transactions'
/// worth of entries (one batch in flight), and deliver them group by group, reading each next
/// group's values while the one before is delivered. Returns false on shutdown.
async fn live_step(handle: &Arc<AppserviceHandle>, ctx: &DeliveryContext) -> bool {
    let mut shutdown = ctx.shutdown.clone();
    let max = ctx.settings.max_entries_per_transaction.max(1);
    let group_len = max * TRANSACTIONS_PER_READ;
    let Some((batch, reads_back)) = handle.with_state(|s| {
        if s.mode() != DeliveryMode::Live {
            return None;
        }
        let batch = s.queue.take_batch(group_len * READS_PER_STEP)?;
        // Under the same lock as the take: changes from now on are read back too, until the
        // reads are over and the horizon moved past them.
        let reads_back = batch.entries.iter().any(read_back);
        if reads_back {
            s.begin_read();
        }
        Some((batch, reads_back))
    }) else {
        // Nothing to do: wait for changes or a mode change.
        return pause(Duration::from_secs(3600), Some(&handle.wake), &mut shutdown).await;
    };
    let (first, last) = (batch.first_lsn(), batch.last_lsn());
    let started = Instant::now();
    let groups: Vec<&[QueuedChange]> = batch.entries.chunks(group_len).collect();
    let mut horizon: Option<Lsn> = None;
    let mut outcome = Delivery::Delivered;
    let mut current = match groups.first() {
        Some(g) => read_group(handle, ctx, g).await,
        None => Some((Vec::new(), None)),
    };
    for i in 0..groups.len().max(1) {
        let Some((resolved, h)) = current.take() else {
            outcome = Delivery::Shutdown;
            break;
        };
        horizon = horizon.max(h);
        let next = groups.get(i + 1).copied();
        let (delivered, next_read) = tokio::join!(
            deliver_group(
                handle,
                ctx,
                groups.get(i).copied().unwrap_or_default(),
                resolved,
                first,
                last
            ),
            async {
                match next {
                    Some(g) => read_group(handle, ctx, g).await,
                    None => None,
                }
            }
        );
        outcome = delivered;
        current = next_read;
        if outcome != Delivery::Delivered {
            break;
        }
    }
    if reads_back {
        handle.with_state(|s| s.end_read(horizon));
    }
    tracing::debug!(
        appservice = %handle.settings.id,
        entries = batch.entries.len(),
        read_back = reads_back,
        waiting = handle.with_state(|s| s.queue.waiting_len()),
        took = ?started.elapsed(),
        "live step"
    );
    if outcome == Delivery::Delivered {
        // Before completing: the batch's commits still hold the checkpoint, so their times are known.
        handle
            .metrics
            .observe_commit_latency(batch.entries.iter().map(|e| e.first_lsn));
    }
    // Stopped mid-delivery: the transaction stays in flight, holding the checkpoint.
    if outcome != Delivery::Shutdown {
        handle.with_state(|s| s.queue.complete_in_flight());
    }
    ctx.progress.notify_one();
    outcome != Delivery::Shutdown
}

/// The values of a group of live entries: raw JSON as queued, or read from the tables (one
/// query per table); for entries read back below the read horizon, also the WAL position read
/// after the values (every commit they reflect lies below it). `None` on shutdown.
async fn read_group(
    handle: &AppserviceHandle,
    ctx: &DeliveryContext,
    entries: &[QueuedChange],
) -> Option<(Vec<(AccountDataKey, Arc<str>)>, Option<Lsn>)> {
    if !entries
        .iter()
        .any(|e| matches!(e.content, ChangeContent::ReadCurrent(_)))
    {
        return Some((with_values(entries, &HashMap::new()), None));
    }
    let reads_back = entries.iter().any(read_back);
    with_db_retry(ctx, handle.settings.id.as_str(), "building the next transaction", |c| {
        let store = &ctx.store;
        async move {
            let values = resolve(entries, &c).await?;
            let horizon = if reads_back {
                Some(store.current_wal_position(&*c).await?)
            } else {
                None
            };
            Ok((values, horizon))
        }
    })
    .await
}

/// Deliver a group of live entries whose values were read (`resolved`): their push rules are
/// fetched, then they go out in transactions of at most `max_entries_per_transaction`.
async fn deliver_group(
    handle: &AppserviceHandle,
    ctx: &DeliveryContext,
    entries: &[QueuedChange],
    mut resolved: Vec<(AccountDataKey, Arc<str>)>,
    first: Lsn,
    last: Lsn,
) -> Delivery {
    let max = ctx.settings.max_entries_per_transaction.max(1);
    let push_keys: Vec<&AccountDataKey> = entries
        .iter()
        .filter(|e| matches!(e.content, ChangeContent::ReadCurrent(SourceTable::PushRules)))
        .map(|e| &e.key)
        .collect();
    let mut outcome = Delivery::Delivered;
    if !push_keys.is_empty() {
        let mut left = push_keys;
        if let Some(base) = ctx.client_url.as_deref() {
            let (rules, again) = fetch_push_rules_pass(handle, ctx, base, &left).await;
            resolved.extend(rules);
            if !again.is_empty() {
                // The client API fails: send the rest now, and keep trying these (the batch stays
                // in flight, holding the checkpoint, as a failing delivery does).
                for part in resolved.chunks(max) {
                    outcome = deliver(handle, ctx, part, first, last, true).await;
                    if outcome != Delivery::Delivered {
                        return outcome;
                    }
                }
                resolved.clear();
            }
            left = again;
        }
        if !left.is_empty() {
            match fetch_push_rules_until_done(handle, ctx, &left, true).await {
                Ok(rules) => resolved.extend(rules),
                Err(o) => return o,
            }
        }
    }
    for part in resolved.chunks(max) {
        outcome = deliver(handle, ctx, part, first, last, true).await;
        if outcome != Delivery::Delivered {
            break;
        }
    }
    outcome
}

/// One page of recorded keys. Returns false on shutdown.
///
/// A drain is made of passes over the table in key order: each page starts after the last key
/// of the one before (`cursor`), so keys recorded again faster than a page round trip (which a
/// page cannot delete: their version changed) are sent again once per pass, not on every page,
/// and cannot starve the rest. A pass ends at an empty page; only an empty page read from the
/// start of the table (nothing left at all) ends the drain.
async fn drain_step(
    handle: &Arc<AppserviceHandle>,
    ctx: &DeliveryContext,
    cursor: &mut Option<AccountDataKey>,
) -> bool {
    let mut shutdown = ctx.shutdown.clone();
    if let DeliveryMode::Recording { switch_at: Some(_) } = handle.mode() {
        // Drained: waiting for the stream to reach the switch point. A recorded key (which
        // clears the switch point) or the switch to live wakes the worker.
        return pause(Duration::from_secs(1), Some(&handle.wake), &mut shutdown).await;
    }
    let id = handle.settings.id.clone();
    let flushes_before = handle.with_state(|s| s.flushes());
    // Backfill requests first (their values are read at their pages' snapshots; recorded keys
    // are drained after, with newer values). A request seen after this point blocks the switch.
    let backfills_before = handle.with_state(|s| s.backfill_requests_seen());
    if let Some(go_on) = backfill::serve(handle, ctx).await {
        return go_on;
    }
    let limit = ctx.settings.max_entries_per_transaction as i64;
    // Any key may be in the page: the recorder renews what it writes meanwhile.
    handle.with_state(|s| s.set_drain_read(DrainRead::Everything));
    let Some(page) = with_db_retry(ctx, &id, "reading keys to resync", |c| {
        let (store, id, after) = (&ctx.store, &id, cursor.as_ref());
        async move { store.read_page(&*c, id, after, limit).await }
    })
    .await
    else {
        return false;
    };
    handle.with_state(|s| {
        s.set_drain_read(match page.keys.last() {
            Some((last, _)) => DrainRead::UpTo(last.clone()),
            // The pass is over (every page delivered and deleted): the next starts afresh.
            None => DrainRead::Nothing,
        })
    });
    if page.keys.is_empty() && cursor.take().is_some() {
        // The end of a pass: start the next one from the smallest key.
        return true;
    }
    if page.keys.is_empty() {
        if handle.with_state(|s| s.flushes() == flushes_before) {
            // Nothing recorded since the empty read began: the table holds none of its keys.
            handle.set_recorded_keys(0);
        }
        if handle
            .with_state(|s| s.backfill_requests_seen() == backfills_before && s.drained(flushes_before, page.horizon))
        {
            tracing::info!(appservice = %id, horizon = %page.horizon, "resync complete; back to live delivery once the stream passes the horizon");
            // Make sure the stream passes the horizon even if nothing else is written.
            let marker = with_db_retry(ctx, &id, "writing a horizon marker", |c| {
                let store = &ctx.store;
                async move { store.emit(&*c, &RelayMessage::Horizon, false).await }
            })
            .await;
            if marker.is_none() {
                return false;
            }
        }
        return pause(Duration::from_secs(1), Some(&handle.wake), &mut shutdown).await;
    }
    let mut resolved: Vec<(AccountDataKey, Arc<str>)> = page
        .keys
        .iter()
        .filter_map(|(k, _)| page.values.get(k).map(|v| (k.clone(), v.clone())))
        .collect();
    let push_keys: Vec<&AccountDataKey> = page
        .keys
        .iter()
        .map(|(k, _)| k)
        .filter(|k| source_of(k) == SourceTable::PushRules)
        .collect();
    if !push_keys.is_empty() {
        let Some(rules) = fetch_push_rules_retrying(handle, ctx, &push_keys, resolved.is_empty()).await else {
            return false;
        };
        resolved.extend(rules);
    }
    if deliver(handle, ctx, &resolved, Lsn::ZERO, page.horizon, false).await == Delivery::Shutdown {
        return false;
    }
    let deleted = with_db_retry(ctx, &id, "deleting delivered keys", |c| {
        let (store, id, keys) = (&ctx.store, &id, &page.keys);
        async move { store.delete_delivered(&*c, id, keys).await }
    })
    .await;
    if let Some(n) = deleted {
        handle.adjust_recorded_keys(-(n as i64));
    }
    *cursor = page.keys.last().map(|(k, _)| k.clone());
    lock(&handle.stats).resync_pages += 1;
    deleted.is_some()
}

/// One pass over `keys`: the push rules fetched, and the keys to try again. A user Synapse
/// answers with a lasting 4xx is logged and skipped (until their rules change again); every
/// failure counts like a failed delivery (the appservice is failing, so the retention budget's
/// `max_failing` applies, and it shows in the metrics and `/status.json`). Once the client API
/// does not answer at all, the rest of the pass is not tried (it would not answer them either).
async fn fetch_push_rules_pass<'k>(
    handle: &AppserviceHandle,
    ctx: &DeliveryContext,
    base: &str,
    keys: &[&'k AccountDataKey],
) -> (Vec<(AccountDataKey, Arc<str>)>, Vec<&'k AccountDataKey>) {
    let id = handle.settings.id.as_str();
    let mut fetched = Vec::with_capacity(keys.len());
    let mut again = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        match fetch_push_rules(&ctx.http, base, &handle.settings.as_token, &key.user_id).await {
            Ok(rules) => fetched.push(((*key).clone(), Arc::from(rules))),
            Err(e) => {
                handle.metrics.push_rules_fetch_failed();
                {
                    let mut s = lock(&handle.stats);
                    s.push_rule_fetches_failed += 1;
                    s.last_error = Some(e.to_string());
                }
                if e.is_lasting() {
                    tracing::warn!(appservice = %id, user_id = %key.user_id, error = %e, "Synapse refuses this user's push rules: m.push_rules is not sent for them until their rules change again");
                    continue;
                }
                handle.with_state(|s| s.delivery_failed(Instant::now()));
                if e.is_unreachable() {
                    again.extend_from_slice(&keys[i..]);
                    break;
                }
                again.push(*key);
            }
        }
    }
    (fetched, again)
}

/// Fetch the push rules of `keys`' users from Synapse's client API (see
/// [`fetch_push_rules_pass`]), trying the failed ones again with the appservice's backoff until
/// none is left. `live`: give up (`Abandoned`) when the appservice leaves live mode, as a failing
/// live delivery does (its keys are recorded). `Err(Shutdown)` on shutdown. No client API URL:
/// nothing is fetched (logged).
async fn fetch_push_rules_until_done(
    handle: &AppserviceHandle,
    ctx: &DeliveryContext,
    keys: &[&AccountDataKey],
    live: bool,
) -> Result<Vec<(AccountDataKey, Arc<str>)>, Delivery> {
    let id = handle.settings.id.as_str();
    let Some(base) = ctx.client_url.as_deref() else {
        tracing::error!(appservice = %id, "push rules changed, but no client API URL is configured; they are not sent");
        return Ok(Vec::new());
    };
    let mut shutdown = ctx.shutdown.clone();
    let mut schedule = ctx.policy().schedule();
    let mut out = Vec::with_capacity(keys.len());
    let mut left: Vec<&AccountDataKey> = keys.to_vec();
    loop {
        let (fetched, again) = fetch_push_rules_pass(handle, ctx, base, &left).await;
        out.extend(fetched);
        if again.is_empty() {
            return Ok(out);
        }
        left = again;
        let wait = schedule.next_delay(None);
        tracing::warn!(appservice = %id, users = left.len(), retry_in = ?wait, error = lock(&handle.stats).last_error.as_deref().unwrap_or(""), "fetching push rules failed; retrying");
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let rest = deadline.saturating_duration_since(tokio::time::Instant::now());
            if rest.is_zero() {
                break;
            }
            if !pause(rest, Some(&handle.wake), &mut shutdown).await {
                return Err(Delivery::Shutdown);
            }
            if live && handle.mode() != DeliveryMode::Live {
                tracing::info!(appservice = %id, "push rules abandoned: their keys are recorded and will be fetched again");
                return Err(Delivery::Abandoned);
            }
        }
    }
}

/// The push rules of a page of recorded keys: one pass (see [`fetch_push_rules_pass`]), so the
/// rest of the page goes now. The users whose fetch failed are recorded again (a new version,
/// which the page's delete leaves alone) and tried with a later page; when the page has
/// `nothing_else` to deliver, the appservice's backoff is waited first, so a client API that stays
/// down is not polled in a loop. `None` on shutdown.
async fn fetch_push_rules_retrying(
    handle: &AppserviceHandle,
    ctx: &DeliveryContext,
    keys: &[&AccountDataKey],
    nothing_else: bool,
) -> Option<Vec<(AccountDataKey, Arc<str>)>> {
    let id = handle.settings.id.as_str();
    let Some(base) = ctx.client_url.as_deref() else {
        return fetch_push_rules_until_done(handle, ctx, keys, false).await.ok();
    };
    let (fetched, again) = fetch_push_rules_pass(handle, ctx, base, keys).await;
    if again.is_empty() {
        lock(&handle.stats).push_rules_failing_passes = 0;
        return Some(fetched);
    }
    let failing_passes = {
        let mut s = lock(&handle.stats);
        s.push_rules_failing_passes += 1;
        s.push_rules_failing_passes
    };
    let again: Vec<AccountDataKey> = again.into_iter().cloned().collect();
    with_db_retry(
        ctx,
        id,
        "recording the keys whose push rules could not be fetched",
        |c| {
            let (store, keys) = (&ctx.store, &again);
            async move { store.record_keys(&*c, id, keys, true).await }
        },
    )
    .await?;
    let mut schedule = ctx.policy().schedule();
    let mut wait = schedule.next_delay(None);
    for _ in 1..failing_passes.min(32) {
        wait = schedule.next_delay(None);
    }
    tracing::warn!(appservice = %id, users = again.len(), error = lock(&handle.stats).last_error.as_deref().unwrap_or(""), "fetching push rules failed; they stay recorded and are tried again with a later page");
    if nothing_else {
        let mut shutdown = ctx.shutdown.clone();
        if !pause(wait, None, &mut shutdown).await {
            return None;
        }
    }
    Some(fetched)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Delivered,
    /// The appservice left live mode while this live transaction was failing: its keys are recorded.
    Abandoned,
    Shutdown,
}

/// Deliver `resolved` in as many transactions as `delivery.max_transaction_bytes` requires, one
/// after another, each PUT until it is accepted. `live`: give up when the appservice leaves live
/// mode (the rest is then recorded with the keys of the whole batch).
async fn deliver(
    handle: &AppserviceHandle,
    ctx: &DeliveryContext,
    resolved: &[(AccountDataKey, Arc<str>)],
    first: Lsn,
    last: Lsn,
    live: bool,
) -> Delivery {
    let entries: Vec<ResolvedEntry<'_>> = resolved
        .iter()
        .map(|(k, c)| ResolvedEntry { key: k, content: c })
        .collect();
    panic_if_told_to(&entries);
    let fields = handle.settings.field_names;
    for chunk in split_by_size(&entries, fields, ctx.settings.max_transaction_bytes) {
        let part = &entries[chunk.range];
        let body = build_body(part, fields);
        if chunk.oversized
            && let [e] = part
        {
            handle.metrics.oversized_entry();
            tracing::warn!(
                appservice = %handle.settings.id,
                user_id = %e.key.user_id,
                room_id = e.key.room_id.as_deref().unwrap_or(""),
                data_type = %e.key.data_type,
                bytes = body.len(),
                max_transaction_bytes = ctx.settings.max_transaction_bytes,
                "one account-data entry is larger than delivery.max_transaction_bytes: sending it alone, in a transaction over the budget"
            );
        }
        let outcome = deliver_body(handle, ctx, bytes::Bytes::from(body), part.len(), first, last, live).await;
        if outcome != Delivery::Delivered {
            return outcome;
        }
    }
    Delivery::Delivered
}

/// PUT one transaction of `entries` entries until it is accepted. `live`: give up when the
/// appservice leaves live mode.
async fn deliver_body(
    handle: &AppserviceHandle,
    ctx: &DeliveryContext,
    body: bytes::Bytes,
    entries: usize,
    first: Lsn,
    last: Lsn,
    live: bool,
) -> Delivery {
    let mut shutdown = ctx.shutdown.clone();
    let id = handle.settings.id.as_str();
    let txn_id = transaction_id(ctx.epoch, first, last, &body);
    let url = format!("{}/_matrix/app/v1/transactions/{txn_id}", handle.settings.url);
    let mut schedule: RetrySchedule = ctx.policy().schedule();
    let mut attempt: u32 = 0;
    let started = Instant::now();
    loop {
        attempt += 1;
        match put_transaction(&ctx.http, &url, &handle.settings, body.clone()).await {
            AttemptOutcome::Delivered => {
                if attempt > 1 {
                    tracing::info!(appservice = %id, txn_id = %txn_id, attempts = attempt, after = ?started.elapsed(), "appservice accepted the transaction again");
                } else {
                    tracing::debug!(appservice = %id, txn_id = %txn_id, entries, bytes = body.len(), "transaction delivered");
                }
                handle.with_state(|s| s.delivery_succeeded());
                handle.metrics.delivered(body.len(), entries, attempt);
                let mut s = lock(&handle.stats);
                s.transactions_sent += 1;
                s.entries_sent += entries as u64;
                s.bytes_sent += body.len() as u64;
                s.current_failures = 0;
                return Delivery::Delivered;
            }
            AttemptOutcome::Retry { reason, retry_after } => {
                handle.with_state(|s| s.delivery_failed(Instant::now()));
                handle.metrics.attempt_failed();
                let wait = schedule.next_delay(retry_after);
                {
                    let mut s = lock(&handle.stats);
                    s.attempts_failed += 1;
                    s.current_failures = attempt;
                    s.last_error = Some(reason.clone());
                }
                tracing::warn!(
                    appservice = %id,
                    url = %crate::config::redacted_url(&handle.settings.url),
                    txn_id = %txn_id,
                    attempt,
                    error = %reason,
                    retry_in = ?wait,
                    "appservice did not accept the transaction; retrying with the same txnId"
                );
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    if !pause(left, Some(&handle.wake), &mut shutdown).await {
                        return Delivery::Shutdown;
                    }
                    if live && handle.mode() != DeliveryMode::Live {
                        tracing::info!(appservice = %id, txn_id = %txn_id, "transaction abandoned: its keys are recorded and will be resent with their current values");
                        return Delivery::Abandoned;
                    }
                }
                if live && handle.mode() != DeliveryMode::Live {
                    return Delivery::Abandoned;
                }
            }
        }
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
    match read_bounded(resp, MAX_RESPONSE_BODY).await {
        Ok(b) => classify_response(status, retry_after.as_deref(), &b),
        Err(BodyError::Read(e)) => AttemptOutcome::Retry {
            reason: format!(
                "HTTP status {status}, reading the body failed: {}",
                describe_http_error(e)
            ),
            retry_after: None,
        },
        Err(e @ BodyError::TooLarge { .. }) => AttemptOutcome::Retry {
            reason: format!("HTTP status {status}, but {e}"),
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

/// The recorder: writes the keys of appservices in recording mode to the state store, in
/// chunks, one appservice after another. Returns on shutdown.
pub async fn run_recorder(handles: Vec<Arc<AppserviceHandle>>, ctx: Arc<DeliveryContext>) {
    const CHUNK: usize = 5000;
    let mut shutdown = ctx.shutdown.clone();
    loop {
        if !pause(Duration::from_millis(200), Some(&ctx.recorder_wake), &mut shutdown).await {
            return;
        }
        for h in &handles {
            let Some(keys) = h.with_state(|s| s.take_unrecorded()) else {
                continue;
            };
            let id = h.settings.id.as_str();
            let mut result = Ok(());
            for chunk in keys.chunks(CHUNK) {
                let xids: Vec<u32> = chunk.iter().map(|(_, x)| *x).collect();
                let keys: Vec<AccountDataKey> = chunk.iter().map(|(k, _)| k.clone()).collect();
                result = match ctx.db.client().await {
                    // Recorded keys are read back later: first let their changes become visible.
                    Ok(c) => {
                        bounded(async {
                            match wait_until_visible(&*c, &xids).await {
                                Ok(()) => {
                                    // Read after the wait: see `DrainRead`.
                                    let (renew, keep) = h.with_state(|s| s.split_for_recording(keys.clone()));
                                    let mut inserted = 0;
                                    for (keys, renew) in [(renew, true), (keep, false)] {
                                        inserted += ctx.store.record_keys(&*c, id, &keys, renew).await?;
                                    }
                                    h.adjust_recorded_keys(inserted as i64);
                                    Ok(())
                                }
                                Err(e) => Err(StoreError {
                                    what: "waiting for recorded changes to become visible",
                                    message: e.to_string(),
                                    sqlstate: e.sqlstate.clone(),
                                    connection_lost: e.connection_lost,
                                }),
                            }
                        })
                        .await
                    }
                    Err(e) => Err(e),
                };
                if result.is_err() {
                    break;
                }
            }
            match result {
                Ok(()) => {
                    tracing::debug!(appservice = %id, keys = keys.len(), "keys recorded for resync");
                    h.with_state(|s| s.recorded());
                    h.notify();
                    ctx.progress.notify_one();
                }
                Err(e) => {
                    ctx.db.forget_if_lost(&e).await;
                    tracing::warn!(appservice = %id, error = %e, "recording keys failed; the slot stays where it is until it works");
                    h.with_state(|s| s.recording_failed(keys));
                    if !pause(Duration::from_secs(1), None, &mut shutdown).await {
                        return;
                    }
                }
            }
        }
    }
}
