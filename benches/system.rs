//! System benchmarks of the relay against its physical limit: PostgreSQL's own walsender.
//!
//! ```text
//! cargo bench --bench system                          # everything, full size (about 10 minutes)
//! cargo bench --bench system -- --short               # the small form .ci/run prints (about 1 minute)
//! cargo bench --bench system -- --only drain --changes 1000000 --appservices 1,100
//! cargo bench --bench system -- --only latency --rates 100,1000,10000 --seconds 20
//! cargo bench --bench system -- --only outage --changes 1000000 --keys 100000
//! cargo bench --bench system -- --only backfill --backfill-keys 1000000
//! cargo bench --bench system -- --only explain --explain-rows 1000000
//! cargo bench --bench system -- --only restart --changes 1000000
//! ```
//!
//! Every benchmark runs the release binary of the relay (`target/release/…`, built by `cargo
//! bench`; `RELAY_BENCH_BINARY=path` runs another build, to compare) as a child process against a throw-away PostgreSQL cluster from this machine's
//! binaries (`testkit::LocalCluster`, `fsync=off`), with Synapse's exact tables and an HTTP
//! receiver that answers at once. It prints numbers; it asserts nothing about speed.
//!
//! - **drain**: with the relay stopped, N single-row upsert transactions on `account_data` (one
//!   `COMMIT` each, over N/10 keys) are written; then, on copies of the same slot
//!   (`pg_copy_logical_replication_slot`), `pg_recvlogical` drains one to `/dev/null` (until
//!   `--endpos`), and the relay drains another into the receiver (until the last write's value
//!   arrived at every appservice). Once with one appservice matching every user, once with 100
//!   appservices holding 5,000 namespaces. Wall time, the ratio relay / pg_recvlogical, CPU
//!   seconds of each process, the relay's peak RSS.
//! - **restart**: the drain with one appservice, for a restart after a backlog of distinct keys
//!   (N changes over N keys) and of coalescing keys (N over N/10), beside `pg_recvlogical`'s
//!   decode of the same WAL, until the last key was delivered (the end markers arrived and no
//!   recorded key is left), with the rows the relay wrote to its schema meanwhile (`pending_keys`
//!   inserts and updates, from `pg_stat_user_tables`: zero while the backlog fits
//!   `retention.max_queued_keys`).
//! - **latency**: the relay streaming live while writers commit single-row upserts at a fixed
//!   rate; commit-to-receipt latency from the commit timestamp (`track_commit_timestamp`, read
//!   back with `pg_xact_commit_timestamp`) to the moment the receiver got the request.
//! - **outage**: the one appservice refuses connections while N changes over K keys flow through
//!   the relay live; its peak RSS, and the WAL the slot retained at most.
//! - **backfill**: `--backfill-keys` global keys (users × 10 types) exist before the relay first
//!   runs; the first-opt-in backfill sends them to one appservice, then to two more sharing every
//!   user. Beside it, its limit: `COPY (SELECT … ORDER BY user_id) TO STDOUT` of the same rows.
//!   Wall time until every appservice held every key, relay CPU and peak RSS, the rows written to
//!   the relay's schema (`pg_stat_user_tables`), and the final state checked against the table.
//! - **explain** (only with `--only explain`): `EXPLAIN (ANALYZE, BUFFERS)` of the backfill's
//!   reads with `--explain-rows` rows of `room_account_data` (and of `users_page` before).

#[path = "../tests/integration/support/mod.rs"]
#[allow(unused_macros, unused_imports)]
mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use support::{RegistrationSpec, RelayFiles, RelayProcess, Server, TestDb, own_local};
use synapse_account_data_relay::testkit::LocalClusterOptions;
use tokio::sync::Notify;
use tokio_postgres::Client;

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Options {
    only: Option<Vec<String>>,
    changes: u64,
    keys: Option<u64>,
    rates: Vec<u64>,
    seconds: u64,
    short: bool,
    appservices: Vec<usize>,
    backfill_keys: u64,
    explain_rows: u64,
}

fn parse_options() -> Options {
    let mut o = Options {
        only: None,
        changes: 1_000_000,
        keys: None,
        rates: vec![100, 1_000, 10_000],
        seconds: 20,
        short: false,
        appservices: vec![1, 100],
        backfill_keys: 1_000_000,
        explain_rows: 1_000_000,
    };
    let mut args = std::env::args().skip(1);
    let number = |flag: &str, v: Option<String>| -> u64 {
        v.and_then(|v| v.replace('_', "").parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"))
    };
    let mut changes_given = false;
    let mut backfill_keys_given = false;
    let mut seconds_given = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--short" => o.short = true,
            "--only" => {
                o.only = Some(
                    args.next()
                        .expect("--only needs a list: drain,latency,outage,backfill,explain")
                        .split(',')
                        .map(str::to_owned)
                        .collect(),
                )
            }
            "--changes" => {
                o.changes = number("--changes", args.next());
                changes_given = true;
            }
            "--keys" => o.keys = Some(number("--keys", args.next())),
            "--backfill-keys" => {
                o.backfill_keys = number("--backfill-keys", args.next());
                backfill_keys_given = true;
            }
            "--explain-rows" => o.explain_rows = number("--explain-rows", args.next()),
            "--seconds" => {
                o.seconds = number("--seconds", args.next());
                seconds_given = true;
            }
            "--rates" => {
                o.rates = args
                    .next()
                    .expect("--rates needs a list, e.g. 100,1000")
                    .split(',')
                    .map(|r| number("--rates", Some(r.to_owned())))
                    .collect()
            }
            "--appservices" => {
                o.appservices = args
                    .next()
                    .expect("--appservices needs a list, e.g. 1,100")
                    .split(',')
                    .map(|r| number("--appservices", Some(r.to_owned())) as usize)
                    .collect()
            }
            // What `cargo bench` passes to every bench target.
            "--bench" => {}
            other => panic!(
                "unknown argument {other:?}: --short, --only drain,restart,latency,outage,backfill,explain, --changes N, \
                 --keys N, --rates 100,1000, --seconds S, --appservices 1,100, --backfill-keys N, --explain-rows N"
            ),
        }
    }
    if o.short {
        if !changes_given {
            o.changes = 50_000;
        }
        if !seconds_given {
            o.seconds = 5;
        }
        if !backfill_keys_given {
            o.backfill_keys = 50_000;
        }
    }
    o
}

