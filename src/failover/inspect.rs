//! Reading what [`super::slots`] judges: the primary's `synchronized_standby_slots`, physical
//! slots and the relay's slot; each standby's settings and its copy of the slot. Standbys are the
//! other hosts of the relay's own connection settings (`host: "pg1,pg2"`), reached with
//! `target_session_attrs=standby`; a host that turns out to be a primary is skipped. Every query
//! is read-only, reads a catalog view or a setting, and is bounded by [`QUERY_TIMEOUT`].
//!
//! [`FailoverWatch`] is the running relay's view (every [`WATCH_INTERVAL`]): it feeds the
//! metrics, `/readyz`'s notes and `/status.json`, and logs when the verdict changes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::slots::{
    PhysicalSlot, PrimaryFacts, Readiness, SlotCopy, StandbyFacts, StandbyReach, conninfo_has_dbname, readiness,
    split_slot_list,
};
use crate::delivery::synapse_db::SynapseDb;
use crate::model::Lsn;
use crate::postgres::config::PgConnectionConfig;
use crate::postgres::hosts::TargetSessionAttrs;
use crate::postgres::sql::{SqlConnectErrorSource, connect_sql};

/// How long one of these queries may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the running relay looks again.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(10);

/// Why reading failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct InspectError {
    pub what: &'static str,
    pub message: String,
}

async fn bounded<T>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, InspectError> {
    match tokio::time::timeout(QUERY_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(InspectError {
            what,
            message: e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| e.to_string()),
        }),
        Err(_) => Err(InspectError {
            what,
            message: format!("no answer within {QUERY_TIMEOUT:?}"),
        }),
    }
}

fn lsn(text: Option<String>) -> Option<Lsn> {
    text.and_then(|t| t.parse().ok())
}

/// The slot's row, with the columns of PostgreSQL 17+ read through `to_jsonb` so one query
/// works on every version (a missing column reads as NULL).
const SLOT_COPY_SQL: &str = "SELECT coalesce((to_jsonb(s) ->> 'failover')::bool, false), \
     coalesce((to_jsonb(s) ->> 'synced')::bool, false), s.temporary, s.confirmed_flush_lsn::text, \
     to_jsonb(s) ->> 'invalidation_reason' \
     FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = $1";

async fn read_slot_copy(c: &tokio_postgres::Client, slot: &str) -> Result<Option<SlotCopy>, InspectError> {
    let rows = bounded("reading the replication slot", c.query(SLOT_COPY_SQL, &[&slot])).await?;
    Ok(rows.first().map(|r| SlotCopy {
        failover: r.get(0),
        synced: r.get(1),
        temporary: r.get(2),
        confirmed_flush_lsn: lsn(r.get(3)),
        invalidation_reason: r.get(4),
    }))
}

/// What the primary shows.
pub async fn read_primary(c: &tokio_postgres::Client, slot: &str) -> Result<PrimaryFacts, InspectError> {
    let row = bounded(
        "reading the primary's settings",
        c.query_one(
            "SELECT current_setting('server_version_num')::int, current_database()::text, \
                    current_setting('synchronized_standby_slots', true)",
            &[],
        ),
    )
    .await?;
    let version: i32 = row.get(0);
    let physical = bounded(
        "reading the physical slots",
        c.query(
            "SELECT slot_name::text, active, restart_lsn::text FROM pg_catalog.pg_replication_slots \
             WHERE slot_type = 'physical' ORDER BY slot_name",
            &[],
        ),
    )
    .await?;
    Ok(PrimaryFacts {
        server_version_num: version,
        database: row.get(1),
        synchronized_standby_slots: row.get::<_, Option<String>>(2).map(|v| split_slot_list(&v)),
        physical_slots: physical
            .iter()
            .map(|r| PhysicalSlot {
                name: r.get(0),
                active: r.get(1),
                restart_lsn: lsn(r.get(2)),
            })
            .collect(),
        slot: read_slot_copy(c, slot).await?,
    })
}

