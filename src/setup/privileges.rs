//! Least privilege: what `run` needs in Synapse's database, the grants `setup --grant-to ROLE`
//! makes for a role of its own, and what `check` says about the role `run` connects as.
//!
//! `setup` needs a role that owns Synapse's tables (to set their replica identity and put them
//! in a publication); `run` needs only:
//! - the `REPLICATION` attribute (to stream from, create and drop its slot);
//! - `SELECT` on the tables it reads back when it resyncs or backfills ([`RUN_READS`]);
//! - `USAGE` on its state schema, `SELECT, INSERT, UPDATE, DELETE` on its tables and `USAGE` on
//!   its sequence.
//!
//! The publications need nothing: the walsender reads them for any `REPLICATION` role.
//! Planning is pure; [`inspect_role`] and [`inspect_run_role`] read the catalogs.
//!
//! [`inspect_role`]: super::inspect::inspect_role
//! [`inspect_run_role`]: super::inspect::inspect_run_role

use postgres_protocol::escape::escape_identifier;

use crate::config::Names;
use crate::setup::checks::{Problem, Severity};
use crate::setup::plan::PlanStep;
use crate::setup::state::DatabaseState;

/// The Synapse tables `run` reads with `SELECT` (resync and backfill).
pub const RUN_READS: &[&str] = &["account_data", "room_account_data", "room_tags", "room_tags_revisions"];

/// The relay's own tables in its state schema.
pub const STATE_TABLES: &[&str] = &["pending_keys", "appservices", "backfills"];
/// The relay's own sequence in its state schema.
pub const STATE_SEQUENCE: &str = "pending_key_version";

/// The role `setup --grant-to` grants to, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleState {
    pub name: String,
    pub exists: bool,
    pub replication: bool,
    pub superuser: bool,
    /// Whether it owns (or is a member of the owner of) one of Synapse's tables.
    pub owns_synapse_tables: bool,
}

/// What `setup --grant-to` runs, and what it cannot run itself (for a superuser to run).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrantPlan {
    pub steps: Vec<PlanStep>,
    /// Statements the connected role may not run (`ALTER ROLE … REPLICATION` needs a superuser).
    pub for_a_superuser: Vec<String>,
    /// Warnings about the role (it holds more than `run` needs).
    pub warnings: Vec<String>,
}

/// The grants that let `role` run the relay (see the module documentation). Each statement is
/// idempotent. Fails when the role does not exist (it is not created here: its password and
/// `pg_hba.conf` line are the administrator's).
pub fn grant_plan(setup_role: &DatabaseState, names: Names<'_>, role: &RoleState) -> Result<GrantPlan, Problem> {
    let r = escape_identifier(&role.name);
    if !role.exists {
        return Err(Problem {
            severity: Severity::Error,
            message: format!(
                "role {:?} does not exist: create it first (as a superuser), e.g. \
                 `CREATE ROLE {r} LOGIN REPLICATION PASSWORD '…';`, and give it a line in pg_hba.conf",
                role.name
            ),
        });
    }
    let s = escape_identifier(names.state_schema);
    let mut plan = GrantPlan::default();
    let mut step = |description: String, sql: String| {
        plan.steps.push(PlanStep {
            description,
            sql,
            group: 0,
        })
    };
    step(
        format!("let {:?} use the state schema {:?}", role.name, names.state_schema),
        format!("GRANT USAGE ON SCHEMA {s} TO {r};"),
    );
    let state_tables: Vec<String> = STATE_TABLES
        .iter()
        .map(|t| format!("{s}.{}", escape_identifier(t)))
        .collect();
    step(
        format!("let {:?} read and write the relay's state tables", role.name),
        format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {} TO {r};",
            state_tables.join(", ")
        ),
    );
    step(
        format!("let {:?} use the relay's version sequence", role.name),
        format!(
            "GRANT USAGE ON SEQUENCE {s}.{} TO {r};",
            escape_identifier(STATE_SEQUENCE)
        ),
    );
    let reads: Vec<String> = RUN_READS.iter().map(|t| escape_identifier(t)).collect();
    step(
        format!("let {:?} read the account-data tables (SELECT only)", role.name),
        format!("GRANT SELECT ON TABLE {} TO {r};", reads.join(", ")),
    );
    if !role.replication && !role.superuser {
        let sql = format!("ALTER ROLE {r} WITH REPLICATION;");
        if setup_role.superuser {
            step(format!("give {:?} the REPLICATION attribute", role.name), sql);
        } else {
            plan.for_a_superuser.push(sql);
        }
    }
    if role.superuser {
        plan.warnings.push(format!(
            "role {:?} is a superuser: `run` needs only the grants above and REPLICATION",
            role.name
        ));
    }
    if role.owns_synapse_tables {
        plan.warnings.push(format!(
            "role {:?} owns (or is a member of the owner of) Synapse's tables: `run` needs only SELECT on them",
            role.name
        ));
    }
    Ok(plan)
}

