//! `backfill`: send an appservice the current account data of its users.

use crate::cmd::{ConfigArgs, EXIT_CONFIG, EXIT_FAILURE};
use crate::resync::backfill::{request_backfill, user_filter};
use crate::resync::store::StateStore;

/// Send an appservice the current account data (global, room, tags) of every user it is
/// interested in, through the running relay's normal delivery path.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "The request is one row in the relay's state schema; the running relay (now, or when it \
next starts) streams the current values from Synapse's tables in index order, in order with the live stream; \
safe while `run` is live, and resumed after a restart.\n\n\
Examples:\n  synapse-account-data-relay backfill --appservice irc-bridge\n  \
synapse-account-data-relay backfill --appservice irc-bridge --users '@irc_alice:example\\.org'"
)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The appservice's id (from its registration file); it must be opted in.
    #[arg(long, value_name = "ID")]
    pub appservice: String,
    /// Only users this regex matches (Python `re.match` semantics, like namespaces).
    #[arg(long, value_name = "REGEX")]
    pub users: Option<String>,
}

pub async fn backfill(args: &BackfillArgs) -> u8 {
    let settings = match args.config.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_CONFIG;
        }
    };
    let Some(appservice) = settings.appservices.iter().find(|a| a.id == args.appservice) else {
        let why = settings
            .skipped
            .iter()
            .find(|s| s.id == args.appservice)
            .map(|s| format!("it is not served: {}", s.reason))
            .unwrap_or_else(|| {
                format!(
                    "no such appservice (served: {})",
                    settings
                        .appservices
                        .iter()
                        .map(|a| a.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
        eprintln!("error: cannot backfill appservice {:?}: {why}", args.appservice);
        return EXIT_CONFIG;
    };
    if let Some(Err(e)) = args.users.as_deref().map(user_filter) {
        eprintln!("error: --users: {e}");
        return EXIT_CONFIG;
    }
    let mut client = match crate::postgres::sql::connect_sql(&settings.postgres).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot connect to PostgreSQL: {e}");
            return EXIT_FAILURE;
        }
    };
    let store = StateStore::new(&settings.state_schema);
    match request_backfill(&mut client, &store, appservice, args.users.as_deref()).await {
        Ok(request) => {
            println!(
                "backfill {request} of {:?} requested ({}); the running relay (now, or when it next starts) \
                 sends the current values and logs \"backfill complete\"",
                appservice.id,
                args.users
                    .as_deref()
                    .map_or_else(|| "all its users".to_owned(), |u| format!("users matching {u:?}"))
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            if e.to_string().contains("does not exist") {
                eprintln!("(has `setup` been run with this version? it creates the relay's state schema)");
            }
            EXIT_FAILURE
        }
    }
}
