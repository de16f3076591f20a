//! PostgreSQL high availability, with real servers: a primary and a physical standby as
//! containers on a private Docker network of the test's own (`support::ha`), each with its own
//! address. Libpq-style multi-host connections that find the primary and name every host they
//! refused; `setup` and `check` listing the settings a promotion without a resync needs, on the
//! primary and the standby, with the statements; whether the failover slot is safe yet, in
//! `check`, `status`, `/readyz` and the metrics; PostgreSQL 18's `idle_replication_slot_timeout`
//! through the lost-slot path. The promotions under load (with and without a failover slot, the
//! old primary coming back, a lagging standby) are scenarios of the fault suite
//! (`tests/faults`), with its per-key check.

use std::time::Duration;

use synapse_account_data_relay::model::Secret;
use synapse_account_data_relay::postgres::config::{PgConnectionConfig, SslMode};
use synapse_account_data_relay::postgres::hosts::{PgEndpoint, PgHost, TargetSessionAttrs};
use synapse_account_data_relay::postgres::sql::connect_sql;
use synapse_account_data_relay::replication::connection::ReplicationConnection;
use synapse_account_data_relay::replication::error::ReplicationError;
use synapse_account_data_relay::testkit::free_port;
use synapse_account_data_relay::testkit::synapse_writes as w;

use crate::support::ha::{HaCluster, HaOptions};
use crate::support::scenario::*;
use crate::support::{eventually, text, wait_for_log};

fn config(hosts: &[(&str, u16)], attrs: TargetSessionAttrs) -> PgConnectionConfig {
    let mut cfg = PgConnectionConfig::new(PgHost::Tcp(hosts[0].0.into()), hosts[0].1, "postgres", "postgres");
    cfg.ssl_mode = SslMode::Disable;
    cfg.password = None::<Secret>;
    cfg.connect_timeout = Duration::from_secs(3);
    cfg.more_hosts = hosts[1..]
        .iter()
        .map(|(h, p)| PgEndpoint {
            host: PgHost::Tcp((*h).into()),
            port: *p,
        })
        .collect();
    cfg.target_session_attrs = attrs;
    cfg
}

/// Hosts are tried in order and only the primary is accepted, by the replication connection
/// and the SQL connections alike; when none is, the error names every host and why. Then, on
/// the same pair without slot synchronisation, `setup` and `check` with
/// `replication.failover = true` name every missing setting on the primary and the standby with
/// its statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_connections_and_missing_failover_settings() {
    let ha = HaCluster::start("conn", HaOptions::new(17, false), 1);
    let (primary, standby) = (ha.nodes[0].ip.clone(), ha.nodes[1].ip.clone());
    // Standby first, as after a failover: skipped, with the reason in the log.
    let cfg = config(&[(&standby, 5432), (&primary, 5432)], TargetSessionAttrs::Primary);
    let mut conn = ReplicationConnection::connect(&cfg).await.unwrap();
    assert!(conn.target().contains(&primary), "{}", conn.target());
    conn.identify_system().await.unwrap();
    conn.close().await;
    let c = connect_sql(&cfg).await.unwrap();
    let in_recovery: bool = c.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get(0);
    assert!(!in_recovery, "the SQL connection went to the standby");
    // read-write also refuses a primary that is read-only by default.
    let mut ro = config(&[(&primary, 5432)], TargetSessionAttrs::ReadWrite);
    ro.options = Some("-c default_transaction_read_only=on".into());
    let e = connect_sql(&ro).await.unwrap_err().to_string();
    assert!(e.contains("default_transaction_read_only = on"), "{e}");
    ro.target_session_attrs = TargetSessionAttrs::Primary;
    connect_sql(&ro).await.unwrap();
    // `any` takes the first server that answers, the standby here (how `check` looks at it).
    let any = config(&[(&standby, 5432), (&primary, 5432)], TargetSessionAttrs::Any);
    let c = connect_sql(&any).await.unwrap();
    let in_recovery: bool = c.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get(0);
    assert!(in_recovery);
    // No primary among the hosts: every host named, with why it was refused.
    let closed = free_port().unwrap();
    let none = config(&[(&standby, 5432), ("127.0.0.1", closed)], TargetSessionAttrs::Primary);
    let e = ReplicationConnection::connect(&none).await.unwrap_err();
    assert!(matches!(e, ReplicationError::NoHostAccepted { .. }), "{e:?}");
    assert!(e.is_transient(), "a standby may be promoted: worth retrying");
    let t = e.to_string();
    assert!(
        t.contains(&format!("{standby}:5432: it is a standby (in recovery)"))
            && t.contains(&format!("127.0.0.1:{closed}: "))
            && t.contains("tried 2 hosts"),
        "{t}"
    );
    let t = connect_sql(&none).await.unwrap_err().to_string();
    assert!(
        t.contains("it is a standby") && t.contains(&format!("127.0.0.1:{closed}")),
        "{t}"
    );

    // The relay with Synapse's multi-host form (standby first) and replication.failover = true,
    // on a pair that does not synchronise slots.
    let server = ha.server(&[1, 0]);
    let s = prepare_with(server, &[], "").await;
    for f in ["relay-admin.toml", "relay.toml"] {
        let f = s.files.path().join(f);
        let t = std::fs::read_to_string(&f).unwrap();
        std::fs::write(&f, t.replacen("[replication]\n", "[replication]\nfailover = true\n", 1)).unwrap();
    }
    // Again with replication.failover = true: a failover slot.
    s.db.drop_slot().await;
    let out = s.files.command("setup", &[]);
    let t = text(&out);
    assert!(out.status.success(), "setup does its own part: {t}");
    for needle in [
        "failover: what a promotion without a resync still needs",
        "synchronized_standby_slots is not set on the primary",
        &format!("ALTER SYSTEM SET synchronized_standby_slots = '{}'", ha.nodes[1].slot),
        &format!("on the standby at postgres@{standby}:5432/"),
        "sync_replication_slots is off",
        "ALTER SYSTEM SET sync_replication_slots = on; SELECT pg_reload_conf();",
    ] {
        assert!(t.contains(needle), "{needle:?} not in setup's output:\n{t}");
    }
    let out = s.files.command("check", &[]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("FAIL     on the standby at") && t.contains("sync_replication_slots is off"),
        "{t}"
    );
    assert!(t.contains("failover slot: NOT SAFE YET"), "{t}");
    // A slot created without failover = true gets the statement that changes it.
    s.db.drop_slot().await;
    s.db.client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&s.db.name],
        )
        .await
        .unwrap();
    let t = text(&s.files.command("check", &[]));
    assert!(
        t.contains(&format!("ALTER_REPLICATION_SLOT \"{}\" (FAILOVER true)", s.db.name)),
        "{t}"
    );
}

