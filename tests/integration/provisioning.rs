//! `setup`, `check` and `teardown` against a real server, and the replica-identity landmine.

use crate::on_both_servers;
use crate::support::{RegistrationSpec, RelayFiles, Server, TestDb, text};
use synapse_account_data_relay::testkit::synapse_writes as w;

fn files(db: &TestDb) -> RelayFiles {
    RelayFiles::new(
        db,
        &[RegistrationSpec {
            id: "a",
            url: Some("http://127.0.0.1:9"),
            hs_token: "hs_a",
            sender_localpart: "abot",
            user_regexes: &["@a_.*"],
            opt_in: true,
        }],
        "",
    )
}

async fn replica_identities(db: &TestDb) -> Vec<(String, String)> {
    db.client
        .query(
            "SELECT relname::text, relreplident::text FROM pg_class \
             WHERE relname IN ('account_data', 'room_account_data', 'room_tags_revisions', 'room_tags') ORDER BY relname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn synapse_writes_succeed(db: &TestDb) -> Result<(), tokio_postgres::Error> {
    w::set_global(&db.client, "@a_1:example.org", "m.direct", "{\"x\":1}").await?;
    w::set_global(&db.client, "@a_1:example.org", "m.direct", "{\"x\":2}").await?;
    w::delete_global(&db.client, "@a_1:example.org", "m.direct").await?;
    w::set_room(&db.client, "@a_1:example.org", "!r:example.org", "m.fully_read", "{}").await?;
    w::set_room(
        &db.client,
        "@a_1:example.org",
        "!r:example.org",
        "m.fully_read",
        "{\"event_id\":\"$e\"}",
    )
    .await?;
    w::add_tag(&db.client, "@a_1:example.org", "!r:example.org", "u.work", "{}").await?;
    w::add_tag(
        &db.client,
        "@a_1:example.org",
        "!r:example.org",
        "u.work",
        "{\"order\":1}",
    )
    .await?;
    w::remove_tag(&db.client, "@a_1:example.org", "!r:example.org", "u.work").await?;
    Ok(())
}

/// The landmine is real: a publication over a table without replica identity fails Synapse's
/// upserts. After `setup`, every kind of Synapse write succeeds.
pub(crate) async fn setup_defuses_the_replica_identity_landmine(server: &'static Server) {
    let db = TestDb::new(server).await;
    // First show the failure the relay must never cause, on a throw-away publication.
    db.client
        .batch_execute("CREATE PUBLICATION landmine FOR TABLE account_data")
        .await
        .unwrap();
    // Even a new key fails: INSERT … ON CONFLICT DO UPDATE is checked as an UPDATE.
    let err = w::set_global(&db.client, "@a_1:example.org", "t", "{}")
        .await
        .expect_err("Synapse's upsert must fail");
    assert!(
        format!("{err:?}").contains("does not have a replica identity"),
        "{err:?}"
    );
    db.client.batch_execute("DROP PUBLICATION landmine").await.unwrap();

    // A guard that fails any publication DDL while a published table lacks replica identity.
    db.client
        .batch_execute(
            "CREATE FUNCTION refuse_unsafe_publication() RETURNS event_trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF EXISTS (SELECT 1 FROM pg_publication_tables pt JOIN pg_class c ON c.relname = pt.tablename
                          JOIN pg_publication p ON p.pubname = pt.pubname
                          WHERE c.relreplident IN ('d', 'n') AND (p.pubupdate OR p.pubdelete)) THEN
                 RAISE EXCEPTION 'a table whose updates are published lacks a replica identity';
               END IF;
             END $$;
             CREATE EVENT TRIGGER guard ON ddl_command_end WHEN TAG IN ('CREATE PUBLICATION', 'ALTER PUBLICATION')
               EXECUTE FUNCTION refuse_unsafe_publication();",
        )
        .await
        .unwrap();

    let f = files(&db);
    let dry = f.command("setup", &["--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    let dry_text = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(
        dry_text.contains("REPLICA IDENTITY USING INDEX \"account_data_uniqueness\"")
            && dry_text.contains("CREATE PUBLICATION"),
        "{dry_text}"
    );
    assert!(
        replica_identities(&db).await.iter().all(|(_, r)| r == "d"),
        "--dry-run changed nothing"
    );

    let out = f.command("setup", &[]);
    assert!(out.status.success(), "setup failed: {}", text(&out));
    let ids = replica_identities(&db).await;
    assert_eq!(
        ids,
        vec![
            ("account_data".into(), "i".into()),
            ("room_account_data".into(), "i".into()),
            ("room_tags".into(), "d".into()),
            ("room_tags_revisions".into(), "i".into())
        ]
    );
    synapse_writes_succeed(&db)
        .await
        .expect("Synapse's writes succeed after setup");

    let again = f.command("setup", &[]);
    assert!(
        again.status.success() && text(&again).contains("nothing to do"),
        "setup is idempotent: {}",
        text(&again)
    );

    let check = f.command("check", &[]);
    assert!(check.status.success(), "check after setup: {}", text(&check));
    assert!(
        text(&check).contains("role \"postgres\" is a superuser: `run` needs only REPLICATION"),
        "check says run's role holds more than it needs: {}",
        text(&check)
    );

    let down = f.command("teardown", &[]);
    assert!(down.status.success(), "teardown: {}", text(&down));
    assert!(
        replica_identities(&db).await.iter().all(|(_, r)| r == "d"),
        "restored: {:?}",
        replica_identities(&db).await
    );
    let left: i64 = db
        .client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_publication WHERE pubname = $1) + (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1)",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "slot and publication dropped");
    synapse_writes_succeed(&db)
        .await
        .expect("Synapse's writes succeed after teardown");
}

