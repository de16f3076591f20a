//! A dead appservice never fills the homeserver's disk: bounded retention, resync, backfill,
//! lost slots, PostgreSQL restarts, and two relays on one slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use synapse_account_data_relay::testkit::LocalClusterOptions;
use synapse_account_data_relay::testkit::receiver::ReceiverMode;
use synapse_account_data_relay::testkit::synapse_writes as w;

use crate::on_both_servers;
use crate::support::scenario::*;
use crate::support::{Server, TestDb, eventually, own_local, text, wait_for_log};

/// Content that does not compress, so WAL grows by about its size.
fn payload(i: usize, size: usize) -> String {
    let mut s = String::with_capacity(size + 32);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ i as u64;
    while s.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{x:016x}"));
    }
    format!("{{\"i\":{i},\"blob\":\"{s}\"}}")
}

fn toml(s: &str) -> toml::Value {
    toml::Value::String(s.into())
}

async fn pending_keys(db: &TestDb, appservice: &str) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FROM synapse_account_data_relay.pending_keys WHERE appservice_id = $1",
            &[&appservice],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

const MIB: u64 = 1 << 20;

/// Appservice A is down (connection refused, then 500s, then hanging) past its budget while B
/// is up and writes continue: the WAL the slot retains stays within the budget, B keeps
/// receiving promptly, and once A is back it holds exactly the database's final state.
async fn a_dead_appservice_holds_bounded_wal(server: &'static Server) {
    let budget = 2 * MIB;
    // No first-opt-in backfill: A starts live, so the budget is what switches it.
    let s = prepare_with(
        server,
        &[
            ("request_timeout", toml("1s")),
            ("backfill_new_appservices", toml::Value::Boolean(false)),
        ],
        "[retention]\nmax_failing = \"3s\"\nmax_retained_wal = \"2MB\"\n",
    )
    .await;
    // A starts live (catching up from the slot's position), so it is the budget that switches it.
    let relay = start_relay(&s).await;
    s.a.stop_listening();

    let stop = Arc::new(AtomicBool::new(false));
    let max_retained = Arc::new(AtomicU64::new(0));
    let writer = {
        let (c, stop) = (s.db.connect().await, stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let user = [
                    "@a_1:example.org",
                    "@a_2:example.org",
                    "@b_1:example.org",
                    "@shared_1:example.org",
                ][i % 4];
                w::set_global(&c, user, &format!("org.example.k{}", i % 40), &payload(i, 3000))
                    .await
                    .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            i
        })
    };
    let sampler = {
        let (db, stop, max) = (s.db.connect().await, stop.clone(), max_retained.clone());
        let slot = s.db.name.clone();
        tokio::spawn(async move {
            // Sample once the time budget has passed (until then A may hold WAL by design).
            tokio::time::sleep(Duration::from_secs(4)).await;
            while !stop.load(Ordering::SeqCst) {
                let r = db
                    .query_one(
                        "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await
                    .unwrap();
                max.fetch_max(r.get::<_, i64>(0) as u64, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // B's latency: a marker written every 300 ms must reach B without waiting for A.
    let mut b_latencies = Vec::new();
    let outage_started = Instant::now();
    let mut phase = 0;
    let mut n = 0;
    while outage_started.elapsed() < Duration::from_secs(12) {
        let elapsed = outage_started.elapsed();
        if phase == 0 && elapsed > Duration::from_secs(4) {
            s.a.set_mode(ReceiverMode::Fail(500));
            s.a.resume().await.unwrap();
            phase = 1;
        } else if phase == 1 && elapsed > Duration::from_secs(8) {
            s.a.set_mode(ReceiverMode::Hang);
            phase = 2;
        }
        n += 1;
        let marker = serde_json::json!({ "marker": n });
        w::set_global(
            &s.db.client,
            "@b_marker:example.org",
            "org.example.marker",
            &marker.to_string(),
        )
        .await
        .unwrap();
        let t0 = Instant::now();
        let key = (
            "@b_marker:example.org".to_owned(),
            None,
            "org.example.marker".to_owned(),
        );
        assert!(
            s.b.wait_for(Duration::from_secs(30), |st| st.get(&key) == Some(&marker))
                .await,
            "{}",
            relay.log_text()
        );
        b_latencies.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await.unwrap();
    sampler.await.unwrap();
    s.a.set_mode(ReceiverMode::Accept);

    b_latencies.sort();
    let max_b = *b_latencies.last().unwrap();
    let retained = max_retained.load(Ordering::SeqCst);
    eprintln!(
        "writes {writes}, max retained WAL after the budget {:.2} MiB (budget {} MiB), B latency p50 {:?} max {:?}",
        retained as f64 / MIB as f64,
        budget / MIB,
        b_latencies[b_latencies.len() / 2],
        max_b
    );
    // The relay acts at its status updates (every 200 ms here), so the slot can run past the
    // budget by what is written between two of them; 1 MiB covers this writer's rate.
    assert!(
        retained <= budget + MIB,
        "retained {retained} bytes, budget {budget}\n{}",
        relay.log_text()
    );
    // A's outage lasted 12 s; B waiting for A would show it.
    assert!(
        max_b < Duration::from_secs(4),
        "B waited {max_b:?} for a change:\n{}",
        relay.log_text()
    );
    let log = relay.log_text();
    assert!(log.contains("over its retention budget"), "{log}");
    assert_final_states(&s, &relay).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            pending_keys(&s.db, "a").await == 0
        })
        .await,
        "recorded keys are deleted once delivered"
    );
    // The switch back comes after the drain that finds nothing left (within a second or so).
    assert!(
        wait_for_log(&relay, "back to live delivery", Duration::from_secs(30)).await,
        "{}",
        relay.log_text()
    );
    drop(relay);
    s.db.drop_slot().await;
}

/// The relay is killed while A's keys are recorded: after the restart, A still gets them.
async fn recorded_keys_survive_a_kill(server: &'static Server) {
    let s = prepare_with(server, &[], "[retention]\nmax_failing = \"1s\"\n").await;
    let mut relay = start_relay(&s).await;
    s.a.stop_listening();
    let mut rng = StdRng::seed_from_u64(11);
    write_randomly(&s, 11, 60, 1).await;
    assert!(
        eventually(Duration::from_secs(30), || async { pending_keys(&s.db, "a").await > 0 }).await,
        "A's keys were never recorded:\n{}",
        relay.log_text()
    );
    // The slot moved past the recorded changes.
    let (confirmed, current) = s.db.slot_position().await;
    eprintln!("recorded; slot {} bytes behind", current - confirmed);
    relay.kill9();
    for i in 0..20 {
        random_write(&s.db.client, &mut rng, 1000 + i).await;
    }
    s.a.resume().await.unwrap();
    let relay = start_relay(&s).await;
    assert!(
        wait_for_log(&relay, "keys recorded for resync are waiting", Duration::from_secs(10)).await,
        "{}",
        relay.log_text()
    );
    assert_final_states(&s, &relay).await;
    drop(relay);
    s.db.drop_slot().await;
}

/// Backfill of thousands of users across two appservices, once on a quiet database and once
/// racing live writes: each receiver ends with the exact current state.
async fn backfill_thousands_of_users(server: &'static Server) {
    let s = prepare_with(server, &[("backfill_new_appservices", toml::Value::Boolean(false))], "").await;
    // 3,000 users with global data, room data and tags, written before the relay ever ran.
    s.db.client
        .batch_execute(
            "INSERT INTO account_data (user_id, account_data_type, stream_id, content) \
               SELECT u, t, nextval('account_data_sequence'), '{\"n\":' || i || '}' \
               FROM generate_series(1, 3000) i, \
                    LATERAL (VALUES (CASE i % 3 WHEN 0 THEN '@a_' WHEN 1 THEN '@b_' ELSE '@shared_' END || i || ':example.org')) v(u), \
                    unnest(ARRAY['m.direct', 'org.example.config']) t; \
             INSERT INTO room_account_data (user_id, room_id, account_data_type, stream_id, content) \
               SELECT user_id, '!r:example.org', 'm.fully_read', nextval('account_data_sequence'), '{\"event_id\":\"$e\"}' \
               FROM account_data WHERE account_data_type = 'm.direct'; \
             INSERT INTO room_tags (user_id, room_id, tag, content) \
               SELECT user_id, '!r:example.org', 'u.work', '{\"order\":1}' FROM account_data WHERE account_data_type = 'm.direct'; \
             INSERT INTO room_tags_revisions (user_id, room_id, stream_id) \
               SELECT user_id, '!r:example.org', nextval('account_data_sequence') FROM account_data WHERE account_data_type = 'm.direct';",
        )
        .await
        .unwrap();
    recreate_slot(&s);
    let relay = start_relay(&s).await;
    // The rows predate the slot, and backfill_new_appservices is off: nothing is sent yet.
    w::set_global(&s.db.client, "@nobody:example.org", "t", "{}")
        .await
        .unwrap();
    wait_until_caught_up(&s, &relay).await;
    assert_eq!(s.a.attempts() + s.b.attempts(), 0, "{}", relay.log_text());
    for id in ["a", "b"] {
        let out = s.files.command("backfill", &["--appservice", id]);
        assert!(out.status.success(), "backfill {id}: {}", text(&out));
        assert!(text(&out).contains("requested (all its users)"), "{}", text(&out));
    }
    assert_final_states(&s, &relay).await;
    assert_eq!(s.a.state().len(), 2000 * 4, "4 keys for each of A's 2,000 users");

    // Again, racing live writes to the same users.
    let writer = {
        let c = s.db.connect().await;
        tokio::spawn(async move {
            for i in 0..600usize {
                let user = format!("@{}_{}:example.org", ["a", "b", "shared"][i % 3], 1 + (i * 7) % 3000);
                match i % 4 {
                    0 => w::set_global(&c, &user, "m.direct", &format!("{{\"live\":{i}}}"))
                        .await
                        .unwrap(),
                    1 => w::add_tag(&c, &user, "!r:example.org", "u.live", &format!("{{\"order\":{i}}}"))
                        .await
                        .unwrap(),
                    2 => w::delete_global(&c, &user, "org.example.config").await.unwrap(),
                    _ => w::set_room(
                        &c,
                        &user,
                        "!r:example.org",
                        "m.fully_read",
                        &format!("{{\"event_id\":\"$l{i}\"}}"),
                    )
                    .await
                    .unwrap(),
                }
            }
        })
    };
    let out = s.files.command("backfill", &["--appservice", "a"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = s
        .files
        .command("backfill", &["--appservice", "b", "--users", "@shared_1"]);
    assert!(out.status.success(), "{}", text(&out));
    writer.await.unwrap();
    assert_final_states(&s, &relay).await;
    let bad = s.files.command("backfill", &["--appservice", "c"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("not opted in"), "{}", text(&bad));
    drop(relay);
    s.db.drop_slot().await;
}

/// A backfill interrupted by a kill resumes from its saved cursor after the restart (it does not
/// start again), and the appservice ends with the exact current state; nothing per key is
/// written to the relay's schema, and the request row is gone at the end.
async fn backfill_resumes_after_a_kill(server: &'static Server) {
    let s = prepare_with(server, &[("backfill_new_appservices", toml::Value::Boolean(false))], "").await;
    s.db.client
        .batch_execute(
            "INSERT INTO account_data (user_id, account_data_type, stream_id, content) \
               SELECT u, 'org.example.t' || t, nextval('account_data_sequence'), '{\"n\":' || i || '}' \
               FROM generate_series(1, 3000) i, \
                    LATERAL (VALUES (CASE i % 3 WHEN 0 THEN '@a_' WHEN 1 THEN '@b_' ELSE '@shared_' END || i || ':example.org')) v(u), \
                    generate_series(1, 10) t",
        )
        .await
        .unwrap();
    recreate_slot(&s);
    // Slow enough to be killed half way: 20,000 keys for A in 200 transactions.
    s.a.set_mode(ReceiverMode::Delay(Duration::from_millis(30)));
    let mut relay = start_relay(&s).await;
    let out = s.files.command("backfill", &["--appservice", "a"]);
    assert!(out.status.success(), "{}", text(&out));
    let progress = || async {
        s.db.client
            .query_opt(
                "SELECT after_user, keys_sent FROM synapse_account_data_relay.backfills WHERE appservice_id = 'a'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
    };
    assert!(
        eventually(Duration::from_secs(60), || async {
            progress().await.is_some_and(|(user, _)| !user.is_empty())
        })
        .await,
        "the backfill never saved a position:\n{}",
        relay.log_text()
    );
    relay.kill9();
    let (after, saved) = progress().await.expect("the request survives the kill");
    let before_restart = s.a.events().len();
    assert!(saved > 0 && (saved as usize) < 20_000, "saved {saved} keys sent");
    s.a.set_mode(ReceiverMode::Accept);
    let relay = start_relay(&s).await;
    let want = s.db.final_state(interested_a).await;
    assert!(
        s.a.wait_for(WAIT, |got| *got == want).await,
        "{}\n{}",
        crate::support::diff(&s.a.state(), &want),
        relay.log_text()
    );
    assert_eq!(s.a.state().len(), 20_000, "{}", relay.log_text());
    let after_restart = s.a.events().len() - before_restart;
    assert!(
        after_restart <= 20_000 - saved as usize + 1000,
        "the restarted backfill sent {after_restart} keys: it started again instead of after {after:?} ({saved} sent)"
    );
    assert!(
        eventually(Duration::from_secs(10), || async { progress().await.is_none() }).await,
        "the completed request was not deleted"
    );
    assert!(relay.log_text().contains("backfill complete"), "{}", relay.log_text());
    assert_eq!(pending_keys(&s.db, "a").await, 0, "a backfill records no keys");
    drop(relay);
    s.db.drop_slot().await;
}

/// An appservice that opts in for the first time gets the current state of its users.
async fn first_opt_in_backfills(server: &'static Server) {
    let s = prepare(server).await;
    let c = &s.db.client;
    w::set_global(c, "@a_old:example.org", "m.direct", "{\"before\":true}")
        .await
        .unwrap();
    w::add_tag(c, "@shared_old:example.org", "!r:example.org", "u.x", "{}")
        .await
        .unwrap();
    w::set_room(
        c,
        "@b_old:example.org",
        "!r:example.org",
        "m.fully_read",
        "{\"event_id\":\"$1\"}",
    )
    .await
    .unwrap();
    // The rows predate the slot: only a backfill can deliver them.
    recreate_slot(&s);
    let relay = start_relay(&s).await;
    assert_final_states(&s, &relay).await;
    let log = relay.log_text();
    assert!(log.contains("first opt-in: backfill"), "{log}");
    drop(relay);
    s.db.drop_slot().await;
}

/// A backfill checks what it reads as the stream's values are checked: a row whose content is
/// not JSON is skipped and named in the log, and neither stalls the appservice (which would
/// refuse every body carrying it) nor adds entries of its own.
async fn backfill_skips_rows_that_are_not_json(server: &'static Server) {
    let s = prepare(server).await;
    let c = &s.db.client;
    for (table, extra) in [("account_data", ""), ("room_account_data", "room_id, ")] {
        let values = if extra.is_empty() { "" } else { "'!r:example.org', " };
        c.execute(
            &format!(
                "INSERT INTO {table} (user_id, {extra}account_data_type, stream_id, content) \
                 VALUES ('@a_bad:example.org', {values}'org.example.broken', 1, '1}}, {{\"type\": \"x\"')"
            ),
            &[],
        )
        .await
        .unwrap();
    }
    w::set_global(c, "@a_good:example.org", "m.direct", "{\"before\":true}")
        .await
        .unwrap();
    w::set_room(c, "@a_good:example.org", "!r:example.org", "m.fully_read", "{}")
        .await
        .unwrap();
    // The rows predate the slot: only a backfill can deliver them.
    recreate_slot(&s);
    let relay = start_relay(&s).await;
    let good = |st: &std::collections::BTreeMap<_, _>| {
        st.contains_key(&("@a_good:example.org".to_string(), None, "m.direct".to_string()))
            && st.contains_key(&(
                "@a_good:example.org".to_string(),
                Some("!r:example.org".to_string()),
                "m.fully_read".to_string(),
            ))
    };
    assert!(
        s.a.wait_for(Duration::from_secs(30), good).await,
        "{}",
        relay.log_text()
    );
    // Live delivery goes on after it.
    w::set_global(c, "@a_after:example.org", "m.direct", "{}")
        .await
        .unwrap();
    let after = |st: &std::collections::BTreeMap<_, _>| {
        st.contains_key(&("@a_after:example.org".to_string(), None, "m.direct".to_string()))
    };
    assert!(
        s.a.wait_for(Duration::from_secs(30), after).await,
        "{}",
        relay.log_text()
    );
    assert!(
        !s.a.state().keys().any(|k| k.0 == "@a_bad:example.org" || k.2 == "x"),
        "{:?}",
        s.a.state()
    );
    let log = relay.log_text();
    assert!(!log.contains("did not accept the transaction"), "{log}");
    for table in ["account_data row skipped", "room_account_data row skipped"] {
        assert!(
            log.contains(table) && log.contains("@a_bad:example.org"),
            "{table}: {log}"
        );
    }
    drop(relay);
    s.db.drop_slot().await;
}

/// Two relays on one slot: the second waits calmly (logged once), takes over within seconds
/// after the first is killed, and nothing is lost.
async fn standby_takes_over(server: &'static Server) {
    let s = prepare(server).await;
    let mut active = start_relay(&s).await;
    let standby = s.files.spawn_run();
    assert!(
        wait_for_log(&standby, "waiting as a standby", Duration::from_secs(20)).await,
        "{}",
        standby.log_text()
    );
    write_randomly(&s, 21, 40, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        standby.log_text().matches("in use by another process").count(),
        1,
        "{}",
        standby.log_text()
    );
    active.kill9();
    let killed = Instant::now();
    let writer = {
        let c = s.db.connect().await;
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(22);
            for i in 0..80 {
                random_write(&c, &mut rng, 5000 + i).await;
            }
        })
    };
    assert!(
        wait_for_log(&standby, "taking over", Duration::from_secs(15)).await,
        "{}",
        standby.log_text()
    );
    eprintln!("standby took over {:?} after the kill", killed.elapsed());
    writer.await.unwrap();
    assert_final_states(&s, &standby).await;
    drop(standby);
    s.db.drop_slot().await;
}

// A server of its own: WAL written by other tests would count as retained.
crate::on_both_own_servers!(a_dead_appservice_holds_bounded_wal, &[]);

on_both_servers!(
    recorded_keys_survive_a_kill,
    backfill_thousands_of_users,
    first_opt_in_backfills,
    backfill_skips_rows_that_are_not_json,
    standby_takes_over,
    backfill_respects_room_account_data_off,
    backfill_reads_use_the_indexes_in_order,
    backfill_resumes_after_a_kill,
);

/// A slot invalidated by `max_slot_wal_keep_size` while A is down is detected, re-created, and
/// every appservice is resynced: nothing is lost.
async fn invalidated_slot_is_recreated_and_resynced(server: &'static Server) {
    // Budgets far away: A being down pins the slot, as without bounded retention.
    let s = prepare_with(
        server,
        &[],
        "[retention]\nmax_failing = \"1h\"\nmax_retained_wal = \"10GB\"\n",
    )
    .await;
    let relay = start_relay(&s).await;
    s.a.stop_listening();
    write_randomly(&s, 31, 40, 1).await;
    // Enough WAL to pass several 16 MB segments, then checkpoints remove it.
    let filler = "INSERT INTO user_ips (user_id, access_token, ip, user_agent, last_seen) \
                  SELECT '@f' || g || ':example.org', md5(g::text), '10.0.0.1', repeat(md5(g::text), 8), g \
                  FROM generate_series(1, 60000) g \
                  ON CONFLICT (user_id, access_token, ip) DO UPDATE SET last_seen = EXCLUDED.last_seen + 1";
    let lost = eventually(Duration::from_secs(60), || async {
        s.db.client.batch_execute(filler).await.unwrap();
        s.db.client.batch_execute("CHECKPOINT").await.unwrap();
        relay.log_text().contains("the replication slot was lost")
    })
    .await;
    assert!(lost, "the slot was never invalidated:\n{}", relay.log_text());
    assert!(
        wait_for_log(&relay, "re-created the replication slot", Duration::from_secs(30)).await,
        "{}",
        relay.log_text()
    );
    write_randomly(&s, 32, 20, 1).await;
    s.a.resume().await.unwrap();
    assert_final_states(&s, &relay).await;
}

crate::on_both_own_servers!(
    invalidated_slot_is_recreated_and_resynced,
    &[
        ("max_slot_wal_keep_size", "1MB"),
        ("max_wal_size", "32MB"),
        ("min_wal_size", "32MB")
    ]
);

/// PostgreSQL fast and immediate restarts under load: the relay reconnects and resumes from the
/// slot; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_lose_nothing() {
    let server = own_local("restarted", LocalClusterOptions::default());
    let s = prepare(server).await;
    let relay = start_relay(&s).await;
    let cluster = server.local.as_ref().unwrap();
    for (round, mode) in ["fast", "immediate"].into_iter().enumerate() {
        let writer = {
            let c = s.db.connect().await;
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(40 + round as u64);
                for i in 0..200 {
                    // The server goes away mid-run: stop at the first failed write.
                    if tokio::time::timeout(Duration::from_secs(5), try_random_write(&c, &mut rng, i))
                        .await
                        .map(|r| r.is_err())
                        .unwrap_or(true)
                    {
                        return i;
                    }
                }
                200
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.stop(mode).unwrap();
        let done = writer.await.unwrap();
        cluster.restart().unwrap();
        eprintln!("{mode} restart after {done} writes");
        let db = s.db.connect().await;
        let mut rng = StdRng::seed_from_u64(50 + round as u64);
        for i in 0..50 {
            random_write(&db, &mut rng, 10_000 + i).await;
        }
    }
    // The test's own connection died with the server: compare through a fresh one.
    let fresh = TestDb {
        server,
        name: s.db.name.clone(),
        client: s.db.connect().await,
    };
    let want_a = fresh.final_state(interested_a).await;
    assert!(
        s.a.wait_for(WAIT, |got| *got == want_a).await,
        "{}\n{}",
        crate::support::diff(&s.a.state(), &want_a),
        relay.log_text()
    );
    let want_b = fresh.final_state(interested_b).await;
    assert!(
        s.b.wait_for(WAIT, |got| *got == want_b).await,
        "{}",
        crate::support::diff(&s.b.state(), &want_b)
    );
    assert!(relay.log_text().contains("reconnecting"), "{}", relay.log_text());
}

/// An appservice that turned room account data off gets none, through backfills as live.
async fn backfill_respects_room_account_data_off(server: &'static Server) {
    let s = prepare_with(server, &[], "[appservices.a]\nroom_account_data = false\n").await;
    let c = &s.db.client;
    w::set_global(c, "@a_1:example.org", "m.direct", "{\"n\":1}")
        .await
        .unwrap();
    w::set_room(
        c,
        "@a_1:example.org",
        "!r:example.org",
        "m.fully_read",
        "{\"event_id\":\"$1\"}",
    )
    .await
    .unwrap();
    w::add_tag(c, "@a_1:example.org", "!r:example.org", "u.work", "{}")
        .await
        .unwrap();
    recreate_slot(&s);
    let relay = start_relay(&s).await;
    let key = ("@a_1:example.org".to_owned(), None, "m.direct".to_owned());
    assert!(
        s.a.wait_for(WAIT, |st| st.contains_key(&key)).await,
        "{}",
        relay.log_text()
    );
    w::add_tag(c, "@a_1:example.org", "!r:example.org", "u.live", "{}")
        .await
        .unwrap();
    w::set_global(c, "@a_1:example.org", "m.direct", "{\"n\":2}")
        .await
        .unwrap();
    let want = serde_json::json!({"n": 2});
    assert!(
        s.a.wait_for(WAIT, |st| st.get(&key) == Some(&want)).await,
        "{}",
        relay.log_text()
    );
    let rooms: Vec<_> = s.a.state().into_keys().filter(|k| k.1.is_some()).collect();
    assert!(rooms.is_empty(), "room data reached A: {rooms:?}");
    drop(relay);
    s.db.drop_slot().await;
}

/// The plan of one backfill query, run with `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` on the
/// parameters `args` (SQL literals, in the order of `$1, $2, …`).
async fn explain(db: &TestDb, sql: &str, types: &str, args: &str) -> serde_json::Value {
    db.client
        .batch_execute(&format!("DEALLOCATE ALL; PREPARE q({types}) AS {sql}"))
        .await
        .unwrap_or_else(|e| panic!("PREPARE {sql}: {e}"));
    let text: String = db
        .client
        .simple_query(&format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE q({args})"))
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {e}"))
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a plan");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[0]["Plan"].clone()
}

/// Every node of a plan, depth first.
fn plan_nodes(plan: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = vec![plan];
    for child in plan["Plans"].as_array().into_iter().flatten() {
        out.extend(plan_nodes(child));
    }
    out
}

/// Rows a node returned in all its loops.
fn node_rows(n: &serde_json::Value) -> u64 {
    n["Actual Rows"].as_u64().unwrap_or(0) * n["Actual Loops"].as_u64().unwrap_or(1)
}

/// Synapse's tables are read in index order, each reading about the rows the page needs: no
/// sequential scan, no sort over a table, scans return at most the page (plus the rows of the
/// users a page of users needs). `users_page`'s old `… UNION … ORDER BY user_id LIMIT n` read
/// every remaining row of all three tables for each page before PostgreSQL 17.
async fn backfill_reads_use_the_indexes_in_order(server: &'static Server) {
    use synapse_account_data_relay::resync::backfill::{
        GLOBAL_PAGE_SQL, ROOMS_PAGE_SQL, TAGS_PAGE_SQL, USERS_PAGE_SQL,
    };
    let db = TestDb::new(server).await;
    // 2,000 users × 5 global types; × 50 rooms of room account data; 10 rooms with tags each.
    db.client
        .batch_execute(
            "INSERT INTO account_data (user_id, account_data_type, stream_id, content) \
               SELECT '@u' || lpad(u::text, 5, '0') || ':example.org', 't' || t, u * 10 + t, '{}' \
               FROM generate_series(1, 2000) u, generate_series(1, 5) t; \
             INSERT INTO room_account_data (user_id, room_id, account_data_type, stream_id, content) \
               SELECT '@u' || lpad(u::text, 5, '0') || ':example.org', '!r' || r || ':example.org', 'm.fully_read', u * 100 + r, '{}' \
               FROM generate_series(1, 2000) u, generate_series(1, 50) r; \
             INSERT INTO room_tags_revisions (user_id, room_id, stream_id) \
               SELECT '@u' || lpad(u::text, 5, '0') || ':example.org', '!r' || r || ':example.org', u * 100 + r \
               FROM generate_series(1, 2000) u, generate_series(1, 10) r; \
             INSERT INTO room_tags (user_id, room_id, tag, content) \
               SELECT user_id, room_id, 'u.work', '{}' FROM room_tags_revisions; \
             ANALYZE account_data, room_account_data, room_tags_revisions, room_tags;",
        )
        .await
        .unwrap();
    let tables = ["account_data", "room_account_data", "room_tags_revisions", "room_tags"];
    let middle = "'@u01000:example.org'";
    let limit: u64 = 100;
    // (query, parameter types, arguments, the most rows any scan may return)
    let cases = [
        (
            GLOBAL_PAGE_SQL,
            "text, text, bigint",
            format!("{middle}, 't3', {limit}"),
            limit,
        ),
        (
            ROOMS_PAGE_SQL,
            "text, text, text, bigint",
            format!("{middle}, '!r7:example.org', 'm.fully_read', {limit}"),
            limit,
        ),
        // One tag per room: the join returns a row per room of the page.
        (
            TAGS_PAGE_SQL,
            "text, text, bigint",
            format!("{middle}, '!r3:example.org', {limit}"),
            limit,
        ),
        // 100 users: the rows of 100 users of room_account_data (50 each), the most of any table.
        (
            USERS_PAGE_SQL,
            "text, bigint",
            format!("{middle}, {limit}"),
            limit * 50 + 1,
        ),
    ];
    for (sql, types, args, most) in cases {
        let plan = explain(&db, sql, types, &args).await;
        let nodes = plan_nodes(&plan);
        let shape: Vec<String> = nodes
            .iter()
            .map(|n| {
                format!(
                    "{} {} {} rows={}",
                    n["Node Type"].as_str().unwrap_or("?"),
                    n["Relation Name"].as_str().unwrap_or(""),
                    n["Index Name"].as_str().unwrap_or(""),
                    node_rows(n)
                )
            })
            .collect();
        let shape = shape.join("\n  ");
        let mut scans = 0;
        for n in &nodes {
            let node = n["Node Type"].as_str().unwrap_or("");
            let relation = n["Relation Name"].as_str().unwrap_or("");
            if tables.contains(&relation) {
                scans += 1;
                assert!(
                    node == "Index Scan" || node == "Index Only Scan",
                    "{sql}: {relation} is not read in index order:\n  {shape}"
                );
                assert!(
                    node_rows(n) <= most,
                    "{sql}: {relation} returned {} rows for a page of {limit}:\n  {shape}",
                    node_rows(n)
                );
            }
            if node == "Sort" || node == "Incremental Sort" {
                assert!(
                    node_rows(n) <= 3 * limit,
                    "{sql}: a sort over more than the page:\n  {shape}"
                );
            }
        }
        assert!(scans > 0, "{sql}: no scan of Synapse's tables?\n  {shape}");
        eprintln!("{sql}\n  {shape}");
    }
    let users = synapse_account_data_relay::resync::backfill::users_page(&db.client, "@u01000:example.org", 3)
        .await
        .unwrap();
    assert_eq!(
        users,
        ["@u01001:example.org", "@u01002:example.org", "@u01003:example.org"]
    );
}
