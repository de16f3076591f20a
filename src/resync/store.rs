//! The relay's own durable state, in a schema of its own in Synapse's database (created by
//! `setup`, dropped by `teardown`).
//!
//! Why there: it survives a restart of the relay and a move of the relay to another host (the
//! state travels with the database and the slot it belongs to), it is written in the same
//! PostgreSQL that the slot lives in (so "recorded" and "confirmed" share one durability), and it
//! needs no file system the relay must own. The tables are not in the publication, so writing them
//! never feeds back into the stream.
//!
//! - `pending_keys`: per appservice, the account-data keys (user, room, type) whose current value
//!   must be sent, with a `version` bumped each time a key is recorded again, so a drain deletes a
//!   key only if it was not recorded again after it was read.
//! - `appservices`: the appservices the relay has served, so a first opt-in can be told apart.
//! - `backfills`: one row per backfill request (first opt-in, `backfill`, a lost slot) with its
//!   cursor in Synapse's tables, so a restart resumes it (see [`crate::resync::backfill`]).
//!
//! A resync is requested through the stream itself: `pg_logical_emit_message` with the prefix
//! [`MESSAGE_PREFIX`], in the same transaction as the request it announces (a `backfills` row), so the running relay sees
//! the request exactly where it belongs in commit order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use postgres_protocol::escape::escape_identifier;
use tokio_postgres::GenericClient;

use crate::model::{AccountDataKey, Lsn, SourceTable};
use crate::synapse::current::read_current;

/// The prefix of the relay's logical decoding messages.
pub const MESSAGE_PREFIX: &str = "synapse-account-data-relay";

/// A failed state-store operation.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}{}", sqlstate.as_ref().map(|c| format!(" (SQLSTATE {c})")).unwrap_or_default())]
pub struct StoreError {
    pub what: &'static str,
    pub message: String,
    pub sqlstate: Option<String>,
    /// The connection is gone; reconnect.
    pub connection_lost: bool,
}

pub(crate) fn store_error(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| StoreError {
        what,
        message: e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string()),
        sqlstate: e.code().map(|c| c.code().to_owned()),
        connection_lost: e.is_closed() || e.as_db_error().is_none(),
    }
}

/// A message the relay reads from its own stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayMessage {
    /// Keys were enqueued for this appservice: switch it to recording mode here.
    Resync(String),
    /// A position marker: the stream has passed the point where it was written.
    Horizon,
}

impl RelayMessage {
    pub fn parse(content: &[u8]) -> Option<RelayMessage> {
        serde_json::from_slice(content).ok()
    }
}

/// One page of keys to resync, with their current values and the snapshot's horizon.
#[derive(Debug, Default)]
pub struct PendingPage {
    /// Keys with the version they had when read.
    pub keys: Vec<(AccountDataKey, i64)>,
    /// Current values (absent: the row is gone; nothing to send).
    pub values: HashMap<AccountDataKey, Arc<str>>,
    /// A WAL position above every commit the page's snapshot saw.
    pub horizon: Lsn,
}

/// The source table a key's value is read from.
pub fn source_of(key: &AccountDataKey) -> SourceTable {
    key.source_table()
}

/// The relay's tables in one schema.
#[derive(Debug, Clone)]
pub struct StateStore {
    schema: String,
}

impl StateStore {
    pub fn new(schema: &str) -> StateStore {
        StateStore {
            schema: escape_identifier(schema),
        }
    }

    /// The schema, quoted, for SQL text.
    pub fn schema_sql(&self) -> &str {
        &self.schema
    }

    /// The version sequence, as a literal for `nextval`.
    fn sequence(&self) -> String {
        postgres_protocol::escape::escape_literal(&format!("{}.pending_key_version", self.schema))
    }

