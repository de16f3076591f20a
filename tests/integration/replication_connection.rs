//! The replication connection and the SQL connection against real PostgreSQL (no mocks).
//!
//! What needs only trust authentication (IDENTIFY_SYSTEM, streaming and standby status updates,
//! slot errors, a server without TLS) runs on both servers. Authentication methods and TLS need
//! servers of their own, local only (`testkit::LocalCluster` with [`LocalClusterOptions`]):
//! - `tls_server`: TLS with a certificate for `localhost`/127.0.0.1 from a test CA, listening on
//!   127.0.0.1 and 127.0.0.2 (a name the certificate does not hold), and one role per password
//!   method;
//! - `sha384_server`: the same with a certificate signed with ECDSA-SHA384 (so SCRAM channel
//!   binding uses SHA-384);
//! - `small_wal_server`: 1 MiB WAL segments and `max_slot_wal_keep_size = 1MB`, to invalidate
//!   slots.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use synapse_account_data_relay::model::Lsn;
use synapse_account_data_relay::postgres::config::{ChannelBindingMode, PgConnectionConfig, SslMode};
use synapse_account_data_relay::postgres::hosts::PgHost;
use synapse_account_data_relay::postgres::sql::connect_sql;
use synapse_account_data_relay::postgres::tls;
use synapse_account_data_relay::replication::connection::{
    AuthMethod, LogicalReplicationStream, ReplicationConnection,
};
use synapse_account_data_relay::replication::error::ReplicationError;
use synapse_account_data_relay::testkit::{LocalCluster, LocalClusterOptions};

use crate::on_both_servers;
use crate::support::certs::{Digest, TestCerts};
use crate::support::{Server, TestDb, shared_local};

const CLEARTEXT_PASSWORD: &str = "cleartext-secret-1";
const MD5_PASSWORD: &str = "md5-secret-2";
const SCRAM_PASSWORD: &str = "scram-secret-3";

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

/// A local server with TLS and a role per password method, and the certificates it serves.
struct TlsServer {
    server: &'static Server,
    certs: &'static TestCerts,
}

fn tls_server_with(
    slot: &'static OnceLock<Result<Server, String>>,
    certs: &'static OnceLock<TestCerts>,
    label: &'static str,
    digest: Digest,
) -> TlsServer {
    let certs = certs.get_or_init(|| TestCerts::generate(digest));
    let options = || LocalClusterOptions {
        settings: vec![
            ("listen_addresses".into(), "127.0.0.1,127.0.0.2".into()),
            ("log_connections".into(), "on".into()),
            ("shared_buffers".into(), "16MB".into()),
        ],
        hba_lines: vec![
            "host all u_password 127.0.0.0/8 password".into(),
            "host all u_md5 127.0.0.0/8 md5".into(),
            "host all u_scram 127.0.0.0/8 scram-sha-256".into(),
            "host all all 127.0.0.0/8 trust".into(),
        ],
        tls: Some(certs.server_tls()),
        remove_with: vec![certs.dir().to_owned()],
        ..Default::default()
    };
    let server = shared_local(slot, label, options, create_roles);
    TlsServer { server, certs }
}

fn create_roles(cluster: &LocalCluster) -> Result<(), String> {
    cluster
        .psql(
            "postgres",
            &format!(
                "CREATE ROLE u_trust LOGIN REPLICATION;
                 CREATE ROLE u_password LOGIN REPLICATION PASSWORD '{CLEARTEXT_PASSWORD}';
                 SET password_encryption = 'md5';
                 CREATE ROLE u_md5 LOGIN REPLICATION PASSWORD '{MD5_PASSWORD}';
                 SET password_encryption = 'scram-sha-256';
                 CREATE ROLE u_scram LOGIN REPLICATION PASSWORD '{SCRAM_PASSWORD}';"
            ),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn tls_server() -> TlsServer {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    static CERTS: OnceLock<TestCerts> = OnceLock::new();
    tls_server_with(&SERVER, &CERTS, "local-tls", Digest::Sha256)
}

fn sha384_server() -> TlsServer {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    static CERTS: OnceLock<TestCerts> = OnceLock::new();
    tls_server_with(&SERVER, &CERTS, "local-tls-sha384", Digest::Sha384)
}

fn small_wal_server() -> &'static Server {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    let options = || LocalClusterOptions {
        settings: vec![
            ("max_slot_wal_keep_size".into(), "1MB".into()),
            ("min_wal_size".into(), "2MB".into()),
            ("max_wal_size".into(), "4MB".into()),
            ("shared_buffers".into(), "16MB".into()),
        ],
        initdb_args: vec!["--wal-segsize=1".into()],
        ..Default::default()
    };
    shared_local(&SERVER, "local-small-wal", options, |_| Ok(()))
}

