//! How an appservice developer tests against the relay with testcontainers: PostgreSQL and the
//! relay's container image, and the appservice's own receiver on the host.
//!
//! ```sh
//! .ci/build-relay-image.sh          # builds synapse-account-data-relay:latest (no registry needed)
//! cargo run --example appservice_testcontainers
//! ```
//!
//! Steps: start PostgreSQL with `wal_level=logical`; create Synapse's tables (here from the
//! relay's test kit; in your project, run Synapse itself or its schema); start your appservice
//! (here the relay's recording test appservice); write Synapse's config and your registration
//! (opted in with `org.matrix.msc3682.account_data: true`) into a directory mounted into the
//! relay's container; run the image's `setup`, then `run`, waiting for "streaming"; write account
//! data the way Synapse does; see the transaction arrive.
//!
//! The containers use the host's network, so the relay reaches PostgreSQL's published port and
//! the appservice on 127.0.0.1. `RELAY_IMAGE` names the relay image (default
//! `synapse-account-data-relay:latest`), `RELAY_TEST_PG_IMAGE` the PostgreSQL 17 image (default
//! the one `.ci/build-pg17-image.sh` builds). With the official image instead:
//! `GenericImage::new("postgres", "17").with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
//! .with_cmd(["-c", "wal_level=logical"])`.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use synapse_account_data_relay::testkit::receiver::RecordingAppservice;
use synapse_account_data_relay::testkit::{SYNAPSE_SCHEMA_SQL, synapse_writes};
use testcontainers::core::wait::ExitWaitStrategy;
use testcontainers::core::{IntoContainerPort, Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};

type Error = Box<dyn std::error::Error>;

fn image(var: &str, default: &str) -> (String, String) {
    let full = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    let (name, tag) = full.rsplit_once(':').unwrap_or((full.as_str(), "latest"));
    (name.to_owned(), tag.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // 1. PostgreSQL with logical replication.
    let (pg_name, pg_tag) = image("RELAY_TEST_PG_IMAGE", "synapse-relay-test-postgres:17");
    let postgres = GenericImage::new(pg_name, pg_tag)
        .with_exposed_port(5432.tcp())
        .with_wait_for(WaitFor::message_on_stderr(
            "database system is ready to accept connections",
        ))
        .with_user("postgres")
        .with_cmd([
            "sh",
            "-c",
            "set -e; export PATH=/usr/lib/postgresql/17/bin:$PATH; \
             initdb -D /tmp/pgdata -U postgres --auth=trust >/dev/null; \
             echo 'host all all all trust' >> /tmp/pgdata/pg_hba.conf; \
             exec postgres -D /tmp/pgdata -c listen_addresses='*' -c wal_level=logical -c unix_socket_directories=/tmp",
        ])
        .start()
        .await?;
    let port = postgres.get_host_port_ipv4(5432).await?;

    // 2. Synapse's tables.
    let (db, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(connection);
    db.batch_execute(SYNAPSE_SCHEMA_SQL).await?;

    // 3. The appservice under test.
    let appservice = RecordingAppservice::start("example_hs_token").await?;

    // 4. Synapse's config and the registration, for the relay's container.
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("homeserver.yaml"),
        format!(
            "server_name: example.org\ndatabase:\n  name: psycopg2\n  args:\n    user: postgres\n    dbname: postgres\n    \
             host: 127.0.0.1\n    port: {port}\napp_service_config_files:\n  - /config/bridge.yaml\n"
        ),
    )?;
    std::fs::write(
        dir.path().join("bridge.yaml"),
        format!(
            "id: bridge\nurl: '{}'\nas_token: example_as_token\nhs_token: example_hs_token\nsender_localpart: bridgebot\n\
             namespaces:\n  users:\n    - regex: '@bridge_.*'\n      exclusive: true\norg.matrix.msc3682.account_data: true\n",
            appservice.url()
        ),
    )?;
    // The image runs as an unprivileged user: let it read the files.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    for f in ["homeserver.yaml", "bridge.yaml"] {
        std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o644))?;
    }
    let config = Mount::bind_mount(dir.path().display().to_string(), "/config");
    let (relay_name, relay_tag) = image("RELAY_IMAGE", "synapse-account-data-relay:latest");
    let relay_image = || GenericImage::new(relay_name.clone(), relay_tag.clone());

    // 5. The relay: `setup` once, then `run`.
    let _setup = relay_image()
        .with_wait_for(WaitFor::exit(ExitWaitStrategy::new().with_exit_code(0)))
        .with_network("host")
        .with_mount(config.clone())
        .with_cmd(["setup", "--synapse-config", "/config/homeserver.yaml"])
        .start()
        .await?;
    let relay = relay_image()
        .with_wait_for(WaitFor::message_on_stderr("streaming account-data changes"))
        .with_network("host")
        .with_mount(config)
        .with_startup_timeout(Duration::from_secs(60))
        .with_cmd(["run", "--synapse-config", "/config/homeserver.yaml"])
        .start()
        .await?;

    // 6. Account data changes the way Synapse writes them; the appservice receives them.
    synapse_writes::set_global(
        &db,
        "@bridge_alice:example.org",
        "m.direct",
        r#"{"@bob:example.org":["!dm:example.org"]}"#,
    )
    .await?;
    synapse_writes::add_tag(
        &db,
        "@bridge_alice:example.org",
        "!room:example.org",
        "u.work",
        r#"{"order":0.5}"#,
    )
    .await?;
    let started = Instant::now();
    let got = appservice
        .wait_for(Duration::from_secs(60), |state| state.len() >= 2)
        .await;
    if !got {
        let logs = String::from_utf8_lossy(&relay.stderr_to_vec().await?).to_string();
        return Err(format!("the appservice did not receive the account data; relay log:\n{logs}").into());
    }
    for ((user, room, data_type), content) in appservice.state() {
        println!(
            "received {user} {} {data_type}: {content}",
            room.as_deref().unwrap_or("(global)")
        );
    }
    println!("ok: delivered {:?} after the writes", started.elapsed());
    Ok(())
}
