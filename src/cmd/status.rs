//! `status`: the slot's state and lag read from PostgreSQL, and each appservice's state from a
//! running relay's endpoint (`/status.json`) when one answers; a table, or `--json`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::cmd::{ConfigArgs, EXIT_CONFIG, EXIT_FAILURE};
use crate::ops::http::RelayStatus;
use crate::resync::store::StateStore;

/// Show the replication slot's state and lag, and what a running relay is doing.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Reads the slot from pg_replication_slots and the keys recorded for resync from the relay's \
state schema; asks the running relay's endpoint (`[http] listen`, or --endpoint) for each appservice's state. \
Exits 0 when the slot is healthy and the relay (if it has an endpoint) is ready, 1 otherwise.\n\n\
Examples:\n  synapse-account-data-relay status --config /etc/synapse-account-data-relay/config.toml\n  \
synapse-account-data-relay status --json --endpoint http://127.0.0.1:9109"
)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The running relay's endpoint. Default: `http://<[http] listen>` from the relay config.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
}

/// The slot as PostgreSQL sees it.
#[derive(Debug, Clone, Serialize)]
pub struct SlotFacts {
    pub name: String,
    pub exists: bool,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub wal_status: Option<String>,
    pub restart_lsn: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    pub server_wal_lsn: Option<String>,
    pub retained_wal_bytes: Option<i64>,
    pub confirmed_flush_lag_bytes: Option<i64>,
}

/// `status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub database: String,
    pub slot: Option<SlotFacts>,
    pub database_error: Option<String>,
    /// Keys recorded for resync, per appservice (from the state schema).
    pub recorded_keys: Option<BTreeMap<String, i64>>,
    pub endpoint: Option<String>,
    pub relay: Option<RelayStatus>,
    pub relay_error: Option<String>,
    pub healthy: bool,
    /// With `replication.failover`: whether a promotion now keeps the slot.
    pub failover: Option<crate::failover::slots::Readiness>,
}

/// How long each of `status`'s database reads may take.
const STATUS_SQL_TIMEOUT: Duration = Duration::from_secs(10);

const SLOT_FACTS_SQL: &str = "SELECT s.active, s.active_pid, s.wal_status, s.restart_lsn::text, \
     s.confirmed_flush_lsn::text, pg_current_wal_lsn()::text, \
     pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, \
     pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint \
     FROM pg_replication_slots s WHERE s.slot_name = $1";

async fn read_slot(c: &tokio_postgres::Client, name: &str) -> Result<SlotFacts, tokio_postgres::Error> {
    let rows = c.query(SLOT_FACTS_SQL, &[&name]).await?;
    let Some(r) = rows.first() else {
        return Ok(SlotFacts {
            name: name.into(),
            exists: false,
            active: false,
            active_pid: None,
            wal_status: None,
            restart_lsn: None,
            confirmed_flush_lsn: None,
            server_wal_lsn: None,
            retained_wal_bytes: None,
            confirmed_flush_lag_bytes: None,
        });
    };
    Ok(SlotFacts {
        name: name.into(),
        exists: true,
        active: r.try_get(0)?,
        active_pid: r.try_get(1)?,
        wal_status: r.try_get(2)?,
        restart_lsn: r.try_get(3)?,
        confirmed_flush_lsn: r.try_get(4)?,
        server_wal_lsn: r.try_get(5)?,
        retained_wal_bytes: r.try_get(6)?,
        confirmed_flush_lag_bytes: r.try_get(7)?,
    })
}

/// The endpoint URL for a listen address (a wildcard address is reached on loopback).
pub fn endpoint_for(addr: std::net::SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", std::net::SocketAddr::new(ip, addr.port()))
}

async fn fetch_relay(endpoint: &str) -> Result<RelayStatus, String> {
    crate::delivery::worker::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.without_url().to_string())?;
    let url = format!("{}/status.json", endpoint.trim_end_matches('/'));
    let shown = crate::config::redacted_url(&url);
    let resp = client.get(&url).send().await.map_err(|e| {
        format!(
            "no running relay answered at {}: {}",
            crate::config::redacted_url(endpoint),
            describe(e)
        )
    })?;
    if !resp.status().is_success() {
        return Err(format!("{shown} answered HTTP status {}", resp.status().as_u16()));
    }
    let body = resp.bytes().await.map_err(describe)?;
    serde_json::from_slice(&body).map_err(|e| format!("{shown} did not answer a relay status: {e}"))
}

fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A byte count for people.
pub fn human_bytes(n: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v.abs() >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

/// The table `status` prints.
pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    let line = |out: &mut String, s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    match (&r.slot, &r.database_error) {
        (_, Some(e)) => line(&mut out, format!("database {}: {e}", r.database)),
        (Some(s), None) if !s.exists => line(
            &mut out,
            format!("slot {}: does not exist in {} (run `setup`)", s.name, r.database),
        ),
        (Some(s), None) => {
            line(&mut out, format!("slot {} ({})", s.name, r.database));
            let state = if s.active {
                format!("streaming (walsender pid {})", dash(s.active_pid))
            } else {
                "not in use (no relay is streaming from it)".into()
            };
            line(
                &mut out,
                format!("  state       {state}, wal_status {}", dash(s.wal_status.as_ref())),
            );
            line(
                &mut out,
                format!(
                    "  confirmed   {}, {} behind the server ({})",
                    dash(s.confirmed_flush_lsn.as_ref()),
                    s.confirmed_flush_lag_bytes
                        .map(human_bytes)
                        .unwrap_or_else(|| "?".into()),
                    dash(s.server_wal_lsn.as_ref())
                ),
            );
            line(
                &mut out,
                format!(
                    "  retains     {} of WAL (since restart_lsn {})",
                    s.retained_wal_bytes.map(human_bytes).unwrap_or_else(|| "?".into()),
                    dash(s.restart_lsn.as_ref())
                ),
            );
        }
        (None, None) => {}
    }
    for l in r.failover.iter().flat_map(crate::failover::slots::readiness_lines) {
        line(&mut out, l);
    }
    match (&r.relay, &r.relay_error, &r.endpoint) {
        (Some(rel), _, Some(ep)) => {
            let state = if rel.replication_connected {
                "streaming"
            } else if rel.standby {
                "standby (another process holds the slot)"
            } else {
                "not connected"
            };
            line(
                &mut out,
                format!(
                    "relay {} at {ep}: {}, {state}, confirmed {}",
                    rel.version,
                    if rel.ready { "ready" } else { "NOT READY" },
                    rel.confirmed_lsn
                ),
            );
            for reason in &rel.reasons {
                line(&mut out, format!("  - {reason}"));
            }
        }
        (_, Some(e), _) => line(&mut out, format!("relay: {e}")),
        _ => line(
            &mut out,
            "relay: no endpoint configured ([http] listen or --endpoint); appservice states unknown".into(),
        ),
    }
    let mut rows: Vec<[String; 9]> = vec![[
        "APPSERVICE".into(),
        "STATUS".into(),
        "MODE".into(),
        "PENDING".into(),
        "OLDEST".into(),
        "RECORDED".into(),
        "SENT".into(),
        "FAILED".into(),
        "LAST ERROR".into(),
    ]];
    let recorded = |id: &str| r.recorded_keys.as_ref().and_then(|c| c.get(id).copied());
    match &r.relay {
        Some(rel) => {
            for a in &rel.appservices {
                rows.push([
                    a.id.clone(),
                    if a.up { "up".into() } else { "DOWN".into() },
                    a.mode.clone(),
                    a.pending_keys.to_string(),
                    a.oldest_pending_age_seconds
                        .map(|s| format!("{s:.1}s"))
                        .unwrap_or_else(|| "-".into()),
                    dash(recorded(&a.id).or(a.recorded_keys)),
                    a.transactions_sent.to_string(),
                    a.attempts_failed.to_string(),
                    if a.up {
                        "-".into()
                    } else {
                        a.last_error.clone().unwrap_or_else(|| "-".into())
                    },
                ]);
            }
        }
        None => {
            for (id, n) in r.recorded_keys.iter().flatten() {
                rows.push([
                    id.clone(),
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    n.to_string(),
                    "?".into(),
                    "?".into(),
                    "-".into(),
                ]);
            }
        }
    }
    if rows.len() > 1 {
        let widths: Vec<usize> = (0..9)
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let mut l = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i == 8 {
                    l.push_str(cell);
                } else {
                    l.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                }
            }
            line(&mut out, l.trim_end().to_owned());
        }
    }
    out
}

