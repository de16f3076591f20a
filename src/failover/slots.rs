//! PostgreSQL 17+ failover slots, judged from what the primary and its standbys show (pure; the
//! reading is in [`super::inspect`]):
//!
//! - [`setting_problems`]: which settings a promotion without a resync needs, on the primary
//!   (the slot created with `failover = true`, `synchronized_standby_slots` naming the standbys'
//!   physical slots, which must exist) and on each standby the relay can reach
//!   (`sync_replication_slots = on`, `hot_standby_feedback = on`, `primary_slot_name`, `dbname`
//!   in `primary_conninfo`, `wal_level = logical`), each with the exact statements;
//! - [`readiness`]: whether the slot is safe *now*: each standby named in
//!   `synchronized_standby_slots` holds a synchronised, persisted copy (`synced AND NOT
//!   temporary`), and how far behind it is. The standby's copy is first created *temporary* and
//!   only persisted once the slot moved on the primary and the sync worker ran again; a temporary
//!   copy is dropped at promotion. That window (after `setup`, after a re-created slot) is what
//!   this reports, in `check`, `status`, `/readyz` and the metrics.

use std::fmt;

use postgres_protocol::escape::escape_literal;

use crate::model::Lsn;
use crate::setup::checks::{Problem, Severity};

/// A slot as `pg_replication_slots` shows it (the columns of PostgreSQL 17+; older servers have
/// neither `failover` nor `synced`, read as false).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotCopy {
    pub failover: bool,
    pub synced: bool,
    pub temporary: bool,
    pub confirmed_flush_lsn: Option<Lsn>,
    /// `invalidation_reason` (17+), e.g. `wal_removed`, `rows_removed`, `idle_timeout`.
    pub invalidation_reason: Option<String>,
}

/// A physical slot on the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhysicalSlot {
    pub name: String,
    pub active: bool,
    pub restart_lsn: Option<Lsn>,
}

/// What the primary shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryFacts {
    pub server_version_num: i32,
    pub database: String,
    /// `synchronized_standby_slots`, split at commas (`None` before PostgreSQL 17).
    pub synchronized_standby_slots: Option<Vec<String>>,
    pub physical_slots: Vec<PhysicalSlot>,
    /// The relay's slot.
    pub slot: Option<SlotCopy>,
}

/// What a standby shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandbyFacts {
    /// Where it was reached.
    pub server: String,
    pub server_version_num: i32,
    pub sync_replication_slots: bool,
    pub hot_standby_feedback: bool,
    /// Empty when unset.
    pub primary_slot_name: String,
    /// Whether `primary_conninfo` names a database; `None` when the role may not read it (the
    /// value itself, which may hold a password, is never kept).
    pub primary_conninfo_has_dbname: Option<bool>,
    pub wal_level: String,
    /// Its copy of the relay's slot.
    pub slot: Option<SlotCopy>,
}

/// A host of the relay's list other than the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StandbyReach {
    Reached(StandbyFacts),
    /// Not reachable, or not a standby; `reason` says which.
    NotReached {
        server: String,
        reason: String,
    },
}

/// Splits a `synchronized_standby_slots` value.
pub fn split_slot_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Whether a libpq connection string (`primary_conninfo`) names a database: a `dbname=` keyword
/// or a URI with a path. Only the answer is kept, never the text (it may hold a password).
pub fn conninfo_has_dbname(conninfo: &str) -> bool {
    let c = conninfo.trim();
    if let Some(rest) = c
        .strip_prefix("postgresql://")
        .or_else(|| c.strip_prefix("postgres://"))
    {
        let path = rest.split(['?', '#']).next().unwrap_or_default();
        let has_path = path.split_once('/').is_some_and(|(_, db)| !db.is_empty());
        return has_path || rest.contains("dbname=");
    }
    c.split_whitespace().any(|kv| {
        kv.split_once('=')
            .is_some_and(|(k, v)| k.trim() == "dbname" && !v.trim_matches('\'').is_empty())
    })
}

