//! CopyData payloads of the streaming-replication sub-protocol (`START_REPLICATION … LOGICAL`).
//!
//! Once replication has started, server and client exchange CopyData (`'d'`) messages whose
//! bodies begin with a one-byte tag:
//!
//! | tag   | direction       | body (all integers big-endian)                                   |
//! |-------|-----------------|------------------------------------------------------------------|
//! | `'w'` | server → client | XLogData: `u64` walStart, `u64` walEnd, `i64` sendTime, then data |
//! | `'k'` | server → client | Primary keepalive: `u64` walEnd, `i64` sendTime, `u8` replyNow   |
//! | `'r'` | client → server | Standby status update: `u64` write, flush, apply, `i64` clock, `u8` reply |
//!
//! Times are microseconds since the PostgreSQL epoch, 2000-01-01 00:00:00 UTC. For logical
//! replication the data of an XLogData message is one output-plugin message (for pgoutput, see
//! [`super::pgoutput`]).
//!
//! Everything here is pure: no I/O and no clock reads (the caller passes times in).
//!
//! **No-panic guarantee**: [`parse_copy_data`] returns a [`WireError`] for every malformed
//! input (empty, unknown tag, truncated, trailing bytes); it never panics, never indexes out of
//! bounds and allocates nothing (XLogData's `data` is a zero-copy slice of the input).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use crate::model::Lsn;

/// Seconds from the Unix epoch (1970-01-01) to the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// Length of the XLogData header including the tag: `'w'` + 3 × 8 bytes.
const XLOG_DATA_HEADER_LEN: usize = 1 + 8 + 8 + 8;
/// Length of a whole primary keepalive payload: `'k'` + 8 + 8 + 1 bytes.
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;

/// One server → client message of the replication stream (the body of one CopyData message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `'w'`: a chunk of WAL; for logical replication, one output-plugin message.
    XLogData {
        /// Where in the WAL the data starts (for pgoutput, 0/0 for some messages).
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock when sending, microseconds since 2000-01-01 UTC.
        server_time_micros: i64,
        /// The payload: a zero-copy slice of the CopyData body.
        data: Bytes,
    },
    /// `'k'`: a keepalive; when `reply_requested` the client must send a status update soon, or
    /// the server drops the connection after `wal_sender_timeout`.
    PrimaryKeepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock when sending, microseconds since 2000-01-01 UTC.
        server_time_micros: i64,
        /// The server asks for an immediate reply (any non-zero byte is taken as "yes").
        reply_requested: bool,
    },
}

/// Why a CopyData payload is not a valid replication message. Offsets are from the start of the
/// payload (the tag byte is offset 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The payload has no bytes at all, so not even a tag.
    #[error("empty CopyData payload: no replication message tag at offset 0")]
    Empty,
    /// The tag is neither `'w'` nor `'k'`.
    #[error("unknown replication message tag {tag:#04x} at offset 0 (expected 'w' or 'k')")]
    UnknownTag {
        /// The byte found.
        tag: u8,
    },
    /// The payload ends before a fixed-size field.
    #[error(
        "truncated {message}: field `{field}` at offset {offset} needs {needed} bytes, \
         only {available} remain"
    )]
    Truncated {
        /// "XLogData" or "PrimaryKeepalive".
        message: &'static str,
        /// The first field that does not fit.
        field: &'static str,
        /// Where that field starts.
        offset: usize,
        /// Its size.
        needed: usize,
        /// Bytes left from `offset` to the end of the payload.
        available: usize,
    },
    /// A fixed-size message has bytes after its last field.
    #[error("{message}: {count} unexpected trailing bytes at offset {offset}")]
    TrailingBytes {
        /// "PrimaryKeepalive".
        message: &'static str,
        /// Where the unexpected bytes start.
        offset: usize,
        /// How many there are.
        count: usize,
    },
}