/// `check` lists everything wrong and exits 1 before setup; `run` refuses to start, naming the
/// missing pieces, and changes nothing.
async fn check_and_run_refuse_an_unprepared_database(server: &'static Server) {
    let db = TestDb::new(server).await;
    let f = files(&db);
    let out = f.command("check", &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("replica identity default") && t.contains("publication") && t.contains("does not exist"),
        "{t}"
    );
    let run = f.command("run", &[]);
    let t = text(&run);
    assert_eq!(run.status.code(), Some(1), "{t}");
    assert!(t.contains("refusing to start"), "{t}");
    assert!(replica_identities(&db).await.iter().all(|(_, r)| r == "d"));

    // A table rebuilt by a migration after setup loses its replica identity: run refuses.
    assert!(f.command("setup", &[]).status.success());
    db.client
        .batch_execute("ALTER TABLE room_account_data REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    let run = f.command("run", &[]);
    let t = text(&run);
    assert_eq!(run.status.code(), Some(1), "{t}");
    assert!(t.contains("FAILING Synapse's writes"), "{t}");
    let again = f.command("setup", &[]);
    assert!(again.status.success(), "setup repairs the identity: {}", text(&again));
    assert!(replica_identities(&db).await.iter().filter(|(_, r)| r == "i").count() == 3);
    let down = f.command("teardown", &[]);
    assert!(down.status.success(), "{}", text(&down));
}

/// Synapse opens relative `app_service_config_files` entries from its working directory, not
/// from the config file's folder; so does the relay (`[synapse] working_directory`, default its
/// own), and `check` says which file it read.
#[tokio::test]
async fn relative_registration_paths_follow_synapses_working_directory() {
    let db = TestDb::new(crate::support::pg15()).await;
    let f = files(&db);
    // Synapse runs in synapse-home/, where its registration lives; homeserver.yaml is elsewhere.
    let home = f.path().join("synapse-home");
    std::fs::create_dir(&home).unwrap();
    std::fs::rename(f.path().join("a.yaml"), home.join("a.yaml")).unwrap();
    let toml = f.path().join("relay.toml");
    let text_before = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        format!("{text_before}[synapse]\nworking_directory = \"{}\"\n", home.display()),
    )
    .unwrap();
    let out = f.command("check", &[]);
    let t = text(&out);
    let read = format!("registration {} read", home.join("a.yaml").display());
    assert!(t.contains(&read), "check names the file it read ({read}):\n{t}");
    assert!(t.contains("relative to Synapse's working directory"), "{t}");
    assert!(t.contains("appservice \"a\" is served"), "{t}");
    // Without the setting, the relay's own working directory (here its files' folder) is used:
    // a.yaml is not there any more, and check says which path it tried.
    std::fs::write(&toml, &text_before).unwrap();
    let out = f.command("check", &[]);
    let t = text(&out);
    assert!(
        t.contains(&f.path().join("a.yaml").display().to_string()) && t.contains("FAIL"),
        "{t}"
    );
}