fn statement_problem(severity: Severity, message: String) -> Problem {
    Problem { severity, message }
}

/// The settings a promotion without a resync needs, on the primary and on each standby reached,
/// with the statements that set them. `failover_wanted`: `replication.failover = true`. Pure.
pub fn setting_problems(
    failover_wanted: bool,
    slot_name: &str,
    primary: &PrimaryFacts,
    standbys: &[StandbyReach],
) -> Vec<Problem> {
    let mut out = Vec::new();
    let reached: Vec<&StandbyFacts> = standbys
        .iter()
        .filter_map(|s| match s {
            StandbyReach::Reached(f) => Some(f),
            StandbyReach::NotReached { .. } => None,
        })
        .collect();
    if !failover_wanted {
        for s in &reached {
            out.push(statement_problem(
                Severity::Warning,
                format!(
                    "the standby at {} follows this primary, but replication.failover is off: if it is promoted, the \
                     relay re-creates its slot there and resyncs every appservice. On PostgreSQL 17+ set \
                     replication.failover = true (then `setup`) to keep the slot across a promotion",
                    s.server
                ),
            ));
        }
        return out;
    }
    if primary.server_version_num < 170000 {
        out.push(statement_problem(
            Severity::Error,
            "replication.failover = true needs PostgreSQL 17 or newer (failover slots); on this server a promotion \
             costs a resync (the relay re-creates its slot and resyncs every appservice)"
                .into(),
        ));
        return out;
    }
    if let Some(slot) = &primary.slot
        && !slot.failover
    {
        out.push(statement_problem(
            Severity::Error,
            format!(
                "replication slot {slot_name:?} was created without failover = true, so no standby keeps a copy: stop \
                 the relay, then on a replication connection run `ALTER_REPLICATION_SLOT {} (FAILOVER true)` (e.g. \
                 psql \"dbname={} replication=database\" -c 'ALTER_REPLICATION_SLOT {} (FAILOVER true)')",
                quote_ident_plain(slot_name),
                primary.database,
                quote_ident_plain(slot_name)
            ),
        ));
    }
    let named = primary.synchronized_standby_slots.clone().unwrap_or_default();
    // The physical slots standbys use: named by the standbys reached, else the primary's own.
    let mut candidates: Vec<String> = reached
        .iter()
        .map(|s| s.primary_slot_name.clone())
        .filter(|n| !n.is_empty())
        .collect();
    if candidates.is_empty() {
        candidates = primary.physical_slots.iter().map(|p| p.name.clone()).collect();
    }
    candidates.dedup();
    if named.is_empty() {
        let value = if candidates.is_empty() {
            "<the standby's physical slot>".to_owned()
        } else {
            candidates.join(",")
        };
        out.push(statement_problem(
            Severity::Error,
            format!(
                "synchronized_standby_slots is not set on the primary: the relay may receive (and confirm) changes a \
                 standby has not received yet, and after a promotion they are gone. On the primary run \
                 `ALTER SYSTEM SET synchronized_standby_slots = {}; SELECT pg_reload_conf();`",
                escape_literal(&value)
            ),
        ));
    }
    for name in &named {
        match primary.physical_slots.iter().find(|p| &p.name == name) {
            None => out.push(statement_problem(
                Severity::Error,
                format!(
                    "synchronized_standby_slots names {name:?}, but the primary has no physical slot of that name \
                     (logical walsenders wait for it): on the primary run \
                     `SELECT pg_create_physical_replication_slot({});` and set primary_slot_name = {} on the standby",
                    escape_literal(name),
                    escape_literal(name)
                ),
            )),
            Some(p) if !p.active => out.push(statement_problem(
                Severity::Warning,
                format!(
                    "physical slot {name:?} (in synchronized_standby_slots) is not in use: its standby is not \
                     streaming, and the relay's stream waits for it"
                ),
            )),
            Some(_) => {}
        }
    }
    for s in &reached {
        let on = |what: &str| format!("on the standby at {}: {what}", s.server);
        let run = |sql: &str| format!(" Run there: `{sql}`");
        if s.server_version_num < 170000 {
            out.push(statement_problem(
                Severity::Error,
                on("PostgreSQL older than 17 cannot synchronise failover slots"),
            ));
            continue;
        }
        if !s.sync_replication_slots {
            out.push(statement_problem(
                Severity::Error,
                on("sync_replication_slots is off, so it keeps no copy of the relay's slot.")
                    + &run("ALTER SYSTEM SET sync_replication_slots = on; SELECT pg_reload_conf();"),
            ));
        }
        if !s.hot_standby_feedback {
            out.push(statement_problem(
                Severity::Error,
                on("hot_standby_feedback is off (slot synchronisation needs it).")
                    + &run("ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf();"),
            ));
        }
        if s.primary_slot_name.is_empty() {
            let suggested = format!("{}_standby", slot_name);
            out.push(statement_problem(
                Severity::Error,
                on("primary_slot_name is not set (slot synchronisation needs a physical slot on the primary). On the primary run ")
                    + &format!(
                        "`SELECT pg_create_physical_replication_slot({});`, then on the standby `ALTER SYSTEM SET \
                         primary_slot_name = {}; SELECT pg_reload_conf();` and add it to synchronized_standby_slots",
                        escape_literal(&suggested),
                        escape_literal(&suggested)
                    ),
            ));
        } else if !named.contains(&s.primary_slot_name) {
            let mut with = named.clone();
            with.push(s.primary_slot_name.clone());
            out.push(statement_problem(
                Severity::Error,
                format!(
                    "the standby at {} streams through physical slot {:?}, which synchronized_standby_slots on the \
                     primary does not name: the relay may get ahead of what a promotion of that standby keeps. On the \
                     primary run `ALTER SYSTEM SET synchronized_standby_slots = {}; SELECT pg_reload_conf();`",
                    s.server,
                    s.primary_slot_name,
                    escape_literal(&with.join(","))
                ),
            ));
        }
        match s.primary_conninfo_has_dbname {
            Some(false) => out.push(statement_problem(
                Severity::Error,
                on("primary_conninfo names no database (the slot-sync worker needs one).")
                    + &format!(
                        " Add `dbname={}` to it there: `ALTER SYSTEM SET primary_conninfo = '<its current value> \
                         dbname={}'; SELECT pg_reload_conf();`",
                        primary.database, primary.database
                    ),
            )),
            None => out.push(statement_problem(
                Severity::Warning,
                on("primary_conninfo cannot be read by this role (pg_read_all_settings): make sure it has dbname="),
            )),
            Some(true) => {}
        }
        if s.wal_level != "logical" {
            out.push(statement_problem(
                Severity::Error,
                on(&format!(
                    "wal_level is {:?}; slot synchronisation needs \"logical\".",
                    s.wal_level
                )) + &run("ALTER SYSTEM SET wal_level = logical;")
                    + " and restart the standby",
            ));
        }
    }
    for s in standbys {
        if let StandbyReach::NotReached { server, reason } = s {
            out.push(statement_problem(
                Severity::Warning,
                format!("cannot look at the standby at {server} ({reason}): its settings are not checked"),
            ));
        }
    }
    if standbys.is_empty() {
        out.push(statement_problem(
            Severity::Warning,
            "the relay's connection settings name one host, so it cannot look at the standbys' settings: list them \
             after the primary (`host: \"pg1,pg2\"` with target_session_attrs read-write) to have them checked"
                .into(),
        ));
    }
    out
}

