//! `run`: stream account-data changes to appservices until SIGTERM or SIGINT.

use tokio::sync::watch;

use crate::cmd::{ConfigArgs, EXIT_CONFIG, EXIT_FAILURE};
use crate::pipeline::{Relay, RunError};

/// Stream account-data changes to the appservices that opted in.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Runs until SIGTERM or SIGINT; run `setup` once before.\n\nExample:\n  \
synapse-account-data-relay run --synapse-config /etc/matrix-synapse/homeserver.yaml \\\n      \
--config /etc/synapse-account-data-relay/config.toml"
)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// A watch channel that turns true on SIGTERM or SIGINT.
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
        let _ = tx.send(true);
    });
    rx
}

pub async fn run(args: &RunArgs) -> u8 {
    let settings = match args.config.settings() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return EXIT_CONFIG;
        }
    };
    let relay = match Relay::new(settings) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return EXIT_CONFIG;
        }
    };
    match relay.run(shutdown_on_signals()).await {
        Ok(()) => 0,
        Err(e @ RunError::Routing(_)) => {
            tracing::error!("{e}");
            EXIT_CONFIG
        }
        Err(e) => {
            tracing::error!("{e}");
            EXIT_FAILURE
        }
    }
}
