//! A real Synapse for tests: the pinned `matrix-synapse` from the virtual environment that
//! `.ci/synapse-venv.sh` makes, run as a child process on a test database, with a client API on
//! 127.0.0.1, and a small client for the calls the tests make (registration through an
//! appservice or the shared secret, account data, rooms, tags, read markers, push rules, /sync).
//!
//! - [`synapse_venv`] finds the environment, making it on first use, or fails the test saying
//!   what to install: never a skip.
//! - [`create_database`] makes an empty database as Synapse demands (UTF8, `C` collation and
//!   ctype); Synapse creates its schema on first start, including the tables the relay reads.
//! - [`AppserviceRegistration::write`] writes a registration file Synapse and the relay both read.
//! - [`Synapse::start`] writes `homeserver.yaml` (which the relay can read too), a signing key
//!   (Synapse's own `generate_signing_key`), starts Synapse, and waits until
//!   `/_matrix/client/versions` answers. Dropping it kills the process; a watcher kills it too if
//!   the test process dies first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use synapse_account_data_relay::testkit::free_port;

use crate::support::{SERVER_NAME, Server, TestDb, connect};

/// How long Synapse may take to start (it creates its schema on first start; about 15 s here).
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// The virtual environment made by `.ci/synapse-venv.sh` (`$RELAY_TEST_SYNAPSE_VENV`, else its
/// default place), made or completed on first use (see [`crate::support::setup`]). Panics with
/// what to install if it cannot be made.
pub fn synapse_venv() -> PathBuf {
    crate::support::setup::ensure_synapse_venv().unwrap_or_else(|e| {
        panic!(
            "the real-Synapse and mautrix tests need Synapse and mautrix in a virtual environment, which \
             `.ci/synapse-venv.sh` makes (the pinned matrix-synapse[postgres] and mautrix from PyPI, into \
             ~/.cache/synapse-account-data-relay/, about 3.5 minutes; it needs Python 3.10+ with venv, \
             libpq-dev, python3-dev and gcc), or point RELAY_TEST_SYNAPSE_VENV at an environment it made:\n{e}"
        )
    })
}

static DB_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// An empty database for Synapse on `server` (UTF8, collation and ctype `C`, as Synapse checks),
/// without the test schema: Synapse creates its own.
pub async fn create_database(server: &'static Server) -> TestDb {
    let name = format!(
        "synapse_t{}_{}",
        std::process::id(),
        DB_COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let admin = connect(server, "postgres").await;
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ))
        .await
        .unwrap_or_else(|e| panic!("creating database {name} on {}: {e}", server.label));
    let client = connect(server, &name).await;
    TestDb { server, name, client }
}

/// One appservice registration file, as Synapse reads it (the relay reads the same file).
pub struct AppserviceRegistration<'a> {
    pub id: &'a str,
    pub url: &'a str,
    pub as_token: &'a str,
    pub hs_token: &'a str,
    pub sender_localpart: &'a str,
    /// User namespaces: `(regex, exclusive)`.
    pub users: &'a [(&'a str, bool)],
    /// `org.matrix.msc3682.account_data: true`.
    pub opt_in: bool,
}

