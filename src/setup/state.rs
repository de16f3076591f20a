//! Synapse's database as [`super::inspect`] finds it: the server's settings, the role, the
//! published tables and their replica identity, the publications, the slot and the relay's schema.

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
    pub(super) fn sql_clause(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "DEFAULT",
            ReplicaIdentity::Nothing => "NOTHING",
            ReplicaIdentity::Full => "FULL",
            ReplicaIdentity::Index => "USING INDEX",
        }
    }
    pub(super) fn word(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "default",
            ReplicaIdentity::Nothing => "nothing",
            ReplicaIdentity::Full => "full",
            ReplicaIdentity::Index => "index",
        }
    }
    pub(super) fn from_word(w: &str) -> Option<ReplicaIdentity> {
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

/// Everything [`inspect`](super::inspect::inspect) reads.
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
