//! Which server the relay is streaming from, and what changed since the last connection: a
//! promotion (a later timeline of the same cluster), a former primary (an earlier timeline: split
//! brain), or another cluster (a different system identifier: a restored backup, a new server
//! behind the same address). Pure: the pipeline passes `IDENTIFY_SYSTEM`'s answer and, after a
//! timeline switch, `TIMELINE_HISTORY`'s file.
//!
//! The rule that matters: the relay never confirms a position that belongs to another timeline's
//! history. After any change it drops what it holds in memory (nothing of it was confirmed) and
//! resumes from the slot's own confirmed position on the new server, with every appservice in
//! recording mode, so what the old primary had sent past that position is sent again, with
//! current values.

use crate::model::Lsn;

/// The server a replication connection reached (from `IDENTIFY_SYSTEM`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerIdentity {
    pub system_id: String,
    pub timeline: u32,
    /// Where it was reached (`PgConnectionConfig::describe()` of the host).
    pub server: String,
}

/// What a new connection's server is, compared with the last one streamed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerChange {
    /// The first connection of this process: nothing to compare.
    First,
    /// The same cluster on the same timeline (a reconnect, maybe through another host).
    Same,
    /// The same cluster on a later timeline: a standby was promoted.
    Promoted {
        from: u32,
        to: u32,
        /// Where timeline `from` ended in the new server's history (`None` when its history
        /// file could not be read).
        switch_point: Option<Lsn>,
        /// The relay had received changes from the old primary past the switch point: they are
        /// not in the new primary's history (the standby never received them).
        received_past_switch: Option<Lsn>,
    },
    /// The same cluster on an earlier timeline than one already streamed from: a former
    /// primary that was not turned into a standby (split brain). Not streamed from.
    FormerPrimary { streamed: u32, now: u32 },
    /// Another cluster (a different system identifier).
    OtherCluster { was: String, now: String },
}

impl ServerChange {
    /// Whether what the relay holds in memory belongs to another history than the new
    /// server's, so the session must start again from the slot's own position.
    pub fn restarts_session(&self) -> bool {
        matches!(self, ServerChange::Promoted { .. } | ServerChange::OtherCluster { .. })
    }

    /// One log line saying what happened, or `None` when nothing did.
    pub fn describe(&self, now: &ServerIdentity) -> Option<String> {
        Some(match self {
            ServerChange::First | ServerChange::Same => return None,
            ServerChange::Promoted {
                from,
                to,
                switch_point,
                received_past_switch,
            } => {
                let mut line = format!(
                    "PostgreSQL at {} is on timeline {to}, the relay streamed timeline {from} before: a standby was \
                     promoted{}; resuming from the slot's confirmed position on the new primary, every appservice in \
                     recording mode (what the old primary sent past it is sent again, with current values)",
                    now.server,
                    switch_point
                        .map(|s| format!(" (timeline {from} ended at {s})"))
                        .unwrap_or_default()
                );
                if let (Some(received), Some(switch)) = (received_past_switch, switch_point) {
                    line.push_str(&format!(
                        "; the old primary had sent changes up to {received}, past the switch point {switch}: the new \
                         primary never had them (set synchronized_standby_slots on the primary to prevent this), so \
                         every appservice is resynced"
                    ));
                }
                line
            }
            ServerChange::FormerPrimary { streamed, now: tli } => format!(
                "PostgreSQL at {} is on timeline {tli}, older than timeline {streamed} the relay already streamed \
                 from: it is a former primary that was not turned into a standby (split brain?); not streaming from it",
                now.server
            ),
            ServerChange::OtherCluster { was, now: id } => format!(
                "PostgreSQL at {} is another cluster (system identifier {id}, the relay streamed from {was} before: a \
                 restored backup, or a new server behind the same address); resuming from the slot's confirmed \
                 position there, every appservice in recording mode. If the database went back in time, resync the \
                 appservices with `backfill`",
                now.server
            ),
        })
    }
}

