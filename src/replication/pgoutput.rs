//! Decoder for the messages of PostgreSQL's built-in logical decoding plugin, `pgoutput`,
//! protocol version 1 (`proto_version '1'`), as sent by PostgreSQL 14–17.
//!
//! Each XLogData payload of a logical replication stream (see [`super::wire`]) carries exactly
//! one message: a tag byte followed by big-endian fields. Strings are NUL-terminated UTF-8
//! (the server encoding; Synapse requires UTF-8). A committed transaction arrives as
//!
//! ```text
//! Begin, [Origin], { Relation | Type | Insert | Update | Delete | Truncate | Message }*, Commit
//! ```
//!
//! where a `Relation` message describing a table's columns precedes the first change to that
//! table in the session (and is re-sent after the table's definition changes); changes refer to
//! tables by OID only. Non-transactional logical decoding messages (`Message` with
//! `transactional == false`, only sent with `messages 'true'`) can appear outside a transaction.
//!
//! Row images (`TupleData`) have one entry per column: NULL, "unchanged TOASTed value" (the
//! server did not send it because it was not modified), text format, or binary format (only with
//! `binary 'true'`). An Update's old image is present only for `REPLICA IDENTITY FULL` (`'O'`,
//! all columns) or when a key column changed (`'K'`, key columns; others NULL).
//!
//! Protocol versions 2+ add an xid to several messages for streamed in-progress transactions and
//! new message tags (Stream Start/Stop/Commit/Abort, two-phase messages); none of that is sent
//! with `proto_version '1'` and those tags are rejected here as unknown.
//!
//! **No-panic guarantee**: [`decode`] returns a [`DecodeError`] for every malformed input and
//! never panics: no slice indexing, no unchecked arithmetic, no `unwrap`. Counts read from the
//! input never size an allocation by themselves: capacities are bounded by the bytes left.
//! Column values and message contents are zero-copy slices ([`Bytes::slice`]) of the input.

use std::str::Utf8Error;

use bytes::Bytes;

use crate::model::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// `'B'`: start of a committed transaction.
    Begin {
        /// The LSN of the transaction's commit record (equals the following Commit's `commit_lsn`).
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time_micros: i64,
        /// Transaction id.
        xid: u32,
    },
    /// `'C'`: end of the transaction.
    Commit {
        /// Currently unused by PostgreSQL (0).
        flags: u8,
        /// The LSN of the commit record.
        commit_lsn: Lsn,
        /// The end LSN of the transaction: the position to confirm once it is processed.
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time_micros: i64,
    },
    /// `'O'`: the transaction came from another node (replication origin).
    Origin {
        /// The commit LSN on the origin server.
        commit_lsn: Lsn,
        /// The origin's name.
        name: String,
    },
    /// `'R'`: a table's schema, sent before the first change to it.
    Relation(RelationBody),
    /// `'Y'`: a non-built-in data type used by a following Relation.
    Type {
        /// Type OID.
        oid: u32,
        /// Schema name (empty for `pg_catalog`).
        namespace: String,
        /// Type name.
        name: String,
    },
    /// `'I'`: a row was inserted.
    Insert {
        /// The table, as described by an earlier Relation message.
        relation_oid: u32,
        /// The new row.
        new_tuple: TupleData,
    },
    /// `'U'`: a row was updated.
    Update {
        /// The table, as described by an earlier Relation message.
        relation_oid: u32,
        /// The old row (`'K'` key columns or `'O'` all columns), if sent.
        old_tuple: Option<OldTuple>,
        /// The new row; unmodified TOASTed columns are [`ColumnValue::UnchangedToast`].
        new_tuple: TupleData,
    },
    /// `'D'`: a row was deleted.
    Delete {
        /// The table, as described by an earlier Relation message.
        relation_oid: u32,
        /// The deleted row's key (`'K'`) or full image (`'O'`).
        old_tuple: OldTuple,
    },
    /// `'T'`: tables were truncated.
    Truncate {
        /// Bit flags: [`Self::TRUNCATE_CASCADE`], [`Self::TRUNCATE_RESTART_IDENTITY`].
        options: u8,
        /// The truncated tables.
        relation_oids: Vec<u32>,
    },
    /// `'M'`: a logical decoding message (`pg_logical_emit_message`).
    Message {
        /// Emitted as part of the transaction (`true`) or immediately (`false`).
        transactional: bool,
        /// The LSN of the message.
        lsn: Lsn,
        /// The prefix given by the emitter.
        prefix: String,
        /// The content: a zero-copy slice of the input.
        content: Bytes,
    },
}

impl PgOutputMessage {
    /// [`PgOutputMessage::Truncate`] option bit: `TRUNCATE … CASCADE`.
    pub const TRUNCATE_CASCADE: u8 = 1;
    /// [`PgOutputMessage::Truncate`] option bit: `TRUNCATE … RESTART IDENTITY`.
    pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

    /// The message type's name as used in [`DecodeError`] ("Begin", "Update", …).
    pub fn kind(&self) -> &'static str {
        match self {
            PgOutputMessage::Begin { .. } => "Begin",
            PgOutputMessage::Commit { .. } => "Commit",
            PgOutputMessage::Origin { .. } => "Origin",
            PgOutputMessage::Relation(_) => "Relation",
            PgOutputMessage::Type { .. } => "Type",
            PgOutputMessage::Insert { .. } => "Insert",
            PgOutputMessage::Update { .. } => "Update",
            PgOutputMessage::Delete { .. } => "Delete",
            PgOutputMessage::Truncate { .. } => "Truncate",
            PgOutputMessage::Message { .. } => "Message",
        }
    }
}

/// The body of a Relation (`'R'`) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationBody {
    /// Table OID, used by later row messages.
    pub oid: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `pg_class.relreplident`: `b'd'` default (primary key), `b'n'` nothing, `b'f'` full,
    /// `b'i'` index.
    pub replica_identity: u8,
    /// The published columns, in the order tuples list them (generated columns are omitted).
    pub columns: Vec<RelationColumn>,
}

impl RelationBody {
    /// Position of the column named `name`, i.e. its index in a [`TupleData`] of this table.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// One column of a [`RelationBody`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Bit flags; [`RelationColumn::FLAG_KEY`] marks a replica-identity key column.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// OID of the column's type.
    pub type_oid: u32,
    /// `atttypmod` (−1 when the type has none).
    pub type_modifier: i32,
}

impl RelationColumn {
    /// [`RelationColumn::flags`] bit: the column is part of the replica-identity key.
    pub const FLAG_KEY: u8 = 1;

    /// Whether the column is part of the replica-identity key.
    pub fn is_key(&self) -> bool {
        self.flags & Self::FLAG_KEY != 0
    }
}

/// An old row image in an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `'K'`: only the replica-identity key columns carry values; the others are NULL.
    Key(TupleData),
    /// `'O'`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(TupleData),
}

