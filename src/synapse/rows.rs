//! Rows of Synapse's tables, as pgoutput sends them, turned into [`AccountDataChange`]s. Pure.
//!
//! | table | row becomes |
//! |---|---|
//! | `account_data` | global account data `(user_id, account_data_type) = content` |
//! | `room_account_data` | room account data `(user_id, room_id, account_data_type) = content` |
//! | `room_tags_revisions` | `(user_id, room_id, "m.tag")`, whose content (all the room's current tags) is read from `room_tags` at delivery |
//!
//! Columns are found by name in the table's latest Relation message, so a Relation re-sent
//! mid-stream with another shape (a column added by a Synapse migration) is followed. INSERTs and
//! UPDATEs are changes; DELETEs (user deactivation, room purges) are not sent, as /sync never
//! shows them. Content `{}` is a change like any other (MSC3391's deletion). A `content` sent as
//! "unchanged TOAST" (pgoutput does not repeat a large value an UPDATE left alone) is read from
//! the table at delivery, never taken as empty. Content that is not valid JSON is reported with
//! its key, for the caller to log and skip.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::model::{
    AccountDataChange, AccountDataKey, ChangeContent, Lsn, PUSH_RULES_EVENT_TYPE, SourceTable, TAG_EVENT_TYPE,
};
use crate::replication::pgoutput::{ColumnValue, PgOutputMessage, RelationBody, TupleData};

/// The Synapse tables the relay publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SynapseTable {
    AccountData,
    RoomAccountData,
    RoomTagsRevisions,
    /// Append-only, without a unique index: in a publication of its own that publishes inserts
    /// only (so it needs no replica identity).
    PushRulesStream,
}

impl SynapseTable {
    /// The tables published with their updates (each needs a replica identity).
    pub const ALL: [SynapseTable; 3] = [
        SynapseTable::AccountData,
        SynapseTable::RoomAccountData,
        SynapseTable::RoomTagsRevisions,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SynapseTable::AccountData => "account_data",
            SynapseTable::RoomAccountData => "room_account_data",
            SynapseTable::RoomTagsRevisions => "room_tags_revisions",
            SynapseTable::PushRulesStream => "push_rules_stream",
        }
    }

    /// The unique index used as the table's replica identity.
    pub fn unique_index(self) -> &'static str {
        match self {
            SynapseTable::AccountData => "account_data_uniqueness",
            SynapseTable::RoomAccountData => "room_account_data_uniqueness",
            SynapseTable::RoomTagsRevisions => "room_tag_revisions_uniqueness",
            // No unique index, and none needed: its publication publishes inserts only.
            SynapseTable::PushRulesStream => "",
        }
    }

    pub fn from_name(name: &str) -> Option<SynapseTable> {
        SynapseTable::ALL
            .into_iter()
            .chain([SynapseTable::PushRulesStream])
            .find(|t| t.name() == name)
    }

    fn required_columns(self) -> &'static [&'static str] {
        match self {
            SynapseTable::AccountData => &["user_id", "account_data_type", "content"],
            SynapseTable::RoomAccountData => &["user_id", "room_id", "account_data_type", "content"],
            SynapseTable::RoomTagsRevisions => &["user_id", "room_id"],
            SynapseTable::PushRulesStream => &["user_id"],
        }
    }
}

#[derive(Debug, Clone)]
struct Layout {
    table: SynapseTable,
    user_id: usize,
    room_id: Option<usize>,
    data_type: Option<usize>,
    content: Option<usize>,
}