fn cluster(server: &Server) -> &LocalCluster {
    server.local.as_ref().expect("a local server")
}

/// Settings for a replication (or SQL) connection over TCP to `server`'s host.
fn config(server: &Server, dbname: &str, user: &str, password: Option<&str>, ssl_mode: SslMode) -> PgConnectionConfig {
    server.connection_config(dbname, user, password, ssl_mode)
}

impl TlsServer {
    /// As [`config`] for database `postgres`, trusting the test CA.
    fn config(&self, user: &str, password: Option<&str>, ssl_mode: SslMode) -> PgConnectionConfig {
        PgConnectionConfig {
            ssl_root_cert: Some(self.certs.ca_cert.clone()),
            ..config(self.server, "postgres", user, password, ssl_mode)
        }
    }
}

/// Trust authentication as `postgres`, without TLS: what both servers accept.
fn trust(server: &Server, dbname: &str) -> PgConnectionConfig {
    config(server, dbname, "postgres", None, SslMode::Disable)
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A name unique to this test run and call.
fn unique(prefix: &str) -> String {
    use std::sync::atomic::AtomicU32;
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A table, a publication for it (named `publication`, else after the database) and a pgoutput
/// slot named after the database (so [`TestDb::drop_slot`] drops it); returns (table,
/// publication, slot).
async fn table_publication_slot(db: &TestDb, publication: Option<&str>) -> (String, String, String) {
    let table = unique("t");
    let publication = publication.map(str::to_owned).unwrap_or_else(|| db.name.clone());
    let slot = db.name.clone();
    db.client
        .batch_execute(&format!("CREATE TABLE {table} (id serial PRIMARY KEY, v text)"))
        .await
        .unwrap();
    db.client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {table}",
            postgres_protocol::escape::escape_identifier(&publication)
        ))
        .await
        .unwrap();
    db.client
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

/// Wait for the test's slot to be released, then drop it (it would hold WAL on a shared server).
async fn drop_slot_when_released(db: &TestDb) {
    eventually("the slot to become inactive", || async {
        (!slot_state(&db.client, &db.name).await.0).then_some(())
    })
    .await;
    db.drop_slot().await;
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
/// Commit and then a keepalive have arrived, and runs `write` meanwhile, once a read has been
/// cancelled (so the data arrives while reads are being cancelled). Checks the shape of every
/// payload.
async fn receive_transaction(stream: &mut LogicalReplicationStream, write: impl Future<Output = ()>) -> Received {
    let cancelled = AtomicUsize::new(0);
    let write = async {
        eventually("a read to be cancelled", || async {
            (cancelled.load(Ordering::Relaxed) > 0).then_some(())
        })
        .await;
        write.await
    };
    let (mut got, ()) = tokio::join!(read_transaction(stream, &cancelled), write);
    got.cancelled_reads = cancelled.load(Ordering::Relaxed);
    got
}

async fn read_transaction(stream: &mut LogicalReplicationStream, cancelled: &AtomicUsize) -> Received {
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
                cancelled.fetch_add(1, Ordering::Relaxed);
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

/// `INSERT INTO {table} (v) VALUES ('{v}')`.
async fn insert(admin: &tokio_postgres::Client, table: &str, v: &str) {
    admin
        .batch_execute(&format!("INSERT INTO {table} (v) VALUES ('{v}')"))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// On both servers (trust authentication)
// ---------------------------------------------------------------------------------------------

/// Trust over TCP, the startup parameters, IDENTIFY_SYSTEM and simple queries on a
/// `replication=database` connection.
async fn identify_system_and_sql_on_a_replication_connection(server: &'static Server) {
    let db = TestDb::new(server).await;
    let mut conn = ReplicationConnection::connect(&trust(server, &db.name)).await.unwrap();
    assert_eq!(conn.auth_method_used(), AuthMethod::Trust);
    assert!(!conn.is_tls());
    assert!(conn.backend_pid().is_some());
    let version: String = db.client.query_one("SHOW server_version", &[]).await.unwrap().get(0);
    assert_eq!(conn.parameter("server_version"), Some(version.as_str()), "{conn:?}");
    if let Some(local) = &server.local {
        // `postgres --version` of the binaries the harness started.
        assert!(local.version().contains(&version), "{} vs {version}", local.version());
    }
    assert_eq!(conn.parameter("client_encoding"), Some("UTF8"));
    assert_eq!(
        conn.simple_query("SHOW wal_level").await.unwrap(),
        vec![vec![Some("logical".to_owned())]]
    );

    let identity = conn.identify_system().await.unwrap();
    let current: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let current: Lsn = current.parse().unwrap();
    assert_eq!(identity.timeline, 1);
    assert_eq!(identity.dbname.as_deref(), Some(db.name.as_str()));
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
}

/// Changes stream as pgoutput, keepalives arrive, reads cancelled mid-way lose nothing, and a
/// standby status update moves `confirmed_flush_lsn` exactly to the confirmed commit.
async fn stream_changes_keepalives_and_standby_status_updates(db: &TestDb, cfg: PgConnectionConfig) {
    let admin = &db.client;
    let (table, publication, slot) = table_publication_slot(db, None).await;
    let conn = ReplicationConnection::connect(&cfg).await.unwrap();
    let mut stream = conn
        .start_logical_replication(&slot, Lsn::ZERO, &publication)
        .await
        .unwrap();
    assert!(slot_state(admin, &slot).await.0, "slot not active");

    let got = receive_transaction(&mut stream, insert(admin, &table, "hello")).await;
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

    let (_, confirmed_before, _) = slot_state(admin, &slot).await;
    assert!(confirmed_before < commit_end, "{confirmed_before} vs {commit_end}");
    stream.send_copy_data(&standby_status_update(commit_end)).await.unwrap();
    let confirmed = eventually("confirmed_flush_lsn to move", || async {
        let (_, confirmed, _) = slot_state(admin, &slot).await;
        (confirmed >= commit_end).then_some(confirmed)
    })
    .await;
    assert_eq!(confirmed, commit_end);

    // A second transaction still streams after all the cancelled reads.
    let got = receive_transaction(&mut stream, insert(admin, &table, "again")).await;
    assert_eq!(
        got.pgoutput,
        b"BIC",
        "pgoutput messages: {:?}",
        String::from_utf8_lossy(&got.pgoutput)
    );

    stream.finish().await;
    drop_slot_when_released(db).await;
}

async fn stream_with_trust(server: &'static Server) {
    let db = TestDb::new(server).await;
    stream_changes_keepalives_and_standby_status_updates(&db, trust(server, &db.name)).await;
}

async fn quoted_publication_name(server: &'static Server) {
    let db = TestDb::new(server).await;
    let name = format!("{} we'ird \"pub\\", unique("P"));
    let (table, publication, slot) = table_publication_slot(&db, Some(&name)).await;
    let conn = ReplicationConnection::connect(&trust(server, &db.name)).await.unwrap();
    let mut stream = conn
        .start_logical_replication(&slot, Lsn::ZERO, &publication)
        .await
        .unwrap();
    let got = receive_transaction(&mut stream, insert(&db.client, &table, "x")).await;
    assert_eq!(got.pgoutput, b"BRIC");
    stream.finish().await;
    drop_slot_when_released(&db).await;
}

/// A slot in use (55006), a missing slot (42704), and a terminated walsender (57P01, then an I/O
/// error; both transient).
async fn slot_in_use_missing_and_terminated(db: &TestDb, cfg: PgConnectionConfig) {
    let (_table, publication, slot) = table_publication_slot(db, None).await;

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
    db.client
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
    drop_slot_when_released(db).await;
}

/// The relay's SQL sessions commit synchronously even where the server's default for the
/// database says otherwise (recorded keys must be durable before the slot moves past them).
async fn sql_sessions_commit_synchronously(server: &'static Server) {
    let db = TestDb::new(server).await;
    db.client
        .batch_execute(&format!("ALTER DATABASE {} SET synchronous_commit = off", db.name))
        .await
        .unwrap();
    let show = |c: tokio_postgres::Client| async move {
        c.query_one("SHOW synchronous_commit", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    // A plain session gets the database's default...
    assert_eq!(show(crate::support::connect(server, &db.name).await).await, "off");
    // ...the relay's does not.
    let relay = connect_sql(&trust(server, &db.name)).await.unwrap();
    assert_eq!(show(relay).await, "on");
}

async fn slot_errors_with_trust(server: &'static Server) {
    let db = TestDb::new(server).await;
    slot_in_use_missing_and_terminated(&db, trust(server, &db.name)).await;
}

/// Both servers run without TLS: `prefer` falls back to plain, `require` and stricter refuse.
async fn prefer_without_server_tls_and_require_refused(server: &'static Server) {
    let conn = ReplicationConnection::connect(&config(server, "postgres", "postgres", None, SslMode::Prefer))
        .await
        .unwrap();
    assert!(!conn.is_tls());
    conn.close().await;
    for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
        let cfg = PgConnectionConfig {
            ssl_root_cert: Some(PathBuf::from("/etc/ssl/certs/ca-certificates.crt")),
            ..config(server, "postgres", "postgres", None, mode)
        };
        let err = ReplicationConnection::connect(&cfg).await.unwrap_err();
        assert!(
            err.to_string().contains("the server does not support TLS"),
            "{mode:?}: {err}"
        );
    }
}

on_both_servers!(
    identify_system_and_sql_on_a_replication_connection,
    stream_with_trust,
    quoted_publication_name,
    slot_errors_with_trust,
    sql_sessions_commit_synchronously,
    prefer_without_server_tls_and_require_refused,
);

// ---------------------------------------------------------------------------------------------
// Local servers with TLS, password methods, small WAL
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unix_socket_never_uses_tls() {
    let s = tls_server();
    // Over TCP a non-superuser REPLICATION role with trust authentication.
    let mut conn = ReplicationConnection::connect(&s.config("u_trust", None, SslMode::Disable))
        .await
        .unwrap();
    assert_eq!(conn.auth_method_used(), AuthMethod::Trust);
    assert!(!conn.is_tls());
    assert_eq!(
        conn.identify_system().await.unwrap().dbname.as_deref(),
        Some("postgres")
    );
    conn.close().await;
    // Over the Unix socket, TLS is not attempted even with sslmode=require (as libpq), although
    // the server offers TLS.
    let cfg = PgConnectionConfig {
        host: PgHost::UnixSocketDir(cluster(s.server).socket_dir().to_owned()),
        ..s.config("u_trust", None, SslMode::Require)
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
    let s = tls_server();
    for (user, password, method) in [
        ("u_password", CLEARTEXT_PASSWORD, AuthMethod::Cleartext),
        ("u_md5", MD5_PASSWORD, AuthMethod::Md5),
        ("u_scram", SCRAM_PASSWORD, AuthMethod::ScramSha256),
    ] {
        let mut conn = ReplicationConnection::connect(&s.config(user, Some(password), SslMode::Disable))
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
    let s = tls_server();
    for user in ["u_password", "u_md5", "u_scram"] {
        for ssl_mode in [SslMode::Disable, SslMode::Require] {
            let err = ReplicationConnection::connect(&s.config(user, Some("not-the-password"), ssl_mode))
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
            let err = ReplicationConnection::connect(&s.config(user, password, SslMode::Disable))
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
    let s = tls_server();
    let connect = |host: &str, ssl_mode: SslMode, root: &Path| {
        let cfg = PgConnectionConfig {
            host: PgHost::Tcp(host.into()),
            ssl_root_cert: Some(root.to_owned()),
            ..s.config("u_scram", Some(SCRAM_PASSWORD), ssl_mode)
        };
        async move { ReplicationConnection::connect(&cfg).await }
    };
    let ca = s.certs.ca_cert.as_path();
    let other_ca = s.certs.other_ca_cert.as_path();

    // (host, mode, root) → TLS used (or the connection must fail).
    let cases: [(&str, SslMode, &Path, Option<bool>); 14] = [
        ("127.0.0.1", SslMode::Disable, ca, Some(false)),
        ("127.0.0.1", SslMode::Prefer, ca, Some(true)),
        // With sslrootcert set, prefer and require verify the chain as verify-ca does (libpq),
        // without checking the name.
        ("127.0.0.1", SslMode::Prefer, other_ca, None),
        ("127.0.0.1", SslMode::Require, other_ca, None),
        ("127.0.0.2", SslMode::Require, other_ca, None),
        ("127.0.0.2", SslMode::Require, ca, Some(true)),
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
    let s = tls_server();
    for mode in [
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ] {
        let conn = ReplicationConnection::connect(&s.config("u_scram", Some(SCRAM_PASSWORD), mode))
            .await
            .unwrap();
        assert!(conn.is_tls());
        assert_eq!(conn.auth_method_used(), AuthMethod::ScramSha256Plus, "{mode:?}");
        conn.close().await;
    }
    // The SCRAM users' logins appear in the server log; the password never does.
    let log = cluster(s.server).log();
    assert!(log.contains("user=u_scram"), "log_connections is on:\n{log}");
    assert!(!log.contains(SCRAM_PASSWORD));

    // Without a root file, verify-* are refused (libpq too); `system` is the system's trust
    // store, which does not know our test CA.
    for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
        let cfg = PgConnectionConfig {
            ssl_root_cert: None,
            ..s.config("u_scram", Some(SCRAM_PASSWORD), mode)
        };
        let err = ReplicationConnection::connect(&cfg).await.unwrap_err();
        assert!(matches!(err, ReplicationError::Tls { .. }), "{mode:?}: {err:?}");
        assert!(err.to_string().contains("needs root certificates"), "{mode:?}: {err}");
        let err = connect_sql(&cfg).await.unwrap_err();
        assert!(err.to_string().contains("needs root certificates"), "{mode:?}: {err}");
    }
    let cfg = PgConnectionConfig {
        ssl_root_cert: Some(PathBuf::from("system")),
        ..s.config("u_scram", Some(SCRAM_PASSWORD), SslMode::VerifyFull)
    };
    let err = ReplicationConnection::connect(&cfg).await.unwrap_err();
    assert!(err.to_string().contains("TLS handshake failed"), "{err}");
}

#[tokio::test]
async fn scram_sha_256_plus_with_a_sha384_certificate() {
    // The channel-binding hash follows the certificate's signature algorithm: SHA-384 here. A wrong
    // hash would make the server reject the login.
    let s = sha384_server();
    let served = cluster(s.server).tls_cert_file().expect("the server serves TLS");
    assert_eq!(
        std::fs::read(served).unwrap(),
        std::fs::read(&s.certs.server_cert).unwrap()
    );
    let cert = CertificateDer::from_pem_file(served).unwrap();
    assert_eq!(tls::end_point_hash(&cert), Some(tls::EndPointHash::Sha384));
    let conn = ReplicationConnection::connect(&s.config("u_scram", Some(SCRAM_PASSWORD), SslMode::VerifyFull))
        .await
        .unwrap();
    assert_eq!(conn.auth_method_used(), AuthMethod::ScramSha256Plus);
    conn.close().await;
}

/// Streaming over TLS with SCRAM-SHA-256-PLUS and a non-superuser role, as in production.
#[tokio::test]
async fn stream_over_tls_with_scram_sha_256_plus() {
    let s = tls_server();
    let db = TestDb::new(s.server).await;
    let cfg = PgConnectionConfig {
        dbname: db.name.clone(),
        ..s.config("u_scram", Some(SCRAM_PASSWORD), SslMode::VerifyFull)
    };
    stream_changes_keepalives_and_standby_status_updates(&db, cfg).await;
}

/// The slot errors over TLS with md5 and a non-superuser role.
#[tokio::test]
async fn slot_errors_over_tls_with_md5() {
    let s = tls_server();
    let db = TestDb::new(s.server).await;
    let cfg = PgConnectionConfig {
        dbname: db.name.clone(),
        ..s.config("u_md5", Some(MD5_PASSWORD), SslMode::Require)
    };
    slot_in_use_missing_and_terminated(&db, cfg).await;
}

#[tokio::test]
async fn invalidated_slot() {
    let server = small_wal_server();
    let db = TestDb::new(server).await;
    let (table, publication, slot) = table_publication_slot(&db, None).await;
    let admin = &db.client;
    // Write more WAL than max_slot_wal_keep_size (1 MB) while the slot is not consumed, then checkpoint.
    let wal_status = eventually("the slot to be invalidated", || async {
        admin
            .batch_execute(&format!(
                "INSERT INTO {table} (v) SELECT repeat('x', 200) FROM generate_series(1, 5000); SELECT pg_switch_wal(); CHECKPOINT;"
            ))
            .await
            .unwrap();
        let (_, _, status) = slot_state(admin, &slot).await;
        (status.as_deref() == Some("lost")).then_some(status)
    })
    .await;
    assert_eq!(wal_status.as_deref(), Some("lost"));

    let conn = ReplicationConnection::connect(&trust(server, &db.name)).await.unwrap();
    let version = conn.parameter("server_version").unwrap_or_default().to_owned();
    let err = conn
        .start_logical_replication(&slot, Lsn::ZERO, &publication)
        .await
        .unwrap_err();
    assert!(err.is_slot_invalidated(), "{err:?}");
    assert!(!err.is_transient() && !err.is_slot_missing() && !err.is_slot_in_use());
    let server_error = err.server_error().unwrap();
    assert_eq!(server_error.code, "55000");
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
        server_error.message,
        format!("{message} \"{slot}\""),
        "server version {version}"
    );
    assert_eq!(server_error.detail.as_deref(), Some(detail), "server version {version}");
    db.drop_slot().await;
}

#[tokio::test]
async fn sql_connections() {
    let s = tls_server();
    let ssl_of = |client: tokio_postgres::Client| async move {
        let row = client
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .unwrap();
        row.get::<_, bool>(0)
    };
    // Unix socket (TLS never attempted), plain TCP, and every TLS mode with SCRAM.
    let admin = connect_sql(&cluster(s.server).unix_socket_config("postgres"))
        .await
        .unwrap();
    assert!(!ssl_of(admin).await);
    let plain = connect_sql(&s.config("u_md5", Some(MD5_PASSWORD), SslMode::Disable))
        .await
        .unwrap();
    assert!(!ssl_of(plain).await);
    for mode in [
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ] {
        let client = connect_sql(&s.config("u_scram", Some(SCRAM_PASSWORD), mode))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert!(ssl_of(client).await, "{mode:?}");
    }
    let err = connect_sql(&s.config("u_scram", Some("wrong"), SslMode::Require))
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    assert!(err.to_string().contains("u_scram@127.0.0.1"), "{err}");
    let wrong_host = PgConnectionConfig {
        host: PgHost::Tcp("127.0.0.2".into()),
        ..s.config("u_scram", Some(SCRAM_PASSWORD), SslMode::VerifyFull)
    };
    let err = connect_sql(&wrong_host).await.unwrap_err();
    assert_eq!(err.sqlstate(), None, "{err}");
    // A root file is used in every TLS mode, as libpq: require and prefer verify the chain too.
    for mode in [SslMode::VerifyCa, SslMode::Require, SslMode::Prefer] {
        let wrong_ca = PgConnectionConfig {
            ssl_root_cert: Some(s.certs.other_ca_cert.clone()),
            ..s.config("u_scram", Some(SCRAM_PASSWORD), mode)
        };
        assert!(connect_sql(&wrong_ca).await.is_err(), "{mode:?}");
    }
    let no_name_check = PgConnectionConfig {
        host: PgHost::Tcp("127.0.0.2".into()),
        ..s.config("u_scram", Some(SCRAM_PASSWORD), SslMode::Require)
    };
    assert!(ssl_of(connect_sql(&no_name_check).await.unwrap()).await);
}

/// `require_auth` and `channel_binding` on both kinds of connection: a server asking for a method
/// that is not allowed is refused before a password is sent; what is allowed still works.
#[tokio::test]
async fn require_auth_and_channel_binding() {
    let s = tls_server();
    let with = |user: &str, password: Option<&str>, mode: SslMode, require: &str, binding: ChannelBindingMode| {
        PgConnectionConfig {
            require_auth: require.parse().unwrap(),
            channel_binding: binding,
            ..s.config(user, password, mode)
        }
    };
    use ChannelBindingMode::{Disable as CbDisable, Prefer as CbPrefer, Require as CbRequire};
    // (user, password, sslmode, require_auth, channel_binding) → refusal text, or the method used.
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        SslMode,
        &'a str,
        ChannelBindingMode,
        Result<AuthMethod, &'a str>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "u_password",
            Some(CLEARTEXT_PASSWORD),
            SslMode::Disable,
            "scram-sha-256",
            CbPrefer,
            Err("asked for password authentication, which require_auth=scram-sha-256 does not allow"),
        ),
        (
            "u_password",
            Some(CLEARTEXT_PASSWORD),
            SslMode::Require,
            "!password",
            CbPrefer,
            Err("require_auth=!password does not allow"),
        ),
        (
            "u_md5",
            Some(MD5_PASSWORD),
            SslMode::Disable,
            "scram-sha-256",
            CbPrefer,
            Err("asked for md5 authentication"),
        ),
        (
            "u_md5",
            Some(MD5_PASSWORD),
            SslMode::Disable,
            "md5,scram-sha-256",
            CbPrefer,
            Ok(AuthMethod::Md5),
        ),
        (
            "u_trust",
            None,
            SslMode::Disable,
            "scram-sha-256",
            CbPrefer,
            Err("did not ask the client to authenticate"),
        ),
        (
            "u_trust",
            None,
            SslMode::Disable,
            "none",
            CbPrefer,
            Ok(AuthMethod::Trust),
        ),
        (
            "u_scram",
            Some(SCRAM_PASSWORD),
            SslMode::Disable,
            "scram-sha-256",
            CbPrefer,
            Ok(AuthMethod::ScramSha256),
        ),
        (
            "u_scram",
            Some(SCRAM_PASSWORD),
            SslMode::Require,
            "scram-sha-256",
            CbRequire,
            Ok(AuthMethod::ScramSha256Plus),
        ),
        (
            "u_scram",
            Some(SCRAM_PASSWORD),
            SslMode::Require,
            "",
            CbDisable,
            Ok(AuthMethod::ScramSha256),
        ),
        (
            "u_scram",
            Some(SCRAM_PASSWORD),
            SslMode::Disable,
            "",
            CbRequire,
            Err("channel"),
        ),
        (
            "u_md5",
            Some(MD5_PASSWORD),
            SslMode::Require,
            "",
            CbRequire,
            Err("channel"),
        ),
        ("u_trust", None, SslMode::Require, "", CbRequire, Err("channel")),
    ];
    for (user, password, mode, require, binding, expected) in cases {
        let cfg = with(user, password, mode, require, binding);
        let label = format!("{user} {mode:?} require_auth={require:?} {binding:?}");
        let replication = ReplicationConnection::connect(&cfg).await;
        let sql = connect_sql(&cfg).await;
        match expected {
            Ok(method) => {
                let conn = replication.unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(conn.auth_method_used(), method, "{label}");
                conn.close().await;
                sql.unwrap_or_else(|e| panic!("SQL {label}: {e}"));
            }
            Err(text) => {
                let err = replication.map(|_| ()).unwrap_err();
                assert!(matches!(err, ReplicationError::Auth { .. }), "{label}: {err:?}");
                assert!(err.to_string().contains(text), "{label}: {err}");
                let err = sql.map(|_| ()).unwrap_err();
                assert!(
                    err.to_string().contains(text)
                        || (text == "channel" && err.to_string().contains("authentication error")),
                    "SQL {label}: {err}"
                );
                assert_eq!(
                    err.sqlstate(),
                    None,
                    "SQL {label}: refused by the client, not the server"
                );
            }
        }
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
        ssl_client_cert: None,
        require_auth: Default::default(),
        channel_binding: Default::default(),
        options: None,
        keepalives: Default::default(),
        more_hosts: Vec::new(),
        target_session_attrs: Default::default(),
    };
    let started = Instant::now();
    let err = ReplicationConnection::connect(&cfg).await.unwrap_err();
    assert!(matches!(err, ReplicationError::Timeout { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(listener);
}

/// libpq's `sslcert`/`sslkey`: a server with `cert` authentication admits the role only with
/// its client certificate, on both kinds of connection.
#[tokio::test]
async fn client_certificates() {
    let certs = TestCerts::generate(Digest::Sha256);
    // The server reads the CA for client certificates from a directory it can reach.
    let ca_dir = std::env::temp_dir().join(format!("relay-client-ca-{}", std::process::id()));
    std::fs::create_dir_all(&ca_dir).unwrap();
    let ca = ca_dir.join("ca.crt");
    std::fs::copy(&certs.ca_cert, &ca).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = crate::support::own_local(
        "local-client-cert",
        LocalClusterOptions {
            settings: vec![
                ("listen_addresses".into(), "127.0.0.1".into()),
                ("ssl_ca_file".into(), ca.display().to_string()),
                ("shared_buffers".into(), "16MB".into()),
            ],
            hba_lines: vec!["hostssl all u_cert 127.0.0.0/8 cert".into()],
            tls: Some(certs.server_tls()),
            remove_with: vec![ca_dir.clone()],
            ..Default::default()
        },
    );
    cluster(server)
        .psql("postgres", "CREATE ROLE u_cert LOGIN REPLICATION")
        .unwrap();
    let (cert, key) = certs.client_cert("u_cert");
    let without = PgConnectionConfig {
        ssl_root_cert: Some(certs.ca_cert.clone()),
        ..config(server, "postgres", "u_cert", None, SslMode::VerifyFull)
    };
    let err = ReplicationConnection::connect(&without).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("28000"), "{err}");
    assert!(connect_sql(&without).await.is_err());
    let with = PgConnectionConfig {
        ssl_client_cert: Some(synapse_account_data_relay::postgres::config::ClientCert { cert, key }),
        // Certificate authentication asks for nothing more.
        require_auth: "none".parse().unwrap(),
        ..without
    };
    let mut conn = ReplicationConnection::connect(&with).await.unwrap();
    assert!(conn.is_tls());
    assert_eq!(conn.auth_method_used(), AuthMethod::Trust);
    assert_eq!(
        conn.identify_system().await.unwrap().dbname.as_deref(),
        Some("postgres")
    );
    conn.close().await;
    let client = connect_sql(&with).await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, bool>(0), row.get::<_, Option<String>>(1)),
        (true, Some("/CN=u_cert".to_owned()))
    );
}

/// libpq's `options` reach the server's session on both kinds of connection.
#[tokio::test]
async fn options_reach_the_session() {
    let s = tls_server();
    let cfg = PgConnectionConfig {
        options: Some("-c statement_timeout=4321".into()),
        ..s.config("u_trust", None, SslMode::Require)
    };
    let mut conn = ReplicationConnection::connect(&cfg).await.unwrap();
    assert_eq!(
        conn.simple_query("SHOW statement_timeout").await.unwrap(),
        vec![vec![Some("4321ms".to_owned())]]
    );
    conn.close().await;
    let client = connect_sql(&cfg).await.unwrap();
    let row = client.query_one("SHOW statement_timeout", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "4321ms");
}
