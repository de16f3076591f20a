//! `teardown`: drop the slot and the publication, and restore each table's replica identity as
//! `setup` found it.

use crate::cmd::{ConfigArgs, EXIT_FAILURE, connect_and_inspect};
use crate::setup::checks::Severity;
use crate::setup::execute::execute_plan;
use crate::setup::plan::{plan_to_sql, teardown_plan};

/// Remove everything setup created, leaving the database as it was found.
#[derive(Debug, clap::Args)]
#[command(after_help = "Stop the relay first: an active slot is not dropped.\n\nExample:\n  \
synapse-account-data-relay teardown --synapse-config /etc/matrix-synapse/homeserver.yaml")]
pub struct TeardownArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the SQL that would run, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn teardown(args: &TeardownArgs) -> u8 {
    let (settings, mut client, state) = match connect_and_inspect(&args.config).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let names = settings.names();
    let (plan, notes) = teardown_plan(&state, names);
    for n in &notes {
        eprintln!("  {n}");
    }
    if notes.iter().any(|n| n.severity == Severity::Error) {
        eprintln!("teardown cannot continue; nothing was changed");
        return EXIT_FAILURE;
    }
    if args.dry_run {
        print!(
            "{}",
            if plan.is_empty() {
                "-- nothing to do\n".to_owned()
            } else {
                plan_to_sql(&plan)
            }
        );
        return 0;
    }
    if plan.is_empty() {
        println!("nothing to do: no slot, no publication, replica identities as found");
        return 0;
    }
    if let Err(e) = execute_plan(&mut client, &plan).await {
        eprintln!("error: {e}");
        return EXIT_FAILURE;
    }
    for step in plan.iter().filter(|s| !s.sql.starts_with("SET ")) {
        println!("done: {}", step.description);
    }
    0
}