/// A name as an identifier in a replication command (always quoted).
fn quote_ident_plain(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The state of one standby's copy of the relay's slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyState {
    /// `synced AND NOT temporary`: survives a promotion.
    Synced,
    /// Synchronised but still temporary: dropped at promotion.
    Temporary,
    /// No copy.
    Missing,
    /// A slot of that name that the sync worker does not maintain (`synced = false`).
    NotSynced,
    /// The copy was invalidated.
    Invalidated(String),
    /// The standby using this physical slot is not among the hosts the relay can look at.
    Unknown(String),
}

impl fmt::Display for CopyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyState::Synced => f.write_str("synced"),
            CopyState::Temporary => f.write_str("temporary"),
            CopyState::Missing => f.write_str("missing"),
            CopyState::NotSynced => f.write_str("not synced"),
            CopyState::Invalidated(r) => write!(f, "invalidated ({r})"),
            CopyState::Unknown(_) => f.write_str("unknown"),
        }
    }
}

/// One standby in [`Readiness`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StandbyReadiness {
    /// Its physical slot on the primary (as in `synchronized_standby_slots`).
    pub standby_slot: String,
    /// Where the relay reached it.
    pub server: Option<String>,
    /// `synced`, `temporary`, `missing`, `not synced`, `invalidated (…)` or `unknown`.
    pub state: String,
    /// Whether this copy survives a promotion now.
    pub safe: bool,
    /// The primary slot's `confirmed_flush_lsn` minus the copy's.
    pub lag_bytes: Option<u64>,
    /// Whether `synchronized_standby_slots` names it.
    pub named: bool,
}

