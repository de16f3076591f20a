//! What `setup`, `check`, `teardown` and `run` need to know about, and change in, Synapse's
//! database: the server's settings, the role, the three published tables and their replica
//! identity, the publication and the slot.
//!
//! [`inspect`] reads the state (I/O, read-only). Everything else is pure: [`problems`] says what
//! is wrong, [`setup_plan`] and [`teardown_plan`] say which SQL brings the database to the wanted
//! state, so `--dry-run` prints exactly what would run, and the same text ships in `sql/`.
//!
//! **The landmine.** A table without a usable replica identity in a publication that publishes
//! UPDATE makes PostgreSQL fail Synapse's own upserts on that table. So the plan sets
//! `REPLICA IDENTITY USING INDEX` on each table *before*, and in the same transaction as, the
//! statement that puts it in the publication; teardown drops the publication *before* restoring
//! the replica identity; and `run` refuses to start if a published table lacks it. Every
//! statement runs with a short `lock_timeout` (100 ms), so setup never queues Synapse's writes
//! behind it for long, and [`execute_plan`] repeats a step whose lock was not granted (see
//! [`LOCK_ATTEMPTS`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use postgres_protocol::escape::{escape_identifier, escape_literal};

use crate::model::Lsn;
use crate::synapse::rows::SynapseTable;

/// PostgreSQL's `relreplident`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

impl ReplicaIdentity {
    pub fn from_code(c: &str) -> Option<ReplicaIdentity> {
        Some(match c {
            "d" => ReplicaIdentity::Default,
            "n" => ReplicaIdentity::Nothing,
            "f" => ReplicaIdentity::Full,
            "i" => ReplicaIdentity::Index,
            _ => return None,
        })
    }
    /// The SQL that restores it (for `Index`, the caller supplies the index name).
    fn sql_clause(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "DEFAULT",
            ReplicaIdentity::Nothing => "NOTHING",
            ReplicaIdentity::Full => "FULL",
            ReplicaIdentity::Index => "USING INDEX",
        }
    }
    fn word(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "default",
            ReplicaIdentity::Nothing => "nothing",
            ReplicaIdentity::Full => "full",
            ReplicaIdentity::Index => "index",
        }
    }
    fn from_word(w: &str) -> Option<ReplicaIdentity> {
        [
            ReplicaIdentity::Default,
            ReplicaIdentity::Nothing,
            ReplicaIdentity::Full,
            ReplicaIdentity::Index,
        ]
        .into_iter()
        .find(|r| r.word() == w)
    }
}

/// One of the published tables, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableState {
    pub table: SynapseTable,
    /// `None` when the table does not exist (not a Synapse database?).
    pub exists: bool,
    pub schema: String,
    pub owner: String,
    /// Whether the connected role may ALTER the table (owns it, or is a member of the owner).
    pub owned_by_us: bool,
    pub replica_identity: ReplicaIdentity,
    /// The index used as replica identity, when `replica_identity` is `Index`.
    pub replica_index: Option<String>,
    /// Whether the unique index Synapse creates exists.
    pub unique_index_exists: bool,
    /// Publications other than ours that publish UPDATE or DELETE for this table.
    pub other_publications: Vec<String>,
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

    /// Whether its replica identity is the one `setup` sets (or any index, which also works).
    pub fn has_usable_identity(&self) -> bool {
        matches!(self.replica_identity, ReplicaIdentity::Index | ReplicaIdentity::Full)
    }
}

/// Our publication, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationState {
    pub tables: Vec<String>,
    pub all_tables: bool,
    pub publishes_insert: bool,
    pub publishes_update: bool,
    pub comment: Option<String>,
}

/// Our slot, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub slot_type: String,
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
}

/// Everything [`inspect`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseState {
    pub server_version_num: i32,
    pub server_version: String,
    pub wal_level: String,
    pub max_replication_slots: i32,
    pub max_wal_senders: i32,
    pub database: String,
    pub role: String,
    pub superuser: bool,
    pub replication_role: bool,
    pub tables: Vec<TableState>,
    pub publication: Option<PublicationState>,
    pub slot: Option<SlotState>,
    pub current_wal_lsn: Lsn,
    /// Whether the role may create a schema in the database (for the relay's state).
    pub can_create_schema: bool,
    /// Whether the push-rules publication exists.
    pub push_publication: bool,
    /// The relay's state schema, if it exists.
    pub state_schema: Option<StateSchemaState>,
}

