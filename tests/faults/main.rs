//! The fault-injection suite: scenarios against real PostgreSQL and real HTTP receivers that
//! check, per appservice and per key, that the receiver ends with the database's final value, that
//! no key outside its namespaces arrived, and that no key ever went back to an older value.
//!
//! ```text
//! cargo test --test faults                       # short form (seconds per scenario; run by `cargo test`)
//! cargo test --test faults -- --long             # long form: many kills, long outages, higher rates
//! cargo test --test faults -- --only kill9,pg_restarts
//! cargo test --test faults -- --only failover_17,failover_no_slot_17,failover_18   # the PostgreSQL failovers (failover.rs)
//! ```
//! Each scenario prints one summary row; the run fails if any key was lost or regressed or a
//! scenario's own check failed. Every scenario gets a PostgreSQL cluster of its own (from this
//! machine's binaries), so restarts and heavy writes do not disturb the others.

#[path = "../integration/support/mod.rs"]
#[allow(unused_macros, unused_imports)]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{RegistrationSpec, RelayFiles, RelayProcess, Server, TestDb, own_local, wait_for_log};
use synapse_account_data_relay::testkit::LocalClusterOptions;
use synapse_account_data_relay::testkit::proxy::{FaultProxy, ProxyMode};
use synapse_account_data_relay::testkit::receiver::{ReceivedKey, ReceiverMode, RecordingAppservice, events_of};
use synapse_account_data_relay::testkit::synapse_writes as w;
use tokio_postgres::Client;

mod failover;

/// Short or long form.
#[derive(Debug, Clone, Copy)]
struct Form {
    long: bool,
}

impl Form {
    fn pick<T>(&self, short: T, long: T) -> T {
        if self.long { long } else { short }
    }
}

/// One scenario's summary row.
#[derive(Debug, Default, Clone)]
struct Summary {
    name: &'static str,
    changes: u64,
    keys_checked: usize,
    keys_lost: usize,
    keys_regressed: usize,
    duplicates: usize,
    max_retained_wal: u64,
    recover: Option<Duration>,
    problems: Vec<String>,
    /// Failover scenarios: the PostgreSQL version, the time from the primary's death (or the
    /// forced reconnect) to streaming again, and whether the relay resynced.
    failover: Option<FailoverRow>,
}

#[derive(Debug, Default, Clone)]
struct FailoverRow {
    version: u32,
    streaming_again: Option<Duration>,
    resync: bool,
}

// ---------------------------------------------------------------------------------------------
// The workload: Synapse-style writes on keys owned by one writer each, so every key's commit
// order is the order its writer wrote it.

const ROOMS: [&str; 2] = ["!r0:example.org", "!r1:example.org"];
const GLOBAL_TYPES: [&str; 3] = ["m.direct", "org.example.config", "m.ignored_user_list"];
const ROOM_TYPES: [&str; 2] = ["m.fully_read", "org.example.room"];
const TAGS: [&str; 2] = ["u.work", "m.favourite"];

/// What was written to each key, in commit order (`{}` deletions may repeat; other values are
/// unique). A write that failed with the server going away may or may not have committed; it is
/// kept in the history, where it simply may never be seen.
#[derive(Debug, Default)]
struct History {
    per_key: HashMap<ReceivedKey, Vec<String>>,
}

impl History {
    /// Append a later workload's history (workloads on the same keys run one after another).
    fn extend(&mut self, later: History) {
        for (k, v) in later.per_key {
            self.per_key.entry(k).or_default().extend(v);
        }
    }
}

