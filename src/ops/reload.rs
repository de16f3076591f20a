//! SIGHUP: reload the relay config and the registration files without dropping the
//! replication connection.
//!
//! [`prepare`] runs off the replication task: it resolves the new [`Settings`] (every file
//! parsed), compiles the new [`Router`] (every regex), and reads which appservices have recorded
//! keys. Anything wrong and the reload is refused as a whole, the running configuration stays,
//! and the error (naming the file, key or pattern) is logged. A valid [`Reload`] is handed to the
//! replication task, which applies it at the next transaction boundary ([`plan`] says what
//! changes):
//!
//! - an **unchanged** appservice keeps its queue and worker;
//! - a **changed** one (URL, tokens, namespaces, sender, room account data, field names, push
//!   rules) keeps its queue,
//!   delivered from now on with the new settings; a transaction in flight at the switch is
//!   resent with its keys' current values. Changes before the reload were routed by the old
//!   namespaces, changes after it by the new ones;
//! - a **new** one starts like at start-up: live (or draining keys recorded for it earlier), with
//!   the first-opt-in backfill when it was never served;
//! - a **removed** one stops at once and its queued changes are let go: it no longer wants
//!   them, and they stop holding the slot. Keys recorded for it stay in the state schema and are
//!   delivered if it comes back.
//!
//! `retention.*` and `shutdown.timeout` apply at once. When the first appservice turns
//! `push_rules` on (or the last one off), the push-rules publication is added to (or dropped
//! from) the stream: the replication stream restarts with it, resuming after the last commit
//! received (nothing queued is lost or received twice). The database connection,
//! `replication.*`, `delivery.*` and `http.*` need a restart: a reload that changes them logs
//! which, and keeps the running values.

use std::collections::{BTreeSet, HashSet};

use crate::config::{AppserviceSettings, Settings};
use crate::postgres::config::PgConnectionConfig;
use crate::resync::store::StateStore;
use crate::routing::Router;

/// A validated new configuration.
pub struct Reload {
    pub settings: Settings,
    pub router: Router,
    /// Appservices with keys recorded in the state store (`None`: could not be read).
    pub with_pending: Option<HashSet<String>>,
}

/// What a reload changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Id, and what changed.
    pub changed: Vec<(String, Vec<&'static str>)>,
    /// Settings that changed but need a restart (their running values are kept).
    pub needs_restart: Vec<&'static str>,
    /// Settings applied at once besides the appservices.
    pub applied: Vec<&'static str>,
    /// The publications to stream changed (an appservice now wants push rules, or none does
    /// any more): the replication stream restarts with them, after the last commit received.
    pub restart_stream: bool,
}

/// How [`ReloadPlan::applied`] names a change of the streamed publications.
pub const PUSH_RULES_PUBLICATION_CHANGE: &str =
    "push-rules publication (the replication stream restarts after the last commit received)";

impl ReloadPlan {
    pub fn is_noop(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty() && self.applied.is_empty()
    }
}

/// What differs between two versions of an appservice (never the values: tokens stay out of logs).
pub fn appservice_changes(old: &AppserviceSettings, new: &AppserviceSettings) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.url != new.url {
        out.push("url");
    }
    if old.hs_token != new.hs_token {
        out.push("hs_token");
    }
    if old.user_regexes != new.user_regexes {
        out.push("namespaces.users");
    }
    if old.sender_user_id != new.sender_user_id {
        out.push("sender_localpart");
    }
    if old.room_account_data != new.room_account_data {
        out.push("room_account_data");
    }
    if old.field_names != new.field_names {
        out.push("field_names");
    }
    if old.push_rules != new.push_rules {
        out.push("push_rules");
    }
    if old.as_token != new.as_token {
        out.push("as_token");
    }
    if old.legacy_authorization != new.legacy_authorization {
        out.push("use_appservice_legacy_authorization");
    }
    if old.registration_path != new.registration_path {
        out.push("registration file");
    }
    out
}

