//! `setup`: check the server and prepare it (replica identity, publication, slot). Idempotent.

use crate::cmd::{ConfigArgs, EXIT_FAILURE, connect_and_inspect};
use crate::provision::{
    LOCK_ATTEMPTS, LOCK_TIMEOUT, Severity, execute_plan, inspect, plan_to_sql, problems, setup_plan,
};

/// Check the server and prepare it for the relay.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  synapse-account-data-relay setup --synapse-config /etc/matrix-synapse/homeserver.yaml\n  \
synapse-account-data-relay setup --synapse-config /etc/matrix-synapse/homeserver.yaml --dry-run > setup.sql"
)]
pub struct SetupArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the SQL that would run, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn setup(args: &SetupArgs) -> u8 {
    let (settings, mut client, state) = match connect_and_inspect(&args.config).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let names = settings.names();
    let plan = match setup_plan(&state, names) {
        Ok(p) => p,
        Err(problems) => {
            eprintln!("setup cannot continue; nothing was changed:");
            for p in problems {
                eprintln!("  - {p}");
            }
            return EXIT_FAILURE;
        }
    };
    if args.dry_run {
        if plan.is_empty() {
            println!("-- nothing to do: database {:?} is ready for the relay", state.database);
        } else {
            println!(
                "-- synapse-account-data-relay setup for database {:?} (dry run)",
                state.database
            );
            print!("{}", plan_to_sql(&plan));
        }
        return 0;
    }
    if plan.is_empty() {
        println!(
            "nothing to do: database {:?} is ready (slot {:?}, publication {:?})",
            state.database, names.slot, names.publication
        );
    } else {
        let run = match execute_plan(&mut client, &plan).await {
            Ok(run) => run,
            Err(e) => {
                eprintln!("error: {e}");
                if e.sqlstate.as_deref() == Some("55P03") {
                    eprintln!(
                        "  Synapse kept the table busy: {LOCK_ATTEMPTS} tries of {LOCK_TIMEOUT} each found it locked; try again in a quieter moment"
                    );
                }
                eprintln!(
                    "(each step runs in a transaction: a failed step changed nothing; steps before it are done, and setup can be run again)"
                );
                return EXIT_FAILURE;
            }
        };
        if run.lock_retries > 0 {
            println!(
                "waited for Synapse's table locks: {} tr{} of {LOCK_TIMEOUT} timed out before the locks were granted",
                run.lock_retries,
                if run.lock_retries == 1 { "y" } else { "ies" }
            );
        }
        for step in plan.iter().filter(|s| !s.sql.starts_with("SET ")) {
            println!("done: {}", step.description);
        }
    }
    match inspect(&client, names).await {
        Ok(after) => {
            let left: Vec<_> = problems(&after, names).into_iter().collect();
            for p in &left {
                println!("  {p}");
            }
            if left.iter().any(|p| p.severity != Severity::Warning) {
                return EXIT_FAILURE;
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILURE;
        }
    }
    0
}