/// Reads fixed-size big-endian fields of one payload, turning a short read into
/// [`WireError::Truncated`].
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Fields<'a> {
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let available = self.buf.len().saturating_sub(self.pos);
        let truncated = || WireError::Truncated {
            message: self.message,
            field,
            offset: self.pos,
            needed: N,
            available,
        };
        let end = self.pos.checked_add(N).ok_or_else(truncated)?;
        let bytes = self.buf.get(self.pos..end).ok_or_else(truncated)?;
        let array = <[u8; N]>::try_from(bytes).map_err(|_| truncated())?;
        self.pos = end;
        Ok(array)
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, WireError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, WireError> {
        self.array(field).map(i64::from_be_bytes)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        self.array::<1>(field).map(|[b]| b)
    }
}

/// Parses the body of one CopyData message received from the server during replication.
///
/// XLogData's `data` is `payload.slice(25..)` (no copy). Trailing bytes after a keepalive are
/// rejected; XLogData has none by construction (everything after the header is data).
pub fn parse_copy_data(payload: Bytes) -> Result<ReplicationMessage, WireError> {
    let tag = *payload.first().ok_or(WireError::Empty)?;
    match tag {
        b'w' => {
            let mut f = Fields {
                buf: &payload,
                pos: 1,
                message: "XLogData",
            };
            let wal_start = f.lsn("walStart")?;
            let wal_end = f.lsn("walEnd")?;
            let server_time_micros = f.i64("sendTime")?;
            debug_assert_eq!(f.pos, XLOG_DATA_HEADER_LEN);
            // The header was read completely, so the payload is at least that long.
            let data = payload.slice(XLOG_DATA_HEADER_LEN..);
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time_micros,
                data,
            })
        }
        b'k' => {
            let mut f = Fields {
                buf: &payload,
                pos: 1,
                message: "PrimaryKeepalive",
            };
            let wal_end = f.lsn("walEnd")?;
            let server_time_micros = f.i64("sendTime")?;
            let reply_requested = f.u8("replyRequested")? != 0;
            if payload.len() > KEEPALIVE_LEN {
                return Err(WireError::TrailingBytes {
                    message: "PrimaryKeepalive",
                    offset: KEEPALIVE_LEN,
                    count: payload.len().saturating_sub(KEEPALIVE_LEN),
                });
            }
            Ok(ReplicationMessage::PrimaryKeepalive {
                wal_end,
                server_time_micros,
                reply_requested,
            })
        }
        tag => Err(WireError::UnknownTag { tag }),
    }
}

/// The client's `'r'` message: how far it has written, flushed and applied the stream.
///
/// For logical replication PostgreSQL uses `flush` as the slot's confirmed position: WAL before
/// it may be recycled and the stream restarts there after a reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    /// Last WAL byte + 1 received and written.
    pub write: Lsn,
    /// Last WAL byte + 1 durably processed: the position to confirm.
    pub flush: Lsn,
    /// Last WAL byte + 1 applied.
    pub apply: Lsn,
    /// Client clock, microseconds since 2000-01-01 UTC (see [`micros_since_pg_epoch`]).
    pub client_time_micros: i64,
    /// Ask the server to reply immediately (with a keepalive).
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// Encoded length of the CopyData payload, including the `'r'` tag.
    pub const ENCODED_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

    /// Appends the CopyData payload (34 bytes, big-endian, starting with `'r'`) to `out`. The
    /// CopyData framing itself (`'d'` + length) is the caller's business.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(Self::ENCODED_LEN);
        out.put_u8(b'r');
        out.put_u64(self.write.0);
        out.put_u64(self.flush.0);
        out.put_u64(self.apply.0);
        out.put_i64(self.client_time_micros);
        out.put_u8(u8::from(self.reply_requested));
    }
}

