//! Test support: the PostgreSQL servers (PostgreSQL 15 from this machine's binaries through the
//! crate's `testkit::LocalCluster`, PostgreSQL 17 in a container through `testcontainers`), one
//! fresh database per test with Synapse's tables, the relay binary as a child process, and the
//! database's final state to compare receivers against. `setup` builds the PostgreSQL test image
//! and the Synapse virtualenv on first use, `certs` makes test certificates, `tls_proxy` puts
//! plain test servers behind TLS.

#![allow(dead_code)]

pub mod scenario;

pub mod certs;
pub mod ha;
pub mod setup;
pub mod synapse;
pub mod tls_proxy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use synapse_account_data_relay::testkit::receiver::ReceivedKey;
use synapse_account_data_relay::testkit::{LocalCluster, LocalClusterOptions, SYNAPSE_SCHEMA_SQL};
use tokio_postgres::{Client, NoTls};

/// The image `.ci/build-pg17-image.sh` builds.
pub const DEFAULT_PG17_IMAGE: &str = "synapse-relay-test-postgres:17";
/// The PostgreSQL 18 image (`.ci/build-pg-image.sh 18 testing …`).
pub const DEFAULT_PG18_IMAGE: &str = "synapse-relay-test-postgres:18";

/// A running PostgreSQL server the tests share.
pub struct Server {
    pub label: &'static str,
    pub host: String,
    pub port: u16,
    pub local: Option<LocalCluster>,
}

impl Server {
    /// Settings for a replication (or SQL) connection over TCP to this server's first host.
    pub fn connection_config(
        &self,
        dbname: &str,
        user: &str,
        password: Option<&str>,
        ssl_mode: synapse_account_data_relay::postgres::config::SslMode,
    ) -> synapse_account_data_relay::postgres::config::PgConnectionConfig {
        synapse_account_data_relay::postgres::config::PgConnectionConfig {
            host: synapse_account_data_relay::postgres::hosts::PgHost::Tcp(self.host.clone()),
            port: self.port,
            user: user.into(),
            password: password.map(synapse_account_data_relay::model::Secret::new),
            dbname: dbname.into(),
            ssl_mode,
            ssl_root_cert: None,
            application_name: "relay-test".into(),
            connect_timeout: Duration::from_secs(20),
            ssl_client_cert: None,
            require_auth: Default::default(),
            channel_binding: Default::default(),
            options: None,
            keepalives: Default::default(),
            more_hosts: Vec::new(),
            target_session_attrs: Default::default(),
        }
    }

    /// A libpq-style connection string; several hosts (a primary and its standbys, see
    /// [`ha`]) follow the primary (`target_session_attrs=read-write`) with a short timeout per
    /// host, as Synapse would be configured.
    pub fn connection_string(&self, db: &str) -> String {
        if self.is_multi_host() {
            return format!(
                "host={} port={} user=postgres dbname={db} connect_timeout=3 target_session_attrs=read-write",
                self.host, self.port
            );
        }
        format!(
            "host={} port={} user=postgres dbname={db} connect_timeout=10",
            self.host, self.port
        )
    }

    /// Several hosts (a primary and standbys).
    pub fn is_multi_host(&self) -> bool {
        self.host.contains(',')
    }
}

static PG15: OnceLock<Result<Server, String>> = OnceLock::new();
static PG17: OnceLock<Result<Server, String>> = OnceLock::new();
static PG18: OnceLock<Result<Server, String>> = OnceLock::new();

/// PostgreSQL from this machine's binaries (15 here), shared by the whole test binary.
pub fn pg15() -> &'static Server {
    shared_local(&PG15, "local", LocalClusterOptions::default, |_| Ok(()))
}

