//! The replication connection and the SQL connection against real, throw-away PostgreSQL 15
//! clusters (no mocks).
//!
//! Each cluster lives in a temporary directory owned by the `postgres` user (initdb and postgres
//! refuse to run as root), listens on 127.0.0.1 and 127.0.0.2 on a free port and on a Unix socket in
//! that directory, and is stopped (`pg_ctl stop -m immediate`) by a Drop guard, also when a test
//! panics. Tests running at the same time share a cluster (see `shared`); the last one to finish
//! stops it.
//!
//! The PostgreSQL binaries are taken from `$PG_BIN` or `/usr/lib/postgresql/15/bin`; the tests fail
//! (they do not skip) when they are missing. Certificates are made with the `openssl` CLI.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use synapse_account_data_relay::model::{Lsn, Secret};
use synapse_account_data_relay::pgconfig::{PgConnectionConfig, PgHost, SslMode};
use synapse_account_data_relay::postgres_sql::connect_sql;
use synapse_account_data_relay::replication::connection::{
    AuthMethod, LogicalReplicationStream, ReplicationConnection,
};
use synapse_account_data_relay::replication::error::ReplicationError;
use synapse_account_data_relay::tls;

const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

const CLEARTEXT_PASSWORD: &str = "cleartext-secret-1";
const MD5_PASSWORD: &str = "md5-secret-2";
const SCRAM_PASSWORD: &str = "scram-secret-3";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

fn pg_bin() -> PathBuf {
    let bin = std::env::var_os("PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN));
    for tool in ["initdb", "pg_ctl", "postgres", "psql"] {
        assert!(
            bin.join(tool).is_file(),
            "PostgreSQL binaries not found: {} is missing. Install PostgreSQL 15 (Debian: apt-get install postgresql-15) \
             or point $PG_BIN at a directory holding initdb, pg_ctl, postgres and psql.",
            bin.join(tool).display()
        );
    }
    bin
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Runs a PostgreSQL server tool as the `postgres` user when we are root, directly otherwise.
fn run_pg_tool(tool: &Path, args: &[&str]) -> Output {
    let mut command = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(tool);
        c
    } else {
        Command::new(tool)
    };
    command.args(args);
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()))
}