/// Whether the failover slot is safe now.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Readiness {
    /// Every standby named in `synchronized_standby_slots` holds a synchronised, persisted copy
    /// (and there is at least one).
    pub safe: bool,
    pub standbys: Vec<StandbyReadiness>,
    /// Why not (empty when safe).
    pub reasons: Vec<String>,
}

/// Whether a promotion now keeps the relay's slot. Pure.
pub fn readiness(slot_name: &str, primary: &PrimaryFacts, standbys: &[StandbyReach]) -> Readiness {
    let mut reasons = Vec::new();
    let Some(slot) = &primary.slot else {
        return Readiness {
            safe: false,
            standbys: Vec::new(),
            reasons: vec![format!("replication slot {slot_name:?} does not exist on the primary")],
        };
    };
    if !slot.failover {
        reasons.push(format!(
            "replication slot {slot_name:?} is not a failover slot (created without failover = true): a promotion costs a resync"
        ));
    }
    let named = primary.synchronized_standby_slots.clone().unwrap_or_default();
    if named.is_empty() {
        reasons.push(
            "synchronized_standby_slots is not set on the primary: no standby is known to hold a copy of the slot, \
             and the relay may get ahead of what a promotion keeps"
                .to_owned(),
        );
    }
    let reached: Vec<&StandbyFacts> = standbys
        .iter()
        .filter_map(|s| match s {
            StandbyReach::Reached(f) => Some(f),
            StandbyReach::NotReached { .. } => None,
        })
        .collect();
    let lag = |copy: &SlotCopy| match (slot.confirmed_flush_lsn, copy.confirmed_flush_lsn) {
        (Some(p), Some(c)) => Some(p.0.saturating_sub(c.0)),
        _ => None,
    };
    let judge = |s: &StandbyFacts| -> (CopyState, Option<u64>) {
        match &s.slot {
            None => (CopyState::Missing, None),
            Some(c) if c.invalidation_reason.is_some() => (
                CopyState::Invalidated(c.invalidation_reason.clone().unwrap_or_default()),
                lag(c),
            ),
            Some(c) if !c.synced => (CopyState::NotSynced, lag(c)),
            Some(c) if c.temporary => (CopyState::Temporary, lag(c)),
            Some(c) => (CopyState::Synced, lag(c)),
        }
    };
    let mut out = Vec::new();
    for name in &named {
        let standby = reached.iter().find(|s| &s.primary_slot_name == name);
        let (state, lag_bytes, server) = match standby {
            Some(s) => {
                let (state, lag) = judge(s);
                (state, lag, Some(s.server.clone()))
            }
            None => (
                CopyState::Unknown(format!(
                    "the standby streaming through physical slot {name:?} is not among the relay's hosts, so its copy \
                     cannot be checked"
                )),
                None,
                None,
            ),
        };
        out.push((name.clone(), server, state, lag_bytes, true));
    }
    for s in reached.iter().filter(|s| !named.contains(&s.primary_slot_name)) {
        let (state, lag) = judge(s);
        out.push((s.primary_slot_name.clone(), Some(s.server.clone()), state, lag, false));
    }
    let mut standbys_out = Vec::new();
    for (name, server, state, lag_bytes, is_named) in out {
        let at = server.as_deref().map(|s| format!(" at {s}")).unwrap_or_default();
        let what = format!("standby{at} (physical slot {name:?})");
        let reason = match &state {
            CopyState::Synced => None,
            CopyState::Temporary => Some(format!(
                "{what} holds only a temporary copy of slot {slot_name:?}: a promotion now would drop it and cost a \
                 resync (it is persisted once the slot moves on the primary and the sync worker runs again)"
            )),
            CopyState::Missing => Some(format!(
                "{what} has no copy of slot {slot_name:?} (sync_replication_slots off, or not synchronised yet)"
            )),
            CopyState::NotSynced => Some(format!(
                "{what} has a slot named {slot_name:?} that is not a synchronised copy (synced = false)"
            )),
            CopyState::Invalidated(r) => Some(format!("{what}: its copy of slot {slot_name:?} is invalidated ({r})")),
            CopyState::Unknown(why) => Some(why.clone()),
        };
        if is_named && let Some(r) = reason {
            reasons.push(r);
        }
        standbys_out.push(StandbyReadiness {
            safe: state == CopyState::Synced && slot.failover,
            standby_slot: name,
            server,
            state: state.to_string(),
            lag_bytes,
            named: is_named,
        });
    }
    Readiness {
        safe: reasons.is_empty(),
        standbys: standbys_out,
        reasons,
    }
}

