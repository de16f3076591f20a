//! The relay end to end: Synapse-style writes into real PostgreSQL, the relay binary, real HTTP
//! receivers; each receiver must end with exactly the database's final state for its users.

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use synapse_account_data_relay::testkit::proxy::{FaultProxy, ProxyMode};
use synapse_account_data_relay::testkit::receiver::ReceiverMode;
use synapse_account_data_relay::testkit::synapse_writes as w;

use crate::on_both_servers;
use crate::support::scenario::*;
use crate::support::{Server, diff, wait_for_log, wait_until_live};

/// Random writes the way Synapse makes them, for two appservices with different namespaces, a
/// user of neither, and an appservice that did not opt in.
pub(crate) async fn end_to_end_random_writes(server: &'static Server) {
    let s = prepare(server).await;
    let mut relay = start_relay(&s).await;
    // The relay streams as the least-privileged role, not as the owner of Synapse's tables.
    let row =
        s.db.client
            .query_one(
                "SELECT r.usename::text, s.rolsuper FROM pg_stat_replication r JOIN pg_roles s ON s.oid = r.usesysid \
                 JOIN pg_replication_slots sl ON sl.active_pid = r.pid WHERE sl.slot_name = $1",
                &[&s.db.name],
            )
            .await
            .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, bool>(1)),
        (RUN_ROLE.to_owned(), false)
    );
    let check = s.files.command("check", &[]);
    let check_text = crate::support::text(&check);
    assert!(
        check_text.contains(&format!("role \"{RUN_ROLE}\" holds what `run` needs and no more")),
        "{check_text}"
    );
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    write_randomly(&s, seed, 150, 2).await;
    assert_final_states(&s, &relay).await;
    // Every txnId is unique and never purely numeric.
    for t in s.a.transactions().iter().chain(s.b.transactions().iter()) {
        assert!(
            t.txn_id.parse::<u64>().is_err() && t.txn_id.starts_with("msc3682-"),
            "{}",
            t.txn_id
        );
    }
    assert_eq!(relay.terminate(), Some(0), "SIGTERM exits 0:\n{}", relay.log_text());
    s.db.drop_slot().await;
}