/// The relay's state schema, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSchemaState {
    /// Its comment says it is ours.
    pub ours: bool,
    /// `pending_keys`, `pending_key_version`, `appservices` and `backfills` all exist.
    pub complete: bool,
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

/// What a database error during inspection or a plan was about.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}{}", sqlstate.as_ref().map(|c| format!(" (SQLSTATE {c})")).unwrap_or_default())]
pub struct ProvisionError {
    pub what: String,
    pub message: String,
    pub sqlstate: Option<String>,
}

impl ProvisionError {
    pub fn from_pg(what: impl Into<String>, e: &tokio_postgres::Error) -> ProvisionError {
        let (message, sqlstate) = match e.as_db_error() {
            Some(db) => (
                format!(
                    "{}{}",
                    db.message(),
                    db.hint().map(|h| format!(" (hint: {h})")).unwrap_or_default()
                ),
                Some(db.code().code().to_owned()),
            ),
            None => (e.to_string(), e.code().map(|c| c.code().to_owned())),
        };
        ProvisionError {
            what: what.into(),
            message,
            sqlstate,
        }
    }
}

fn parse_lsn(s: Option<String>) -> Option<Lsn> {
    s.and_then(|s| s.parse().ok())
}

/// Read the database's state (read-only).
pub async fn inspect(client: &tokio_postgres::Client, names: Names<'_>) -> Result<DatabaseState, ProvisionError> {
    let (slot_name, publication_name) = (names.slot, names.publication);
    let err = |what: &str| {
        let what = what.to_owned();
        move |e: tokio_postgres::Error| ProvisionError::from_pg(what, &e)
    };
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'), \
                    current_setting('wal_level'), current_setting('max_replication_slots')::int, \
                    current_setting('max_wal_senders')::int, current_database()::text, current_user::text, \
                    r.rolsuper, r.rolreplication, pg_current_wal_lsn()::text, \
                    has_database_privilege(current_database(), 'CREATE') \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(err("reading the server's settings"))?;
    let table_names: Vec<&str> = SynapseTable::ALL.iter().map(|t| t.name()).collect();
    let index_names: Vec<&str> = SynapseTable::ALL.iter().map(|t| t.unique_index()).collect();
    let rows = client
        .query(
            "SELECT t.name, c.oid IS NOT NULL, coalesce(n.nspname, ''), coalesce(pg_get_userbyid(c.relowner)::text, ''), \
                    coalesce(pg_has_role(c.relowner, 'USAGE'), false), coalesce(c.relreplident::text, 'd'), \
                    (SELECT ri.relname::text FROM pg_index i JOIN pg_class ri ON ri.oid = i.indexrelid \
                      WHERE i.indrelid = c.oid AND i.indisreplident), \
                    EXISTS (SELECT 1 FROM pg_index i JOIN pg_class ri ON ri.oid = i.indexrelid \
                      WHERE i.indrelid = c.oid AND ri.relname = t.index_name AND i.indisunique), \
                    coalesce((SELECT array_agg(pt.pubname::text ORDER BY pt.pubname) FROM pg_publication_tables pt \
                      JOIN pg_publication p ON p.pubname = pt.pubname \
                      WHERE pt.schemaname = n.nspname AND pt.tablename = t.name AND pt.pubname <> $3 \
                        AND (p.pubupdate OR p.pubdelete)), '{}') \
             FROM unnest($1::text[], $2::text[]) AS t(name, index_name) \
             LEFT JOIN pg_class c ON c.oid = to_regclass(quote_ident(t.name)) \
             LEFT JOIN pg_namespace n ON n.oid = c.relnamespace \
             ORDER BY t.name",
            &[&table_names, &index_names, &publication_name],
        )
        .await
        .map_err(err("reading the account-data tables"))?;
    let mut tables: Vec<TableState> = Vec::new();
    for r in &rows {
        // Rows come back in no particular order: match them by name.
        let Some(table) = SynapseTable::from_name(r.get(0)) else {
            continue;
        };
        let ident: String = r.get(5);
        tables.push(TableState {
            table,
            exists: r.get(1),
            schema: r.get(2),
            owner: r.get(3),
            owned_by_us: r.get(4),
            replica_identity: ReplicaIdentity::from_code(&ident).unwrap_or(ReplicaIdentity::Default),
            replica_index: r.get(6),
            unique_index_exists: r.get(7),
            other_publications: r.get(8),
        });
    }
    tables.sort_by_key(|t| SynapseTable::ALL.iter().position(|x| *x == t.table));
    let publication = client
        .query_opt(
            "SELECT p.puballtables, p.pubinsert, p.pubupdate, obj_description(p.oid, 'pg_publication'), \
                    coalesce((SELECT array_agg(pt.tablename::text ORDER BY pt.tablename) FROM pg_publication_tables pt \
                              WHERE pt.pubname = p.pubname), '{}') \
             FROM pg_publication p WHERE p.pubname = $1",
            &[&publication_name],
        )
        .await
        .map_err(err("reading the publication"))?
        .map(|r| PublicationState {
            all_tables: r.get(0),
            publishes_insert: r.get(1),
            publishes_update: r.get(2),
            comment: r.get(3),
            tables: r.get(4),
        });
    let slot = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active, active_pid, wal_status, \
                    confirmed_flush_lsn::text, restart_lsn::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot_name],
        )
        .await
        .map_err(err("reading the replication slot"))?
        .map(|r| SlotState {
            plugin: r.get(0),
            slot_type: r.get(1),
            database: r.get(2),
            active: r.get(3),
            active_pid: r.get(4),
            wal_status: r.get(5),
            confirmed_flush_lsn: parse_lsn(r.get(6)),
            restart_lsn: parse_lsn(r.get(7)),
        });
    let state_schema = client
        .query_opt(
            "SELECT coalesce(obj_description(n.oid, 'pg_namespace'), '') LIKE 'synapse-account-data-relay%', \
                    to_regclass(quote_ident(n.nspname) || '.pending_keys') IS NOT NULL \
                    AND to_regclass(quote_ident(n.nspname) || '.pending_key_version') IS NOT NULL \
                    AND to_regclass(quote_ident(n.nspname) || '.appservices') IS NOT NULL \
                    AND to_regclass(quote_ident(n.nspname) || '.backfills') IS NOT NULL \
             FROM pg_namespace n WHERE n.nspname = $1",
            &[&names.state_schema],
        )
        .await
        .map_err(err("reading the relay's state schema"))?
        .map(|r| StateSchemaState {
            ours: r.get(0),
            complete: r.get(1),
        });
    let push_publication: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&names.push_publication],
        )
        .await
        .map_err(err("reading the push-rules publication"))?
        .get(0);
    Ok(DatabaseState {
        push_publication,
        can_create_schema: row.get(10),
        state_schema,
        server_version_num: row.get(0),
        server_version: row.get(1),
        wal_level: row.get(2),
        max_replication_slots: row.get(3),
        max_wal_senders: row.get(4),
        database: row.get(5),
        role: row.get(6),
        superuser: row.get(7),
        replication_role: row.get(8),
        current_wal_lsn: parse_lsn(row.get(9)).unwrap_or_default(),
        tables,
        publication,
        slot,
    })
}

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

