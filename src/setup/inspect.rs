//! Reading Synapse's database for `setup`, `check` and `run` (read-only): its state, the role to
//! grant to and the role `run` connects as.

use postgres_protocol::escape::escape_identifier;

use crate::config::Names;
use crate::model::Lsn;
use crate::setup::privileges::{RUN_READS, RoleState, RunRoleState, STATE_SEQUENCE, STATE_TABLES};
use crate::setup::state::{DatabaseState, PublicationState, ReplicaIdentity, SlotState, StateSchemaState, TableState};
use crate::synapse::rows::SynapseTable;

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

/// Reads `role`'s attributes and whether it owns Synapse's tables.
pub async fn inspect_role(client: &tokio_postgres::Client, role: &str) -> Result<RoleState, ProvisionError> {
    let row = client
        .query_opt(
            "SELECT r.rolreplication, r.rolsuper, \
                    EXISTS (SELECT 1 FROM unnest($2::text[]) AS t(name) \
                            JOIN pg_class c ON c.oid = to_regclass(quote_ident(t.name)) \
                            WHERE pg_has_role(r.oid, c.relowner, 'USAGE')) \
             FROM pg_roles r WHERE r.rolname = $1",
            &[&role, &RUN_READS],
        )
        .await
        .map_err(|e| ProvisionError::from_pg("reading the role to grant to", &e))?;
    Ok(match row {
        Some(r) => RoleState {
            name: role.to_owned(),
            exists: true,
            replication: r.get(0),
            superuser: r.get(1),
            owns_synapse_tables: r.get(2),
        },
        None => RoleState {
            name: role.to_owned(),
            exists: false,
            replication: false,
            superuser: false,
            owns_synapse_tables: false,
        },
    })
}

/// Reads what the connected role (the one `run` uses) may do.
pub async fn inspect_run_role(
    client: &tokio_postgres::Client,
    names: Names<'_>,
) -> Result<RunRoleState, ProvisionError> {
    let err = |e: tokio_postgres::Error| ProvisionError::from_pg("reading the role's privileges", &e);
    let row = client
        .query_one(
            "SELECT current_user::text, r.rolsuper, \
                    coalesce((SELECT array_agg(t.name ORDER BY t.name) FROM unnest($1::text[]) AS t(name) \
                              JOIN pg_class c ON c.oid = to_regclass(quote_ident(t.name)) \
                              WHERE pg_has_role(c.relowner, 'USAGE')), '{}') \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[&RUN_READS],
        )
        .await
        .map_err(err)?;
    let mut missing = Vec::new();
    let rows = client
        .query(
            "SELECT t.name FROM unnest($1::text[]) AS t(name) \
             WHERE to_regclass(quote_ident(t.name)) IS NOT NULL \
               AND NOT has_table_privilege(to_regclass(quote_ident(t.name)), 'SELECT')",
            &[&RUN_READS],
        )
        .await
        .map_err(err)?;
    for r in rows {
        missing.push(format!("SELECT on {}", r.get::<_, String>(0)));
    }
    let schema = names.state_schema;
    let schema_ok: Option<bool> = client
        .query_one(
            "SELECT CASE WHEN to_regnamespace(quote_ident($1)) IS NULL THEN NULL \
                         ELSE has_schema_privilege($1, 'USAGE') END",
            &[&schema],
        )
        .await
        .map_err(err)?
        .get(0);
    match schema_ok {
        // No schema yet: `setup` creates it (and `check` already says so).
        None => {}
        Some(false) => missing.push(format!("USAGE on schema {schema}")),
        Some(true) => {
            let qualified: Vec<String> = STATE_TABLES
                .iter()
                .map(|t| format!("{}.{}", escape_identifier(schema), escape_identifier(t)))
                .collect();
            let rows = client
                .query(
                    "SELECT t.name FROM unnest($1::text[]) AS t(name) \
                     WHERE to_regclass(t.name) IS NOT NULL \
                       AND NOT (has_table_privilege(to_regclass(t.name), 'SELECT') \
                                AND has_table_privilege(to_regclass(t.name), 'INSERT') \
                                AND has_table_privilege(to_regclass(t.name), 'UPDATE') \
                                AND has_table_privilege(to_regclass(t.name), 'DELETE'))",
                    &[&qualified],
                )
                .await
                .map_err(err)?;
            for r in rows {
                missing.push(format!("SELECT, INSERT, UPDATE, DELETE on {}", r.get::<_, String>(0)));
            }
            let sequence = format!("{}.{}", escape_identifier(schema), escape_identifier(STATE_SEQUENCE));
            let seq_ok: Option<bool> = client
                .query_one(
                    "SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL ELSE has_sequence_privilege($1, 'USAGE') END",
                    &[&sequence],
                )
                .await
                .map_err(err)?
                .get(0);
            if seq_ok == Some(false) {
                missing.push(format!("USAGE on sequence {sequence}"));
            }
        }
    }
    Ok(RunRoleState {
        name: row.get(0),
        superuser: row.get(1),
        owned_tables: row.get(2),
        missing,
    })
}
