//! The one file that owns the replication socket: a PostgreSQL connection in logical replication
//! mode (`replication=database`), built on `postgres-protocol` and tokio, because tokio-postgres
//! cannot do the CopyBoth sub-protocol that `START_REPLICATION` switches to.
//!
//! - [`ReplicationConnection::connect`]: TCP or Unix socket, TLS according to `sslmode` (never
//!   over a Unix socket, as libpq), the startup message, authentication (trust, cleartext, MD5,
//!   SCRAM-SHA-256 and SCRAM-SHA-256-PLUS with `tls-server-end-point` channel binding).
//! - [`ReplicationConnection::simple_query`] and [`ReplicationConnection::identify_system`]: the
//!   simple query protocol, for replication commands and SQL.
//! - [`ReplicationConnection::start_logical_replication`]: `START_REPLICATION … LOGICAL` with
//!   pgoutput, returning a [`LogicalReplicationStream`] of raw CopyData payloads (the `w`/`k`
//!   payloads are parsed elsewhere).
//!
//! Incoming bytes go into one read buffer; a message is only taken out of it once it is complete
//! ([`split_frame`]), so every read is cancel-safe. Outgoing messages are appended to a write buffer
//! before any `.await`, so a cancelled write is completed by the next one. Nothing here panics on
//! bytes from the network, and no password or SCRAM message ever reaches an error or a log line.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::escape::escape_identifier;
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::error::{ReplicationError, ServerError};
use crate::model::{Lsn, Secret};
use crate::postgres::config::{AuthRequest, ChannelBindingMode, PgConnectionConfig, SslMode};
use crate::postgres::hosts::{AttemptOutcome, PgHost, ServerRole, TargetSessionAttrs, TryError, try_in_order};
use crate::postgres::socket::set_keepalives;
use crate::postgres::tls;

/// Length of a backend message header: the tag byte and the big-endian `i32` length (which counts
/// itself but not the tag).
pub const HEADER_LEN: usize = 5;

/// The largest CopyData or DataRow message accepted (the length field): 64 MiB. One CopyData of
/// the stream carries one change of one row, and a DataRow one row of a query; the largest rows
/// the relay sees are Synapse's account data, whose content comes from one client request, which
/// Synapse caps at 200 × 64 KiB (12.5 MiB; more only if the media repository runs in the same
/// process, `max_upload_size`, default 50 MiB). PostgreSQL itself would allow 1 GiB
/// (`MaxAllocSize`). A longer length is a protocol error naming the message type, never an
/// allocation.
pub const MAX_ROW_MESSAGE_LEN: usize = 64 << 20;

/// The largest message of any other type (errors, notices, authentication, row descriptions,
/// parameters, command tags): 1 MiB, far above the few KiB PostgreSQL sends.
pub const MAX_OTHER_MESSAGE_LEN: usize = 1 << 20;

/// The most bytes of ParameterStatus names and values kept for one connection: 64 KiB.
/// PostgreSQL reports about fifteen parameters at startup (under 1 KiB in all) and again only
/// when one of them changes; the total is checked after each message, so repeats of a known
/// parameter replace it and do not add up.
pub const MAX_PARAMETER_BYTES: usize = 64 << 10;

/// The largest message of type `tag` that is accepted (see [`MAX_ROW_MESSAGE_LEN`]).
pub fn max_message_len(tag: u8) -> usize {
    match tag {
        COPY_DATA_TAG | DATA_ROW_TAG => MAX_ROW_MESSAGE_LEN,
        _ => MAX_OTHER_MESSAGE_LEN,
    }
}

/// Read-buffer growth per read, and the most reserved at once for a large incomplete message (it
/// grows further as the bytes actually arrive).
const READ_CHUNK: usize = 64 * 1024;
const MAX_RESERVE: usize = 4 * 1024 * 1024;

/// How long [`LogicalReplicationStream::finish`] and [`ReplicationConnection::close`] try.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);

const COPY_BOTH_RESPONSE_TAG: u8 = b'W';
const COPY_DATA_TAG: u8 = b'd';
const COPY_DONE_TAG: u8 = b'c';
const DATA_ROW_TAG: u8 = b'D';

/// A complete backend message taken out of the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    /// The message type byte.
    pub tag: u8,
    /// The whole message, header included.
    pub bytes: BytesMut,
}

impl Frame {
    /// The message body (after the 5-byte header).
    pub fn body(&self) -> &[u8] {
        self.bytes.get(HEADER_LEN..).unwrap_or_default()
    }

    /// The message body, without copying.
    pub fn into_body(mut self) -> Bytes {
        if self.bytes.len() < HEADER_LEN {
            return Bytes::new();
        }
        self.bytes.split_off(HEADER_LEN).freeze()
    }
}

/// A message header that cannot be valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message type {tag:#04x} declares length {len}, less than the 4 bytes of the length itself")]
    LengthTooShort { tag: u8, len: u32 },
    #[error("a {} message declares length {len}, more than the {limit}-byte limit for that type", tag_name(*tag))]
    LengthTooLong { tag: u8, len: u32, limit: usize },
}

fn peek_header(buf: &[u8]) -> Result<Option<(u8, usize)>, FrameError> {
    let Some(&[tag, a, b, c, d]) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]);
    if len < 4 {
        return Err(FrameError::LengthTooShort { tag, len });
    }
    let limit = max_message_len(tag);
    let len_usize = usize::try_from(len).map_err(|_| FrameError::LengthTooLong { tag, len, limit })?;
    if len_usize > limit {
        return Err(FrameError::LengthTooLong { tag, len, limit });
    }
    Ok(Some((tag, len_usize + 1)))
}

/// Takes the first complete message out of `buf`, or returns `Ok(None)` (leaving `buf` untouched)
/// when it does not hold one yet. The header is checked before the body is waited for.
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    match peek_header(buf)? {
        Some((tag, total)) if buf.len() >= total => Ok(Some(Frame {
            tag,
            bytes: buf.split_to(total),
        })),
        _ => Ok(None),
    }
}

/// How many more bytes `buf` needs before [`split_frame`] can return a message (at least 1 when it
/// cannot yet; 0 when it can, or when the header is invalid).
pub fn frame_bytes_missing(buf: &[u8]) -> usize {
    match peek_header(buf) {
        Ok(Some((_, total))) => total.saturating_sub(buf.len()),
        Ok(None) => HEADER_LEN - buf.len(),
        Err(_) => 0,
    }
}

/// A decoded backend message. `postgres_protocol`'s parser does not know CopyBothResponse, so the
/// copy messages are handled here.
enum Backend {
    CopyBothResponse,
    CopyData(Bytes),
    CopyDone,
    Message(Message),
}

fn decode(frame: Frame) -> Result<Backend, String> {
    match frame.tag {
        COPY_BOTH_RESPONSE_TAG => {
            check_copy_both_response(frame.body())?;
            Ok(Backend::CopyBothResponse)
        }
        COPY_DATA_TAG => Ok(Backend::CopyData(frame.into_body())),
        COPY_DONE_TAG if frame.body().is_empty() => Ok(Backend::CopyDone),
        COPY_DONE_TAG => Err("CopyDone message with a body".to_owned()),
        tag => {
            let mut bytes = frame.bytes;
            match Message::parse(&mut bytes) {
                Ok(Some(message)) => Ok(Backend::Message(message)),
                Ok(None) => Err(format!("incomplete message of type {}", tag_name(tag))),
                Err(e) => Err(format!("invalid message of type {}: {e}", tag_name(tag))),
            }
        }
    }
}

/// A backend message as the connection understands it, without the socket (for tests and the
/// fuzz targets): [`parse_backend`] does what the connection does with each message type.
#[derive(Debug)]
pub enum ParsedBackend {
    CopyBothResponse,
    CopyData(Bytes),
    CopyDone,
    Error(ServerError),
    Notice(ServerError),
    Parameter {
        name: String,
        value: String,
    },
    /// A DataRow's values, as text (`None`: NULL).
    Row(Vec<Option<String>>),
    /// AuthenticationSASL: the mechanisms the server offers.
    SaslMechanisms(Vec<String>),
    /// Any other message that parses, by type byte.
    Other(u8),
}

