//! Restarts and outage recovery: an appservice whose stream lags the WAL tip still returns to
//! live delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use synapse_account_data_relay::testkit::proxy::FaultProxy;
use synapse_account_data_relay::testkit::receiver::ReceiverMode;
use synapse_account_data_relay::testkit::synapse_writes as w;

use crate::on_both_servers;
use crate::support::scenario::*;
use crate::support::{Server, text, wait_for_log};

/// How late the replication stream arrives (the drain polls about once a second, so before the
/// fix the switch point moved on faster than a lagging stream could reach it).
const LAG: Duration = Duration::from_secs(10);

/// The replication stream runs `LAG` behind the WAL tip (a proxy delays what the server sends on
/// the replication connection). A backfill switches A to recording mode; its drain ends, and A
/// is back to live once the stream reaches the first switch point: one horizon marker, one
/// "resync complete", and a change written afterwards goes out live.
async fn lagging_stream_returns_to_live(server: &'static Server) {
    let s = prepare_with(server, &[("backfill_new_appservices", toml::Value::Boolean(false))], "").await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], server.port).into()).await.unwrap();
    proxy.set_replication_lag(LAG);
    let hs = s.files.path().join("homeserver.yaml");
    let yaml = std::fs::read_to_string(&hs).unwrap();
    let rehomed = yaml.replace(
        &format!("port: {}", server.port),
        &format!("port: {}", proxy.addr().port()),
    );
    assert_ne!(yaml, rehomed, "homeserver.yaml names the server's port");
    std::fs::write(&hs, rehomed).unwrap();
    let c = &s.db.client;
    for i in 0..20 {
        w::set_global(c, &format!("@a_{i}:example.org"), "m.direct", &format!("{{\"n\":{i}}}"))
            .await
            .unwrap();
    }
    let relay = s.files.spawn_run();
    assert!(
        wait_for_log(&relay, "streaming account-data changes", LAG * 3).await,
        "relay did not start streaming:\n{}",
        relay.log_text()
    );
    // The start catches up live (the keys written before it go out with their current values).
    let key = |i: usize| (format!("@a_{i}:example.org"), None, "m.direct".to_owned());
    assert!(
        s.a.wait_for(LAG * 4, |st| st.contains_key(&key(19))).await,
        "A did not catch up after the start:\n{}",
        relay.log_text()
    );
    let before = relay.log_text();
    let (completes, lives) = (
        before.matches("resync complete").count(),
        before.matches("INFO back to live delivery appservice=a").count(),
    );
    let out = s.files.command("backfill", &["--appservice", "a"]);
    assert!(out.status.success(), "backfill: {}", text(&out));
    let started = Instant::now();
    // The resync request arrives through the lagging stream; the drain then delivers the keys
    // and sets its switch point; the stream reaches it about LAG later.
    let deadline = started + LAG * 6;
    loop {
        let log = relay.log_text();
        if log.matches("INFO back to live delivery appservice=a").count() > lives {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A did not return to live within {:?} after the backfill (stream lag {LAG:?}):\n{log}",
            LAG * 6
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = relay.log_text();
    assert_eq!(
        log.matches("resync complete").count(),
        completes + 1,
        "one switch point (one horizon marker) per switch, not one per empty drain:\n{log}"
    );
    assert!(s.a.state().contains_key(&key(19)), "{log}");
    // Live again: a new value arrives without another drain.
    w::set_global(c, "@a_3:example.org", "m.direct", "{\"live\":true}")
        .await
        .unwrap();
    let want = serde_json::json!({"live": true});
    assert!(
        s.a.wait_for(LAG * 4, |st| st.get(&key(3)) == Some(&want)).await,
        "{}",
        relay.log_text()
    );
    assert_eq!(
        relay.log_text().matches("resync complete").count(),
        completes + 1,
        "the live change went out without another drain:\n{}",
        relay.log_text()
    );
    drop(relay);
    s.db.drop_slot().await;
}

/// A drain whose first keys are recorded again faster than a page round trip (a slow appservice,
/// busy users) still reaches every other key: each page continues after the last key of the one
/// before, instead of starting again at the smallest key (whose new versions it cannot delete).
async fn keys_recorded_again_cannot_starve_the_rest(server: &'static Server) {
    let s = prepare_with(
        server,
        &[
            ("backfill_new_appservices", toml::Value::Boolean(false)),
            ("max_entries_per_transaction", toml::Value::Integer(5)),
        ],
        "",
    )
    .await;
    let c = &s.db.client;
    let user = |i: usize| format!("@a_u{i:03}:example.org");
    for i in 0..100 {
        w::set_global(c, &user(i), "m.direct", &format!("{{\"n\":{i}}}"))
            .await
            .unwrap();
    }
    w::set_global(c, "@b_1:example.org", "m.direct", "{}").await.unwrap();
    let relay = start_relay(&s).await;
    wait_until_caught_up(&s, &relay).await;
    // Each transaction takes 300 ms; the first page's five keys change every 20 ms meanwhile.
    s.a.set_mode(ReceiverMode::Delay(Duration::from_millis(300)));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, stop) = (s.db.connect().await, stop.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..5 {
                    w::set_global(&c, &user(i), "m.direct", &format!("{{\"busy\":{n}}}"))
                        .await
                        .unwrap();
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The backfill sends @a_u099 again: count the transactions that carry it.
    let carrying_last = || {
        s.a.transactions()
            .iter()
            .filter(|t| t.body.to_string().contains(&user(99)))
            .count()
    };
    let before = carrying_last();
    let out = s.files.command("backfill", &["--appservice", "a"]);
    assert!(out.status.success(), "backfill: {}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut reached = false;
    while Instant::now() < deadline {
        if carrying_last() > before {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(
        reached,
        "the keys after the first page never reached A while the first page's keys kept being recorded again:\n{}",
        relay.log_text()
    );
    s.a.set_mode(ReceiverMode::Accept);
    assert_final_states(&s, &relay).await;
    drop(relay);
    s.db.drop_slot().await;
}

/// `…_appservice_recorded_keys` of a scrape.
async fn recorded_keys_metric(base: &str, id: &str) -> Option<f64> {
    synapse_account_data_relay::delivery::worker::install_crypto_provider();
    let body = reqwest::get(format!("{base}/metrics")).await.ok()?.text().await.ok()?;
    let name = format!("synapse_account_data_relay_appservice_recorded_keys{{appservice=\"{id}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&name))
        .and_then(|v| v.trim().parse().ok())
}

/// Scans of `pending_keys` so far (sequential and index).
async fn pending_keys_scans(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables \
         WHERE schemaname = 'synapse_account_data_relay' AND relname = 'pending_keys'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The recorded-key counts the metrics show come from the relay's own counters: while an
/// appservice is down with keys recorded, the gauge equals the table's count, and the metrics
/// poll (every 5 s) reads nothing from `pending_keys` (it used to count the whole table with a
/// `GROUP BY` each time). The relay's SQL connections run under a `statement_timeout`.
async fn recorded_key_counts_cost_no_scans(server: &'static Server) {
    let port = synapse_account_data_relay::testkit::free_port().unwrap();
    let s = prepare_with(
        server,
        &[("backfill_new_appservices", toml::Value::Boolean(false))],
        &format!("[retention]\nmax_failing = \"1s\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .await;
    let base = format!("http://127.0.0.1:{port}");
    s.a.set_mode(ReceiverMode::Fail(500));
    let relay = start_relay(&s).await;
    let c = &s.db.client;
    w::set_global(c, "@b_1:example.org", "m.direct", "{}").await.unwrap();
    for round in 0..3 {
        for i in 0..30 {
            w::set_global(
                c,
                &format!("@a_k{i}:example.org"),
                "m.direct",
                &format!("{{\"r\":{round}}}"),
            )
            .await
            .unwrap();
        }
    }
    let recorded = || async {
        c.query_one(
            "SELECT count(*) FROM synapse_account_data_relay.pending_keys WHERE appservice_id = 'a'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    let deadline = Instant::now() + WAIT;
    while recorded().await < 30 {
        assert!(Instant::now() < deadline, "keys not recorded:\n{}", relay.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while recorded_keys_metric(&base, "a").await != Some(30.0) {
        assert!(
            Instant::now() < deadline,
            "recorded_keys for A is {:?}, the table holds 30:\n{}",
            recorded_keys_metric(&base, "a").await,
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A keeps failing: its worker retries the same page, nothing is recorded or read meanwhile;
    // two metrics polls later, the table has not been scanned again. (A backend may hold its
    // statistics back for up to 10 s: let those of the drain's last read arrive first.)
    tokio::time::sleep(Duration::from_secs(11)).await;
    let scans = pending_keys_scans(c).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        pending_keys_scans(c).await,
        scans,
        "pending_keys was scanned while nothing changed:\n{}",
        relay.log_text()
    );
    assert_eq!(recorded_keys_metric(&base, "a").await, Some(30.0));
    // The relay's own connections are bounded on the server.
    let cfg = server.connection_config(
        &s.db.name,
        "postgres",
        None,
        synapse_account_data_relay::postgres::config::SslMode::Disable,
    );
    let bounded = synapse_account_data_relay::postgres::sql::connect_sql_bounded(
        &cfg,
        synapse_account_data_relay::delivery::synapse_db::SQL_TIMEOUT,
    )
    .await
    .unwrap();
    let setting: String = bounded.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
    assert_eq!(setting, "30s");
    s.a.set_mode(ReceiverMode::Accept);
    assert_final_states(&s, &relay).await;
    drop(relay);
    s.db.drop_slot().await;
}

/// Rows written to `pending_keys` so far (inserted or updated).
async fn pending_keys_writes(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables \
         WHERE schemaname = 'synapse_account_data_relay' AND relname = 'pending_keys'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A restart after a backlog of fewer distinct keys than `retention.max_queued_keys` holds it
/// in memory, coalesced per key, and delivers each key's latest value once the stream has
/// passed the start position: the appservices end up with the database's state and nothing is
/// written to the relay's schema.
async fn restart_backlog_writes_no_rows(server: &'static Server) {
    let s = prepare_with(server, &[("backfill_new_appservices", toml::Value::Boolean(false))], "").await;
    let c = &s.db.client;
    w::set_global(c, "@a_1:example.org", "m.direct", "{\"before\":1}")
        .await
        .unwrap();
    w::set_global(c, "@b_1:example.org", "m.direct", "{\"before\":1}")
        .await
        .unwrap();
    let mut relay = start_relay(&s).await;
    assert_final_states(&s, &relay).await;
    relay.terminate();
    // The backlog: 3 rounds over 100 keys (A's, B's and shared users), tags and deletions too.
    for round in 0..3 {
        for i in 0..100 {
            let user = format!("@{}_{}:example.org", ["a", "b", "shared"][i % 3], i);
            w::set_global(c, &user, "m.direct", &format!("{{\"round\":{round}}}"))
                .await
                .unwrap();
        }
        w::add_tag(c, "@a_1:example.org", "!r:example.org", &format!("u.{round}"), "{}")
            .await
            .unwrap();
    }
    w::delete_global(c, "@b_1:example.org", "m.direct").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = pending_keys_writes(c).await;
    let relay = start_relay(&s).await;
    assert_final_states(&s, &relay).await;
    // A backend may hold its statistics back for up to 10 s.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        pending_keys_writes(c).await,
        writes,
        "the restart wrote keys to the relay's schema:\n{}",
        relay.log_text()
    );
    drop(relay);
    s.db.drop_slot().await;
}

on_both_servers!(
    lagging_stream_returns_to_live,
    keys_recorded_again_cannot_starve_the_rest,
    recorded_key_counts_cost_no_scans,
    restart_backlog_writes_no_rows
);