/// What a standby shows (`server`: where it was reached); `None` when the server is not in
/// recovery (a promoted standby is a primary now).
pub async fn read_standby(
    c: &tokio_postgres::Client,
    slot: &str,
    server: String,
) -> Result<Option<StandbyFacts>, InspectError> {
    let row = bounded(
        "reading the standby's settings",
        c.query_one(
            "SELECT current_setting('server_version_num')::int, \
                    coalesce(current_setting('sync_replication_slots', true), 'off') = 'on', \
                    current_setting('hot_standby_feedback') = 'on', current_setting('primary_slot_name'), \
                    current_setting('wal_level'), \
                    CASE WHEN pg_has_role('pg_read_all_settings', 'USAGE') \
                         THEN current_setting('primary_conninfo') END, \
                    pg_is_in_recovery()",
            &[],
        ),
    )
    .await?;
    if !row.get::<_, bool>(6) {
        return Ok(None);
    }
    // Only whether it names a database is kept: the text may hold a password.
    let has_dbname = row.get::<_, Option<String>>(5).map(|c| conninfo_has_dbname(&c));
    Ok(Some(StandbyFacts {
        server,
        server_version_num: row.get(0),
        sync_replication_slots: row.get(1),
        hot_standby_feedback: row.get(2),
        primary_slot_name: row.get(3),
        wal_level: row.get(4),
        primary_conninfo_has_dbname: has_dbname,
        slot: read_slot_copy(c, slot).await?,
    }))
}

/// Connects to `cfg.at(endpoint)` as a standby. `Ok(None)`: the host is a primary (the relay's
/// own, or a split brain), so it is not a standby to look at.
async fn connect_standby(one: &PgConnectionConfig) -> Result<Option<tokio_postgres::Client>, String> {
    match connect_sql(&one.with_target(TargetSessionAttrs::Standby)).await {
        Ok(c) => Ok(Some(c)),
        Err(e) => match &e.source {
            SqlConnectErrorSource::NoHostAccepted(all) if all.any_refused() => Ok(None),
            _ => Err(e.source.to_string()),
        },
    }
}

/// Looks at every host of `cfg` that is a standby (one connection each, closed afterwards).
pub async fn read_standbys(cfg: &PgConnectionConfig, slot: &str) -> Vec<StandbyReach> {
    read_standbys_with(cfg, slot, &mut StandbyClients::default()).await
}

/// Connections to the standbys kept between looks (by host), so a running relay does not open
/// new ones every time.
#[derive(Default)]
pub struct StandbyClients {
    clients: std::collections::HashMap<String, tokio_postgres::Client>,
}

/// As [`read_standbys`], reusing (and keeping) connections in `clients`.
pub async fn read_standbys_with(
    cfg: &PgConnectionConfig,
    slot: &str,
    clients: &mut StandbyClients,
) -> Vec<StandbyReach> {
    let mut out = Vec::new();
    if cfg.more_hosts.is_empty() {
        return out;
    }
    for endpoint in cfg.endpoints() {
        let one = cfg.at(&endpoint);
        let server = one.describe();
        let client = match clients.clients.remove(&server) {
            Some(c) if !c.is_closed() => Ok(Some(c)),
            _ => connect_standby(&one).await,
        };
        match client {
            Ok(None) => {}
            Ok(Some(c)) => match read_standby(&c, slot, server.clone()).await {
                // Still a standby? (A promoted one is a primary now: looked at again next time.)
                Ok(Some(f)) => {
                    clients.clients.insert(server, c);
                    out.push(StandbyReach::Reached(f));
                }
                Ok(None) => {}
                Err(e) => out.push(StandbyReach::NotReached {
                    server,
                    reason: e.to_string(),
                }),
            },
            Err(reason) => out.push(StandbyReach::NotReached { server, reason }),
        }
    }
    out
}