fn check(output: Output, what: &str) -> Output {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn chown_to_postgres(path: &Path) {
    if running_as_root() {
        check(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(path)
                .output()
                .unwrap(),
            "chown",
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA and a server certificate (for `localhost` and 127.0.0.1), and an unrelated CA.
struct Certs {
    ca_cert: PathBuf,
    other_ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (needed to make test certificates): {e}"));
    check(output, &format!("openssl {}", args.join(" ")));
}

fn make_certs(dir: &Path, digest: &str) -> Certs {
    fs::create_dir_all(dir).unwrap();
    for ca in ["ca", "other-ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-sha256",
                "-days",
                "30",
                "-subj",
                &format!("/CN=relay test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n\
         subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            digest,
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
    let server_key = dir.join("server.key");
    fs::set_permissions(&server_key, fs::Permissions::from_mode(0o600)).unwrap();
    Certs {
        ca_cert: dir.join("ca.crt"),
        other_ca_cert: dir.join("other-ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// ssl=on, users for each password method.
    Main,
    /// ssl=off, 1 MiB WAL segments, max_slot_wal_keep_size=1MB (for invalidated slots).
    Plain,
    /// As `Main`, with a server certificate signed with ECDSA-SHA384 (so channel binding uses SHA-384).
    Sha384,
}

/// A running throw-away cluster; dropping it stops the server.
struct Cluster {
    dir: tempfile::TempDir,
    data: PathBuf,
    port: u16,
    bin: PathBuf,
    certs: Option<Certs>,
}

impl Cluster {
    fn start(kind: Kind) -> Cluster {
        let bin = pg_bin();
        let dir = tempfile::Builder::new().prefix("relay-pg-").tempdir().unwrap();
        let data = dir.path().join("data");
        let certs = match kind {
            Kind::Main => Some(make_certs(&dir.path().join("certs"), "-sha256")),
            Kind::Sha384 => Some(make_certs(&dir.path().join("certs"), "-sha384")),
            Kind::Plain => None,
        };
        chown_to_postgres(dir.path());
        let data_arg = data.to_str().unwrap().to_owned();
        let data_arg = data_arg.as_str();
        let mut initdb_args = vec![
            "-D",
            data_arg,
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ];
        if kind == Kind::Plain {
            initdb_args.push("--wal-segsize=1");
        }
        check(run_pg_tool(&bin.join("initdb"), &initdb_args), "initdb");

        let port = free_port();
        let mut conf = format!(
            "\n# relay tests\nport = {port}\nlisten_addresses = '127.0.0.1,127.0.0.2'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_wal_senders = 20\n\
             max_replication_slots = 20\nmax_connections = 60\nshared_buffers = 16MB\nlog_connections = on\n\
             log_min_messages = info\n",
            dir.path().display()
        );
        match (&certs, kind) {
            (Some(c), _) => conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                c.server_cert.display(),
                c.server_key.display()
            )),
            (None, Kind::Plain) => {
                conf.push_str("ssl = off\nmax_slot_wal_keep_size = 1MB\nmin_wal_size = 2MB\nmax_wal_size = 4MB\n")
            }
            (None, _) => unreachable!("TLS clusters have certificates"),
        }
        let mut pg_conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut pg_conf, conf.as_bytes()).unwrap();
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all u_password 127.0.0.0/8 password\n\
             host all u_md5 127.0.0.0/8 md5\n\
             host all u_scram 127.0.0.0/8 scram-sha-256\n\
             host all all 127.0.0.0/8 trust\n",
        )
        .unwrap();

        let cluster = Cluster {
            dir,
            data,
            port,
            bin,
            certs,
        };
        let log = cluster.dir.path().join("server.log");
        let started = run_pg_tool(
            &cluster.bin.join("pg_ctl"),
            &["-D", data_arg, "-l", log.to_str().unwrap(), "-w", "-t", "60", "start"],
        );
        if !started.status.success() {
            panic!(
                "pg_ctl start failed: {}\n{}\nserver log:\n{}",
                String::from_utf8_lossy(&started.stdout),
                String::from_utf8_lossy(&started.stderr),
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        cluster.psql(&format!(
            "CREATE ROLE u_trust LOGIN REPLICATION;
             CREATE ROLE u_password LOGIN REPLICATION PASSWORD '{CLEARTEXT_PASSWORD}';
             SET password_encryption = 'md5';
             CREATE ROLE u_md5 LOGIN REPLICATION PASSWORD '{MD5_PASSWORD}';
             SET password_encryption = 'scram-sha-256';
             CREATE ROLE u_scram LOGIN REPLICATION PASSWORD '{SCRAM_PASSWORD}';"
        ));
        cluster
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    fn psql(&self, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-h",
            ])
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output()
            .unwrap();
        String::from_utf8(check(output, &format!("psql -c {sql:?}")).stdout)
            .unwrap()
            .trim()
            .to_owned()
    }

    fn server_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Settings for a TCP connection to 127.0.0.1.
    fn config(&self, user: &str, password: Option<&str>, ssl_mode: SslMode) -> PgConnectionConfig {
        PgConnectionConfig {
            host: PgHost::Tcp("127.0.0.1".into()),
            port: self.port,
            user: user.into(),
            password: password.map(Secret::new),
            dbname: "postgres".into(),
            ssl_mode,
            ssl_root_cert: self.certs.as_ref().map(|c| c.ca_cert.clone()),
            application_name: "relay-test".into(),
            connect_timeout: Duration::from_secs(20),
        }
    }

    /// Superuser SQL over the Unix socket.
    async fn admin(&self) -> tokio_postgres::Client {
        let cfg = PgConnectionConfig {
            host: PgHost::UnixSocketDir(self.socket_dir()),
            ..self.config("postgres", None, SslMode::Disable)
        };
        connect_sql(&cfg).await.unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = run_pg_tool(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                self.data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

static MAIN: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());
static PLAIN: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());
static SHA384: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());

/// The cluster of this kind that running tests share, started if none is running.
fn shared(kind: Kind) -> Arc<Cluster> {
    let slot = match kind {
        Kind::Main => &MAIN,
        Kind::Plain => &PLAIN,
        Kind::Sha384 => &SHA384,
    };
    let mut weak = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(cluster) = weak.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(Cluster::start(kind));
    *weak = Arc::downgrade(&cluster);
    cluster
}

/// A name unique to this test run and call.
fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A table, a publication for it and a pgoutput slot; returns (table, publication, slot).
async fn table_publication_slot(admin: &tokio_postgres::Client, publication: Option<&str>) -> (String, String, String) {
    let table = unique("t");
    let publication = publication.map(str::to_owned).unwrap_or_else(|| unique("pub"));
    let slot = unique("slot");
    admin
        .batch_execute(&format!("CREATE TABLE {table} (id serial PRIMARY KEY, v text)"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {table}",
            postgres_protocol::escape::escape_identifier(&publication)
        ))
        .await
        .unwrap();
    admin
        .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
        .await
        .unwrap();
    (table, publication, slot)
}

async fn slot_state(admin: &tokio_postgres::Client, slot: &str) -> (bool, Lsn, Option<String>) {
    let row = admin
        .query_one(
            "SELECT active, confirmed_flush_lsn::text, wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    let lsn: Option<String> = row.get(1);
    (
        row.get(0),
        lsn.map(|l| l.parse().unwrap()).unwrap_or(Lsn::ZERO),
        row.get(2),
    )
}

async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// A standby status update ('r'): write, flush, apply, clock (µs since 2000-01-01), reply flag.
fn standby_status_update(lsn: Lsn) -> Vec<u8> {
    const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let clock = i64::try_from(now.as_micros() - u128::from(PG_EPOCH_OFFSET_SECS) * 1_000_000).unwrap();
    let mut out = vec![b'r'];
    for _ in 0..3 {
        out.extend_from_slice(&lsn.0.to_be_bytes());
    }
    out.extend_from_slice(&clock.to_be_bytes());
    out.push(0);
    out
}

/// What the stream delivered until a keepalive arrived after a Commit.
#[derive(Default)]
struct Received {
    /// pgoutput message types, in order, from 'w' payloads.
    pgoutput: Vec<u8>,
    keepalives: usize,
    /// The end LSN of the last Commit.
    commit_end: Option<Lsn>,
    cancelled_reads: usize,
}

/// Reads from the stream with very short timeouts (so many reads are cancelled mid-way) until a
/// Commit and then a keepalive have arrived. Checks the shape of every payload.
async fn receive_transaction(stream: &mut LogicalReplicationStream) -> Received {
    let mut got = Received::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut wait = Duration::from_micros(50);
    loop {
        assert!(
            Instant::now() < deadline,
            "no Commit followed by a keepalive within 60 s"
        );
        let payload: Bytes = match tokio::time::timeout(wait, stream.next_copy_data()).await {
            Err(_) => {
                got.cancelled_reads += 1;
                wait = (wait * 2).min(Duration::from_millis(200));
                continue;
            }
            Ok(result) => result.unwrap().expect("the server ended the stream"),
        };
        wait = Duration::from_micros(50);
        match payload.first() {
            Some(b'w') => {
                assert!(payload.len() > 25, "XLogData too short: {payload:?}");
                let message = &payload[25..];
                got.pgoutput.push(message[0]);
                if message[0] == b'C' {
                    // Commit: flags (1), commit LSN (8), end LSN (8), timestamp (8).
                    got.commit_end = Some(Lsn(be_u64(message, 10)));
                }
            }
            Some(b'k') => {
                assert_eq!(payload.len(), 18, "keepalive: {payload:?}");
                got.keepalives += 1;
                if got.commit_end.is_some() {
                    return got;
                }
            }
            other => panic!("unexpected CopyData payload starting with {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn trust_over_tcp_and_unix_socket_and_identify_system() {
    let cluster = shared(Kind::Main);
    let mut conn = ReplicationConnection::connect(&cluster.config("u_trust", None, SslMode::Disable))
        .await
        .unwrap();
    assert_eq!(conn.auth_method_used(), AuthMethod::Trust);
    assert!(!conn.is_tls());
    assert!(conn.backend_pid().is_some());
    assert!(
        conn.parameter("server_version").is_some_and(|v| v.starts_with("15")),
        "{conn:?}"
    );
    assert_eq!(conn.parameter("client_encoding"), Some("UTF8"));
    assert_eq!(
        conn.simple_query("SHOW wal_level").await.unwrap(),
        vec![vec![Some("logical".to_owned())]]
    );

    let identity = conn.identify_system().await.unwrap();
    let current: Lsn = cluster.psql("SELECT pg_current_wal_lsn()").parse().unwrap();
    assert_eq!(identity.timeline, 1);
    assert_eq!(identity.dbname.as_deref(), Some("postgres"));
    assert!(identity.system_id.parse::<u64>().is_ok(), "{identity:?}");
    assert!(
        identity.xlogpos > Lsn::ZERO && identity.xlogpos <= current,
        "{identity:?} vs {current}"
    );
    // SQL works on a replication=database connection; NULL comes back as None; several results are concatenated.
    let rows = conn.simple_query("SELECT 1, NULL::text; SELECT 'é'").await.unwrap();
    assert_eq!(rows, vec![vec![Some("1".to_owned()), None], vec![Some("é".to_owned())]]);
    // A failed query leaves the connection usable.
    let err = conn.simple_query("SELECT * FROM no_such_table").await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42P01"), "{err}");
    assert_eq!(
        conn.simple_query("SELECT 2").await.unwrap(),
        vec![vec![Some("2".to_owned())]]
    );
    conn.close().await;

    // Over the Unix socket, TLS is not attempted even with sslmode=require (as libpq).
    let cfg = PgConnectionConfig {
        host: PgHost::UnixSocketDir(cluster.socket_dir()),
        ..cluster.config("u_trust", None, SslMode::Require)
    };
    let mut conn = ReplicationConnection::connect(&cfg).await.unwrap();
    assert!(!conn.is_tls());
    assert_eq!(
        conn.identify_system().await.unwrap().dbname.as_deref(),
        Some("postgres")
    );
}

#[tokio::test]
async fn password_methods() {
    let cluster = shared(Kind::Main);
    for (user, password, method) in [
        ("u_password", CLEARTEXT_PASSWORD, AuthMethod::Cleartext),
        ("u_md5", MD5_PASSWORD, AuthMethod::Md5),
        ("u_scram", SCRAM_PASSWORD, AuthMethod::ScramSha256),
    ] {
        let mut conn = ReplicationConnection::connect(&cluster.config(user, Some(password), SslMode::Disable))
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(conn.auth_method_used(), method, "{user}");
        let ssl = conn
            .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .await
            .unwrap();
        assert_eq!(ssl, vec![vec![Some("f".to_owned())]]);
        conn.close().await;
    }
}

#[tokio::test]
async fn wrong_or_missing_password() {
    let cluster = shared(Kind::Main);
    for user in ["u_password", "u_md5", "u_scram"] {
        for ssl_mode in [SslMode::Disable, SslMode::Require] {
            let err = ReplicationConnection::connect(&cluster.config(user, Some("not-the-password"), ssl_mode))
                .await
                .unwrap_err();
            assert_eq!(err.sqlstate(), Some("28P01"), "{user} {ssl_mode:?}: {err}");
            assert!(!err.is_transient());
            assert!(!format!("{err} {err:?}").contains("not-the-password"));
        }
    }
    for (user, method) in [
        ("u_password", "password"),
        ("u_md5", "md5"),
        ("u_scram", "SCRAM-SHA-256"),
    ] {
        for password in [None, Some("")] {
            let err = ReplicationConnection::connect(&cluster.config(user, password, SslMode::Disable))
                .await
                .unwrap_err();
            assert!(matches!(err, ReplicationError::Auth { .. }), "{err:?}");
            let text = err.to_string();
            assert!(
                text.contains(&format!(
                    "the server asked for a password ({method}) but none is configured"
                )),
                "{text}"
            );
        }
    }
}

#[tokio::test]
async fn tls_modes() {
    let cluster = shared(Kind::Main);
    let certs = cluster.certs.as_ref().unwrap();
    let connect = |host: &str, ssl_mode: SslMode, root: &Path| {
        let cfg = PgConnectionConfig {
            host: PgHost::Tcp(host.into()),
            ssl_root_cert: Some(root.to_owned()),
            ..cluster.config("u_scram", Some(SCRAM_PASSWORD), ssl_mode)
        };
        async move { ReplicationConnection::connect(&cfg).await }
    };
    let ca = certs.ca_cert.as_path();
    let other_ca = certs.other_ca_cert.as_path();

    // (host, mode, root) → TLS used (or the connection must fail).
    let cases: [(&str, SslMode, &Path, Option<bool>); 12] = [
        ("127.0.0.1", SslMode::Disable, ca, Some(false)),
        ("127.0.0.1", SslMode::Prefer, ca, Some(true)),
        ("127.0.0.1", SslMode::Require, other_ca, Some(true)),
        ("127.0.0.2", SslMode::Require, other_ca, Some(true)),
        ("127.0.0.1", SslMode::VerifyCa, ca, Some(true)),
        // verify-ca does not check the name: 127.0.0.2 is not in the certificate.
        ("127.0.0.2", SslMode::VerifyCa, ca, Some(true)),
        ("127.0.0.1", SslMode::VerifyCa, other_ca, None),
        ("localhost", SslMode::VerifyFull, ca, Some(true)),
        ("127.0.0.1", SslMode::VerifyFull, ca, Some(true)),
        ("127.0.0.2", SslMode::VerifyFull, ca, None),
        ("localhost", SslMode::VerifyFull, other_ca, None),
        ("127.0.0.1", SslMode::VerifyFull, other_ca, None),
    ];
    for (host, mode, root, expected) in cases {
        let result = connect(host, mode, root).await;
        match (expected, result) {
            (Some(tls), Ok(mut conn)) => {
                assert_eq!(conn.is_tls(), tls, "{host} {mode:?}");
                let ssl = conn
                    .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                    .await
                    .unwrap();
                assert_eq!(
                    ssl,
                    vec![vec![Some(if tls { "t" } else { "f" }.to_owned())]],
                    "{host} {mode:?}"
                );
                conn.close().await;
            }
            (None, Err(e)) => {
                assert!(matches!(e, ReplicationError::Tls { .. }), "{host} {mode:?}: {e:?}");
                assert!(e.to_string().contains("TLS handshake failed"), "{e}");
            }
            (expected, result) => {
                panic!("{host} {mode:?} {root:?}: expected {expected:?}, got {result:?}")
            }
        }
    }
}

#[tokio::test]
async fn scram_sha_256_plus_under_tls() {
    let cluster = shared(Kind::Main);
    for mode in [
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ] {
        let conn = ReplicationConnection::connect(&cluster.config("u_scram", Some(SCRAM_PASSWORD), mode))
            .await
            .unwrap();
        assert!(conn.is_tls());
        assert_eq!(conn.auth_method_used(), AuthMethod::ScramSha256Plus, "{mode:?}");
        conn.close().await;
    }
    // The SCRAM users' logins appear in the server log; the password never does.
    assert!(!cluster.server_log().contains(SCRAM_PASSWORD));

    // Without a root file, verify-* use the system's trust store, which does not know our test CA.
    for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
        let cfg = PgConnectionConfig {
            ssl_root_cert: None,
            ..cluster.config("u_scram", Some(SCRAM_PASSWORD), mode)
        };
        let err = ReplicationConnection::connect(&cfg).await.unwrap_err();
        assert!(matches!(err, ReplicationError::Tls { .. }), "{mode:?}: {err:?}");
    }
}

#[tokio::test]
async fn scram_sha_256_plus_with_a_sha384_certificate() {
    // The channel-binding hash follows the certificate's signature algorithm: SHA-384 here. A wrong
    // hash would make the server reject the login.
    let cluster = shared(Kind::Sha384);
    let cert_path = &cluster.certs.as_ref().unwrap().server_cert;
    let cert = CertificateDer::from_pem_file(cert_path).unwrap();
    assert_eq!(tls::end_point_hash(&cert), Some(tls::EndPointHash::Sha384));
    let conn = ReplicationConnection::connect(&cluster.config("u_scram", Some(SCRAM_PASSWORD), SslMode::VerifyFull))
        .await
        .unwrap();
    assert_eq!(conn.auth_method_used(), AuthMethod::ScramSha256Plus);
    conn.close().await;
}

#[tokio::test]
async fn stream_changes_keepalives_and_standby_status_updates() {
    let cluster = shared(Kind::Main);
    let admin = cluster.admin().await;
    let (table, publication, slot) = table_publication_slot(&admin, None).await;

    // Over TLS with SCRAM-SHA-256-PLUS, as in production.
    let conn = ReplicationConnection::connect(&cluster.config("u_scram", Some(SCRAM_PASSWORD), SslMode::VerifyFull))
        .await
        .unwrap();
    let mut stream = conn
        .start_logical_replication(&slot, Lsn::ZERO, &publication)
        .await
        .unwrap();
    assert!(slot_state(&admin, &slot).await.0, "slot not active");

    admin
        .batch_execute(&format!("INSERT INTO {table} (v) VALUES ('hello')"))
        .await
        .unwrap();
    let got = receive_transaction(&mut stream).await;
    // Begin, Relation, Insert, Commit.
    assert_eq!(
        got.pgoutput,
        b"BRIC",
        "pgoutput messages: {:?}",
        String::from_utf8_lossy(&got.pgoutput)
    );
    assert!(got.keepalives >= 1);
    assert!(got.cancelled_reads > 0, "the test meant to cancel reads");
    let commit_end = got.commit_end.unwrap();

    let (_, confirmed_before, _) = slot_state(&admin, &slot).await;
    assert!(confirmed_before < commit_end, "{confirmed_before} vs {commit_end}");
    stream.send_copy_data(&standby_status_update(commit_end)).await.unwrap();
    let confirmed = eventually("confirmed_flush_lsn to move", || async {
        let (_, confirmed, _) = slot_state(&admin, &slot).await;
        (confirmed >= commit_end).then_some(confirmed)
    })
    .await;
    assert_eq!(confirmed, commit_end);

    // A second transaction still streams after all the cancelled reads.
    admin
        .batch_execute(&format!("INSERT INTO {table} (v) VALUES ('again')"))
        .await
        .unwrap();
    let got = receive_transaction(&mut stream).await;
    assert_eq!(
        got.pgoutput,
        b"BIC",
        "pgoutput messages: {:?}",
        String::from_utf8_lossy(&got.pgoutput)
    );

    stream.finish().await;
    eventually("the slot to become inactive", || async {
        (!slot_state(&admin, &slot).await.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn quoted_publication_name() {
    let cluster = shared(Kind::Main);
    let admin = cluster.admin().await;
    let name = format!("{} we'ird \"pub\\", unique("P"));
    let (table, publication, slot) = table_publication_slot(&admin, Some(&name)).await;
    let conn = ReplicationConnection::connect(&cluster.config("u_trust", None, SslMode::Disable))
        .await
        .unwrap();
    let mut stream = conn
        .start_logical_replication(&slot, Lsn::ZERO, &publication)
        .await
        .unwrap();
    admin
        .batch_execute(&format!("INSERT INTO {table} (v) VALUES ('x')"))
        .await
        .unwrap();
    let got = receive_transaction(&mut stream).await;
    assert_eq!(got.pgoutput, b"BRIC");
    stream.finish().await;
}

#[tokio::test]
async fn slot_in_use_missing_and_terminated() {
    let cluster = shared(Kind::Main);
    let admin = cluster.admin().await;
    let (_table, publication, slot) = table_publication_slot(&admin, None).await;
    let cfg = cluster.config("u_md5", Some(MD5_PASSWORD), SslMode::Require);

    let mut first = ReplicationConnection::connect(&cfg)
        .await
        .unwrap()
        .start_logical_replication(&slot, Lsn::ZERO, &publication)
        .await
        .unwrap();
    let second = ReplicationConnection::connect(&cfg).await.unwrap();
    let err = second
        .start_logical_replication(&slot, Lsn::ZERO, &publication)
        .await
        .unwrap_err();
    assert!(err.is_slot_in_use(), "{err:?}");
    assert_eq!(err.sqlstate(), Some("55006"));
    assert!(!err.is_slot_missing() && !err.is_slot_invalidated());

    let missing = ReplicationConnection::connect(&cfg).await.unwrap();
    let err = missing
        .start_logical_replication("no_such_slot", Lsn::ZERO, &publication)
        .await
        .unwrap_err();
    assert!(err.is_slot_missing(), "{err:?}");
    assert_eq!(err.sqlstate(), Some("42704"));

    // The walsender is terminated: the stream ends with the server's FATAL 57P01, which is transient.
    admin
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(30), first.next_copy_data())
            .await
            .expect("stream did not end")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("CopyDone instead of an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.sqlstate(), Some("57P01"), "{err:?}");
    assert!(err.is_transient());
    // After that the server has closed the connection: an I/O error, also transient.
    let err = first.next_copy_data().await.unwrap_err();
    assert!(
        matches!(err, ReplicationError::Io { .. }) && err.is_transient(),
        "{err:?}"
    );
}

#[tokio::test]
async fn invalidated_slot() {
    let cluster = shared(Kind::Plain);
    let admin = cluster.admin().await;
    let (table, publication, slot) = table_publication_slot(&admin, None).await;
    // Write more WAL than max_slot_wal_keep_size (1 MB) while the slot is not consumed, then checkpoint.
    let wal_status = eventually("the slot to be invalidated", || async {
        admin
            .batch_execute(&format!(
                "INSERT INTO {table} (v) SELECT repeat('x', 200) FROM generate_series(1, 5000); SELECT pg_switch_wal(); CHECKPOINT;"
            ))
            .await
            .unwrap();
        let (_, _, status) = slot_state(&admin, &slot).await;
        (status.as_deref() == Some("lost")).then_some(status)
    })
    .await;
    assert_eq!(wal_status.as_deref(), Some("lost"));

    let conn = ReplicationConnection::connect(&cluster.config("u_trust", None, SslMode::Disable))
        .await
        .unwrap();
    let version = conn.parameter("server_version").unwrap_or_default().to_owned();
    let err = conn
        .start_logical_replication(&slot, Lsn::ZERO, &publication)
        .await
        .unwrap_err();
    assert!(err.is_slot_invalidated(), "{err:?}");
    assert!(!err.is_transient() && !err.is_slot_missing() && !err.is_slot_in_use());
    let server = err.server_error().unwrap();
    assert_eq!(server.code, "55000");
    let major: u32 = version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    let (message, detail) = match major {
        // StartLogicalReplication in walsender.c.
        13..=15 => (
            "cannot read from logical replication slot",
            "This slot has been invalidated because it exceeded the maximum reserved size.",
        ),
        // CreateDecodingContext in logical.c.
        16 | 17 => (
            "can no longer get changes from replication slot",
            "This slot has been invalidated because it exceeded the maximum reserved size.",
        ),
        // ReplicationSlotAcquire in slot.c.
        _ => (
            "can no longer access replication slot",
            "This replication slot has been invalidated due to \"wal_removed\".",
        ),
    };
    assert_eq!(
        server.message,
        format!("{message} \"{slot}\""),
        "server version {version}"
    );
    assert_eq!(server.detail.as_deref(), Some(detail), "server version {version}");
}

#[tokio::test]
async fn prefer_without_server_tls_and_require_refused() {
    let cluster = shared(Kind::Plain);
    let conn = ReplicationConnection::connect(&cluster.config("u_trust", None, SslMode::Prefer))
        .await
        .unwrap();
    assert!(!conn.is_tls());
    conn.close().await;
    for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
        let cfg = PgConnectionConfig {
            ssl_root_cert: Some(PathBuf::from("/etc/ssl/certs/ca-certificates.crt")),
            ..cluster.config("u_trust", None, mode)
        };
        let err = ReplicationConnection::connect(&cfg).await.unwrap_err();
        assert!(
            err.to_string().contains("the server does not support TLS"),
            "{mode:?}: {err}"
        );
    }
}

#[tokio::test]
async fn connect_timeout_is_enforced() {
    // A listener that never answers: the TCP handshake completes, the startup does not.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = PgConnectionConfig {
        host: PgHost::Tcp("127.0.0.1".into()),
        port,
        user: "u".into(),
        password: None,
        dbname: "d".into(),
        ssl_mode: SslMode::Disable,
        ssl_root_cert: None,
        application_name: "relay-test".into(),
        connect_timeout: Duration::from_millis(300),
    };
    let started = Instant::now();
    let err = ReplicationConnection::connect(&cfg).await.unwrap_err();
    assert!(matches!(err, ReplicationError::Timeout { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(listener);
}

#[tokio::test]
async fn sql_connections() {
    let cluster = shared(Kind::Main);
    let ssl_of = |client: tokio_postgres::Client| async move {
        let row = client
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .unwrap();
        row.get::<_, bool>(0)
    };
    // Unix socket (TLS never attempted), plain TCP, and every TLS mode with SCRAM.
    let admin = cluster.admin().await;
    assert!(!ssl_of(admin).await);
    let plain = connect_sql(&cluster.config("u_md5", Some(MD5_PASSWORD), SslMode::Disable))
        .await
        .unwrap();
    assert!(!ssl_of(plain).await);
    for mode in [
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ] {
        let client = connect_sql(&cluster.config("u_scram", Some(SCRAM_PASSWORD), mode))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert!(ssl_of(client).await, "{mode:?}");
    }
    let err = connect_sql(&cluster.config("u_scram", Some("wrong"), SslMode::Require))
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    assert!(err.to_string().contains("u_scram@127.0.0.1"), "{err}");
    let wrong_host = PgConnectionConfig {
        host: PgHost::Tcp("127.0.0.2".into()),
        ..cluster.config("u_scram", Some(SCRAM_PASSWORD), SslMode::VerifyFull)
    };
    let err = connect_sql(&wrong_host).await.unwrap_err();
    assert_eq!(err.sqlstate(), None, "{err}");
    let wrong_ca = PgConnectionConfig {
        ssl_root_cert: cluster.certs.as_ref().map(|c| c.other_ca_cert.clone()),
        ..cluster.config("u_scram", Some(SCRAM_PASSWORD), SslMode::VerifyCa)
    };
    assert!(connect_sql(&wrong_ca).await.is_err());
}