/// Parses one complete message (from [`split_frame`]) the way the connection does. Pure.
pub fn parse_backend(frame: Frame) -> Result<ParsedBackend, String> {
    let tag = frame.tag;
    let message = match decode(frame)? {
        Backend::CopyBothResponse => return Ok(ParsedBackend::CopyBothResponse),
        Backend::CopyData(payload) => return Ok(ParsedBackend::CopyData(payload)),
        Backend::CopyDone => return Ok(ParsedBackend::CopyDone),
        Backend::Message(m) => m,
    };
    Ok(match message {
        Message::ErrorResponse(body) => {
            ParsedBackend::Error(parse_fields(body.fields(), "").map_err(|e| format!("malformed ErrorResponse: {e}"))?)
        }
        Message::NoticeResponse(body) => ParsedBackend::Notice(
            parse_fields(body.fields(), "").map_err(|e| format!("malformed NoticeResponse: {e}"))?,
        ),
        Message::ParameterStatus(body) => match (body.name(), body.value()) {
            (Ok(name), Ok(value)) => ParsedBackend::Parameter {
                name: name.to_owned(),
                value: value.to_owned(),
            },
            _ => return Err("ParameterStatus that is not UTF-8".to_owned()),
        },
        Message::DataRow(body) => ParsedBackend::Row(data_row_values(&body)?),
        Message::AuthenticationSasl(body) => ParsedBackend::SaslMechanisms(
            body.mechanisms()
                .map(|m| Ok(m.to_owned()))
                .collect()
                .map_err(|e| format!("malformed AuthenticationSASL: {e}"))?,
        ),
        _ => ParsedBackend::Other(tag),
    })
}

/// A DataRow's values as text (`None`: NULL); errors describe the problem, never the values.
fn data_row_values(row: &postgres_protocol::message::backend::DataRowBody) -> Result<Vec<Option<String>>, String> {
    let buffer = row.buffer();
    let malformed = |e: String| format!("malformed DataRow: {e}");
    row.ranges()
        .map_err(|e| malformed(e.to_string()))
        .map(|range| match range {
            None => Ok(None),
            Some(range) => {
                let bytes = buffer
                    .get(range)
                    .ok_or_else(|| malformed("value out of bounds".to_owned()))?;
                let text = std::str::from_utf8(bytes).map_err(|e| malformed(format!("value is not UTF-8: {e}")))?;
                Ok(Some(text.to_owned()))
            }
        })
        .collect()
}

/// CopyBothResponse: format (i8), column count (i16), one i16 format per column.
fn check_copy_both_response(body: &[u8]) -> Result<(), String> {
    match body {
        [_format, n1, n2, columns @ ..] if columns.len() == 2 * usize::from(u16::from_be_bytes([*n1, *n2])) => Ok(()),
        _ => Err(format!("malformed CopyBothResponse ({} bytes)", body.len())),
    }
}

fn tag_name(tag: u8) -> String {
    let name = match tag {
        b'R' => "Authentication",
        b'K' => "BackendKeyData",
        b'2' => "BindComplete",
        b'3' => "CloseComplete",
        b'C' => "CommandComplete",
        b'd' => "CopyData",
        b'c' => "CopyDone",
        b'G' => "CopyInResponse",
        b'H' => "CopyOutResponse",
        b'W' => "CopyBothResponse",
        b'D' => "DataRow",
        b'I' => "EmptyQueryResponse",
        b'E' => "ErrorResponse",
        b'v' => "NegotiateProtocolVersion",
        b'n' => "NoData",
        b'N' => "NoticeResponse",
        b'A' => "NotificationResponse",
        b't' => "ParameterDescription",
        b'S' => "ParameterStatus",
        b'1' => "ParseComplete",
        b's' => "PortalSuspended",
        b'Z' => "ReadyForQuery",
        b'T' => "RowDescription",
        _ => return format!("{tag:#04x}"),
    };
    format!("{name} ('{}')", char::from(tag))
}

/// The severity, SQLSTATE, message, detail and hint of an ErrorResponse or NoticeResponse.
fn parse_fields(mut fields: ErrorFields<'_>, target: &str) -> io::Result<ServerError> {
    let mut e = ServerError {
        target: target.to_owned(),
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    let mut localized_severity = String::new();
    while let Some(field) = fields.next()? {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'V' => e.severity = value,
            b'S' => localized_severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            _ => {}
        }
    }
    if e.severity.is_empty() {
        e.severity = localized_severity;
    }
    Ok(e)
}

/// The `START_REPLICATION` command for a logical slot with pgoutput protocol version 1, with
/// logical decoding messages (`pg_logical_emit_message`, PostgreSQL 14+) included.
///
/// The slot is a quoted identifier. Each publication name is quoted as an identifier (pgoutput
/// splits `publication_names` as a comma-separated list of identifiers) and that list is then
/// quoted as a literal of the replication command grammar, which only knows `'…'` with doubled
/// quotes (no `E'…'` strings, so backslashes stay as they are).
pub fn start_replication_command(slot: &str, start: Lsn, publications: &[&str]) -> String {
    let list = publications
        .iter()
        .map(|p| escape_identifier(p))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', publication_names {}, messages 'true')",
        escape_identifier(slot),
        replication_literal(&list),
    )
}

/// A string constant of the replication command grammar (`repl_scanner.l`): `'…'`, quotes doubled.
fn replication_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// How the client authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// The server asked for nothing (pg_hba `trust`, `peer`, …).
    Trust,
    /// pg_hba `password`.
    Cleartext,
    /// pg_hba `md5` with an MD5-hashed password.
    Md5,
    /// SCRAM-SHA-256 without channel binding.
    ScramSha256,
    /// SCRAM-SHA-256-PLUS: channel binding to the TLS connection (`tls-server-end-point`).
    ScramSha256Plus,
}

impl AuthMethod {
    /// The method's name as PostgreSQL spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Trust => "trust",
            AuthMethod::Cleartext => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => sasl::SCRAM_SHA_256,
            AuthMethod::ScramSha256Plus => sasl::SCRAM_SHA_256_PLUS,
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The GS2 channel-binding flag sent with SCRAM-SHA-256 (RFC 5802 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gs2ChannelBinding {
    /// `n`: the client does not do channel binding (no TLS, or no usable certificate hash).
    NotSupported,
    /// `y`: the client could, but the server did not offer SCRAM-SHA-256-PLUS.
    ServerDidNotOffer,
}

/// The SASL mechanism chosen from what the server offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SaslChoice {
    /// SCRAM-SHA-256-PLUS with this `tls-server-end-point` binding data.
    ScramSha256Plus(Vec<u8>),
    /// SCRAM-SHA-256.
    ScramSha256(Gs2ChannelBinding),
}

/// Picks the SASL mechanism: SCRAM-SHA-256-PLUS when offered and the connection is TLS with a
/// usable certificate hash (`end_point`), otherwise SCRAM-SHA-256 with the right GS2 flag (never `y`
/// when the server offered -PLUS: the server would take it as a downgrade attack). `None` when
/// nothing usable is offered.
pub fn choose_sasl_mechanism(offered: &[&str], end_point: Option<&[u8]>) -> Option<SaslChoice> {
    let plus_offered = offered.contains(&sasl::SCRAM_SHA_256_PLUS);
    if let (true, Some(hash)) = (plus_offered, end_point) {
        return Some(SaslChoice::ScramSha256Plus(hash.to_vec()));
    }
    if !offered.contains(&sasl::SCRAM_SHA_256) {
        return None;
    }
    let flag = if end_point.is_some() && !plus_offered {
        Gs2ChannelBinding::ServerDidNotOffer
    } else {
        Gs2ChannelBinding::NotSupported
    };
    Some(SaslChoice::ScramSha256(flag))
}

/// What `IDENTIFY_SYSTEM` returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier (a 64-bit number, as text).
    pub system_id: String,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database connected to (`None` on a physical replication connection).
    pub dbname: Option<String>,
}

