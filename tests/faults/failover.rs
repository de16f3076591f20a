//! PostgreSQL failovers: a primary and a physical standby as containers on a private Docker
//! network (`support::ha`), the relay connected with Synapse's two-host setting
//! (`host: "<primary>,<standby>"`, `target_session_attrs: read-write`, `connect_timeout: 3`),
//! appservices A and B receiving while the workload writes. Each phase ends with the suite's
//! per-key check (lost, regressed, duplicates) and prints a row with the time from the kill to
//! streaming again and whether the relay resynced.
//!
//! With a failover slot (`with_failover_slot`, PostgreSQL 17+: `replication.failover = true`,
//! the standby synchronising slots, `synchronized_standby_slots` on the primary), on one pair:
//! 4. the standby stops confirming (`docker pause`): the relay's stream is held back (its
//!    walsender waits in `WaitForStandbyConfirmation`, nothing written meanwhile reaches an
//!    appservice, the slot is not confirmed past the standby) until it confirms again;
//! 1. the primary is killed (`docker kill`) and the standby promoted (`pg_promote()`): the relay
//!    resumes from the synchronised slot, no resync;
//! 3. the old primary comes back at its address as a standby of the new one: the relay, made to
//!    reconnect and then restarted, refuses it (a standby) and streams from the new primary;
//!    it never creates anything there.
//!
//! Without one (`without_failover_slot`): 2. the primary is killed and the standby promoted; the
//! slot is missing there, the relay says so, re-creates it and resyncs every appservice. The
//! writers pause just before the kill and the standby catches up: with asynchronous physical
//! replication the old primary can commit changes the standby never receives, and the relay may
//! already have delivered them; that is the database losing them at the promotion, not the relay
//! (with a failover slot, `synchronized_standby_slots` prevents it, and phase 1 kills under load).

use std::time::{Duration, Instant};

use synapse_account_data_relay::testkit::synapse_writes as w;

use super::support::RelayProcess;
use super::support::ha::{HaCluster, HaOptions};
use super::{Env, EnvOptions, FailoverRow, Form, History, Summary, Workload};

const STREAMING: &str = "streaming account-data changes";
const LOST_SLOT_RESYNC: &str = "resync requested after the slot was lost";

/// Lines of the relay's log saying it streams from `ip`.
fn streaming_from(relay: &RelayProcess, ip: &str) -> usize {
    relay
        .log_text()
        .lines()
        .filter(|l| l.contains(STREAMING) && l.contains(&format!("@{ip}:")))
        .count()
}

