//! The relay's own configuration file (TOML, optional) and the resolved [`Settings`] the program
//! runs with.
//!
//! What the user wrote ([`RelayConfig`], every field optional) is kept apart from what the
//! program uses ([`Settings`]: durations parsed, files read, the database connection resolved,
//! the appservices to serve decided). Resolution order for each database setting: the relay
//! config's `[postgres]`, then Synapse's `database.args`, then libpq's environment variables
//! (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`),
//! then libpq's defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::delivery::state::RetentionBudget;
use crate::model::Secret;
use crate::pgconfig::{PgConnectionConfig, PgHost, SslMode};
use crate::synapse::files::{HomeserverConfig, Registration, SynapseFileError};

/// Default slot and publication name.
pub const DEFAULT_NAME: &str = "synapse_account_data_relay";
/// How long SIGTERM waits for requests in flight, unless `[shutdown] timeout` says otherwise.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// The push-rules publication's name for the default publication name.
pub const DEFAULT_PUSH_PUBLICATION: &str = "synapse_account_data_relay_push_rules";
/// Where Synapse's config lives on a Debian/Ubuntu install (the `matrix-synapse` package).
pub const DEFAULT_SYNAPSE_CONFIG: &[&str] = &["/etc/matrix-synapse/homeserver.yaml", "/etc/matrix-synapse/conf.d"];

/// What went wrong turning the configuration files into [`Settings`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Synapse(#[from] SynapseFileError),
    #[error("cannot read relay config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("relay config {path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("relay config {path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{message}")]
    Other { message: String },
}

/// A duration written as text (`"500ms"`, `"2s"`, `"5m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(ConfigDuration).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration like \"500ms\", \"2s\" or \"5m\": {e}"))
        })
    }
}

/// `[postgres]`: overrides of the connection Synapse's `database.args` describe.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password (e.g. a systemd credential); wins over `password`.
    pub password_file: Option<PathBuf>,
    pub dbname: Option<String>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<PathBuf>,
    pub connect_timeout: Option<ConfigDuration>,
    pub application_name: Option<String>,
}

/// `[replication]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    pub slot_name: Option<String>,
    pub publication_name: Option<String>,
    /// How often a standby status update is sent (at most 1 s).
    pub status_interval: Option<ConfigDuration>,
    /// How long the replication connection may stay silent before it is taken for dead (half
    /// way, the relay asks the server for a reply). Catches network partitions TCP would not
    /// report for many minutes.
    pub timeout: Option<ConfigDuration>,
    /// The schema of the relay's own tables in Synapse's database (created by `setup`).
    pub state_schema: Option<String>,
    /// What to do when the slot is invalidated or missing: `resync` (re-create it and resync
    /// every appservice) or `fail` (stop with an error).
    pub on_slot_lost: Option<SlotLostPolicy>,
    /// Create the slot with `failover = true` (PostgreSQL 17+), so it survives the promotion of
    /// a standby that synchronises slots.
    pub failover: Option<bool>,
}

/// `replication.on_slot_lost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotLostPolicy {
    #[default]
    Resync,
    Fail,
}

/// `[retention]`: what a failing appservice may hold back before its changes are reduced to
/// recorded keys and the slot moves on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// How long an appservice may fail before its pending changes are recorded as keys.
    pub max_failing: Option<ConfigDuration>,
    /// How much WAL one appservice may hold back (e.g. "256MiB").
    pub max_retained_wal: Option<ByteSize>,
    /// How many keys may wait, with their values, in memory for one appservice before they are
    /// recorded as keys instead (bounds memory for huge transactions).
    pub max_queued_keys: Option<usize>,
}