/// The history of `now`'s timeline (`TIMELINE_HISTORY`, bounded by [`QUERY_TIMEOUT`]), read on
/// the replication connection before streaming; `None` (logged) when it cannot be read.
pub async fn timeline_history(
    conn: &mut crate::replication::connection::ReplicationConnection,
    now: &super::timeline::ServerIdentity,
) -> Option<Vec<super::timeline::HistoryEntry>> {
    let command = format!("TIMELINE_HISTORY {}", now.timeline);
    let rows = match tokio::time::timeout(QUERY_TIMEOUT, conn.simple_query(&command)).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::warn!(server = %now.server, error = %e, "cannot read the new timeline's history (TIMELINE_HISTORY)");
            return None;
        }
        Err(_) => {
            tracing::warn!(server = %now.server, "cannot read the new timeline's history: no answer within {QUERY_TIMEOUT:?}");
            return None;
        }
    };
    rows.first()
        .and_then(|r| r.get(1).cloned().flatten())
        .map(|content| super::timeline::parse_timeline_history(&content))
}

/// What `check`, `setup` and `status` say about failover: the missing settings (with their
/// statements) and, with `replication.failover`, whether the slot is safe now. `client` is
/// connected to the primary; the standbys are the other hosts of `cfg`.
pub async fn report(
    client: &tokio_postgres::Client,
    cfg: &PgConnectionConfig,
    slot: &str,
    failover_wanted: bool,
) -> Result<(Vec<crate::setup::checks::Problem>, Option<Readiness>), InspectError> {
    let primary = read_primary(client, slot).await?;
    let standbys = read_standbys(cfg, slot).await;
    let problems = super::slots::setting_problems(failover_wanted, slot, &primary, &standbys);
    let verdict = failover_wanted.then(|| readiness(slot, &primary, &standbys));
    Ok((problems, verdict))
}

/// The running relay's latest verdict.
#[derive(Debug, Default)]
pub struct FailoverWatch {
    latest: Mutex<Option<(Readiness, SystemTime)>>,
}

impl FailoverWatch {
    pub fn get(&self) -> Option<(Readiness, SystemTime)> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, r: Readiness) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some((r, SystemTime::now()));
    }

    /// Lines for `/readyz` (they do not make the relay unready: it delivers all the same).
    pub fn notes(&self) -> Vec<String> {
        match self.get() {
            Some((r, _)) if !r.safe => r
                .reasons
                .iter()
                .map(|x| format!("failover slot not safe yet: {x}"))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Looks at the primary (through `db`) and the standbys every [`WATCH_INTERVAL`] until `stop`,
/// and logs when the verdict changes.
pub async fn watch(
    db: Arc<SynapseDb>,
    cfg: PgConnectionConfig,
    slot: String,
    metrics: Arc<crate::ops::metrics::Metrics>,
    cell: Arc<FailoverWatch>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last: Option<(bool, Vec<String>)> = None;
    let mut error_logged = false;
    let mut clients = StandbyClients::default();
    loop {
        let primary = match db.client().await {
            Ok(c) => read_primary(&c, &slot).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match primary {
            Ok(p) => {
                error_logged = false;
                let standbys = read_standbys_with(&cfg, &slot, &mut clients).await;
                let r = readiness(&slot, &p, &standbys);
                metrics.failover.set(&r);
                let now = (r.safe, r.reasons.clone());
                if last.as_ref() != Some(&now) {
                    if r.safe {
                        let names: Vec<String> = r
                            .standbys
                            .iter()
                            .filter(|s| s.named)
                            .map(|s| s.standby_slot.clone())
                            .collect();
                        tracing::info!(slot = %slot, standbys = %names.join(", "), "the failover slot is safe: every standby in synchronized_standby_slots holds a synchronised, persisted copy (a promotion keeps the slot)");
                    } else {
                        tracing::warn!(slot = %slot, reasons = %r.reasons.join("; "), "the failover slot is not safe yet: a promotion now would cost a resync");
                    }
                    last = Some(now);
                }
                cell.set(r);
            }
            Err(e) => {
                if !error_logged {
                    tracing::warn!(error = %e, "cannot read whether the failover slot is safe; retrying");
                    error_logged = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