impl Options {
    fn wants(&self, name: &str) -> bool {
        self.only.as_ref().is_none_or(|l| l.iter().any(|n| n == name))
    }
    /// Only when asked for by name (`--only explain`).
    fn asks_for(&self, name: &str) -> bool {
        self.only.as_ref().is_some_and(|l| l.iter().any(|n| n == name))
    }
    fn keys(&self) -> u64 {
        self.keys.unwrap_or((self.changes / 10).max(1))
    }
}

// ---------------------------------------------------------------------------------------------
// The receiver: answers every PUT at once with `{}`. In drain mode it only looks for the end
// markers; in latency mode it parses the body and notes when each sequence number arrived.

#[derive(Default)]
struct Receiver {
    transactions: AtomicU64,
    bytes: AtomicU64,
    markers: Mutex<HashSet<Vec<u8>>>,
    expected_markers: AtomicU64,
    done: Notify,
    done_at: Mutex<Option<Instant>>,
    record_seqs: std::sync::atomic::AtomicBool,
    /// (sequence number, receipt time in µs since the epoch)
    receipts: Mutex<Vec<(i64, i64)>>,
    /// Keep each key's content (as hashes, see [`hash_of`]) and the time it last changed, to
    /// check the final state against the table and time the last key's arrival (restart rows).
    record_state: std::sync::atomic::AtomicBool,
    state: Mutex<std::collections::HashMap<u64, u64>>,
    last_change_at: Mutex<Option<Instant>>,
}

const MARKER: &[u8] = b"drain-end-";

async fn receive(State(r): State<Arc<Receiver>>, body: Bytes) -> &'static str {
    let now = SystemTime::now();
    r.transactions.fetch_add(1, Ordering::Relaxed);
    r.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    if r.record_seqs.load(Ordering::Relaxed) {
        let micros = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let mut found = Vec::new();
        if let Some(users) = value.get("org.matrix.msc3682.account_data").and_then(|v| v.as_object()) {
            for user in users.values() {
                for event in user.get("events").and_then(|e| e.as_array()).into_iter().flatten() {
                    if let Some(seq) = event.pointer("/content/seq").and_then(|s| s.as_i64()) {
                        found.push((seq, micros));
                    }
                }
            }
        }
        r.receipts.lock().unwrap_or_else(|e| e.into_inner()).extend(found);
    }
    if r.record_state.load(Ordering::Relaxed) {
        let parsed: RawBody<'_> = serde_json::from_slice(&body).unwrap_or_default();
        let mut state = r.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for (user, data) in &parsed.account_data {
            for e in &data.events {
                let content = hash_of(&[e.content.get()]);
                changed |= state.insert(hash_of(&[user, e.data_type]), content) != Some(content);
            }
        }
        if changed {
            *r.last_change_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }
    let mut start = 0;
    while let Some(at) = find(&body[start..], MARKER) {
        let from = start + at + MARKER.len();
        let end = body[from..]
            .iter()
            .position(|b| !b.is_ascii_digit())
            .map_or(body.len(), |p| from + p);
        let mut markers = r.markers.lock().unwrap_or_else(|e| e.into_inner());
        markers.insert(body[from..end].to_vec());
        if markers.len() as u64 == r.expected_markers.load(Ordering::Relaxed) {
            let mut done_at = r.done_at.lock().unwrap_or_else(|e| e.into_inner());
            if done_at.is_none() {
                *done_at = Some(Instant::now());
                r.done.notify_waiters();
            }
        }
        start = end;
    }
    "{}"
}

/// A transaction body's global account data, contents left as raw JSON text (the relay never
/// re-serialises them, so they compare equal to the table's text).
#[derive(serde::Deserialize, Default)]
struct RawBody<'a> {
    #[serde(rename = "org.matrix.msc3682.account_data", borrow, default)]
    account_data: std::collections::HashMap<&'a str, RawEvents<'a>>,
}

#[derive(serde::Deserialize)]
struct RawEvents<'a> {
    #[serde(borrow)]
    events: Vec<RawEvent<'a>>,
}

#[derive(serde::Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "type", borrow)]
    data_type: &'a str,
    #[serde(borrow)]
    content: &'a serde_json::value::RawValue,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn start_receiver() -> (Arc<Receiver>, SocketAddr) {
    let r = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route("/{*path}", axum::routing::put(receive))
        .with_state(r.clone());
    let (addr, _serving) = serve_receiver(app).await;
    (r, addr)
}

/// Serves `app` on a free port of 127.0.0.1 until the returned task is aborted.
async fn serve_receiver(app: axum::Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let addr = listener.local_addr().expect("receiver address");
    let serving = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, serving)
}

