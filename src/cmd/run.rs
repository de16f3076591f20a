//! `run`: stream account-data changes to appservices until SIGTERM or SIGINT; SIGHUP reloads
//! the configuration. Serves the operations endpoint when `[http] listen` is set and speaks
//! systemd's notify protocol when started by systemd.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::cmd::{ConfigArgs, EXIT_CONFIG, EXIT_FAILURE};
use crate::ops::health::HealthLimits;
use crate::ops::metrics::{Metrics, ResultLabel};
use crate::ops::reload::Reload;
use crate::pipeline::{Relay, RunError};
use crate::resync::store::StateStore;

/// Stream account-data changes to the appservices that opted in.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Runs until SIGTERM or SIGINT (requests in flight get `shutdown.timeout` to finish, then the \
delivered position is confirmed and the relay exits 0). SIGHUP reloads the relay config and the registration \
files without dropping the replication connection; a bad reload keeps the running configuration and logs \
what was wrong. Under systemd (Type=notify) it reports READY, STATUS, WATCHDOG and STOPPING. With \
`[http] listen` set it serves /metrics, /healthz, /readyz and /status.json. Run `setup` once before.\n\n\
Example:\n  synapse-account-data-relay run --synapse-config /etc/matrix-synapse/homeserver.yaml \\\n      \
--config /etc/synapse-account-data-relay/config.toml"
)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// A watch channel that turns true on SIGTERM or SIGINT (telling systemd STOPPING=1).
pub fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received: stopping");
        crate::ops::systemd::notify_stopping(&format!("{name} received"));
        let _ = tx.send(true);
    });
    rx
}

/// On each SIGHUP, validate the configuration again and hand it to the relay. Installed before
/// the relay starts, so a SIGHUP never kills it.
fn reload_on_sighup(
    config: ConfigArgs,
    pg: crate::postgres::config::PgConnectionConfig,
    store: StateStore,
    metrics: Arc<Metrics>,
) -> Result<mpsc::Receiver<Reload>, std::io::Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the relay config and the registration files");
            let config = config.clone();
            match crate::ops::reload::prepare(move || config.settings(), &pg, &store).await {
                Ok(reload) => {
                    if tx.send(reload).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    metrics.reloads.get_or_create(&ResultLabel { result: "failed" }).inc();
                    tracing::error!(error = %e, "reload failed; the running configuration stays in effect");
                    crate::ops::systemd::notify_status(&format!("reload failed, running configuration kept: {e}"));
                }
            }
        }
    });
    Ok(rx)
}

pub async fn run(args: &RunArgs) -> u8 {
    let settings = match args.config.settings() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return EXIT_CONFIG;
        }
    };
    let relay = match Relay::new(settings.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return EXIT_CONFIG;
        }
    };
    let shutdown = shutdown_on_signals();
    let reloads = match reload_on_sighup(
        args.config.clone(),
        settings.postgres.clone(),
        StateStore::new(&settings.state_schema),
        relay.metrics(),
    ) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler");
            return EXIT_FAILURE;
        }
    };
    let relay = relay.with_reloads(reloads);
    let limits = HealthLimits::for_settings(&settings);
    if let Some(addr) = settings.http_listen {
        let listener = match crate::ops::http::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}");
                return EXIT_FAILURE;
            }
        };
        crate::ops::http::spawn(
            listener,
            crate::ops::http::Endpoint {
                metrics: relay.metrics(),
                health: relay.health(),
                limits,
                served: relay.served(),
                slot: relay.slot_status(),
                slot_name: settings.slot_name.clone(),
                failover: relay.failover(),
            },
            settings.http_limits,
        );
        tracing::info!(address = %addr, "operations endpoint: /metrics, /healthz, /readyz, /status.json");
    }
    let (supervisor_stop, supervisor_stop_rx) = watch::channel(false);
    tokio::spawn(crate::ops::systemd::supervise(
        crate::ops::systemd::Supervised {
            health: relay.health(),
            limits,
            metrics: relay.metrics(),
            served: relay.served(),
            slot: relay.slot_status(),
            slot_name: settings.slot_name.clone(),
        },
        supervisor_stop_rx,
    ));
    let result = relay.run(shutdown).await;
    let _ = supervisor_stop.send(true);
    match result {
        Ok(()) => 0,
        Err(e @ RunError::Routing(_)) => {
            tracing::error!("{e}");
            crate::ops::systemd::notify_stopping(&format!("error: {e}"));
            EXIT_CONFIG
        }
        Err(e) => {
            tracing::error!("{e}");
            crate::ops::systemd::notify_stopping(&format!("error: {e}"));
            EXIT_FAILURE
        }
    }
}