/// Without `wal_level=logical`, setup says how to fix it and that a restart is needed.
#[tokio::test]
async fn setup_explains_a_missing_wal_level() {
    let cluster = tokio::task::spawn_blocking(|| {
        synapse_account_data_relay::testkit::LocalCluster::start(
            synapse_account_data_relay::testkit::LocalClusterOptions {
                settings: vec![("wal_level".into(), "replica".into())],
                ..Default::default()
            },
        )
    })
    .await
    .unwrap()
    .expect("local cluster");
    let server: &'static Server = Box::leak(Box::new(Server {
        label: "replica",
        host: "127.0.0.1".into(),
        port: cluster.port(),
        local: None,
    }));
    let db = TestDb::new(server).await;
    let out = files(&db).command("setup", &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("wal_level") && t.contains("restart PostgreSQL") && t.contains("nothing was changed"),
        "{t}"
    );
    drop(cluster);
}

/// The SQL shipped in `sql/` for admins who apply it by hand prepares a stock Synapse database
/// exactly as `setup` does, and `teardown.sql` undoes it.
async fn shipped_sql_prepares_and_restores(server: &'static Server) {
    use synapse_account_data_relay::config::DEFAULT_NAME;
    use synapse_account_data_relay::config::Names;
    use synapse_account_data_relay::setup::checks::problems;
    use synapse_account_data_relay::setup::inspect::inspect;
    let db = TestDb::new(server).await;
    // The default slot name is cluster-wide: rename ours to this test's database name.
    let script = |name: &str| {
        std::fs::read_to_string(format!("{}/sql/{name}", env!("CARGO_MANIFEST_DIR")))
            .unwrap()
            .replace(DEFAULT_NAME, &db.name)
    };
    db.client
        .batch_execute(&script("setup.sql"))
        .await
        .expect("sql/setup.sql applies");
    let push_publication = format!("{}_push_rules", db.name);
    let names = Names {
        slot: &db.name,
        publication: &db.name,
        push_publication: &push_publication,
        state_schema: &db.name,
        failover_slot: false,
    };
    let state = inspect(&db.client, names).await.unwrap();
    let found = problems(&state, names);
    assert!(found.is_empty(), "{found:?}");
    synapse_writes_succeed(&db).await.expect("Synapse's writes succeed");
    db.client
        .batch_execute(&script("teardown.sql"))
        .await
        .expect("sql/teardown.sql applies");
    assert!(replica_identities(&db).await.iter().all(|(_, r)| r == "d"));
}

