//! `check`: validate everything without changing anything, and list all that is wrong.

use std::path::Path;

use crate::cmd::{ConfigArgs, EXIT_CONFIG, EXIT_FAILURE};
use crate::config::Names;
use crate::config::{Settings, process_env, resolve_postgres};
use crate::postgres::config::{PgConnectionConfig, SslMode};
use crate::replication::connection::{AuthMethod, ReplicationConnection};
use crate::routing::{AppserviceInterest, Router};
use crate::setup::checks::{Severity, problems};
use crate::setup::inspect::inspect;
use crate::synapse::files::{HomeserverConfig, Registration};

/// Validate config, registrations, connectivity and the database; exit 1 listing what is wrong.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  synapse-account-data-relay check --synapse-config /etc/matrix-synapse/homeserver.yaml"
)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

struct Report {
    errors: usize,
}

impl Report {
    fn ok(&self, what: impl std::fmt::Display) {
        println!("ok       {what}");
    }
    fn warn(&self, what: impl std::fmt::Display) {
        println!("warning  {what}");
    }
    fn fail(&mut self, what: impl std::fmt::Display) {
        self.errors += 1;
        println!("FAIL     {what}");
    }
}

pub async fn check(args: &CheckArgs) -> u8 {
    let mut r = Report { errors: 0 };
    let (relay, relay_path) = match args.config.relay_config() {
        Ok(x) => x,
        Err(e) => {
            r.fail(e);
            return EXIT_CONFIG;
        }
    };
    if args.config.config.is_some() {
        r.ok(format!("relay config {} parses", relay_path.display()));
    }
    let paths = args.config.synapse_paths(&relay);
    let hs = match HomeserverConfig::load(&paths, &relay.synapse.working_directory()) {
        Ok(h) => {
            r.ok(format!(
                "Synapse config ({}): server_name {:?}, {} appservice registration(s)",
                h.files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                h.server_name,
                h.app_service_config_files.len()
            ));
            h
        }
        Err(e) => {
            r.fail(e);
            return EXIT_CONFIG;
        }
    };
    let mut registrations_ok = true;
    for (path, entry) in hs.app_service_config_files.iter().zip(&hs.app_service_config_entries) {
        match Registration::load(path) {
            Ok(_) if Path::new(entry).is_relative() => r.ok(format!(
                "registration {} read (app_service_config_files entry {entry:?}{}, relative to Synapse's working \
                 directory {}: set [synapse] working_directory if Synapse runs elsewhere)",
                path.display(),
                hs.app_service_config_named_in
                    .as_ref()
                    .map(|f| format!(" in {}", f.display()))
                    .unwrap_or_default(),
                hs.working_directory.display()
            )),
            Ok(_) => r.ok(format!("registration {} read", path.display())),
            Err(e) => {
                registrations_ok = false;
                r.fail(e);
            }
        }
    }
    let settings = match Settings::resolve(&paths, &relay, &relay_path, &process_env) {
        Ok(s) => {
            for a in &s.appservices {
                r.ok(format!(
                    "appservice {:?} is served ({}), {} user namespace(s)",
                    a.id,
                    crate::config::redacted_url(&a.url),
                    a.user_regexes.len()
                ));
            }
            for k in &s.skipped {
                r.ok(format!("appservice {:?} is skipped: {}", k.id, k.reason));
            }
            let interests: Vec<AppserviceInterest> = s.appservices.iter().map(|a| a.interest()).collect();
            match Router::new(&interests) {
                Ok(router) => {
                    r.ok("all users namespace regexes compile");
                    for w in router.warnings() {
                        r.warn(format!("appservice {:?}: {:?}: {}", w.appservice, w.pattern, w.message));
                    }
                }
                Err(e) => r.fail(e),
            }
            Some(s)
        }
        Err(e) => {
            if registrations_ok {
                r.fail(e);
            }
            None
        }
    };
    let pg = match &settings {
        Some(s) => s.postgres.clone(),
        None => match resolve_postgres(&hs, &relay.postgres, &relay_path, &process_env) {
            Ok(p) => p,
            Err(e) => {
                r.fail(e);
                return EXIT_FAILURE;
            }
        },
    };
    let default_names = Names::defaults();
    let names = settings.as_ref().map(|s| s.names()).unwrap_or(default_names);
    let (slot, publication) = (names.slot, names.publication);
    match crate::postgres::sql::connect_sql(&pg).await {
        Ok(client) => {
            r.ok(format!("connected to PostgreSQL at {}", pg.describe()));
            match inspect(&client, names).await {
                Ok(state) => {
                    let found = problems(&state, names);
                    for p in &found {
                        match p.severity {
                            Severity::Warning => r.warn(&p.message),
                            Severity::NeedsSetup => r.fail(format!("{} (run `setup`)", p.message)),
                            Severity::Error => r.fail(&p.message),
                        }
                    }
                    if found.iter().all(|p| p.severity == Severity::Warning) {
                        r.ok(format!(
                            "PostgreSQL {}: wal_level logical, tables have replica identity, publication {publication:?} and slot {slot:?} ready",
                            state.server_version
                        ));
                        if let Some(s) = &state.slot
                            && let Some(c) = s.confirmed_flush_lsn
                        {
                            r.ok(format!(
                                "slot {slot:?}: {}, confirmed up to {c}, {} bytes of WAL behind the server",
                                if s.active { "streaming" } else { "not in use" },
                                state.current_wal_lsn.0.saturating_sub(c.0)
                            ));
                        }
                    }
                }
                Err(e) => r.fail(e),
            }
            match crate::failover::inspect::report(&client, &pg, slot, names.failover_slot).await {
                Ok((found, verdict)) => {
                    for p in &found {
                        match p.severity {
                            Severity::Warning => r.warn(&p.message),
                            _ => r.fail(&p.message),
                        }
                    }
                    if names.failover_slot && found.iter().all(|p| p.severity == Severity::Warning) {
                        r.ok("failover: the settings a promotion without a resync needs are in place on the primary and the standbys reached");
                    }
                    // Not safe *yet* is a window (after setup, after a re-created slot), not a
                    // misconfiguration: a warning.
                    if let Some(v) = verdict {
                        let lines = crate::failover::slots::readiness_lines(&v);
                        if v.safe {
                            lines.iter().for_each(|l| r.ok(l));
                        } else {
                            lines.iter().for_each(|l| r.warn(l));
                        }
                    }
                }
                Err(e) => r.fail(format!("cannot read the failover settings: {e}")),
            }
            match crate::setup::inspect::inspect_run_role(&client, names).await {
                Ok(role) => {
                    let found = crate::setup::privileges::run_role_problems(&role, names);
                    for p in &found {
                        match p.severity {
                            Severity::Warning => r.warn(&p.message),
                            _ => r.fail(&p.message),
                        }
                    }
                    if found.is_empty() {
                        r.ok(format!(
                            "role {:?} holds what `run` needs and no more (not a superuser, owns none of Synapse's tables)",
                            role.name
                        ));
                    }
                }
                Err(e) => r.fail(e),
            }
        }
        Err(e) => r.fail(format!("cannot connect to PostgreSQL: {e}")),
    }
    match ReplicationConnection::connect(&pg).await {
        Ok(mut conn) => match conn.identify_system().await {
            Ok(id) => {
                r.ok(format!(
                    "replication connection works (IDENTIFY_SYSTEM: timeline {}, WAL at {}; {}, authenticated by {})",
                    id.timeline,
                    id.xlogpos,
                    if conn.is_tls() { "TLS" } else { "no TLS" },
                    conn.auth_method_used()
                ));
                if let Some(w) = cleartext_password_warning(&pg, conn.auth_method_used(), conn.is_tls()) {
                    r.warn(w);
                }
                conn.close().await;
            }
            Err(e) => r.fail(format!("replication connection: {e}")),
        },
        Err(e) => r.fail(format!("cannot open a replication connection: {e}")),
    }
    if r.errors > 0 {
        println!("{} problem(s) found", r.errors);
        EXIT_FAILURE
    } else {
        println!("everything is ready");
        0
    }
}