/// What the role `run` connects as may do, as `check` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRoleState {
    pub name: String,
    pub superuser: bool,
    /// Synapse tables it owns or whose owner it is a member of.
    pub owned_tables: Vec<String>,
    /// Privileges `run` needs and the role lacks (as `PRIVILEGE on object`).
    pub missing: Vec<String>,
}

/// `check`'s findings about `run`'s role: an error for each missing privilege, a warning when it
/// holds more than `run` needs.
pub fn run_role_problems(s: &RunRoleState, names: Names<'_>) -> Vec<Problem> {
    let mut out = Vec::new();
    let grant_hint = format!(
        "`setup --grant-to {}` (run as the owner of Synapse's tables) grants what `run` needs",
        s.name
    );
    if !s.missing.is_empty() && !s.superuser {
        out.push(Problem {
            severity: Severity::Error,
            message: format!(
                "role {:?} lacks what `run` needs: {}; {grant_hint}",
                s.name,
                s.missing.join(", ")
            ),
        });
    }
    let more = if s.superuser {
        Some("is a superuser".to_owned())
    } else if !s.owned_tables.is_empty() {
        Some(format!(
            "owns (or is a member of the owner of) Synapse's tables {}",
            s.owned_tables.join(", ")
        ))
    } else {
        None
    };
    if let Some(more) = more {
        out.push(Problem {
            severity: Severity::Warning,
            message: format!(
                "role {:?} {more}: `run` needs only REPLICATION, SELECT on {} and its state schema {:?}; \
                 give `run` a role of its own: {grant_hint}",
                s.name,
                RUN_READS.join(", "),
                names.state_schema
            ),
        });
    }
    out
}

/// `sql/grant-run-role.sql`: the grants of `setup --grant-to synapse_relay` for the default
/// names, for admins who apply SQL by hand (after `sql/setup.sql`).
pub fn stock_grant_script() -> String {
    let names = Names::defaults();
    let role = RoleState {
        name: "synapse_relay".into(),
        exists: true,
        replication: false,
        superuser: false,
        owns_synapse_tables: false,
    };
    let superuser = DatabaseState {
        superuser: true,
        ..DatabaseState::stock_synapse()
    };
    let mut out = String::from(
        "-- synapse-account-data-relay: a role for `run` with only what it uses (generated; the same as\n\
         -- `setup --grant-to synapse_relay`, which adapts to what it finds: prefer it). Run after setup.sql,\n\
         -- as a superuser (ALTER ROLE ... REPLICATION needs one; the GRANTs need the tables' owner).\n\
         -- First: CREATE ROLE synapse_relay LOGIN PASSWORD '...'; and a pg_hba.conf line for it.\n",
    );
    if let Ok(plan) = grant_plan(&superuser, names, &role) {
        for step in plan.steps {
            out.push_str(&format!("-- {}\n{}\n", step.description, step.sql));
        }
    }
    out
}

