//! `setup`: check the server and prepare it (replica identity, publication, slot). Idempotent.

use crate::cmd::{ConfigArgs, EXIT_FAILURE, connect_and_inspect};
use crate::setup::checks::{Severity, problems};
use crate::setup::execute::execute_plan;
use crate::setup::inspect::inspect;
use crate::setup::inspect::inspect_role;
use crate::setup::plan::{LOCK_ATTEMPTS, LOCK_TIMEOUT, plan_to_sql, setup_plan};
use crate::setup::privileges::{GrantPlan, grant_plan};

/// Check the server and prepare it for the relay.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  synapse-account-data-relay setup --synapse-config /etc/matrix-synapse/homeserver.yaml\n  \
synapse-account-data-relay setup --synapse-config /etc/matrix-synapse/homeserver.yaml --dry-run > setup.sql\n  \
synapse-account-data-relay setup --synapse-config /etc/matrix-synapse/homeserver.yaml --grant-to synapse_relay"
)]
pub struct SetupArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the SQL that would run, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also grant ROLE what `run` needs and no more (REPLICATION, SELECT on the account-data
    /// tables, its state schema), so that `run` need not use the role owning Synapse's tables.
    /// The role must exist; REPLICATION is granted only when setup runs as a superuser (else the
    /// statement is printed).
    #[arg(long, value_name = "ROLE")]
    pub grant_to: Option<String>,
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
    let grants = match &args.grant_to {
        None => None,
        Some(role) => {
            let target = match inspect_role(&client, role).await {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {e}");
                    return EXIT_FAILURE;
                }
            };
            match grant_plan(&state, names, &target) {
                Ok(g) => Some(g),
                Err(problem) => {
                    eprintln!("setup cannot continue; nothing was changed:\n  - {problem}");
                    return EXIT_FAILURE;
                }
            }
        }
    };
    if args.dry_run {
        print_failover(&client, &settings, "-- ").await;
        if let Some(g) = &grants {
            // After the setup steps: the state schema they create is granted on.
            let mut all = plan.clone();
            all.extend(g.steps.iter().cloned());
            print_dry_run(&state.database, &all);
            print_grant_notes(g, "--");
            return 0;
        }
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
    if let Some(g) = &grants {
        if let Err(e) = execute_plan(&mut client, &g.steps).await {
            eprintln!("error: {e}");
            return EXIT_FAILURE;
        }
        for step in &g.steps {
            println!("done: {}", step.description);
        }
        print_grant_notes(g, "");
    }
    print_failover(&client, &settings, "").await;
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

/// What a promotion without a resync still needs, on the primary and the standbys among the
/// relay's hosts, with the statements (setup changes none of these server settings itself), and
/// whether the slot is safe yet. Does not change the exit status.
async fn print_failover(client: &tokio_postgres::Client, settings: &crate::config::Settings, lead: &str) {
    let names = settings.names();
    match crate::failover::inspect::report(client, &settings.postgres, names.slot, names.failover_slot).await {
        Ok((found, verdict)) => {
            if !found.is_empty() {
                println!("{lead}failover: what a promotion without a resync still needs (run these yourself):");
                for p in &found {
                    println!("{lead}  {p}");
                }
            }
            for l in verdict.iter().flat_map(crate::failover::slots::readiness_lines) {
                println!("{lead}{l}");
            }
        }
        Err(e) => eprintln!("{lead}warning: cannot read the failover settings: {e}"),
    }
}

fn print_dry_run(database: &str, plan: &[crate::setup::plan::PlanStep]) {
    println!("-- synapse-account-data-relay setup for database {database:?} (dry run)");
    print!("{}", plan_to_sql(plan));
}

/// What `--grant-to` could not do itself, and what it noticed; `prefix` makes them SQL comments.
fn print_grant_notes(g: &GrantPlan, prefix: &str) {
    let lead = if prefix.is_empty() { "" } else { "-- " };
    if !g.for_a_superuser.is_empty() {
        println!("{lead}as a superuser, also run:");
        for sql in &g.for_a_superuser {
            println!("{lead}  {sql}");
        }
    }
    for w in &g.warnings {
        println!("{lead}warning: {w}");
    }
}