/// Synapse's own multi-host form with a port per host (the report: `setup` refused
/// `port: "55601,55602"`): the first host does not answer, the second is used, by `setup` and
/// `run` alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapses_multi_host_form_with_a_port_per_host() {
    let server = crate::support::pg15();
    let s = prepare(server).await;
    let closed = free_port().unwrap();
    let hs = s.files.path().join("homeserver.yaml");
    let t = std::fs::read_to_string(&hs).unwrap();
    let t = t.replace(
        &format!("    host: \"127.0.0.1\"\n    port: {}\n", server.port),
        &format!(
            "    host: \"127.0.0.1,127.0.0.1\"\n    port: \"{closed},{}\"\n    target_session_attrs: read-write\n",
            server.port
        ),
    );
    assert!(t.contains(&format!("{closed},")), "{t}");
    std::fs::write(&hs, t).unwrap();
    let out = s.files.command("setup", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let relay = start_relay(&s).await;
    let c = s.db.connect().await;
    w::set_global(&c, "@a_1:example.org", "org.example.multi", "{\"n\":1}")
        .await
        .unwrap();
    let want = s.db.final_state(interested_a).await;
    assert!(
        s.a.wait_for(WAIT, |got| want.iter().all(|(k, v)| got.get(k) == Some(v)))
            .await,
        "{}",
        relay.log_text()
    );
    assert!(
        relay
            .log_text()
            .contains("replication connection: earlier hosts of the list were refused"),
        "{}",
        relay.log_text()
    );
}

