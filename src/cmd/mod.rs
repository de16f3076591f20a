//! The subcommands: take in the parsed command line and the configuration files; give out each
//! subcommand's work (a running relay, a check, a plan applied) and its exit code.
//!
//! One file each. `main` parses the command line and maps the results to exit
//! codes: 0 success, 1 something is wrong (a failed check, a runtime failure), 2 a usage or
//! configuration error.

pub mod backfill;
pub mod check;
pub mod demo;
pub mod run;
pub mod setup;
pub mod status;
pub mod teardown;

use std::path::PathBuf;

use crate::config::{ConfigError, DEFAULT_SYNAPSE_CONFIG, RelayConfig, Settings, process_env};
use crate::setup::inspect::inspect;
use crate::setup::state::DatabaseState;

/// Exit status: a check found problems, or the relay failed at run time.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: bad command line or configuration.
pub const EXIT_CONFIG: u8 = 2;

/// Where the configuration comes from (shared by every subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Synapse's config: a file, or a directory whose *.yaml files are read in name order, as
    /// Synapse's own --config-path. Repeat for several; later files win. Default:
    /// /etc/matrix-synapse/homeserver.yaml and /etc/matrix-synapse/conf.d (when it exists).
    #[arg(long = "synapse-config", short = 'c', value_name = "PATH")]
    pub synapse_config: Vec<PathBuf>,
    /// The relay's own config file (TOML); every setting in it is optional.
    #[arg(long = "config", value_name = "FILE", env = "SYNAPSE_ACCOUNT_DATA_RELAY_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    /// The relay config (empty when no file is given) and its path (for messages).
    pub fn relay_config(&self) -> Result<(RelayConfig, PathBuf), ConfigError> {
        match &self.config {
            Some(p) => {
                let relay = RelayConfig::load(p)?;
                if let Some(w) = crate::config::config_file_warning(p, &relay) {
                    tracing::warn!("{w}");
                }
                Ok((relay, p.clone()))
            }
            None => Ok((RelayConfig::default(), PathBuf::from("(no relay config file)"))),
        }
    }

    /// Synapse's config paths: the command line, else the relay config, else the defaults.
    pub fn synapse_paths(&self, relay: &RelayConfig) -> Vec<PathBuf> {
        if !self.synapse_config.is_empty() {
            return self.synapse_config.clone();
        }
        if let Some(p) = &relay.synapse_config {
            return p.clone();
        }
        DEFAULT_SYNAPSE_CONFIG
            .iter()
            .map(PathBuf::from)
            .enumerate()
            .filter(|(i, p)| *i == 0 || p.exists())
            .map(|(_, p)| p)
            .collect()
    }

    /// Resolve everything.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let (relay, relay_path) = self.relay_config()?;
        Settings::resolve(&self.synapse_paths(&relay), &relay, &relay_path, &process_env)
    }
}

/// The prologue of `setup` and `teardown`: resolve the settings, connect, read the database's
/// state. On failure the error is printed and the exit code returned.
pub async fn connect_and_inspect(config: &ConfigArgs) -> Result<(Settings, tokio_postgres::Client, DatabaseState), u8> {
    let settings = config.settings().map_err(|e| {
        eprintln!("error: {e}");
        EXIT_CONFIG
    })?;
    let client = crate::postgres::sql::connect_sql(&settings.postgres)
        .await
        .map_err(|e| {
            eprintln!("error: cannot connect to PostgreSQL: {e}");
            EXIT_FAILURE
        })?;
    let state = inspect(&client, settings.names()).await.map_err(|e| {
        eprintln!("error: {e}");
        EXIT_FAILURE
    })?;
    Ok((settings, client, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped unit agrees with the exit codes and the credential name, and keeps the
    /// hardening the README describes.
    #[test]
    fn the_unit_matches_the_exit_codes_and_the_credential() {
        let unit = include_str!("../../examples/synapse-account-data-relay.service");
        let values = |key: &str| -> Vec<&str> {
            unit.lines()
                .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .collect()
        };
        // A configuration error is not retried (no restart loop on a bad config); a runtime
        // failure is.
        assert_eq!(values("RestartPreventExitStatus"), vec![EXIT_CONFIG.to_string()]);
        assert_ne!(EXIT_CONFIG, EXIT_FAILURE);
        assert_eq!(values("Restart"), vec!["always"]);
        assert_eq!(
            values("SystemCallFilter"),
            vec!["@system-service", "~@privileged @resources"]
        );
        assert_eq!(values("LimitNOFILE").len(), 1, "one LimitNOFILE= line");
        let nofile: u32 = values("LimitNOFILE")[0].parse().unwrap();
        assert!(nofile >= 4096, "{nofile}");
        // Synapse's group can read its signing key (Synapse writes it 0640): never given.
        assert_eq!(values("SupplementaryGroups"), vec!["synapse-account-data-relay"]);
        assert!(
            unit.lines().any(|l| l
                .trim_start_matches('#')
                .starts_with(&format!("LoadCredential={}:", crate::config::PASSWORD_CREDENTIAL))),
            "the unit shows how to load the password credential"
        );
    }
}