/// The socket: TCP, TLS over TCP, or a Unix socket.
enum PgStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl AsyncRead for PgStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s).poll_flush(cx),
            PgStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The socket with its buffers: the part shared by the connection and the stream.
struct PgIo {
    stream: PgStream,
    read_buf: BytesMut,
    write_buf: BytesMut,
    target: String,
    parameters: ServerParameters,
}

impl PgIo {
    fn new(stream: PgStream, target: String) -> Self {
        PgIo {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::with_capacity(1024),
            target,
            parameters: ServerParameters::default(),
        }
    }

    fn io_error(&self, action: &'static str, source: io::Error) -> ReplicationError {
        ReplicationError::Io {
            action,
            target: self.target.clone(),
            source,
        }
    }

    fn protocol_error(&self, action: &'static str, problem: impl Into<String>) -> ReplicationError {
        ReplicationError::Protocol {
            target: self.target.clone(),
            action,
            problem: problem.into(),
        }
    }

    fn unexpected(&self, action: &'static str, tag: u8) -> ReplicationError {
        self.protocol_error(action, format!("unexpected message {}", tag_name(tag)))
    }

    fn server_error(&self, action: &'static str, fields: ErrorFields<'_>) -> ReplicationError {
        match parse_fields(fields, &self.target) {
            Ok(e) => ReplicationError::Server(Box::new(e)),
            Err(e) => self.protocol_error(action, format!("malformed ErrorResponse: {e}")),
        }
    }

    /// Appends a message built by `build` to the write buffer (whole or not at all).
    fn queue(
        &mut self,
        action: &'static str,
        build: impl FnOnce(&mut BytesMut) -> io::Result<()>,
    ) -> Result<(), ReplicationError> {
        let mut message = BytesMut::new();
        build(&mut message).map_err(|e| self.io_error(action, e))?;
        self.write_buf.extend_from_slice(&message);
        Ok(())
    }

    /// Writes out the whole write buffer and flushes. Cancel-safe: what was not written stays in
    /// the buffer for the next call.
    async fn flush(&mut self, action: &'static str) -> Result<(), ReplicationError> {
        while self.write_buf.has_remaining() {
            match self.stream.write_buf(&mut self.write_buf).await {
                Ok(0) => return Err(self.io_error(action, io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) => return Err(self.io_error(action, e)),
            }
        }
        self.stream.flush().await.map_err(|e| self.io_error(action, e))
    }

    /// The next complete message. Cancel-safe.
    async fn read_frame(&mut self, action: &'static str) -> Result<Frame, ReplicationError> {
        loop {
            match split_frame(&mut self.read_buf) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => return Err(self.protocol_error(action, e.to_string())),
            }
            let missing = frame_bytes_missing(&self.read_buf);
            self.read_buf.reserve(missing.clamp(READ_CHUNK, MAX_RESERVE));
            match self.stream.read_buf(&mut self.read_buf).await {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection");
                    return Err(self.io_error(action, e));
                }
                Ok(_) => {}
                Err(e) => return Err(self.io_error(action, e)),
            }
        }
    }

    /// The next message that is not a NoticeResponse or ParameterStatus (those are logged or
    /// recorded here). Cancel-safe.
    async fn read_backend(&mut self, action: &'static str) -> Result<(u8, Backend), ReplicationError> {
        loop {
            let frame = self.read_frame(action).await?;
            let tag = frame.tag;
            match decode(frame).map_err(|problem| self.protocol_error(action, problem))? {
                Backend::Message(Message::NoticeResponse(body)) => self.log_notice(body.fields()),
                Backend::Message(Message::ParameterStatus(body)) => {
                    let (Ok(name), Ok(value)) = (body.name(), body.value()) else {
                        return Err(self.protocol_error(action, "ParameterStatus that is not UTF-8"));
                    };
                    tracing::debug!(server = %self.target, parameter = name, value, "server parameter");
                    self.parameters
                        .record(name, value)
                        .map_err(|problem| self.protocol_error(action, problem))?;
                }
                other => return Ok((tag, other)),
            }
        }
    }

    fn log_notice(&self, fields: ErrorFields<'_>) {
        let notice = match parse_fields(fields, &self.target) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(server = %self.target, error = %e, "malformed NoticeResponse ignored");
                return;
            }
        };
        let ServerError {
            target: server,
            severity,
            code,
            message,
            detail,
            hint,
        } = &notice;
        let detail = detail.as_deref().unwrap_or_default();
        let hint = hint.as_deref().unwrap_or_default();
        if matches!(severity.as_str(), "WARNING" | "NOTICE") {
            tracing::info!(%server, %severity, %code, %detail, %hint, "PostgreSQL: {message}");
        } else {
            tracing::debug!(%server, %severity, %code, %detail, %hint, "PostgreSQL: {message}");
        }
    }

    /// Writes Terminate (after whatever `extra` queues) and closes, best effort and time-bounded.
    async fn goodbye(mut self, extra: impl FnOnce(&mut BytesMut)) {
        extra(&mut self.write_buf);
        frontend::terminate(&mut self.write_buf);
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            let _ = self.flush("closing the connection").await;
            let _ = self.stream.shutdown().await;
            // Read until the server closes: closing a socket with unread data in it sends a
            // reset, which can make the server drop what it has not read yet (such as the last
            // standby status update, before it records the confirmed position).
            let mut sink = [0u8; 8192];
            while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// A connection in logical replication mode, before `START_REPLICATION`.
pub struct ReplicationConnection {
    io: PgIo,
    auth_method: AuthMethod,
    tls: bool,
    backend_key: Option<(i32, i32)>,
}

impl fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("target", &self.io.target)
            .field("tls", &self.tls)
            .field("auth_method", &self.auth_method)
            .field("backend_pid", &self.backend_pid())
            .finish_non_exhaustive()
    }
}

impl ReplicationConnection {
    /// Connects, sets up TLS as `cfg.ssl_mode` says, authenticates and waits for the server to be
    /// ready. Each host of `cfg` is tried in order (libpq's `host=pg1,pg2`), each attempt bounded
    /// by `cfg.connect_timeout` (zero: no bound, as libpq), until one is the server
    /// `cfg.target_session_attrs` wants (the primary); when none is, the error names every host
    /// tried and why it was refused ([`ReplicationError::NoHostAccepted`]). With one host, a
    /// failure to connect is that host's own error.
    pub async fn connect(cfg: &PgConnectionConfig) -> Result<ReplicationConnection, ReplicationError> {
        let endpoints = cfg.endpoints();
        let wanted = cfg.target_session_attrs;
        let result = try_in_order(
            &endpoints,
            wanted,
            |i| {
                let one = cfg.at(&endpoints[i]);
                async move {
                    let mut conn = match Self::connect_one(&one).await {
                        Ok(c) => c,
                        Err(e) => {
                            let outcome = attempt_outcome(&e);
                            return Err((e, outcome));
                        }
                    };
                    if wanted == TargetSessionAttrs::Any {
                        return Ok((conn, ServerRole::default()));
                    }
                    // Bounded like the connection (an older server is asked with a query).
                    let role = if one.connect_timeout.is_zero() {
                        conn.server_role().await
                    } else {
                        tokio::time::timeout(one.connect_timeout, conn.server_role())
                            .await
                            .unwrap_or_else(|_| {
                                Err(ReplicationError::Timeout {
                                    action: "asking whether the server is a standby",
                                    target: one.describe(),
                                    after: one.connect_timeout,
                                })
                            })
                    };
                    match role {
                        Ok(role) => Ok((conn, role)),
                        Err(e) => {
                            let outcome = attempt_outcome(&e);
                            Err((e, outcome))
                        }
                    }
                }
            },
            |conn: ReplicationConnection| conn.close(),
        )
        .await;
        match result {
            Ok(found) => {
                if found.index > 0 {
                    tracing::info!(server = %found.conn.target(), skipped = %found.skipped.reasons(), "replication connection: earlier hosts of the list were refused");
                }
                Ok(found.conn)
            }
            Err(TryError::Single(e)) => Err(e),
            Err(TryError::All(all)) => Err(ReplicationError::NoHostAccepted {
                target: cfg.describe(),
                hosts: all,
            }),
        }
    }