struct Workload {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    history: Arc<Mutex<History>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A write, bounded: one to a primary that died without a word would hang. `Err` when it failed
/// or timed out (it may have committed all the same).
async fn bounded_write(f: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>) -> Result<(), ()> {
    match tokio::time::timeout(Duration::from_secs(5), f).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

fn users_of(writer: usize) -> Vec<String> {
    let mut v = Vec::new();
    for prefix in ["a", "b", "shared", "nobody"] {
        for i in 0..3 {
            v.push(format!("@{prefix}_w{writer}_{i}:example.org"));
        }
    }
    v
}

async fn connect_retrying(server: &'static Server, db: &str, stop: &AtomicBool) -> Option<Client> {
    while !stop.load(Ordering::SeqCst) {
        let conn = tokio_postgres::connect(&server.connection_string(db), tokio_postgres::NoTls).await;
        if let Ok((c, conn)) = conn {
            tokio::spawn(conn);
            return Some(c);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

impl Workload {
    /// `writers` tasks writing about `rate` operations per second in all.
    fn start(server: &'static Server, db: &str, writers: usize, rate: u64, seed: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let history = Arc::new(Mutex::new(History::default()));
        let mut tasks = Vec::new();
        for wi in 0..writers {
            let (stop, writes, history, db) = (stop.clone(), writes.clone(), history.clone(), db.to_owned());
            let period = Duration::from_micros(1_000_000 * writers as u64 / rate.max(1));
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed ^ (wi as u64 * 0x9E37_79B9));
                let users = users_of(wi);
                let mut client = None;
                let mut seq: u64 = 0;
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    if client.as_ref().is_none_or(|c: &Client| c.is_closed()) {
                        client = connect_retrying(server, &db, &stop).await;
                    }
                    let Some(c) = client.as_ref() else { return };
                    seq += 1;
                    let user = &users[rng.random_range(0..users.len())];
                    let room = ROOMS[rng.random_range(0..2)];
                    let tag = TAGS[rng.random_range(0..2)];
                    // The seed tells workloads apart that write the same keys one after another.
                    let value = format!("{{\"w\":{wi},\"n\":{seq},\"s\":{seed}}}");
                    let (key, written, result) = match rng.random_range(0..10) {
                        0..=3 => {
                            let t = GLOBAL_TYPES[rng.random_range(0..3)];
                            (
                                (user.clone(), None, t.to_owned()),
                                value.clone(),
                                bounded_write(w::set_global(c, user, t, &value)).await,
                            )
                        }
                        4 => {
                            let t = GLOBAL_TYPES[rng.random_range(0..3)];
                            (
                                (user.clone(), None, t.to_owned()),
                                "{}".to_owned(),
                                bounded_write(w::delete_global(c, user, t)).await,
                            )
                        }
                        5..=6 => {
                            let t = ROOM_TYPES[rng.random_range(0..2)];
                            (
                                (user.clone(), Some(room.to_owned()), t.to_owned()),
                                value.clone(),
                                bounded_write(w::set_room(c, user, room, t, &value)).await,
                            )
                        }
                        7..=8 => (
                            (user.clone(), Some(room.to_owned()), "m.tag".to_owned()),
                            String::new(),
                            bounded_write(w::add_tag(c, user, room, tag, &value)).await,
                        ),
                        _ => (
                            (user.clone(), Some(room.to_owned()), "m.tag".to_owned()),
                            String::new(),
                            bounded_write(w::remove_tag(c, user, room, tag)).await,
                        ),
                    };
                    if !written.is_empty() {
                        history.lock().unwrap().per_key.entry(key).or_default().push(written);
                    }
                    match result {
                        Ok(()) => {
                            writes.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => {
                            // The server went away mid-write: reconnect (the write may have committed).
                            client = None;
                        }
                    }
                }
            }));
        }
        Workload {
            stop,
            writes,
            history,
            tasks,
        }
    }

    async fn finish(self) -> (u64, History) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        let history = Arc::try_unwrap(self.history)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_default();
        (self.writes.load(Ordering::SeqCst), history)
    }
}

// ---------------------------------------------------------------------------------------------
// The environment: one cluster, one database, appservices A and B opted in, C not.

fn interested_a(u: &str) -> bool {
    u.starts_with("@a_") || u.starts_with("@shared_") || u == "@abot:example.org"
}
fn interested_b(u: &str) -> bool {
    u.starts_with("@b_") || u.starts_with("@shared_") || u == "@bbot:example.org"
}

struct Env {
    server: &'static Server,
    db: TestDb,
    a: RecordingAppservice,
    b: RecordingAppservice,
    c: RecordingAppservice,
    files: RelayFiles,
    retained: Arc<AtomicU64>,
    sampler: Option<tokio::task::JoinHandle<()>>,
    sampling: Arc<AtomicBool>,
}

#[derive(Default)]
struct EnvOptions {
    /// Extra relay.toml text (after `[delivery]`).
    extra_toml: String,
    cluster: LocalClusterOptions,
    /// Route the relay's PostgreSQL connections through this proxy port.
    pg_port: Option<u16>,
    /// Route appservice A through this URL.
    a_url: Option<String>,
    /// Lines for relay.toml's `[replication]` table (before `setup` runs).
    replication_toml: String,
}

impl Env {
    async fn new(name: &'static str, options: EnvOptions) -> Env {
        let server = own_local(name, options.cluster.clone());
        Env::on(server, options).await
    }