/// Compare the running settings with new ones.
pub fn plan(old: &Settings, new: &Settings) -> ReloadPlan {
    let mut p = ReloadPlan::default();
    let old_ids: BTreeSet<&str> = old.appservices.iter().map(|a| a.id.as_str()).collect();
    let new_ids: BTreeSet<&str> = new.appservices.iter().map(|a| a.id.as_str()).collect();
    for a in &new.appservices {
        match old.appservices.iter().find(|o| o.id == a.id) {
            None => p.added.push(a.id.clone()),
            Some(o) => {
                let what = appservice_changes(o, a);
                if !what.is_empty() {
                    p.changed.push((a.id.clone(), what));
                }
            }
        }
    }
    p.removed = old_ids.difference(&new_ids).map(|s| s.to_string()).collect();
    if old.retention != new.retention {
        p.applied.push("retention");
    }
    if old.shutdown_timeout != new.shutdown_timeout {
        p.applied.push("shutdown.timeout");
    }
    // The push-rules publication is named in START_REPLICATION: only streamed when wanted.
    let wants_push_rules = |s: &Settings| s.appservices.iter().any(|a| a.push_rules);
    if wants_push_rules(old) != wants_push_rules(new) {
        p.applied.push(PUSH_RULES_PUBLICATION_CHANGE);
        p.restart_stream = true;
    }
    let restart: [(&'static str, bool); 14] = [
        ("postgres (the database connection)", old.postgres != new.postgres),
        ("replication.slot_name", old.slot_name != new.slot_name),
        (
            "replication.publication_name",
            old.publication_name != new.publication_name,
        ),
        (
            "replication.status_interval",
            old.status_interval != new.status_interval,
        ),
        ("replication.state_schema", old.state_schema != new.state_schema),
        (
            "replication.publication_name (push rules)",
            old.push_publication_name != new.push_publication_name,
        ),
        (
            "replication.timeout",
            old.replication_timeout != new.replication_timeout,
        ),
        ("synapse.client_url", old.client_url != new.client_url),
        ("replication.on_slot_lost", old.on_slot_lost != new.on_slot_lost),
        ("replication.failover", old.failover_slot != new.failover_slot),
        ("delivery", old.delivery != new.delivery),
        ("http.listen", old.http_listen != new.http_listen),
        (
            "http.header_read_timeout, idle_timeout or max_connections",
            old.http_limits != new.http_limits,
        ),
        ("server_name", old.server_name != new.server_name),
    ];
    p.needs_restart = restart.into_iter().filter(|(_, c)| *c).map(|(k, _)| k).collect();
    p
}

/// The settings to run with after a reload: the running ones, with what a reload may change
/// taken from `new`.
pub fn merged(running: &Settings, new: &Settings) -> Settings {
    let mut s = running.clone();
    s.appservices = new.appservices.clone();
    s.skipped = new.skipped.clone();
    s.retention = new.retention;
    s.shutdown_timeout = new.shutdown_timeout;
    s.synapse_files = new.synapse_files.clone();
    s
}

/// Validate a new configuration (see the module documentation). `pg` and `store` are the
/// running ones (they do not change without a restart). The error says what was wrong.
pub async fn prepare(
    resolve: impl FnOnce() -> Result<Settings, crate::config::ConfigError> + Send + 'static,
    pg: &PgConnectionConfig,
    store: &StateStore,
) -> Result<Reload, String> {
    let (settings, router) = tokio::task::spawn_blocking(move || {
        let settings = resolve().map_err(|e| e.to_string())?;
        let interests: Vec<_> = settings.appservices.iter().map(|a| a.interest()).collect();
        let router = Router::new(&interests).map_err(|e| e.to_string())?;
        Ok::<_, String>((settings, router))
    })
    .await
    .map_err(|e| format!("the reload task failed: {e}"))??;
    let ids: Vec<&str> = settings.appservices.iter().map(|a| a.id.as_str()).collect();
    let sql_timeout = crate::delivery::synapse_db::SQL_TIMEOUT;
    let with_pending = match crate::postgres::sql::connect_sql_bounded(pg, sql_timeout).await {
        Ok(c) => match tokio::time::timeout(sql_timeout, store.appservices_with_pending(&c, &ids))
            .await
            .unwrap_or_else(|_| {
                Err(crate::resync::store::StoreError {
                    what: "reading which appservices have recorded keys",
                    message: format!("no answer within {sql_timeout:?}"),
                    sqlstate: None,
                    connection_lost: true,
                })
            }) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "reload: cannot read which appservices have recorded keys; new ones start live");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "reload: cannot connect to read which appservices have recorded keys; new ones start live");
            None
        }
    };
    Ok(Reload {
        settings,
        router,
        with_pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::state::RetentionBudget;
    use crate::model::Secret;
    use std::time::Duration;

    fn a(id: &str, url: &str, token: &str) -> AppserviceSettings {
        AppserviceSettings {
            id: id.into(),
            url: url.into(),
            hs_token: Secret::new(token),
            sender_user_id: format!("@{id}:x"),
            user_regexes: vec![format!("@{id}_.*")],
            room_account_data: true,
            field_names: Default::default(),
            push_rules: false,
            as_token: Secret::new(format!("as-{id}")),
            legacy_authorization: false,
            registration_path: format!("{id}.yaml").into(),
        }
    }

    fn settings(appservices: Vec<AppserviceSettings>) -> Settings {
        Settings {
            server_name: "x".into(),
            postgres: crate::postgres::config::PgConnectionConfig {
                host: crate::postgres::hosts::PgHost::Tcp("localhost".into()),
                port: 5432,
                user: "u".into(),
                password: Some(Secret::new("pw")),
                dbname: "d".into(),
                ssl_mode: Default::default(),
                ssl_root_cert: None,
                application_name: "a".into(),
                connect_timeout: Duration::from_secs(1),
                ssl_client_cert: None,
                require_auth: Default::default(),
                channel_binding: Default::default(),
                options: None,
                keepalives: Default::default(),
                more_hosts: Vec::new(),
                target_session_attrs: Default::default(),
            },
            slot_name: "s".into(),
            publication_name: "p".into(),
            push_publication_name: "p_push_rules".into(),
            status_interval: Duration::from_secs(1),
            replication_timeout: Duration::from_secs(30),
            state_schema: "st".into(),
            on_slot_lost: Default::default(),
            failover_slot: false,
            retention: RetentionBudget {
                max_failing: Duration::from_secs(300),
                max_retained_bytes: 1,
                max_queued_keys: 10,
            },
            delivery: Default::default(),
            appservices,
            skipped: vec![],
            synapse_files: vec![],
            http_listen: None,
            http_limits: Default::default(),
            shutdown_timeout: Duration::from_secs(10),
            client_url: None,
        }
    }

    #[test]
    fn appservices_added_removed_changed_and_restart_only_settings() {
        let old = settings(vec![
            a("keep", "http://k", "t1"),
            a("gone", "http://g", "t2"),
            a("moved", "http://m", "t3"),
        ]);
        let mut new = settings(vec![
            a("keep", "http://k", "t1"),
            a("moved", "http://m2", "t3b"),
            a("fresh", "http://f", "t4"),
        ]);
        new.slot_name = "other".into();
        new.postgres.password = Some(Secret::new("pw2"));
        new.retention.max_retained_bytes = 2;
        let p = plan(&old, &new);
        assert_eq!(p.added, vec!["fresh".to_owned()]);
        assert_eq!(p.removed, vec!["gone".to_owned()]);
        assert_eq!(p.changed, vec![("moved".to_owned(), vec!["url", "hs_token"])]);
        assert_eq!(
            p.needs_restart,
            vec!["postgres (the database connection)", "replication.slot_name"]
        );
        assert_eq!(p.applied, vec!["retention"]);
        let m = merged(&old, &new);
        assert_eq!(m.slot_name, "s", "restart-only settings keep their running values");
        assert_eq!(m.postgres, old.postgres);
        assert_eq!(m.retention.max_retained_bytes, 2);
        assert_eq!(m.appservices.len(), 3);
        assert!(plan(&old, &old).is_noop());
        let mut budget = old.clone();
        budget.delivery.max_transaction_bytes = 4 << 20;
        assert_eq!(
            plan(&old, &budget).needs_restart,
            vec!["delivery"],
            "delivery.max_transaction_bytes needs a restart, like the other delivery settings"
        );
        assert!(!format!("{p:?}").contains("t3b"), "no token in the plan");
    }

    #[test]
    fn push_rules_turned_on_restarts_the_stream_with_its_publication() {
        let old = settings(vec![a("x", "http://x", "t1"), a("y", "http://y", "t2")]);
        let mut new = old.clone();
        new.appservices[0].push_rules = true;
        let p = plan(&old, &new);
        assert_eq!(p.changed, vec![("x".to_owned(), vec!["push_rules"])]);
        assert!(p.restart_stream, "{p:?}");
        assert!(p.applied.contains(&PUSH_RULES_PUBLICATION_CHANGE), "{p:?}");
        assert!(!p.is_noop());
        // A second appservice wanting push rules needs no new publication.
        let mut both = new.clone();
        both.appservices[1].push_rules = true;
        assert!(!plan(&new, &both).restart_stream);
        // The last one turning it off drops it.
        assert!(plan(&new, &old).restart_stream);
    }
}