/// Wait until the relay logs one more "streaming" line from `ip` than `before`.
async fn streaming_again(relay: &RelayProcess, ip: &str, before: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if streaming_from(relay, ip) > before {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn resyncs(relay: &RelayProcess) -> usize {
    relay.log_text().matches(LOST_SLOT_RESYNC).count()
}

async fn env_on(ha: &HaCluster, order: &[usize], failover: bool) -> Env {
    Env::on(
        ha.server(order),
        EnvOptions {
            replication_toml: format!("timeout = \"4s\"\nfailover = {failover}\n"),
            ..Default::default()
        },
    )
    .await
}

fn row(name: &'static str, version: u32) -> Summary {
    Summary {
        name,
        failover: Some(FailoverRow {
            version,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn set_row(s: &mut Summary, streaming: Option<Duration>, resync: bool) {
    if let Some(f) = s.failover.as_mut() {
        f.streaming_again = streaming;
        f.resync = resync;
    }
}

/// Verify the receivers against the database with the whole history so far; a fresh sampler is
/// not needed (the retained-WAL column is not printed for these rows).
async fn check(env: &mut Env, s: &mut Summary, history: &History) {
    env.verify(s, history, Duration::from_secs(120), false).await;
}

/// Scenarios 4, 1 and 3 on one pair (the short form on PostgreSQL 18 runs scenario 1 only).
pub async fn with_failover_slot(form: Form, version: u32) -> Vec<Summary> {
    let mut rows = Vec::new();
    let started = Instant::now();
    let phase = |what: &str| eprintln!("   {what} at {:.1}s", started.elapsed().as_secs_f64());
    let ha = HaCluster::start(&format!("fo{version}"), HaOptions::new(version, true), 1);
    phase("pair started");
    let mut env = env_on(&ha, &[0, 1], true).await;
    let slot = env.db.name.clone();
    let mut relay = env.start_relay().await;
    phase("relay streaming");
    let mut history = History::default();
    let all_phases = version == 17 || form.long;
    let mut seed = 100 + u64::from(version);

    // Load until the standby's copy of the slot is persisted (the slot must move on the primary).
    let work = Workload::start(env.server, &env.db.name, 2, 100, seed);
    let synced = ha.wait_for_synced_copy(1, &slot, Duration::from_secs(120));
    let (n, h) = work.finish().await;
    history.extend(h);
    let mut written = n;
    phase("the standby's copy persisted");
    if !synced {
        let mut s = row("failover slot: setup", version);
        s.problems.push(format!(
            "the standby's copy of the slot was never persisted:\n{}",
            ha.logs(1)
        ));
        return vec![s];
    }

    if all_phases {
        // 4. The standby stops confirming: the relay is held back.
        let mut s = row("standby not confirming holds the stream back", version);
        seed += 1;
        let work = Workload::start(env.server, &env.db.name, 2, form.pick(100, 300), seed);
        tokio::time::sleep(Duration::from_secs(1)).await;
        ha.pause(1);
        let marker = (
            "@shared_hold:example.org".to_owned(),
            None,
            "org.example.hold".to_owned(),
        );
        let value = serde_json::json!({ "held": seed });
        let c = env.client().await;
        w::set_global(&c, &marker.0, &marker.2, &value.to_string())
            .await
            .unwrap();
        let waiting = super::support::eventually(Duration::from_secs(60), || async {
            c.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' \
                 AND wait_event = 'WaitForStandbyConfirmation'",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) > 0)
        })
        .await;
        if !waiting {
            s.problems
                .push("the relay's walsender never waited for the standby (synchronized_standby_slots)".into());
        }
        // While the standby is frozen, for a few seconds: the marker must not arrive, and the
        // slot is never confirmed past what the standby has.
        for _ in 0..form.pick(6, 20) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if env.a.state().contains_key(&marker) || env.b.state().contains_key(&marker) {
                s.problems
                    .push("a change written while the standby was frozen reached an appservice".into());
                break;
            }
            let ahead: bool = c
                .query_one(
                    "SELECT (SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1) > \
                            (SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = $2)",
                    &[&slot, &ha.nodes[1].slot],
                )
                .await
                .map(|r| r.get::<_, Option<bool>>(0).unwrap_or(false))
                .unwrap_or(false);
            if ahead {
                s.problems
                    .push("the slot was confirmed past what the standby had received".into());
                break;
            }
        }
        ha.unpause(1);
        phase("standby confirming again");
        let arrived = env
            .a
            .wait_for(Duration::from_secs(60), |st| st.get(&marker) == Some(&value))
            .await;
        if !arrived {
            s.problems
                .push("the change held back did not arrive after the standby confirmed again".into());
        }
        let (n, h) = work.finish().await;
        history.extend(h);
        written += n;
        s.changes = written + 1;
        let before = resyncs(&relay);
        check(&mut env, &mut s, &history).await;
        set_row(&mut s, None, resyncs(&relay) > before);
        rows.push(s);
        phase("scenario 4 checked");
    }

    // 1. Kill the primary under load, promote the standby.
    seed += 1;
    phase("killing the primary");
    let pair = Pair {
        ha: &ha,
        relay: &relay,
        slot: &slot,
        form,
        version,
    };
    rows.push(
        promote_under_load(
            &pair,
            "promotion with a failover slot",
            (&mut env, &mut history, &mut written),
            seed,
            (0, 1, 1),
        )
        .await,
    );
    phase("scenario 1 checked");

    if all_phases {
        // 3. The old primary comes back at its address, as a standby of the new primary.
        let mut s = row("old primary back as a standby: refused", version);
        ha.rejoin_as_standby(0, 1);
        phase("old primary back as a standby");
        seed += 1;
        let work = Workload::start(env.server, &env.db.name, 2, form.pick(100, 300), seed);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let c = env.client().await;
        let before = (streaming_from(&relay, &ha.nodes[1].ip), resyncs(&relay));
        // A reconnect (its walsender ended) tries the old primary first.
        let t = Instant::now();
        c.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active",
            &[&slot],
        )
        .await
        .unwrap();
        let again = streaming_again(&relay, &ha.nodes[1].ip, before.0, Duration::from_secs(60)).await;
        let streaming = t.elapsed();
        // And a restart.
        relay.kill9();
        relay = env.start_relay().await;
        if !again || streaming_from(&relay, &ha.nodes[1].ip) == 0 {
            s.problems.push(format!(
                "the relay did not stream from the new primary:\n{}",
                relay.log_text()
            ));
        }
        let refused = format!("{}:5432: it is a standby (in recovery)", ha.nodes[0].ip);
        if !relay.log_text().contains(&refused) {
            s.problems.push(format!(
                "the relay's log does not show the old primary refused ({refused}):\n{}",
                relay.log_text()
            ));
        }
        tokio::time::sleep(Duration::from_secs(form.pick(2, 10))).await;
        let (n, h) = work.finish().await;
        history.extend(h);
        written += n;
        s.changes = written;
        check(&mut env, &mut s, &history).await;
        // Nothing of the relay's on the old primary but the synchronised copy.
        let own = ha
            .psql_db(
                0,
                &env.db.name,
                &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND NOT synced"),
            )
            .unwrap_or_else(|e| e);
        if own != "0" {
            s.problems.push(format!(
                "the relay created a slot on the old primary (now a standby): {own}"
            ));
        }
        let resync = resyncs(&relay) > before.1;
        set_row(&mut s, again.then_some(streaming), resync);
        rows.push(s);
        phase("scenario 3 checked");
        if form.long {
            // And back: the new primary dies, the old one (a standby now) is promoted.
            seed += 1;
            let pair = Pair {
                ha: &ha,
                relay: &relay,
                slot: &slot,
                form,
                version,
            };
            rows.push(
                promote_under_load(
                    &pair,
                    "promotion back to the first address",
                    (&mut env, &mut history, &mut written),
                    seed,
                    (1, 0, 2),
                )
                .await,
            );
        }
    }
    drop(relay);
    rows
}

/// What a promotion phase works on.
struct Pair<'a> {
    ha: &'a HaCluster,
    relay: &'a RelayProcess,
    slot: &'a str,
    form: Form,
    version: u32,
}

/// Scenario 1: the standby's copy persisted, kill node `from` under load, promote node `to`
/// (which leaves timeline `timeline`); the relay must stream from it without a resync.
async fn promote_under_load(
    p: &Pair<'_>,
    name: &'static str,
    (env, history, written): (&mut Env, &mut History, &mut u64),
    seed: u64,
    (from, to, timeline): (usize, usize, u32),
) -> Summary {
    let (ha, relay, form) = (p.ha, p.relay, p.form);
    let mut s = row(name, p.version);
    if !ha.wait_for_synced_copy(to, p.slot, Duration::from_secs(120)) {
        s.problems
            .push("the standby's copy is not persisted before the kill".into());
    }
    let work = Workload::start(env.server, &env.db.name, 3, form.pick(150, 400), seed);
    tokio::time::sleep(Duration::from_secs(form.pick(2, 10))).await;
    let before = (streaming_from(relay, &ha.nodes[to].ip), resyncs(relay));
    let killed = Instant::now();
    ha.kill(from);
    ha.promote(to);
    let again = streaming_again(relay, &ha.nodes[to].ip, before.0, Duration::from_secs(120)).await;
    let streaming = killed.elapsed();
    if !again {
        s.problems.push(format!(
            "the relay did not stream from the promoted standby:\n{}",
            relay.log_text()
        ));
    }
    tokio::time::sleep(Duration::from_secs(form.pick(2, 10))).await;
    let (n, h) = work.finish().await;
    history.extend(h);
    *written += n;
    s.changes = *written;
    check(env, &mut s, history).await;
    let resync = resyncs(relay) > before.1;
    if resync {
        s.problems
            .push("the relay resynced although the failover slot was synchronised".into());
    }
    if !relay
        .log_text()
        .contains(&format!("a standby was promoted (timeline {timeline} ended at "))
    {
        s.problems
            .push("no log line about the promotion with the switch point (TIMELINE_HISTORY)".into());
    }
    set_row(&mut s, again.then_some(streaming), resync);
    s
}

/// Scenario 2: a promotion without a failover slot (PostgreSQL 18 in the long form only).
pub async fn without_failover_slot(form: Form, version: u32) -> Vec<Summary> {
    if version != 17 && !form.long {
        return Vec::new();
    }
    let mut s = row("promotion without a failover slot: resync", version);
    let ha = HaCluster::start(&format!("nofo{version}"), HaOptions::new(version, false), 1);
    let mut env = env_on(&ha, &[0, 1], false).await;
    let relay = env.start_relay().await;
    let mut history = History::default();
    let work = Workload::start(
        env.server,
        &env.db.name,
        3,
        form.pick(150, 400),
        200 + u64::from(version),
    );
    tokio::time::sleep(Duration::from_secs(form.pick(3, 10))).await;
    // Quiesce and let the standby catch up (see the module documentation).
    let (n, h) = work.finish().await;
    history.extend(h);
    let mut written = n;
    let target = ha.psql(0, "SELECT pg_current_wal_lsn()").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ha
        .psql(1, &format!("SELECT pg_last_wal_replay_lsn() >= '{target}'"))
        .map(|v| v != "t")
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "the standby did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = (streaming_from(&relay, &ha.nodes[1].ip), resyncs(&relay));
    let killed = Instant::now();
    ha.kill(0);
    ha.promote(1);
    // Writes go on at once, on the new primary.
    let work = Workload::start(
        env.server,
        &env.db.name,
        3,
        form.pick(150, 400),
        300 + u64::from(version),
    );
    let again = streaming_again(&relay, &ha.nodes[1].ip, before.0, Duration::from_secs(120)).await;
    let streaming = killed.elapsed();
    if !again {
        s.problems.push(format!(
            "the relay did not stream from the promoted standby:\n{}",
            relay.log_text()
        ));
    }
    tokio::time::sleep(Duration::from_secs(form.pick(2, 10))).await;
    let (n, h) = work.finish().await;
    history.extend(h);
    written += n;
    s.changes = written;
    check(&mut env, &mut s, &history).await;
    let resync = resyncs(&relay) > before.1;
    if !resync {
        s.problems
            .push("no resync after the slot was lost at the promotion".into());
    }
    let log = relay.log_text();
    if !log.contains("does not exist on the new server after a failover") {
        s.problems
            .push("no log line saying the slot did not survive the promotion".into());
    }
    set_row(&mut s, again.then_some(streaming), resync);
    drop(relay);
    vec![s]
}
