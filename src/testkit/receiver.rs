//! A recording appservice: a real HTTP server answering
//! `PUT /_matrix/app/v1/transactions/{txnId}` the way appservice frameworks do, for `demo` and
//! the tests. It keeps every accepted transaction, drops a txnId it has already accepted (as
//! mautrix and matrix-bot-sdk do), checks the `Authorization` header, and can be told to fail
//! (status codes, non-JSON bodies, hanging, bodies over a size limit) to exercise retries.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::sync::Notify;

use crate::delivery::transaction::{ACCOUNT_DATA_FIELD, ROOM_ACCOUNT_DATA_FIELD};

/// How the receiver answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverMode {
    /// 200 with `{}`.
    Accept,
    /// This status, with a JSON error body.
    Fail(u16),
    /// 200 with a body that is not JSON.
    NonJson,
    /// Never answer (until the mode changes or the client gives up).
    Hang,
    /// Accept, after this long (a slow appservice: a request stays in flight meanwhile).
    Delay(Duration),
    /// Answer 200 and the start of a body, then stall forever.
    HangMidBody,
    /// Accept, answering 200 with this many bytes of whitespace (streamed, without a
    /// Content-Length) before `{}`: valid JSON of any size (`u64::MAX`: endless), a hostile or
    /// broken appservice the relay must not buffer.
    PaddedBody(u64),
    /// Answer 413 `M_TOO_LARGE` to a body of more than this many bytes, as appservice frameworks
    /// with a body limit do (matrix-appservice-node: 5 MB); accept the others.
    RejectOver(usize),
}

/// One accepted transaction.
#[derive(Debug, Clone)]
pub struct ReceivedTransaction {
    pub txn_id: String,
    pub body: serde_json::Value,
    pub received_at: Instant,
}

/// `(user_id, room_id, type)`.
pub type ReceivedKey = (String, Option<String>, String);

#[derive(Debug)]
struct Inner {
    token: String,
    mode: ReceiverMode,
    accepted: Vec<ReceivedTransaction>,
    seen_ids: HashSet<String>,
    attempts: u64,
    duplicates: u64,
    bad_auth: u64,
    rejected_too_large: u64,
    /// Body size of each accepted transaction, in order.
    accepted_sizes: Vec<usize>,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct RecordingAppservice {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new()
        .route(
            "/_matrix/app/v1/transactions/{txn_id}",
            axum::routing::put(put_transaction),
        )
        .with_state(shared)
        // Transactions can carry large account data (tests send 5 MB values).
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

async fn put_transaction(
    State(shared): State<Arc<Shared>>,
    Path(txn_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mode = {
        let mut inner = shared.lock();
        inner.attempts += 1;
        let expected = format!("Bearer {}", inner.token);
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            inner.bad_auth += 1;
            return (StatusCode::FORBIDDEN, r#"{"errcode":"M_FORBIDDEN"}"#).into_response();
        }
        inner.mode.clone()
    };
    match mode {
        ReceiverMode::Accept | ReceiverMode::PaddedBody(_) => {}
        ReceiverMode::RejectOver(limit) if body.len() > limit => {
            shared.lock().rejected_too_large += 1;
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                r#"{"errcode":"M_TOO_LARGE","error":"request body too large"}"#,
            )
                .into_response();
        }
        ReceiverMode::RejectOver(_) => {}
        ReceiverMode::Delay(d) => tokio::time::sleep(d).await,
        ReceiverMode::Fail(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, r#"{"errcode":"M_UNKNOWN","error":"told to fail"}"#).into_response();
        }
        ReceiverMode::NonJson => return (StatusCode::OK, "OK, but not JSON").into_response(),
        ReceiverMode::Hang => {
            // Wait until the mode changes; the client's timeout usually ends this first.
            loop {
                shared.changed.notified().await;
                if shared.lock().mode != ReceiverMode::Hang {
                    break;
                }
            }
            return (StatusCode::SERVICE_UNAVAILABLE, r#"{"errcode":"M_UNKNOWN"}"#).into_response();
        }
        ReceiverMode::HangMidBody => {
            // Status and the start of a body, then nothing: the client must time out.
            let stream = futures_util::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{\"a\":")) })
                .chain(futures_util::stream::pending());
            return (StatusCode::OK, axum::body::Body::from_stream(stream)).into_response();
        }
    }
    let padding = match mode {
        ReceiverMode::PaddedBody(n) => Some(n),
        _ => None,
    };
    let parsed: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return (StatusCode::BAD_REQUEST, r#"{"errcode":"M_NOT_JSON"}"#).into_response(),
    };
    if parsed.get("events").and_then(|e| e.as_array()).is_none() {
        return (
            StatusCode::BAD_REQUEST,
            r#"{"errcode":"M_BAD_JSON","error":"events missing"}"#,
        )
            .into_response();
    }
    {
        let mut inner = shared.lock();
        if inner.seen_ids.insert(txn_id.clone()) {
            inner.accepted_sizes.push(body.len());
            inner.accepted.push(ReceivedTransaction {
                txn_id,
                body: parsed,
                received_at: Instant::now(),
            });
        } else {
            inner.duplicates += 1;
        }
    }
    shared.changed.notify_waiters();
    match padding {
        Some(n) => (StatusCode::OK, axum::body::Body::from_stream(padded_json(n))).into_response(),
        None => (StatusCode::OK, "{}").into_response(),
    }
}