impl Receiver {
    fn reset(&self, expected_markers: u64) {
        self.markers.lock().unwrap_or_else(|e| e.into_inner()).clear();
        *self.done_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.expected_markers.store(expected_markers, Ordering::Relaxed);
        self.transactions.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clear();
        *self.last_change_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    async fn wait_done(&self, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.done.notified();
            if let Some(t) = *self.done_at.lock().unwrap_or_else(|e| e.into_inner()) {
                return Some(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes: CPU seconds and peak RSS from /proc.

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of a running process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; here 11 and 12 (state is the first).
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// Peak resident set size (VmHWM) of a running process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// Database helpers

fn cluster(settings: &[(&str, &str)]) -> &'static Server {
    let mut options = LocalClusterOptions::default();
    for (k, v) in [("max_wal_size", "4GB"), ("shared_buffers", "256MB")]
        .iter()
        .chain(settings)
    {
        options.settings.push((k.to_string(), v.to_string()));
    }
    own_local("bench", options)
}

/// N single-row upsert transactions (one COMMIT each) on `account_data`, as Synapse writes them,
/// over `keys` users; the last write of each of `markers` users carries `drain-end-<i>`.
/// Returns the WAL position after the last commit.
async fn write_upserts(c: &Client, changes: u64, keys: u64, user_of: &str, markers: &str) -> String {
    // One procedure call writes everything, so the writer is never what limits the rate.
    c.batch_execute(&format!(
        "CREATE OR REPLACE PROCEDURE bench_write(n bigint, k bigint) LANGUAGE plpgsql AS $$
         DECLARE u text; BEGIN
           FOR i IN 0 .. n - 1 LOOP
             u := {user_of};
             INSERT INTO account_data (user_id, account_data_type, stream_id, content)
               VALUES (u, 'org.example.bench', nextval('account_data_sequence'),
                       '{{\"seq\":' || i || ',\"pad\":\"' || repeat('x', 100) || '\"}}')
               ON CONFLICT (user_id, account_data_type) DO UPDATE
               SET stream_id = EXCLUDED.stream_id, content = EXCLUDED.content;
             COMMIT;
           END LOOP;
         END $$;
         CREATE OR REPLACE PROCEDURE bench_markers() LANGUAGE plpgsql AS $$
         DECLARE u text; i bigint; BEGIN
           FOR i, u IN {markers} LOOP
             INSERT INTO account_data (user_id, account_data_type, stream_id, content)
               VALUES (u, 'org.example.bench.end', nextval('account_data_sequence'),
                       '{{\"end\":\"drain-end-' || i || '\"}}')
               ON CONFLICT (user_id, account_data_type) DO UPDATE
               SET stream_id = EXCLUDED.stream_id, content = EXCLUDED.content;
             COMMIT;
           END LOOP;
         END $$;"
    ))
    .await
    .expect("bench procedures");
    c.batch_execute(&format!("CALL bench_write({changes}, {keys})"))
        .await
        .expect("bench writes");
    c.batch_execute("CALL bench_markers()").await.expect("bench markers");
    c.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("wal position")
        .get(0)
}

async fn retained_wal(c: &Client, slot: &str) -> i64 {
    c.query_opt(
        "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .ok()
    .flatten()
    .and_then(|r| r.get::<_, Option<i64>>(0))
    .unwrap_or(0)
}

async fn copy_slot(c: &Client, from: &str, to: &str) {
    c.execute("SELECT pg_copy_logical_replication_slot($1, $2)", &[&from, &to])
        .await
        .unwrap_or_else(|e| panic!("copying slot {from} to {to}: {e}"));
}

async fn drop_slot(c: &Client, slot: &str) {
    let _ = c
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
}

fn setup(files: &RelayFiles) {
    let out = files.command("setup", &[]);
    assert!(out.status.success(), "setup failed:\n{}", support::text(&out));
}

/// Point the relay's config at another slot name.
fn use_slot(files: &RelayFiles, slot: &str) {
    let path = files.path().join("relay.toml");
    let text = std::fs::read_to_string(&path).expect("relay.toml");
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("slot_name") {
            out.push_str(&format!("slot_name = \"{slot}\"\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(&path, out).expect("relay.toml");
}

/// The relay logs warnings only (`RELAY_BENCH_LOG` sets another `RUST_LOG` filter, e.g.
/// `synapse_account_data_relay::delivery=debug` to see each live step's timings).
fn spawn_relay(files: &RelayFiles) -> RelayProcess {
    let filter = std::env::var("RELAY_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned());
    files.spawn_run_with(&[("RUST_LOG", &filter)], &[])
}

/// Files for one opted-in appservice at `url` interested in every user, after `setup`.
fn one_appservice(db: &TestDb, url: &str) -> RelayFiles {
    let files = RelayFiles::new(
        db,
        &[RegistrationSpec {
            id: "as0",
            url: Some(url),
            hs_token: "hs_bench",
            sender_localpart: "bot0",
            user_regexes: &["@.*:example\\.org"],
            opt_in: true,
        }],
        RELAY_TOML_EXTRA,
    );
    setup(&files);
    files
}

const RELAY_TOML_EXTRA: &str = "backfill_new_appservices = false\n";

// ---------------------------------------------------------------------------------------------
// drain

#[derive(Debug)]
struct DrainRow {
    label: String,
    changes: u64,
    recvlogical_wall: f64,
    recvlogical_cpu: f64,
    relay_wall: f64,
    relay_cpu: f64,
    relay_rss: f64,
    transactions: u64,
    keys: u64,
    /// Rows inserted or updated in the relay's `pending_keys` during the relay's run.
    rows_written: i64,
    /// Restart rows: whether the receiver ended with the table's state.
    state_ok: bool,
}

/// Rows inserted or updated in `pending_keys` so far (a backend's statistics are flushed when it
/// exits, at the latest).
async fn pending_keys_writes(c: &Client) -> i64 {
    c.query_one(
        "SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0)::bigint FROM pg_stat_user_tables \
         WHERE schemaname = 'synapse_account_data_relay' AND relname = 'pending_keys'",
        &[],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(-1)
}

/// `until_empty`: the run ends when the end markers arrived *and* the relay's `pending_keys` is
/// empty (every recorded key delivered: a drain in key order may send a marker before the rest).
async fn drain(
    until_empty: bool,
    changes: u64,
    keys: u64,
    server: &'static Server,
    appservices: usize,
    receiver: &Arc<Receiver>,
    addr: SocketAddr,
) -> DrainRow {
    let db = TestDb::new(server).await;
    let url = format!("http://{addr}");
    let namespaces_per = if appservices == 1 { 1 } else { 5_000 / appservices };
    let ids: Vec<String> = (0..appservices).map(|a| format!("as{a}")).collect();
    let senders: Vec<String> = (0..appservices).map(|a| format!("bot{a}")).collect();
    let regexes: Vec<Vec<String>> = (0..appservices)
        .map(|a| {
            if appservices == 1 {
                vec!["@.*:example\\.org".to_owned()]
            } else {
                (0..namespaces_per)
                    .map(|j| format!("@b{a}n{j}_.*:example\\.org"))
                    .collect()
            }
        })
        .collect();
    let regex_refs: Vec<Vec<&str>> = regexes.iter().map(|v| v.iter().map(String::as_str).collect()).collect();
    let specs: Vec<RegistrationSpec<'_>> = (0..appservices)
        .map(|a| RegistrationSpec {
            id: &ids[a],
            url: Some(&url),
            hs_token: "hs_bench",
            sender_localpart: &senders[a],
            user_regexes: &regex_refs[a],
            opt_in: true,
        })
        .collect();
    let files = RelayFiles::new(&db, &specs, RELAY_TOML_EXTRA);
    setup(&files);
    // Users: with one appservice `@u<k>`; with 100, user k belongs to appservice k % 100 and to
    // its namespace (k / 100) % 50.
    let (user_of, markers) = if appservices == 1 {
        (
            "'@u' || (i % k) || ':example.org'".to_owned(),
            "SELECT 0::bigint, '@u0:example.org'".to_owned(),
        )
    } else {
        let a = appservices;
        let n = namespaces_per;
        (
            format!("'@b' || (i % k) % {a} || 'n' || ((i % k) / {a}) % {n} || '_' || (i % k) || ':example.org'"),
            format!(
                "SELECT g::bigint, '@b' || g || 'n0_end:example.org' FROM generate_series(0, {}) g",
                a - 1
            ),
        )
    };
    let started = Instant::now();
    let end_lsn = write_upserts(&db.client, changes, keys, &user_of, &markers).await;
    eprintln!(
        "  drain ({appservices} appservice(s)): wrote {} changes over {keys} keys in {:.1}s, WAL {} MiB",
        changes,
        started.elapsed().as_secs_f64(),
        retained_wal(&db.client, &db.name).await / (1 << 20)
    );

    // pg_recvlogical on a copy of the slot.
    let copy_a = format!("{}_recvlogical", db.name);
    copy_slot(&db.client, &db.name, &copy_a).await;
    let bindir = server
        .local
        .as_ref()
        .map(|c| c.bindir().to_path_buf())
        .expect("local cluster");
    let t = Instant::now();
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#""$@" && times"#)
        .arg("bash")
        .arg(bindir.join("pg_recvlogical"))
        .args([
            "-d",
            &server.connection_string(&db.name),
            "-S",
            &copy_a,
            "--start",
            "-E",
            &end_lsn,
        ])
        .args(["-o", "proto_version=1", "-o", &format!("publication_names={}", db.name)])
        .args(["-f", "/dev/null", "-s", "1", "--no-loop"])
        .stderr(Stdio::inherit())
        .output()
        .expect("pg_recvlogical");
    let recvlogical_wall = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "pg_recvlogical failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let times = String::from_utf8_lossy(&out.stdout);
    // `times`: the shell's own user and system time, then its children's.
    let recvlogical_cpu = times
        .lines()
        .nth(1)
        .map(|l| l.split_whitespace().map(parse_times).sum())
        .unwrap_or(0.0);
    drop_slot(&db.client, &copy_a).await;

    // The relay on another copy.
    let copy_b = format!("{}_relay", db.name);
    copy_slot(&db.client, &db.name, &copy_b).await;
    use_slot(&files, &copy_b);
    receiver.reset(appservices as u64);
    receiver.record_state.store(until_empty, Ordering::Relaxed);
    let writes_before = pending_keys_writes(&db.client).await;
    let t = Instant::now();
    let mut relay = spawn_relay(&files);
    let done = receiver.wait_done(Duration::from_secs(1800)).await;
    let pid = relay.pid().expect("relay pid");
    let mut relay_cpu = cpu_seconds(pid);
    let mut relay_rss = peak_rss_mib(pid);
    let Some(done) = done else {
        panic!(
            "the relay did not deliver the end markers; its log:\n{}",
            relay.log_text()
        );
    };
    let mut relay_wall = done.duration_since(t).as_secs_f64();
    if until_empty {
        loop {
            let left: i64 = db
                .client
                .query_one("SELECT count(*) FROM synapse_account_data_relay.pending_keys", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(-1);
            if left == 0 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(1800), "recorded keys never drained");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        relay_wall = relay_wall.max(t.elapsed().as_secs_f64());
    }
    let mut state_ok = true;
    if until_empty {
        // Wait until the receiver holds the table's state (it may already), and time the last
        // key's arrival: the last receipt that changed what the receiver holds.
        let expected = expected_state(&db.client).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            state_ok = *receiver.state.lock().unwrap_or_else(|e| e.into_inner()) == expected;
            if state_ok || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(last) = *receiver.last_change_at.lock().unwrap_or_else(|e| e.into_inner()) {
            relay_wall = relay_wall.max(last.duration_since(t).as_secs_f64());
        }
        receiver.record_state.store(false, Ordering::Relaxed);
        // Why anything was written to the relay's schema, if it was.
        for l in relay.log_text().lines().filter(|l| l.contains(" WARN ")).take(5) {
            eprintln!("  relay: {l}");
        }
        if let Ok(path) = std::env::var("RELAY_BENCH_LOG_COPY") {
            let _ = std::fs::write(&path, relay.log_text());
        }
        relay_cpu = cpu_seconds(pid);
        relay_rss = peak_rss_mib(pid);
    }
    relay.terminate();
    // The relay's backends have exited: their statistics are in.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rows_written = pending_keys_writes(&db.client).await - writes_before;
    drop_slot(&db.client, &copy_b).await;
    DrainRow {
        label: format!(
            "{appservices} appservice(s), {} namespaces",
            appservices * namespaces_per
        ),
        changes,
        keys,
        rows_written,
        state_ok,
        recvlogical_wall,
        recvlogical_cpu,
        relay_wall,
        relay_cpu,
        relay_rss,
        transactions: receiver.transactions.load(Ordering::Relaxed),
    }
}

/// `1m2.345s` → seconds.
fn parse_times(s: &str) -> f64 {
    let s = s.trim_end_matches('s');
    match s.split_once('m') {
        Some((m, sec)) => m.parse::<f64>().unwrap_or(0.0) * 60.0 + sec.parse::<f64>().unwrap_or(0.0),
        None => s.parse().unwrap_or(0.0),
    }
}

// ---------------------------------------------------------------------------------------------
// latency

#[derive(Debug)]
struct LatencyRow {
    rate: u64,
    written: usize,
    received: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

async fn latency(
    o: &Options,
    server: &'static Server,
    rate: u64,
    receiver: &Arc<Receiver>,
    addr: SocketAddr,
) -> LatencyRow {
    let db = TestDb::new(server).await;
    let files = one_appservice(&db, &format!("http://{addr}"));
    receiver.reset(u64::MAX);
    receiver.receipts.lock().unwrap_or_else(|e| e.into_inner()).clear();
    receiver.record_seqs.store(true, Ordering::Relaxed);
    let mut relay = spawn_relay(&files);
    // Wait until it streams: a first write must come through.
    db.client
        .execute(
            "INSERT INTO account_data (user_id, account_data_type, stream_id, content) \
             VALUES ('@warmup:example.org', 'x', nextval('account_data_sequence'), '{\"seq\":-1}')",
            &[],
        )
        .await
        .expect("warm-up write");
    let t = Instant::now();
    while !receiver
        .receipts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|r| r.0 == -1)
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the relay did not start streaming; its log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Writers: each commits at rate / writers per second, on a schedule (missed ticks burst).
    let writers = (rate / 500).clamp(1, 16);
    let total = rate * o.seconds;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let c = db.connect().await;
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let stmt = c
                .prepare(
                    "INSERT INTO account_data (user_id, account_data_type, stream_id, content) \
                     VALUES ($1, 'org.example.latency', nextval('account_data_sequence'), $2) \
                     ON CONFLICT (user_id, account_data_type) DO UPDATE \
                     SET stream_id = EXCLUDED.stream_id, content = EXCLUDED.content RETURNING xmin::text",
                )
                .await
                .expect("prepare");
            let mut tick = tokio::time::interval(Duration::from_secs_f64(writers as f64 / rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut xids = Vec::new();
            loop {
                tick.tick().await;
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= total {
                    break;
                }
                let user = format!("@l{}:example.org", seq % 200_000);
                let content = format!("{{\"seq\":{seq}}}");
                let row = c.query_one(&stmt, &[&user, &content]).await.expect("write");
                xids.push((seq as i64, row.get::<_, String>(0)));
            }
            xids
        }));
    }
    let mut xids = Vec::new();
    for t in tasks {
        xids.extend(t.await.expect("writer"));
    }
    let (seqs, xid_texts): (Vec<i64>, Vec<String>) = xids.into_iter().unzip();
    let commits: std::collections::HashMap<i64, i64> = db
        .client
        .query(
            "SELECT s, (extract(epoch FROM pg_xact_commit_timestamp(x::xid)) * 1000000)::bigint \
             FROM unnest($1::bigint[], $2::text[]) AS t(s, x)",
            &[&seqs, &xid_texts],
        )
        .await
        .expect("commit timestamps")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Let the last ones arrive.
    let t = Instant::now();
    while receiver.receipts.lock().unwrap_or_else(|e| e.into_inner()).len() < commits.len() + 1
        && t.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    receiver.record_seqs.store(false, Ordering::Relaxed);
    relay.terminate();
    let mut latencies: Vec<f64> = receiver
        .receipts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|(seq, at)| commits.get(seq).map(|c| (at - c) as f64 / 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    LatencyRow {
        rate,
        written: commits.len(),
        received: latencies.len(),
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
    }
}

// ---------------------------------------------------------------------------------------------
// outage

#[derive(Debug)]
struct OutageRow {
    changes: u64,
    keys: u64,
    seconds: f64,
    relay_rss: f64,
    relay_cpu: f64,
    max_retained_mib: f64,
    recorded_keys: i64,
    /// Rows inserted or updated in `pending_keys` (each key once, however often it changed).
    rows_written: i64,
}

async fn outage(o: &Options, server: &'static Server) -> OutageRow {
    let db = TestDb::new(server).await;
    // A port nothing listens on: connection refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let files = one_appservice(&db, &url);
    let writes_before = pending_keys_writes(&db.client).await;
    let mut relay = spawn_relay(&files);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let keys = o.keys();
    let max_retained = Arc::new(AtomicU64::new(0));
    let sampler = {
        let c = db.connect().await;
        let slot = db.name.clone();
        let max = max_retained.clone();
        tokio::spawn(async move {
            loop {
                let r = retained_wal(&c, &slot).await;
                max.fetch_max(r.max(0) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let t = Instant::now();
    let end_lsn = write_upserts(
        &db.client,
        o.changes,
        keys,
        "'@u' || (i % k) || ':example.org'",
        "SELECT 0::bigint, '@u0:example.org'",
    )
    .await;
    // Until the walsender sent everything to the relay (which keeps it queued or recorded: the
    // appservice is down), and a moment for the relay to take it in.
    loop {
        let row = db
            .client
            .query_one(
                "SELECT coalesce(bool_or(r.sent_lsn >= $1::text::pg_lsn), false) FROM pg_stat_replication r \
                 JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $2",
                &[&end_lsn, &db.name],
            )
            .await
            .expect("slot");
        if row.get::<_, bool>(0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3600),
            "the walsender never sent the writes; relay log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sampler.abort();
    let pid = relay.pid().expect("pid");
    let relay_rss = peak_rss_mib(pid);
    let relay_cpu = cpu_seconds(pid);
    let recorded_keys: i64 = db
        .client
        .query_one("SELECT count(*) FROM synapse_account_data_relay.pending_keys", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    relay.terminate();
    // The relay's backends have exited: their statistics are in.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rows_written = pending_keys_writes(&db.client).await - writes_before;
    OutageRow {
        changes: o.changes,
        keys,
        seconds,
        relay_rss,
        relay_cpu,
        max_retained_mib: max_retained.load(Ordering::Relaxed) as f64 / (1u64 << 20) as f64,
        recorded_keys,
        rows_written,
    }
}

// ---------------------------------------------------------------------------------------------
// backfill

/// A receiver for backfills: one state per appservice (`/as<i>/…` in the URL), each key's
/// content kept as a hash of its raw JSON text (the relay sends it as stored), so the final state can be checked against the
/// tables without holding a million values.
struct BackfillReceiver {
    states: Vec<Mutex<std::collections::HashMap<u64, u64>>>,
    expected: u64,
    done_at: Mutex<Vec<Option<Instant>>>,
    transactions: AtomicU64,
}

fn hash_of(parts: &[&str]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

async fn receive_backfill(
    State(r): State<Arc<BackfillReceiver>>,
    axum::extract::Path(path): axum::extract::Path<String>,
    body: Bytes,
) -> &'static str {
    r.transactions.fetch_add(1, Ordering::Relaxed);
    let Some(i) = path
        .strip_prefix("as")
        .and_then(|p| p.split('/').next())
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|i| *i < r.states.len())
    else {
        return "{}";
    };
    // The relay never re-serialises content: compare the raw text with the table's.
    let parsed: RawBody<'_> = serde_json::from_slice(&body).unwrap_or_default();
    let mut state = r.states[i].lock().unwrap_or_else(|e| e.into_inner());
    for (user, data) in &parsed.account_data {
        for e in &data.events {
            state.insert(hash_of(&[user, e.data_type]), hash_of(&[e.content.get()]));
        }
    }
    if state.len() as u64 >= r.expected {
        let mut done = r.done_at.lock().unwrap_or_else(|e| e.into_inner());
        if done[i].is_none() {
            done[i] = Some(Instant::now());
        }
    }
    "{}"
}

#[derive(Debug)]
struct BackfillRow {
    appservices: usize,
    keys: u64,
    copy_wall: f64,
    relay_wall: f64,
    relay_cpu: f64,
    relay_rss: f64,
    rows_written: i64,
    transactions: u64,
    state_ok: bool,
}

/// Rows inserted, updated and deleted in the relay's schema so far (the relay's backend reports
/// its counts when it exits).
async fn relay_schema_writes(c: &Client) -> i64 {
    c.query_one(
        "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint FROM pg_stat_user_tables \
         WHERE schemaname = 'synapse_account_data_relay'",
        &[],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(-1)
}

/// `COPY (SELECT … ORDER BY user_id) TO STDOUT` of the backfilled rows through psql into
/// /dev/null: the same rows read in the same order, at PostgreSQL's speed.
fn copy_ordered(server: &Server, db: &TestDb) -> f64 {
    let bindir = server
        .local
        .as_ref()
        .map(|c| c.bindir().to_path_buf())
        .expect("local cluster");
    let t = Instant::now();
    let out = Command::new(bindir.join("psql"))
        .args(["-X", "-q", "-d", &server.connection_string(&db.name), "-c"])
        .arg("COPY (SELECT user_id, account_data_type, content FROM account_data ORDER BY user_id, account_data_type) TO STDOUT")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .expect("psql");
    assert!(out.success(), "psql COPY failed");
    t.elapsed().as_secs_f64()
}

/// The final state the appservices must hold: every row of account_data, as key and content hashes.
async fn expected_state(c: &Client) -> std::collections::HashMap<u64, u64> {
    use futures_util::TryStreamExt;
    let rows = c
        .query_raw(
            "SELECT user_id, account_data_type, content FROM account_data",
            std::iter::empty::<i32>(),
        )
        .await
        .expect("read account_data");
    futures_util::pin_mut!(rows);
    let mut out = std::collections::HashMap::new();
    while let Some(r) = rows.try_next().await.expect("row") {
        out.insert(hash_of(&[r.get(0), r.get(1)]), hash_of(&[r.get(2)]));
    }
    out
}

/// `keys` global keys (keys / 10 users × 10 types) written before the relay ever ran; then the
/// relay starts and the first opt-in backfill sends them: once to one appservice, then to two
/// more that share every user.
async fn backfill(o: &Options, server: &'static Server) -> Vec<BackfillRow> {
    let db = TestDb::new(server).await;
    let users = (o.backfill_keys / 10).max(1);
    let t = Instant::now();
    db.client
        .batch_execute(&format!(
            "INSERT INTO account_data (user_id, account_data_type, stream_id, content) \
               SELECT '@u' || u || ':example.org', 'org.example.t' || t, nextval('account_data_sequence'), \
                      '{{\"n\":' || (u * 10 + t) || ',\"pad\":\"' || repeat('x', 100) || '\"}}' \
               FROM generate_series(0, {users} - 1) u, generate_series(0, 9) t"
        ))
        .await
        .expect("backfill rows");
    db.client
        .batch_execute("VACUUM ANALYZE account_data")
        .await
        .expect("vacuum");
    let keys = users * 10;
    eprintln!(
        "  backfill: wrote {keys} keys ({users} users × 10 types) in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let expected = expected_state(&db.client).await;
    let mut rows = Vec::new();
    let mut first_id = 0;
    for appservices in [1usize, 2] {
        let ids: Vec<String> = (first_id..first_id + appservices).map(|a| format!("as{a}")).collect();
        first_id += appservices;
        let receiver = Arc::new(BackfillReceiver {
            states: (0..first_id).map(|_| Mutex::default()).collect(),
            expected: keys,
            done_at: Mutex::new(vec![None; first_id]),
            transactions: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::put(receive_backfill))
            .with_state(receiver.clone());
        let (addr, serving) = serve_receiver(app).await;
        let urls: Vec<String> = ids.iter().map(|id| format!("http://{addr}/{id}")).collect();
        let senders: Vec<String> = ids.iter().map(|id| format!("bot_{id}")).collect();
        let specs: Vec<RegistrationSpec<'_>> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| RegistrationSpec {
                id,
                url: Some(&urls[i]),
                hs_token: "hs_bench",
                sender_localpart: &senders[i],
                user_regexes: &["@.*:example\\.org"],
                opt_in: true,
            })
            .collect();
        // The rows predate the slot: only the first-opt-in backfill sends them.
        let files = RelayFiles::new(&db, &specs, "");
        setup(&files);
        // Warm the cache for both, then the limit.
        copy_ordered(server, &db);
        let copy_wall = copy_ordered(server, &db);
        let writes_before = relay_schema_writes(&db.client).await;
        let bench_cpu_before = cpu_seconds(std::process::id());
        let t = Instant::now();
        let mut relay = files.spawn_run_with(&[("RUST_LOG", "warn,synapse_account_data_relay::delivery=info")], &[]);
        let deadline = t + Duration::from_secs(1800);
        let range = first_id - appservices..first_id;
        let done = loop {
            let done = receiver.done_at.lock().unwrap_or_else(|e| e.into_inner())[range.clone()]
                .iter()
                .copied()
                .collect::<Option<Vec<Instant>>>();
            if let Some(d) = done {
                break d.into_iter().max();
            }
            if Instant::now() > deadline || !relay.is_running() {
                panic!("the backfill did not complete; the relay's log:\n{}", relay.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let relay_wall = done.map_or(f64::NAN, |d| d.duration_since(t).as_secs_f64());
        let pid = relay.pid().expect("relay pid");
        let relay_cpu = cpu_seconds(pid);
        let relay_rss = peak_rss_mib(pid);
        eprintln!(
            "  backfill ({appservices} appservice(s)): the benchmark's receiver used {:.2} s of CPU",
            cpu_seconds(std::process::id()) - bench_cpu_before
        );
        for line in relay.log_text().lines().filter(|l| l.contains("backfill complete")) {
            eprintln!("  backfill ({appservices} appservice(s)): {line}");
        }
        relay.terminate();
        // Let the relay's backends report their counts.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let rows_written = relay_schema_writes(&db.client).await - writes_before;
        let state_ok = range
            .clone()
            .all(|i| *receiver.states[i].lock().unwrap_or_else(|e| e.into_inner()) == expected);
        serving.abort();
        rows.push(BackfillRow {
            appservices,
            keys,
            copy_wall,
            relay_wall,
            relay_cpu,
            relay_rss,
            rows_written,
            transactions: receiver.transactions.load(Ordering::Relaxed),
            state_ok,
        });
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// explain: the plans of the backfill's reads on `--explain-rows` rows of room_account_data

async fn explain(o: &Options, server: &'static Server) {
    use synapse_account_data_relay::resync::backfill::{ROOMS_PAGE_SQL, USERS_PAGE_SQL};
    let db = TestDb::new(server).await;
    let users = (o.explain_rows / 100).max(1);
    let t = Instant::now();
    db.client
        .batch_execute(&format!(
            "INSERT INTO room_account_data (user_id, room_id, account_data_type, stream_id, content) \
               SELECT '@u' || lpad(u::text, 7, '0') || ':example.org', '!room' || r || ':example.org', 'm.fully_read', \
                      nextval('account_data_sequence'), '{{\"event_id\":\"$e' || r || '\"}}' \
               FROM generate_series(1, {users}) u, generate_series(1, 100) r; \
             INSERT INTO account_data (user_id, account_data_type, stream_id, content) \
               SELECT '@u' || lpad(u::text, 7, '0') || ':example.org', 'm.direct', nextval('account_data_sequence'), '{{}}' \
               FROM generate_series(1, {users}) u"
        ))
        .await
        .expect("explain rows");
    db.client
        .batch_execute("VACUUM ANALYZE room_account_data, account_data")
        .await
        .expect("vacuum");
    eprintln!(
        "  explain: wrote {} room_account_data rows ({users} users × 100 rooms) in {:.1}s",
        users * 100,
        t.elapsed().as_secs_f64()
    );
    let middle = format!("'@u{:07}:example.org'", users / 2);
    let old_users_page = "SELECT user_id FROM (SELECT user_id FROM account_data WHERE user_id > $1 \
                          UNION SELECT user_id FROM room_account_data WHERE user_id > $1 \
                          UNION SELECT user_id FROM room_tags_revisions WHERE user_id > $1) AS u \
                          ORDER BY user_id LIMIT $2";
    let cases = [
        (
            "backfill page of room_account_data (1,000 rows after the middle)",
            ROOMS_PAGE_SQL,
            "text, text, text, bigint",
            format!("{middle}, '!room50:example.org', 'm.fully_read', 1000"),
        ),
        (
            "users page (1,000 users after the middle)",
            USERS_PAGE_SQL,
            "text, bigint",
            format!("{middle}, 1000"),
        ),
        (
            "users page before (1,000 users after the middle)",
            old_users_page,
            "text, bigint",
            format!("{middle}, 1000"),
        ),
    ];
    for (label, sql, types, args) in cases {
        db.client
            .batch_execute(&format!("DEALLOCATE ALL; PREPARE q({types}) AS {sql}"))
            .await
            .expect("prepare");
        // Once to warm the cache, then the plan shown.
        for round in 0..2 {
            let plan = db
                .client
                .simple_query(&format!("EXPLAIN (ANALYZE, BUFFERS) EXECUTE q({args})"))
                .await
                .expect("explain");
            if round == 1 {
                println!();
                println!("explain: {label}");
                for m in plan {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                        println!("    {}", r.get(0).unwrap_or(""));
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let o = parse_options();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let server = cluster(&[("track_commit_timestamp", "on")]);
        let (receiver, addr) = start_receiver().await;
        println!(
            "machine: {} cores; PostgreSQL {}; relay: {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            server.local.as_ref().map_or("?", |c| c.version()),
            support::relay_binary().display()
        );
        if o.wants("drain") {
            let mut rows = Vec::new();
            for &appservices in &o.appservices {
                rows.push(drain(false, o.changes, o.keys(), server, appservices, &receiver, addr).await);
            }
            println!();
            println!("| drain | changes | pg_recvlogical wall | relay wall | relay / pg_recvlogical | pg_recvlogical CPU | relay CPU | relay peak RSS | transactions |");
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            for r in &rows {
                println!(
                    "| {} | {} | {:.2} s | {:.2} s | {:.2} | {:.2} s | {:.2} s | {:.1} MiB | {} |",
                    r.label,
                    r.changes,
                    r.recvlogical_wall,
                    r.relay_wall,
                    r.relay_wall / r.recvlogical_wall,
                    r.recvlogical_cpu,
                    r.relay_cpu,
                    r.relay_rss,
                    r.transactions
                );
            }
        }
        if o.wants("restart") {
            // Distinct keys, then coalescing keys (ten changes per key).
            // The short form's backlog fits `retention.max_queued_keys` (20,000).
            let n = if o.short { 10_000 } else { o.changes };
            let mut rows = Vec::new();
            for (what, keys) in [("distinct keys", n), ("coalescing keys", (n / 10).max(1))] {
                let mut r = drain(true, n, keys, server, 1, &receiver, addr).await;
                r.label = what.to_owned();
                rows.push(r);
            }
            println!();
            println!("| restart | changes | keys | pg_recvlogical wall | relay wall | relay / pg_recvlogical | relay CPU | relay peak RSS | rows written to the relay's schema | final state |");
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
            for r in &rows {
                println!(
                    "| {} | {} | {} | {:.2} s | {:.2} s | {:.2} | {:.2} s | {:.1} MiB | {} | {} |",
                    r.label,
                    r.changes,
                    r.keys,
                    r.recvlogical_wall,
                    r.relay_wall,
                    r.relay_wall / r.recvlogical_wall,
                    r.relay_cpu,
                    r.relay_rss,
                    r.rows_written,
                    if r.state_ok { "matches the table" } else { "MISMATCH" }
                );
            }
        }
        if o.wants("latency") {
            let mut rows = Vec::new();
            for &rate in &o.rates {
                rows.push(latency(&o, server, rate, &receiver, addr).await);
            }
            println!();
            println!("| latency | seconds | written | received | p50 | p99 | max |");
            println!("|---|---:|---:|---:|---:|---:|---:|");
            for r in &rows {
                println!(
                    "| {}/s | {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
                    r.rate, o.seconds, r.written, r.received, r.p50_ms, r.p99_ms, r.max_ms
                );
            }
        }
        if o.wants("outage") {
            let r = outage(&o, server).await;
            println!();
            println!("| outage | changes | keys | time to stream them | relay peak RSS | relay CPU | max retained WAL | keys recorded | rows written to the relay's schema |");
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            println!(
                "| one appservice refusing connections | {} | {} | {:.1} s | {:.1} MiB | {:.2} s | {:.1} MiB | {} | {} |",
                r.changes, r.keys, r.seconds, r.relay_rss, r.relay_cpu, r.max_retained_mib, r.recorded_keys, r.rows_written
            );
        }
        if o.wants("backfill") {
            let rows = backfill(&o, server).await;
            println!();
            println!("| backfill (first opt-in) | keys | COPY ordered by user | relay wall | relay / COPY | vs 1 appservice | relay CPU | relay peak RSS | rows written to the relay's schema | transactions | final state |");
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
            let one = rows.first().map_or(f64::NAN, |r| r.relay_wall);
            for r in &rows {
                println!(
                    "| {} appservice(s){} | {} | {:.2} s | {:.2} s | {:.1} | {:.2} | {:.2} s | {:.1} MiB | {} | {} | {} |",
                    r.appservices,
                    if r.appservices > 1 { " sharing the users" } else { "" },
                    r.keys,
                    r.copy_wall,
                    r.relay_wall,
                    r.relay_wall / r.copy_wall,
                    r.relay_wall / one,
                    r.relay_cpu,
                    r.relay_rss,
                    r.rows_written,
                    r.transactions,
                    if r.state_ok { "matches the table" } else { "MISMATCH" }
                );
            }
        }
        if o.asks_for("explain") {
            explain(&o, server).await;
        }
    });
}
