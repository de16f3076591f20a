//! Plain data types shared by every layer: log positions, secrets, account-data changes.
//!
//! Nothing here does I/O.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A PostgreSQL write-ahead-log position (`pg_lsn`), printed and parsed as `X/Y` in hex.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`: "no position"; `START_REPLICATION … 0/0` means "from the slot's confirmed position".
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

/// Error for a string that is not an `X/Y` log position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a PostgreSQL LSN (expected X/Y in hex): {0:?}")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// A credential (`as_token`, `hs_token`, a database password). `Debug` and `Display` print
/// `[redacted]`, so a secret cannot reach a log line, an error message or a metric by accident;
/// the value is only reachable through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret value. Call only where it is sent to its one legitimate recipient.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// The `m.tag` event type.
pub const TAG_EVENT_TYPE: &str = "m.tag";
/// The `m.push_rules` event type.
pub const PUSH_RULES_EVENT_TYPE: &str = "m.push_rules";

/// Which account data a change is about: the coalescing key.
///
/// `room_id == None` is global account data (`account_data` table); `Some` is room account data
/// (`room_account_data`) or, with `data_type == "m.tag"`, a room's tags.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountDataKey {
    pub user_id: Arc<str>,
    pub room_id: Option<Arc<str>>,
    pub data_type: Arc<str>,
}

impl AccountDataKey {
    /// Where this key's current value is read from.
    pub fn source_table(&self) -> SourceTable {
        match &self.room_id {
            None if &*self.data_type == PUSH_RULES_EVENT_TYPE => SourceTable::PushRules,
            None => SourceTable::AccountData,
            Some(_) if &*self.data_type == TAG_EVENT_TYPE => SourceTable::RoomTags,
            Some(_) => SourceTable::RoomAccountData,
        }
    }
}

/// The Synapse table a value is read from when it is read at delivery time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceTable {
    /// `account_data` (global account data).
    AccountData,
    /// `room_account_data`.
    RoomAccountData,
    /// `room_tags`: all tags of one (user, room), assembled into one `m.tag` event.
    RoomTags,
    /// A user's push rules, fetched from Synapse's client API (never rebuilt from tables: the
    /// defaults live in Synapse's code).
    PushRules,
}

/// The value a change carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeContent {
    /// The new content, as the raw JSON text Synapse stored (validated, never re-serialised).
    Json(Arc<str>),
    /// The value is read from `SourceTable` when the transaction to the appservice is built:
    /// a `room_tags_revisions` row (the `m.tag` content is all of the room's current tags), an
    /// UPDATE whose `content` was an unchanged TOAST value (not sent by pgoutput), or a change
    /// below an appservice's read horizon (see `delivery::state`).
    ReadCurrent(SourceTable),
}

/// One account-data change, as decoded from one row of one committed PostgreSQL transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountDataChange {
    pub key: AccountDataKey,
    pub content: ChangeContent,
    /// The commit LSN of the transaction that made the change (pgoutput Begin's `final_lsn`).
    pub commit_lsn: Lsn,
    /// That transaction's id: a value read back from the tables must wait until it is visible.
    pub xid: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        for (text, value) in [
            ("0/0", 0u64),
            ("16/B374D848", 0x16_B374_D848),
            ("FFFFFFFF/FFFFFFFF", u64::MAX),
        ] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn, Lsn(value));
            assert_eq!(lsn.to_string(), text);
        }
    }

    #[test]
    fn lsn_rejects_malformed_text() {
        for bad in ["", "0", "/0", "0/", "G/0", "0/1/2", "123456789/0", " 0/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }
}
