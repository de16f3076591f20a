//! `synapse-account-data-relay`: parse the command line, set up logging, dispatch to a
//! subcommand, and turn its result into an exit code (0 ok, 1 failure, 2 usage/config error).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use synapse_account_data_relay::cmd;
use synapse_account_data_relay::ops::logging::{self, LogFormat};

/// Pushes Synapse account-data changes to Matrix application services (MSC3682), read from
/// Synapse's PostgreSQL through a logical replication slot.
#[derive(Debug, Parser)]
#[command(name = "synapse-account-data-relay", version, propagate_version = true)]
#[command(
    after_help = "Start with `demo` to see it work, or `setup` then `run` beside a real Synapse.\n\
See the README for the production guide."
)]
struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter, RUST_LOG syntax (e.g. `info`, `debug`, `synapse_account_data_relay=debug`).
    /// Default: $RUST_LOG, else `info`.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check the server and prepare it: replica identity, publication, slot (idempotent).
    Setup(cmd::setup::SetupArgs),
    /// Stream account-data changes to the appservices until stopped.
    Run(cmd::run::RunArgs),
    /// Validate config, registrations, connectivity and the database; list everything wrong.
    Check(cmd::check::CheckArgs),
    /// Send an appservice the current account data of its users (safe while `run` is live).
    Backfill(cmd::backfill::BackfillArgs),
    /// Show the slot's state and lag, and each appservice's state from a running relay.
    Status(cmd::status::StatusArgs),
    /// Drop the slot and publication and restore replica identity as setup found it.
    Teardown(cmd::teardown::TeardownArgs),
    /// Show the relay working on a throw-away PostgreSQL with a sample appservice.
    Demo(cmd::demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` and `demo` log; the other commands print their report and log only warnings.
    let default_level = match cli.command {
        Command::Run(_) | Command::Demo(_) => None,
        _ => Some("warn"),
    };
    logging::init(cli.log_format, cli.log_level.as_deref().or(default_level));
    // One thread: the relay's work is a pipeline of small steps handed from task to task, and
    // on a thread pool every hand-over can be a futex wake-up and a context switch, which cost
    // more than the steps (measured: docs/performance.md). One thread also leaves the other
    // cores to PostgreSQL, whose walsender is the real limit. Blocking work (file reads at
    // start) still goes to tokio's blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cmd::EXIT_FAILURE);
        }
    };
    let code = runtime.block_on(async {
        match &cli.command {
            Command::Setup(a) => cmd::setup::setup(a).await,
            Command::Run(a) => cmd::run::run(a).await,
            Command::Check(a) => cmd::check::check(a).await,
            Command::Teardown(a) => cmd::teardown::teardown(a).await,
            Command::Backfill(a) => cmd::backfill::backfill(a).await,
            Command::Status(a) => cmd::status::status(a).await,
            Command::Demo(a) => cmd::demo::demo(a).await,
        }
    });
    ExitCode::from(code)
}
