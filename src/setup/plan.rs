//! The SQL `setup` and `teardown` run (pure): [`setup_plan`] and [`teardown_plan`] say which SQL
//! brings the database from the state found ([`super::inspect`]) to the wanted state, so
//! `--dry-run` prints exactly what would run, and the same text ships in `sql/`.
//!
//! **The landmine.** A table without a usable replica identity in a publication that publishes
//! UPDATE makes PostgreSQL fail Synapse's own upserts on that table. So the plan sets
//! `REPLICA IDENTITY USING INDEX` on each table *before*, and in the same transaction as, the
//! statement that puts it in the publication; teardown drops the publication *before* restoring
//! the replica identity; and `run` refuses to start if a published table lacks it. Every
//! statement runs with a short `lock_timeout` (100 ms), so setup never queues Synapse's writes
//! behind it for long, and [`execute_plan`] repeats a step whose lock was not granted (see
//! [`LOCK_ATTEMPTS`]).
//!
//! [`execute_plan`]: super::execute::execute_plan

use std::collections::BTreeMap;
use std::fmt::Write as _;

use postgres_protocol::escape::{escape_identifier, escape_literal};

use crate::config::Names;
use crate::model::Lsn;
use crate::setup::checks::{Problem, Severity, prerequisite_problems, problem, problems};
use crate::setup::state::{DatabaseState, PublicationState, ReplicaIdentity, SlotState, StateSchemaState, TableState};
use crate::synapse::rows::SynapseTable;

/// One step of a plan: what it does, and its SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanStep {
    pub description: String,
    pub sql: String,
    /// Steps with the same `group` run in one transaction.
    pub group: u32,
}

/// The `lock_timeout` every plan runs with. `ALTER TABLE … REPLICA IDENTITY` wants an
/// `ACCESS EXCLUSIVE` lock, and while it waits for one every Synapse statement on that table
/// queues behind it: so it waits very little, and [`execute_plan`] tries again (see
/// [`LOCK_ATTEMPTS`]). A Synapse write is held up at most about this long per try.
///
/// [`execute_plan`]: super::execute::execute_plan
pub const LOCK_TIMEOUT: &str = "100ms";

/// How many times [`execute_plan`] runs a step whose locks were not granted within
/// [`LOCK_TIMEOUT`] (SQLSTATE 55P03), with a jittered pause of 100 ms to 1 s between tries
/// (about 45 s in all), before it gives up.
///
/// [`execute_plan`]: super::execute::execute_plan
pub const LOCK_ATTEMPTS: u32 = 50;

const COMMENT_PREFIX: &str = "synapse-account-data-relay; replica identity before setup:";

fn identity_comment(s: &DatabaseState, existing: Option<&str>) -> String {
    // Keep what an earlier setup recorded: that is the state before the first setup.
    let recorded = existing.map(parse_identity_comment).unwrap_or_default();
    let mut c = String::from(COMMENT_PREFIX);
    for t in s.tables.iter().filter(|t| t.exists) {
        let before =
            recorded
                .get(t.table.name())
                .cloned()
                .unwrap_or_else(|| match (t.replica_identity, &t.replica_index) {
                    (ReplicaIdentity::Index, Some(i)) => format!("index:{i}"),
                    (r, _) => r.word().to_owned(),
                });
        let _ = write!(c, " {}={}", t.table.name(), before);
    }
    c
}

