//! The standard scenario: appservices A (`@a_*`, `@shared_*`, sender `@abot`) and B (`@b_*` on
//! example.org only, `@shared_*`, sender `@bbot`) opted in, C (`@c_*`) not; Synapse-style random
//! writes; and the check that each receiver holds exactly the database's final state.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use synapse_account_data_relay::testkit::receiver::RecordingAppservice;
use synapse_account_data_relay::testkit::synapse_writes as w;
use tokio_postgres::Client;

use crate::support::{RegistrationSpec, RelayFiles, RelayProcess, Server, TestDb, diff, histories, text, wait_for_log};

pub const WAIT: Duration = Duration::from_secs(60);

/// Appservice A: `@a_*`, `@shared_*` and its sender; B: `@b_*`, `@shared_*`; C: `@c_*`, not opted in.
/// Only local users (`:example.org`) are ever sent.
pub fn interested_a(u: &str) -> bool {
    u.ends_with(":example.org") && (u.starts_with("@a_") || u.starts_with("@shared_") || u == "@abot:example.org")
}
pub fn interested_b(u: &str) -> bool {
    u.ends_with(":example.org") && (u.starts_with("@b_") || u.starts_with("@shared_") || u == "@bbot:example.org")
}

pub struct Setup {
    pub db: TestDb,
    pub a: RecordingAppservice,
    pub b: RecordingAppservice,
    pub c: RecordingAppservice,
    pub files: RelayFiles,
}

/// Appservices A and B opted in, C not; setup done.
pub async fn prepare(server: &'static Server) -> Setup {
    prepare_with(server, &[], "").await
}

/// As [`prepare`], with `[delivery]` keys and extra relay.toml text (see [`RelayFiles::with_delivery`]).
pub async fn prepare_with(server: &'static Server, delivery: &[(&str, toml::Value)], extra_toml: &str) -> Setup {
    let db = TestDb::new(server).await;
    let a = RecordingAppservice::start("hs_token_a").await.unwrap();
    let b = RecordingAppservice::start("hs_token_b").await.unwrap();
    let c = RecordingAppservice::start("hs_token_c").await.unwrap();
    let (ua, ub, uc) = (a.url(), b.url(), c.url());
    let files = RelayFiles::with_delivery(
        &db,
        &[
            RegistrationSpec {
                id: "a",
                url: Some(&ua),
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
                user_regexes: &["@b_.*:example\\.org", "@shared_.*"],
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
        delivery,
        extra_toml,
    );
    // `run` (and every other subcommand but setup and teardown) uses a role of its own with only
    // what `setup --grant-to` grants, as the README recommends; setup runs as the owner.
    create_run_role(&db).await;
    let out = files.command("setup", &["--grant-to", RUN_ROLE]);
    assert!(out.status.success(), "setup: {}", text(&out));
    files.run_as(RUN_ROLE);
    Setup { db, a, b, c, files }
}

/// The least-privileged role the scenarios run the relay as.
pub const RUN_ROLE: &str = "relay_run";

/// Creates [`RUN_ROLE`] (cluster-wide, so shared by all tests; without REPLICATION, which
/// `setup --grant-to` adds) unless it exists.
pub async fn create_run_role(db: &TestDb) {
    db.client
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {RUN_ROLE} LOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ))
        .await
        .unwrap();
}

pub async fn start_relay(s: &Setup) -> RelayProcess {
    let relay = s.files.spawn_run();
    assert!(
        wait_for_log(&relay, "streaming account-data changes", Duration::from_secs(20)).await,
        "relay did not start streaming:\n{}",
        relay.log_text()
    );
    relay
}

pub const USERS: &[&str] = &[
    "@a_1:example.org",
    "@a_2:example.org",
    "@b_1:example.org",
    "@b_2:example.org",
    "@b_3:example.org",
    // In B's namespace but not on this homeserver: never sent.
    "@b_remote:other.example",
    "@shared_1:example.org",
    "@c_1:example.org",
    "@nobody:example.org",
    "@abot:example.org",
];
pub const ROOMS: &[&str] = &["!r1:example.org", "!r2:example.org"];