/// A [`LocalCluster`] started with `options()` on first use and shared by the whole test binary
/// from `slot` (it is stopped, and its directory removed, when the process exits); `prepare`
/// runs once on it after it started (to create roles, say). A failure to start or prepare is
/// reported by every test that asks for the server.
pub fn shared_local(
    slot: &'static OnceLock<Result<Server, String>>,
    label: &'static str,
    options: impl FnOnce() -> LocalClusterOptions,
    prepare: impl FnOnce(&LocalCluster) -> Result<(), String>,
) -> &'static Server {
    slot.get_or_init(|| {
        let mut c =
            LocalCluster::start(options()).map_err(|e| format!("cannot start a local PostgreSQL ({label}): {e}"))?;
        c.stop_when_process_exits().map_err(|e| e.to_string())?;
        prepare(&c).map_err(|e| format!("preparing the local PostgreSQL ({label}): {e}"))?;
        Ok(Server {
            label,
            host: "127.0.0.1".into(),
            port: c.port(),
            local: Some(c),
        })
    })
    .as_ref()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// PostgreSQL 17 in a container (image from `RELAY_TEST_PG_IMAGE`), shared by the whole test binary.
pub fn pg17() -> &'static Server {
    PG17.get_or_init(|| {
        std::thread::spawn(|| start_container(&[]))
            .join()
            .unwrap_or_else(|_| Err("container start panicked".into()))
    })
    .as_ref()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// PostgreSQL 18 in a container (image from `RELAY_TEST_PG18_IMAGE`, built from Debian testing
/// on first use), shared by the whole test binary. The whole suite does not run on it: the
/// tests that differ on 18 (idle slot timeout, failover) and a few end-to-end ones do.
pub fn pg18() -> &'static Server {
    PG18.get_or_init(|| {
        std::thread::spawn(|| start_container_of(setup::PgTestImage::pg18(), &[]))
            .join()
            .unwrap_or_else(|_| Err("container start panicked".into()))
    })
    .as_ref()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// PostgreSQL 17 in a container of the test's own, with extra `postgres -c` settings; removed
/// when the process exits.
pub fn own_pg17(settings: &[(&str, &str)]) -> &'static Server {
    own_container(setup::PgTestImage::pg17(), settings)
}

/// PostgreSQL 18 in a container of the test's own, with extra `postgres -c` settings.
pub fn own_pg18(settings: &[(&str, &str)]) -> &'static Server {
    own_container(setup::PgTestImage::pg18(), settings)
}

fn own_container(spec: setup::PgTestImage, settings: &[(&str, &str)]) -> &'static Server {
    let settings: Vec<(String, String)> = settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let borrowed: Vec<(String, String)> = settings.clone();
    let server = std::thread::spawn(move || {
        let s: Vec<(&str, &str)> = borrowed.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        start_container_of(spec, &s)
    })
    .join()
    .unwrap_or_else(|_| Err("container start panicked".into()))
    .unwrap_or_else(|e| panic!("{e}"));
    Box::leak(Box::new(server))
}

fn start_container(settings: &[(&str, &str)]) -> Result<Server, String> {
    start_container_of(setup::PgTestImage::pg17(), settings)
}