/// Parse the publication comment `setup` writes: table → `default` | `full` | `nothing` | `index:<name>`.
pub fn parse_identity_comment(comment: &str) -> BTreeMap<String, String> {
    let Some(rest) = comment.strip_prefix(COMMENT_PREFIX) else {
        return BTreeMap::new();
    };
    rest.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The SQL `setup` runs to reach the wanted state from `s`; empty when nothing is to do.
/// Refuses (returns the problems) while a prerequisite is missing.
pub fn setup_plan(s: &DatabaseState, names: Names<'_>) -> Result<Vec<PlanStep>, Vec<Problem>> {
    let blocking: Vec<Problem> = prerequisite_problems(s)
        .into_iter()
        .filter(|p| p.severity == Severity::Error)
        .collect();
    let mut blocking = blocking;
    for t in s
        .tables
        .iter()
        .filter(|t| t.exists && !t.has_usable_identity() && !t.owned_by_us && !s.superuser)
    {
        blocking.push(problem(
            Severity::Error,
            format!(
                "role {:?} cannot ALTER table {} (owned by {:?}): run setup as the table owner or a superuser",
                s.role,
                t.table.name(),
                t.owner
            ),
        ));
    }
    if names.failover_slot && s.server_version_num < 170000 && s.slot.is_none() {
        blocking.push(problem(
            Severity::Error,
            format!(
                "replication.failover = true needs PostgreSQL 17 or newer (failover slots); this server is {}",
                s.server_version
            ),
        ));
    }
    if s.state_schema.is_none() && !s.can_create_schema && !s.superuser {
        blocking.push(problem(
            Severity::Error,
            format!(
                "role {:?} may not create schemas in database {:?} (for the relay's state): as a superuser run \
                 `GRANT CREATE ON DATABASE {} TO {};`",
                s.role,
                s.database,
                escape_identifier(&s.database),
                escape_identifier(&s.role)
            ),
        ));
    }
    if let Some(st) = &s.state_schema
        && !st.ours
    {
        blocking.push(problem(
            Severity::Error,
            format!(
                "schema {:?} exists but is not the relay's; choose another replication.state_schema",
                names.state_schema
            ),
        ));
    }
    if let Some(slot) = &s.slot
        && (slot.slot_type != "logical"
            || slot.plugin.as_deref() != Some("pgoutput")
            || slot.wal_status.as_deref() == Some("lost"))
    {
        blocking.extend(
            problems(s, names)
                .into_iter()
                .filter(|p| p.message.contains("replication slot")),
        );
    }
    if !blocking.is_empty() {
        return Err(blocking);
    }
    let mut steps = Vec::new();
    let lock = PlanStep {
        description: format!(
            "wait at most {LOCK_TIMEOUT} for table locks, so Synapse's writes never queue behind setup for longer \
             (setup tries again; by hand, run the file again if a lock timeout stops it)"
        ),
        sql: format!("SET lock_timeout = '{LOCK_TIMEOUT}';"),
        group: 0,
    };
    for t in s.tables.iter().filter(|t| !t.has_usable_identity()) {
        steps.push(PlanStep {
            description: format!(
                "give {} a replica identity (its unique index) BEFORE it enters a publication, so Synapse's updates keep working",
                t.table.name()
            ),
            sql: format!(
                "ALTER TABLE {} REPLICA IDENTITY USING INDEX {};",
                escape_identifier(t.table.name()),
                escape_identifier(t.table.unique_index())
            ),
            group: 1,
        });
    }
    let table_list = SynapseTable::ALL
        .iter()
        .map(|t| escape_identifier(t.name()))
        .collect::<Vec<_>>()
        .join(", ");
    let pub_ident = escape_identifier(names.publication);
    match &s.publication {
        None => steps.push(PlanStep {
            description: format!(
                "create publication {:?} for the three account-data tables",
                names.publication
            ),
            sql: format!(
                "CREATE PUBLICATION {pub_ident} FOR TABLE {table_list} WITH (publish = 'insert, update, truncate');"
            ),
            group: 1,
        }),
        Some(p) if !p.all_tables => {
            let missing: Vec<String> = SynapseTable::ALL
                .iter()
                .filter(|t| !p.tables.iter().any(|x| x == t.name()))
                .map(|t| escape_identifier(t.name()))
                .collect();
            if !missing.is_empty() {
                steps.push(PlanStep {
                    description: format!("add {} to publication {:?}", missing.join(", "), names.publication),
                    sql: format!("ALTER PUBLICATION {pub_ident} ADD TABLE {};", missing.join(", ")),
                    group: 1,
                });
            }
        }
        Some(_) => {}
    }
    let comment = identity_comment(s, s.publication.as_ref().and_then(|p| p.comment.as_deref()));
    if !steps.is_empty() && s.publication.as_ref().and_then(|p| p.comment.as_deref()) != Some(comment.as_str()) {
        steps.push(PlanStep {
            description: "record each table's replica identity before setup, for teardown to restore".into(),
            sql: format!("COMMENT ON PUBLICATION {pub_ident} IS {};", escape_literal(&comment)),
            group: 1,
        });
    }
    if !s.push_publication {
        steps.push(PlanStep {
            description: format!(
                "create publication {:?} for push_rules_stream, publishing inserts only (the table has no key and \
                 needs no replica identity for that)",
                names.push_publication
            ),
            sql: format!(
                "CREATE PUBLICATION {} FOR TABLE \"push_rules_stream\" WITH (publish = 'insert');",
                escape_identifier(names.push_publication)
            ),
            group: 1,
        });
    }
    if !s.state_schema.as_ref().is_some_and(|st| st.complete) {
        for sql in crate::resync::store::StateStore::create_sql(names.state_schema) {
            steps.push(PlanStep {
                description: format!(
                    "create the relay's state schema {:?} (keys to resync for appservices that are down)",
                    names.state_schema
                ),
                sql,
                group: 1,
            });
        }
    }
    if s.slot.is_none() {
        steps.push(PlanStep {
            description: format!(
                "create logical replication slot {:?} with pgoutput (after the publication: a slot cannot decode changes \
                 made before a publication it is asked for existed)",
                names.slot
            ),
            sql: if names.failover_slot {
                format!("SELECT pg_create_logical_replication_slot({}, 'pgoutput', false, false, true);", escape_literal(names.slot))
            } else {
                format!("SELECT pg_create_logical_replication_slot({}, 'pgoutput');", escape_literal(names.slot))
            },
            group: 2,
        });
    }
    if !steps.is_empty() {
        steps.insert(0, lock);
    }
    Ok(steps)
}

/// The SQL `teardown` runs: drop the slot and the publication, then restore each table's
/// replica identity as `setup` found it — unless another publication still needs it.
pub fn teardown_plan(s: &DatabaseState, names: Names<'_>) -> (Vec<PlanStep>, Vec<Problem>) {
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    if let Some(slot) = &s.slot {
        if slot.active {
            notes.push(problem(
                Severity::Error,
                format!(
                    "replication slot {:?} is in use by PID {}: stop the relay first",
                    names.slot,
                    slot.active_pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                ),
            ));
            return (Vec::new(), notes);
        }
        steps.push(PlanStep {
            description: format!(
                "drop replication slot {:?} (PostgreSQL stops retaining WAL for it)",
                names.slot
            ),
            sql: format!("SELECT pg_drop_replication_slot({});", escape_literal(names.slot)),
            group: 0,
        });
    }
    let recorded = s
        .publication
        .as_ref()
        .and_then(|p| p.comment.as_deref())
        .map(parse_identity_comment)
        .unwrap_or_default();
    let lock = PlanStep {
        description: format!("wait at most {LOCK_TIMEOUT} for table locks"),
        sql: format!("SET lock_timeout = '{LOCK_TIMEOUT}';"),
        group: 1,
    };
    let mut group1 = Vec::new();
    if s.publication.is_some() {
        group1.push(PlanStep {
            description: format!(
                "drop publication {:?} (before touching replica identities)",
                names.publication
            ),
            sql: format!("DROP PUBLICATION {};", escape_identifier(names.publication)),
            group: 1,
        });
    }
    if s.push_publication {
        group1.push(PlanStep {
            description: format!("drop publication {:?}", names.push_publication),
            sql: format!("DROP PUBLICATION {};", escape_identifier(names.push_publication)),
            group: 1,
        });
    }
    if let Some(st) = &s.state_schema {
        if st.ours {
            group1.push(PlanStep {
                description: format!(
                    "drop the relay's state schema {:?} and the keys it holds",
                    names.state_schema
                ),
                sql: format!("DROP SCHEMA {} CASCADE;", escape_identifier(names.state_schema)),
                group: 1,
            });
        } else {
            notes.push(problem(
                Severity::Warning,
                format!(
                    "schema {:?} is not the relay's (its comment does not say so): left alone",
                    names.state_schema
                ),
            ));
        }
    }
    for t in s.tables.iter().filter(|t| t.exists) {
        let before = recorded.get(t.table.name()).map(String::as_str).unwrap_or("default");
        let (identity, index) = match before.split_once(':') {
            Some(("index", i)) => (ReplicaIdentity::Index, Some(i.to_owned())),
            _ => (
                ReplicaIdentity::from_word(before).unwrap_or(ReplicaIdentity::Default),
                None,
            ),
        };
        let current_matches =
            t.replica_identity == identity && (identity != ReplicaIdentity::Index || t.replica_index == index);
        if current_matches {
            continue;
        }
        if !t.other_publications.is_empty() && !matches!(identity, ReplicaIdentity::Index | ReplicaIdentity::Full) {
            notes.push(problem(
                Severity::Warning,
                format!(
                    "keeping {}'s replica identity: publication(s) {} still publish its updates, and without it Synapse's writes would fail",
                    t.table.name(),
                    t.other_publications.join(", ")
                ),
            ));
            continue;
        }
        let clause = match &index {
            Some(i) => format!("USING INDEX {}", escape_identifier(i)),
            None => identity.sql_clause().to_owned(),
        };
        group1.push(PlanStep {
            description: format!("restore {}'s replica identity to {}", t.table.name(), before),
            sql: format!(
                "ALTER TABLE {} REPLICA IDENTITY {clause};",
                escape_identifier(t.table.name())
            ),
            group: 1,
        });
    }
    if !group1.is_empty() {
        steps.push(lock);
        steps.extend(group1);
    }
    (steps, notes)
}

/// A plan as an SQL script (for `--dry-run` and `sql/`).
pub fn plan_to_sql(steps: &[PlanStep]) -> String {
    let mut out = String::new();
    let mut open_group = None;
    for (i, step) in steps.iter().enumerate() {
        let next_group = steps.get(i + 1).map(|s| s.group);
        let grouped = step.group == 1;
        if grouped && open_group != Some(step.group) && !step.sql.starts_with("SET ") {
            out.push_str("BEGIN;\n");
            open_group = Some(step.group);
        }
        let _ = writeln!(out, "-- {}\n{}", step.description, step.sql);
        if open_group == Some(step.group) && next_group != Some(step.group) {
            out.push_str("COMMIT;\n");
            open_group = None;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(t: SynapseTable, identity: ReplicaIdentity) -> TableState {
        TableState::stock(t, identity)
    }

    fn fresh() -> DatabaseState {
        DatabaseState::stock_synapse()
    }

    const NAMES: Names<'static> = Names {
        slot: "relay_slot",
        publication: "relay_pub",
        push_publication: "relay_pub_push_rules",
        state_schema: "relay_state",
        failover_slot: false,
    };

    #[test]
    fn setup_sets_replica_identity_before_the_publication_in_one_transaction() {
        let plan = setup_plan(&fresh(), NAMES).unwrap();
        let sql: Vec<&str> = plan.iter().map(|s| s.sql.as_str()).collect();
        let create = sql.iter().position(|s| s.starts_with("CREATE PUBLICATION")).unwrap();
        for t in SynapseTable::ALL {
            let alter = sql
                .iter()
                .position(|s| s.contains(&format!("ALTER TABLE \"{}\" REPLICA IDENTITY USING INDEX", t.name())))
                .unwrap();
            assert!(alter < create, "{sql:#?}");
            assert_eq!(plan[alter].group, plan[create].group, "same transaction");
        }
        assert!(sql[0].starts_with("SET lock_timeout"));
        assert!(
            sql.last()
                .unwrap()
                .contains("pg_create_logical_replication_slot('relay_slot', 'pgoutput')")
        );
        let script = plan_to_sql(&plan);
        assert!(script.contains("BEGIN;") && script.contains("COMMIT;"), "{script}");
        assert!(
            script.find("COMMIT;").unwrap() < script.find("pg_create_logical_replication_slot").unwrap(),
            "{script}"
        );
        assert!(!sql.iter().any(|s| s.contains("ALL TABLES")));
    }

    #[test]
    fn setup_is_idempotent() {
        let mut s = fresh();
        s.tables = SynapseTable::ALL
            .iter()
            .map(|t| table(*t, ReplicaIdentity::Index))
            .collect();
        s.publication = Some(PublicationState {
            tables: SynapseTable::ALL.iter().map(|t| t.name().to_owned()).collect(),
            all_tables: false,
            publishes_insert: true,
            publishes_update: true,
            comment: Some(identity_comment(&fresh(), None)),
        });
        s.slot = Some(SlotState {
            plugin: Some("pgoutput".into()),
            slot_type: "logical".into(),
            database: Some("synapse".into()),
            active: false,
            active_pid: None,
            wal_status: Some("reserved".into()),
            confirmed_flush_lsn: Some(Lsn(1)),
            restart_lsn: Some(Lsn(1)),
        });
        s.push_publication = true;
        s.state_schema = Some(StateSchemaState {
            ours: true,
            complete: true,
        });
        assert_eq!(setup_plan(&s, NAMES).unwrap(), vec![]);
        assert!(problems(&s, NAMES).is_empty(), "{:?}", problems(&s, NAMES));
    }

    #[test]
    fn setup_refuses_without_wal_level_or_replication_and_says_how_to_fix() {
        let mut s = fresh();
        s.wal_level = "replica".into();
        s.replication_role = false;
        let errs = setup_plan(&s, NAMES).unwrap_err();
        let text = errs.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n");
        assert!(text.contains("wal_level") && text.contains("restart"), "{text}");
        assert!(text.contains("ALTER ROLE \"synapse\" WITH REPLICATION"), "{text}");
    }

    #[test]
    fn a_published_table_without_identity_is_reported_as_breaking_synapse() {
        let mut s = fresh();
        s.publication = Some(PublicationState {
            tables: vec!["account_data".into()],
            all_tables: false,
            publishes_insert: true,
            publishes_update: true,
            comment: None,
        });
        let p = problems(&s, NAMES);
        assert!(
            p.iter()
                .any(|p| p.severity == Severity::Error && p.message.contains("FAILING Synapse's writes")),
            "{p:?}"
        );
    }

    #[test]
    fn teardown_drops_the_publication_before_restoring_identity_as_found() {
        let mut before = fresh();
        before.tables[1] = table(SynapseTable::RoomAccountData, ReplicaIdentity::Full);
        let comment = identity_comment(&before, None);
        let mut s = fresh();
        s.tables = SynapseTable::ALL
            .iter()
            .map(|t| table(*t, ReplicaIdentity::Index))
            .collect();
        s.publication = Some(PublicationState {
            tables: vec![],
            all_tables: false,
            publishes_insert: true,
            publishes_update: true,
            comment: Some(comment),
        });
        let (plan, notes) = teardown_plan(&s, NAMES);
        assert!(notes.is_empty(), "{notes:?}");
        let sql: Vec<&str> = plan.iter().map(|p| p.sql.as_str()).collect();
        let drop = sql.iter().position(|s| s.starts_with("DROP PUBLICATION")).unwrap();
        let alters: Vec<usize> = sql
            .iter()
            .enumerate()
            .filter(|(_, s)| s.starts_with("ALTER TABLE"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(alters.len(), 3);
        assert!(alters.iter().all(|a| *a > drop));
        assert!(
            sql.contains(&"ALTER TABLE \"room_account_data\" REPLICA IDENTITY FULL;"),
            "{sql:#?}"
        );
        assert!(
            sql.contains(&"ALTER TABLE \"account_data\" REPLICA IDENTITY DEFAULT;"),
            "{sql:#?}"
        );
    }

    #[test]
    fn teardown_keeps_identity_another_publication_needs_and_refuses_an_active_slot() {
        let mut s = fresh();
        s.tables = SynapseTable::ALL
            .iter()
            .map(|t| table(*t, ReplicaIdentity::Index))
            .collect();
        s.tables[0].other_publications = vec!["someone_elses".into()];
        let (plan, notes) = teardown_plan(&s, NAMES);
        assert!(!plan.iter().any(|p| p.sql.contains("\"account_data\"")), "{plan:#?}");
        assert!(notes[0].message.contains("someone_elses"));
        s.slot = Some(SlotState {
            plugin: Some("pgoutput".into()),
            slot_type: "logical".into(),
            database: None,
            active: true,
            active_pid: Some(42),
            wal_status: None,
            confirmed_flush_lsn: None,
            restart_lsn: None,
        });
        let (plan, notes) = teardown_plan(&s, NAMES);
        assert!(plan.is_empty() && notes[0].message.contains("PID 42"));
    }

    #[test]
    fn identity_comment_round_trips_and_keeps_the_first_record() {
        let mut s = fresh();
        s.tables[2] = TableState {
            replica_index: Some("custom_idx".into()),
            ..table(SynapseTable::RoomTagsRevisions, ReplicaIdentity::Index)
        };
        let c = identity_comment(&s, None);
        let parsed = parse_identity_comment(&c);
        assert_eq!(parsed["account_data"], "default");
        assert_eq!(parsed["room_tags_revisions"], "index:custom_idx");
        // After setup the tables have our index; a second setup keeps the original record.
        let after: DatabaseState = DatabaseState {
            tables: SynapseTable::ALL
                .iter()
                .map(|t| table(*t, ReplicaIdentity::Index))
                .collect(),
            ..fresh()
        };
        assert_eq!(identity_comment(&after, Some(&c)), c);
    }
}

impl TableState {
    /// A table of a stock Synapse database (owned by `synapse`) with the given replica identity.
    pub fn stock(table: SynapseTable, identity: ReplicaIdentity) -> TableState {
        TableState {
            table,
            exists: true,
            schema: "public".into(),
            owner: "synapse".into(),
            owned_by_us: true,
            replica_identity: identity,
            replica_index: (identity == ReplicaIdentity::Index).then(|| table.unique_index().to_owned()),
            unique_index_exists: true,
            other_publications: vec![],
        }
    }
}

impl DatabaseState {
    /// A stock Synapse database on PostgreSQL 15, ready for `setup`: `wal_level=logical`, the
    /// role `synapse` with REPLICATION, default replica identities, no publication, no slot.
    pub fn stock_synapse() -> DatabaseState {
        DatabaseState {
            server_version_num: 150000,
            server_version: "15".into(),
            wal_level: "logical".into(),
            max_replication_slots: 10,
            max_wal_senders: 10,
            database: "synapse".into(),
            role: "synapse".into(),
            superuser: false,
            replication_role: true,
            tables: SynapseTable::ALL
                .iter()
                .map(|t| TableState::stock(*t, ReplicaIdentity::Default))
                .collect(),
            publication: None,
            slot: None,
            current_wal_lsn: Lsn(0),
            can_create_schema: true,
            state_schema: None,
            push_publication: false,
        }
    }
}

/// The SQL shipped in `sql/` for admins who apply it by hand: `setup` and `teardown` for a stock
/// Synapse database (no replica identities set, no publication, no slot) with the default names.
pub fn stock_synapse_scripts() -> (String, String) {
    let names = Names::defaults();
    let table = TableState::stock;
    let stock = DatabaseState::stock_synapse();
    let setup = setup_plan(&stock, names).unwrap_or_default();
    let after = DatabaseState {
        tables: SynapseTable::ALL
            .iter()
            .map(|t| table(*t, ReplicaIdentity::Index))
            .collect(),
        publication: Some(PublicationState {
            tables: SynapseTable::ALL.iter().map(|t| t.name().to_owned()).collect(),
            all_tables: false,
            publishes_insert: true,
            publishes_update: true,
            comment: Some(identity_comment(&stock, None)),
        }),
        slot: Some(SlotState {
            plugin: Some("pgoutput".into()),
            slot_type: "logical".into(),
            database: Some("synapse".into()),
            active: false,
            active_pid: None,
            wal_status: Some("reserved".into()),
            confirmed_flush_lsn: None,
            restart_lsn: None,
        }),
        state_schema: Some(StateSchemaState {
            ours: true,
            complete: true,
        }),
        push_publication: true,
        ..stock.clone()
    };
    let (teardown, _) = teardown_plan(&after, names);
    let header = |what: &str| {
        format!(
            "-- synapse-account-data-relay {what} for a stock Synapse database, default names.\n\
             -- Generated from the same plan `synapse-account-data-relay {what} --dry-run` prints for your database;\n\
             -- prefer that command, which adapts to what it finds. Run as the owner of Synapse's tables\n\
             -- (Synapse's database role) connected to Synapse's database, e.g. `psql -U synapse -d synapse -f {what}.sql`.\n"
        )
    };
    (
        format!(
            "{}-- Prerequisites: wal_level = logical (needs a restart), and the role has REPLICATION:\n\
             --   ALTER SYSTEM SET wal_level = logical;   -- then restart PostgreSQL\n\
             --   ALTER ROLE synapse WITH REPLICATION;     -- as a superuser\n{}",
            header("setup"),
            plan_to_sql(&setup)
        ),
        format!(
            "{}-- Stop the relay first.\n{}",
            header("teardown"),
            plan_to_sql(&teardown)
        ),
    )
}

#[cfg(test)]
mod shipped_sql {
    #[test]
    fn the_sql_directory_matches_the_plans() {
        let (setup, teardown) = super::stock_synapse_scripts();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
        if std::env::var_os("RELAY_WRITE_SQL").is_some() {
            std::fs::write(dir.join("setup.sql"), &setup).unwrap();
            std::fs::write(dir.join("teardown.sql"), &teardown).unwrap();
        }
        let shipped = std::fs::read_to_string(dir.join("setup.sql")).unwrap_or_default();
        assert_eq!(
            shipped, setup,
            "sql/setup.sql is stale: regenerate with RELAY_WRITE_SQL=1 cargo test --lib shipped_sql"
        );
        let shipped = std::fs::read_to_string(dir.join("teardown.sql")).unwrap_or_default();
        assert_eq!(
            shipped, teardown,
            "sql/teardown.sql is stale: regenerate with RELAY_WRITE_SQL=1 cargo test --lib shipped_sql"
        );
    }
}