/// Compares the server reached now with the last one streamed from. `history` is the new
/// timeline's history (see [`parse_timeline_history`]) when it is later than the last one;
/// `received` the end of the last commit the relay received from the old server.
pub fn assess(
    last: Option<&ServerIdentity>,
    now: &ServerIdentity,
    history: Option<&[HistoryEntry]>,
    received: Lsn,
) -> ServerChange {
    let Some(last) = last else {
        return ServerChange::First;
    };
    if last.system_id != now.system_id {
        return ServerChange::OtherCluster {
            was: last.system_id.clone(),
            now: now.system_id.clone(),
        };
    }
    if now.timeline < last.timeline {
        return ServerChange::FormerPrimary {
            streamed: last.timeline,
            now: now.timeline,
        };
    }
    if now.timeline == last.timeline {
        return ServerChange::Same;
    }
    let switch_point = history.and_then(|h| h.iter().find(|e| e.timeline == last.timeline).map(|e| e.switch_point));
    ServerChange::Promoted {
        from: last.timeline,
        to: now.timeline,
        switch_point,
        received_past_switch: switch_point.filter(|s| received > *s).map(|_| received),
    }
}

/// One line of a timeline history file: timeline `timeline` ended at `switch_point`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub timeline: u32,
    pub switch_point: Lsn,
}

/// A timeline history file (`TIMELINE_HISTORY`'s `content`): lines `<parent tli>\t<switch
/// LSN>\t<reason>`, comments starting with `#`. Lines that do not parse are skipped.
pub fn parse_timeline_history(content: &str) -> Vec<HistoryEntry> {
    content
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let timeline = fields.next()?.parse().ok()?;
            let switch_point = fields.next()?.parse().ok()?;
            Some(HistoryEntry { timeline, switch_point })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(system: &str, tli: u32) -> ServerIdentity {
        ServerIdentity {
            system_id: system.into(),
            timeline: tli,
            server: "u@pg2:5432/synapse".into(),
        }
    }

    #[test]
    fn history_files_parse() {
        let h = parse_timeline_history(
            "1\t0/3000158\tno recovery target specified\n\n# c\n2\t0/5A000000\tbefore 2000-01-01\nx y\n",
        );
        assert_eq!(
            h,
            vec![
                HistoryEntry {
                    timeline: 1,
                    switch_point: Lsn(0x3000158)
                },
                HistoryEntry {
                    timeline: 2,
                    switch_point: Lsn(0x5A00_0000)
                }
            ]
        );
    }

    #[test]
    fn changes_are_recognised() {
        let one = id("7001", 1);
        assert_eq!(assess(None, &one, None, Lsn(5)), ServerChange::First);
        assert_eq!(assess(Some(&one), &id("7001", 1), None, Lsn(5)), ServerChange::Same);
        let history = parse_timeline_history("1\t0/100\tx\n");
        // Promoted, the relay behind the switch point: nothing from another history.
        let c = assess(Some(&one), &id("7001", 2), Some(&history), Lsn(0x80));
        assert_eq!(
            c,
            ServerChange::Promoted {
                from: 1,
                to: 2,
                switch_point: Some(Lsn(0x100)),
                received_past_switch: None
            }
        );
        assert!(c.restarts_session());
        let line = c.describe(&id("7001", 2)).unwrap();
        assert!(
            line.contains("timeline 1 ended at 0/100") && !line.contains("resynced"),
            "{line}"
        );
        // Promoted, the relay past the switch point: those changes were another history.
        let c = assess(Some(&one), &id("7001", 2), Some(&history), Lsn(0x180));
        assert!(matches!(
            c,
            ServerChange::Promoted {
                received_past_switch: Some(Lsn(0x180)),
                ..
            }
        ));
        assert!(
            c.describe(&id("7001", 2))
                .unwrap()
                .contains("every appservice is resynced")
        );
        // Two promotions while the relay was away: the entry of the timeline it streamed.
        let history = parse_timeline_history("1\t0/100\tx\n2\t0/200\ty\n");
        let c = assess(Some(&one), &id("7001", 3), Some(&history), Lsn(0x150));
        assert!(matches!(
            c,
            ServerChange::Promoted {
                switch_point: Some(Lsn(0x100)),
                received_past_switch: Some(_),
                ..
            }
        ));
        // No history readable: still a promotion.
        let c = assess(Some(&one), &id("7001", 2), None, Lsn(0x180));
        assert!(matches!(
            c,
            ServerChange::Promoted {
                switch_point: None,
                received_past_switch: None,
                ..
            }
        ));
        // A former primary, and another cluster.
        let c = assess(Some(&id("7001", 2)), &one, None, Lsn(1));
        assert_eq!(c, ServerChange::FormerPrimary { streamed: 2, now: 1 });
        assert!(!c.restarts_session());
        assert!(c.describe(&one).unwrap().contains("split brain"));
        let c = assess(Some(&one), &id("9009", 1), None, Lsn(1));
        assert!(c.restarts_session());
        assert!(c.describe(&id("9009", 1)).unwrap().contains("system identifier 9009"));
    }
}
