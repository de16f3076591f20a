//! `demo`: the whole relay on a throw-away PostgreSQL, in one command. It starts a cluster from
//! the machine's PostgreSQL binaries with Synapse's tables, a sample appservice receiver, runs
//! `setup` and the relay, writes account data the way Synapse does, and prints the transactions
//! the appservice receives. Everything is removed at the end.

use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;

use crate::cmd::EXIT_FAILURE;
use crate::config::{RelayConfig, Settings};
use crate::pipeline::Relay;
use crate::setup::execute::execute_plan;
use crate::setup::inspect::inspect;
use crate::setup::plan::setup_plan;
use crate::testkit::receiver::RecordingAppservice;
use crate::testkit::{LocalCluster, SYNAPSE_SCHEMA_SQL, synapse_writes as w};

/// Show the relay working end to end on a throw-away PostgreSQL.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Needs the PostgreSQL server binaries (Debian: apt-get install postgresql); \
uses nothing else and leaves nothing behind.\n\nExample:\n  synapse-account-data-relay demo"
)]
pub struct DemoArgs {
    /// How long to wait for the appservice to receive everything.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

const SERVER_NAME: &str = "demo.example";
const HS_TOKEN: &str = "demo_hs_token";

fn write_files(dir: &Path, port: u16, receiver_url: &str) -> std::io::Result<()> {
    std::fs::write(
        dir.join("homeserver.yaml"),
        format!(
            "server_name: {SERVER_NAME}\ndatabase:\n  name: psycopg2\n  args:\n    user: postgres\n    dbname: synapse\n    \
             host: 127.0.0.1\n    port: {port}\napp_service_config_files:\n  - {}\n  - {}\n",
            dir.join("bridge.yaml").display(),
            dir.join("bot.yaml").display()
        ),
    )?;
    std::fs::write(
        dir.join("bridge.yaml"),
        format!(
            "id: demo-bridge\nurl: {receiver_url}\nas_token: demo_as_token\nhs_token: {HS_TOKEN}\nsender_localpart: bridgebot\n\
             namespaces:\n  users:\n    - regex: '@bridge_.*'\n      exclusive: yes\n  rooms: []\n  aliases: []\n\
             org.matrix.msc3682.account_data: true\n"
        ),
    )?;
    std::fs::write(
        dir.join("bot.yaml"),
        "id: demo-bot-not-opted-in\nurl: http://127.0.0.1:9/\nas_token: t1\nhs_token: t2\nsender_localpart: bot\n\
         namespaces:\n  users:\n    - regex: '@bot_.*'\n      exclusive: true\n",
    )?;
    Ok(())
}

pub async fn demo(args: &DemoArgs) -> u8 {
    match demo_inner(args).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("demo failed: {e}");
            EXIT_FAILURE
        }
    }
}

async fn demo_inner(args: &DemoArgs) -> Result<(), String> {
    println!("== starting a throw-away PostgreSQL with wal_level=logical");
    let cluster = tokio::task::spawn_blocking(|| LocalCluster::start(Default::default()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    println!("   {} on 127.0.0.1:{}", cluster.version(), cluster.port());
    let (admin, conn) = tokio_postgres::connect(&cluster.connection_string("postgres"), tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    admin
        .batch_execute("CREATE DATABASE synapse")
        .await
        .map_err(|e| e.to_string())?;
    let (db, conn) = tokio_postgres::connect(&cluster.connection_string("synapse"), tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    db.batch_execute(SYNAPSE_SCHEMA_SQL).await.map_err(|e| e.to_string())?;
    println!("   created database \"synapse\" with Synapse's account-data tables");

    let receiver = RecordingAppservice::start(HS_TOKEN).await.map_err(|e| e.to_string())?;
    println!("== sample appservice receiver listening on {}", receiver.url());
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    write_files(dir.path(), cluster.port(), &receiver.url()).map_err(|e| e.to_string())?;
    let relay_path = dir.path().join("relay.toml");
    let relay_config = RelayConfig::default();
    let settings = Settings::resolve(
        &[dir.path().join("homeserver.yaml")],
        &relay_config,
        &relay_path,
        &|_: &str| None::<String>,
    )
    .map_err(|e| e.to_string())?;

    println!("== setup");
    let mut setup_client = crate::postgres::sql::connect_sql(&settings.postgres)
        .await
        .map_err(|e| e.to_string())?;
    let names = settings.names();
    let state = inspect(&setup_client, names).await.map_err(|e| e.to_string())?;
    let plan = setup_plan(&state, names).map_err(|p| p.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))?;
    execute_plan(&mut setup_client, &plan)
        .await
        .map_err(|e| e.to_string())?;
    drop(setup_client);
    for step in plan.iter().filter(|s| !s.sql.starts_with("SET ")) {
        println!("   {}", step.sql);
    }

    println!("== running the relay");
    let relay = Relay::new(settings).map_err(|e| e.to_string())?;
    let (stop, stopped) = watch::channel(false);
    let running = tokio::spawn(relay.run(stopped));

    println!("== writing account data the way Synapse does");
    let alice = format!("@bridge_alice:{SERVER_NAME}");
    let carol = format!("@carol:{SERVER_NAME}");
    let room = format!("!room:{SERVER_NAME}");
    let steps: Vec<(String, Result<(), tokio_postgres::Error>)> = vec![
        (
            format!("{alice}: m.direct"),
            w::set_global(
                &db,
                &alice,
                "m.direct",
                &format!("{{\"@bob:{SERVER_NAME}\":[\"{room}\"]}}"),
            )
            .await,
        ),
        (
            format!("{alice}: org.example.settings"),
            w::set_global(&db, &alice, "org.example.settings", "{\"theme\":\"dark\"}").await,
        ),
        (
            format!("{alice}: tag u.work on {room}"),
            w::add_tag(&db, &alice, &room, "u.work", "{\"order\":0.5}").await,
        ),
        (
            format!("{alice}: m.fully_read in {room}"),
            w::set_room(&db, &alice, &room, "m.fully_read", "{\"event_id\":\"$ev1\"}").await,
        ),
        (
            format!("{alice}: delete org.example.settings (MSC3391)"),
            w::delete_global(&db, &alice, "org.example.settings").await,
        ),
        (
            format!("{carol}: m.direct (in no appservice's namespace)"),
            w::set_global(&db, &carol, "m.direct", "{}").await,
        ),
    ];
    for (what, result) in steps {
        result.map_err(|e| format!("{what}: {e}"))?;
        println!("   {what}");
    }

    let expected = 4;
    let ok = receiver
        .wait_for(args.timeout, |state| {
            state.len() >= expected && state.values().any(|v| v == &serde_json::json!({}))
        })
        .await;
    println!("== the appservice received:");
    for t in receiver.transactions() {
        println!("PUT /_matrix/app/v1/transactions/{}", t.txn_id);
        println!("{}", serde_json::to_string_pretty(&t.body).unwrap_or_default());
    }
    let _ = stop.send(true);
    let _ = running.await;
    drop(cluster);
    if ok {
        println!(
            "== done: {} transaction(s); @carol's change went to nobody; the not-opted-in appservice got nothing",
            receiver.transactions().len()
        );
        Ok(())
    } else {
        Err(format!(
            "the appservice did not receive everything within {:?}",
            args.timeout
        ))
    }
}