impl OldTuple {
    /// The row image, whichever kind it is.
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// A row image: one value per column of the relation, in the Relation message's order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData(pub Vec<ColumnValue>);

impl TupleData {
    /// The value of column `index`, if the tuple has that many columns.
    pub fn get(&self, index: usize) -> Option<&ColumnValue> {
        self.0.get(index)
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the tuple has no columns.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The values in column order.
    pub fn iter(&self) -> std::slice::Iter<'_, ColumnValue> {
        self.0.iter()
    }
}

/// One column's value in a [`TupleData`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnValue {
    /// `'n'`: SQL NULL.
    Null,
    /// `'u'`: an unchanged TOASTed value; the server did not send it.
    UnchangedToast,
    /// `'t'`: the value in text format (zero-copy slice of the input).
    Text(Bytes),
    /// `'b'`: the value in binary format (zero-copy slice of the input).
    Binary(Bytes),
}

impl ColumnValue {
    /// `Some(text)` for a text-format value, validated as UTF-8; `None` for every other kind.
    pub fn as_text(&self) -> Option<Result<&str, Utf8Error>> {
        match self {
            ColumnValue::Text(b) => Some(std::str::from_utf8(b)),
            _ => None,
        }
    }

    /// Whether the value is SQL NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, ColumnValue::Null)
    }
}

/// Why bytes are not a valid pgoutput message. `message` is the message type being decoded
/// ("Update", …); offsets count from the message's tag byte (offset 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No bytes at all, so no tag.
    #[error("empty pgoutput message: no tag at offset 0")]
    Empty,
    /// The first byte is not a protocol-version-1 message tag.
    #[error("unknown pgoutput message tag {tag:#04x} at offset 0")]
    UnknownMessageTag {
        /// The byte found.
        tag: u8,
    },
    /// The input ends inside a field.
    #[error(
        "truncated {message} message: field `{field}` at offset {offset} needs {needed} bytes, \
         only {available} remain"
    )]
    Truncated {
        /// Message type.
        message: &'static str,
        /// The field that does not fit.
        field: &'static str,
        /// Where the field starts.
        offset: usize,
        /// Bytes the field needs (for a counted list, all its fixed-size items).
        needed: usize,
        /// Bytes left from `offset` to the end of the input.
        available: usize,
    },
    /// The input ends inside a NUL-terminated string (no terminator found): a truncation.
    #[error("truncated {message} message: string `{field}` at offset {offset} has no NUL terminator")]
    UnterminatedString {
        /// Message type.
        message: &'static str,
        /// The string field.
        field: &'static str,
        /// Where the string starts.
        offset: usize,
    },
    /// A string is not valid UTF-8.
    #[error("{message} message: string `{field}` is not valid UTF-8 (bad byte at offset {offset})")]
    InvalidUtf8 {
        /// Message type.
        message: &'static str,
        /// The string field.
        field: &'static str,
        /// The first byte that is not valid UTF-8.
        offset: usize,
    },
    /// The tuple marker (`'N'`, `'K'`, `'O'`) of an Insert/Update/Delete is not one allowed there.
    #[error("{message} message: unknown tuple kind {kind:#04x} for `{field}` at offset {offset}")]
    UnknownTupleKind {
        /// Message type.
        message: &'static str,
        /// Which tuple marker was expected.
        field: &'static str,
        /// Where the marker is.
        offset: usize,
        /// The byte found.
        kind: u8,
    },
    /// A column value's kind byte is not `'n'`, `'u'`, `'t'` or `'b'`.
    #[error("{message} message: unknown column value kind {kind:#04x} for column {column} at offset {offset}")]
    UnknownColumnKind {
        /// Message type.
        message: &'static str,
        /// Zero-based column index within the tuple.
        column: usize,
        /// Where the kind byte is.
        offset: usize,
        /// The byte found.
        kind: u8,
    },
    /// A length field is negative.
    #[error("{message} message: field `{field}` at offset {offset} has negative length {length}")]
    NegativeLength {
        /// Message type.
        message: &'static str,
        /// The length field.
        field: &'static str,
        /// Where the length field starts.
        offset: usize,
        /// The value found.
        length: i32,
    },
    /// Bytes remain after a complete message.
    #[error("{message} message: {count} unexpected trailing bytes at offset {offset}")]
    TrailingBytes {
        /// Message type.
        message: &'static str,
        /// Where the extra bytes start.
        offset: usize,
        /// How many there are.
        count: usize,
    },
}

impl DecodeError {
    /// Whether the error means "the input ended too early" (as opposed to "the input is wrong").
    pub fn is_truncation(&self) -> bool {
        matches!(
            self,
            DecodeError::Empty | DecodeError::Truncated { .. } | DecodeError::UnterminatedString { .. }
        )
    }
}

/// A cursor over one message; every read is bounds-checked and fails with a [`DecodeError`]
/// naming `message` and the field.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self, field: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            field,
            offset: self.pos,
            needed,
            available: self.remaining(),
        }
    }

    /// Checks that `needed` bytes are left, without consuming them.
    fn require(&self, field: &'static str, needed: usize) -> Result<(), DecodeError> {
        if needed > self.remaining() {
            Err(self.truncated(field, needed))
        } else {
            Ok(())
        }
    }

    /// Consumes `n` bytes, returning their range in `buf`.
    fn advance(&mut self, field: &'static str, n: usize) -> Result<std::ops::Range<usize>, DecodeError> {
        self.require(field, n)?;
        let start = self.pos;
        let end = start.checked_add(n).ok_or_else(|| self.truncated(field, n))?;
        self.pos = end;
        Ok(start..end)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let range = self.advance(field, N)?;
        self.buf
            .get(range)
            .and_then(|b| <[u8; N]>::try_from(b).ok())
            .ok_or_else(|| self.truncated(field, N))
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// A NUL-terminated UTF-8 string; the terminator is consumed, not returned.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let start = self.pos;
        let unterminated = DecodeError::UnterminatedString {
            message: self.message,
            field,
            offset: start,
        };
        let rest = self.buf.get(start..).ok_or(unterminated.clone())?;
        let len = rest.iter().position(|&b| b == 0).ok_or(unterminated.clone())?;
        let bytes = rest.get(..len).ok_or(unterminated.clone())?;
        let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::InvalidUtf8 {
            message: self.message,
            field,
            offset: start.saturating_add(e.valid_up_to()),
        })?;
        let text = text.to_owned();
        // `len` bytes of text plus the NUL; `len < rest.len()` so this cannot overflow.
        self.pos = start
            .checked_add(len)
            .and_then(|p| p.checked_add(1))
            .ok_or(unterminated)?;
        Ok(text)
    }

    /// An `Int32` length followed by that many bytes, returned as a zero-copy slice.
    fn counted_bytes(&mut self, length_field: &'static str, field: &'static str) -> Result<Bytes, DecodeError> {
        let offset = self.pos;
        let length = self.i32(length_field)?;
        let n = usize::try_from(length).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            field: length_field,
            offset,
            length,
        })?;
        let range = self.advance(field, n)?;
        Ok(self.buf.slice(range))
    }

    /// Capacity for a list of `count` items of at least `min_item_len` bytes each, bounded by
    /// what the rest of the input could possibly hold.
    fn bounded_capacity(&self, count: usize, min_item_len: usize) -> usize {
        count.min(self.remaining().checked_div(min_item_len).unwrap_or(0))
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                message: self.message,
                offset: self.pos,
                count,
            }),
        }
    }

    /// TupleData: `Int16` column count, then per column a kind byte and, for `'t'`/`'b'`, an
    /// `Int32` length and the value.
    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = usize::from(self.u16("tuple column count")?);
        // Every column takes at least its kind byte.
        let mut values = Vec::with_capacity(self.bounded_capacity(count, 1));
        for column in 0..count {
            let offset = self.pos;
            let value = match self.u8("tuple column kind")? {
                b'n' => ColumnValue::Null,
                b'u' => ColumnValue::UnchangedToast,
                b't' => ColumnValue::Text(self.counted_bytes("tuple column length", "tuple column value")?),
                b'b' => ColumnValue::Binary(self.counted_bytes("tuple column length", "tuple column value")?),
                kind => {
                    return Err(DecodeError::UnknownColumnKind {
                        message: self.message,
                        column,
                        offset,
                        kind,
                    });
                }
            };
            values.push(value);
        }
        Ok(TupleData(values))
    }

    /// An old-tuple marker `'K'`/`'O'` and its tuple.
    fn old_tuple(&mut self, marker: u8, marker_offset: usize) -> Result<OldTuple, DecodeError> {
        match marker {
            b'K' => Ok(OldTuple::Key(self.tuple()?)),
            b'O' => Ok(OldTuple::Full(self.tuple()?)),
            kind => Err(DecodeError::UnknownTupleKind {
                message: self.message,
                field: "old tuple kind ('K' or 'O')",
                offset: marker_offset,
                kind,
            }),
        }
    }

    /// The `'N'` marker that introduces a new tuple.
    fn expect_new_tuple_marker(&mut self, field: &'static str) -> Result<(), DecodeError> {
        let offset = self.pos;
        match self.u8(field)? {
            b'N' => Ok(()),
            kind => Err(DecodeError::UnknownTupleKind {
                message: self.message,
                field,
                offset,
                kind,
            }),
        }
    }
}