pub async fn status(args: &StatusArgs) -> u8 {
    let settings = match args.config.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_CONFIG;
        }
    };
    let mut report = StatusReport {
        database: settings.postgres.describe(),
        slot: None,
        database_error: None,
        recorded_keys: None,
        endpoint: args.endpoint.clone().or_else(|| settings.http_listen.map(endpoint_for)),
        relay: None,
        relay_error: None,
        healthy: false,
        failover: None,
    };
    // Every statement is bounded on the server (statement_timeout) and here (a partition).
    match crate::postgres::sql::connect_sql_bounded(&settings.postgres, STATUS_SQL_TIMEOUT).await {
        Ok(c) => {
            if settings.failover_slot {
                let inspect = crate::failover::inspect::report(&c, &settings.postgres, &settings.slot_name, true);
                match tokio::time::timeout(STATUS_SQL_TIMEOUT, inspect).await {
                    Ok(Ok((_, verdict))) => report.failover = verdict,
                    Ok(Err(e)) => {
                        report.database_error = Some(format!("cannot read whether the failover slot is safe: {e}"))
                    }
                    Err(_) => {
                        report.database_error = Some(format!(
                            "cannot read whether the failover slot is safe: no answer within {STATUS_SQL_TIMEOUT:?}"
                        ))
                    }
                }
            }
            match tokio::time::timeout(STATUS_SQL_TIMEOUT, read_slot(&c, &settings.slot_name)).await {
                Ok(Ok(s)) => report.slot = Some(s),
                Ok(Err(e)) => report.database_error = Some(format!("cannot read the replication slot: {e}")),
                Err(_) => {
                    report.database_error = Some(format!(
                        "cannot read the replication slot: no answer within {STATUS_SQL_TIMEOUT:?}"
                    ))
                }
            }
            let store = StateStore::new(&settings.state_schema);
            if let Ok(Ok(counts)) = tokio::time::timeout(STATUS_SQL_TIMEOUT, store.pending_counts(&c)).await {
                report.recorded_keys = Some(counts);
            }
        }
        Err(e) => report.database_error = Some(e.to_string()),
    }
    if let Some(ep) = report.endpoint.take() {
        match fetch_relay(&ep).await {
            Ok(r) => report.relay = Some(r),
            Err(e) => report.relay_error = Some(e),
        }
        // Shown in the table and the JSON: without credentials or tokens.
        report.endpoint = Some(crate::config::redacted_url(&ep));
    }
    let slot_ok = report
        .slot
        .as_ref()
        .is_some_and(|s| s.exists && s.wal_status.as_deref() != Some("lost"));
    let relay_ok = report.endpoint.is_none() || report.relay.as_ref().is_some_and(|r| r.ready);
    report.healthy = slot_ok && relay_ok && report.database_error.is_none();
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(t) => println!("{t}"),
            Err(e) => {
                eprintln!("error: cannot encode the status: {e}");
                return EXIT_FAILURE;
            }
        }
    } else {
        print!("{}", render(&report));
    }
    if report.healthy { 0 } else { EXIT_FAILURE }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_endpoints_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 + 1024 * 512), "3.5 MiB");
        assert_eq!(endpoint_for("0.0.0.0:9109".parse().unwrap()), "http://127.0.0.1:9109");
        assert_eq!(endpoint_for("[::]:9109".parse().unwrap()), "http://[::1]:9109");
        assert_eq!(endpoint_for("10.0.0.1:1".parse().unwrap()), "http://10.0.0.1:1");
    }

    #[test]
    fn the_table_without_a_relay_names_what_is_missing() {
        let r = StatusReport {
            database: "u@h:5432/d".into(),
            slot: Some(SlotFacts {
                name: "s".into(),
                exists: false,
                active: false,
                active_pid: None,
                wal_status: None,
                restart_lsn: None,
                confirmed_flush_lsn: None,
                server_wal_lsn: None,
                retained_wal_bytes: None,
                confirmed_flush_lag_bytes: None,
            }),
            database_error: None,
            recorded_keys: Some(BTreeMap::from([("bridge".to_owned(), 3)])),
            endpoint: None,
            relay: None,
            relay_error: None,
            healthy: false,
            failover: None,
        };
        let t = render(&r);
        assert!(t.contains("does not exist") && t.contains("run `setup`"), "{t}");
        assert!(t.contains("no endpoint configured"), "{t}");
        assert!(t.contains("bridge") && t.contains('3'), "{t}");
    }
}