/// `kill -9` of the relay in the middle of a stream of writes; the restarted relay delivers
/// everything that was not confirmed.
pub(crate) async fn restart_after_kill_loses_nothing(server: &'static Server) {
    let s = prepare(server).await;
    let mut relay = start_relay(&s).await;
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    let writer = {
        let c = s.db.connect().await;
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            for i in 0..400 {
                random_write(&c, &mut rng, i).await;
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.kill9();
    let first_log = relay.log_text();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let relay = start_relay(&s).await;
    writer.await.unwrap();
    assert_final_states(&s, &relay).await;
    assert!(first_log.contains("streaming"), "{first_log}");
    drop(relay);
    s.db.drop_slot().await;
}

/// One appservice answers 500 for a while: the other keeps receiving meanwhile, and nothing is
/// lost for the failing one once it recovers.
async fn failing_appservice_loses_nothing_and_delays_nobody(server: &'static Server) {
    let s = prepare(server).await;
    let relay = start_relay(&s).await;
    s.a.set_mode(ReceiverMode::Fail(500));
    write_randomly(&s, 7, 60, 1).await;
    let want_b = s.db.final_state(interested_b).await;
    assert!(
        s.b.wait_for(WAIT, |got| *got == want_b).await,
        "B must not wait for A:\n{}\n{}",
        diff(&s.b.state(), &want_b),
        relay.log_text()
    );
    let deadline = std::time::Instant::now() + WAIT;
    while s.a.attempts() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "A was not retried:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(s.a.transactions().is_empty());
    // The slot must not pass A's undelivered changes.
    let (confirmed, _) = s.db.slot_position().await;
    s.a.set_mode(ReceiverMode::NonJson);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(s.a.transactions().is_empty(), "200 with a non-JSON body is a failure");
    s.a.set_mode(ReceiverMode::Accept);
    write_randomly(&s, 8, 20, 1).await;
    assert_final_states(&s, &relay).await;
    let log = relay.log_text();
    assert!(log.contains("retrying with the same txnId"), "{log}");
    let (after, _) = s.db.slot_position().await;
    assert!(after >= confirmed);
    drop(relay);
    s.db.drop_slot().await;
}

/// Writes only to a table outside the publication: the slot's confirmed position still moves,
/// so an idle slot never holds WAL.
async fn idle_slot_advances(server: &'static Server) {
    let s = prepare(server).await;
    let relay = start_relay(&s).await;
    for i in 0..300 {
        s.db.client
            .execute(
                "INSERT INTO user_ips (user_id, access_token, ip, user_agent, last_seen) VALUES ($1, 'tok', '1.2.3.4', 'ua', $2) \
                 ON CONFLICT (user_id, access_token, ip) DO UPDATE SET last_seen = EXCLUDED.last_seen",
                &[&format!("@u{}:example.org", i % 30), &(i as i64)],
            )
            .await
            .unwrap();
    }
    let (_, target) = s.db.slot_position().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (confirmed, current) = s.db.slot_position().await;
        if confirmed >= target {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "confirmed_flush_lsn stuck {} bytes behind (current {current}):\n{}",
            target - confirmed,
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s.a.transactions().is_empty() && s.b.transactions().is_empty());
    drop(relay);
    s.db.drop_slot().await;
}

/// A row whose content is not JSON is logged with its key and skipped; the relay carries on.
async fn invalid_json_is_skipped_and_named(server: &'static Server) {
    let s = prepare(server).await;
    let relay = start_relay(&s).await;
    s.db.client
        .execute(
            "INSERT INTO account_data (user_id, account_data_type, stream_id, content) VALUES ('@a_bad:example.org', 'org.example.broken', 1, '{not json')",
            &[],
        )
        .await
        .unwrap();
    w::set_global(&s.db.client, "@a_good:example.org", "m.direct", "{}")
        .await
        .unwrap();
    let got =
        s.a.wait_for(WAIT, |st| {
            st.contains_key(&("@a_good:example.org".into(), None, "m.direct".into()))
        })
        .await;
    assert!(got, "{}", relay.log_text());
    assert!(!s.a.state().keys().any(|k| k.0 == "@a_bad:example.org"));
    let log = relay.log_text();
    assert!(
        log.contains("@a_bad:example.org") && log.contains("org.example.broken") && log.contains("not valid JSON"),
        "{log}"
    );
    drop(relay);
    s.db.drop_slot().await;
}

/// A 35 s silent partition between the relay and PostgreSQL (longer than `replication.timeout`,
/// 30 s, shorter than `wal_sender_timeout`, 60 s), healed for new connections only (the open
/// one stays lost, as a flow whose end PostgreSQL never hears of). The reconnect finds the slot
/// still held by our own old walsender (SQLSTATE 55006): not a takeover. The relay ends it and
/// resumes after the last commit it received, live, without streaming everything again.
async fn silent_partition_is_not_a_takeover(server: &'static Server) {
    let s = prepare(server).await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], server.port).into()).await.unwrap();
    let hs = s.files.path().join("homeserver.yaml");
    let text = std::fs::read_to_string(&hs).unwrap();
    let text = text.replace(
        &format!("port: {}\n", server.port),
        &format!("port: {}\n", proxy.addr().port()),
    );
    std::fs::write(&hs, text).unwrap();
    let mut relay = start_relay(&s).await;
    let key = ("@a_1:example.org".to_owned(), None, "m.direct".to_owned());
    let wrote = |v: i64| {
        let c = &s.db.client;
        async move {
            w::set_global(c, "@a_1:example.org", "m.direct", &format!("{{\"v\":{v}}}"))
                .await
                .unwrap()
        }
    };
    wrote(1).await;
    assert!(s.a.wait_for(WAIT, |st| st.get(&key).is_some_and(|v| v["v"] == 1)).await);
    // Both appservices start in recording mode and may get their first-opt-in backfill a moment
    // later: any switch after both are live is the partition's doing.
    wait_until_live(&relay, &["a", "b"], Duration::from_secs(30)).await;
    let live_switches = |log: &str| log.matches("back to live delivery appservice").count();
    let before = live_switches(&relay.log_text());

    proxy.set_mode(ProxyMode::Blackhole);
    wrote(2).await;
    tokio::time::sleep(Duration::from_secs(35)).await;
    proxy.strand_open_connections();
    wrote(3).await;
    assert!(
        s.a.wait_for(Duration::from_secs(90), |st| st.get(&key).is_some_and(|v| v["v"] == 3))
            .await,
        "{}",
        relay.log_text()
    );
    wait_for_log(
        &relay,
        "our previous replication connection still held the slot",
        Duration::from_secs(60),
    )
    .await;
    let log = relay.log_text();
    assert!(
        log.contains("taking the connection for dead"),
        "the partition was noticed:\n{log}"
    );
    assert!(
        log.contains("our previous replication connection still held the slot"),
        "the reconnect met our own walsender:\n{log}"
    );
    assert!(!log.contains("took the replication slot over"), "{log}");
    assert_eq!(
        live_switches(&log),
        before,
        "no switch to recording mode and back:\n{log}"
    );
    let resumed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("streaming account-data changes"))
        .collect();
    assert!(resumed.len() >= 2, "{log}");
    assert!(
        resumed.iter().skip(1).all(|l| !l.contains("resume_after=0/0")),
        "streaming resumed after the last commit received:\n{log}"
    );
    // (How fast it stops is not the point here: a worker's SQL statement on the connection the
    // partition stranded may still be waiting for its timeout.)
    relay.terminate();
    s.db.drop_slot().await;
}