/// With everything in place, `check` right after `setup` says the failover slot is not safe yet
/// (the standby's copy is missing or temporary until the slot moves on the primary); once the
/// relay streamed and the copy was persisted, `check`, `status`, `/status.json`, `/readyz` and
/// the metrics say it is safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_slot_safety_is_reported() {
    let ha = HaCluster::start("safe", HaOptions::new(17, true), 1);
    let server = ha.server(&[0, 1]);
    let port = free_port().unwrap();
    let s = prepare_with(server, &[], &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n")).await;
    for f in ["relay-admin.toml", "relay.toml"] {
        let f = s.files.path().join(f);
        let t = std::fs::read_to_string(&f).unwrap();
        std::fs::write(&f, t.replacen("[replication]\n", "[replication]\nfailover = true\n", 1)).unwrap();
    }
    // prepare_with created the slot without failover: start again with a failover slot.
    s.db.drop_slot().await;
    let out = s.files.command("setup", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let out = s.files.command("check", &[]);
    let t = text(&out);
    assert!(
        t.contains("failover: the settings a promotion without a resync needs are in place"),
        "{t}"
    );
    assert!(
        t.contains("warning  failover slot: NOT SAFE YET"),
        "nothing moved the slot yet:\n{t}"
    );
    let relay = start_relay(&s).await;
    let c = s.db.connect().await;
    w::set_global(&c, "@a_1:example.org", "m.direct", "{\"x\":1}")
        .await
        .unwrap();
    assert!(
        ha.wait_for_synced_copy(1, &s.db.name, Duration::from_secs(90)),
        "the standby's copy was never persisted:\n{}",
        ha.logs(1)
    );
    synapse_account_data_relay::delivery::worker::install_crypto_provider();
    let base = format!("http://127.0.0.1:{port}");
    let scraped = eventually(Duration::from_secs(60), || async {
        let client = reqwest::Client::new();
        match client.get(format!("{base}/metrics")).send().await {
            Ok(r) => r
                .text()
                .await
                .unwrap_or_default()
                .lines()
                .any(|l| l == "synapse_account_data_relay_failover_slot_safe 1"),
            Err(_) => false,
        }
    })
    .await;
    assert!(scraped, "failover_slot_safe never 1:\n{}", relay.log_text());
    let body = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains(&format!(
            "synapse_account_data_relay_failover_slot_standby_synced{{standby=\"{}\"}} 1",
            ha.nodes[1].slot
        )),
        "{body}"
    );
    let readyz = reqwest::get(format!("{base}/readyz"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!readyz.contains("failover slot not safe"), "{readyz}");
    let out = s.files.command("status", &["--json"]);
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(status["failover"]["safe"], true, "{status:#}");
    assert_eq!(status["relay"]["failover"]["safe"], true, "{status:#}");
    let t = text(&s.files.command("check", &[]));
    assert!(t.contains("ok       failover slot: safe"), "{t}");
    assert!(
        relay
            .log_text()
            .contains("the failover slot is safe: every standby in synchronized_standby_slots holds"),
        "{}",
        relay.log_text()
    );
}

/// PostgreSQL 18 invalidates a slot unused for longer than `idle_replication_slot_timeout`
/// (at a checkpoint): the relay, started again, takes the lost-slot path, says why
/// (`invalidation_reason = idle_timeout`), re-creates the slot and resyncs, and delivers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_replication_slot_timeout_goes_through_the_lost_slot_path() {
    let server = crate::support::own_pg18(&[("idle_replication_slot_timeout", "1s")]);
    let s = prepare(server).await;
    let mut relay = start_relay(&s).await;
    let c = s.db.connect().await;
    w::set_global(&c, "@a_1:example.org", "org.example.before", "{\"n\":1}")
        .await
        .unwrap();
    relay.terminate();
    // Unused for more than the timeout; a checkpoint invalidates it.
    let invalidated = eventually(Duration::from_secs(60), || async {
        let _ = s.db.client.batch_execute("CHECKPOINT").await;
        s.db.client
            .query_opt(
                "SELECT invalidation_reason FROM pg_replication_slots WHERE slot_name = $1",
                &[&s.db.name],
            )
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<_, Option<String>>(0))
            .is_some_and(|r| r == "idle_timeout")
    })
    .await;
    assert!(invalidated, "PostgreSQL 18 did not invalidate the idle slot");
    w::set_global(&c, "@a_1:example.org", "org.example.while_lost", "{\"n\":2}")
        .await
        .unwrap();
    let relay = s.files.spawn_run();
    assert!(
        wait_for_log(
            &relay,
            "resync requested after the slot was lost",
            Duration::from_secs(60)
        )
        .await,
        "{}",
        relay.log_text()
    );
    let log = relay.log_text();
    assert!(
        log.contains("invalidation_reason = idle_timeout") && log.contains("idle_replication_slot_timeout"),
        "{log}"
    );
    w::set_global(&c, "@a_1:example.org", "org.example.after", "{\"n\":3}")
        .await
        .unwrap();
    let want = s.db.final_state(interested_a).await;
    assert!(
        s.a.wait_for(WAIT, |got| want.iter().all(|(k, v)| got.get(k) == Some(v)))
            .await,
        "A did not get the database's state after the slot was re-created:\n{}",
        relay.log_text()
    );
}

/// A few end-to-end tests on PostgreSQL 18 (the whole suite runs on 15 and 17).
mod pg18_container {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn end_to_end_random_writes() {
        crate::end_to_end::end_to_end_random_writes(crate::support::pg18()).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_after_kill_loses_nothing() {
        crate::end_to_end::restart_after_kill_loses_nothing(crate::support::pg18()).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn setup_defuses_the_replica_identity_landmine() {
        crate::provisioning::setup_defuses_the_replica_identity_landmine(crate::support::pg18()).await
    }
}
