//! What is wrong with the database as found, for `check`, `setup` and `run` (pure).

use postgres_protocol::escape::escape_identifier;

use crate::config::Names;
use crate::setup::state::DatabaseState;
use crate::synapse::rows::SynapseTable;

/// How bad a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Worth knowing; the relay works.
    Warning,
    /// `setup` can fix it.
    NeedsSetup,
    /// An administrator must act (settings, restarts, privileges).
    Error,
}

/// Something wrong with the database, for `check`, `setup` and `run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.severity {
            Severity::Warning => "warning",
            Severity::NeedsSetup => "needs setup",
            Severity::Error => "error",
        };
        write!(f, "[{tag}] {}", self.message)
    }
}

pub(super) fn problem(severity: Severity, message: impl Into<String>) -> Problem {
    Problem {
        severity,
        message: message.into(),
    }
}

/// The server settings and privileges no `setup` can change.
pub fn prerequisite_problems(s: &DatabaseState) -> Vec<Problem> {
    let mut out = Vec::new();
    if s.wal_level != "logical" {
        out.push(problem(
            Severity::Error,
            format!(
                "wal_level is {:?}, logical replication needs \"logical\". As a superuser run \
                 `ALTER SYSTEM SET wal_level = logical;` (or set it in postgresql.conf), then restart PostgreSQL \
                 (a reload is not enough)",
                s.wal_level
            ),
        ));
    }
    if s.max_replication_slots < 1 || s.max_wal_senders < 1 {
        out.push(problem(
            Severity::Error,
            format!(
                "max_replication_slots is {} and max_wal_senders is {}: both must be at least 1 (10 is the default); \
                 change them in postgresql.conf and restart PostgreSQL",
                s.max_replication_slots, s.max_wal_senders
            ),
        ));
    }
    if !s.superuser && !s.replication_role {
        out.push(problem(
            Severity::Error,
            format!(
                "role {role:?} lacks the REPLICATION attribute that logical replication needs. As a superuser run \
                 `ALTER ROLE {ident} WITH REPLICATION;`",
                role = s.role,
                ident = escape_identifier(&s.role)
            ),
        ));
    }
    if s.server_version_num < 140000 {
        out.push(problem(
            Severity::Warning,
            format!(
                "PostgreSQL {} is older than 14, the oldest Synapse supports; the relay is tested on 15 and 17",
                s.server_version
            ),
        ));
    }
    for t in &s.tables {
        if !t.exists {
            out.push(problem(
                Severity::Error,
                format!(
                    "table {} does not exist in database {:?} (on the role's search_path): is this Synapse's database?",
                    t.table.name(),
                    s.database
                ),
            ));
        } else if !t.unique_index_exists && !t.has_usable_identity() {
            out.push(problem(
                Severity::Error,
                format!(
                    "table {} has no unique index {} to use as its replica identity: this Synapse schema is not one the relay knows",
                    t.table.name(),
                    t.table.unique_index()
                ),
            ));
        }
    }
    out
}

/// Everything wrong, for `check` (and the parts `run` refuses to start on).
pub fn problems(s: &DatabaseState, names: Names<'_>) -> Vec<Problem> {
    let mut out = prerequisite_problems(s);
    let published: Vec<&str> = s
        .publication
        .as_ref()
        .map(|p| p.tables.iter().map(String::as_str).collect())
        .unwrap_or_default();
    for t in s.tables.iter().filter(|t| t.exists) {
        let in_pub = published.contains(&t.table.name());
        if !t.has_usable_identity() {
            if in_pub || !t.other_publications.is_empty() {
                out.push(problem(
                    Severity::Error,
                    format!(
                        "table {} is in a publication ({}) but has replica identity {}: PostgreSQL is FAILING Synapse's \
                         writes to it right now. Run `synapse-account-data-relay setup` (or `ALTER TABLE {} REPLICA IDENTITY \
                         USING INDEX {};`) at once",
                        t.table.name(),
                        if in_pub { names.publication.to_owned() } else { t.other_publications.join(", ") },
                        t.replica_identity.word(),
                        t.table.name(),
                        t.table.unique_index()
                    ),
                ));
            } else {
                out.push(problem(
                    Severity::NeedsSetup,
                    format!(
                        "table {} has replica identity {}, not its unique index",
                        t.table.name(),
                        t.replica_identity.word()
                    ),
                ));
            }
        }
    }
    match &s.publication {
        None => out.push(problem(
            Severity::NeedsSetup,
            format!("publication {:?} does not exist", names.publication),
        )),
        Some(p) => {
            let missing: Vec<&str> = SynapseTable::ALL
                .iter()
                .map(|t| t.name())
                .filter(|n| !p.all_tables && !published.contains(n))
                .collect();
            if !missing.is_empty() {
                out.push(problem(
                    Severity::NeedsSetup,
                    format!(
                        "publication {:?} does not cover {}",
                        names.publication,
                        missing.join(", ")
                    ),
                ));
            }
            if !p.publishes_insert || !p.publishes_update {
                out.push(problem(
                    Severity::Error,
                    format!(
                        "publication {:?} does not publish inserts and updates; drop it (`teardown`) and run `setup` again",
                        names.publication
                    ),
                ));
            }
            if p.all_tables {
                out.push(problem(
                    Severity::Warning,
                    format!(
                        "publication {:?} is FOR ALL TABLES: many Synapse tables have no key, so their updates fail while it exists",
                        names.publication
                    ),
                ));
            }
        }
    }
    if !s.push_publication {
        out.push(problem(
            Severity::NeedsSetup,
            format!(
                "publication {:?} (push_rules_stream, inserts only) does not exist",
                names.push_publication
            ),
        ));
    }
    match &s.state_schema {
        Some(st) if st.complete => {}
        Some(st) if !st.ours => out.push(problem(
            Severity::Error,
            format!(
                "schema {:?} exists but is not the relay's (its comment does not say so); choose another \
                 replication.state_schema",
                names.state_schema
            ),
        )),
        _ => out.push(problem(
            Severity::NeedsSetup,
            format!(
                "the relay's state schema {:?} does not exist or is incomplete",
                names.state_schema
            ),
        )),
    }
    match &s.slot {
        None => out.push(problem(
            Severity::NeedsSetup,
            format!("replication slot {:?} does not exist", names.slot),
        )),
        Some(slot) => {
            if slot.slot_type != "logical" || slot.plugin.as_deref() != Some("pgoutput") {
                out.push(problem(
                    Severity::Error,
                    format!(
                        "replication slot {:?} is a {} slot with plugin {:?}, not a logical pgoutput slot; choose another \
                         slot_name or drop it",
                        names.slot, slot.slot_type, slot.plugin
                    ),
                ));
            }
            if slot.database.as_deref().is_some_and(|d| d != s.database) {
                out.push(problem(
                    Severity::Error,
                    format!(
                        "replication slot {:?} belongs to database {:?}, not {:?}",
                        names.slot,
                        slot.database.as_deref().unwrap_or(""),
                        s.database
                    ),
                ));
            }
            if slot.wal_status.as_deref() == Some("lost") {
                out.push(problem(
                    Severity::Error,
                    format!(
                        "replication slot {:?} is invalidated (wal_status = lost): PostgreSQL removed WAL it needed \
                         (max_slot_wal_keep_size), so changes since {} are gone from the stream. Drop and re-create it \
                         (`teardown` then `setup`) and resync the appservices",
                        names.slot,
                        slot.confirmed_flush_lsn.map(|l| l.to_string()).unwrap_or_default()
                    ),
                ));
            }
        }
    }
    out
}