    /// Whether the server is a standby and read-only by default: from what it reported at
    /// connection start (PostgreSQL 14+), else asked.
    pub async fn server_role(&mut self) -> Result<ServerRole, ReplicationError> {
        if let Some(role) = ServerRole::from_parameters(
            self.parameter("in_hot_standby"),
            self.parameter("default_transaction_read_only"),
        ) {
            return Ok(role);
        }
        let rows = self
            .simple_query(
                "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('default_transaction_read_only')",
            )
            .await?;
        let cell = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i).cloned().flatten())
                .and_then(|v| crate::postgres::hosts::parse_bool(&v))
        };
        match (cell(0), cell(1)) {
            (Some(in_recovery), Some(default_read_only)) => Ok(ServerRole {
                in_recovery,
                default_read_only,
            }),
            _ => Err(self
                .io
                .protocol_error("asking whether the server is a standby", "unreadable answer")),
        }
    }

    /// Connects to `cfg`'s first host only (see [`ReplicationConnection::connect`]).
    async fn connect_one(cfg: &PgConnectionConfig) -> Result<ReplicationConnection, ReplicationError> {
        let target = cfg.describe();
        if cfg.connect_timeout.is_zero() {
            return Self::connect_unbounded(cfg, target).await;
        }
        match tokio::time::timeout(cfg.connect_timeout, Self::connect_unbounded(cfg, target.clone())).await {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::Timeout {
                action: "connecting",
                target,
                after: cfg.connect_timeout,
            }),
        }
    }

    async fn connect_unbounded(cfg: &PgConnectionConfig, target: String) -> Result<Self, ReplicationError> {
        let (stream, end_point) = open_stream(cfg, &target).await?;
        let tls = matches!(stream, PgStream::Tls(_));
        let mut io = PgIo::new(stream, target);
        let mut parameters = vec![
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("replication", "database"),
            ("application_name", cfg.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        if let Some(options) = cfg.options.as_deref() {
            parameters.push(("options", options));
        }
        io.queue("sending the startup message", |buf| {
            frontend::startup_message(parameters, buf)
        })?;
        io.flush("sending the startup message").await?;
        let auth_method = authenticate(&mut io, cfg, end_point.as_deref()).await?;

        let action = "waiting for the server to be ready";
        let mut backend_key = None;
        loop {
            match io.read_backend(action).await? {
                (_, Backend::Message(Message::BackendKeyData(key))) => {
                    backend_key = Some((key.process_id(), key.secret_key()));
                }
                (_, Backend::Message(Message::ReadyForQuery(_))) => break,
                (_, Backend::Message(Message::ErrorResponse(body))) => {
                    return Err(io.server_error(action, body.fields()));
                }
                (tag, _) => return Err(io.unexpected(action, tag)),
            }
        }
        tracing::debug!(server = %io.target, tls, auth = %auth_method, "replication connection ready");
        Ok(ReplicationConnection {
            io,
            auth_method,
            tls,
            backend_key,
        })
    }

    /// How the connection authenticated (e.g. to check that SCRAM-SHA-256-PLUS was used).
    pub fn auth_method_used(&self) -> AuthMethod {
        self.auth_method
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The server process id (from BackendKeyData).
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_key.map(|(pid, _)| pid)
    }

    /// A run-time parameter the server reported (ParameterStatus), e.g. `server_version`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.io.parameters.get(name)
    }

    /// Where this connection goes (`PgConnectionConfig::describe()`).
    pub fn target(&self) -> &str {
        &self.io.target
    }

    /// Runs `query` with the simple query protocol and returns the rows of all its results, as
    /// text (`None` for NULL). Usable for replication commands (`IDENTIFY_SYSTEM`,
    /// `CREATE_REPLICATION_SLOT`, `SHOW`, …) and, on a `replication=database` connection, SQL. A
    /// server error is returned after the server is ready again, so the connection stays usable.
    pub async fn simple_query(&mut self, query: &str) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        let action = "running a query";
        self.io.queue(action, |buf| frontend::query(query, buf))?;
        self.io.flush(action).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.io.read_backend(action).await? {
                (_, Backend::Message(Message::DataRow(row))) => {
                    if error.is_none() {
                        rows.push(self.decode_row(action, &row)?);
                    }
                }
                (
                    _,
                    Backend::Message(
                        Message::RowDescription(_) | Message::CommandComplete(_) | Message::EmptyQueryResponse,
                    ),
                ) => {}
                (_, Backend::Message(Message::ErrorResponse(body))) => {
                    error = Some(self.io.server_error(action, body.fields()));
                }
                (_, Backend::Message(Message::ReadyForQuery(_))) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                (tag, _) => return Err(self.io.unexpected(action, tag)),
            }
        }
    }

    fn decode_row(
        &self,
        action: &'static str,
        row: &postgres_protocol::message::backend::DataRowBody,
    ) -> Result<Vec<Option<String>>, ReplicationError> {
        data_row_values(row).map_err(|problem| self.io.protocol_error(action, problem))
    }

    /// `IDENTIFY_SYSTEM`: the system identifier, timeline, current WAL position and database.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        parse_identify_system(&rows).map_err(|problem| self.io.protocol_error("identifying the system", problem))
    }

    /// Starts streaming changes from the logical slot `slot` with pgoutput (protocol version 1,
    /// publication `publication`) from `start` (`Lsn::ZERO`: from the slot's confirmed position).
    /// Errors such as a missing or busy slot are [`ReplicationError::Server`] errors (see
    /// `is_slot_missing`, `is_slot_in_use`, `is_slot_invalidated`).
    pub async fn start_logical_replication(
        self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<LogicalReplicationStream, ReplicationError> {
        self.start_logical_replication_of(slot, start, &[publication]).await
    }

    /// As [`ReplicationConnection::start_logical_replication`], for several publications.
    pub async fn start_logical_replication_of(
        mut self,
        slot: &str,
        start: Lsn,
        publications: &[&str],
    ) -> Result<LogicalReplicationStream, ReplicationError> {
        let action = "starting replication";
        let command = start_replication_command(slot, start, publications);
        tracing::debug!(server = %self.io.target, %command, "starting replication");
        self.io.queue(action, |buf| frontend::query(&command, buf))?;
        self.io.flush(action).await?;
        match self.io.read_backend(action).await? {
            (_, Backend::CopyBothResponse) => Ok(LogicalReplicationStream {
                io: self.io,
                copy_done_received: false,
            }),
            (_, Backend::Message(Message::ErrorResponse(body))) => Err(self.io.server_error(action, body.fields())),
            (tag, _) => Err(self.io.unexpected(action, tag)),
        }
    }

    /// Sends Terminate and closes the socket, best effort.
    pub async fn close(self) {
        self.io.goodbye(|_| {}).await;
    }
}

/// The run-time parameters the server reported (ParameterStatus), at most
/// [`MAX_PARAMETER_BYTES`] of names and values in all.
#[derive(Debug, Default)]
pub struct ServerParameters {
    values: HashMap<String, String>,
    /// The bytes of all names and values in `values`.
    bytes: usize,
}