/// A warning when the server asked for the password in cleartext (pg_hba `password`) over a
/// connection whose peer was not verified: whoever sits in between can read it.
pub fn cleartext_password_warning(pg: &PgConnectionConfig, method: AuthMethod, tls: bool) -> Option<String> {
    if method != AuthMethod::Cleartext {
        return None;
    }
    let verified = tls && pg.ssl_root_cert.is_some() && pg.ssl_mode == SslMode::VerifyFull;
    if verified {
        return None;
    }
    let how = if !tls {
        "without TLS".to_owned()
    } else {
        format!(
            "over TLS whose certificate is not fully verified (sslmode={}{})",
            pg.ssl_mode.as_str(),
            if pg.ssl_root_cert.is_none() {
                ", no sslrootcert"
            } else {
                ""
            }
        )
    };
    Some(format!(
        "the server asked for the password in cleartext (pg_hba method `password`) {how}: anyone in between can read it. \
         Use scram-sha-256 in pg_hba.conf (and require_auth = \"scram-sha-256\"), or sslmode=verify-full with sslrootcert"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_about_cleartext_passwords_on_unverified_connections() {
        let mut pg = PgConnectionConfig::new(crate::postgres::hosts::PgHost::Tcp("db".into()), 5432, "u", "d");
        assert!(cleartext_password_warning(&pg, AuthMethod::ScramSha256, false).is_none());
        assert!(cleartext_password_warning(&pg, AuthMethod::Md5, false).is_none());
        let w = cleartext_password_warning(&pg, AuthMethod::Cleartext, false).unwrap();
        assert!(w.contains("without TLS"), "{w}");
        pg.ssl_mode = SslMode::Require;
        let w = cleartext_password_warning(&pg, AuthMethod::Cleartext, true).unwrap();
        assert!(w.contains("sslmode=require, no sslrootcert"), "{w}");
        pg.ssl_mode = SslMode::VerifyFull;
        pg.ssl_root_cert = Some("/etc/ssl/ca.crt".into());
        assert!(cleartext_password_warning(&pg, AuthMethod::Cleartext, true).is_none());
    }
}