    /// The DDL `setup` runs to create the schema (each statement idempotent).
    pub fn create_sql(schema: &str) -> Vec<String> {
        let s = escape_identifier(schema);
        vec![
            format!("CREATE SCHEMA IF NOT EXISTS {s};"),
            format!(
                "COMMENT ON SCHEMA {s} IS 'synapse-account-data-relay state: recorded keys to resync (dropped by teardown)';"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {s}.pending_keys (appservice_id text NOT NULL, user_id text NOT NULL, \
                 room_id text NOT NULL, data_type text NOT NULL, version bigint NOT NULL, \
                 PRIMARY KEY (appservice_id, user_id, room_id, data_type));"
            ),
            format!("CREATE SEQUENCE IF NOT EXISTS {s}.pending_key_version;"),
            format!(
                "CREATE TABLE IF NOT EXISTS {s}.appservices (appservice_id text PRIMARY KEY, \
                 first_served timestamptz NOT NULL DEFAULT now());"
            ),
            // One row per backfill request, with how far it got (`crate::resync::backfill`).
            format!(
                "CREATE TABLE IF NOT EXISTS {s}.backfills (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                 appservice_id text NOT NULL, users_regex text, phase smallint NOT NULL DEFAULT 0, \
                 after_user text NOT NULL DEFAULT '', after_room text NOT NULL DEFAULT '', \
                 after_type text NOT NULL DEFAULT '', keys_sent bigint NOT NULL DEFAULT 0, \
                 requested timestamptz NOT NULL DEFAULT now());"
            ),
        ]
    }