impl ServerParameters {
    /// Keeps a reported parameter (a repeat replaces it); refuses one that would pass the limit.
    pub fn record(&mut self, name: &str, value: &str) -> Result<(), String> {
        let replaced = self.values.get(name).map_or(0, |v| name.len() + v.len());
        let bytes = self.bytes - replaced + name.len() + value.len();
        if bytes > MAX_PARAMETER_BYTES {
            return Err(format!(
                "the server's ParameterStatus messages ({name:?} and {} others) pass the {MAX_PARAMETER_BYTES}-byte limit",
                self.values.len()
            ));
        }
        self.values.insert(name.to_owned(), value.to_owned());
        self.bytes = bytes;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// The rows of an `IDENTIFY_SYSTEM` answer as a [`SystemIdentity`]. Pure.
pub fn parse_identify_system(rows: &[Vec<Option<String>>]) -> Result<SystemIdentity, String> {
    let [row] = rows else {
        return Err(format!("IDENTIFY_SYSTEM returned {} rows, expected 1", rows.len()));
    };
    let [system_id, timeline, xlogpos, dbname] = row.as_slice() else {
        return Err(format!("IDENTIFY_SYSTEM returned {} columns, expected 4", row.len()));
    };
    let (Some(system_id), Some(timeline), Some(xlogpos)) = (system_id, timeline, xlogpos) else {
        return Err("IDENTIFY_SYSTEM returned NULL in systemid, timeline or xlogpos".to_owned());
    };
    Ok(SystemIdentity {
        system_id: system_id.clone(),
        timeline: timeline
            .parse()
            .map_err(|_| format!("IDENTIFY_SYSTEM timeline {timeline:?} is not a number"))?,
        xlogpos: xlogpos.parse().map_err(|e| format!("IDENTIFY_SYSTEM xlogpos: {e}"))?,
        dbname: dbname.clone(),
    })
}

/// How a failed attempt on one host counts in a multi-host error (see [`crate::postgres::hosts`]).
fn attempt_outcome(e: &ReplicationError) -> AttemptOutcome {
    let text = e.to_string();
    if e.is_transient() {
        AttemptOutcome::Unreachable(text)
    } else {
        AttemptOutcome::Failed(text)
    }
}

/// Opens the socket and, on TCP, negotiates TLS. Returns the stream and, under TLS, the
/// `tls-server-end-point` channel-binding data (when the certificate's hash is defined).
async fn open_stream(cfg: &PgConnectionConfig, target: &str) -> Result<(PgStream, Option<Vec<u8>>), ReplicationError> {
    let io_error = |action, source| ReplicationError::Io {
        action,
        target: target.to_owned(),
        source,
    };
    let tls_error = |reason: String| ReplicationError::Tls {
        target: target.to_owned(),
        reason,
    };
    let host = match &cfg.host {
        PgHost::UnixSocketDir(dir) => {
            // No TLS over a Unix socket, whatever the sslmode (as libpq).
            let path = dir.join(format!(".s.PGSQL.{}", cfg.port));
            let stream = UnixStream::connect(&path)
                .await
                .map_err(|e| io_error("connecting", e))?;
            return Ok((PgStream::Unix(stream), None));
        }
        PgHost::Tcp(host) => host,
    };
    let mut tcp = TcpStream::connect((host.as_str(), cfg.port))
        .await
        .map_err(|e| io_error("connecting", e))?;
    tcp.set_nodelay(true).map_err(|e| io_error("connecting", e))?;
    set_keepalives(&tcp, &cfg.keepalives).map_err(|e| io_error("connecting", e))?;
    let Some(tls_config) = tls::client_config_for(cfg).map_err(|e| tls_error(e.to_string()))? else {
        return Ok((PgStream::Tcp(tcp), None));
    };
    let server_name = tls::server_name(host, cfg.ssl_mode).map_err(|e| tls_error(e.to_string()))?;

    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request)
        .await
        .map_err(|e| io_error("requesting TLS", e))?;
    // Exactly one byte: anything the server sent after it would be unencrypted, so it must not be
    // buffered and later taken as coming from inside TLS.
    let mut reply = [0u8; 1];
    tcp.read_exact(&mut reply)
        .await
        .map_err(|e| io_error("requesting TLS", e))?;
    match reply {
        [b'S'] => {}
        [b'N'] if cfg.ssl_mode == SslMode::Prefer => {
            tracing::debug!(server = %target, "server does not support TLS; continuing without (sslmode=prefer)");
            return Ok((PgStream::Tcp(tcp), None));
        }
        [b'N'] => {
            return Err(tls_error(format!(
                "the server does not support TLS (sslmode={})",
                cfg.ssl_mode.as_str()
            )));
        }
        [other] => {
            return Err(ReplicationError::Protocol {
                target: target.to_owned(),
                action: "requesting TLS",
                problem: format!("unexpected reply {other:#04x} to SSLRequest"),
            });
        }
    }
    let stream = TlsConnector::from(tls_config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| {
            // A TLS failure (certificate rejected, no common parameters, alert) or a plain I/O one
            // (connection reset), which is worth retrying.
            if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                tls_error(format!("TLS handshake failed: {e}"))
            } else {
                io_error("in the TLS handshake", e)
            }
        })?;
    let end_point = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| tls::tls_server_end_point(cert));
    Ok((PgStream::Tls(Box::new(stream)), end_point))
}

/// Checks an authentication request of the server against `require_auth` and
/// `channel_binding`, before anything (a password) is sent in reply. `method` is what has been
/// used so far (for `AuthenticationOk`).
fn check_auth_request(cfg: &PgConnectionConfig, request: AuthRequest, method: AuthMethod) -> Result<(), String> {
    // AuthenticationOk after a password exchange is the end of that exchange, not a request.
    let request = match (request, method) {
        (AuthRequest::None, AuthMethod::Trust) => AuthRequest::None,
        (AuthRequest::None, _) => {
            return if cfg.channel_binding == ChannelBindingMode::Require && method != AuthMethod::ScramSha256Plus {
                Err("channel_binding=require, but the server authenticated the client without channel binding".into())
            } else {
                Ok(())
            };
        }
        (request, _) => request,
    };
    if !cfg.require_auth.allows(request) {
        return Err(cfg.require_auth.refusal(request));
    }
    if cfg.channel_binding == ChannelBindingMode::Require && request != AuthRequest::ScramSha256 {
        return Err(format!(
            "channel_binding=require, but the server asked for {} authentication, which has no channel binding{}",
            request.as_str(),
            if request == AuthRequest::None {
                ""
            } else {
                " (no password was sent)"
            }
        ));
    }
    Ok(())
}

/// The password for `method`, or an error saying the server asked for one and none is configured
/// (an empty password counts as none, as in libpq).
fn require_password<'a>(
    cfg: &'a PgConnectionConfig,
    target: &str,
    method: AuthMethod,
) -> Result<&'a Secret, ReplicationError> {
    cfg.password
        .as_ref()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ReplicationError::Auth {
            target: target.to_owned(),
            method: method.as_str(),
            reason: format!("the server asked for a password ({method}) but none is configured"),
        })
}