/// One random Synapse-style write.
pub async fn random_write(c: &Client, rng: &mut StdRng, i: usize) {
    try_random_write(c, rng, i)
        .await
        .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
}

/// [`random_write`], returning the error (for writes while the server may go away).
pub async fn try_random_write(c: &Client, rng: &mut StdRng, i: usize) -> Result<(), tokio_postgres::Error> {
    let user = USERS[rng.random_range(0..USERS.len())];
    let room = ROOMS[rng.random_range(0..ROOMS.len())];
    match rng.random_range(0..10) {
        0..=2 => {
            let ty = ["m.direct", "org.example.config", "m.ignored_user_list"][rng.random_range(0..3)];
            w::set_global(c, user, ty, &format!("{{\"n\":{i},\"s\":\"caf\\u00e9\"}}")).await
        }
        3 => w::delete_global(c, user, ["m.direct", "org.example.config"][rng.random_range(0..2)]).await,
        4..=5 => {
            let ty = ["m.fully_read", "org.example.room"][rng.random_range(0..2)];
            w::set_room(c, user, room, ty, &format!("{{\"event_id\":\"$e{i}\"}}")).await
        }
        6..=7 => {
            w::add_tag(
                c,
                user,
                room,
                ["u.work", "m.favourite"][rng.random_range(0..2)],
                &format!("{{\"order\":{}}}", i % 7),
            )
            .await
        }
        8 => w::remove_tag(c, user, room, ["u.work", "m.favourite"][rng.random_range(0..2)]).await,
        _ => {
            // A large value (stored TOASTed), then an UPDATE that leaves it alone: pgoutput sends
            // "unchanged TOAST" for content, which must be read back, not sent as empty.
            let big = format!("{{\"blob\":\"{}\",\"n\":{i}}}", "x".repeat(20_000 + i));
            w::set_global(c, user, "org.example.big", &big).await?;
            c.execute(
                "UPDATE account_data SET stream_id = stream_id + 1 WHERE user_id = $1 AND account_data_type = 'org.example.big'",
                &[&user],
            )
            .await
            .map(|_| ())
        }
    }
}

pub async fn write_randomly(s: &Setup, seed: u64, ops: usize, writers: usize) {
    let mut tasks = Vec::new();
    for wi in 0..writers {
        let c = s.db.connect().await;
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed + wi as u64);
            for i in 0..ops {
                random_write(&c, &mut rng, i * writers + wi).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

pub async fn assert_final_states(s: &Setup, relay: &RelayProcess) {
    let want_a = s.db.final_state(interested_a).await;
    let want_b = s.db.final_state(interested_b).await;
    assert!(!want_a.is_empty() && !want_b.is_empty());
    let ok_a = s.a.wait_for(WAIT, |got| *got == want_a).await;
    let ok_b = s.b.wait_for(WAIT, |got| *got == want_b).await;
    assert!(
        ok_a,
        "appservice A differs from the database:\n{}{}\nrelay log:\n{}",
        diff(&s.a.state(), &want_a),
        histories(&s.a, &want_a),
        relay.log_text()
    );
    assert!(
        ok_b,
        "appservice B differs from the database:\n{}{}\nrelay log:\n{}",
        diff(&s.b.state(), &want_b),
        histories(&s.b, &want_b),
        relay.log_text()
    );
    assert_eq!(
        s.c.attempts(),
        0,
        "the appservice that did not opt in received something"
    );
    assert_eq!(s.a.bad_auth() + s.b.bad_auth(), 0, "hs_token sent as the bearer token");
}

/// `teardown` then `setup`: a fresh slot (and state schema), so what was written before is not in
/// the stream and reaches appservices only through a backfill.
pub fn recreate_slot(s: &Setup) {
    for (command, args) in [("teardown", &[][..]), ("setup", &["--grant-to", RUN_ROLE][..])] {
        let out = s.files.command(command, args);
        assert!(out.status.success(), "{command}: {}", text(&out));
    }
}

/// Wait until the relay has confirmed everything the server has written (it processed it all).
pub async fn wait_until_caught_up(s: &Setup, relay: &RelayProcess) {
    let (_, target) = s.db.slot_position().await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (confirmed, _) = s.db.slot_position().await;
        if confirmed >= target {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay did not catch up:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