impl AppserviceRegistration<'_> {
    /// Write `<dir>/<id>.yaml`; returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let mut text = format!(
            "id: {}\nurl: '{}'\nas_token: {}\nhs_token: {}\nsender_localpart: {}\nrate_limited: false\n\
             namespaces:\n  users:\n",
            self.id, self.url, self.as_token, self.hs_token, self.sender_localpart
        );
        for (regex, exclusive) in self.users {
            text.push_str(&format!("    - regex: '{regex}'\n      exclusive: {exclusive}\n"));
        }
        text.push_str("  aliases: []\n  rooms: []\n");
        if self.opt_in {
            text.push_str("org.matrix.msc3682.account_data: true\n");
        }
        let path = dir.join(format!("{}.yaml", self.id));
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Who makes a client API call: an appservice acting as one of its users (its `as_token` and
/// `?user_id=`), or a user with an access token of its own.
#[derive(Clone, Debug)]
pub struct User {
    pub user_id: String,
    token: String,
    masquerade: bool,
}

impl User {
    /// The appservice with `as_token` acting as `user_id`.
    pub fn as_appservice(user_id: &str, as_token: &str) -> User {
        User {
            user_id: user_id.into(),
            token: as_token.into(),
            masquerade: true,
        }
    }
}

/// Percent-encode everything but unreserved characters (for user, room and event ids in paths).
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A running Synapse; see the module documentation.
pub struct Synapse {
    child: Option<Child>,
    venv: PathBuf,
    dir: PathBuf,
    log: PathBuf,
    port: u16,
    http: reqwest::Client,
    registration_shared_secret: String,
}

/// The `homeserver.yaml` for a test Synapse.
fn homeserver_yaml(dir: &Path, server: &Server, dbname: &str, port: u16, registrations: &[PathBuf]) -> String {
    let mut list = String::new();
    for r in registrations {
        list.push_str(&format!("  - '{}'\n", r.display()));
    }
    let rate = "{per_second: 10000, burst_count: 10000}";
    format!(
        "# A throw-away Synapse for the relay's tests.\n\
         server_name: {SERVER_NAME}\n\
         pid_file: '{dir}/homeserver.pid'\n\
         signing_key_path: '{dir}/signing.key'\n\
         media_store_path: '{dir}/media'\n\
         report_stats: false\n\
         enable_metrics: false\n\
         enable_registration: false\n\
         registration_shared_secret: test-shared-secret\n\
         macaroon_secret_key: test-macaroon-secret\n\
         form_secret: test-form-secret\n\
         trusted_key_servers: []\n\
         suppress_key_server_warning: true\n\
         url_preview_enabled: false\n\
         presence:\n  enabled: false\n\
         listeners:\n\
         \x20 - port: {port}\n\
         \x20   bind_addresses: ['127.0.0.1']\n\
         \x20   type: http\n\
         \x20   tls: false\n\
         \x20   x_forwarded: false\n\
         \x20   resources:\n\
         \x20     - names: [client]\n\
         \x20       compress: false\n\
         database:\n\
         \x20 name: psycopg2\n\
         \x20 args:\n\
         \x20   user: postgres\n\
         \x20   dbname: {dbname}\n\
         \x20   host: {host}\n\
         \x20   port: {pg_port}\n\
         \x20   cp_min: 2\n\
         \x20   cp_max: 10\n\
         app_service_config_files:\n{list}\
         experimental_features:\n\
         \x20 msc3391_enabled: true\n\
         rc_message: {rate}\n\
         rc_registration: {rate}\n\
         rc_room_creation: {rate}\n\
         rc_joins_per_room: {rate}\n\
         rc_login:\n  address: {rate}\n  account: {rate}\n  failed_attempts: {rate}\n\
         rc_joins:\n  local: {rate}\n  remote: {rate}\n\
         rc_invites:\n  per_room: {rate}\n  per_user: {rate}\n  per_issuer: {rate}\n",
        dir = dir.display(),
        host = server.host,
        pg_port = server.port,
    )
}

impl Synapse {
    /// Write `<dir>/homeserver.yaml` for database `dbname` on `server` with `registrations`,
    /// generate a signing key, start Synapse from `venv` and wait until its client API answers.
    pub async fn start(venv: &Path, dir: &Path, server: &Server, dbname: &str, registrations: &[PathBuf]) -> Synapse {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let python = venv.join("bin/python");
        let key = Command::new(&python)
            .args(["-m", "synapse._scripts.generate_signing_key", "-o"])
            .arg(dir.join("signing.key"))
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
        assert!(
            key.status.success(),
            "generating Synapse's signing key: {}",
            String::from_utf8_lossy(&key.stderr)
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("HTTP client");
        let mut last_failure = String::new();
        // The port was free a moment ago; if another process took it meanwhile, try another.
        for _ in 0..3 {
            let port = free_port().unwrap();
            std::fs::write(
                dir.join("homeserver.yaml"),
                homeserver_yaml(dir, server, dbname, port, registrations),
            )
            .unwrap();
            let log = dir.join(format!("synapse-{port}.log"));
            let file = std::fs::File::create(&log).unwrap();
            let child = Command::new(&python)
                .args(["-m", "synapse.app.homeserver", "-c"])
                .arg(dir.join("homeserver.yaml"))
                .current_dir(dir)
                .env("PYTHONUNBUFFERED", "1")
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .unwrap_or_else(|e| panic!("starting Synapse from {}: {e}", python.display()));
            kill_when_test_process_exits(child.id());
            let mut synapse = Synapse {
                child: Some(child),
                venv: venv.to_owned(),
                dir: dir.to_owned(),
                log,
                port,
                http: http.clone(),
                registration_shared_secret: "test-shared-secret".into(),
            };
            match synapse.wait_until_up().await {
                Ok(()) => return synapse,
                Err(e) => last_failure = e,
            }
            if !synapse.log_text().contains("Address already in use") {
                break;
            }
        }
        panic!("Synapse did not start: {last_failure}");
    }

    async fn wait_until_up(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = format!("{}/_matrix/client/versions", self.url());
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!("it exited ({status}):\n{}", self.log_tail(60)));
            }
            if let Ok(r) = self.http.get(&url).timeout(Duration::from_secs(5)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no answer from {url} within {START_TIMEOUT:?}:\n{}",
                    self.log_tail(60)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The client API's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn homeserver_yaml(&self) -> PathBuf {
        self.dir.join("homeserver.yaml")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of Synapse's log (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log_text();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "Synapse log ({}):\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    /// One client API call as `user` (`None`: unauthenticated): the status and the JSON body
    /// (`Value::Null` if the body is not JSON).
    pub async fn call(&self, method: Method, path: &str, user: Option<&User>, body: Option<&Value>) -> (u16, Value) {
        let mut url = format!("{}{path}", self.url());
        if let Some(u) = user.filter(|u| u.masquerade) {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("user_id={}", enc(&u.user_id)));
        }
        let mut request = self.http.request(method.clone(), &url);
        if let Some(u) = user {
            request = request.bearer_auth(&u.token);
        }
        if let Some(b) = body {
            request = request
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).unwrap());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log_tail(30)));
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap_or_default();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// [`Synapse::call`] that must succeed (2xx); returns the body.
    pub async fn ok(&self, method: Method, path: &str, user: Option<&User>, body: Option<&Value>) -> Value {
        let (status, value) = self.call(method.clone(), path, user, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path} as {:?}: {status} {value}\n{}",
            user.map(|u| &u.user_id),
            self.log_tail(30)
        );
        value
    }

    /// Register `localpart` through the appservice API (`m.login.application_service`) and
    /// return the appservice acting as that user.
    pub async fn register_appservice_user(&self, as_token: &str, localpart: &str) -> User {
        let body = json!({"type": "m.login.application_service", "username": localpart, "inhibit_login": true});
        let appservice = User {
            user_id: String::new(),
            token: as_token.into(),
            masquerade: false,
        };
        let r = self
            .ok(
                Method::POST,
                "/_matrix/client/v3/register",
                Some(&appservice),
                Some(&body),
            )
            .await;
        let user_id = r["user_id"].as_str().expect("user_id").to_owned();
        User::as_appservice(&user_id, as_token)
    }

    /// Register an ordinary user with a password through Synapse's shared-secret registration
    /// (Synapse's own `register_new_matrix_user`), log in, and return it.
    pub async fn register_local_user(&self, localpart: &str, password: &str) -> User {
        let out = Command::new(self.venv.join("bin/python"))
            .args([
                "-m",
                "synapse._scripts.register_new_matrix_user",
                "--no-admin",
                "-u",
                localpart,
                "-p",
            ])
            .arg(password)
            .args(["-k", &self.registration_shared_secret])
            .arg(self.url())
            .stdin(Stdio::null())
            .output()
            .expect("running register_new_matrix_user");
        assert!(
            out.status.success(),
            "register_new_matrix_user {localpart}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(30)
        );
        let login = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
        });
        let r = self
            .ok(Method::POST, "/_matrix/client/v3/login", None, Some(&login))
            .await;
        User {
            user_id: r["user_id"].as_str().expect("user_id").to_owned(),
            token: r["access_token"].as_str().expect("access_token").to_owned(),
            masquerade: false,
        }
    }

    fn global_path(user: &User, ty: &str) -> String {
        format!(
            "/_matrix/client/v3/user/{}/account_data/{}",
            enc(&user.user_id),
            enc(ty)
        )
    }

    fn room_path(user: &User, room: &str, ty: &str) -> String {
        format!(
            "/_matrix/client/v3/user/{}/rooms/{}/account_data/{}",
            enc(&user.user_id),
            enc(room),
            enc(ty)
        )
    }

    fn tag_path(user: &User, room: &str, tag: &str) -> String {
        format!(
            "/_matrix/client/v3/user/{}/rooms/{}/tags/{}",
            enc(&user.user_id),
            enc(room),
            enc(tag)
        )
    }

    /// `PUT /user/{userId}/account_data/{type}` (with `msc3391_enabled`, `{}` deletes).
    pub async fn put_global(&self, user: &User, ty: &str, content: &Value) {
        self.ok(Method::PUT, &Self::global_path(user, ty), Some(user), Some(content))
            .await;
    }

    /// `GET /user/{userId}/account_data/{type}`; `None` for 404 (never set, or deleted).
    pub async fn get_global(&self, user: &User, ty: &str) -> Option<Value> {
        self.get_or_404(&Self::global_path(user, ty), user).await
    }

    /// MSC3391: `DELETE /_matrix/client/unstable/org.matrix.msc3391/user/{userId}/account_data/{type}`.
    pub async fn delete_global(&self, user: &User, ty: &str) {
        let path = format!(
            "/_matrix/client/unstable/org.matrix.msc3391/user/{}/account_data/{}",
            enc(&user.user_id),
            enc(ty)
        );
        self.ok(Method::DELETE, &path, Some(user), None).await;
    }

    /// `PUT /user/{userId}/rooms/{roomId}/account_data/{type}`.
    pub async fn put_room(&self, user: &User, room: &str, ty: &str, content: &Value) {
        self.ok(Method::PUT, &Self::room_path(user, room, ty), Some(user), Some(content))
            .await;
    }

    /// `GET /user/{userId}/rooms/{roomId}/account_data/{type}`; `None` for 404.
    pub async fn get_room(&self, user: &User, room: &str, ty: &str) -> Option<Value> {
        self.get_or_404(&Self::room_path(user, room, ty), user).await
    }

    /// MSC3391: `DELETE /_matrix/client/unstable/org.matrix.msc3391/user/{userId}/rooms/{roomId}/account_data/{type}`.
    pub async fn delete_room(&self, user: &User, room: &str, ty: &str) {
        let path = format!(
            "/_matrix/client/unstable/org.matrix.msc3391/user/{}/rooms/{}/account_data/{}",
            enc(&user.user_id),
            enc(room),
            enc(ty)
        );
        self.ok(Method::DELETE, &path, Some(user), None).await;
    }

    /// `PUT /user/{userId}/rooms/{roomId}/tags/{tag}`.
    pub async fn put_tag(&self, user: &User, room: &str, tag: &str, content: &Value) {
        self.ok(Method::PUT, &Self::tag_path(user, room, tag), Some(user), Some(content))
            .await;
    }

    /// `DELETE /user/{userId}/rooms/{roomId}/tags/{tag}`.
    pub async fn delete_tag(&self, user: &User, room: &str, tag: &str) {
        self.ok(Method::DELETE, &Self::tag_path(user, room, tag), Some(user), None)
            .await;
    }

    /// `GET /user/{userId}/rooms/{roomId}/tags`: `{"tags": {...}}`.
    pub async fn get_tags(&self, user: &User, room: &str) -> Value {
        let path = format!(
            "/_matrix/client/v3/user/{}/rooms/{}/tags",
            enc(&user.user_id),
            enc(room)
        );
        self.ok(Method::GET, &path, Some(user), None).await
    }

    async fn get_or_404(&self, path: &str, user: &User) -> Option<Value> {
        match self.call(Method::GET, path, Some(user), None).await {
            (200, v) => Some(v),
            (404, v) if v["errcode"] == "M_NOT_FOUND" => None,
            (status, v) => panic!("GET {path}: {status} {v}\n{}", self.log_tail(30)),
        }
    }

    /// `POST /createRoom`; returns the room id.
    pub async fn create_room(&self, user: &User, body: &Value) -> String {
        let r = self
            .ok(Method::POST, "/_matrix/client/v3/createRoom", Some(user), Some(body))
            .await;
        r["room_id"].as_str().expect("room_id").to_owned()
    }

    /// `POST /join/{roomId}`.
    pub async fn join(&self, user: &User, room: &str) {
        self.ok(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(room)),
            Some(user),
            Some(&json!({})),
        )
        .await;
    }

    /// Send an `m.room.message`; returns the event id.
    pub async fn send_message(&self, user: &User, room: &str, text: &str) -> String {
        static TXN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let txn = TXN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let r = self
            .ok(
                Method::PUT,
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/t{}-{txn}",
                    enc(room),
                    std::process::id()
                ),
                Some(user),
                Some(&json!({"msgtype": "m.text", "body": text})),
            )
            .await;
        r["event_id"].as_str().expect("event_id").to_owned()
    }

    /// `POST /rooms/{roomId}/read_markers` with `m.fully_read` (Synapse writes the room account
    /// data `m.fully_read` itself).
    pub async fn set_fully_read(&self, user: &User, room: &str, event_id: &str) {
        self.ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/read_markers", enc(room)),
            Some(user),
            Some(&json!({"m.fully_read": event_id})),
        )
        .await;
    }

    /// `PUT /pushrules/global/{kind}/{ruleId}` (kind: override, underride, sender, room,
    /// content): Synapse writes `push_rules` and `push_rules_stream`, and /sync's `m.push_rules`
    /// changes.
    pub async fn set_push_rule(&self, user: &User, kind: &str, rule_id: &str, rule: &Value) {
        let path = format!("/_matrix/client/v3/pushrules/global/{}/{}", enc(kind), enc(rule_id));
        self.ok(Method::PUT, &path, Some(user), Some(rule)).await;
    }

    /// `PUT /pushrules/global/{kind}/{ruleId}/enabled`.
    pub async fn set_push_rule_enabled(&self, user: &User, kind: &str, rule_id: &str, enabled: bool) {
        let path = format!(
            "/_matrix/client/v3/pushrules/global/{}/{}/enabled",
            enc(kind),
            enc(rule_id)
        );
        self.ok(Method::PUT, &path, Some(user), Some(&json!({ "enabled": enabled })))
            .await;
    }

    /// An initial `/sync` (no filter, no wait).
    pub async fn sync(&self, user: &User) -> Value {
        self.ok(Method::GET, "/_matrix/client/v3/sync?timeout=0", Some(user), None)
            .await
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kill `pid` once this (test) process is gone, however it ended; the watcher ends by itself when
/// `pid` is gone first.
fn kill_when_test_process_exits(pid: u32) {
    let script = format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         kill -0 {me} 2>/dev/null || kill -9 {pid} 2>/dev/null",
        me = std::process::id()
    );
    let _ = Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}