/// `n` bytes of spaces, in 64 KiB chunks, then `{}`.
fn padded_json(n: u64) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    const CHUNK: u64 = 64 << 10;
    let spaces = Bytes::from(vec![b' '; CHUNK as usize]);
    futures_util::stream::unfold(Some(n), move |left| {
        let spaces = spaces.clone();
        async move {
            let left = left?;
            if left == 0 {
                return Some((Ok(Bytes::from_static(b"{}")), None));
            }
            let take = left.min(CHUNK);
            Some((Ok(spaces.slice(..take as usize)), Some(left - take)))
        }
    })
}

impl RecordingAppservice {
    /// Start on 127.0.0.1 on a free port, expecting `hs_token` as the bearer token.
    pub async fn start(hs_token: &str) -> std::io::Result<RecordingAppservice> {
        RecordingAppservice::start_on(
            "127.0.0.1:0".parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            hs_token,
        )
        .await
    }

    /// Start on `addr` (port 0 for a free one).
    pub async fn start_on(addr: SocketAddr, hs_token: &str) -> std::io::Result<RecordingAppservice> {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                token: hs_token.to_owned(),
                mode: ReceiverMode::Accept,
                accepted: Vec::new(),
                seen_ids: HashSet::new(),
                attempts: 0,
                duplicates: 0,
                bad_auth: 0,
                rejected_too_large: 0,
                accepted_sizes: Vec::new(),
            }),
            changed: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let server = serve(listener, shared.clone());
        Ok(RecordingAppservice {
            addr,
            shared,
            server: Mutex::new(Some(server)),
        })
    }

    /// Stop listening: connections are refused until [`RecordingAppservice::resume`]. What was
    /// received is kept.
    pub fn stop_listening(&self) {
        if let Some(s) = self.server.lock().unwrap_or_else(|p| p.into_inner()).take() {
            s.abort();
        }
    }

    /// Listen again on the same address.
    pub async fn resume(&self) -> std::io::Result<()> {
        // The old listener may take a moment to close after the abort.
        let mut last = None;
        for _ in 0..50 {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => {
                    *self.server.lock().unwrap_or_else(|p| p.into_inner()) = Some(serve(l, self.shared.clone()));
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("cannot bind")))
    }

    /// The URL to put in the registration file.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Change how the receiver answers from now on.
    pub fn set_mode(&self, mode: ReceiverMode) {
        self.shared.lock().mode = mode;
        self.shared.changed.notify_waiters();
    }

    /// The accepted transactions, in order of receipt.
    pub fn transactions(&self) -> Vec<ReceivedTransaction> {
        self.shared.lock().accepted.clone()
    }

    /// Requests received (accepted or not).
    pub fn attempts(&self) -> u64 {
        self.shared.lock().attempts
    }

    /// Repeated txnIds that were dropped.
    pub fn duplicate_ids(&self) -> u64 {
        self.shared.lock().duplicates
    }

    /// Requests answered 413 by [`ReceiverMode::RejectOver`].
    pub fn rejected_too_large(&self) -> u64 {
        self.shared.lock().rejected_too_large
    }

    /// The body size in bytes of each accepted transaction, in order of receipt.
    pub fn accepted_sizes(&self) -> Vec<usize> {
        self.shared.lock().accepted_sizes.clone()
    }

    /// Requests with a wrong or missing bearer token.
    pub fn bad_auth(&self) -> u64 {
        self.shared.lock().bad_auth
    }

    /// Every account-data event accepted, in order of receipt: `(key, content)`.
    pub fn events(&self) -> Vec<(ReceivedKey, serde_json::Value)> {
        let mut out = Vec::new();
        for t in self.shared.lock().accepted.iter() {
            out.extend(events_of(&t.body));
        }
        out
    }

    /// The state an appservice would hold after applying every accepted event in order.
    pub fn state(&self) -> BTreeMap<ReceivedKey, serde_json::Value> {
        self.events().into_iter().collect()
    }

    /// Wait until `done(state)` holds, or `timeout` passes; returns whether it held.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&BTreeMap<ReceivedKey, serde_json::Value>) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if done(&self.state()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return done(&self.state());
            }
        }
    }
}