    /// Record `keys` for `appservice` (one statement). A key already recorded gets a new version
    /// if `renew` (so a drain that read the old one does not delete it), and is left as it is
    /// otherwise (no write). Returns how many were not recorded before (rows inserted).
    pub async fn record_keys(
        &self,
        c: &impl GenericClient,
        appservice: &str,
        keys: &[AccountDataKey],
        renew: bool,
    ) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let users: Vec<&str> = keys.iter().map(|k| &*k.user_id).collect();
        let rooms: Vec<&str> = keys.iter().map(|k| k.room_id.as_deref().unwrap_or("")).collect();
        let types: Vec<&str> = keys.iter().map(|k| &*k.data_type).collect();
        let (s, seq) = (&self.schema, self.sequence());
        let on_conflict = if renew {
            "(appservice_id, user_id, room_id, data_type) DO UPDATE SET version = EXCLUDED.version"
        } else {
            "DO NOTHING"
        };
        // `xmax = 0`: the row version was inserted by this statement, not updated by it.
        let row = c
            .query_one(
                &format!(
                    "WITH written AS (INSERT INTO {s}.pending_keys (appservice_id, user_id, room_id, data_type, version) \
                     SELECT $1, u, r, t, nextval({seq}) FROM unnest($2::text[], $3::text[], $4::text[]) AS k(u, r, t) \
                     ON CONFLICT {on_conflict} \
                     RETURNING xmax = 0 AS inserted) \
                     SELECT count(*) FILTER (WHERE inserted) FROM written"
                ),
                &[&appservice, &users, &rooms, &types],
            )
            .await
            .map_err(store_error("recording keys to resync"))?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    /// Which of `appservices` have recorded keys or a backfill under way (one index probe each in
    /// `pending_keys`, not a scan; `backfills` holds a few rows at most).
    pub async fn appservices_with_pending(
        &self,
        c: &impl GenericClient,
        appservices: &[&str],
    ) -> Result<HashSet<String>, StoreError> {
        let s = &self.schema;
        let rows = c
            .query(
                &format!(
                    "SELECT a FROM unnest($1::text[]) AS a \
                     WHERE EXISTS (SELECT 1 FROM {s}.pending_keys p WHERE p.appservice_id = a) \
                     OR EXISTS (SELECT 1 FROM {s}.backfills b WHERE b.appservice_id = a)"
                ),
                &[&appservices],
            )
            .await
            .map_err(store_error("reading which appservices have keys to resync"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Recorded keys of `appservice`.
    pub async fn pending_count(&self, c: &impl GenericClient, appservice: &str) -> Result<i64, StoreError> {
        let s = &self.schema;
        let row = c
            .query_one(
                &format!("SELECT count(*) FROM {s}.pending_keys WHERE appservice_id = $1"),
                &[&appservice],
            )
            .await
            .map_err(store_error("counting keys to resync"))?;
        Ok(row.get(0))
    }

    /// Recorded keys per appservice (for `status`: a scan of the whole table; the running relay
    /// counts its keys itself, see `AppserviceHandle::recorded_keys`).
    pub async fn pending_counts(
        &self,
        c: &impl GenericClient,
    ) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        let s = &self.schema;
        let rows = c
            .query(
                &format!("SELECT appservice_id, count(*) FROM {s}.pending_keys GROUP BY appservice_id"),
                &[],
            )
            .await
            .map_err(store_error("counting keys to resync"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The appservices served before.
    pub async fn known_appservices(&self, c: &impl GenericClient) -> Result<HashSet<String>, StoreError> {
        let s = &self.schema;
        let rows = c
            .query(&format!("SELECT appservice_id FROM {s}.appservices"), &[])
            .await
            .map_err(store_error("reading the appservices served before"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Remember that `appservice` is served.
    pub async fn mark_served(&self, c: &impl GenericClient, appservice: &str) -> Result<(), StoreError> {
        let s = &self.schema;
        c.execute(
            &format!("INSERT INTO {s}.appservices (appservice_id) VALUES ($1) ON CONFLICT DO NOTHING"),
            &[&appservice],
        )
        .await
        .map_err(store_error("recording a served appservice"))?;
        Ok(())
    }

    /// Read the next page of `appservice`'s keys (in key order, after `after` when given: a
    /// keyset cursor, so a pass over the table moves on even while the keys it already read are
    /// recorded again) and their current values, and a WAL position read after them: every commit
    /// the reads saw lies below it (each statement's snapshot is taken when it starts, before the
    /// position is read).
    pub async fn read_page(
        &self,
        c: &impl GenericClient,
        appservice: &str,
        after: Option<&AccountDataKey>,
        limit: i64,
    ) -> Result<PendingPage, StoreError> {
        let s = &self.schema;
        let rows = match after {
            None => {
                c.query(
                    &format!(
                        "SELECT user_id, room_id, data_type, version FROM {s}.pending_keys WHERE appservice_id = $1 \
                         ORDER BY user_id, room_id, data_type LIMIT $2"
                    ),
                    &[&appservice, &limit],
                )
                .await
            }
            Some(k) => {
                let (user, room, data_type) = (&*k.user_id, k.room_id.as_deref().unwrap_or(""), &*k.data_type);
                c.query(
                    &format!(
                        "SELECT user_id, room_id, data_type, version FROM {s}.pending_keys WHERE appservice_id = $1 \
                         AND (user_id, room_id, data_type) > ($3, $4, $5) \
                         ORDER BY user_id, room_id, data_type LIMIT $2"
                    ),
                    &[&appservice, &limit, &user, &room, &data_type],
                )
                .await
            }
        }
        .map_err(store_error("reading keys to resync"))?;
        let keys: Vec<(AccountDataKey, i64)> = rows
            .iter()
            .map(|r| {
                let room: &str = r.get(1);
                (
                    AccountDataKey {
                        user_id: r.get::<_, &str>(0).into(),
                        room_id: (!room.is_empty()).then(|| Arc::from(room)),
                        data_type: r.get::<_, &str>(2).into(),
                    },
                    r.get(3),
                )
            })
            .collect();
        let mut by_table: HashMap<SourceTable, Vec<&AccountDataKey>> = HashMap::new();
        for (k, _) in &keys {
            by_table.entry(source_of(k)).or_default().push(k);
        }
        let mut values = HashMap::new();
        for (table, ks) in by_table {
            values.extend(read_current(c, table, &ks).await.map_err(|e| StoreError {
                what: "reading current values to resync",
                message: e.to_string(),
                sqlstate: e.sqlstate.clone(),
                connection_lost: e.connection_lost,
            })?);
        }
        Ok(PendingPage {
            keys,
            values,
            horizon: self.current_wal_position(c).await?,
        })
    }

    /// The WAL insert position: every commit completed before this call lies below it.
    pub async fn current_wal_position(&self, c: &impl GenericClient) -> Result<Lsn, StoreError> {
        let position: String = c
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(store_error("reading the WAL position"))?
            .get(0);
        Ok(position.parse().unwrap_or_default())
    }

    /// Delete delivered keys, unless they were recorded again since they were read. Returns how
    /// many were deleted.
    pub async fn delete_delivered(
        &self,
        c: &impl GenericClient,
        appservice: &str,
        keys: &[(AccountDataKey, i64)],
    ) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let users: Vec<&str> = keys.iter().map(|(k, _)| &*k.user_id).collect();
        let rooms: Vec<&str> = keys.iter().map(|(k, _)| k.room_id.as_deref().unwrap_or("")).collect();
        let types: Vec<&str> = keys.iter().map(|(k, _)| &*k.data_type).collect();
        let versions: Vec<i64> = keys.iter().map(|(_, v)| *v).collect();
        let s = &self.schema;
        c.execute(
            &format!(
                "DELETE FROM {s}.pending_keys p USING unnest($2::text[], $3::text[], $4::text[], $5::bigint[]) AS k(u, r, t, v) \
                 WHERE p.appservice_id = $1 AND p.user_id = k.u AND p.room_id = k.r AND p.data_type = k.t AND p.version = k.v"
            ),
            &[&appservice, &users, &rooms, &types, &versions],
        )
        .await
        .map_err(store_error("deleting delivered keys"))
    }

    /// Write a message into the stream (`transactional`: part of the caller's transaction).
    pub async fn emit(
        &self,
        c: &impl GenericClient,
        message: &RelayMessage,
        transactional: bool,
    ) -> Result<Lsn, StoreError> {
        let content = serde_json::to_string(message).unwrap_or_default();
        let row = c
            .query_one(
                "SELECT pg_logical_emit_message($1, $2, $3)::text",
                &[&transactional, &MESSAGE_PREFIX, &content],
            )
            .await
            .map_err(store_error("writing a message into the replication stream"))?;
        Ok(row.get::<_, String>(0).parse().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [RelayMessage::Resync("irc".into()), RelayMessage::Horizon] {
            let text = serde_json::to_vec(&m).unwrap();
            assert_eq!(RelayMessage::parse(&text), Some(m));
        }
        assert_eq!(
            RelayMessage::parse(b"{\"resync\":\"a\"}"),
            Some(RelayMessage::Resync("a".into()))
        );
        assert_eq!(RelayMessage::parse(b"garbage"), None);
    }

    #[test]
    fn keys_know_their_source_table() {
        let k = |room: Option<&str>, t: &str| AccountDataKey {
            user_id: "@a:x".into(),
            room_id: room.map(Arc::from),
            data_type: t.into(),
        };
        assert_eq!(source_of(&k(None, "m.direct")), SourceTable::AccountData);
        assert_eq!(source_of(&k(Some("!r"), "m.tag")), SourceTable::RoomTags);
        assert_eq!(source_of(&k(Some("!r"), "m.fully_read")), SourceTable::RoomAccountData);
    }

    #[test]
    fn ddl_quotes_the_schema() {
        let sql = StateStore::create_sql("my \"odd\" schema").join("\n");
        assert!(
            sql.contains("CREATE SCHEMA IF NOT EXISTS \"my \"\"odd\"\" schema\";"),
            "{sql}"
        );
    }
}