fn start_container_of(spec: setup::PgTestImage, settings: &[(&str, &str)]) -> Result<Server, String> {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::SyncRunner;
    use testcontainers::{GenericImage, ImageExt};
    setup::ensure_pg_image(&spec)?;
    let version = spec.version;
    let image = spec.image;
    let (name, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
    let extra: String = settings.iter().map(|(k, v)| format!(" -c {k}={v}")).collect();
    let script = format!(
        "set -e; export PATH=/usr/lib/postgresql/{version}/bin:$PATH; \
        initdb -D /tmp/pgdata -U postgres --auth=trust --no-sync >/dev/null; \
        echo 'host all all all trust' >> /tmp/pgdata/pg_hba.conf; \
        echo 'host replication all all trust' >> /tmp/pgdata/pg_hba.conf; \
        exec postgres -D /tmp/pgdata -c listen_addresses='*' -c wal_level=logical -c max_replication_slots=200 \
          -c max_wal_senders=200 -c max_connections=300 -c fsync=off -c full_page_writes=off -c unix_socket_directories=/tmp{extra}"
    );
    let container = GenericImage::new(name, tag)
        .with_exposed_port(5432.tcp())
        .with_wait_for(WaitFor::message_on_stderr(
            "database system is ready to accept connections",
        ))
        .with_user("postgres")
        .with_cmd(["sh", "-c", script.as_str()])
        .start()
        .map_err(|e| format!("cannot start the PostgreSQL {version} container from {image:?}: {e}"))?;
    let port = container.get_host_port_ipv4(5432).map_err(|e| e.to_string())?;
    let id = container.id().to_owned();
    // The container must outlive every test of the binary: remove it when this process exits.
    let script = format!(
        "while kill -0 {} 2>/dev/null; do sleep 1; done; docker rm -f {id} >/dev/null 2>&1",
        std::process::id()
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    std::mem::forget(container);
    Ok(Server {
        label: "container",
        host: "127.0.0.1".into(),
        port,
        local: None,
    })
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh database with Synapse's tables, and names for this test's slot and publication.
pub struct TestDb {
    pub server: &'static Server,
    pub name: String,
    pub client: Client,
}

pub async fn connect(server: &Server, db: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(&server.connection_string(db), NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {} database {db}: {e}", server.label));
    tokio::spawn(conn);
    client
}

impl TestDb {
    pub async fn new(server: &'static Server) -> TestDb {
        let name = format!(
            "relay_t{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let admin = connect(server, "postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let client = connect(server, &name).await;
        client.batch_execute(SYNAPSE_SCHEMA_SQL).await.expect("Synapse schema");
        TestDb { server, name, client }
    }

    /// A second connection (for concurrent writers).
    pub async fn connect(&self) -> Client {
        connect(self.server, &self.name).await
    }

    /// The slot's `confirmed_flush_lsn` and the server's current WAL position, as numbers.
    pub async fn slot_position(&self) -> (u64, u64) {
        let r = self
            .client
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint, (pg_current_wal_lsn() - '0/0')::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.name],
            )
            .await
            .expect("slot exists");
        (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64)
    }

    /// Drop this test's slot if it exists (so it stops holding WAL on the shared server).
    pub async fn drop_slot(&self) {
        let _ = self
            .client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&self.name],
            )
            .await;
    }

    /// The final state the database holds for users matching `interested` (what an appservice
    /// interested in them should end with): global and room account data, and one `m.tag` per
    /// (user, room) that ever had a tag revision.
    pub async fn final_state(&self, interested: impl Fn(&str) -> bool) -> BTreeMap<ReceivedKey, serde_json::Value> {
        let mut out = BTreeMap::new();
        let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("valid JSON in the database");
        for r in self
            .client
            .query("SELECT user_id, account_data_type, content FROM account_data", &[])
            .await
            .unwrap()
        {
            let user: String = r.get(0);
            if interested(&user) {
                out.insert((user, None, r.get(1)), parse(r.get(2)));
            }
        }
        for r in self
            .client
            .query(
                "SELECT user_id, room_id, account_data_type, content FROM room_account_data",
                &[],
            )
            .await
            .unwrap()
        {
            let user: String = r.get(0);
            if interested(&user) {
                out.insert((user, Some(r.get(1)), r.get(2)), parse(r.get(3)));
            }
        }
        for r in self
            .client
            .query("SELECT user_id, room_id FROM room_tags_revisions", &[])
            .await
            .unwrap()
        {
            let user: String = r.get(0);
            let room: String = r.get(1);
            if !interested(&user) {
                continue;
            }
            let mut tags = serde_json::Map::new();
            for t in self
                .client
                .query(
                    "SELECT tag, content FROM room_tags WHERE user_id = $1 AND room_id = $2",
                    &[&user, &room],
                )
                .await
                .unwrap()
            {
                tags.insert(t.get(0), parse(t.get(1)));
            }
            out.insert((user, Some(room), "m.tag".into()), serde_json::json!({ "tags": tags }));
        }
        out
    }
}

/// One appservice registration to write.
pub struct RegistrationSpec<'a> {
    pub id: &'a str,
    pub url: Option<&'a str>,
    pub hs_token: &'a str,
    pub sender_localpart: &'a str,
    pub user_regexes: &'a [&'a str],
    pub opt_in: bool,
}