/// Runs the authentication exchange up to AuthenticationOk.
async fn authenticate(
    io: &mut PgIo,
    cfg: &PgConnectionConfig,
    end_point: Option<&[u8]>,
) -> Result<AuthMethod, ReplicationError> {
    let action = "authenticating";
    let auth_error = |io: &PgIo, method: AuthMethod, reason: String| ReplicationError::Auth {
        target: io.target.clone(),
        method: method.as_str(),
        reason,
    };
    let mut method = AuthMethod::Trust;
    let mut scram: Option<ScramSha256> = None;
    let mut scram_verified = false;
    loop {
        let (tag, backend) = io.read_backend(action).await?;
        let Backend::Message(message) = backend else {
            return Err(io.unexpected(action, tag));
        };
        let request = match &message {
            Message::AuthenticationOk => Some(AuthRequest::None),
            Message::AuthenticationCleartextPassword => Some(AuthRequest::Password),
            Message::AuthenticationMd5Password(_) => Some(AuthRequest::Md5),
            Message::AuthenticationSasl(_) => Some(AuthRequest::ScramSha256),
            Message::AuthenticationKerberosV5 | Message::AuthenticationGss => Some(AuthRequest::Gss),
            Message::AuthenticationSspi => Some(AuthRequest::Sspi),
            _ => None,
        };
        if let Some(request) = request
            && let Err(reason) = check_auth_request(cfg, request, method)
        {
            return Err(ReplicationError::Auth {
                target: io.target.clone(),
                method: request.as_str(),
                reason,
            });
        }
        match message {
            Message::AuthenticationOk => {
                if scram.is_some() && !scram_verified {
                    return Err(auth_error(
                        io,
                        method,
                        "the server ended the SCRAM exchange without proving it knows the password".into(),
                    ));
                }
                return Ok(method);
            }
            Message::AuthenticationCleartextPassword => {
                method = AuthMethod::Cleartext;
                let password = require_password(cfg, &io.target, method)?;
                io.queue(action, |buf| {
                    frontend::password_message(password.expose().as_bytes(), buf)
                })?;
            }
            Message::AuthenticationMd5Password(body) => {
                method = AuthMethod::Md5;
                let password = require_password(cfg, &io.target, method)?;
                let hashed = md5_hash(cfg.user.as_bytes(), password.expose().as_bytes(), body.salt());
                io.queue(action, |buf| frontend::password_message(hashed.as_bytes(), buf))?;
            }
            Message::AuthenticationSasl(body) => {
                if scram.is_some() {
                    return Err(io.unexpected(action, tag));
                }
                let offered: Vec<&str> = body
                    .mechanisms()
                    .collect()
                    .map_err(|e| io.protocol_error(action, format!("malformed AuthenticationSASL: {e}")))?;
                let end_point = end_point.filter(|_| cfg.channel_binding != ChannelBindingMode::Disable);
                let choice = choose_sasl_mechanism(&offered, end_point);
                if cfg.channel_binding == ChannelBindingMode::Require
                    && !matches!(choice, Some(SaslChoice::ScramSha256Plus(_)))
                {
                    return Err(ReplicationError::Auth {
                        target: io.target.clone(),
                        method: "SASL",
                        reason: format!(
                            "channel_binding=require, but {} (no password was sent)",
                            if end_point.is_none() {
                                "the TLS connection offers no usable channel binding (no TLS, or a certificate without a defined hash)"
                            } else {
                                "the server did not offer SCRAM-SHA-256-PLUS"
                            }
                        ),
                    });
                }
                let (mechanism, binding) = match choice {
                    Some(SaslChoice::ScramSha256Plus(hash)) => {
                        method = AuthMethod::ScramSha256Plus;
                        (sasl::SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(hash))
                    }
                    Some(SaslChoice::ScramSha256(flag)) => {
                        method = AuthMethod::ScramSha256;
                        let binding = match flag {
                            Gs2ChannelBinding::NotSupported => ChannelBinding::unsupported(),
                            Gs2ChannelBinding::ServerDidNotOffer => ChannelBinding::unrequested(),
                        };
                        (sasl::SCRAM_SHA_256, binding)
                    }
                    None => {
                        return Err(ReplicationError::Auth {
                            target: io.target.clone(),
                            method: "SASL",
                            reason: format!(
                                "no supported SASL mechanism among those offered: {}",
                                offered.join(", ")
                            ),
                        });
                    }
                };
                let password = require_password(cfg, &io.target, method)?;
                let exchange = ScramSha256::new(password.expose().as_bytes(), binding);
                io.queue(action, |buf| {
                    frontend::sasl_initial_response(mechanism, exchange.message(), buf)
                })?;
                scram = Some(exchange);
            }
            Message::AuthenticationSaslContinue(body) => {
                let Some(exchange) = scram.as_mut() else {
                    return Err(io.unexpected(action, tag));
                };
                // The error texts of `update`/`finish` describe the server's message, never the
                // password or our own messages.
                if let Err(e) = exchange.update(body.data()) {
                    return Err(auth_error(
                        io,
                        method,
                        format!("invalid SCRAM server-first message: {e}"),
                    ));
                }
                let response = exchange.message().to_vec();
                io.queue(action, |buf| frontend::sasl_response(&response, buf))?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let Some(exchange) = scram.as_mut() else {
                    return Err(io.unexpected(action, tag));
                };
                if let Err(e) = exchange.finish(body.data()) {
                    return Err(auth_error(
                        io,
                        method,
                        format!("the server's SCRAM signature is not valid: {e}"),
                    ));
                }
                scram_verified = true;
            }
            Message::ErrorResponse(body) => return Err(io.server_error(action, body.fields())),
            Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGss
            | Message::AuthenticationGssContinue(_)
            | Message::AuthenticationSspi => {
                return Err(ReplicationError::Auth {
                    target: io.target.clone(),
                    method: "GSSAPI/SSPI/Kerberos",
                    reason: "the server asked for an authentication method this client does not support".into(),
                });
            }
            _ => return Err(io.unexpected(action, tag)),
        }
        io.flush(action).await?;
    }
}

/// The CopyBoth stream after `START_REPLICATION`: raw CopyData payloads in, CopyData payloads out.
///
/// Reads and writes are meant to come from one task. [`next_copy_data`](Self::next_copy_data) is
/// cancel-safe (use it in `tokio::select!`); [`send_copy_data`](Self::send_copy_data) queues the
/// whole message before writing, so if it is cancelled, the next send (or `finish`) completes it.
pub struct LogicalReplicationStream {
    io: PgIo,
    copy_done_received: bool,
}

impl fmt::Debug for LogicalReplicationStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogicalReplicationStream")
            .field("target", &self.io.target)
            .field("copy_done_received", &self.copy_done_received)
            .finish_non_exhaustive()
    }
}

impl LogicalReplicationStream {
    /// The payload of the next CopyData message (a zero-copy slice of the read buffer), or
    /// `Ok(None)` once the server has ended the copy with CopyDone. An ErrorResponse is returned as
    /// [`ReplicationError::Server`]; the server closing the connection without CopyDone is an
    /// [`ReplicationError::Io`] error (`UnexpectedEof`). Cancel-safe.
    pub async fn next_copy_data(&mut self) -> Result<Option<Bytes>, ReplicationError> {
        let action = "streaming";
        if self.copy_done_received {
            return Ok(None);
        }
        match self.io.read_backend(action).await? {
            (_, Backend::CopyData(payload)) => Ok(Some(payload)),
            (_, Backend::CopyDone) => {
                self.copy_done_received = true;
                Ok(None)
            }
            (_, Backend::Message(Message::ErrorResponse(body))) => Err(self.io.server_error(action, body.fields())),
            // A walsender shutting down ends the command; the stream is over either way.
            (_, Backend::Message(Message::CommandComplete(_))) | (_, Backend::Message(Message::ReadyForQuery(_))) => {
                self.copy_done_received = true;
                Ok(None)
            }
            (tag, _) => Err(self.io.unexpected(action, tag)),
        }
    }

    /// Whether a complete message is already buffered (the next [`Self::next_copy_data`] will not
    /// wait for the network).
    pub fn has_buffered_message(&self) -> bool {
        frame_bytes_missing(&self.io.read_buf) == 0 && !self.io.read_buf.is_empty()
    }

    /// Sends `payload` in a CopyData message (e.g. a standby status update) and flushes.
    pub async fn send_copy_data(&mut self, payload: &[u8]) -> Result<(), ReplicationError> {
        let action = "sending CopyData";
        self.io.queue(action, |buf| {
            frontend::CopyData::new(payload)?.write(buf);
            Ok(())
        })?;
        self.io.flush(action).await
    }

    /// Where this stream comes from (`PgConnectionConfig::describe()`).
    pub fn target(&self) -> &str {
        &self.io.target
    }