impl Drop for RecordingAppservice {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

/// The account-data events of one transaction body, in body order.
pub fn events_of(body: &serde_json::Value) -> Vec<(ReceivedKey, serde_json::Value)> {
    let mut out = Vec::new();
    let events = |v: &serde_json::Value| -> Vec<(String, serde_json::Value)> {
        v.get("events")
            .and_then(|e| e.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|e| Some((e.get("type")?.as_str()?.to_owned(), e.get("content")?.clone())))
                    .collect()
            })
            .unwrap_or_default()
    };
    if let Some(users) = body.get(ACCOUNT_DATA_FIELD).and_then(|v| v.as_object()) {
        for (user, data) in users {
            for (ty, content) in events(data) {
                out.push(((user.clone(), None, ty), content));
            }
        }
    }
    if let Some(users) = body.get(ROOM_ACCOUNT_DATA_FIELD).and_then(|v| v.as_object()) {
        for (user, rooms) in users {
            for (room, data) in rooms.as_object().into_iter().flatten() {
                for (ty, content) in events(data) {
                    out.push(((user.clone(), Some(room.clone()), ty), content));
                }
            }
        }
    }
    out
}

/// A stand-in for Synapse's client API as the relay uses it: a real HTTP server answering
/// `GET /_matrix/client/v3/pushrules/?user_id=…` with `{"global": {…}}` naming the user, or 403
/// `M_FORBIDDEN` for the users it is told to refuse (as Synapse does for a user outside the
/// appservice's namespaces).
#[derive(Debug)]
pub struct PushRulesApi {
    addr: SocketAddr,
    refused: Arc<Mutex<HashSet<String>>>,
    requests: Arc<Mutex<Vec<String>>>,
    server: tokio::task::JoinHandle<()>,
}

/// The users to refuse, and the `user_id` of every request.
type PushRulesState = (Arc<Mutex<HashSet<String>>>, Arc<Mutex<Vec<String>>>);

#[derive(Debug, serde::Deserialize)]
struct PushRulesQuery {
    user_id: String,
}

impl PushRulesApi {
    /// Start on `addr` (port 0 for a free one).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<PushRulesApi> {
        let refused: Arc<Mutex<HashSet<String>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let state = (refused.clone(), requests.clone());
        let app = axum::Router::new()
            .route(
                "/_matrix/client/v3/pushrules/",
                axum::routing::get(
                    |State((refused, requests)): State<PushRulesState>,
                     axum::extract::Query(q): axum::extract::Query<PushRulesQuery>| async move {
                        requests
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(q.user_id.clone());
                        if refused.lock().unwrap_or_else(|p| p.into_inner()).contains(&q.user_id) {
                            return (
                                StatusCode::FORBIDDEN,
                                r#"{"errcode":"M_FORBIDDEN","error":"not in the appservice's namespace"}"#.to_owned(),
                            );
                        }
                        let body = serde_json::json!({"global": {"override": [], "test_user": q.user_id}});
                        (StatusCode::OK, body.to_string())
                    },
                ),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(PushRulesApi {
            addr,
            refused,
            requests,
            server,
        })
    }

    /// The base URL (`synapse.client_url`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answer 403 for `user_id` from now on.
    pub fn refuse(&self, user_id: &str) {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user_id.to_owned());
    }

    /// Answer `user_id` normally again.
    pub fn allow(&self, user_id: &str) {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).remove(user_id);
    }

    /// The `user_id` of every request, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for PushRulesApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}