/// `setup`'s `ALTER TABLE … REPLICA IDENTITY` waits for an `ACCESS EXCLUSIVE` lock, and Synapse's
/// statements on the table queue behind it while it waits. A Synapse transaction holds the table
/// for 2 s: setup waits in short tries (`lock_timeout = 100ms`) and succeeds once it ends; a
/// writer on the table meanwhile is held up about one try at a time, never for the whole 2 s.
async fn setup_takes_table_locks_in_short_tries(server: &'static Server) {
    let db = TestDb::new(server).await;
    let f = files(&db);
    let mut synapse_tx = db.connect().await;
    let held = synapse_tx.transaction().await.unwrap();
    // What an open Synapse transaction that wrote to the table holds.
    held.batch_execute("LOCK TABLE account_data IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let setup = tokio::task::spawn_blocking(move || f.command("setup", &[]));
    // Another Synapse writer, measuring how long each of its statements takes meanwhile.
    let writer = db.connect().await;
    let started = std::time::Instant::now();
    let mut longest = std::time::Duration::ZERO;
    let mut n = 0;
    while started.elapsed() < std::time::Duration::from_secs(2) {
        let t = std::time::Instant::now();
        w::set_global(&writer, "@a_w:example.org", "m.direct", &format!("{{\"n\":{n}}}"))
            .await
            .unwrap();
        longest = longest.max(t.elapsed());
        n += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    held.commit().await.unwrap();
    let out = setup.await.unwrap();
    let out_text = text(&out);
    assert!(out.status.success(), "{out_text}");
    let tries: u32 = out_text
        .split("waited for Synapse's table locks: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("setup says it waited for the locks:\n{out_text}"));
    assert!(
        tries >= 3,
        "several short tries while the table was held: {tries}\n{out_text}"
    );
    eprintln!(
        "{}: setup retried {tries} times; {n} writes while it waited, the longest took {:?}",
        server.label, longest
    );
    assert_eq!(
        replica_identities(&db)
            .await
            .iter()
            .find(|(t, _)| t == "account_data")
            .map(|(_, r)| r.as_str()),
        Some("i")
    );
    synapse_writes_succeed(&db).await.unwrap();
    db.drop_slot().await;
}

on_both_servers!(
    setup_takes_table_locks_in_short_tries,
    setup_defuses_the_replica_identity_landmine,
    check_and_run_refuse_an_unprepared_database,
    shipped_sql_prepares_and_restores,
    works_as_synapses_own_unprivileged_role,
    failover_slots_on_postgresql_17,
);

/// The relay as a Synapse admin runs it: connected as Synapse's own role, which owns the tables
/// and has REPLICATION but is not a superuser. setup, run, backfill and teardown all work, and the
/// appservice ends with the database's final state.
async fn works_as_synapses_own_unprivileged_role(server: &'static Server) {
    use synapse_account_data_relay::testkit::receiver::RecordingAppservice;
    let admin = crate::support::connect(server, "postgres").await;
    let role = format!("synapse_{}", std::process::id());
    let _ = admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN REPLICATION"))
        .await;
    let db = TestDb::new(server).await;
    // Hand the database and Synapse's tables to the role, as Synapse's own migrations would.
    admin
        .batch_execute(&format!("ALTER DATABASE {} OWNER TO {role}", db.name))
        .await
        .unwrap();
    db.client
        .batch_execute(&format!(
            "ALTER TABLE account_data OWNER TO {role}; ALTER TABLE room_account_data OWNER TO {role}; \
             ALTER TABLE room_tags OWNER TO {role}; ALTER TABLE room_tags_revisions OWNER TO {role}; \
             ALTER TABLE push_rules_stream OWNER TO {role}; ALTER TABLE user_ips OWNER TO {role}; \
             ALTER SEQUENCE account_data_sequence OWNER TO {role}; ALTER SCHEMA public OWNER TO {role};"
        ))
        .await
        .unwrap();
    let a = RecordingAppservice::start("hs_a").await.unwrap();
    let url = a.url();
    let f = RelayFiles::new(
        &db,
        &[RegistrationSpec {
            id: "a",
            url: Some(&url),
            hs_token: "hs_a",
            sender_localpart: "abot",
            user_regexes: &["@a_.*"],
            opt_in: true,
        }],
        "",
    );
    let hs = f.path().join("homeserver.yaml");
    std::fs::write(
        &hs,
        std::fs::read_to_string(&hs)
            .unwrap()
            .replace("user: postgres", &format!("user: {role}")),
    )
    .unwrap();
    let out = f.command("setup", &[]);
    assert!(out.status.success(), "setup as {role}: {}", text(&out));
    // `check` as the owner of Synapse's tables: it works, with a warning that `run` holds more
    // than it needs.
    let check = f.command("check", &[]);
    assert!(
        text(&check).contains("owns (or is a member of the owner of) Synapse's tables")
            && text(&check).contains("setup --grant-to"),
        "{}",
        text(&check)
    );
    // --grant-to as a non-superuser owner: the grants run, REPLICATION is printed for a superuser.
    let run_role = format!("relay_run_{}", std::process::id());
    let _ = admin.batch_execute(&format!("CREATE ROLE {run_role} LOGIN")).await;
    let out = f.command("setup", &["--grant-to", &run_role]);
    assert!(out.status.success(), "setup --grant-to as {role}: {}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "as a superuser, also run:\n  ALTER ROLE \"{run_role}\" WITH REPLICATION;"
        )),
        "{}",
        text(&out)
    );
    let granted: bool = db
        .client
        .query_one(
            "SELECT has_table_privilege($1, 'account_data', 'SELECT') AND NOT has_table_privilege($1, 'account_data', 'UPDATE')",
            &[&run_role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(granted, "SELECT only on Synapse's tables");
    let out = f.command("setup", &["--grant-to", "no_such_role_here"]);
    assert!(
        !out.status.success() && text(&out).contains("role \"no_such_role_here\" does not exist"),
        "{}",
        text(&out)
    );
    w::set_global(&db.client, "@a_1:example.org", "m.direct", "{\"before\":1}")
        .await
        .unwrap();
    let relay = f.spawn_run();
    assert!(
        crate::support::wait_for_log(
            &relay,
            "streaming account-data changes",
            std::time::Duration::from_secs(20)
        )
        .await,
        "{}",
        relay.log_text()
    );
    w::add_tag(&db.client, "@a_1:example.org", "!r:example.org", "u.work", "{}")
        .await
        .unwrap();
    w::set_room(
        &db.client,
        "@a_2:example.org",
        "!r:example.org",
        "m.fully_read",
        "{\"event_id\":\"$e\"}",
    )
    .await
    .unwrap();
    let out = f.command("backfill", &["--appservice", "a"]);
    assert!(out.status.success(), "backfill as {role}: {}", text(&out));
    let want = db
        .final_state(|u| u.starts_with("@a_") || u == "@abot:example.org")
        .await;
    assert!(
        a.wait_for(std::time::Duration::from_secs(60), |got| *got == want).await,
        "{}\n{}",
        crate::support::diff(&a.state(), &want),
        relay.log_text()
    );
    let mut relay = relay;
    assert_eq!(relay.terminate(), Some(0), "{}", relay.log_text());
    let check = f.command("check", &[]);
    assert!(check.status.success(), "check as {role}: {}", text(&check));
    let down = f.command("teardown", &[]);
    assert!(down.status.success(), "teardown as {role}: {}", text(&down));
}

/// `replication.failover = true` creates a failover slot on PostgreSQL 17, so it survives the
/// promotion of a standby that synchronises slots; on older servers setup refuses, saying why.
async fn failover_slots_on_postgresql_17(server: &'static Server) {
    let db = TestDb::new(server).await;
    let version: i32 = db
        .client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let f = RelayFiles::new(
        &db,
        &[RegistrationSpec {
            id: "a",
            url: Some("http://127.0.0.1:9"),
            hs_token: "hs_a",
            sender_localpart: "abot",
            user_regexes: &["@a_.*"],
            opt_in: true,
        }],
        "",
    );
    let toml = f.path().join("relay.toml");
    let text_before = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text_before.replacen("[replication]\n", "[replication]\nfailover = true\n", 1),
    )
    .unwrap();
    let out = f.command("setup", &[]);
    if version >= 170000 {
        assert!(out.status.success(), "{}", text(&out));
        let failover: bool = db
            .client
            .query_one(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        assert!(failover, "the slot is a failover slot");
        assert!(f.command("teardown", &[]).status.success());
    } else {
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains("needs PostgreSQL 17"), "{}", text(&out));
    }
}
