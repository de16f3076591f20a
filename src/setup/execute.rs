//! Running a plan of [`super::plan`] against the database.

use crate::setup::inspect::ProvisionError;
use crate::setup::plan::{LOCK_ATTEMPTS, LOCK_TIMEOUT, PlanStep};

/// SQLSTATE `55P03` lock_not_available (what `lock_timeout` raises).
const SQLSTATE_LOCK_NOT_AVAILABLE: &str = "55P03";

/// What [`execute_plan`] did besides the plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanRun {
    /// Tries that ended because a lock was not granted within [`LOCK_TIMEOUT`] and were repeated.
    pub lock_retries: u32,
}

/// Run a plan: steps of one group in one transaction, in order.
pub async fn execute_plan(client: &mut tokio_postgres::Client, steps: &[PlanStep]) -> Result<PlanRun, ProvisionError> {
    execute_plan_with(client, steps, LOCK_ATTEMPTS).await
}

/// [`execute_plan`], running a step (a transaction, for group 1) at most `lock_attempts` times
/// while its locks are not granted within the session's `lock_timeout`.
pub async fn execute_plan_with(
    client: &mut tokio_postgres::Client,
    steps: &[PlanStep],
    lock_attempts: u32,
) -> Result<PlanRun, ProvisionError> {
    let mut run = PlanRun::default();
    let mut pauses = crate::delivery::retry::RetryPolicy {
        initial: std::time::Duration::from_millis(100),
        max: std::time::Duration::from_secs(1),
    }
    .schedule();
    let mut i = 0;
    while i < steps.len() {
        let group = steps[i].group;
        let mut j = i;
        while j < steps.len() && steps[j].group == group {
            j += 1;
        }
        let chunk = &steps[i..j];
        let units: Vec<&[PlanStep]> = if group == 1 {
            vec![chunk]
        } else {
            chunk.chunks(1).collect()
        };
        for unit in units {
            let mut attempt = 1;
            loop {
                match execute_unit(client, unit, group == 1).await {
                    Ok(()) => break,
                    Err(e) if e.sqlstate.as_deref() == Some(SQLSTATE_LOCK_NOT_AVAILABLE) && attempt < lock_attempts => {
                        attempt += 1;
                        run.lock_retries += 1;
                        let pause = pauses.next_delay(None);
                        tracing::info!(step = %e.what, attempt, pause = ?pause, "a table lock was not granted within {LOCK_TIMEOUT} (Synapse is using the table): trying again");
                        tokio::time::sleep(pause).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        i = j;
    }
    Ok(run)
}

async fn execute_unit(
    client: &mut tokio_postgres::Client,
    unit: &[PlanStep],
    in_transaction: bool,
) -> Result<(), ProvisionError> {
    if in_transaction {
        let tx = client
            .transaction()
            .await
            .map_err(|e| ProvisionError::from_pg("starting a transaction", &e))?;
        for s in unit {
            tx.batch_execute(&s.sql)
                .await
                .map_err(|e| ProvisionError::from_pg(&s.description, &e))?;
        }
        // Dropping the transaction on an error above rolls it back.
        tx.commit()
            .await
            .map_err(|e| ProvisionError::from_pg("committing", &e))?;
    } else {
        for s in unit {
            client
                .batch_execute(&s.sql)
                .await
                .map_err(|e| ProvisionError::from_pg(&s.description, &e))?;
        }
    }
    Ok(())
}