on_both_servers!(
    silent_partition_is_not_a_takeover,
    end_to_end_random_writes,
    restart_after_kill_loses_nothing,
    failing_appservice_loses_nothing_and_delays_nobody,
    idle_slot_advances,
    invalid_json_is_skipped_and_named,
    visibility_check_follows_commit,
    endless_answer_is_a_failed_attempt_and_not_buffered,
    read_back_content_is_checked_as_json,
);

/// Content read back from the tables (unchanged TOAST, resync) is checked as JSON like the live
/// path's: a row that is not JSON, or that would splice entries of its own into the body, is
/// left out; the others are read.
async fn read_back_content_is_checked_as_json(server: &'static Server) {
    use synapse_account_data_relay::model::{AccountDataKey, SourceTable};
    use synapse_account_data_relay::synapse::current::read_current;
    let db = crate::support::TestDb::new(server).await;
    let injection = r#"{}}, {"type": "m.injected", "content": {}"#;
    for (user, content) in [
        ("@a_good:example.org", r#"{"k": 1}"#),
        ("@a_bad:example.org", "{not json"),
        ("@a_inject:example.org", injection),
    ] {
        db.client
            .execute(
                "INSERT INTO account_data (user_id, account_data_type, stream_id, content) VALUES ($1, 'm.direct', 1, $2)",
                &[&user, &content],
            )
            .await
            .unwrap();
        db.client
            .execute(
                "INSERT INTO room_account_data (user_id, room_id, account_data_type, stream_id, content) VALUES ($1, '!r:example.org', 'm.fully_read', 1, $2)",
                &[&user, &content],
            )
            .await
            .unwrap();
    }
    for (table, room) in [
        (SourceTable::AccountData, None),
        (SourceTable::RoomAccountData, Some("!r:example.org")),
    ] {
        let data_type = if room.is_some() { "m.fully_read" } else { "m.direct" };
        let keys: Vec<AccountDataKey> = ["@a_good:example.org", "@a_bad:example.org", "@a_inject:example.org"]
            .iter()
            .map(|u| AccountDataKey {
                user_id: (*u).into(),
                room_id: room.map(Into::into),
                data_type: data_type.into(),
            })
            .collect();
        let refs: Vec<&AccountDataKey> = keys.iter().collect();
        let got = read_current(&db.client, table, &refs).await.unwrap();
        assert_eq!(got.len(), 1, "{table:?}: {got:?}");
        assert_eq!(got.get(&keys[0]).map(|c| &**c), Some(r#"{"k": 1}"#));
    }
}

/// The relay process's peak resident memory (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// An appservice that answers 200 with an endless body (whitespace: it would be valid JSON if it
/// ended): the relay reads at most 1 MiB of it, counts the attempt as failed and retries; its
/// memory stays bounded; B is not held up; once A answers normally it gets the change.
async fn endless_answer_is_a_failed_attempt_and_not_buffered(server: &'static Server) {
    let s = prepare(server).await;
    let relay = start_relay(&s).await;
    s.a.set_mode(ReceiverMode::PaddedBody(u64::MAX));
    w::set_global(&s.db.client, "@shared_1:example.org", "m.direct", r#"{"k":1}"#)
        .await
        .unwrap();
    let key = ("@shared_1:example.org".to_string(), None, "m.direct".to_string());
    assert!(
        s.b.wait_for(WAIT, |st| st.contains_key(&key)).await,
        "{}",
        relay.log_text()
    );
    let deadline = std::time::Instant::now() + WAIT;
    while s.a.attempts() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "A was not retried:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak = peak_rss(relay.pid().unwrap());
    eprintln!("relay peak RSS after {} attempts: {} MiB", s.a.attempts(), peak >> 20);
    assert!(
        peak < 100 << 20,
        "the relay buffered the endless answer: peak RSS {} MiB",
        peak >> 20
    );
    let log = relay.log_text();
    assert!(log.contains("larger than 1048576 bytes"), "{log}");
    s.a.set_mode(ReceiverMode::Accept);
    assert!(
        s.a.wait_for(WAIT, |st| st.contains_key(&key)).await,
        "{}",
        relay.log_text()
    );
    drop(relay);
    s.db.drop_slot().await;
}

/// A transaction is visible only once committed: the check the relay makes before reading a value
/// back (pgoutput can deliver a commit a moment before other sessions see it).
async fn visibility_check_follows_commit(server: &'static Server) {
    use synapse_account_data_relay::synapse::current::wait_until_visible;
    let db = crate::support::TestDb::new(server).await;
    let writer = db.connect().await;
    writer.batch_execute("BEGIN").await.unwrap();
    let xid: i64 = writer
        .query_one("SELECT txid_current() % 4294967296", &[])
        .await
        .unwrap()
        .get(0);
    let xid = u32::try_from(xid).unwrap();
    let waiting = {
        let reader = db.connect().await;
        tokio::spawn(async move { wait_until_visible(&reader, &[xid]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "an open transaction is not visible");
    writer.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("visible after commit")
        .unwrap()
        .unwrap();
}