    /// Ends the copy (CopyDone), then the session (Terminate), and closes the socket; best effort
    /// and bounded in time.
    pub async fn finish(self) {
        // Our CopyDone is due whether or not the server has sent its own.
        self.io.goodbye(frontend::copy_done).await;
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn splits_complete_frames_only() {
        let mut wire = message(b'd', b"wXYZ");
        wire.extend(message(b'k', b""));
        wire.extend(message(b'd', b"partial"));
        let full_len = wire.len();
        let mut buf = BytesMut::from(&wire[..full_len - 3]);

        let first = split_frame(&mut buf).unwrap().unwrap();
        assert_eq!(first.tag, b'd');
        assert_eq!(first.body(), b"wXYZ");
        assert_eq!(first.into_body(), Bytes::from_static(b"wXYZ"));
        let second = split_frame(&mut buf).unwrap().unwrap();
        assert_eq!((second.tag, second.body()), (b'k', &b""[..]));

        // Incomplete: nothing is consumed.
        let before = buf.clone();
        assert_eq!(split_frame(&mut buf).unwrap(), None);
        assert_eq!(buf, before);
        assert_eq!(frame_bytes_missing(&buf), 3);
        buf.extend_from_slice(&wire[full_len - 3..]);
        assert_eq!(frame_bytes_missing(&buf), 0);
        assert_eq!(split_frame(&mut buf).unwrap().unwrap().body(), b"partial");
        assert!(buf.is_empty());
    }

    #[test]
    fn every_prefix_is_incomplete_or_whole() {
        let wire = message(b'd', b"hello");
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(split_frame(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut);
            assert!(frame_bytes_missing(&buf) >= 1);
        }
    }

    #[test]
    fn rejects_impossible_lengths_before_allocating() {
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert_eq!(
            split_frame(&mut buf),
            Err(FrameError::LengthTooShort { tag: b'd', len: 3 })
        );
        let mut buf = BytesMut::from(&[b'd', 0xFF, 0xFF, 0xFF, 0xFF][..]);
        assert!(matches!(split_frame(&mut buf), Err(FrameError::LengthTooLong { .. })));
        assert_eq!(frame_bytes_missing(&buf), 0);
    }

    fn header(tag: u8, len: usize) -> BytesMut {
        let mut buf = BytesMut::from(&[tag][..]);
        buf.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        buf
    }

    /// CopyData and DataRow (a row of Synapse's tables) up to 64 MiB, anything else up to 1 MiB;
    /// longer is refused from the header, with the message type and the limit in the error.
    #[test]
    fn message_lengths_are_bounded_per_type() {
        for tag in [b'd', b'D'] {
            assert_eq!(split_frame(&mut header(tag, 64 << 20)), Ok(None));
            let err = split_frame(&mut header(tag, (64 << 20) + 1)).unwrap_err();
            assert_eq!(
                err,
                FrameError::LengthTooLong {
                    tag,
                    len: (64 << 20) + 1,
                    limit: MAX_ROW_MESSAGE_LEN
                }
            );
            // What PostgreSQL would still send (1 GiB) is refused.
            assert!(split_frame(&mut header(tag, 1 << 30)).is_err());
        }
        let err = split_frame(&mut header(b'd', (64 << 20) + 1)).unwrap_err().to_string();
        assert!(err.contains("CopyData") && err.contains("67108864-byte limit"), "{err}");
        for tag in [b'E', b'N', b'S', b'R', b'T', b'C', b'Z', b'W'] {
            assert_eq!(split_frame(&mut header(tag, 1 << 20)), Ok(None));
            let err = split_frame(&mut header(tag, (1 << 20) + 1)).unwrap_err();
            assert!(
                matches!(
                    err,
                    FrameError::LengthTooLong {
                        limit: MAX_OTHER_MESSAGE_LEN,
                        ..
                    }
                ),
                "{err}"
            );
        }
    }

    /// ParameterStatus: what PostgreSQL sends fits; repeats replace; more than 64 KiB in all is
    /// refused, naming the parameter.
    #[test]
    fn parameters_are_bounded_in_total() {
        let mut p = ServerParameters::default();
        p.record("server_version", "17.2").unwrap();
        p.record("application_name", &"x".repeat(60_000)).unwrap();
        for _ in 0..100 {
            p.record("application_name", &"y".repeat(60_000)).unwrap();
        }
        assert_eq!(p.len(), 2);
        assert_eq!(p.get("server_version"), Some("17.2"));
        let err = p.record("TimeZone", &"z".repeat(6_000)).unwrap_err();
        assert!(
            err.contains("\"TimeZone\"") && err.contains("65536-byte limit"),
            "{err}"
        );
        assert_eq!(p.get("TimeZone"), None);
        // A shorter value makes room again.
        p.record("application_name", "relay").unwrap();
        p.record("TimeZone", &"z".repeat(6_000)).unwrap();
        let mut p = ServerParameters::default();
        for i in 0..5000 {
            if p.record(&format!("custom.p{i}"), "some value").is_err() {
                assert!(i > 2000, "refused at {i}");
                return;
            }
        }
        panic!("5000 distinct parameters of 20 bytes were all kept");
    }

    #[test]
    fn decodes_copy_messages_ourselves() {
        let frame = |tag, body: &[u8]| Frame {
            tag,
            bytes: BytesMut::from(&message(tag, body)[..]),
        };
        assert!(matches!(decode(frame(b'W', &[0, 0, 0])), Ok(Backend::CopyBothResponse)));
        assert!(matches!(
            decode(frame(b'W', &[0, 0, 1, 0, 0])),
            Ok(Backend::CopyBothResponse)
        ));
        assert!(decode(frame(b'W', &[0, 0, 2, 0, 0])).is_err());
        assert!(decode(frame(b'W', &[])).is_err());
        assert!(matches!(decode(frame(b'c', &[])), Ok(Backend::CopyDone)));
        assert!(decode(frame(b'c', &[1])).is_err());
        match decode(frame(b'd', b"k123")) {
            Ok(Backend::CopyData(payload)) => assert_eq!(payload, Bytes::from_static(b"k123")),
            _ => panic!("CopyData not decoded"),
        }
        assert!(matches!(
            decode(frame(b'Z', b"I")),
            Ok(Backend::Message(Message::ReadyForQuery(_)))
        ));
        let unknown = decode(frame(b'?', b"")).err().unwrap();
        assert!(unknown.contains("0x3f"), "{unknown}");
        // Truncated bodies are errors, not panics.
        for tag in [b'R', b'K', b'S', b'E', b'N', b'D', b'T', b'C', b'Z', b'A', b'G', b'H'] {
            let _ = decode(frame(tag, b""));
            let _ = decode(frame(tag, b"\x00\x00\x00\x05ab"));
        }
    }

    #[test]
    fn parses_error_fields() {
        let body = b"SERREUR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0Dd\0Hh\0Fslot.c\0\0";
        let frame = Frame {
            tag: b'E',
            bytes: BytesMut::from(&message(b'E', body)[..]),
        };
        let Ok(Backend::Message(Message::ErrorResponse(e))) = decode(frame) else {
            panic!("not an ErrorResponse");
        };
        let e = parse_fields(e.fields(), "t").unwrap();
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.code, "55006");
        assert_eq!(e.message, "replication slot \"s\" is active for PID 7");
        assert_eq!((e.detail.as_deref(), e.hint.as_deref()), (Some("d"), Some("h")));
    }

    #[test]
    fn builds_start_replication_commands() {
        assert_eq!(
            start_replication_command("relay_slot", Lsn(0x16_B374_D848), &["relay_pub"]),
            "START_REPLICATION SLOT \"relay_slot\" LOGICAL 16/B374D848 (proto_version '1', publication_names '\"relay_pub\"', messages 'true')"
        );
        assert_eq!(
            start_replication_command("s", Lsn::ZERO, &["we'ird\"pub\\"]),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (proto_version '1', publication_names '\"we''ird\"\"pub\\\"', messages 'true')"
        );
        assert_eq!(
            start_replication_command("s", Lsn::ZERO, &["a", "a_push_rules"]),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (proto_version '1', publication_names '\"a\",\"a_push_rules\"', messages 'true')"
        );
        // Without backslashes, the literal is what escape_literal produces.
        for value in ["plain", "it's", "\"q\""] {
            assert_eq!(
                replication_literal(value),
                postgres_protocol::escape::escape_literal(value)
            );
        }
    }