/// Decodes one pgoutput (protocol version 1) message: the `data` of one XLogData.
///
/// The whole input must be exactly one message; extra bytes are
/// [`DecodeError::TrailingBytes`]. Never panics.
pub fn decode(data: Bytes) -> Result<PgOutputMessage, DecodeError> {
    let tag = *data.first().ok_or(DecodeError::Empty)?;
    let message = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        tag => return Err(DecodeError::UnknownMessageTag { tag }),
    };
    let mut r = Reader {
        buf: &data,
        pos: 1,
        message,
    };
    let decoded = match tag {
        b'B' => PgOutputMessage::Begin {
            final_lsn: r.lsn("final_lsn")?,
            commit_time_micros: r.i64("commit_time")?,
            xid: r.u32("xid")?,
        },
        b'C' => PgOutputMessage::Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit_lsn")?,
            end_lsn: r.lsn("end_lsn")?,
            commit_time_micros: r.i64("commit_time")?,
        },
        b'O' => PgOutputMessage::Origin {
            commit_lsn: r.lsn("commit_lsn")?,
            name: r.string("name")?,
        },
        b'R' => {
            let oid = r.u32("oid")?;
            let namespace = r.string("namespace")?;
            let name = r.string("name")?;
            let replica_identity = r.u8("replica_identity")?;
            let count = usize::from(r.u16("column count")?);
            // flags(1) + name(>= 1 for the NUL) + type oid(4) + typmod(4).
            let mut columns = Vec::with_capacity(r.bounded_capacity(count, 10));
            for _ in 0..count {
                columns.push(RelationColumn {
                    flags: r.u8("column flags")?,
                    name: r.string("column name")?,
                    type_oid: r.u32("column type oid")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            PgOutputMessage::Relation(RelationBody {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => PgOutputMessage::Type {
            oid: r.u32("oid")?,
            namespace: r.string("namespace")?,
            name: r.string("name")?,
        },
        b'I' => {
            let relation_oid = r.u32("relation_oid")?;
            r.expect_new_tuple_marker("new tuple kind ('N')")?;
            PgOutputMessage::Insert {
                relation_oid,
                new_tuple: r.tuple()?,
            }
        }
        b'U' => {
            let relation_oid = r.u32("relation_oid")?;
            let offset = r.pos;
            let old_tuple = match r.u8("tuple kind ('K', 'O' or 'N')")? {
                b'N' => None,
                marker @ (b'K' | b'O') => {
                    let old = r.old_tuple(marker, offset)?;
                    r.expect_new_tuple_marker("new tuple kind ('N')")?;
                    Some(old)
                }
                kind => {
                    return Err(DecodeError::UnknownTupleKind {
                        message,
                        field: "tuple kind ('K', 'O' or 'N')",
                        offset,
                        kind,
                    });
                }
            };
            PgOutputMessage::Update {
                relation_oid,
                old_tuple,
                new_tuple: r.tuple()?,
            }
        }
        b'D' => {
            let relation_oid = r.u32("relation_oid")?;
            let offset = r.pos;
            let marker = r.u8("old tuple kind ('K' or 'O')")?;
            PgOutputMessage::Delete {
                relation_oid,
                old_tuple: r.old_tuple(marker, offset)?,
            }
        }
        b'T' => {
            let count = r.u32("relation count")?;
            let options = r.u8("options")?;
            // All OIDs are fixed-size: check they are all there before allocating for them.
            let count = usize::try_from(count).map_err(|_| r.truncated("relation oids", usize::MAX))?;
            let needed = count
                .checked_mul(4)
                .ok_or_else(|| r.truncated("relation oids", usize::MAX))?;
            r.require("relation oids", needed)?;
            let mut relation_oids = Vec::with_capacity(r.bounded_capacity(count, 4));
            for _ in 0..count {
                relation_oids.push(r.u32("relation oid")?);
            }
            PgOutputMessage::Truncate { options, relation_oids }
        }
        b'M' => {
            let flags = r.u8("flags")?;
            PgOutputMessage::Message {
                transactional: flags & 1 != 0,
                lsn: r.lsn("lsn")?,
                prefix: r.string("prefix")?,
                content: r.counted_bytes("content length", "content")?,
            }
        }
        // Every other tag returned UnknownMessageTag above.
        tag => return Err(DecodeError::UnknownMessageTag { tag }),
    };
    r.finish()?;
    Ok(decoded)
}

#[cfg(test)]
pub(crate) mod test_encode {
    //! Test-only encoder: the inverse of [`decode`](super::decode), written from the protocol
    //! documentation, used to build test inputs and fuzz seeds.

    use bytes::{BufMut, BytesMut};

    use super::*;

    fn string(out: &mut BytesMut, s: &str) {
        out.put_slice(s.as_bytes());
        out.put_u8(0);
    }

    fn len32(n: usize) -> i32 {
        i32::try_from(n).expect("test value too long")
    }

    pub(crate) fn tuple(out: &mut BytesMut, t: &TupleData) {
        out.put_u16(u16::try_from(t.0.len()).expect("too many test columns"));
        for v in &t.0 {
            match v {
                ColumnValue::Null => out.put_u8(b'n'),
                ColumnValue::UnchangedToast => out.put_u8(b'u'),
                ColumnValue::Text(b) | ColumnValue::Binary(b) => {
                    out.put_u8(if matches!(v, ColumnValue::Text(_)) { b't' } else { b'b' });
                    out.put_i32(len32(b.len()));
                    out.put_slice(b);
                }
            }
        }
    }

    fn old_tuple(out: &mut BytesMut, t: &OldTuple) {
        match t {
            OldTuple::Key(t) => {
                out.put_u8(b'K');
                tuple(out, t);
            }
            OldTuple::Full(t) => {
                out.put_u8(b'O');
                tuple(out, t);
            }
        }
    }

    /// Encodes `msg` as pgoutput protocol version 1 bytes.
    pub(crate) fn encode(msg: &PgOutputMessage) -> Bytes {
        let mut out = BytesMut::new();
        match msg {
            PgOutputMessage::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            } => {
                out.put_u8(b'B');
                out.put_u64(final_lsn.0);
                out.put_i64(*commit_time_micros);
                out.put_u32(*xid);
            }
            PgOutputMessage::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time_micros,
            } => {
                out.put_u8(b'C');
                out.put_u8(*flags);
                out.put_u64(commit_lsn.0);
                out.put_u64(end_lsn.0);
                out.put_i64(*commit_time_micros);
            }
            PgOutputMessage::Origin { commit_lsn, name } => {
                out.put_u8(b'O');
                out.put_u64(commit_lsn.0);
                string(&mut out, name);
            }
            PgOutputMessage::Relation(r) => {
                out.put_u8(b'R');
                out.put_u32(r.oid);
                string(&mut out, &r.namespace);
                string(&mut out, &r.name);
                out.put_u8(r.replica_identity);
                out.put_u16(u16::try_from(r.columns.len()).expect("too many test columns"));
                for c in &r.columns {
                    out.put_u8(c.flags);
                    string(&mut out, &c.name);
                    out.put_u32(c.type_oid);
                    out.put_i32(c.type_modifier);
                }
            }
            PgOutputMessage::Type { oid, namespace, name } => {
                out.put_u8(b'Y');
                out.put_u32(*oid);
                string(&mut out, namespace);
                string(&mut out, name);
            }
            PgOutputMessage::Insert {
                relation_oid,
                new_tuple,
            } => {
                out.put_u8(b'I');
                out.put_u32(*relation_oid);
                out.put_u8(b'N');
                tuple(&mut out, new_tuple);
            }
            PgOutputMessage::Update {
                relation_oid,
                old_tuple: old,
                new_tuple,
            } => {
                out.put_u8(b'U');
                out.put_u32(*relation_oid);
                if let Some(old) = old {
                    old_tuple(&mut out, old);
                }
                out.put_u8(b'N');
                tuple(&mut out, new_tuple);
            }
            PgOutputMessage::Delete {
                relation_oid,
                old_tuple: old,
            } => {
                out.put_u8(b'D');
                out.put_u32(*relation_oid);
                old_tuple(&mut out, old);
            }
            PgOutputMessage::Truncate { options, relation_oids } => {
                out.put_u8(b'T');
                out.put_u32(u32::try_from(relation_oids.len()).expect("too many test relations"));
                out.put_u8(*options);
                for oid in relation_oids {
                    out.put_u32(*oid);
                }
            }
            PgOutputMessage::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                out.put_u8(b'M');
                out.put_u8(u8::from(*transactional));
                out.put_u64(lsn.0);
                string(&mut out, prefix);
                out.put_i32(len32(content.len()));
                out.put_slice(content);
            }
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};
    use proptest::prelude::*;

    use super::test_encode::encode;
    use super::*;

    fn text(s: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn mixed_tuple() -> TupleData {
        TupleData(vec![
            text("@alice:example.org"),
            ColumnValue::Null,
            ColumnValue::UnchangedToast,
            ColumnValue::Binary(Bytes::from_static(&[0, 1, 2, 0xff])),
            text(""),
            text("{\"tags\":{\"u.work\":{}}} ünïcødé"),
        ])
    }

    /// One instance of every message shape.
    pub(super) fn samples() -> Vec<PgOutputMessage> {
        vec![
            PgOutputMessage::Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_time_micros: 757_382_400_000_042,
                xid: 1234,
            },
            PgOutputMessage::Commit {
                flags: 0,
                commit_lsn: Lsn(0x16_B374_D848),
                end_lsn: Lsn(0x16_B374_D878),
                commit_time_micros: 757_382_400_000_042,
            },
            PgOutputMessage::Origin {
                commit_lsn: Lsn(7),
                name: "pg_origin_1".into(),
            },
            PgOutputMessage::Relation(RelationBody {
                oid: 16_385,
                namespace: "public".into(),
                name: "room_account_data".into(),
                replica_identity: b'd',
                columns: vec![
                    RelationColumn {
                        flags: 1,
                        name: "user_id".into(),
                        type_oid: 25,
                        type_modifier: -1,
                    },
                    RelationColumn {
                        flags: 1,
                        name: "room_id".into(),
                        type_oid: 25,
                        type_modifier: -1,
                    },
                    RelationColumn {
                        flags: 0,
                        name: "stream_id".into(),
                        type_oid: 20,
                        type_modifier: -1,
                    },
                    RelationColumn {
                        flags: 0,
                        name: "name".into(),
                        type_oid: 1043,
                        type_modifier: 68,
                    },
                ],
            }),
            PgOutputMessage::Relation(RelationBody {
                oid: 1,
                namespace: String::new(),
                name: "t".into(),
                replica_identity: b'n',
                columns: vec![],
            }),
            PgOutputMessage::Type {
                oid: 16_400,
                namespace: "public".into(),
                name: "mood".into(),
            },
            PgOutputMessage::Insert {
                relation_oid: 16_385,
                new_tuple: mixed_tuple(),
            },
            PgOutputMessage::Insert {
                relation_oid: 16_385,
                new_tuple: TupleData(vec![]),
            },
            PgOutputMessage::Update {
                relation_oid: 16_385,
                old_tuple: None,
                new_tuple: mixed_tuple(),
            },
            PgOutputMessage::Update {
                relation_oid: 16_385,
                old_tuple: Some(OldTuple::Key(TupleData(vec![text("k"), ColumnValue::Null]))),
                new_tuple: mixed_tuple(),
            },
            PgOutputMessage::Update {
                relation_oid: 16_385,
                old_tuple: Some(OldTuple::Full(mixed_tuple())),
                new_tuple: TupleData(vec![text("new")]),
            },
            PgOutputMessage::Delete {
                relation_oid: 16_385,
                old_tuple: OldTuple::Key(TupleData(vec![text("k")])),
            },
            PgOutputMessage::Delete {
                relation_oid: 16_385,
                old_tuple: OldTuple::Full(mixed_tuple()),
            },
            PgOutputMessage::Truncate {
                options: PgOutputMessage::TRUNCATE_CASCADE | PgOutputMessage::TRUNCATE_RESTART_IDENTITY,
                relation_oids: vec![16_385, 16_390, u32::MAX],
            },
            PgOutputMessage::Truncate {
                options: 0,
                relation_oids: vec![],
            },
            PgOutputMessage::Message {
                transactional: true,
                lsn: Lsn(99),
                prefix: "relay".into(),
                content: Bytes::from_static(b"hello\0world"),
            },
            PgOutputMessage::Message {
                transactional: false,
                lsn: Lsn(u64::MAX),
                prefix: String::new(),
                content: Bytes::new(),
            },
        ]
    }

    #[test]
    fn every_sample_round_trips() {
        let samples = samples();
        let kinds: std::collections::BTreeSet<_> = samples.iter().map(PgOutputMessage::kind).collect();
        assert_eq!(kinds.len(), 10, "a message type has no sample: {kinds:?}");
        for msg in samples {
            let bytes = encode(&msg);
            assert_eq!(decode(bytes.clone()).as_ref(), Ok(&msg), "bytes {bytes:?}");
        }
    }

    #[test]
    fn begin_decodes_from_hand_written_bytes() {
        let mut b = vec![b'B'];
        b.extend_from_slice(&0x0000_0001_0000_0002u64.to_be_bytes());
        b.extend_from_slice(&(-5i64).to_be_bytes());
        b.extend_from_slice(&0xDEAD_BEEFu32.to_be_bytes());
        assert_eq!(
            decode(Bytes::from(b)),
            Ok(PgOutputMessage::Begin {
                final_lsn: Lsn(0x1_0000_0002),
                commit_time_micros: -5,
                xid: 0xDEAD_BEEF
            })
        );
    }

    #[test]
    fn values_and_content_are_zero_copy() {
        let input = encode(&PgOutputMessage::Insert {
            relation_oid: 1,
            new_tuple: mixed_tuple(),
        });
        let range = input.as_ptr_range();
        let PgOutputMessage::Insert { new_tuple, .. } = decode(input.clone()).unwrap() else {
            panic!()
        };
        for v in new_tuple.iter() {
            if let ColumnValue::Text(b) | ColumnValue::Binary(b) = v {
                if !b.is_empty() {
                    assert!(range.contains(&b.as_ptr()), "value {b:?} was copied");
                }
            }
        }
        let input = encode(&PgOutputMessage::Message {
            transactional: false,
            lsn: Lsn(1),
            prefix: "p".into(),
            content: Bytes::from_static(b"content"),
        });
        let range = input.as_ptr_range();
        let PgOutputMessage::Message { content, .. } = decode(input.clone()).unwrap() else {
            panic!()
        };
        assert!(range.contains(&content.as_ptr()));
    }

    #[test]
    fn every_proper_prefix_is_an_error() {
        for msg in samples() {
            let bytes = encode(&msg);
            for len in 0..bytes.len() {
                let err = decode(bytes.slice(..len)).expect_err("prefix decoded");
                assert!(
                    err.is_truncation(),
                    "{} prefix of {len}/{}: {err}",
                    msg.kind(),
                    bytes.len()
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for msg in samples() {
            let mut bytes = BytesMut::from(&encode(&msg)[..]);
            let len = bytes.len();
            bytes.put_slice(b"\0x");
            assert_eq!(
                decode(bytes.freeze()),
                Err(DecodeError::TrailingBytes {
                    message: msg.kind(),
                    offset: len,
                    count: 2
                })
            );
        }
    }

    #[test]
    fn unknown_message_tags_are_rejected() {
        // Includes protocol-version-2+ tags (stream start/stop/commit/abort, two-phase).
        for tag in [b'S', b'E', b'c', b'A', b'b', b'P', b'K', b'r', b'N', b'w', 0, 0xff] {
            assert_eq!(
                decode(Bytes::from(vec![tag; 32])),
                Err(DecodeError::UnknownMessageTag { tag })
            );
        }
        assert_eq!(decode(Bytes::new()), Err(DecodeError::Empty));
    }

    #[test]
    fn truncation_error_names_message_field_and_offset() {
        let bytes = encode(&PgOutputMessage::Update {
            relation_oid: 1,
            old_tuple: None,
            new_tuple: mixed_tuple(),
        });
        // Cut inside the first column's length (tag 1 + oid 4 + 'N' 1 + count 2 + kind 1 = offset 9).
        let err = decode(bytes.slice(..11)).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Truncated {
                message: "Update",
                field: "tuple column length",
                offset: 9,
                needed: 4,
                available: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "truncated Update message: field `tuple column length` at offset 9 needs 4 bytes, only 2 remain"
        );
    }

    #[test]
    fn bad_tuple_markers_are_rejected() {
        // Insert with 'K' instead of 'N'.
        let mut b = encode(&PgOutputMessage::Insert {
            relation_oid: 1,
            new_tuple: TupleData(vec![]),
        })
        .to_vec();
        b[5] = b'K';
        assert_eq!(
            decode(Bytes::from(b)),
            Err(DecodeError::UnknownTupleKind {
                message: "Insert",
                field: "new tuple kind ('N')",
                offset: 5,
                kind: b'K'
            })
        );
        // Update with 'X'.
        let mut b = encode(&PgOutputMessage::Update {
            relation_oid: 1,
            old_tuple: None,
            new_tuple: TupleData(vec![]),
        })
        .to_vec();
        b[5] = b'X';
        assert!(matches!(
            decode(Bytes::from(b)),
            Err(DecodeError::UnknownTupleKind {
                message: "Update",
                offset: 5,
                kind: b'X',
                ..
            })
        ));
        // Update whose old tuple is followed by something other than 'N'.
        let msg = PgOutputMessage::Update {
            relation_oid: 1,
            old_tuple: Some(OldTuple::Key(TupleData(vec![]))),
            new_tuple: TupleData(vec![]),
        };
        let mut b = encode(&msg).to_vec();
        b[8] = b'O';
        assert!(matches!(
            decode(Bytes::from(b)),
            Err(DecodeError::UnknownTupleKind {
                message: "Update",
                offset: 8,
                kind: b'O',
                ..
            })
        ));
        // Delete with 'N' (a new tuple makes no sense for a delete).
        let mut b = encode(&PgOutputMessage::Delete {
            relation_oid: 1,
            old_tuple: OldTuple::Key(TupleData(vec![])),
        })
        .to_vec();
        b[5] = b'N';
        assert!(matches!(
            decode(Bytes::from(b)),
            Err(DecodeError::UnknownTupleKind {
                message: "Delete",
                offset: 5,
                kind: b'N',
                ..
            })
        ));
    }

    #[test]
    fn bad_column_kind_is_rejected() {
        let msg = PgOutputMessage::Insert {
            relation_oid: 1,
            new_tuple: TupleData(vec![ColumnValue::Null, ColumnValue::Null]),
        };
        let mut b = encode(&msg).to_vec();
        b[9] = b'x';
        assert_eq!(
            decode(Bytes::from(b)),
            Err(DecodeError::UnknownColumnKind {
                message: "Insert",
                column: 1,
                offset: 9,
                kind: b'x'
            })
        );
    }

    #[test]
    fn negative_lengths_are_rejected() {
        let msg = PgOutputMessage::Insert {
            relation_oid: 1,
            new_tuple: TupleData(vec![text("abc")]),
        };
        let mut b = encode(&msg).to_vec();
        b[9..13].copy_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            decode(Bytes::from(b)),
            Err(DecodeError::NegativeLength {
                message: "Insert",
                field: "tuple column length",
                offset: 9,
                length: -1
            })
        );
        let msg = PgOutputMessage::Message {
            transactional: true,
            lsn: Lsn(1),
            prefix: "p".into(),
            content: Bytes::new(),
        };
        let mut b = encode(&msg).to_vec();
        let at = b.len() - 4;
        b[at..].copy_from_slice(&i32::MIN.to_be_bytes());
        assert!(matches!(
            decode(Bytes::from(b)),
            Err(DecodeError::NegativeLength { message: "Message", .. })
        ));
    }

    #[test]
    fn huge_counts_fail_fast_without_allocating() {
        // Truncate claiming 2^31 and 2^32-1 relations with none present.
        for count in [0x8000_0000u32, u32::MAX] {
            let mut b = vec![b'T'];
            b.extend_from_slice(&count.to_be_bytes());
            b.push(0);
            b.extend_from_slice(&[0, 0, 0, 1]);
            assert!(matches!(
                decode(Bytes::from(b)),
                Err(DecodeError::Truncated {
                    message: "Truncate",
                    field: "relation oids",
                    ..
                })
            ));
        }
        // Relation and tuple claiming 65535 columns with none present.
        let mut b = encode(&PgOutputMessage::Relation(RelationBody {
            oid: 1,
            namespace: String::new(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![],
        }))
        .to_vec();
        let at = b.len() - 2;
        b[at..].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(decode(Bytes::from(b)).unwrap_err().is_truncation());
        let mut b = encode(&PgOutputMessage::Insert {
            relation_oid: 1,
            new_tuple: TupleData(vec![]),
        })
        .to_vec();
        b[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(decode(Bytes::from(b)).unwrap_err().is_truncation());
        // A value length far beyond the input.
        let msg = PgOutputMessage::Insert {
            relation_oid: 1,
            new_tuple: TupleData(vec![text("abc")]),
        };
        let mut b = encode(&msg).to_vec();
        b[9..13].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            decode(Bytes::from(b)),
            Err(DecodeError::Truncated {
                field: "tuple column value",
                needed: 0x7fff_ffff,
                available: 3,
                ..
            })
        ));
    }

    #[test]
    fn invalid_utf8_is_rejected_with_offset() {
        let msg = PgOutputMessage::Type {
            oid: 5,
            namespace: "ns".into(),
            name: "abc".into(),
        };
        let mut b = encode(&msg).to_vec();
        // tag 1 + oid 4 + "ns\0" 3 = 8: "abc" starts there; break its second byte.
        b[9] = 0xC3;
        assert_eq!(
            decode(Bytes::from(b)),
            Err(DecodeError::InvalidUtf8 {
                message: "Type",
                field: "name",
                offset: 9
            })
        );
        let mut b = encode(&PgOutputMessage::Origin {
            commit_lsn: Lsn(1),
            name: "o".into(),
        })
        .to_vec();
        b[9] = 0xff;
        assert!(matches!(
            decode(Bytes::from(b)),
            Err(DecodeError::InvalidUtf8 {
                message: "Origin",
                field: "name",
                ..
            })
        ));
    }

    #[test]
    fn unterminated_string_is_a_truncation() {
        let b = Bytes::from_static(b"O\0\0\0\0\0\0\0\x01abc");
        assert_eq!(
            decode(b),
            Err(DecodeError::UnterminatedString {
                message: "Origin",
                field: "name",
                offset: 9
            })
        );
    }

    #[test]
    fn message_flags_other_bits_are_ignored() {
        let msg = PgOutputMessage::Message {
            transactional: false,
            lsn: Lsn(1),
            prefix: "p".into(),
            content: Bytes::new(),
        };
        let mut b = encode(&msg).to_vec();
        b[1] = 0x03;
        let PgOutputMessage::Message { transactional, .. } = decode(Bytes::from(b)).unwrap() else {
            panic!()
        };
        assert!(transactional);
    }

    #[test]
    fn helpers() {
        let t = mixed_tuple();
        assert_eq!(t.len(), 6);
        assert!(!t.is_empty());
        assert_eq!(t.get(0).and_then(ColumnValue::as_text), Some(Ok("@alice:example.org")));
        assert!(t.get(1).is_some_and(ColumnValue::is_null));
        assert_eq!(t.get(2).and_then(ColumnValue::as_text), None);
        assert_eq!(t.get(3).and_then(ColumnValue::as_text), None);
        assert!(t.get(6).is_none());
        assert!(
            ColumnValue::Text(Bytes::from_static(b"\xff"))
                .as_text()
                .is_some_and(|r| r.is_err())
        );
        let PgOutputMessage::Relation(rel) = &samples()[3] else {
            panic!()
        };
        assert_eq!(rel.column_index("stream_id"), Some(2));
        assert_eq!(rel.column_index("nope"), None);
        assert!(rel.columns[0].is_key() && !rel.columns[2].is_key());
        let old = OldTuple::Key(t.clone());
        assert_eq!(old.tuple(), &t);
    }

    // ---- real bytes captured from PostgreSQL 15 (see tests/fixtures/pgoutput/README.md) ----

    const PG15_TEXT: &str = include_str!("../../tests/fixtures/pgoutput/pg15_proto1_text.hex");
    const PG15_BINARY: &str = include_str!("../../tests/fixtures/pgoutput/pg15_proto1_binary.hex");

    pub(super) fn fixture_messages(fixture: &str) -> Vec<Bytes> {
        fixture
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|line| {
                let digits = line.as_bytes();
                assert!(digits.len() % 2 == 0, "odd hex line {line:?}");
                let nibble = |c: u8| (c as char).to_digit(16).expect("hex digit") as u8;
                Bytes::from(
                    digits
                        .chunks(2)
                        .map(|p| nibble(p[0]) << 4 | nibble(p[1]))
                        .collect::<Vec<u8>>(),
                )
            })
            .collect()
    }

    fn decode_fixture(fixture: &str) -> Vec<PgOutputMessage> {
        fixture_messages(fixture)
            .into_iter()
            .enumerate()
            .map(|(i, b)| decode(b.clone()).unwrap_or_else(|e| panic!("message {i} ({b:?}): {e}")))
            .collect()
    }

    fn texts(t: &TupleData) -> Vec<Option<&str>> {
        t.iter().map(|v| v.as_text().map(|r| r.expect("utf-8"))).collect()
    }

    #[test]
    fn pg15_capture_decodes_and_re_encodes_identically() {
        for fixture in [PG15_TEXT, PG15_BINARY] {
            for bytes in fixture_messages(fixture) {
                let msg = decode(bytes.clone()).unwrap();
                assert_eq!(encode(&msg), bytes, "{msg:?}");
            }
        }
    }

    #[test]
    fn pg15_capture_transactions_are_well_formed() {
        let msgs = decode_fixture(PG15_TEXT);
        let mut open: Option<Lsn> = None;
        for m in &msgs {
            match m {
                PgOutputMessage::Begin { final_lsn, .. } => {
                    assert!(open.is_none(), "nested Begin");
                    open = Some(*final_lsn);
                }
                PgOutputMessage::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    ..
                } => {
                    assert_eq!(open.take(), Some(*commit_lsn));
                    assert_eq!(*flags, 0);
                    assert!(end_lsn > commit_lsn);
                }
                PgOutputMessage::Message {
                    transactional: false, ..
                } => assert!(open.is_none()),
                _ => assert!(open.is_some(), "{m:?} outside a transaction"),
            }
        }
        assert_eq!(msgs.len(), 39);
    }

    #[test]
    fn pg15_capture_text_format_contents() {
        use ColumnValue::*;
        let msgs = decode_fixture(PG15_TEXT);
        let PgOutputMessage::Relation(rad) = &msgs[1] else {
            panic!("{:?}", msgs[1])
        };
        assert_eq!(
            (rad.namespace.as_str(), rad.name.as_str(), rad.replica_identity),
            ("public", "room_account_data", b'd')
        );
        let cols: Vec<_> = rad
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.is_key(), c.type_oid, c.type_modifier))
            .collect();
        assert_eq!(
            cols,
            [
                ("user_id", true, 25, -1),
                ("room_id", true, 25, -1),
                ("account_data_type", true, 25, -1),
                ("stream_id", false, 20, -1),
                ("content", false, 25, -1),
                ("instance_name", false, 25, -1),
            ]
        );
        let PgOutputMessage::Insert {
            relation_oid,
            new_tuple,
        } = &msgs[2]
        else {
            panic!()
        };
        assert_eq!(*relation_oid, rad.oid);
        assert_eq!(
            texts(new_tuple),
            [
                Some("@alice:example.org"),
                Some("!room:example.org"),
                Some("m.tag"),
                Some("5"),
                Some("{\"tags\":{\"u.work\":{}}}"),
                None
            ]
        );
        assert!(new_tuple.get(5).is_some_and(ColumnValue::is_null));
        // Plain update: no old tuple.
        let PgOutputMessage::Update {
            old_tuple: None,
            new_tuple,
            ..
        } = &msgs[5]
        else {
            panic!("{:?}", msgs[5])
        };
        assert_eq!(texts(new_tuple)[3..5], [Some("6"), Some("{\"tags\":{}}")]);
        // Key change: old key tuple, non-key columns NULL.
        let PgOutputMessage::Update {
            old_tuple: Some(OldTuple::Key(old)),
            new_tuple,
            ..
        } = &msgs[8]
        else {
            panic!()
        };
        assert_eq!(
            texts(old),
            [
                Some("@alice:example.org"),
                Some("!room:example.org"),
                Some("m.tag"),
                None,
                None,
                None
            ]
        );
        assert_eq!(&old.0[3..], [Null, Null, Null]);
        assert_eq!(texts(new_tuple)[1], Some("!other:example.org"));
        let PgOutputMessage::Delete {
            old_tuple: OldTuple::Key(old),
            ..
        } = &msgs[11]
        else {
            panic!()
        };
        assert_eq!(texts(old)[1], Some("!other:example.org"));
        // Large out-of-line value: sent on insert, 'u' on an update that does not touch it.
        let PgOutputMessage::Insert { new_tuple, .. } = &msgs[14] else {
            panic!()
        };
        assert_eq!(
            new_tuple.get(4).and_then(ColumnValue::as_text).map(|t| t.map(str::len)),
            Some(Ok(2108))
        );
        let PgOutputMessage::Update {
            old_tuple: None,
            new_tuple,
            ..
        } = &msgs[17]
        else {
            panic!()
        };
        assert_eq!(new_tuple.0[4], UnchangedToast);
        assert_eq!(texts(new_tuple)[3], Some("8"));
        // REPLICA IDENTITY FULL table.
        let PgOutputMessage::Relation(fi) = &msgs[20] else {
            panic!()
        };
        assert_eq!((fi.name.as_str(), fi.replica_identity), ("full_ident", b'f'));
        assert_eq!(fi.columns[1].type_modifier, 24); // varchar(20): 20 + VARHDRSZ
        let PgOutputMessage::Insert { new_tuple, .. } = &msgs[21] else {
            panic!()
        };
        assert_eq!(texts(new_tuple), [Some("1"), Some("ünïcødé"), Some("\\x00ff")]);
        let PgOutputMessage::Update {
            old_tuple: Some(OldTuple::Full(old)),
            new_tuple,
            ..
        } = &msgs[24]
        else {
            panic!()
        };
        assert_eq!(texts(old)[2], Some("\\x00ff"));
        assert_eq!(texts(new_tuple)[2], Some("\\x01"));
        let PgOutputMessage::Delete {
            old_tuple: OldTuple::Full(old),
            ..
        } = &msgs[27]
        else {
            panic!()
        };
        assert_eq!(texts(old), [Some("1"), Some("ünïcødé"), Some("\\x01")]);
        // Logical decoding messages.
        let PgOutputMessage::Message {
            transactional: true,
            prefix,
            content,
            ..
        } = &msgs[30]
        else {
            panic!()
        };
        assert_eq!((prefix.as_str(), &content[..]), ("relay", &b"transactional"[..]));
        let PgOutputMessage::Message {
            transactional: false,
            content,
            ..
        } = &msgs[33]
        else {
            panic!()
        };
        assert_eq!(&content[..], b"not transactional");
        // TRUNCATE … RESTART IDENTITY CASCADE of both tables, after their Relation messages.
        let PgOutputMessage::Truncate { options, relation_oids } = &msgs[37] else {
            panic!()
        };
        assert_eq!(
            *options,
            PgOutputMessage::TRUNCATE_CASCADE | PgOutputMessage::TRUNCATE_RESTART_IDENTITY
        );
        let mut oids = relation_oids.clone();
        oids.sort_unstable();
        let mut expected = vec![rad.oid, fi.oid];
        expected.sort_unstable();
        assert_eq!(oids, expected);
    }

    #[test]
    fn pg15_capture_binary_format_contents() {
        let msgs = decode_fixture(PG15_BINARY);
        let inserts: Vec<_> = msgs
            .iter()
            .filter_map(|m| match m {
                PgOutputMessage::Insert { new_tuple, .. } => Some(new_tuple),
                _ => None,
            })
            .collect();
        assert_eq!(inserts.len(), 4);
        // room_account_data: text columns are their UTF-8 bytes, bigint is 8 bytes big-endian.
        assert_eq!(
            inserts[0].0[0],
            ColumnValue::Binary(Bytes::from_static(b"@alice:example.org"))
        );
        assert_eq!(
            inserts[0].0[3],
            ColumnValue::Binary(Bytes::copy_from_slice(&5i64.to_be_bytes()))
        );
        assert!(inserts[0].0[5].is_null());
        // full_ident: int4 and raw bytea.
        assert_eq!(
            inserts[2].0[0],
            ColumnValue::Binary(Bytes::copy_from_slice(&1i32.to_be_bytes()))
        );
        assert_eq!(inserts[2].0[2], ColumnValue::Binary(Bytes::from_static(&[0x00, 0xff])));
        assert!(msgs.iter().all(|m| !matches!(m, PgOutputMessage::Message { .. })));
    }

    #[test]
    fn pg15_capture_prefixes_are_errors() {
        for bytes in fixture_messages(PG15_TEXT).into_iter().filter(|b| b.len() < 200) {
            for len in 0..bytes.len() {
                assert!(decode(bytes.slice(..len)).is_err_and(|e| e.is_truncation()));
            }
        }
    }

    /// Writes the fuzz seed corpus: `cargo test --lib write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes files; run by hand to regenerate fuzz/seeds/pgoutput_decode"]
    fn write_fuzz_seeds() {
        use std::io::Write as _;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/pgoutput_decode");
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
        // Bare pgoutput messages: every synthetic sample, and the real capture's distinct kinds.
        for (i, msg) in samples().iter().enumerate() {
            write(&format!("synthetic-{i:02}-{}", msg.kind().to_lowercase()), &encode(msg));
        }
        let captured = fixture_messages(PG15_TEXT);
        let mut seen_begin_commit = std::collections::BTreeSet::new();
        for (i, bytes) in captured.iter().enumerate().filter(|(_, b)| b.len() < 200) {
            let kind = decode(bytes.clone()).unwrap().kind().to_lowercase();
            // Every transaction has a Begin and Commit; one of each is enough.
            if matches!(kind.as_str(), "begin" | "commit") && !seen_begin_commit.insert(kind.clone()) {
                continue;
            }
            write(&format!("pg15-{i:02}-{kind}"), bytes);
        }
        // The same messages wrapped in XLogData, plus a keepalive.
        let xlog = |data: &[u8]| {
            let mut b = BytesMut::new();
            b.put_u8(b'w');
            b.put_u64(0x0153_33A0);
            b.put_u64(0x0153_33D0);
            b.put_i64(817_000_000_000_000);
            b.put_slice(data);
            b
        };
        for (i, bytes) in captured.iter().take(4).enumerate() {
            write(&format!("xlogdata-{i:02}"), &xlog(bytes));
        }
        let mut keepalive = BytesMut::new();
        keepalive.put_u8(b'k');
        keepalive.put_u64(0x0153_33D0);
        keepalive.put_i64(817_000_000_000_000);
        keepalive.put_u8(1);
        write("keepalive", &keepalive);
        // A sequence (see the fuzz target): 0xFF, then frames of u16 length + CopyData payload.
        let mut seq = vec![0xFFu8];
        for bytes in captured.iter().take(4) {
            let frame = xlog(bytes);
            seq.write_all(&u16::try_from(frame.len()).unwrap().to_be_bytes())
                .unwrap();
            seq.write_all(&frame).unwrap();
        }
        seq.write_all(&u16::try_from(keepalive.len()).unwrap().to_be_bytes())
            .unwrap();
        seq.write_all(&keepalive).unwrap();
        write("sequence-transaction", &seq);
    }

    // ---- property tests ----

    fn name() -> impl Strategy<Value = String> {
        // Any string without NUL (the protocol's terminator), including non-ASCII.
        "[^\u{0}]{0,12}"
    }

    fn payload() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
    }

    fn column_value() -> impl Strategy<Value = ColumnValue> {
        prop_oneof![
            Just(ColumnValue::Null),
            Just(ColumnValue::UnchangedToast),
            payload().prop_map(ColumnValue::Text),
            payload().prop_map(ColumnValue::Binary),
        ]
    }

    fn tuple() -> impl Strategy<Value = TupleData> {
        proptest::collection::vec(column_value(), 0..8).prop_map(TupleData)
    }

    fn old_tuple() -> impl Strategy<Value = OldTuple> {
        prop_oneof![tuple().prop_map(OldTuple::Key), tuple().prop_map(OldTuple::Full)]
    }

    fn lsn() -> impl Strategy<Value = Lsn> {
        any::<u64>().prop_map(Lsn)
    }

    fn message() -> impl Strategy<Value = PgOutputMessage> {
        let column =
            (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(|(flags, name, type_oid, type_modifier)| {
                RelationColumn {
                    flags,
                    name,
                    type_oid,
                    type_modifier,
                }
            });
        prop_oneof![
            (lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time_micros, xid)| {
                PgOutputMessage::Begin {
                    final_lsn,
                    commit_time_micros,
                    xid,
                }
            }),
            (any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(|(flags, commit_lsn, end_lsn, commit_time_micros)| {
                PgOutputMessage::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time_micros,
                }
            }),
            (lsn(), name()).prop_map(|(commit_lsn, name)| PgOutputMessage::Origin { commit_lsn, name }),
            (
                any::<u32>(),
                name(),
                name(),
                any::<u8>(),
                proptest::collection::vec(column, 0..6)
            )
                .prop_map(|(oid, namespace, name, replica_identity, columns)| {
                    PgOutputMessage::Relation(RelationBody {
                        oid,
                        namespace,
                        name,
                        replica_identity,
                        columns,
                    })
                }),
            (any::<u32>(), name(), name())
                .prop_map(|(oid, namespace, name)| { PgOutputMessage::Type { oid, namespace, name } }),
            (any::<u32>(), tuple()).prop_map(|(relation_oid, new_tuple)| PgOutputMessage::Insert {
                relation_oid,
                new_tuple
            }),
            (any::<u32>(), proptest::option::of(old_tuple()), tuple()).prop_map(
                |(relation_oid, old_tuple, new_tuple)| {
                    PgOutputMessage::Update {
                        relation_oid,
                        old_tuple,
                        new_tuple,
                    }
                }
            ),
            (any::<u32>(), old_tuple()).prop_map(|(relation_oid, old_tuple)| {
                PgOutputMessage::Delete {
                    relation_oid,
                    old_tuple,
                }
            }),
            (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..8))
                .prop_map(|(options, relation_oids)| PgOutputMessage::Truncate { options, relation_oids }),
            (any::<bool>(), lsn(), name(), payload()).prop_map(|(transactional, lsn, prefix, content)| {
                PgOutputMessage::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = decode(Bytes::from(bytes));
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_tag_never_panic(
            tag in prop::sample::select(b"BCORYIUDTM".to_vec()),
            rest in proptest::collection::vec(any::<u8>(), 0..96),
        ) {
            let mut bytes = vec![tag];
            bytes.extend(rest);
            let _ = decode(Bytes::from(bytes));
        }

        #[test]
        fn generated_messages_round_trip(msg in message()) {
            let bytes = encode(&msg);
            prop_assert_eq!(decode(bytes.clone()), Ok(msg));
            // And every proper prefix is a truncation error.
            for len in 0..bytes.len() {
                let err = decode(bytes.slice(..len));
                prop_assert!(err.as_ref().is_err_and(DecodeError::is_truncation), "{:?}", err);
            }
        }

        #[test]
        fn mutated_messages_never_panic(msg in message(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = encode(&msg).to_vec();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = decode(Bytes::from(bytes));
        }
    }
}