/// `t` as microseconds since 2000-01-01 00:00:00 UTC, the unit of replication timestamps.
/// Saturates at `i64::MIN`/`i64::MAX` for times hundreds of thousands of years away.
pub fn micros_since_pg_epoch(t: SystemTime) -> i64 {
    let since_unix: i128 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_micros()).unwrap_or(i128::MAX),
        Err(before) => i128::try_from(before.duration().as_micros()).map_or(i128::MIN, |m| -m),
    };
    let pg_epoch_offset = i128::from(PG_EPOCH_UNIX_SECS) * 1_000_000;
    let micros = since_unix.saturating_sub(pg_epoch_offset);
    i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX })
}

/// The instant `micros` microseconds after 2000-01-01 00:00:00 UTC (before it, if negative).
///
/// `None` for PostgreSQL's special values `-infinity`/`infinity` (`i64::MIN`/`i64::MAX`) and for
/// instants the platform's `SystemTime` cannot represent.
pub fn pg_micros_to_system_time(micros: i64) -> Option<SystemTime> {
    if micros == i64::MIN || micros == i64::MAX {
        return None;
    }
    let pg_epoch = UNIX_EPOCH.checked_add(Duration::from_secs(PG_EPOCH_UNIX_SECS))?;
    let offset = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        pg_epoch.checked_add(offset)
    } else {
        pg_epoch.checked_sub(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn xlog(wal_start: u64, wal_end: u64, time: i64, data: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(wal_start);
        b.put_u64(wal_end);
        b.put_i64(time);
        b.put_slice(data);
        b.freeze()
    }

    fn keepalive(wal_end: u64, time: i64, reply: u8) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(wal_end);
        b.put_i64(time);
        b.put_u8(reply);
        b.freeze()
    }

    #[test]
    fn parses_xlog_data_zero_copy() {
        let payload = xlog(0x16_B374_D848, 0x16_B374_D900, 746_000_000_123_456, b"B\x00\x01");
        let msg = parse_copy_data(payload.clone()).unwrap();
        let ReplicationMessage::XLogData {
            wal_start,
            wal_end,
            server_time_micros,
            data,
        } = msg
        else {
            panic!("not XLogData: {msg:?}");
        };
        assert_eq!(wal_start, Lsn(0x16_B374_D848));
        assert_eq!(wal_end, Lsn(0x16_B374_D900));
        assert_eq!(server_time_micros, 746_000_000_123_456);
        assert_eq!(&data[..], b"B\x00\x01");
        // Same memory as the input: a slice, not a copy.
        assert_eq!(data.as_ptr(), payload[XLOG_DATA_HEADER_LEN..].as_ptr());
    }

    #[test]
    fn parses_xlog_data_with_empty_data() {
        let msg = parse_copy_data(xlog(1, 2, -3, b"")).unwrap();
        assert_eq!(
            msg,
            ReplicationMessage::XLogData {
                wal_start: Lsn(1),
                wal_end: Lsn(2),
                server_time_micros: -3,
                data: Bytes::new()
            }
        );
    }

    #[test]
    fn parses_keepalive() {
        for (byte, expected) in [(0u8, false), (1, true), (7, true)] {
            let msg = parse_copy_data(keepalive(u64::MAX, i64::MIN, byte)).unwrap();
            assert_eq!(
                msg,
                ReplicationMessage::PrimaryKeepalive {
                    wal_end: Lsn(u64::MAX),
                    server_time_micros: i64::MIN,
                    reply_requested: expected
                }
            );
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for full in [xlog(1, 2, 3, b""), keepalive(1, 2, 1)] {
            for len in 0..full.len() {
                let err = parse_copy_data(full.slice(..len)).unwrap_err();
                if len == 0 {
                    assert_eq!(err, WireError::Empty);
                } else {
                    assert!(matches!(err, WireError::Truncated { .. }), "{len}: {err:?}");
                }
            }
        }
    }

    #[test]
    fn truncation_error_names_field_and_offset() {
        let err = parse_copy_data(keepalive(1, 2, 1).slice(..12)).unwrap_err();
        assert_eq!(
            err,
            WireError::Truncated {
                message: "PrimaryKeepalive",
                field: "sendTime",
                offset: 9,
                needed: 8,
                available: 3
            }
        );
        assert_eq!(
            err.to_string(),
            "truncated PrimaryKeepalive: field `sendTime` at offset 9 needs 8 bytes, only 3 remain"
        );
    }

    #[test]
    fn rejects_trailing_bytes_after_keepalive() {
        let mut b = BytesMut::from(&keepalive(1, 2, 0)[..]);
        b.put_slice(b"xy");
        assert_eq!(
            parse_copy_data(b.freeze()).unwrap_err(),
            WireError::TrailingBytes {
                message: "PrimaryKeepalive",
                offset: 18,
                count: 2
            }
        );
    }

    #[test]
    fn rejects_unknown_tags() {
        for tag in [b'r', b'd', b'W', 0, 0xff] {
            assert_eq!(
                parse_copy_data(Bytes::from(vec![tag; 40])).unwrap_err(),
                WireError::UnknownTag { tag }
            );
        }
    }

    #[test]
    fn encodes_standby_status_update() {
        let update = StandbyStatusUpdate {
            write: Lsn(0x0102_0304_0506_0708),
            flush: Lsn(0x1112_1314_1516_1718),
            apply: Lsn(0x2122_2324_2526_2728),
            client_time_micros: -2,
            reply_requested: true,
        };
        let mut out = BytesMut::from(&b"prefix"[..]);
        update.encode(&mut out);
        let mut expected = b"prefixr".to_vec();
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        expected.extend_from_slice(&[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
        expected.extend_from_slice(&[0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28]);
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
        expected.push(1);
        assert_eq!(&out[..], &expected[..]);
        assert_eq!(out.len() - 6, StandbyStatusUpdate::ENCODED_LEN);

        let mut out = BytesMut::new();
        StandbyStatusUpdate {
            reply_requested: false,
            ..update
        }
        .encode(&mut out);
        assert_eq!(out.last(), Some(&0));
    }

    #[test]
    fn pg_epoch_conversions() {
        let pg_epoch = UNIX_EPOCH + Duration::from_secs(946_684_800);
        assert_eq!(micros_since_pg_epoch(pg_epoch), 0);
        assert_eq!(micros_since_pg_epoch(UNIX_EPOCH), -946_684_800_000_000);
        assert_eq!(
            micros_since_pg_epoch(UNIX_EPOCH - Duration::from_micros(1)),
            -946_684_800_000_001
        );
        // 2024-01-01T00:00:00Z = Unix 1704067200.
        let t = UNIX_EPOCH + Duration::from_secs(1_704_067_200) + Duration::from_micros(42);
        assert_eq!(micros_since_pg_epoch(t), 757_382_400_000_042);
        assert_eq!(pg_micros_to_system_time(757_382_400_000_042), Some(t));
        assert_eq!(pg_micros_to_system_time(0), Some(pg_epoch));
        assert_eq!(pg_micros_to_system_time(-946_684_800_000_000), Some(UNIX_EPOCH));
        assert_eq!(pg_micros_to_system_time(i64::MAX), None);
        assert_eq!(pg_micros_to_system_time(i64::MIN), None);
        // Sub-microsecond precision is truncated, not rounded.
        assert_eq!(micros_since_pg_epoch(pg_epoch + Duration::from_nanos(1_999)), 1);
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_copy_data(Bytes::from(bytes));
        }

        #[test]
        fn xlog_round_trips(s in any::<u64>(), e in any::<u64>(), t in any::<i64>(),
                            data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let msg = parse_copy_data(xlog(s, e, t, &data)).unwrap();
            prop_assert_eq!(msg, ReplicationMessage::XLogData {
                wal_start: Lsn(s), wal_end: Lsn(e), server_time_micros: t, data: Bytes::from(data)
            });
        }

        #[test]
        fn pg_time_round_trips(micros in (i64::MIN + 1)..i64::MAX) {
            if let Some(t) = pg_micros_to_system_time(micros) {
                prop_assert_eq!(micros_since_pg_epoch(t), micros);
            }
        }
    }
}