    #[test]
    fn chooses_sasl_mechanisms() {
        let both = [sasl::SCRAM_SHA_256_PLUS, sasl::SCRAM_SHA_256];
        let plain = [sasl::SCRAM_SHA_256];
        let hash = [1u8, 2, 3];
        assert_eq!(
            choose_sasl_mechanism(&both, Some(&hash)),
            Some(SaslChoice::ScramSha256Plus(hash.to_vec()))
        );
        // -PLUS offered but no usable hash: plain SCRAM with "n", never "y".
        assert_eq!(
            choose_sasl_mechanism(&both, None),
            Some(SaslChoice::ScramSha256(Gs2ChannelBinding::NotSupported))
        );
        // TLS, server without -PLUS: "y".
        assert_eq!(
            choose_sasl_mechanism(&plain, Some(&hash)),
            Some(SaslChoice::ScramSha256(Gs2ChannelBinding::ServerDidNotOffer))
        );
        assert_eq!(
            choose_sasl_mechanism(&plain, None),
            Some(SaslChoice::ScramSha256(Gs2ChannelBinding::NotSupported))
        );
        assert_eq!(choose_sasl_mechanism(&["OAUTHBEARER"], Some(&hash)), None);
        assert_eq!(choose_sasl_mechanism(&[sasl::SCRAM_SHA_256_PLUS], None), None);
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the framing or the decoding.
        #[test]
        fn arbitrary_bytes_never_panic(wire in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&wire[..]);
            while let Ok(Some(frame)) = split_frame(&mut buf) {
                if let Ok(Backend::Message(Message::ErrorResponse(body))) = decode(frame) {
                    let _ = parse_fields(body.fields(), "t");
                }
            }
        }

        /// However the bytes of a valid sequence of messages arrive, the same messages come out.
        #[test]
        fn framing_is_independent_of_chunking(
            bodies in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 1..8),
            cuts in proptest::collection::vec(1usize..64, 1..200),
        ) {
            let wire: Vec<u8> = bodies.iter().flat_map(|b| message(b'd', b)).collect();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut offset = 0;
            for cut in cuts.iter().cycle() {
                if offset >= wire.len() {
                    break;
                }
                let end = (offset + cut).min(wire.len());
                buf.extend_from_slice(&wire[offset..end]);
                offset = end;
                while let Some(frame) = split_frame(&mut buf).unwrap() {
                    out.push(frame.into_body().to_vec());
                }
            }
            proptest::prop_assert_eq!(out, bodies);
            proptest::prop_assert!(buf.is_empty());
        }
    }

    /// A stream over one end of a Unix socket pair; the test plays the server on the other end.
    fn stream_pair() -> (LogicalReplicationStream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let io = PgIo::new(PgStream::Unix(ours), "test".into());
        (
            LogicalReplicationStream {
                io,
                copy_done_received: false,
            },
            theirs,
        )
    }

    #[tokio::test]
    async fn next_copy_data_is_cancel_safe() {
        let (mut stream, mut server) = stream_pair();
        let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let wire = message(b'd', &payload);
        // Half a message: the read is cancelled with bytes already buffered.
        server.write_all(&wire[..3]).await.unwrap();
        let read = tokio::time::timeout(Duration::from_millis(50), stream.next_copy_data()).await;
        assert!(read.is_err(), "a partial message must not complete a read");
        server.write_all(&wire[3..50_000]).await.unwrap();
        let read = tokio::time::timeout(Duration::from_millis(50), stream.next_copy_data()).await;
        assert!(read.is_err(), "a partial message must not complete a read");
        server.write_all(&wire[50_000..]).await.unwrap();
        server
            .write_all(&message(b'N', b"SNOTICE\0C00000\0Mhello\0\0"))
            .await
            .unwrap();
        server
            .write_all(&message(b'S', b"application_name\0x\0"))
            .await
            .unwrap();
        server.write_all(&message(b'd', b"k")).await.unwrap();
        server.write_all(&message(b'c', b"")).await.unwrap();
        assert_eq!(stream.next_copy_data().await.unwrap().unwrap(), Bytes::from(payload));
        assert_eq!(
            stream.next_copy_data().await.unwrap().unwrap(),
            Bytes::from_static(b"k")
        );
        assert_eq!(stream.io.parameters.get("application_name"), Some("x"));
        assert_eq!(stream.next_copy_data().await.unwrap(), None);
        assert_eq!(stream.next_copy_data().await.unwrap(), None);
    }

    #[tokio::test]
    async fn stream_errors() {
        let (mut stream, mut server) = stream_pair();
        server
            .write_all(&message(b'E', b"SFATAL\0VFATAL\0C57P01\0Mterminating connection\0\0"))
            .await
            .unwrap();
        let err = stream.next_copy_data().await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("57P01"));
        assert!(err.is_transient());
        drop(server);
        let err = stream.next_copy_data().await.unwrap_err();
        assert!(matches!(err, ReplicationError::Io { .. }), "{err:?}");

        // A length over the limit is refused from the header alone.
        let (mut stream, mut server) = stream_pair();
        server.write_all(&[b'd', 0x7F, 0xFF, 0xFF, 0xFF]).await.unwrap();
        let err = stream.next_copy_data().await.unwrap_err();
        assert!(matches!(err, ReplicationError::Protocol { .. }), "{err:?}");
        let (mut stream, mut server) = stream_pair();
        server.write_all(&header(b'd', (64 << 20) + 1)).await.unwrap();
        let err = stream.next_copy_data().await.unwrap_err();
        assert!(err.to_string().contains("CopyData"), "{err}");

        // Endless ParameterStatus messages are refused once they pass the limit.
        let (mut stream, mut server) = stream_pair();
        let mut flood = Vec::new();
        // 70 KB: more than the limit, less than the socket's buffer (written before reading).
        for i in 0..70 {
            let mut body = format!("custom.p{i}\0").into_bytes();
            body.extend_from_slice(&[b'v'; 1000]);
            body.push(0);
            flood.extend(message(b'S', &body));
        }
        server.write_all(&flood).await.unwrap();
        let err = stream.next_copy_data().await.unwrap_err();
        assert!(err.to_string().contains("ParameterStatus"), "{err}");

        // A walsender that ends the command (shutdown) ends the stream.
        let (mut stream, mut server) = stream_pair();
        server.write_all(&message(b'C', b"START_REPLICATION\0")).await.unwrap();
        assert_eq!(stream.next_copy_data().await.unwrap(), None);

        // A message that has no place in the stream.
        let (mut stream, mut server) = stream_pair();
        server.write_all(&message(b'T', b"\0\0")).await.unwrap();
        let err = stream.next_copy_data().await.unwrap_err();
        assert!(err.to_string().contains("RowDescription"), "{err}");
    }

    #[tokio::test]
    async fn sends_copy_data_and_goodbye() {
        let (mut stream, mut server) = stream_pair();
        stream.send_copy_data(b"r0123").await.unwrap();
        let mut got = [0u8; 10];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"d\0\0\0\x09r0123");
        stream.finish().await;
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"c\0\0\0\x04X\0\0\0\x04");
    }

    #[test]
    fn parses_identify_system_rows() {
        let row = |v: [Option<&str>; 4]| vec![v.iter().map(|s| s.map(str::to_owned)).collect::<Vec<_>>()];
        let id = parse_identify_system(&row([
            Some("7000000000000000001"),
            Some("1"),
            Some("0/1A2B3C"),
            Some("synapse"),
        ]))
        .unwrap();
        assert_eq!(id.system_id, "7000000000000000001");
        assert_eq!((id.timeline, id.xlogpos), (1, Lsn(0x1A_2B3C)));
        assert_eq!(id.dbname.as_deref(), Some("synapse"));
        assert_eq!(
            parse_identify_system(&row([Some("1"), Some("2"), Some("0/0"), None]))
                .unwrap()
                .dbname,
            None
        );
        assert!(parse_identify_system(&row([Some("1"), Some("x"), Some("0/0"), None])).is_err());
        assert!(parse_identify_system(&row([Some("1"), Some("1"), Some("nope"), None])).is_err());
        assert!(parse_identify_system(&[]).is_err());
        assert!(parse_identify_system(&[vec![Some("1".into())]]).is_err());
    }
}