/// A size written as `"256MiB"`, `"1GB"`, `"512kB"` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like \"256MiB\""))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" | "kib" | "k" => 1 << 10,
            "mb" | "mib" | "m" => 1 << 20,
            "gb" | "gib" | "g" => 1 << 30,
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?} (use B, kB, MB or GB; 1 MB = 1024 kB as in PostgreSQL)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `[delivery]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySection {
    pub max_entries_per_transaction: Option<usize>,
    pub request_timeout: Option<ConfigDuration>,
    pub connect_timeout: Option<ConfigDuration>,
    pub retry_initial_delay: Option<ConfigDuration>,
    pub retry_max_delay: Option<ConfigDuration>,
    /// Extra root certificates (PEM) trusted for `https` appservice URLs, beside the system's.
    pub ca_file: Option<PathBuf>,
    /// Send an appservice that opts in for the first time the current account data of all its
    /// users (default true).
    pub backfill_new_appservices: Option<bool>,
}

/// `[appservices.<id>]`: per-appservice choices.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppserviceSection {
    /// `true` opts the appservice in (as the registration key would); `false` opts it out even if
    /// its registration opts in.
    pub account_data: Option<bool>,
    /// Send room account data and tags (`org.matrix.msc3682.room_account_data`). Default true.
    pub room_account_data: Option<bool>,
    /// Which field carries global account data: `unstable` (`org.matrix.msc3682.account_data`,
    /// the default), `stable` (`account_data`, once MSC3682 is merged) or `both`.
    pub field_names: Option<FieldNames>,
    /// Send the users' `m.push_rules` (fetched from Synapse's client API when they change).
    pub push_rules: Option<bool>,
}

pub use crate::delivery::transaction::FieldNames;

/// `[synapse]`: how to reach Synapse itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynapseSection {
    /// Base URL of Synapse's client API, for push rules (default: Synapse's client listener from
    /// homeserver.yaml).
    pub client_url: Option<String>,
    /// The directory Synapse runs in: Synapse opens relative `app_service_config_files` entries
    /// from its working directory, and so does the relay (Debian's and the docs' systemd units
    /// run Synapse in `/var/lib/matrix-synapse`). Default: the relay's own working directory; a
    /// relative value is taken from there too.
    pub working_directory: Option<PathBuf>,
}

impl SynapseSection {
    /// Where relative `app_service_config_files` entries are resolved (see `working_directory`).
    pub fn working_directory(&self) -> PathBuf {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        match &self.working_directory {
            Some(d) => cwd.join(d),
            None => cwd,
        }
    }
}

/// `[http]`: the operations endpoint (`/metrics`, `/healthz`, `/readyz`, `/status.json`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Address and port to listen on, e.g. `"127.0.0.1:9109"`. Absent: no endpoint.
    pub listen: Option<String>,
}

/// `[shutdown]`: what SIGTERM may wait for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSection {
    /// How long requests in flight may take to finish before they are given up (default 10s).
    pub timeout: Option<ConfigDuration>,
}

/// The relay's config file as written. Every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Synapse's config files/directories, used when `--synapse-config` is not given.
    pub synapse_config: Option<Vec<PathBuf>>,
    #[serde(default)]
    pub postgres: PostgresSection,
    #[serde(default)]
    pub replication: ReplicationSection,
    #[serde(default)]
    pub delivery: DeliverySection,
    #[serde(default)]
    pub retention: RetentionSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub shutdown: ShutdownSection,
    #[serde(default)]
    pub synapse: SynapseSection,
    #[serde(default)]
    pub appservices: BTreeMap<String, AppserviceSection>,
}

impl RelayConfig {
    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Toml {
            path: path.into(),
            message: e.to_string(),
        })
    }
}

/// Delivery settings, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverySettings {
    pub max_entries_per_transaction: usize,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub retry_initial_delay: Duration,
    pub retry_max_delay: Duration,
    pub ca_file: Option<PathBuf>,
    pub backfill_new_appservices: bool,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            max_entries_per_transaction: 100,
            // As Synapse: 60 s to the response.
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            // Synapse starts at 2 s; we cap at 5 minutes rather than Synapse's 512 s.
            retry_initial_delay: Duration::from_secs(2),
            retry_max_delay: Duration::from_secs(300),
            ca_file: None,
            backfill_new_appservices: true,
        }
    }
}

/// One appservice the relay delivers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppserviceSettings {
    pub id: String,
    pub url: String,
    pub hs_token: Secret,
    pub sender_user_id: String,
    pub user_regexes: Vec<String>,
    pub room_account_data: bool,
    pub field_names: FieldNames,
    /// Send `m.push_rules`, fetched with `as_token` from Synapse's client API.
    pub push_rules: bool,
    /// The appservice's token towards Synapse (to read push rules as its users).
    pub as_token: Secret,
    /// Also send `?access_token=` (Synapse's `use_appservice_legacy_authorization`).
    pub legacy_authorization: bool,
    pub registration_path: PathBuf,
}

impl AppserviceSettings {
    /// What the router needs to know about this appservice.
    pub fn interest(&self) -> crate::routing::AppserviceInterest {
        crate::routing::AppserviceInterest {
            id: self.id.clone(),
            sender_user_id: self.sender_user_id.clone(),
            user_regexes: self.user_regexes.clone(),
            source: self.registration_path.clone(),
        }
    }
}

/// `url` for logs and messages: a user name or password in it is replaced by `***`.
pub fn redacted_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("***");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) if url.contains('@') => "(an unparsable URL with credentials, not shown)".to_owned(),
        Err(_) => url.to_owned(),
    }
}

/// An appservice in Synapse's config that the relay does not serve, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedAppservice {
    pub id: String,
    pub registration_path: PathBuf,
    pub reason: String,
}

/// Everything the program runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server_name: String,
    pub postgres: PgConnectionConfig,
    pub slot_name: String,
    pub publication_name: String,
    /// `<publication_name>_push_rules`.
    pub push_publication_name: String,
    pub status_interval: Duration,
    pub replication_timeout: Duration,
    pub state_schema: String,
    pub on_slot_lost: SlotLostPolicy,
    pub failover_slot: bool,
    pub retention: RetentionBudget,
    pub delivery: DeliverySettings,
    pub appservices: Vec<AppserviceSettings>,
    pub skipped: Vec<SkippedAppservice>,
    pub synapse_files: Vec<PathBuf>,
    /// Where the operations endpoint listens (`[http] listen`); `None`: no endpoint.
    pub http_listen: Option<std::net::SocketAddr>,
    /// How long SIGTERM waits for requests in flight (`[shutdown] timeout`).
    pub shutdown_timeout: Duration,
    /// Synapse's client API (for push rules), when known.
    pub client_url: Option<String>,
}

impl Settings {
    /// The names of the slot, publication and state schema.
    pub fn names(&self) -> crate::provision::Names<'_> {
        crate::provision::Names {
            slot: &self.slot_name,
            publication: &self.publication_name,
            push_publication: &self.push_publication_name,
            state_schema: &self.state_schema,
            failover_slot: self.failover_slot,
        }
    }
}

/// Reads the environment variable `name` (libpq's fallbacks). Kept behind a function so tests
/// can resolve without touching the process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn invalid(path: &Path, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.into(),
        key: key.into(),
        message: message.into(),
    }
}

/// Is `name` usable as a replication slot name (lower-case letters, digits, underscore; ≤ 63)?
pub fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Settings {
    /// Resolve settings from Synapse's config files and the relay config (if any).
    pub fn resolve(
        synapse_paths: &[PathBuf],
        relay: &RelayConfig,
        relay_path: &Path,
        env: EnvLookup<'_>,
    ) -> Result<Settings, ConfigError> {
        let hs = HomeserverConfig::load(synapse_paths, &relay.synapse.working_directory())?;
        let postgres = resolve_postgres(&hs, &relay.postgres, relay_path, env)?;

        let slot_name = relay
            .replication
            .slot_name
            .clone()
            .unwrap_or_else(|| DEFAULT_NAME.into());
        if !valid_slot_name(&slot_name) {
            return Err(invalid(
                relay_path,
                "replication.slot_name",
                format!(
                    "{slot_name:?}: a slot name may hold only lower-case letters, digits and underscores (at most 63)"
                ),
            ));
        }
        let publication_name = relay
            .replication
            .publication_name
            .clone()
            .unwrap_or_else(|| DEFAULT_NAME.into());
        if publication_name.is_empty() || publication_name.len() > 52 {
            return Err(invalid(
                relay_path,
                "replication.publication_name",
                "must be 1 to 63 bytes",
            ));
        }
        let status_interval = relay
            .replication
            .status_interval
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(1));
        if status_interval.is_zero() || status_interval > Duration::from_secs(1) {
            return Err(invalid(
                relay_path,
                "replication.status_interval",
                "must be more than 0 and at most 1s",
            ));
        }

        let d = &relay.delivery;
        let defaults = DeliverySettings::default();
        let delivery = DeliverySettings {
            max_entries_per_transaction: d
                .max_entries_per_transaction
                .unwrap_or(defaults.max_entries_per_transaction),
            request_timeout: d.request_timeout.map(|x| x.0).unwrap_or(defaults.request_timeout),
            connect_timeout: d.connect_timeout.map(|x| x.0).unwrap_or(defaults.connect_timeout),
            retry_initial_delay: d
                .retry_initial_delay
                .map(|x| x.0)
                .unwrap_or(defaults.retry_initial_delay),
            retry_max_delay: d.retry_max_delay.map(|x| x.0).unwrap_or(defaults.retry_max_delay),
            ca_file: d.ca_file.clone(),
            backfill_new_appservices: d.backfill_new_appservices.unwrap_or(defaults.backfill_new_appservices),
        };
        let retention = RetentionBudget {
            max_failing: relay
                .retention
                .max_failing
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(300)),
            max_retained_bytes: relay.retention.max_retained_wal.map(|b| b.0).unwrap_or(256 << 20),
            max_queued_keys: relay.retention.max_queued_keys.unwrap_or(20_000),
        };
        let replication_timeout = relay
            .replication
            .timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(30));
        if replication_timeout < Duration::from_secs(2) {
            return Err(invalid(relay_path, "replication.timeout", "must be at least 2s"));
        }
        let state_schema = relay
            .replication
            .state_schema
            .clone()
            .unwrap_or_else(|| DEFAULT_NAME.into());
        if state_schema.is_empty() || state_schema.len() > 63 {
            return Err(invalid(relay_path, "replication.state_schema", "must be 1 to 63 bytes"));
        }
        if delivery.max_entries_per_transaction == 0 {
            return Err(invalid(
                relay_path,
                "delivery.max_entries_per_transaction",
                "must be at least 1",
            ));
        }
        if delivery.retry_initial_delay.is_zero() || delivery.retry_initial_delay > delivery.retry_max_delay {
            return Err(invalid(
                relay_path,
                "delivery.retry_initial_delay",
                "must be more than 0 and at most delivery.retry_max_delay",
            ));
        }
        if let Some(ca) = &delivery.ca_file
            && !ca.is_file()
        {
            return Err(invalid(
                relay_path,
                "delivery.ca_file",
                format!("{} is not a readable file", ca.display()),
            ));
        }

        let http_listen = match &relay.http.listen {
            None => None,
            Some(text) => Some(text.trim().parse::<std::net::SocketAddr>().map_err(|e| {
                invalid(
                    relay_path,
                    "http.listen",
                    format!("{text:?} is not an address and port like \"127.0.0.1:9109\" or \"[::1]:9109\": {e}"),
                )
            })?),
        };
        let shutdown_timeout = relay.shutdown.timeout.map(|d| d.0).unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
        if shutdown_timeout.is_zero() || shutdown_timeout > Duration::from_secs(600) {
            return Err(invalid(
                relay_path,
                "shutdown.timeout",
                "must be more than 0 and at most 10m",
            ));
        }

        let mut appservices = Vec::new();
        let mut skipped = Vec::new();
        let mut seen_ids = BTreeMap::new();
        for path in &hs.app_service_config_files {
            let reg = Registration::load(path)?;
            if let Some(other) = seen_ids.insert(reg.id.clone(), path.clone()) {
                return Err(ConfigError::Other {
                    message: format!(
                        "appservice id {:?} is registered twice, in {} and {} (Synapse refuses this too)",
                        reg.id,
                        other.display(),
                        path.display()
                    ),
                });
            }
            let section = relay.appservices.get(&reg.id);
            let skip = |reason: String| SkippedAppservice {
                id: reg.id.clone(),
                registration_path: path.clone(),
                reason,
            };
            let Some(url) = reg.url.clone() else {
                skipped.push(skip(
                    "its registration has `url: null`, so Synapse sends it nothing either".into(),
                ));
                continue;
            };
            match reqwest::Url::parse(&url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                Ok(u) => {
                    return Err(ConfigError::Other {
                        message: format!(
                            "{}: url {:?} must be http or https, not {:?}",
                            path.display(),
                            redacted_url(&url),
                            u.scheme()
                        ),
                    });
                }
                Err(e) => {
                    return Err(ConfigError::Other {
                        message: format!("{}: url {:?} is not a URL: {e}", path.display(), redacted_url(&url)),
                    });
                }
            }
            match (section.and_then(|s| s.account_data), reg.opt_in) {
                (Some(false), _) => {
                    skipped.push(skip(format!(
                        "opted out by `appservices.{}.account_data = false` in the relay config",
                        reg.id
                    )));
                    continue;
                }
                (Some(true), _) | (None, Some(true)) => {}
                (None, _) => {
                    skipped.push(skip(format!(
                        "not opted in: add `org.matrix.msc3682.account_data: true` to its registration, or \
                         `[appservices.{}] account_data = true` to the relay config",
                        reg.id
                    )));
                    continue;
                }
            }
            appservices.push(AppserviceSettings {
                sender_user_id: reg.sender_user_id(&hs.server_name),
                id: reg.id.clone(),
                url,
                hs_token: reg.hs_token.clone(),
                user_regexes: reg.user_namespaces.iter().map(|n| n.regex.clone()).collect(),
                room_account_data: section.and_then(|s| s.room_account_data).unwrap_or(true),
                field_names: section.and_then(|s| s.field_names).unwrap_or_default(),
                push_rules: section.and_then(|s| s.push_rules).unwrap_or(false),
                as_token: reg.as_token.clone(),
                legacy_authorization: hs.use_appservice_legacy_authorization,
                registration_path: path.clone(),
            });
        }
        let client_url = relay.synapse.client_url.clone().or_else(|| hs.client_url.clone());
        if let Some(u) = &client_url
            && !reqwest::Url::parse(u).is_ok_and(|u| u.scheme() == "http" || u.scheme() == "https")
        {
            return Err(invalid(
                relay_path,
                "synapse.client_url",
                format!("{u:?} is not an http(s) URL"),
            ));
        }
        if let Some(a) = appservices.iter().find(|a| a.push_rules)
            && client_url.is_none()
        {
            return Err(invalid(
                relay_path,
                &format!("appservices.{}.push_rules", a.id),
                "push rules are read from Synapse's client API, but homeserver.yaml has no client listener: set \
                 [synapse] client_url",
            ));
        }
        for id in relay.appservices.keys() {
            if !seen_ids.contains_key(id) {
                return Err(invalid(
                    relay_path,
                    &format!("appservices.{id}"),
                    format!(
                        "no appservice with id {id:?} is registered in Synapse's app_service_config_files ({})",
                        if seen_ids.is_empty() {
                            "none".to_owned()
                        } else {
                            seen_ids.keys().cloned().collect::<Vec<_>>().join(", ")
                        }
                    ),
                ));
            }
        }
        Ok(Settings {
            server_name: hs.server_name.clone(),
            postgres,
            slot_name,
            push_publication_name: format!("{publication_name}_push_rules"),
            publication_name,
            status_interval,
            replication_timeout,
            state_schema,
            on_slot_lost: relay.replication.on_slot_lost.unwrap_or_default(),
            failover_slot: relay.replication.failover.unwrap_or(false),
            retention,
            delivery,
            appservices,
            skipped,
            synapse_files: hs.files.clone(),
            http_listen,
            shutdown_timeout,
            client_url,
        })
    }
}

/// The database connection from Synapse's `database.args`, the relay's `[postgres]` and the environment.
pub fn resolve_postgres(
    hs: &HomeserverConfig,
    over: &PostgresSection,
    relay_path: &Path,
    env: EnvLookup<'_>,
) -> Result<PgConnectionConfig, ConfigError> {
    let args = &hs.database.args;
    let db_file = hs.files.last().cloned().unwrap_or_default();
    let host_text = over
        .host
        .clone()
        .or_else(|| args.host.clone())
        .or_else(|| env("PGHOST"));
    let host = match host_text {
        Some(h) if h.starts_with('/') => PgHost::UnixSocketDir(h.into()),
        Some(h) if !h.is_empty() => PgHost::Tcp(h),
        _ => {
            // libpq's default: the Unix socket directory it was built with (Debian's).
            if Path::new("/var/run/postgresql").is_dir() {
                PgHost::UnixSocketDir("/var/run/postgresql".into())
            } else {
                PgHost::Tcp("localhost".into())
            }
        }
    };
    let port = match over.port {
        Some(p) => p,
        None => match args.port.as_ref().map(|p| p.as_text()).or_else(|| env("PGPORT")) {
            Some(p) => p.trim().parse().map_err(|_| SynapseFileError::Invalid {
                path: db_file.clone(),
                message: format!("database.args.port {p:?} is not a port number"),
            })?,
            None => 5432,
        },
    };
    let user = over
        .user
        .clone()
        .or_else(|| args.user.clone())
        .or_else(|| env("PGUSER"))
        .or_else(|| env("USER"))
        .ok_or_else(|| ConfigError::Other {
            message:
                "no database user: set database.args.user in homeserver.yaml or [postgres] user in the relay config"
                    .into(),
        })?;
    let password = match &over.password_file {
        Some(f) => Some(Secret::new(
            std::fs::read_to_string(f)
                .map_err(|e| {
                    invalid(
                        relay_path,
                        "postgres.password_file",
                        format!("cannot read {}: {e}", f.display()),
                    )
                })?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        )),
        None => over
            .password
            .clone()
            .or_else(|| args.password.clone())
            .or_else(|| env("PGPASSWORD").map(Secret::new)),
    };
    let dbname = over
        .dbname
        .clone()
        .or_else(|| args.dbname.clone())
        .or_else(|| args.database.clone())
        .or_else(|| env("PGDATABASE"))
        .unwrap_or_else(|| user.clone());
    let sslmode_text = over
        .sslmode
        .clone()
        .or_else(|| args.sslmode.clone())
        .or_else(|| env("PGSSLMODE"));
    let ssl_mode = match sslmode_text {
        Some(s) => s
            .parse::<SslMode>()
            .map_err(|m| invalid(relay_path, "postgres.sslmode", m))?,
        None => SslMode::default(),
    };
    let ssl_root_cert = over
        .sslrootcert
        .clone()
        .or_else(|| args.sslrootcert.clone().map(PathBuf::from))
        .or_else(|| env("PGSSLROOTCERT").map(PathBuf::from))
        // libpq's `sslrootcert=system` means the system's trust roots.
        .filter(|p| p.as_os_str() != "system");
    let connect_timeout = match over.connect_timeout {
        Some(d) => d.0,
        None => args
            .connect_timeout
            .as_ref()
            .and_then(|t| t.as_text().trim().parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(10)),
    };
    Ok(PgConnectionConfig {
        host,
        port,
        user,
        password,
        dbname,
        ssl_mode,
        ssl_root_cert,
        application_name: over
            .application_name
            .clone()
            .unwrap_or_else(|| "synapse-account-data-relay".into()),
        connect_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new(registrations: &[(&str, &str)]) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let mut list = String::new();
            for (name, text) in registrations {
                std::fs::write(dir.path().join(name), text).unwrap();
                list.push_str(&format!("  - {}\n", dir.path().join(name).display()));
            }
            std::fs::write(
                dir.path().join("homeserver.yaml"),
                format!(
                    "server_name: example.org\ndatabase:\n  name: psycopg2\n  args:\n    user: synapse_user\n    password: dbsecret\n    dbname: synapse\n    host: db.internal\n    port: 5433\napp_service_config_files:\n{list}"
                ),
            )
            .unwrap();
            Fixture { dir }
        }
        fn resolve(&self, relay_toml: &str) -> Result<Settings, ConfigError> {
            let relay: RelayConfig = toml::from_str(relay_toml).map_err(|e| ConfigError::Toml {
                path: "relay.toml".into(),
                message: e.to_string(),
            })?;
            Settings::resolve(
                &[self.dir.path().join("homeserver.yaml")],
                &relay,
                Path::new("relay.toml"),
                &no_env,
            )
        }
    }

    fn reg(id: &str, url: &str, opt_in: &str) -> String {
        format!(
            "id: {id}\nurl: {url}\nas_token: as_{id}\nhs_token: hs_{id}\nsender_localpart: {id}bot\nnamespaces:\n  users:\n    - regex: '@{id}_.*'\n      exclusive: true\n{opt_in}"
        )
    }

    #[test]
    fn defaults_work_beside_a_stock_synapse() {
        let f = Fixture::new(&[(
            "a.yaml",
            &reg("a", "http://localhost:1", "org.matrix.msc3682.account_data: true\n"),
        )]);
        let s = f.resolve("").unwrap();
        assert_eq!(s.server_name, "example.org");
        assert_eq!(s.postgres.host, PgHost::Tcp("db.internal".into()));
        assert_eq!(s.postgres.port, 5433);
        assert_eq!(s.postgres.user, "synapse_user");
        assert_eq!(s.postgres.dbname, "synapse");
        assert_eq!(s.postgres.password.as_ref().map(|p| p.expose()), Some("dbsecret"));
        assert_eq!(s.slot_name, DEFAULT_NAME);
        assert_eq!(s.publication_name, DEFAULT_NAME);
        assert_eq!(s.status_interval, Duration::from_secs(1));
        assert_eq!(s.delivery.max_entries_per_transaction, 100);
        assert_eq!(s.delivery.retry_max_delay, Duration::from_secs(300));
        assert_eq!(s.appservices.len(), 1);
        let a = &s.appservices[0];
        assert_eq!(a.sender_user_id, "@abot:example.org");
        assert_eq!(a.user_regexes, vec!["@a_.*".to_owned()]);
        assert!(a.room_account_data);
    }

    #[test]
    fn opt_in_opt_out_and_null_url_are_decided_and_explained() {
        let f = Fixture::new(&[
            (
                "in.yaml",
                &reg("in", "http://localhost:1", "org.matrix.msc3682.account_data: yes\n"),
            ),
            ("quiet.yaml", &reg("quiet", "http://localhost:2", "")),
            ("byconfig.yaml", &reg("byconfig", "http://localhost:3", "")),
            (
                "out.yaml",
                &reg("out", "http://localhost:4", "org.matrix.msc3682.account_data: true\n"),
            ),
            (
                "nourl.yaml",
                &reg("nourl", "null", "org.matrix.msc3682.account_data: true\n"),
            ),
        ]);
        let s = f
            .resolve("[appservices.byconfig]\naccount_data = true\nroom_account_data = false\n[appservices.out]\naccount_data = false\n")
            .unwrap();
        let served: Vec<&str> = s.appservices.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(served, vec!["in", "byconfig"]);
        assert!(!s.appservices[1].room_account_data);
        let reasons: BTreeMap<&str, &str> = s.skipped.iter().map(|k| (k.id.as_str(), k.reason.as_str())).collect();
        assert!(reasons["quiet"].contains("not opted in"), "{reasons:?}");
        assert!(reasons["out"].contains("opted out"), "{reasons:?}");
        assert!(reasons["nourl"].contains("url: null"), "{reasons:?}");
    }

    #[test]
    fn relay_config_mistakes_are_named() {
        let f = Fixture::new(&[("a.yaml", &reg("a", "http://localhost:1", ""))]);
        let err = f
            .resolve("[appservices.typo]\naccount_data = true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("appservices.typo") && err.contains("a"), "{err}");
        let err = f
            .resolve("[delivery]\nretry_max_delay = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon"), "{err}");
        let err = f
            .resolve("[replication]\nslot_name = \"Bad-Name\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("slot_name"), "{err}");
        let err = f.resolve("[replicaton]\nslot_name = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("replicaton"), "{err}");
        let err = f
            .resolve("[postgres]\nsslmode = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sometimes"), "{err}");
    }

    #[test]
    fn postgres_overrides_and_environment_fallbacks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("hs.yaml"),
            "server_name: example.org\ndatabase:\n  name: psycopg2\n  args:\n    database: synapse\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "PGHOST" => Some("/run/pg".to_owned()),
            "PGUSER" => Some("envuser".to_owned()),
            "PGPORT" => Some("6543".to_owned()),
            _ => None,
        };
        let relay = RelayConfig::default();
        let s = Settings::resolve(&[dir.path().join("hs.yaml")], &relay, Path::new("r.toml"), &env).unwrap();
        assert_eq!(s.postgres.host, PgHost::UnixSocketDir("/run/pg".into()));
        assert_eq!(
            (s.postgres.port, s.postgres.user.as_str(), s.postgres.dbname.as_str()),
            (6543, "envuser", "synapse")
        );
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "from-file\n").unwrap();
        let relay: RelayConfig = toml::from_str(&format!(
            "[postgres]\nuser = \"relay\"\nhost = \"127.0.0.1\"\npassword_file = \"{}\"\nsslmode = \"verify-full\"\n",
            pw.display()
        ))
        .unwrap();
        let s = Settings::resolve(&[dir.path().join("hs.yaml")], &relay, Path::new("r.toml"), &env).unwrap();
        assert_eq!(s.postgres.user, "relay");
        assert_eq!(s.postgres.password.as_ref().map(|p| p.expose()), Some("from-file"));
        assert_eq!(s.postgres.ssl_mode, SslMode::VerifyFull);
        assert_eq!(s.postgres.host, PgHost::Tcp("127.0.0.1".into()));
    }

    #[test]
    fn retention_and_slot_settings() {
        let f = Fixture::new(&[("a.yaml", &reg("a", "http://localhost:1", ""))]);
        let s = f.resolve("").unwrap();
        assert_eq!(
            s.retention,
            RetentionBudget {
                max_failing: Duration::from_secs(300),
                max_retained_bytes: 256 << 20,
                max_queued_keys: 20_000
            }
        );
        assert_eq!(s.on_slot_lost, SlotLostPolicy::Resync);
        assert!(!s.failover_slot && s.delivery.backfill_new_appservices);
        let s = f
            .resolve("[retention]\nmax_failing = \"2s\"\nmax_retained_wal = \"1MB\"\n[replication]\non_slot_lost = \"fail\"\nfailover = true\n")
            .unwrap();
        assert_eq!(
            s.retention,
            RetentionBudget {
                max_failing: Duration::from_secs(2),
                max_retained_bytes: 1 << 20,
                max_queued_keys: 20_000
            }
        );
        assert_eq!(s.on_slot_lost, SlotLostPolicy::Fail);
        assert!(s.failover_slot);
        assert_eq!("512kB".parse::<ByteSize>(), Ok(ByteSize(512 << 10)));
        assert_eq!("1048576".parse::<ByteSize>(), Ok(ByteSize(1 << 20)));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        let err = f
            .resolve("[replication]\non_slot_lost = \"ignore\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ignore"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let f = Fixture::new(&[("a.yaml", &reg("a", "http://localhost:1", ""))]);
        let s = f.resolve(include_str!("../examples/config.toml")).unwrap();
        assert_eq!(s.http_listen, Some("127.0.0.1:9109".parse().unwrap()));
        assert_eq!(s.shutdown_timeout, Duration::from_secs(10));
    }

    #[test]
    fn credentials_in_urls_are_not_shown() {
        assert_eq!(
            redacted_url("https://u:pw@as.example:8/x"),
            "https://***@as.example:8/x"
        );
        assert_eq!(redacted_url("http://as.example/x"), "http://as.example/x");
        assert!(!redacted_url("http://u:pw@[bad").contains("pw"));
    }

    #[test]
    fn http_and_shutdown_settings() {
        let f = Fixture::new(&[("a.yaml", &reg("a", "http://localhost:1", ""))]);
        let s = f.resolve("").unwrap();
        assert_eq!(s.http_listen, None, "no endpoint unless configured");
        assert_eq!(s.shutdown_timeout, Duration::from_secs(10));
        let s = f
            .resolve("[http]\nlisten = \"127.0.0.1:9109\"\n[shutdown]\ntimeout = \"3s\"\n")
            .unwrap();
        assert_eq!(s.http_listen, Some("127.0.0.1:9109".parse().unwrap()));
        assert_eq!(s.shutdown_timeout, Duration::from_secs(3));
        let err = f.resolve("[http]\nlisten = \"localhost\"\n").unwrap_err().to_string();
        assert!(err.contains("http.listen") && err.contains("localhost"), "{err}");
        let err = f.resolve("[shutdown]\ntimeout = \"0s\"\n").unwrap_err().to_string();
        assert!(err.contains("shutdown.timeout"), "{err}");
        let err = f.resolve("[http]\nport = 1\n").unwrap_err().to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn settings_debug_output_holds_no_secret() {
        let f = Fixture::new(&[(
            "a.yaml",
            &reg("a", "http://localhost:1", "org.matrix.msc3682.account_data: true\n"),
        )]);
        let s = f.resolve("").unwrap();
        let text = format!("{s:?}");
        assert!(
            !text.contains("dbsecret") && !text.contains("hs_a") && !text.contains("as_a"),
            "{text}"
        );
    }
}