/// Lines for people (`status`, `check`): the verdict, then each standby with its copy's state
/// and lag. Pure.
pub fn readiness_lines(r: &Readiness) -> Vec<String> {
    let mut out = vec![if r.safe {
        "failover slot: safe (every standby in synchronized_standby_slots holds a synchronised, persisted copy)"
            .to_owned()
    } else {
        "failover slot: NOT SAFE YET (a promotion now would cost a resync)".to_owned()
    }];
    for s in &r.standbys {
        out.push(format!(
            "  standby {}{}: copy {}{}{}",
            s.standby_slot,
            s.server.as_deref().map(|x| format!(" at {x}")).unwrap_or_default(),
            s.state,
            s.lag_bytes.map(|l| format!(", {l} bytes behind")).unwrap_or_default(),
            if s.named {
                ""
            } else {
                " (not in synchronized_standby_slots)"
            }
        ));
    }
    for reason in &r.reasons {
        out.push(format!("  - {reason}"));
    }
    out
}

/// The one log line of a lost slot: what happened (`what`: the server's error), why PostgreSQL
/// invalidated it (`invalidation_reason`), or that it did not survive a promotion (`promotion`:
/// what the relay noticed about the new server), and what the relay does. Pure.
pub fn lost_slot_line(
    slot: &str,
    what: &str,
    invalidation_reason: Option<&str>,
    promotion: Option<&str>,
    resync: bool,
) -> String {
    let cause = match (invalidation_reason, promotion) {
        (Some(reason), _) => {
            let why = match reason {
                "idle_timeout" => {
                    " (it was unused for longer than idle_replication_slot_timeout, PostgreSQL 18: the relay was \
                     stopped or disconnected that long)"
                }
                "wal_removed" => " (the WAL it needed was removed: max_slot_wal_keep_size)",
                "rows_removed" => " (it conflicted with recovery: rows it needed were removed)",
                "wal_level_insufficient" => " (wal_level is no longer logical)",
                _ => "",
            };
            format!("PostgreSQL invalidated replication slot {slot:?}: invalidation_reason = {reason}{why}")
        }
        (None, Some(change)) => format!(
            "replication slot {slot:?} does not exist on the new server after a failover ({change}): no synchronised \
             copy survived the promotion (PostgreSQL older than 17, replication.failover off, a standby not \
             synchronising slots, or its copy still temporary)"
        ),
        (None, None) => format!("replication slot {slot:?} is missing or unusable"),
    };
    let then = if resync {
        "re-creating it and resyncing every appservice (nothing is lost: each gets its users' current account data)"
    } else {
        "replication.on_slot_lost = \"fail\": stopping"
    };
    format!(
        "the replication slot was lost: {cause}; changes since its last confirmed position are gone from the stream; {then} [{what}]"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary() -> PrimaryFacts {
        PrimaryFacts {
            server_version_num: 170006,
            database: "synapse".into(),
            synchronized_standby_slots: Some(vec!["sb1".into()]),
            physical_slots: vec![PhysicalSlot {
                name: "sb1".into(),
                active: true,
                restart_lsn: Some(Lsn(900)),
            }],
            slot: Some(SlotCopy {
                failover: true,
                confirmed_flush_lsn: Some(Lsn(1000)),
                ..Default::default()
            }),
        }
    }

    fn standby() -> StandbyFacts {
        StandbyFacts {
            server: "u@pg2:5432/synapse".into(),
            server_version_num: 170006,
            sync_replication_slots: true,
            hot_standby_feedback: true,
            primary_slot_name: "sb1".into(),
            primary_conninfo_has_dbname: Some(true),
            wal_level: "logical".into(),
            slot: Some(SlotCopy {
                failover: true,
                synced: true,
                temporary: false,
                confirmed_flush_lsn: Some(Lsn(800)),
                invalidation_reason: None,
            }),
        }
    }

    #[test]
    fn a_persisted_synchronised_copy_is_safe() {
        let r = readiness("relay", &primary(), &[StandbyReach::Reached(standby())]);
        assert!(r.safe, "{r:?}");
        assert_eq!(r.standbys[0].lag_bytes, Some(200));
        assert_eq!(r.standbys[0].state, "synced");
        assert!(setting_problems(true, "relay", &primary(), &[StandbyReach::Reached(standby())]).is_empty());
    }

    #[test]
    fn a_temporary_copy_is_the_window_that_costs_a_resync() {
        let mut s = standby();
        s.slot.as_mut().unwrap().temporary = true;
        let r = readiness("relay", &primary(), &[StandbyReach::Reached(s)]);
        assert!(!r.safe);
        assert!(r.reasons[0].contains("only a temporary copy"), "{r:?}");
        assert_eq!(r.standbys[0].state, "temporary");
        let mut s = standby();
        s.slot = None;
        let r = readiness("relay", &primary(), &[StandbyReach::Reached(s)]);
        assert!(!r.safe && r.reasons[0].contains("no copy"), "{r:?}");
        let mut s = standby();
        s.slot.as_mut().unwrap().invalidation_reason = Some("rows_removed".into());
        assert!(readiness("relay", &primary(), &[StandbyReach::Reached(s)]).reasons[0].contains("rows_removed"));
    }

    #[test]
    fn unknown_standbys_and_missing_settings_are_not_safe() {
        let r = readiness("relay", &primary(), &[]);
        assert!(!r.safe && r.reasons[0].contains("not among the relay's hosts"), "{r:?}");
        let mut p = primary();
        p.synchronized_standby_slots = Some(vec![]);
        let r = readiness("relay", &p, &[StandbyReach::Reached(standby())]);
        assert!(!r.safe && r.reasons[0].contains("synchronized_standby_slots"), "{r:?}");
        assert!(!r.standbys[0].named);
        let mut p = primary();
        p.slot.as_mut().unwrap().failover = false;
        let r = readiness("relay", &p, &[StandbyReach::Reached(standby())]);
        assert!(!r.safe && !r.standbys[0].safe);
        let mut p = primary();
        p.slot = None;
        assert!(!readiness("relay", &p, &[]).safe);
    }

    #[test]
    fn missing_settings_come_with_their_statements() {
        let mut p = primary();
        p.synchronized_standby_slots = Some(vec![]);
        p.slot.as_mut().unwrap().failover = false;
        let mut s = standby();
        s.sync_replication_slots = false;
        s.hot_standby_feedback = false;
        s.primary_conninfo_has_dbname = Some(false);
        s.wal_level = "replica".into();
        let found = setting_problems(true, "relay", &p, &[StandbyReach::Reached(s)]);
        let text: Vec<String> = found.iter().map(|p| p.message.clone()).collect();
        let all = text.join("\n");
        for needle in [
            "ALTER_REPLICATION_SLOT \"relay\" (FAILOVER true)",
            "ALTER SYSTEM SET synchronized_standby_slots = 'sb1'; SELECT pg_reload_conf();",
            "on the standby at u@pg2:5432/synapse: sync_replication_slots is off",
            "ALTER SYSTEM SET sync_replication_slots = on; SELECT pg_reload_conf();",
            "ALTER SYSTEM SET hot_standby_feedback = on;",
            "dbname=synapse",
            "ALTER SYSTEM SET wal_level = logical;",
            "which synchronized_standby_slots on the primary does not name",
        ] {
            assert!(all.contains(needle), "{needle} not in:\n{all}");
        }
        assert!(found.iter().all(|p| p.severity == Severity::Error), "{found:?}");
        // A physical slot named but missing, an unset primary_slot_name.
        let mut p = primary();
        p.physical_slots.clear();
        let mut s = standby();
        s.primary_slot_name.clear();
        let all: Vec<String> = setting_problems(true, "relay", &p, &[StandbyReach::Reached(s)])
            .into_iter()
            .map(|p| p.message)
            .collect();
        assert!(
            all.iter()
                .any(|m| m.contains("SELECT pg_create_physical_replication_slot('sb1');")),
            "{all:?}"
        );
        assert!(
            all.iter().any(|m| m.contains("primary_slot_name = 'relay_standby'")),
            "{all:?}"
        );
        // Older servers, and no failover wanted.
        let mut p = primary();
        p.server_version_num = 160000;
        assert!(
            setting_problems(true, "relay", &p, &[])[0]
                .message
                .contains("PostgreSQL 17")
        );
        let w = setting_problems(false, "relay", &primary(), &[StandbyReach::Reached(standby())]);
        assert!(w.len() == 1 && w[0].severity == Severity::Warning && w[0].message.contains("replication.failover"));
        assert!(setting_problems(false, "relay", &primary(), &[]).is_empty());
        // One host only: the standbys cannot be checked.
        assert!(
            setting_problems(true, "relay", &primary(), &[])[0]
                .message
                .contains("name one host")
        );
    }

    #[test]
    fn a_lost_slot_says_why_in_one_line() {
        let l = lost_slot_line("relay", "ERROR 55000 …", Some("idle_timeout"), None, true);
        assert!(
            l.contains("invalidation_reason = idle_timeout") && l.contains("idle_replication_slot_timeout"),
            "{l}"
        );
        assert!(l.contains("resyncing every appservice") && !l.contains('\n'), "{l}");
        let l = lost_slot_line("relay", "does not exist", None, Some("timeline 2 now"), true);
        assert!(
            l.contains("after a failover (timeline 2 now)") && l.contains("no synchronised copy"),
            "{l}"
        );
        let l = lost_slot_line("relay", "x", None, None, false);
        assert!(
            l.starts_with("the replication slot was lost: ") && l.contains("stopping"),
            "{l}"
        );
    }

    #[test]
    fn conninfo_dbname_is_found_without_keeping_the_text() {
        assert!(conninfo_has_dbname("host=pg1 user=rep password=secret dbname=postgres"));
        assert!(!conninfo_has_dbname("host=pg1 user=rep password=secret"));
        assert!(!conninfo_has_dbname("host=pg1 dbname="));
        assert!(conninfo_has_dbname(
            "postgresql://rep@pg1:5432/postgres?sslmode=require"
        ));
        assert!(!conninfo_has_dbname("postgresql://rep@pg1:5432"));
        assert_eq!(split_slot_list("sb1, \"sb2\",,"), vec!["sb1", "sb2"]);
    }
}