/// A problem with one message or row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// A row for a relation no Relation message described: the stream is inconsistent; reconnect.
    #[error("pgoutput sent a row for relation {oid} before describing it in a Relation message")]
    UnknownRelation { oid: u32 },
    /// A published Synapse table lacks a column the relay needs: the schema is not one it knows.
    #[error(
        "table {table} has no column {column:?} (columns: {columns}); this Synapse schema is not one the relay understands"
    )]
    MissingColumn {
        table: &'static str,
        column: &'static str,
        columns: String,
    },
    /// A row whose key columns are unusable (NULL, not UTF-8, unchanged-toast). Skipped.
    #[error("{table} row skipped: column {column} is {problem}")]
    BadRow {
        table: &'static str,
        column: &'static str,
        problem: String,
    },
    /// A row whose content is not valid JSON. Skipped; the key says which.
    #[error(
        "{table} row for user {user_id} room {room_id:?} type {data_type:?} skipped: content is not valid JSON ({error})"
    )]
    InvalidJson {
        table: &'static str,
        user_id: String,
        room_id: Option<String>,
        data_type: String,
        error: String,
    },
}

impl MappingError {
    /// Whether the relay can skip this row and go on (as opposed to reconnecting or stopping).
    pub fn is_row_level(&self) -> bool {
        matches!(self, MappingError::BadRow { .. } | MappingError::InvalidJson { .. })
    }
}