#[cfg(test)]
mod shipped_sql {
    #[test]
    fn the_grant_script_matches_the_plan() {
        let script = super::stock_grant_script();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/grant-run-role.sql");
        if std::env::var_os("RELAY_WRITE_SQL").is_some() {
            std::fs::write(&path, &script).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap_or_default(),
            script,
            "sql/grant-run-role.sql is stale: regenerate with RELAY_WRITE_SQL=1 cargo test --lib shipped_sql"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: Names<'static> = Names {
        slot: "relay_slot",
        publication: "relay_pub",
        push_publication: "relay_pub_push_rules",
        state_schema: "relay_state",
        failover_slot: false,
    };

    fn role(replication: bool) -> RoleState {
        RoleState {
            name: "relay".into(),
            exists: true,
            replication,
            superuser: false,
            owns_synapse_tables: false,
        }
    }

    #[test]
    fn grants_only_what_run_uses() {
        let owner = DatabaseState::stock_synapse();
        let plan = grant_plan(&owner, NAMES, &role(true)).unwrap();
        let sql: Vec<&str> = plan.steps.iter().map(|s| s.sql.as_str()).collect();
        assert_eq!(
            sql,
            [
                "GRANT USAGE ON SCHEMA \"relay_state\" TO \"relay\";",
                "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE \"relay_state\".\"pending_keys\", \"relay_state\".\"appservices\", \"relay_state\".\"backfills\" TO \"relay\";",
                "GRANT USAGE ON SEQUENCE \"relay_state\".\"pending_key_version\" TO \"relay\";",
                "GRANT SELECT ON TABLE \"account_data\", \"room_account_data\", \"room_tags\", \"room_tags_revisions\" TO \"relay\";",
            ]
        );
        assert!(plan.for_a_superuser.is_empty() && plan.warnings.is_empty());
        // Without REPLICATION: a non-superuser owner cannot grant it, so it is printed.
        let plan = grant_plan(&owner, NAMES, &role(false)).unwrap();
        assert_eq!(plan.for_a_superuser, ["ALTER ROLE \"relay\" WITH REPLICATION;"]);
        let superuser = DatabaseState {
            superuser: true,
            ..DatabaseState::stock_synapse()
        };
        let plan = grant_plan(&superuser, NAMES, &role(false)).unwrap();
        assert!(plan.for_a_superuser.is_empty());
        assert_eq!(plan.steps.last().unwrap().sql, "ALTER ROLE \"relay\" WITH REPLICATION;");
        // A role that does not exist is not created.
        let missing = RoleState {
            exists: false,
            ..role(true)
        };
        let err = grant_plan(&owner, NAMES, &missing).unwrap_err();
        assert!(err.message.contains("does not exist"), "{err}");
        // Quoting.
        let odd = RoleState {
            name: "re\"lay".into(),
            ..role(true)
        };
        let plan = grant_plan(&owner, NAMES, &odd).unwrap();
        assert!(
            plan.steps[0].sql.ends_with("TO \"re\"\"lay\";"),
            "{}",
            plan.steps[0].sql
        );
        let owner_role = RoleState {
            owns_synapse_tables: true,
            ..role(true)
        };
        assert_eq!(grant_plan(&owner, NAMES, &owner_role).unwrap().warnings.len(), 1);
    }

    #[test]
    fn check_says_when_run_holds_too_much_or_too_little() {
        let minimal = RunRoleState {
            name: "relay".into(),
            superuser: false,
            owned_tables: vec![],
            missing: vec![],
        };
        assert!(run_role_problems(&minimal, NAMES).is_empty());
        let owner = RunRoleState {
            owned_tables: vec!["account_data".into()],
            ..minimal.clone()
        };
        let p = run_role_problems(&owner, NAMES);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].severity, Severity::Warning);
        assert!(
            p[0].message.contains("owns (or is a member of the owner of)"),
            "{}",
            p[0]
        );
        assert!(p[0].message.contains("setup --grant-to relay"), "{}", p[0]);
        let superuser = RunRoleState {
            superuser: true,
            missing: vec!["SELECT on account_data".into()],
            ..minimal.clone()
        };
        let p = run_role_problems(&superuser, NAMES);
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("is a superuser"), "{}", p[0]);
        let lacking = RunRoleState {
            missing: vec!["SELECT on room_tags".into()],
            ..minimal
        };
        let p = run_role_problems(&lacking, NAMES);
        assert_eq!(p[0].severity, Severity::Error);
        assert!(p[0].message.contains("SELECT on room_tags"), "{}", p[0]);
    }
}