/// Names the relay works with.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    pub slot: &'a str,
    pub publication: &'a str,
    /// The publication of `push_rules_stream` (inserts only).
    pub push_publication: &'a str,
    pub state_schema: &'a str,
    /// Whether the slot is (to be) created with `failover = true` (PostgreSQL 17+).
    pub failover_slot: bool,
}

impl Names<'static> {
    /// The names a relay config that names none uses (the shipped SQL, `check` without a config).
    pub fn defaults() -> Names<'static> {
        Names {
            slot: crate::config::DEFAULT_NAME,
            publication: crate::config::DEFAULT_NAME,
            push_publication: crate::config::DEFAULT_PUSH_PUBLICATION,
            state_schema: crate::config::DEFAULT_NAME,
            failover_slot: false,
        }
    }
}

fn problem(severity: Severity, message: impl Into<String>) -> Problem {
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
pub const LOCK_TIMEOUT: &str = "100ms";

/// How many times [`execute_plan`] runs a step whose locks were not granted within
/// [`LOCK_TIMEOUT`] (SQLSTATE 55P03), with a jittered pause of 100 ms to 1 s between tries
/// (about 45 s in all), before it gives up.
pub const LOCK_ATTEMPTS: u32 = 50;

/// SQLSTATE `55P03` lock_not_available (what `lock_timeout` raises).
const SQLSTATE_LOCK_NOT_AVAILABLE: &str = "55P03";

/// What [`execute_plan`] did besides the plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanRun {
    /// Tries that ended because a lock was not granted within [`LOCK_TIMEOUT`] and were repeated.
    pub lock_retries: u32,
}

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