/// What one pgoutput message means for the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOutcome {
    /// An account-data change to route.
    Change(AccountDataChange),
    /// A Relation message for one of our tables was taken in.
    RelationUpdated(SynapseTable),
    /// A row or message that carries nothing to deliver (with why, for debug logs).
    Ignored(&'static str),
    /// A table outside our three is in the publication; its rows are ignored.
    ForeignRelation { namespace: String, name: String },
    /// Some of our tables were truncated: nothing is sent (there is nothing to tell /sync either).
    Truncated(Vec<&'static str>),
}

/// Keeps the table layouts from Relation messages and maps rows. One per replication connection:
/// PostgreSQL re-sends Relations after a reconnect.
#[derive(Debug, Default)]
pub struct RowMapper {
    relations: HashMap<u32, Option<Layout>>,
}

fn column(rel: &RelationBody, table: SynapseTable, name: &'static str) -> Result<usize, MappingError> {
    rel.column_index(name).ok_or_else(|| MappingError::MissingColumn {
        table: table.name(),
        column: name,
        columns: rel
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn text<'t>(
    tuple: &'t TupleData,
    index: usize,
    table: SynapseTable,
    name: &'static str,
) -> Result<&'t str, MappingError> {
    let bad = |problem: &str| MappingError::BadRow {
        table: table.name(),
        column: name,
        problem: problem.into(),
    };
    match tuple.get(index) {
        None => Err(bad("missing from the tuple")),
        Some(ColumnValue::Null) => Err(bad("NULL")),
        Some(ColumnValue::UnchangedToast) => Err(bad("an unchanged TOAST value")),
        Some(ColumnValue::Binary(_)) => Err(bad("in binary format")),
        Some(v @ ColumnValue::Text(_)) => match v.as_text() {
            Some(Ok(s)) => Ok(s),
            _ => Err(bad("not valid UTF-8")),
        },
    }
}

impl RowMapper {
    pub fn new() -> RowMapper {
        RowMapper::default()
    }

    /// Map one decoded message of transaction `xid`, which commits at `commit_lsn`.
    pub fn map(&mut self, message: &PgOutputMessage, commit_lsn: Lsn, xid: u32) -> Result<RowOutcome, MappingError> {
        match message {
            PgOutputMessage::Relation(rel) => self.on_relation(rel),
            PgOutputMessage::Insert {
                relation_oid,
                new_tuple,
            } => self.on_row(*relation_oid, new_tuple, commit_lsn, xid),
            PgOutputMessage::Update {
                relation_oid,
                new_tuple,
                ..
            } => self.on_row(*relation_oid, new_tuple, commit_lsn, xid),
            PgOutputMessage::Delete { relation_oid, .. } => {
                self.layout(*relation_oid)?;
                Ok(RowOutcome::Ignored(
                    "a DELETE (deactivation or purge) is not sent, as /sync does not show it",
                ))
            }
            PgOutputMessage::Truncate { relation_oids, .. } => {
                let mut tables = Vec::new();
                for oid in relation_oids {
                    if let Some(Some(l)) = self.relations.get(oid) {
                        tables.push(l.table.name());
                    }
                }
                Ok(RowOutcome::Truncated(tables))
            }
            PgOutputMessage::Begin { .. } | PgOutputMessage::Commit { .. } => {
                Ok(RowOutcome::Ignored("transaction boundary"))
            }
            PgOutputMessage::Origin { .. } => Ok(RowOutcome::Ignored("origin")),
            PgOutputMessage::Type { .. } => Ok(RowOutcome::Ignored("type")),
            PgOutputMessage::Message { .. } => Ok(RowOutcome::Ignored("logical decoding message")),
        }
    }

    fn on_relation(&mut self, rel: &RelationBody) -> Result<RowOutcome, MappingError> {
        let Some(table) = SynapseTable::from_name(&rel.name) else {
            self.relations.insert(rel.oid, None);
            return Ok(RowOutcome::ForeignRelation {
                namespace: rel.namespace.clone(),
                name: rel.name.clone(),
            });
        };
        for c in table.required_columns() {
            column(rel, table, c)?;
        }
        let layout = Layout {
            table,
            user_id: column(rel, table, "user_id")?,
            room_id: rel.column_index("room_id"),
            data_type: rel.column_index("account_data_type"),
            content: rel.column_index("content"),
        };
        self.relations.insert(rel.oid, Some(layout));
        Ok(RowOutcome::RelationUpdated(table))
    }

    fn layout(&self, oid: u32) -> Result<Option<&Layout>, MappingError> {
        match self.relations.get(&oid) {
            None => Err(MappingError::UnknownRelation { oid }),
            Some(l) => Ok(l.as_ref()),
        }
    }

    fn on_row(&self, oid: u32, tuple: &TupleData, commit_lsn: Lsn, xid: u32) -> Result<RowOutcome, MappingError> {
        let Some(layout) = self.layout(oid)? else {
            return Ok(RowOutcome::Ignored("a row of a table the relay does not read"));
        };
        let table = layout.table;
        let user_id = text(tuple, layout.user_id, table, "user_id")?;
        let room_id = match layout.room_id {
            Some(i) if matches!(table, SynapseTable::RoomAccountData | SynapseTable::RoomTagsRevisions) => {
                Some(text(tuple, i, table, "room_id")?)
            }
            _ => None,
        };
        let (data_type, content) = match table {
            SynapseTable::RoomTagsRevisions => (TAG_EVENT_TYPE, ChangeContent::ReadCurrent(SourceTable::RoomTags)),
            // Push rules are global, whatever the row says; they are fetched from Synapse.
            SynapseTable::PushRulesStream => (
                PUSH_RULES_EVENT_TYPE,
                ChangeContent::ReadCurrent(SourceTable::PushRules),
            ),
            SynapseTable::AccountData | SynapseTable::RoomAccountData => {
                let (Some(t), Some(c)) = (layout.data_type, layout.content) else {
                    return Err(MappingError::BadRow {
                        table: table.name(),
                        column: "content",
                        problem: "absent from the table's Relation".into(),
                    });
                };
                let data_type = text(tuple, t, table, "account_data_type")?;
                let source = if table == SynapseTable::AccountData {
                    SourceTable::AccountData
                } else {
                    SourceTable::RoomAccountData
                };
                let content = match tuple.get(c) {
                    Some(ColumnValue::UnchangedToast) => ChangeContent::ReadCurrent(source),
                    _ => {
                        let raw = text(tuple, c, table, "content")?;
                        if let Err(e) = serde_json::from_str::<&RawValue>(raw) {
                            return Err(MappingError::InvalidJson {
                                table: table.name(),
                                user_id: user_id.into(),
                                room_id: room_id.map(Into::into),
                                data_type: data_type.into(),
                                error: e.to_string(),
                            });
                        }
                        ChangeContent::Json(Arc::from(raw))
                    }
                };
                (data_type, content)
            }
        };
        Ok(RowOutcome::Change(AccountDataChange {
            key: AccountDataKey {
                user_id: user_id.into(),
                room_id: room_id.map(Arc::from),
                data_type: data_type.into(),
            },
            content,
            commit_lsn,
            xid,
        }))
    }
}

/// Assemble the `m.tag` content from a room's tags (`room_tags.tag`, `room_tags.content` as raw
/// JSON): `{"tags": {"<tag>": <content>, ...}}`, `{"tags": {}}` when there are none. A tag whose
/// content is not valid JSON is left out and returned in the second list.
pub fn assemble_tags<'a>(tags: impl IntoIterator<Item = (&'a str, &'a str)>) -> (String, Vec<String>) {
    let mut out = String::from("{\"tags\":{");
    let mut invalid = Vec::new();
    let mut first = true;
    for (tag, content) in tags {
        if serde_json::from_str::<&RawValue>(content).is_err() {
            invalid.push(tag.to_owned());
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        // Serialising a str cannot fail.
        out.push_str(&serde_json::to_string(tag).unwrap_or_default());
        out.push(':');
        out.push_str(content);
    }
    out.push_str("}}");
    (out, invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::pgoutput::RelationColumn;
    use bytes::Bytes;

    fn relation(oid: u32, name: &str, columns: &[&str]) -> PgOutputMessage {
        PgOutputMessage::Relation(RelationBody {
            oid,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: b'i',
            columns: columns
                .iter()
                .map(|c| RelationColumn {
                    flags: 0,
                    name: (*c).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn tuple(values: &[Option<&str>]) -> TupleData {
        TupleData(
            values
                .iter()
                .map(|v| match v {
                    Some("<toast>") => ColumnValue::UnchangedToast,
                    Some(s) => ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes())),
                    None => ColumnValue::Null,
                })
                .collect(),
        )
    }

    const AD: &[&str] = &["user_id", "account_data_type", "stream_id", "content", "instance_name"];
    const RAD: &[&str] = &[
        "user_id",
        "room_id",
        "account_data_type",
        "stream_id",
        "content",
        "instance_name",
    ];
    const RTR: &[&str] = &["user_id", "room_id", "stream_id", "instance_name"];

    fn change(outcome: RowOutcome) -> AccountDataChange {
        match outcome {
            RowOutcome::Change(c) => c,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn the_three_tables_map_to_changes() {
        let mut m = RowMapper::new();
        m.map(&relation(1, "account_data", AD), Lsn(0), 7).unwrap();
        m.map(&relation(2, "room_account_data", RAD), Lsn(0), 7).unwrap();
        m.map(&relation(3, "room_tags_revisions", RTR), Lsn(0), 7).unwrap();
        let c = change(
            m.map(
                &PgOutputMessage::Insert {
                    relation_oid: 1,
                    new_tuple: tuple(&[Some("@a:x"), Some("m.direct"), Some("7"), Some("{\"k\":1}"), None]),
                },
                Lsn(100),
                7,
            )
            .unwrap(),
        );
        assert_eq!(
            c,
            AccountDataChange {
                key: AccountDataKey {
                    user_id: "@a:x".into(),
                    room_id: None,
                    data_type: "m.direct".into()
                },
                content: ChangeContent::Json("{\"k\":1}".into()),
                commit_lsn: Lsn(100),
                xid: 7,
            }
        );
        let c = change(
            m.map(
                &PgOutputMessage::Update {
                    relation_oid: 2,
                    old_tuple: None,
                    new_tuple: tuple(&[
                        Some("@a:x"),
                        Some("!r:x"),
                        Some("m.fully_read"),
                        Some("8"),
                        Some("{}"),
                        None,
                    ]),
                },
                Lsn(200),
                7,
            )
            .unwrap(),
        );
        assert_eq!(c.key.room_id.as_deref(), Some("!r:x"));
        assert_eq!(
            c.content,
            ChangeContent::Json("{}".into()),
            "{{}} is a deletion and is sent"
        );
        let c = change(
            m.map(
                &PgOutputMessage::Insert {
                    relation_oid: 3,
                    new_tuple: tuple(&[Some("@a:x"), Some("!r:x"), Some("9"), None]),
                },
                Lsn(300),
                7,
            )
            .unwrap(),
        );
        assert_eq!(c.key.data_type.as_ref(), "m.tag");
        assert_eq!(c.content, ChangeContent::ReadCurrent(SourceTable::RoomTags));
    }

    #[test]
    fn push_rules_stream_rows_become_m_push_rules_to_fetch() {
        let mut m = RowMapper::new();
        let cols = [
            "stream_id",
            "event_stream_ordering",
            "user_id",
            "rule_id",
            "op",
            "priority_class",
            "priority",
            "conditions",
            "actions",
            "instance_name",
        ];
        m.map(&relation(4, "push_rules_stream", &cols), Lsn(0), 7).unwrap();
        let c = change(
            m.map(
                &PgOutputMessage::Insert {
                    relation_oid: 4,
                    new_tuple: tuple(&[
                        Some("5"),
                        Some("9"),
                        Some("@a:x"),
                        Some("global/override/.m.rule.x"),
                        Some("ADD"),
                        Some("5"),
                        Some("0"),
                        Some("[]"),
                        Some("[]"),
                        None,
                    ]),
                },
                Lsn(100),
                7,
            )
            .unwrap(),
        );
        assert_eq!(
            c.key,
            AccountDataKey {
                user_id: "@a:x".into(),
                room_id: None,
                data_type: "m.push_rules".into()
            }
        );
        assert_eq!(c.content, ChangeContent::ReadCurrent(SourceTable::PushRules));
    }

    #[test]
    fn columns_are_found_by_name_and_relations_can_change_shape() {
        let mut m = RowMapper::new();
        m.map(&relation(1, "account_data", AD), Lsn(0), 7).unwrap();
        // A migration adds a column in front of the others; PostgreSQL re-sends the Relation.
        let reordered = [
            "added_by_migration",
            "content",
            "user_id",
            "stream_id",
            "account_data_type",
            "instance_name",
        ];
        m.map(&relation(1, "account_data", &reordered), Lsn(0), 7).unwrap();
        let c = change(
            m.map(
                &PgOutputMessage::Insert {
                    relation_oid: 1,
                    new_tuple: tuple(&[Some("x"), Some("[1]"), Some("@a:x"), Some("1"), Some("t"), None]),
                },
                Lsn(5),
                7,
            )
            .unwrap(),
        );
        assert_eq!((&*c.key.user_id, &*c.key.data_type), ("@a:x", "t"));
        assert_eq!(c.content, ChangeContent::Json("[1]".into()));
    }

    #[test]
    fn unchanged_toast_content_is_read_later_never_empty() {
        let mut m = RowMapper::new();
        m.map(&relation(1, "account_data", AD), Lsn(0), 7).unwrap();
        let c = change(
            m.map(
                &PgOutputMessage::Update {
                    relation_oid: 1,
                    old_tuple: None,
                    new_tuple: tuple(&[Some("@a:x"), Some("big"), Some("9"), Some("<toast>"), None]),
                },
                Lsn(5),
                7,
            )
            .unwrap(),
        );
        assert_eq!(c.content, ChangeContent::ReadCurrent(SourceTable::AccountData));
    }

    #[test]
    fn invalid_json_and_bad_rows_are_row_level_errors_naming_the_key() {
        let mut m = RowMapper::new();
        m.map(&relation(1, "account_data", AD), Lsn(0), 7).unwrap();
        let err = m
            .map(
                &PgOutputMessage::Insert {
                    relation_oid: 1,
                    new_tuple: tuple(&[Some("@a:x"), Some("t"), Some("1"), Some("{not json"), None]),
                },
                Lsn(5),
                7,
            )
            .unwrap_err();
        assert!(err.is_row_level());
        let text = err.to_string();
        assert!(
            text.contains("@a:x") && text.contains("\"t\"") && text.contains("account_data"),
            "{text}"
        );
        let err = m
            .map(
                &PgOutputMessage::Insert {
                    relation_oid: 1,
                    new_tuple: tuple(&[None, Some("t"), Some("1"), Some("{}"), None]),
                },
                Lsn(5),
                7,
            )
            .unwrap_err();
        assert!(
            err.is_row_level() && err.to_string().contains("user_id is NULL"),
            "{err}"
        );
        let err = m
            .map(
                &PgOutputMessage::Insert {
                    relation_oid: 1,
                    new_tuple: tuple(&[Some("@a:x")]),
                },
                Lsn(5),
                7,
            )
            .unwrap_err();
        assert!(err.is_row_level(), "{err}");
    }

    #[test]
    fn deletes_truncates_and_foreign_tables_are_not_sent() {
        let mut m = RowMapper::new();
        m.map(&relation(1, "account_data", AD), Lsn(0), 7).unwrap();
        assert!(matches!(
            m.map(&relation(9, "users", &["name"]), Lsn(0), 7).unwrap(),
            RowOutcome::ForeignRelation { .. }
        ));
        let del = PgOutputMessage::Delete {
            relation_oid: 1,
            old_tuple: crate::replication::pgoutput::OldTuple::Key(tuple(&[Some("@a:x"), Some("t"), None, None, None])),
        };
        assert!(matches!(m.map(&del, Lsn(1), 7).unwrap(), RowOutcome::Ignored(_)));
        let ins = PgOutputMessage::Insert {
            relation_oid: 9,
            new_tuple: tuple(&[Some("x")]),
        };
        assert!(matches!(m.map(&ins, Lsn(1), 7).unwrap(), RowOutcome::Ignored(_)));
        let tr = PgOutputMessage::Truncate {
            options: 0,
            relation_oids: vec![1, 9],
        };
        assert_eq!(
            m.map(&tr, Lsn(1), 7).unwrap(),
            RowOutcome::Truncated(vec!["account_data"])
        );
    }

    #[test]
    fn unknown_relations_and_missing_columns_are_stream_level_errors() {
        let mut m = RowMapper::new();
        let ins = PgOutputMessage::Insert {
            relation_oid: 4,
            new_tuple: tuple(&[Some("x")]),
        };
        let err = m.map(&ins, Lsn(1), 7).unwrap_err();
        assert_eq!(err, MappingError::UnknownRelation { oid: 4 });
        assert!(!err.is_row_level());
        let err = m
            .map(
                &relation(1, "account_data", &["user_id", "account_data_type"]),
                Lsn(0),
                7,
            )
            .unwrap_err();
        assert!(err.to_string().contains("content"), "{err}");
        assert!(!err.is_row_level());
    }

    #[test]
    fn tags_assemble_into_one_m_tag_content() {
        let (c, bad) = assemble_tags([("u.work", "{\"order\":0.5}"), ("m.favourite", "{}"), ("broken", "{")]);
        assert_eq!(bad, vec!["broken".to_owned()]);
        let v: serde_json::Value = serde_json::from_str(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"tags": {"u.work": {"order": 0.5}, "m.favourite": {}}})
        );
        assert_eq!(assemble_tags([]).0, "{\"tags\":{}}");
        let (c, _) = assemble_tags([("with \"quote\"", "{}")]);
        assert!(serde_json::from_str::<serde_json::Value>(&c).is_ok(), "{c}");
    }
}