    async fn on(server: &'static Server, options: EnvOptions) -> Env {
        let db = TestDb::new(server).await;
        let a = RecordingAppservice::start("hs_token_a").await.unwrap();
        let b = RecordingAppservice::start("hs_token_b").await.unwrap();
        let c = RecordingAppservice::start("hs_token_c").await.unwrap();
        let a_url = options.a_url.clone().unwrap_or_else(|| a.url());
        let (ub, uc) = (b.url(), c.url());
        let files = RelayFiles::with_delivery(
            &db,
            &[
                RegistrationSpec {
                    id: "a",
                    url: Some(&a_url),
                    hs_token: "hs_token_a",
                    sender_localpart: "abot",
                    user_regexes: &["@a_.*", "@shared_.*"],
                    opt_in: true,
                },
                RegistrationSpec {
                    id: "b",
                    url: Some(&ub),
                    hs_token: "hs_token_b",
                    sender_localpart: "bbot",
                    user_regexes: &["@b_.*", "@shared_.*"],
                    opt_in: true,
                },
                RegistrationSpec {
                    id: "c",
                    url: Some(&uc),
                    hs_token: "hs_token_c",
                    sender_localpart: "cbot",
                    user_regexes: &["@c_.*"],
                    opt_in: false,
                },
            ],
            &[("request_timeout", toml::Value::String("2s".into()))],
            &format!(
                "[retention]\nmax_failing = \"3s\"\nmax_retained_wal = \"8MB\"\n{}",
                options.extra_toml
            ),
        );
        if !options.replication_toml.is_empty() {
            let toml = files.path().join("relay.toml");
            let text = std::fs::read_to_string(&toml).unwrap();
            std::fs::write(
                &toml,
                text.replacen(
                    "[replication]\n",
                    &format!("[replication]\n{}", options.replication_toml),
                    1,
                ),
            )
            .unwrap();
        }
        let out = files.command("setup", &[]);
        assert!(out.status.success(), "setup: {}", support::text(&out));
        if let Some(port) = options.pg_port {
            let hs = files.path().join("homeserver.yaml");
            let text = std::fs::read_to_string(&hs).unwrap();
            std::fs::write(
                &hs,
                text.replace(&format!("port: {}", server.port), &format!("port: {port}")),
            )
            .unwrap();
        }
        let retained = Arc::new(AtomicU64::new(0));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (retained, sampling, slot, dbname) =
                (retained.clone(), sampling.clone(), db.name.clone(), db.name.clone());
            tokio::spawn(async move {
                let mut client: Option<Client> = None;
                while sampling.load(Ordering::SeqCst) {
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        client = tokio_postgres::connect(&server.connection_string(&dbname), tokio_postgres::NoTls)
                            .await
                            .ok()
                            .map(|(c, conn)| {
                                tokio::spawn(conn);
                                c
                            });
                    }
                    if let Some(c) = &client
                        && let Ok(r) = c
                            .query_one(
                                "SELECT coalesce((pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, 0) \
                                 FROM pg_replication_slots WHERE slot_name = $1",
                                &[&slot],
                            )
                            .await
                    {
                        retained.fetch_max(r.get::<_, i64>(0).max(0) as u64, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        Env {
            server,
            db,
            a,
            b,
            c,
            files,
            retained,
            sampler: Some(sampler),
            sampling,
        }
    }

    async fn start_relay(&self) -> RelayProcess {
        let relay = self.files.spawn_run();
        assert!(
            wait_for_log(&relay, "streaming account-data changes", Duration::from_secs(60)).await,
            "the relay did not start streaming:\n{}",
            relay.log_text()
        );
        relay
    }

    /// A fresh connection to the test database (the original may have died with a restart).
    async fn client(&self) -> Client {
        let stop = AtomicBool::new(false);
        connect_retrying(self.server, &self.db.name, &stop).await.unwrap()
    }

    /// The database's final state for `interested` users; keys whose content is not JSON are
    /// left out (they are never sent).
    async fn final_state(&self, interested: impl Fn(&str) -> bool) -> BTreeMap<ReceivedKey, serde_json::Value> {
        let c = self.client().await;
        let mut out = BTreeMap::new();
        for r in c
            .query("SELECT user_id, account_data_type, content FROM account_data", &[])
            .await
            .unwrap()
        {
            let user: String = r.get(0);
            if let (true, Ok(v)) = (interested(&user), serde_json::from_str(r.get(2))) {
                out.insert((user, None, r.get(1)), v);
            }
        }
        for r in c
            .query(
                "SELECT user_id, room_id, account_data_type, content FROM room_account_data",
                &[],
            )
            .await
            .unwrap()
        {
            let user: String = r.get(0);
            if let (true, Ok(v)) = (interested(&user), serde_json::from_str(r.get(3))) {
                out.insert((user, Some(r.get(1)), r.get(2)), v);
            }
        }
        let mut tags: BTreeMap<(String, String), serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
        for r in c
            .query("SELECT user_id, room_id FROM room_tags_revisions", &[])
            .await
            .unwrap()
        {
            let user: String = r.get(0);
            if interested(&user) {
                tags.entry((user, r.get(1))).or_default();
            }
        }
        for r in c
            .query("SELECT user_id, room_id, tag, content FROM room_tags", &[])
            .await
            .unwrap()
        {
            if let Some(m) = tags.get_mut(&(r.get(0), r.get(1)))
                && let Ok(v) = serde_json::from_str(r.get(3))
            {
                m.insert(r.get(2), v);
            }
        }
        for ((u, room), m) in tags {
            out.insert((u, Some(room), "m.tag".into()), serde_json::json!({ "tags": m }));
        }
        out
    }

    /// Wait until both receivers hold the database's final state (or `timeout`), then check
    /// every key: lost, regressed, duplicates, and nothing outside the namespaces.
    async fn verify(&mut self, summary: &mut Summary, history: &History, timeout: Duration, lenient: bool) {
        self.sampling.store(false, Ordering::SeqCst);
        if let Some(s) = self.sampler.take() {
            let _ = s.await;
        }
        summary.max_retained_wal = self.retained.load(Ordering::SeqCst);
        for (receiver, interested, name) in [
            (&self.a, interested_a as fn(&str) -> bool, "A"),
            (&self.b, interested_b as fn(&str) -> bool, "B"),
        ] {
            let want = self.final_state(interested).await;
            let matches = |got: &BTreeMap<ReceivedKey, serde_json::Value>| {
                want.iter().all(|(k, v)| got.get(k) == Some(v)) && (lenient || got.keys().all(|k| want.contains_key(k)))
            };
            receiver.wait_for(timeout, matches).await;
            let got = receiver.state();
            summary.keys_checked += want.len();
            for (k, v) in &want {
                if got.get(k) != Some(v) {
                    summary.keys_lost += 1;
                    if summary.problems.len() < 10 {
                        summary
                            .problems
                            .push(format!("{name}: {k:?} is {:?}, the database has {v}", got.get(k)));
                    }
                }
            }
            for k in got.keys() {
                if !interested(&k.0) {
                    summary
                        .problems
                        .push(format!("{name} received {k:?}, outside its namespaces"));
                } else if !lenient && !want.contains_key(k) {
                    summary
                        .problems
                        .push(format!("{name} received {k:?}, which the database does not have"));
                }
            }
            // Order of receipt against commit order, per key.
            let mut seen: HashMap<ReceivedKey, (usize, Vec<String>)> = HashMap::new();
            let mut regressed = std::collections::HashSet::new();
            for t in receiver.transactions() {
                for (k, v) in events_of(&t.body) {
                    let Some(h) = history.per_key.get(&k) else { continue };
                    let text = v.to_string();
                    let (pos, values) = seen.entry(k.clone()).or_insert((0, Vec::new()));
                    if values.contains(&text) && text != "{}" {
                        summary.duplicates += 1;
                    }
                    values.push(text.clone());
                    let found = if text == "{}" {
                        // The nearest deletion at or after the current position, else before it.
                        h.iter()
                            .enumerate()
                            .skip(*pos)
                            .find(|(_, x)| **x == text)
                            .map(|(i, _)| i)
                            .or_else(|| {
                                h.iter()
                                    .enumerate()
                                    .take(*pos)
                                    .rev()
                                    .find(|(_, x)| **x == text)
                                    .map(|(i, _)| i)
                            })
                    } else {
                        h.iter()
                            .position(|x| x.as_str() == serde_json::to_string(&v).unwrap_or_default())
                    };
                    if let Some(i) = found {
                        if i < *pos {
                            if regressed.insert(k.clone()) && summary.problems.len() < 10 {
                                summary
                                    .problems
                                    .push(format!("{name}: {k:?} went back from #{pos} to #{i} ({text})"));
                            }
                        } else {
                            *pos = i;
                        }
                    }
                }
            }
            summary.keys_regressed += regressed.len();
        }
        if self.c.attempts() > 0 {
            summary
                .problems
                .push("the appservice that did not opt in received requests".into());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scenarios.

async fn kill9(form: Form) -> Summary {
    let mut s = Summary {
        name: "kill -9 at random moments",
        ..Default::default()
    };
    let mut env = Env::new("kill9", EnvOptions::default()).await;
    let mut relay = env.start_relay().await;
    let work = Workload::start(env.server, &env.db.name, 3, form.pick(150, 400), 1);
    let mut rng = StdRng::seed_from_u64(99);
    for _ in 0..form.pick(4, 30) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        relay.kill9();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
        relay = env.start_relay().await;
    }
    let (changes, history) = work.finish().await;
    let t = Instant::now();
    s.changes = changes;
    env.verify(&mut s, &history, Duration::from_secs(120), false).await;
    s.recover = Some(t.elapsed());
    drop(relay);
    s
}

async fn pg_restarts(form: Form) -> Summary {
    let mut s = Summary {
        name: "PostgreSQL fast and immediate restarts",
        ..Default::default()
    };
    let mut env = Env::new("pg_restarts", EnvOptions::default()).await;
    let relay = env.start_relay().await;
    let work = Workload::start(env.server, &env.db.name, 3, form.pick(150, 400), 2);
    let cluster = env.server.local.as_ref().unwrap();
    let mut recover = Duration::ZERO;
    for round in 0..form.pick(1, 5) {
        for mode in ["fast", "immediate"] {
            tokio::time::sleep(Duration::from_millis(800 + 200 * round)).await;
            cluster
                .stop(mode)
                .unwrap_or_else(|e| panic!("{mode} stop: {e}\n{}", relay.log_text()));
            tokio::time::sleep(Duration::from_millis(300)).await;
            cluster.restart().unwrap();
            let t = Instant::now();
            let back = wait_for_log_count(
                &relay,
                "streaming account-data changes",
                2 + 2 * round as usize + usize::from(mode == "immediate"),
                Duration::from_secs(60),
            )
            .await;
            if !back {
                s.problems
                    .push(format!("the relay did not reconnect after a {mode} restart"));
            }
            recover = recover.max(t.elapsed());
        }
    }
    let (changes, history) = work.finish().await;
    s.changes = changes;
    env.verify(&mut s, &history, Duration::from_secs(120), false).await;
    s.recover = Some(recover);
    s
}

async fn wait_for_log_count(relay: &RelayProcess, needle: &str, count: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if relay.log_text().matches(needle).count() >= count {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn appservice_faults(form: Form) -> Summary {
    let mut s = Summary {
        name: "appservice refuses, 500s, times out, hangs, non-JSON",
        ..Default::default()
    };
    let mut env = Env::new("appservice_faults", EnvOptions::default()).await;
    let relay = env.start_relay().await;
    let work = Workload::start(env.server, &env.db.name, 2, form.pick(120, 300), 3);
    let phase = Duration::from_secs(form.pick(2, 20));
    env.a.stop_listening();
    tokio::time::sleep(phase).await;
    env.a.resume().await.unwrap();
    for mode in [
        ReceiverMode::Fail(500),
        ReceiverMode::Hang,
        ReceiverMode::HangMidBody,
        ReceiverMode::NonJson,
    ] {
        env.a.set_mode(mode);
        tokio::time::sleep(phase).await;
    }
    let (changes, history) = work.finish().await;
    // B must have kept up while A was still failing.
    let want_b = env.final_state(interested_b).await;
    if !env
        .b
        .wait_for(Duration::from_secs(30), |got| {
            want_b.iter().all(|(k, v)| got.get(k) == Some(v))
        })
        .await
    {
        s.problems.push("B did not keep up while A was failing".into());
    }
    env.a.set_mode(ReceiverMode::Accept);
    let t = Instant::now();
    s.changes = changes;
    env.verify(&mut s, &history, Duration::from_secs(120), false).await;
    s.recover = Some(t.elapsed());
    drop(relay);
    s
}

async fn network_cuts(form: Form) -> Summary {
    let mut s = Summary {
        name: "network cut: relay-PostgreSQL and relay-appservice",
        ..Default::default()
    };
    let server = own_local("network_cuts", LocalClusterOptions::default());
    let pg_proxy = FaultProxy::start(([127, 0, 0, 1], server.port).into()).await.unwrap();
    // A's receiver sits behind its own proxy; the receiver is created by Env, so put the proxy
    // in front of a fixed port first.
    let a_port = synapse_account_data_relay::testkit::free_port().unwrap();
    let a_proxy = FaultProxy::start(([127, 0, 0, 1], a_port).into()).await.unwrap();
    let mut env = Env::on(
        server,
        EnvOptions {
            pg_port: Some(pg_proxy.addr().port()),
            a_url: Some(format!("http://{}", a_proxy.addr())),
            ..Default::default()
        },
    )
    .await;
    // Re-home A's receiver on the port behind the proxy.
    env.a = RecordingAppservice::start_on(([127, 0, 0, 1], a_port).into(), "hs_token_a")
        .await
        .unwrap();
    // A short replication timeout so a silent partition is noticed quickly.
    let toml_path = env.files.path().join("relay.toml");
    let text = std::fs::read_to_string(&toml_path).unwrap();
    std::fs::write(
        &toml_path,
        text.replacen("[replication]\n", "[replication]\ntimeout = \"4s\"\n", 1),
    )
    .unwrap();
    let relay = env.start_relay().await;
    let work = Workload::start(env.server, &env.db.name, 2, form.pick(120, 300), 4);
    let outage = Duration::from_secs(form.pick(3, 30));
    let mut recover = Duration::ZERO;
    for (proxy, mode, what) in [
        (&pg_proxy, ProxyMode::Cut, "PostgreSQL cut"),
        (&pg_proxy, ProxyMode::Blackhole, "PostgreSQL blackholed"),
        (&a_proxy, ProxyMode::Cut, "appservice cut"),
        (&a_proxy, ProxyMode::Blackhole, "appservice blackholed"),
    ] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.set_mode(mode);
        tokio::time::sleep(if mode == ProxyMode::Blackhole {
            outage + Duration::from_secs(5)
        } else {
            outage
        })
        .await;
        proxy.set_mode(ProxyMode::Pass);
        let t = Instant::now();
        // Recovered when a marker written now reaches B (through PostgreSQL) or A.
        let marker = format!("{{\"marker\":\"{what}\"}}");
        let c = env.client().await;
        w::set_global(&c, "@shared_marker:example.org", "org.example.marker", &marker)
            .await
            .unwrap();
        let key = (
            "@shared_marker:example.org".to_owned(),
            None,
            "org.example.marker".to_owned(),
        );
        let want: serde_json::Value = serde_json::from_str(&marker).unwrap();
        let ok = env
            .a
            .wait_for(Duration::from_secs(90), |st| st.get(&key) == Some(&want))
            .await
            && env
                .b
                .wait_for(Duration::from_secs(90), |st| st.get(&key) == Some(&want))
                .await;
        if !ok {
            s.problems.push(format!("no recovery after {what}"));
        }
        recover = recover.max(t.elapsed());
    }
    let (changes, history) = work.finish().await;
    s.changes = changes;
    env.verify(&mut s, &history, Duration::from_secs(120), false).await;
    s.recover = Some(recover);
    if !relay.log_text().contains("taking the connection for dead") {
        s.problems
            .push("the silent PostgreSQL partition was not detected by the replication timeout".into());
    }
    s
}

async fn idle_slot_heavy_unrelated(form: Form) -> Summary {
    let mut s = Summary {
        name: "unrelated table written heavily, account data idle",
        ..Default::default()
    };
    let mut env = Env::new("idle_slot", EnvOptions::default()).await;
    let relay = env.start_relay().await;
    let c = env.client().await;
    let until = Instant::now() + Duration::from_secs(form.pick(5, 60));
    let mut n: i64 = 0;
    while Instant::now() < until {
        c.execute(
            "INSERT INTO user_ips (user_id, access_token, ip, user_agent, last_seen) \
             SELECT '@u' || g || ':example.org', 'tok', '10.0.0.1', repeat('x', 200), $1 FROM generate_series(1, 200) g \
             ON CONFLICT (user_id, access_token, ip) DO UPDATE SET last_seen = EXCLUDED.last_seen",
            &[&n],
        )
        .await
        .unwrap();
        n += 1;
    }
    s.changes = n as u64 * 200;
    // With nothing to deliver, the slot follows the server: once the writes stop, it catches up
    // completely (what it retained meanwhile is decoding lag, shown in the row).
    let t = Instant::now();
    let caught_up = support::eventually(Duration::from_secs(30), || async {
        let (confirmed, current) = env.db.slot_position().await;
        current.saturating_sub(confirmed) < 64 << 10
    })
    .await;
    s.recover = Some(t.elapsed());
    if !caught_up {
        s.problems
            .push("the slot did not catch up with the server after the writes stopped".into());
    }
    env.verify(&mut s, &History::default(), Duration::from_secs(10), false)
        .await;
    drop(relay);
    s
}

async fn add_column(form: Form) -> Summary {
    let mut s = Summary {
        name: "column added to account_data mid-stream",
        ..Default::default()
    };
    let mut env = Env::new("add_column", EnvOptions::default()).await;
    let relay = env.start_relay().await;
    let work = Workload::start(env.server, &env.db.name, 2, form.pick(150, 300), 6);
    tokio::time::sleep(Duration::from_secs(form.pick(2, 10))).await;
    env.client()
        .await
        .batch_execute("ALTER TABLE account_data ADD COLUMN added_by_migration text DEFAULT 'x'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(form.pick(2, 10))).await;
    let (changes, history) = work.finish().await;
    s.changes = changes;
    env.verify(&mut s, &history, Duration::from_secs(60), false).await;
    if relay.log_text().contains("ERROR") {
        s.problems.push("errors in the relay log after the migration".into());
    }
    s
}

async fn bad_rows(form: Form) -> Summary {
    let mut s = Summary {
        name: "invalid JSON, a 5 MB value, a TRUNCATE",
        ..Default::default()
    };
    let mut env = Env::new("bad_rows", EnvOptions::default()).await;
    let relay = env.start_relay().await;
    let work = Workload::start(env.server, &env.db.name, 2, form.pick(150, 300), 7);
    let c = env.client().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.execute(
        "INSERT INTO account_data (user_id, account_data_type, stream_id, content) \
         VALUES ('@a_bad:example.org', 'org.example.broken', nextval('account_data_sequence'), '{not json')",
        &[],
    )
    .await
    .unwrap();
    let big = format!("{{\"blob\":\"{}\"}}", "y".repeat(5 << 20));
    w::set_global(&c, "@a_big:example.org", "org.example.big", &big)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.batch_execute("TRUNCATE room_account_data").await.unwrap();
    tokio::time::sleep(Duration::from_secs(form.pick(2, 10))).await;
    let (changes, history) = work.finish().await;
    s.changes = changes + 3;
    // After the TRUNCATE, receivers keep room values the database no longer has (not sent, as
    // for deletions): compare only what the database holds.
    env.verify(&mut s, &history, Duration::from_secs(60), true).await;
    let log = relay.log_text();
    for (needle, what) in [("not valid JSON", "the invalid JSON row"), ("TRUNCATE", "the TRUNCATE")] {
        if !log.contains(needle) {
            s.problems.push(format!("no log line for {what}"));
        }
    }
    if env.a.state().keys().any(|k| k.0 == "@a_bad:example.org") {
        s.problems.push("the invalid JSON row was sent".into());
    }
    s
}

async fn bulk_import(form: Form) -> Summary {
    let mut s = Summary {
        name: "one transaction of 100k rows",
        ..Default::default()
    };
    let rows: i64 = form.pick(100_000, 1_000_000);
    let mut env = Env::new("bulk", EnvOptions::default()).await;
    let relay = env.start_relay().await;
    let pid = relay.pid().unwrap();
    let c = env.client().await;
    c.execute(
        "INSERT INTO account_data (user_id, account_data_type, stream_id, content) \
         SELECT '@a_bulk' || g || ':example.org', 'org.example.imported', nextval('account_data_sequence'), \
                '{\"imported\":' || g || ',\"pad\":\"' || repeat('p', 100) || '\"}' \
         FROM generate_series(1, $1::bigint) g",
        &[&rows],
    )
    .await
    .unwrap();
    s.changes = rows as u64;
    let history = History::default();
    let t = Instant::now();
    env.verify(&mut s, &history, Duration::from_secs(form.pick(300, 1800)), false)
        .await;
    s.recover = Some(t.elapsed());
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    eprintln!("bulk import: relay peak RSS {} MiB", hwm / 1024);
    if hwm > 256 * 1024 {
        s.problems
            .push(format!("the relay's peak RSS reached {} MiB", hwm / 1024));
    }
    drop(relay);
    s
}

async fn start_while_down(form: Form) -> Summary {
    let mut s = Summary {
        name: "relay started while PostgreSQL, then an appservice, is down",
        ..Default::default()
    };
    let mut env = Env::new("start_while_down", EnvOptions::default()).await;
    let cluster = env.server.local.as_ref().unwrap();
    cluster.stop("fast").unwrap();
    let relay = env.files.spawn_run();
    if !wait_for_log(&relay, "not reachable yet", Duration::from_secs(30)).await {
        s.problems.push("no log line while PostgreSQL was down".into());
    }
    tokio::time::sleep(Duration::from_secs(form.pick(2, 20))).await;
    cluster.restart().unwrap();
    let t = Instant::now();
    if !wait_for_log(&relay, "streaming account-data changes", Duration::from_secs(60)).await {
        s.problems.push(format!(
            "the relay did not start after PostgreSQL came up:\n{}",
            relay.log_text()
        ));
    }
    let first = t.elapsed();
    drop(relay);
    // Now with appservice A down at start.
    env.a.stop_listening();
    let relay = env.start_relay().await;
    let work = Workload::start(env.server, &env.db.name, 2, form.pick(100, 300), 9);
    tokio::time::sleep(Duration::from_secs(form.pick(4, 30))).await;
    env.a.resume().await.unwrap();
    let (changes, history) = work.finish().await;
    s.changes = changes;
    let t = Instant::now();
    env.verify(&mut s, &history, Duration::from_secs(120), false).await;
    s.recover = Some(first.max(t.elapsed()));
    drop(relay);
    s
}

// ---------------------------------------------------------------------------------------------

type ScenarioFn = fn(Form) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Summary>>>>;

fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    vec![
        ("kill9", |f| Box::pin(async move { vec![kill9(f).await] })),
        ("pg_restarts", |f| Box::pin(async move { vec![pg_restarts(f).await] })),
        ("appservice_faults", |f| {
            Box::pin(async move { vec![appservice_faults(f).await] })
        }),
        ("network_cuts", |f| Box::pin(async move { vec![network_cuts(f).await] })),
        ("idle_slot", |f| {
            Box::pin(async move { vec![idle_slot_heavy_unrelated(f).await] })
        }),
        ("add_column", |f| Box::pin(async move { vec![add_column(f).await] })),
        ("bad_rows", |f| Box::pin(async move { vec![bad_rows(f).await] })),
        ("bulk_import", |f| Box::pin(async move { vec![bulk_import(f).await] })),
        ("start_while_down", |f| {
            Box::pin(async move { vec![start_while_down(f).await] })
        }),
        // PostgreSQL failovers (primary + physical standby containers): see failover.rs.
        ("failover_17", |f| Box::pin(failover::with_failover_slot(f, 17))),
        ("failover_no_slot_17", |f| {
            Box::pin(failover::without_failover_slot(f, 17))
        }),
        ("failover_18", |f| Box::pin(failover::with_failover_slot(f, 18))),
        ("failover_no_slot_18", |f| {
            Box::pin(failover::without_failover_slot(f, 18))
        }),
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let form = Form {
        long: args.iter().any(|a| a == "--long"),
    };
    if args.iter().any(|a| a == "--list") {
        for (name, _) in scenarios() {
            println!("{name}: test");
        }
        return;
    }
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_owned).collect());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    let started = Instant::now();
    for (name, run) in scenarios() {
        if only.as_ref().is_some_and(|o| !o.iter().any(|x| x == name)) {
            continue;
        }
        eprintln!("== scenario {name} ({})", if form.long { "long" } else { "short" });
        let t = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(run(form))));
        let summaries = result.unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            vec![Summary {
                name,
                problems: vec![format!("panicked: {msg}")],
                ..Default::default()
            }]
        });
        eprintln!("   took {:?}", t.elapsed());
        for mut summary in summaries {
            if summary.name.is_empty() {
                summary.name = name;
            }
            rows.push(summary);
        }
    }
    println!();
    println!(
        "| scenario | changes written | keys checked | keys lost | keys regressed | duplicates | max retained WAL | time to recover |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut failed = false;
    for r in rows.iter().filter(|r| r.failover.is_none()) {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} MiB | {} |",
            r.name,
            r.changes,
            r.keys_checked,
            r.keys_lost,
            r.keys_regressed,
            r.duplicates,
            r.max_retained_wal as f64 / (1 << 20) as f64,
            r.recover
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into())
        );
        if r.keys_lost > 0 || r.keys_regressed > 0 || !r.problems.is_empty() {
            failed = true;
        }
    }
    if rows.iter().any(|r| r.failover.is_some()) {
        println!();
        println!(
            "| failover scenario | PostgreSQL | changes written | keys checked | keys lost | keys regressed | duplicates | kill to streaming again | resync |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    }
    for r in &rows {
        let Some(f) = &r.failover else { continue };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            f.version,
            r.changes,
            r.keys_checked,
            r.keys_lost,
            r.keys_regressed,
            r.duplicates,
            f.streaming_again
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            if f.resync { "yes" } else { "no" }
        );
        if r.keys_lost > 0 || r.keys_regressed > 0 || !r.problems.is_empty() {
            failed = true;
        }
    }
    for r in rows.iter().filter(|r| !r.problems.is_empty()) {
        println!("\n{}:", r.name);
        for p in &r.problems {
            println!("  - {p}");
        }
    }
    println!(
        "\n{} scenario(s) in {:.0} s: {}",
        rows.len(),
        started.elapsed().as_secs_f64(),
        if failed { "FAILED" } else { "ok" }
    );
    if failed {
        std::process::exit(1);
    }
}
