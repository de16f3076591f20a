//! Errors of the replication connection ([`super::connection`]).
//!
//! Every variant names the target (`PgConnectionConfig::describe()`, never the password) and, for
//! I/O and timeouts, what was being done. Server errors keep the fields of PostgreSQL's
//! `ErrorResponse` so callers can branch on the SQLSTATE; the helpers below classify the cases the
//! relay reacts to (slot busy, slot missing, slot invalidated, worth reconnecting).

use std::fmt;
use std::time::Duration;

/// An error reported by the server in an `ErrorResponse`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    /// Where the error came from (`PgConnectionConfig::describe()`).
    pub target: String,
    /// `ERROR`, `FATAL` or `PANIC` (the non-localized severity when the server sends it).
    pub severity: String,
    /// The SQLSTATE, e.g. `28P01`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// The `DETAIL` line, if any.
    pub detail: Option<String>,
    /// The `HINT` line, if any.
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} from {}: {}",
            self.severity, self.code, self.target, self.message
        )?;
        if let Some(detail) = &self.detail {
            write!(f, " (DETAIL: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (HINT: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// Why a replication connection or stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// Reading from or writing to the socket failed (including the server closing the connection).
    #[error("I/O error while {action} ({target}): {source}")]
    Io {
        action: &'static str,
        target: String,
        #[source]
        source: std::io::Error,
    },
    /// TLS could not be set up: configuration, the server refusing TLS, or the handshake
    /// (certificate verification included).
    #[error("TLS error with {target}: {reason}")]
    Tls { target: String, reason: String },
    /// Authentication could not be carried out on our side (no password configured, unsupported
    /// method, the server failing to prove it knows the password). A password the server rejects
    /// is a [`ReplicationError::Server`] error with SQLSTATE `28P01`.
    #[error("authentication with {target} failed (method {method}): {reason}")]
    Auth {
        target: String,
        method: &'static str,
        reason: String,
    },
    /// The server sent an `ErrorResponse`.
    #[error("server error: {0}")]
    Server(Box<ServerError>),
    /// The server sent something the protocol does not allow at this point.
    #[error("protocol error with {target} while {action}: {problem}")]
    Protocol {
        target: String,
        action: &'static str,
        problem: String,
    },
    /// The operation did not finish in time.
    #[error("timed out after {after:?} while {action} ({target})")]
    Timeout {
        action: &'static str,
        target: String,
        after: Duration,
    },
    /// No host of a multi-host setting (or the one host, being a standby) was the server
    /// wanted: every host tried, and why it was refused.
    #[error("cannot connect to {target}: {hosts}")]
    NoHostAccepted {
        target: String,
        hosts: crate::postgres::hosts::NoHostAccepted,
    },
}

/// SQLSTATE `55006` object_in_use: `replication slot "…" is active for PID …`.
pub const SQLSTATE_OBJECT_IN_USE: &str = "55006";
/// SQLSTATE `42704` undefined_object: `replication slot "…" does not exist`.
pub const SQLSTATE_UNDEFINED_OBJECT: &str = "42704";
/// SQLSTATE `55000` object_not_in_prerequisite_state: used, among others, for invalidated slots.
pub const SQLSTATE_OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
/// SQLSTATE `28P01` invalid_password.
pub const SQLSTATE_INVALID_PASSWORD: &str = "28P01";

/// The primary messages PostgreSQL uses when `START_REPLICATION` hits a slot invalidated by
/// `max_slot_wal_keep_size` (all with SQLSTATE 55000):
/// - 13 to 15 (`StartLogicalReplication`, walsender.c): `cannot read from logical replication slot "…"`,
///   DETAIL `This slot has been invalidated because it exceeded the maximum reserved size.`;
/// - 16 and 17 (`CreateDecodingContext`, logical.c): `can no longer get changes from replication slot "…"`,
///   with the same DETAIL (or `… because it was conflicting with recovery.` on a standby);
/// - 18 (`ReplicationSlotAcquire`, slot.c): `can no longer access replication slot "…"`,
///   DETAIL `This replication slot has been invalidated due to "wal_removed".`
const INVALIDATED_SLOT_MESSAGES: [&str; 3] = [
    "cannot read from logical replication slot",
    "can no longer get changes from replication slot",
    "can no longer access replication slot",
];

impl ReplicationError {
    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            _ => None,
        }
    }

    /// The server error, if this is one.
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            ReplicationError::Server(e) => Some(e),
            _ => None,
        }
    }

    /// The slot is being streamed by another connection (SQLSTATE 55006, object_in_use).
    pub fn is_slot_in_use(&self) -> bool {
        self.sqlstate() == Some(SQLSTATE_OBJECT_IN_USE)
    }

    /// The replication slot does not exist (SQLSTATE 42704, undefined_object, about a replication
    /// slot; a missing publication has the same SQLSTATE and is not a missing slot).
    ///
    /// Relies on the server's English message; with a translated `lc_messages` this returns false.
    pub fn is_slot_missing(&self) -> bool {
        match self {
            ReplicationError::Server(e) => {
                e.code == SQLSTATE_UNDEFINED_OBJECT && e.message.contains("replication slot")
            }
            _ => false,
        }
    }

    /// The slot was invalidated (its WAL was removed because of `max_slot_wal_keep_size`, or it
    /// conflicted with recovery): it can never be used again and must be dropped and recreated.
    ///
    /// SQLSTATE 55000 with one of the messages PostgreSQL 13 to 18 use (see
    /// `INVALIDATED_SLOT_MESSAGES`), or a DETAIL saying the slot has been invalidated. Relies on
    /// the server's English messages; `pg_replication_slots.wal_status = 'lost'` is the
    /// language-independent confirmation.
    pub fn is_slot_invalidated(&self) -> bool {
        match self {
            ReplicationError::Server(e) => {
                e.code == SQLSTATE_OBJECT_NOT_IN_PREREQUISITE_STATE
                    && (INVALIDATED_SLOT_MESSAGES.iter().any(|m| e.message.contains(m))
                        || e.detail.as_deref().is_some_and(|d| d.contains("has been invalidated")))
            }
            _ => false,
        }
    }

    /// Worth reconnecting after a pause: I/O errors (the connection dropped), timeouts, and server
    /// errors of class 08 (connection exception), 57P01 admin_shutdown, 57P02 crash_shutdown,
    /// 57P03 cannot_connect_now and 53300 too_many_connections.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Io { .. } | ReplicationError::Timeout { .. } => true,
            ReplicationError::Server(e) => {
                e.code.starts_with("08") || matches!(e.code.as_str(), "57P01" | "57P02" | "57P03" | "53300")
            }
            ReplicationError::NoHostAccepted { hosts, .. } => hosts.is_transient(),
            ReplicationError::Tls { .. } | ReplicationError::Auth { .. } | ReplicationError::Protocol { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str, detail: Option<&str>) -> ReplicationError {
        ReplicationError::Server(Box::new(ServerError {
            target: "relay@db:5432/synapse".into(),
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: detail.map(str::to_owned),
            hint: None,
        }))
    }

    #[test]
    fn classifies_slot_errors() {
        let in_use = server("55006", "replication slot \"relay\" is active for PID 4242", None);
        assert!(in_use.is_slot_in_use());
        assert!(!in_use.is_slot_missing() && !in_use.is_slot_invalidated() && !in_use.is_transient());

        let missing = server("42704", "replication slot \"relay\" does not exist", None);
        assert!(missing.is_slot_missing());
        assert!(!missing.is_slot_in_use());
        let no_publication = server("42704", "publication \"relay\" does not exist", None);
        assert!(!no_publication.is_slot_missing());

        let detail = "This slot has been invalidated because it exceeded the maximum reserved size.";
        for (message, detail) in [
            ("cannot read from logical replication slot \"relay\"", Some(detail)),
            (
                "can no longer get changes from replication slot \"relay\"",
                Some(detail),
            ),
            (
                "can no longer access replication slot \"relay\"",
                Some("This replication slot has been invalidated due to \"wal_removed\"."),
            ),
        ] {
            assert!(server("55000", message, detail).is_slot_invalidated(), "{message}");
        }
        assert!(
            !server(
                "55000",
                "replication slot \"relay\" was not created in this database",
                None
            )
            .is_slot_invalidated()
        );
    }

    #[test]
    fn classifies_transient_errors() {
        for code in ["57P01", "57P02", "57P03", "08006", "08P01", "53300"] {
            assert!(server(code, "x", None).is_transient(), "{code}");
        }
        for code in ["28P01", "42704", "55006", "XX000"] {
            assert!(!server(code, "x", None).is_transient(), "{code}");
        }
        let io = ReplicationError::Io {
            action: "reading",
            target: "t".into(),
            source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
        };
        assert!(io.is_transient());
        assert_eq!(io.sqlstate(), None);
        let auth = ReplicationError::Auth {
            target: "t".into(),
            method: "md5",
            reason: "r".into(),
        };
        assert!(!auth.is_transient());
    }

    #[test]
    fn server_error_display_has_all_fields() {
        let e = ReplicationError::Server(Box::new(ServerError {
            target: "u@h:1/d".into(),
            severity: "FATAL".into(),
            code: "28P01".into(),
            message: "password authentication failed for user \"u\"".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
        }));
        assert_eq!(
            e.to_string(),
            "server error: FATAL 28P01 from u@h:1/d: password authentication failed for user \"u\" (DETAIL: d) (HINT: h)"
        );
        assert_eq!(e.sqlstate(), Some("28P01"));
    }
}