/// The copy of relay.toml for `setup` and `teardown` after [`RelayFiles::run_as`].
const ADMIN_CONFIG: &str = "relay-admin.toml";

/// A directory holding homeserver.yaml, registrations and relay.toml for one test.
pub struct RelayFiles {
    pub dir: tempfile::TempDir,
}

pub const SERVER_NAME: &str = "example.org";

impl RelayFiles {
    /// The files for `registrations` on `db`; `extra_toml` is appended to relay.toml (after its
    /// `[delivery]` table, so start it with a table header).
    pub fn new(db: &TestDb, registrations: &[RegistrationSpec<'_>], extra_toml: &str) -> RelayFiles {
        RelayFiles::with_delivery(db, registrations, &[], extra_toml)
    }

    /// As [`RelayFiles::new`], with keys for relay.toml's `[delivery]` table (replacing the
    /// test defaults of the same name), e.g. `("ca_file", path.into())`.
    pub fn with_delivery(
        db: &TestDb,
        registrations: &[RegistrationSpec<'_>],
        delivery: &[(&str, toml::Value)],
        extra_toml: &str,
    ) -> RelayFiles {
        let dir = tempfile::tempdir().unwrap();
        let mut list = String::new();
        for r in registrations {
            let file = format!("{}.yaml", r.id);
            list.push_str(&format!("  - {file}\n"));
            let mut text = format!(
                "id: {}\nurl: {}\nas_token: as_{}\nhs_token: {}\nsender_localpart: {}\nnamespaces:\n  users:\n",
                r.id,
                r.url.map(|u| format!("'{u}'")).unwrap_or_else(|| "null".into()),
                r.id,
                r.hs_token,
                r.sender_localpart
            );
            for re in r.user_regexes {
                text.push_str(&format!("    - regex: '{re}'\n      exclusive: true\n"));
            }
            if r.opt_in {
                text.push_str("org.matrix.msc3682.account_data: true\n");
            }
            std::fs::write(dir.path().join(file), text).unwrap();
        }
        std::fs::write(
            dir.path().join("homeserver.yaml"),
            format!(
                "server_name: {SERVER_NAME}\ndatabase:\n  name: psycopg2\n  args:\n    user: postgres\n    dbname: {}\n    \
                 host: \"{}\"\n    port: {}\n    cp_min: 5\n    cp_max: 10\n{}app_service_config_files:\n{list}",
                db.name,
                db.server.host,
                db.server.port,
                // Synapse's own multi-host form: follow the primary.
                if db.server.is_multi_host() {
                    "    target_session_attrs: read-write\n    connect_timeout: 3\n"
                } else {
                    ""
                }
            ),
        )
        .unwrap();
        let mut delivery_table = String::new();
        let defaults = [
            ("retry_initial_delay", "50ms"),
            ("retry_max_delay", "500ms"),
            ("request_timeout", "2s"),
        ];
        for (key, value) in defaults {
            if !delivery.iter().any(|(k, _)| *k == key) {
                delivery_table.push_str(&format!("{key} = \"{value}\"\n"));
            }
        }
        for (key, value) in delivery {
            delivery_table.push_str(&format!("{key} = {value}\n"));
        }
        std::fs::write(
            dir.path().join("relay.toml"),
            format!(
                "[replication]\nslot_name = \"{0}\"\npublication_name = \"{0}\"\nstatus_interval = \"200ms\"\n\
                 [delivery]\n{delivery_table}{extra_toml}",
                db.name
            ),
        )
        .unwrap();
        RelayFiles { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn args(&self, subcommand: &str) -> Vec<String> {
        // After `run_as`, setup and teardown keep the owner's role (relay-admin.toml).
        let admin = self.path().join(ADMIN_CONFIG);
        let config = if matches!(subcommand, "setup" | "teardown") && admin.exists() {
            admin
        } else {
            self.path().join("relay.toml")
        };
        vec![
            subcommand.into(),
            "--synapse-config".into(),
            self.path().join("homeserver.yaml").display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ]
    }

    /// From now on every subcommand but `setup` and `teardown` connects as `role` (relay.toml
    /// gets `[postgres] user`; the two keep the owner's role through a copy of the config
    /// before, relay-admin.toml).
    pub fn run_as(&self, role: &str) {
        let relay = self.path().join("relay.toml");
        let text = std::fs::read_to_string(&relay).unwrap();
        std::fs::write(self.path().join(ADMIN_CONFIG), &text).unwrap();
        std::fs::write(&relay, format!("{text}\n[postgres]\nuser = \"{role}\"\n")).unwrap();
    }

    /// Run a subcommand to completion.
    pub fn command(&self, subcommand: &str, extra: &[&str]) -> Output {
        // Run where Synapse would: relative registration paths are Synapse's working directory's.
        Command::new(relay_binary())
            .current_dir(self.path())
            .args(self.args(subcommand))
            .args(extra)
            .env("RUST_LOG", "info")
            .output()
            .unwrap()
    }

    /// Start `run` in the background.
    pub fn spawn_run(&self) -> RelayProcess {
        self.spawn_run_with(&[], &[])
    }

    /// Start `run` in the background with extra environment variables and arguments.
    pub fn spawn_run_with(&self, env: &[(&str, &str)], extra: &[&str]) -> RelayProcess {
        let log = self
            .path()
            .join(format!("relay-{}.log", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(relay_binary())
            .current_dir(self.path())
            .args(self.args("run"))
            .args(extra)
            .env("RUST_LOG", "synapse_account_data_relay=debug,info")
            .envs(env.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        RelayProcess {
            child: Some(child),
            log,
        }
    }
}

/// The relay binary cargo built for this test or benchmark; `RELAY_BENCH_BINARY` names another
/// (the system benchmarks compare builds with it).
pub fn relay_binary() -> PathBuf {
    match std::env::var_os("RELAY_BENCH_BINARY") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_synapse-account-data-relay")),
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The relay binary running `run`.
pub struct RelayProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl RelayProcess {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: no chance to confirm anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Send a signal (`HUP`, `TERM`, …) without waiting.
    pub fn signal(&self, name: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{name}"), &c.id().to_string()])
                .status();
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Wait until the relay's log contains `needle`.
pub async fn wait_for_log(relay: &RelayProcess, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if relay.log_text().contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Whether the log shows appservice `id`'s first-opt-in backfill requested and the appservice
/// back to live delivery after its last resync request (on a fresh database every appservice's
/// first-opt-in backfill follows a moment after the start, in recording mode).
pub fn live_after_last_resync(log: &str, id: &str) -> bool {
    let opted_in = format!("first opt-in: backfill of its users' current account data requested appservice={id} ");
    if !log.contains(&opted_in) {
        return false;
    }
    let tag = format!("appservice={id} ");
    let last = |what: &[&str]| {
        log.lines()
            .enumerate()
            .filter(|(_, l)| l.contains(&tag) && what.iter().any(|w| l.contains(w)))
            .map(|(i, _)| i)
            .last()
    };
    match (
        last(&["back to live delivery appservice"]),
        last(&["resync requested", "first opt-in"]),
    ) {
        (Some(live), Some(request)) => live > request,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Wait until each of `ids` is live after its last resync request (see
/// [`live_after_last_resync`]); panics with the log after `timeout`.
pub async fn wait_until_live(relay: &RelayProcess, ids: &[&str], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let log = relay.log_text();
        if ids.iter().all(|id| live_after_last_resync(&log, id)) {
            return;
        }
        assert!(Instant::now() < deadline, "{ids:?} not live within {timeout:?}:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Print what differs between two states (for assertion messages).
pub fn diff(got: &BTreeMap<ReceivedKey, serde_json::Value>, want: &BTreeMap<ReceivedKey, serde_json::Value>) -> String {
    let short = |v: &serde_json::Value| {
        let t = v.to_string();
        if t.len() > 120 {
            format!(
                "{}…({} bytes)",
                &t[..t.char_indices().nth(100).map(|(i, _)| i).unwrap_or(t.len())],
                t.len()
            )
        } else {
            t
        }
    };
    let mut out = String::new();
    let mut lines = 0;
    for (k, v) in want {
        let line = match got.get(k) {
            None => format!("missing {k:?} = {}\n", short(v)),
            Some(g) if g != v => format!("wrong   {k:?}: got {}, want {}\n", short(g), short(v)),
            _ => continue,
        };
        lines += 1;
        if lines <= 40 {
            out.push_str(&line);
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        lines += 1;
        if lines <= 40 {
            out.push_str(&format!("extra   {k:?}\n"));
        }
    }
    if lines > 40 {
        out.push_str(&format!("… {} differences in all\n", lines));
    }
    out
}

/// Instantiate an async test `fn name(server: &'static Server)` for both servers, each a server
/// of the test's own started with `settings` (for tests that measure or break the server).
#[macro_export]
macro_rules! on_both_own_servers {
    ($name:ident, $settings:expr) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg15_local() {
                let settings: &[(&str, &str)] = $settings;
                let options = synapse_account_data_relay::testkit::LocalClusterOptions {
                    settings: settings
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                };
                super::$name($crate::support::own_local(stringify!($name), options)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg17_container() {
                super::$name($crate::support::own_pg17($settings)).await
            }
        }
    };
}

/// Instantiate an async test `fn name(server: &'static Server)` for both servers.
#[macro_export]
macro_rules! on_both_servers {
    ($($name:ident),* $(,)?) => {
        mod pg15_local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::pg15()).await
                }
            )*
        }
        mod pg17_container {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::pg17()).await
                }
            )*
        }
    };
}

/// A local cluster of the test's own (for tests that restart or break the server), started with
/// `options`; it lives until the process exits.
pub fn own_local(label: &'static str, options: LocalClusterOptions) -> &'static Server {
    let mut c =
        LocalCluster::start(options).unwrap_or_else(|e| panic!("cannot start a local PostgreSQL ({label}): {e}"));
    c.stop_when_process_exits().unwrap_or_else(|e| panic!("{e}"));
    Box::leak(Box::new(Server {
        label,
        host: "127.0.0.1".into(),
        port: c.port(),
        local: Some(c),
    }))
}

/// Poll `check` every 50 ms until it returns true or `timeout` passes; returns whether it did.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// For the keys where `got` and `want` differ (up to five), every value the receiver accepted
/// for them, in order, with the transaction ids: to see whether a change was lost or overtaken.
pub fn histories(
    receiver: &synapse_account_data_relay::testkit::receiver::RecordingAppservice,
    want: &BTreeMap<ReceivedKey, serde_json::Value>,
) -> String {
    let got = receiver.state();
    let wrong: Vec<&ReceivedKey> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .take(5)
        .collect();
    let mut out = String::new();
    for key in wrong {
        out.push_str(&format!("history of {key:?}:\n"));
        for t in receiver.transactions() {
            for (k, v) in synapse_account_data_relay::testkit::receiver::events_of(&t.body) {
                if &k == key {
                    let text = v.to_string();
                    out.push_str(&format!("  {} {}\n", t.txn_id, &text[..text.len().min(120)]));
                }
            }
        }
    }
    out
}
