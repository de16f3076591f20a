//! The relay's own configuration file (TOML, optional) and the resolved [`Settings`] the program
//! runs with.
//!
//! What the user wrote ([`RelayConfig`], every field optional) is kept apart from what the
//! program uses ([`Settings`]: durations parsed, files read, the database connection resolved,
//! the appservices to serve decided). Resolution order for each database setting: the relay
//! config's `[postgres]`, then Synapse's `database.args`, then libpq's environment variables
//! (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`,
//! `PGSSLCERT`, `PGSSLKEY`, `PGREQUIREAUTH`, `PGCHANNELBINDING`), then libpq's defaults
//! (including `~/.postgresql/root.crt` as the default `sslrootcert`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::delivery::state::RetentionBudget;
use crate::model::Secret;
use crate::postgres::config::{
    ChannelBindingMode, ClientCert, Keepalives, PgConnectionConfig, RequireAuth, SYSTEM_ROOT_CERTS, SslMode,
};
use crate::postgres::hosts::PgHost;
use crate::synapse::files::{HomeserverConfig, IntOrString, Registration, SynapseFileError};

/// Default slot and publication name.
pub const DEFAULT_NAME: &str = "synapse_account_data_relay";
/// How long SIGTERM waits for requests in flight, unless `[shutdown] timeout` says otherwise.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// The push-rules publication's name for the default publication name.
pub const DEFAULT_PUSH_PUBLICATION: &str = "synapse_account_data_relay_push_rules";
/// Where Synapse's config lives on a Debian/Ubuntu install (the `matrix-synapse` package).
pub const DEFAULT_SYNAPSE_CONFIG: &[&str] = &["/etc/matrix-synapse/homeserver.yaml", "/etc/matrix-synapse/conf.d"];

/// Names the relay works with.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    pub slot: &'a str,
    pub publication: &'a str,
    /// The publication of `push_rules_stream` (inserts only).
    pub push_publication: &'a str,
    pub state_schema: &'a str,
    /// Whether the slot is (to be) created with `failover = true` (PostgreSQL 17+).
    pub failover_slot: bool,
}

impl Names<'static> {
    /// The names a relay config that names none uses (the shipped SQL, `check` without a config).
    pub fn defaults() -> Names<'static> {
        Names {
            slot: DEFAULT_NAME,
            publication: DEFAULT_NAME,
            push_publication: DEFAULT_PUSH_PUBLICATION,
            state_schema: DEFAULT_NAME,
            failover_slot: false,
        }
    }
}

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
    /// One host, or several tried in order (`"pg1,pg2"`, as libpq).
    pub host: Option<String>,
    /// A port, or one per host (`"5432,5433"`).
    pub port: Option<IntOrString>,
    /// libpq's `target_session_attrs`: `any` (read as `primary`), `read-write` or `primary`.
    pub target_session_attrs: Option<String>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password; wins over `password`. Refused if others have any access to
    /// it, or its group has unless root owns it (see [`secret_file_problem`]).
    pub password_file: Option<PathBuf>,
    pub dbname: Option<String>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<PathBuf>,
    /// A client certificate (PEM) and its key, as libpq's `sslcert`/`sslkey`.
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    /// libpq's `require_auth`, e.g. `"scram-sha-256"`.
    pub require_auth: Option<String>,
    /// libpq's `channel_binding`: `disable`, `prefer` or `require`.
    pub channel_binding: Option<String>,
    pub connect_timeout: Option<ConfigDuration>,
    pub application_name: Option<String>,
    /// libpq's `options` (e.g. `"-c statement_timeout=0"`).
    pub options: Option<String>,
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
    /// The most request-body bytes per transaction (default 1 MiB); a larger batch is split, and a
    /// single larger entry is sent alone.
    pub max_transaction_bytes: Option<ByteSize>,
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
    /// How long a client may take to send a request's headers, from the connection's start or
    /// the previous answer (default 10s).
    pub header_read_timeout: Option<ConfigDuration>,
    /// A connection with no bytes read or written for this long is closed (default 60s).
    pub idle_timeout: Option<ConfigDuration>,
    /// Connections served at once; more wait to be accepted (default 64).
    pub max_connections: Option<usize>,
}

/// The operations endpoint's limits (`[http]`), so that whoever can reach it cannot hold the
/// relay's file descriptors with idle or slow connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
        }
    }
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
        parse_relay_config(&text).map_err(|message| ConfigError::Toml {
            path: path.into(),
            message,
        })
    }
}

/// Parse the relay config's text. The error gives the position, the key and toml's message,
/// never the offending line (toml's own `Display` quotes it, and it may hold the password).
pub fn parse_relay_config(text: &str) -> Result<RelayConfig, String> {
    toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| crate::redact::line_and_column(text, s.start));
        crate::redact::parse_error(
            text,
            crate::redact::Syntax::Toml,
            at.map(|a| a.0),
            at.map(|a| a.1),
            e.message(),
        )
    })
}

/// Delivery settings, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverySettings {
    pub max_entries_per_transaction: usize,
    /// See [`DEFAULT_MAX_TRANSACTION_BYTES`].
    pub max_transaction_bytes: usize,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub retry_initial_delay: Duration,
    pub retry_max_delay: Duration,
    pub ca_file: Option<PathBuf>,
    pub backfill_new_appservices: bool,
}

/// The default body budget of one transaction: 1 MiB. Appservice frameworks cap request bodies:
/// aiohttp, under mautrix-python, refuses more than 1 MiB unless told otherwise, and
/// matrix-appservice-node (under matrix-appservice-bridge) more than 5 MB.
pub const DEFAULT_MAX_TRANSACTION_BYTES: usize = 1 << 20;

/// The smallest `delivery.max_transaction_bytes` accepted.
pub const MIN_MAX_TRANSACTION_BYTES: u64 = 4 << 10;

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            max_entries_per_transaction: 100,
            max_transaction_bytes: DEFAULT_MAX_TRANSACTION_BYTES,
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
    /// The registration's `url` without trailing `/`s (as Synapse strips them).
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

/// `url` for logs and messages, without credentials, query values or token-like path segments
/// (see [`crate::redact::url`]).
pub use crate::redact::url as redacted_url;

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
    /// Its timeouts and connection limit.
    pub http_limits: HttpLimits,
    /// How long SIGTERM waits for requests in flight (`[shutdown] timeout`).
    pub shutdown_timeout: Duration,
    /// Synapse's client API (for push rules), when known.
    pub client_url: Option<String>,
}

impl Settings {
    /// The names of the slot, publication and state schema.
    pub fn names(&self) -> Names<'_> {
        Names {
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
            max_transaction_bytes: match d.max_transaction_bytes {
                None => defaults.max_transaction_bytes,
                Some(ByteSize(n)) if (MIN_MAX_TRANSACTION_BYTES..=1 << 30).contains(&n) => n as usize,
                Some(_) => {
                    return Err(invalid(
                        relay_path,
                        "delivery.max_transaction_bytes",
                        "must be at least 4kB and at most 1GB",
                    ));
                }
            },
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
        let http_limits = {
            let d = HttpLimits::default();
            let limits = HttpLimits {
                header_read_timeout: relay.http.header_read_timeout.map_or(d.header_read_timeout, |t| t.0),
                idle_timeout: relay.http.idle_timeout.map_or(d.idle_timeout, |t| t.0),
                max_connections: relay.http.max_connections.unwrap_or(d.max_connections),
            };
            for (key, value) in [
                ("http.header_read_timeout", limits.header_read_timeout),
                ("http.idle_timeout", limits.idle_timeout),
            ] {
                if value.is_zero() || value > Duration::from_secs(3600) {
                    return Err(invalid(
                        relay_path,
                        key,
                        format!("{value:?} must be more than 0 and at most 1h"),
                    ));
                }
            }
            if !(1..=10_000).contains(&limits.max_connections) {
                return Err(invalid(
                    relay_path,
                    "http.max_connections",
                    format!("{} must be between 1 and 10000", limits.max_connections),
                ));
            }
            limits
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
            // As Synapse (`url.rstrip("/")`): every path is appended after a `/` of its own.
            let Some(url) = reg.url.as_deref().map(|u| u.trim_end_matches('/').to_owned()) else {
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
                format!("{:?} is not an http(s) URL", redacted_url(u)),
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
            http_limits,
            shutdown_timeout,
            client_url,
        })
    }
}

/// The name of the systemd credential (`LoadCredential=postgres-password:/path`) read as the
/// database password, from `$CREDENTIALS_DIRECTORY`, when the relay config names no password.
pub const PASSWORD_CREDENTIAL: &str = "postgres-password";

/// Why a file holding a secret (`postgres.password_file`) may not be used, or `None`. As libpq
/// for a private key (and stricter than for `.pgpass` only where root owns the file): no access
/// for others at all, and for the group only read access to a file owned by root (the usual
/// `root:<service group> 0640`).
pub fn secret_file_problem(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o777;
    let fix = "make it 0600 and owned by the relay's user, or 0640 owned by root, or hand it over with \
               systemd's LoadCredential= (see the README)";
    if mode & 0o007 != 0 {
        return Some(format!(
            "holds a password but other users have access to it (mode {mode:04o}): {fix}"
        ));
    }
    if mode & 0o070 != 0 && (meta.uid() != 0 || mode & 0o030 != 0) {
        return Some(format!(
            "holds a password but its group has access to it (mode {mode:04o}, owner uid {}): {fix}",
            meta.uid()
        ));
    }
    None
}

/// A warning when the relay config at `path` holds `[postgres] password` and every local user
/// can read it (the Debian package installs it `0640 root:synapse-account-data-relay`).
pub fn config_file_warning(path: &Path, relay: &RelayConfig) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    relay.postgres.password.as_ref()?;
    let mode = std::fs::metadata(path).ok()?.mode() & 0o777;
    (mode & 0o004 != 0).then(|| {
        format!(
            "relay config {} holds [postgres] password and every local user can read it (mode {mode:04o}): \
             chmod 0640 it (group: the relay's), or move the password to postgres.password_file or a systemd \
             credential",
            path.display()
        )
    })
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
    let host_set = over
        .host
        .clone()
        .map(|h| (h, from_relay_key(relay_path, "host")))
        .or_else(|| args.host.clone().map(|h| (h, from_synapse_key(&db_file, "host"))))
        .or_else(|| env("PGHOST").map(|h| (h, "the environment variable PGHOST".to_owned())));
    let port_set = over
        .port
        .as_ref()
        .map(|p| (p.as_text(), from_relay_key(relay_path, "port")))
        .or_else(|| {
            args.port
                .as_ref()
                .map(|p| (p.as_text(), from_synapse_key(&db_file, "port")))
        })
        .or_else(|| env("PGPORT").map(|p| (p, "the environment variable PGPORT".to_owned())));
    // libpq's default host: the Unix socket directory it was built with (Debian's).
    let default_host = || {
        if Path::new("/var/run/postgresql").is_dir() {
            PgHost::UnixSocketDir("/var/run/postgresql".into())
        } else {
            PgHost::Tcp("localhost".into())
        }
    };
    let mut endpoints = crate::postgres::hosts::parse_endpoints(
        host_set.as_ref().map(|(h, _)| h.as_str()),
        port_set.as_ref().map(|(p, _)| p.as_str()),
        &default_host,
    )
    .map_err(|message| {
        let origin = match (&host_set, &port_set) {
            (Some((h, ho)), Some((p, po))) => format!("{po} ({p:?}) with {ho} ({h:?})"),
            (None, Some((p, po))) => format!("{po} ({p:?})"),
            (Some((h, ho)), None) => format!("{ho} ({h:?})"),
            (None, None) => "the default host and port".to_owned(),
        };
        ConfigError::Other {
            message: format!("{origin}: {message}"),
        }
    })?
    .into_iter();
    let Some(first) = endpoints.next() else {
        return Err(ConfigError::Other {
            message: "no database host".into(),
        });
    };
    let (host, port, more_hosts) = (first.host, first.port, endpoints.collect::<Vec<_>>());
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
    let read_password_file = |f: &Path, key: &str, check_mode: bool| -> Result<Secret, ConfigError> {
        let cannot = |e: std::io::Error| invalid(relay_path, key, format!("cannot read {}: {e}", f.display()));
        if check_mode && let Some(problem) = secret_file_problem(&std::fs::metadata(f).map_err(cannot)?) {
            return Err(invalid(relay_path, key, format!("{}: {problem}", f.display())));
        }
        Ok(Secret::new(
            std::fs::read_to_string(f)
                .map_err(cannot)?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ))
    };
    // systemd's `LoadCredential=postgres-password:…` puts a private copy here (mode 0400, this
    // service only), so its mode is not checked.
    let credential = env("CREDENTIALS_DIRECTORY")
        .map(|d| Path::new(&d).join(PASSWORD_CREDENTIAL))
        .filter(|p| p.is_file());
    let password = match (&over.password_file, &over.password, &credential) {
        (Some(f), _, _) => Some(read_password_file(f, "postgres.password_file", true)?),
        (None, Some(p), _) => Some(p.clone()),
        (None, None, Some(c)) => Some(read_password_file(
            c,
            "$CREDENTIALS_DIRECTORY/postgres-password",
            false,
        )?),
        (None, None, None) => args.password.clone().or_else(|| env("PGPASSWORD").map(Secret::new)),
    };
    let dbname = over
        .dbname
        .clone()
        .or_else(|| args.dbname.clone())
        .or_else(|| args.database.clone())
        .or_else(|| env("PGDATABASE"))
        .unwrap_or_else(|| user.clone());
    // Each TLS and authentication setting with where it came from, for error messages.
    let hs_file = db_file.display().to_string();
    let relay_file = relay_path.display().to_string();
    let from_relay = |key: &str| format!("`[postgres] {key}` in {relay_file}");
    let from_synapse = |key: &str| format!("database.args.{key} in {hs_file}");
    let pick = |relay: Option<String>, key: &str, synapse: Option<String>, env_name: &str| {
        relay
            .map(|v| (v, from_relay(key)))
            .or_else(|| synapse.map(|v| (v, from_synapse(key))))
            .or_else(|| env(env_name).map(|v| (v, format!("the environment variable {env_name}"))))
    };
    let bad = |origin: &str, message: String| ConfigError::Other {
        message: format!("{origin}: {message}"),
    };
    let target_session_attrs = match pick(
        over.target_session_attrs.clone(),
        "target_session_attrs",
        args.target_session_attrs.clone(),
        "PGTARGETSESSIONATTRS",
    ) {
        Some((text, origin)) => {
            crate::postgres::hosts::TargetSessionAttrs::for_relay(Some(&text)).map_err(|m| bad(&origin, m))?
        }
        None => crate::postgres::hosts::TargetSessionAttrs::for_relay(None).map_err(|m| bad("the default", m))?,
    };
    let sslmode_set = pick(over.sslmode.clone(), "sslmode", args.sslmode.clone(), "PGSSLMODE");
    let rootcert_set = pick(
        over.sslrootcert.as_ref().map(|p| p.display().to_string()),
        "sslrootcert",
        args.sslrootcert.clone(),
        "PGSSLROOTCERT",
    );
    let explicit_mode = match &sslmode_set {
        Some((text, origin)) => Some((text.parse::<SslMode>().map_err(|m| bad(origin, m))?, origin.clone())),
        None => None,
    };
    let system_roots = rootcert_set.as_ref().is_some_and(|(v, _)| v == SYSTEM_ROOT_CERTS);
    let ssl_mode = match (&explicit_mode, system_roots) {
        // libpq 16+: sslrootcert=system makes verify-full the default and refuses weaker modes
        // (any certificate for any name is easy to get from a public CA).
        (None, true) => SslMode::VerifyFull,
        (Some((mode, origin)), true) if *mode != SslMode::VerifyFull => {
            return Err(bad(
                origin,
                format!(
                    "weak sslmode {:?} may not be used with sslrootcert=system (use \"verify-full\"), as libpq refuses too",
                    mode.as_str()
                ),
            ));
        }
        (Some((mode, _)), _) => *mode,
        (None, false) => SslMode::default(),
    };
    let mode_origin = explicit_mode
        .as_ref()
        .map(|(_, o)| o.clone())
        .unwrap_or_else(|| "the default".to_owned());
    let ssl_root_cert = match &rootcert_set {
        Some((value, _)) if value == SYSTEM_ROOT_CERTS => Some(PathBuf::from(SYSTEM_ROOT_CERTS)),
        Some((value, origin)) => {
            let path = PathBuf::from(value);
            // libpq silently skips verification in `prefer`/`require` when the named file is
            // missing; the relay refuses instead: whoever named a root file expects it used.
            if ssl_mode != SslMode::Disable && !path.is_file() {
                return Err(bad(
                    origin,
                    format!(
                        "root certificate file {value:?} does not exist (sslmode={})",
                        ssl_mode.as_str()
                    ),
                ));
            }
            Some(path)
        }
        None => {
            // libpq's default root file, used when it exists (then `prefer` and `require`
            // verify the chain too) and required by `verify-ca`/`verify-full`.
            let default = env("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt"));
            match default {
                Some(path) if path.is_file() && ssl_mode != SslMode::Disable => Some(path),
                _ if matches!(ssl_mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
                    let shown = env("HOME")
                        .map(|h| Path::new(&h).join(".postgresql/root.crt").display().to_string())
                        .unwrap_or_else(|| "~/.postgresql/root.crt".to_owned());
                    return Err(bad(
                        &mode_origin,
                        format!(
                            "sslmode={} verifies the server's certificate, but no sslrootcert is set and the default \
                             root certificate file {shown:?} does not exist. Either provide the file (sslrootcert), use \
                             the system's trusted roots with sslrootcert=system (with verify-full), or change sslmode \
                             to disable server certificate verification (as libpq)",
                            ssl_mode.as_str()
                        ),
                    ));
                }
                _ => None,
            }
        }
    };
    let sslcert = pick(
        over.sslcert.as_ref().map(|p| p.display().to_string()),
        "sslcert",
        args.sslcert.clone(),
        "PGSSLCERT",
    );
    let sslkey = pick(
        over.sslkey.as_ref().map(|p| p.display().to_string()),
        "sslkey",
        args.sslkey.clone(),
        "PGSSLKEY",
    );
    let ssl_client_cert = match (sslcert, sslkey) {
        (None, None) => None,
        (Some((cert, _)), Some((key, _))) => Some(ClientCert {
            cert: cert.into(),
            key: key.into(),
        }),
        (Some((_, origin)), None) => {
            return Err(bad(
                &origin,
                "sslcert is set without sslkey (the client certificate's key)".into(),
            ));
        }
        (None, Some((_, origin))) => {
            return Err(bad(
                &origin,
                "sslkey is set without sslcert (the client certificate)".into(),
            ));
        }
    };
    let require_auth = match pick(
        over.require_auth.clone(),
        "require_auth",
        args.require_auth.clone(),
        "PGREQUIREAUTH",
    ) {
        Some((text, origin)) => text.parse::<RequireAuth>().map_err(|m| bad(&origin, m))?,
        None => RequireAuth::default(),
    };
    let channel_binding = match pick(
        over.channel_binding.clone(),
        "channel_binding",
        args.channel_binding.clone(),
        "PGCHANNELBINDING",
    ) {
        Some((text, origin)) => {
            let mode = text.parse::<ChannelBindingMode>().map_err(|m| bad(&origin, m))?;
            if mode == ChannelBindingMode::Require && ssl_mode == SslMode::Disable {
                return Err(bad(
                    &origin,
                    "channel_binding=require needs TLS, but sslmode is \"disable\"".into(),
                ));
            }
            mode
        }
        None => ChannelBindingMode::default(),
    };
    let connect_timeout = match over.connect_timeout {
        Some(d) => d.0,
        None => match &args.connect_timeout {
            // libpq: 0 or negative means no timeout; the relay keeps its 10 s bound then.
            Some(t) => match t.as_text().trim().parse::<i64>() {
                Ok(secs) if secs > 0 => Duration::from_secs(secs.unsigned_abs()),
                Ok(_) => Duration::from_secs(10),
                Err(_) => {
                    return Err(bad(
                        &from_synapse("connect_timeout"),
                        format!("{:?} is not a number of seconds", t.as_text()),
                    ));
                }
            },
            None => Duration::from_secs(10),
        },
    };
    let seconds = |key: &str, v: &Option<IntOrString>| -> Result<Option<u64>, ConfigError> {
        match v {
            None => Ok(None),
            Some(v) => v
                .as_text()
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| bad(&from_synapse(key), format!("{:?} is not a whole number", v.as_text()))),
        }
    };
    let keepalives = Keepalives {
        enabled: seconds("keepalives", &args.keepalives)? != Some(0),
        idle: seconds("keepalives_idle", &args.keepalives_idle)?
            .filter(|s| *s > 0)
            .map(Duration::from_secs),
        interval: seconds("keepalives_interval", &args.keepalives_interval)?
            .filter(|s| *s > 0)
            .map(Duration::from_secs),
        count: seconds("keepalives_count", &args.keepalives_count)?
            .filter(|s| *s > 0)
            .map(|c| u32::try_from(c).unwrap_or(u32::MAX)),
    };
    Ok(PgConnectionConfig {
        host,
        port,
        user,
        password,
        dbname,
        ssl_mode,
        ssl_root_cert,
        ssl_client_cert,
        require_auth,
        channel_binding,
        application_name: over
            .application_name
            .clone()
            .unwrap_or_else(|| "synapse-account-data-relay".into()),
        connect_timeout,
        options: over.options.clone().or_else(|| args.options.clone()),
        keepalives,
        more_hosts,
        target_session_attrs,
    })
}

/// Where a `[postgres]` key came from, for error messages.
fn from_relay_key(relay_path: &Path, key: &str) -> String {
    format!("`[postgres] {key}` in {}", relay_path.display())
}

/// Where a `database.args` key came from, for error messages.
fn from_synapse_key(file: &Path, key: &str) -> String {
    format!("database.args.{key} in {}", file.display())
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
            let relay = parse_relay_config(relay_toml).map_err(|message| ConfigError::Toml {
                path: "relay.toml".into(),
                message,
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
    fn trailing_slashes_of_registration_urls_are_stripped_as_synapse_does() {
        let f = Fixture::new(&[
            (
                "a.yaml",
                &reg(
                    "a",
                    "http://127.0.0.1:29318/",
                    "org.matrix.msc3682.account_data: true\n",
                ),
            ),
            (
                "b.yaml",
                &reg(
                    "b",
                    "https://as.example/bridge//",
                    "org.matrix.msc3682.account_data: true\n",
                ),
            ),
        ]);
        let s = f.resolve("").unwrap();
        let urls: Vec<&str> = s.appservices.iter().map(|a| a.url.as_str()).collect();
        assert_eq!(urls, ["http://127.0.0.1:29318", "https://as.example/bridge"]);
    }

    #[test]
    fn the_transaction_byte_budget_is_read_and_bounded() {
        let f = Fixture::new(&[(
            "a.yaml",
            &reg("a", "http://localhost:1", "org.matrix.msc3682.account_data: true\n"),
        )]);
        let s = f.resolve("[delivery]\nmax_transaction_bytes = \"4MiB\"\n").unwrap();
        assert_eq!(s.delivery.max_transaction_bytes, 4 << 20);
        let err = f
            .resolve("[delivery]\nmax_transaction_bytes = 100\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delivery.max_transaction_bytes") && err.contains("relay.toml"),
            "{err}"
        );
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
        assert_eq!(s.delivery.max_transaction_bytes, 1 << 20);
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
        set_mode(&pw, 0o600);
        let relay: RelayConfig = toml::from_str(&format!(
            "[postgres]\nuser = \"relay\"\nhost = \"127.0.0.1\"\npassword_file = \"{}\"\nsslmode = \"verify-full\"\nsslrootcert = \"{}\"\n",
            pw.display(),
            pw.display()
        ))
        .unwrap();
        let s = Settings::resolve(&[dir.path().join("hs.yaml")], &relay, Path::new("r.toml"), &env).unwrap();
        assert_eq!(s.postgres.user, "relay");
        assert_eq!(s.postgres.password.as_ref().map(|p| p.expose()), Some("from-file"));
        assert_eq!(s.postgres.ssl_mode, SslMode::VerifyFull);
        assert_eq!(s.postgres.host, PgHost::Tcp("127.0.0.1".into()));
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// As libpq for a key file: a password file others (or, unless root owns it, the group) can
    /// read is refused; a systemd credential is read when the relay config names no password.
    #[test]
    fn password_files_others_can_read_are_refused() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("hs.yaml"),
            "server_name: example.org\ndatabase:\n  name: psycopg2\n  args:\n    user: u\n    password: from-yaml\n",
        )
        .unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "S3CRET-file\n").unwrap();
        let relay: RelayConfig =
            parse_relay_config(&format!("[postgres]\npassword_file = \"{}\"\n", pw.display())).unwrap();
        let resolve = |relay: &RelayConfig, env: EnvLookup<'_>| {
            Settings::resolve(&[dir.path().join("hs.yaml")], relay, Path::new("r.toml"), env)
        };
        let root_owned = std::fs::metadata(&pw).unwrap().uid() == 0;
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o644, false),
            (0o604, false),
            (0o660, false),
            (0o640, root_owned),
        ] {
            set_mode(&pw, mode);
            match resolve(&relay, &no_env) {
                Ok(s) => {
                    assert!(ok, "mode {mode:o} accepted");
                    assert_eq!(s.postgres.password.as_ref().map(|p| p.expose()), Some("S3CRET-file"));
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(!ok, "mode {mode:o} refused: {e}");
                    assert!(
                        e.contains("postgres.password_file") && e.contains(&format!("{mode:04o}")),
                        "{e}"
                    );
                    assert!(!e.contains("S3CRET"), "{e}");
                }
            }
        }
        // A systemd credential: used when the relay config names no password, before Synapse's.
        let creds = tempfile::tempdir().unwrap();
        std::fs::write(creds.path().join(PASSWORD_CREDENTIAL), "from-credential\n").unwrap();
        let creds_dir = creds.path().display().to_string();
        let env = |k: &str| (k == "CREDENTIALS_DIRECTORY").then(|| creds_dir.clone());
        let s = resolve(&RelayConfig::default(), &env).unwrap();
        assert_eq!(
            s.postgres.password.as_ref().map(|p| p.expose()),
            Some("from-credential")
        );
        let s = resolve(&RelayConfig::default(), &no_env).unwrap();
        assert_eq!(s.postgres.password.as_ref().map(|p| p.expose()), Some("from-yaml"));
        let explicit = parse_relay_config("[postgres]\npassword = \"explicit\"\n").unwrap();
        let s = resolve(&explicit, &env).unwrap();
        assert_eq!(s.postgres.password.as_ref().map(|p| p.expose()), Some("explicit"));
        // A relay config holding a password and readable by everyone gets a warning.
        let toml_path = dir.path().join("relay.toml");
        std::fs::write(&toml_path, "[postgres]\npassword = \"explicit\"\n").unwrap();
        set_mode(&toml_path, 0o644);
        let w = config_file_warning(&toml_path, &explicit).unwrap();
        assert!(w.contains("0644") && !w.contains("explicit\""), "{w}");
        set_mode(&toml_path, 0o640);
        assert_eq!(config_file_warning(&toml_path, &explicit), None);
        set_mode(&toml_path, 0o644);
        assert_eq!(config_file_warning(&toml_path, &RelayConfig::default()), None);
    }

    /// A homeserver.yaml with these extra `database.args` lines (YAML, indented by 4) and the
    /// settings resolved from it, with `relay_toml` and the environment `env`.
    fn resolve_with_args(args: &str, relay_toml: &str, env: &[(&str, String)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("homeserver.yaml"),
            format!(
                "server_name: example.org\ndatabase:\n  name: psycopg2\n  args:\n    user: u\n    host: db.internal\n{args}"
            ),
        )
        .unwrap();
        let relay: RelayConfig = toml::from_str(relay_toml).unwrap();
        let env = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        Settings::resolve(
            &[dir.path().join("homeserver.yaml")],
            &relay,
            Path::new("relay.toml"),
            &env,
        )
    }

    fn error_text(r: Result<Settings, ConfigError>) -> String {
        r.map(|s| format!("{:?}", s.postgres)).unwrap_err().to_string()
    }

    #[test]
    fn verify_modes_need_a_root_file_as_in_libpq() {
        let home = tempfile::tempdir().unwrap();
        let env = [("HOME", home.path().display().to_string())];
        // verify-ca / verify-full without sslrootcert and without ~/.postgresql/root.crt: refused,
        // naming where sslmode came from.
        for (args, relay, env_mode, origin) in [
            ("    sslmode: verify-ca\n", "", None, "database.args.sslmode in "),
            (
                "",
                "[postgres]\nsslmode = \"verify-full\"\n",
                None,
                "`[postgres] sslmode` in relay.toml",
            ),
            ("", "", Some("verify-ca"), "the environment variable PGSSLMODE"),
        ] {
            let mut env = env.to_vec();
            if let Some(m) = env_mode {
                env.push(("PGSSLMODE", m.to_owned()));
            }
            let text = error_text(resolve_with_args(args, relay, &env));
            assert!(text.contains(origin), "{text}");
            assert!(text.contains("root.crt\" does not exist"), "{text}");
            assert!(text.contains("sslrootcert=system"), "{text}");
        }
        // With ~/.postgresql/root.crt present it is used: verify-ca works, and require and prefer
        // verify the chain against it too.
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        let default_root = home.path().join(".postgresql/root.crt");
        std::fs::write(&default_root, "not read here").unwrap();
        for mode in ["verify-ca", "require", "prefer"] {
            let s = resolve_with_args(&format!("    sslmode: {mode}\n"), "", &env).unwrap();
            assert_eq!(
                s.postgres.ssl_root_cert.as_deref(),
                Some(default_root.as_path()),
                "{mode}"
            );
        }
        // ... but not with sslmode=disable.
        let s = resolve_with_args("    sslmode: disable\n", "", &env).unwrap();
        assert_eq!(s.postgres.ssl_root_cert, None);
    }

    #[test]
    fn an_explicit_root_file_is_used_in_every_mode_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ca.crt");
        std::fs::write(&root, "x").unwrap();
        for mode in ["require", "prefer", "verify-ca", "verify-full"] {
            let s = resolve_with_args(
                &format!("    sslmode: {mode}\n    sslrootcert: {}\n", root.display()),
                "",
                &[],
            )
            .unwrap();
            assert_eq!(s.postgres.ssl_root_cert.as_deref(), Some(root.as_path()), "{mode}");
        }
        let text = error_text(resolve_with_args(
            "    sslmode: require\n    sslrootcert: /nonexistent/ca.crt\n",
            "",
            &[],
        ));
        assert!(text.contains("database.args.sslrootcert in "), "{text}");
        assert!(text.contains("\"/nonexistent/ca.crt\" does not exist"), "{text}");
    }

    #[test]
    fn sslrootcert_system_means_verify_full() {
        let s = resolve_with_args("    sslrootcert: system\n", "", &[]).unwrap();
        assert_eq!(s.postgres.ssl_mode, SslMode::VerifyFull);
        assert_eq!(s.postgres.ssl_root_cert.as_deref(), Some(Path::new("system")));
        for mode in ["require", "verify-ca", "prefer"] {
            let text = error_text(resolve_with_args(
                &format!("    sslmode: {mode}\n    sslrootcert: system\n"),
                "",
                &[],
            ));
            assert!(
                text.contains(&format!(
                    "weak sslmode \"{mode}\" may not be used with sslrootcert=system"
                )),
                "{text}"
            );
            assert!(text.contains("database.args.sslmode in "), "{text}");
        }
        let s = resolve_with_args("    sslmode: verify-full\n    sslrootcert: system\n", "", &[]).unwrap();
        assert_eq!(s.postgres.ssl_mode, SslMode::VerifyFull);
    }

    #[test]
    fn require_auth_channel_binding_and_client_certs() {
        use crate::postgres::config::AuthRequest;
        let s = resolve_with_args(
            "    require_auth: scram-sha-256\n    channel_binding: require\n    sslmode: require\n    sslcert: /c.crt\n    sslkey: /c.key\n",
            "",
            &[],
        )
        .unwrap();
        assert!(s.postgres.require_auth.allows(AuthRequest::ScramSha256));
        assert!(!s.postgres.require_auth.allows(AuthRequest::Password));
        assert_eq!(s.postgres.channel_binding, ChannelBindingMode::Require);
        assert_eq!(
            s.postgres.ssl_client_cert,
            Some(ClientCert {
                cert: "/c.crt".into(),
                key: "/c.key".into()
            })
        );
        // The relay's config wins over database.args, the environment comes last.
        let s = resolve_with_args(
            "    require_auth: password\n",
            "[postgres]\nrequire_auth = \"!password,!md5\"\n",
            &[("PGCHANNELBINDING", "disable".into())],
        )
        .unwrap();
        assert!(!s.postgres.require_auth.allows(AuthRequest::Md5));
        assert!(s.postgres.require_auth.allows(AuthRequest::None));
        assert_eq!(s.postgres.channel_binding, ChannelBindingMode::Disable);
        for (args, relay, expected) in [
            (
                "    require_auth: scram-sha-256,!md5\n",
                "",
                "database.args.require_auth in ",
            ),
            (
                "",
                "[postgres]\nrequire_auth = \"kerberos\"\n",
                "`[postgres] require_auth` in relay.toml",
            ),
            (
                "    channel_binding: always\n",
                "",
                "unknown channel_binding \"always\"",
            ),
            (
                "    channel_binding: require\n    sslmode: disable\n",
                "",
                "channel_binding=require needs TLS",
            ),
            ("    sslcert: /c.crt\n", "", "sslcert is set without sslkey"),
        ] {
            let text = error_text(resolve_with_args(args, relay, &[]));
            assert!(text.contains(expected), "{args} {relay}: {text}");
        }
    }

    #[test]
    fn database_args_are_honoured_or_refused_never_dropped() {
        // Honoured: keepalives, options, connect_timeout; Twisted's pool settings are ignored.
        let s = resolve_with_args(
            "    cp_min: 5\n    cp_max: 10\n    keepalives_idle: 10\n    keepalives_interval: 5\n    keepalives_count: 3\n    options: -c statement_timeout=0\n    connect_timeout: 7\n    application_name: synapse\n    gssencmode: disable\n    client_encoding: UTF8\n",
            "",
            &[],
        )
        .unwrap();
        assert_eq!(
            s.postgres.keepalives,
            Keepalives {
                enabled: true,
                idle: Some(Duration::from_secs(10)),
                interval: Some(Duration::from_secs(5)),
                count: Some(3),
            }
        );
        assert_eq!(s.postgres.options.as_deref(), Some("-c statement_timeout=0"));
        assert_eq!(s.postgres.connect_timeout, Duration::from_secs(7));
        assert_eq!(s.postgres.application_name, "synapse-account-data-relay");
        let s = resolve_with_args("    keepalives: 0\n", "", &[]).unwrap();
        assert!(!s.postgres.keepalives.enabled);
        // Refused, naming the key and the file.
        for (args, expected) in [
            (
                "    passfile: /x/.pgpass\n",
                "passfile: this libpq setting is not supported",
            ),
            (
                "    target_session_attrs: standby\n",
                "database.args.target_session_attrs in ",
            ),
            ("    load_balance_hosts: random\n", "load_balance_hosts: only"),
            ("    sslcrl: /x.crl\n", "sslcrl: this libpq setting is not supported"),
            ("    gssencmode: require\n", "gssencmode: only"),
            ("    sslmod: require\n", "sslmod: not a libpq connection setting"),
            (
                "    host: a.internal,b.internal\n    port: 1,2,3\n",
                "3 ports for 2 hosts",
            ),
            ("    keepalives_idle: soon\n", "database.args.keepalives_idle in "),
            ("    connect_timeout: soon\n", "database.args.connect_timeout in "),
        ] {
            let text = error_text(resolve_with_args(args, "", &[]));
            assert!(text.contains(expected), "{args}: {text}");
            assert!(text.contains("homeserver.yaml"), "{args}: {text}");
        }
        let text = error_text(resolve_with_args(
            "",
            "[postgres]\nhost = \"a,b\"\nport = \"1,2,3\"\n",
            &[],
        ));
        assert!(text.contains("`[postgres] port` in relay.toml (\"1,2,3\")"), "{text}");
    }

    #[test]
    fn several_hosts_and_target_session_attrs_as_libpq() {
        use crate::postgres::hosts::{PgEndpoint, TargetSessionAttrs};
        // Synapse's own multi-host form (the example).
        let s = resolve_with_args(
            "    host: \"127.0.0.1,127.0.0.1\"\n    port: \"55601,55602\"\n    target_session_attrs: read-write\n",
            "",
            &[],
        )
        .unwrap();
        assert_eq!(
            s.postgres.endpoints(),
            vec![
                PgEndpoint {
                    host: PgHost::Tcp("127.0.0.1".into()),
                    port: 55601
                },
                PgEndpoint {
                    host: PgHost::Tcp("127.0.0.1".into()),
                    port: 55602
                }
            ]
        );
        assert_eq!(s.postgres.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert_eq!(s.postgres.describe(), "u@127.0.0.1:55601,127.0.0.1:55602/u");
        // One port for all hosts; `any` (and nothing) is read as `primary`.
        let s = resolve_with_args(
            "    host: pg1,pg2\n    port: 5433\n    target_session_attrs: any\n",
            "",
            &[],
        )
        .unwrap();
        assert_eq!(s.postgres.more_hosts.len(), 1);
        assert_eq!((s.postgres.port, s.postgres.more_hosts[0].port), (5433, 5433));
        assert_eq!(s.postgres.target_session_attrs, TargetSessionAttrs::Primary);
        // The relay's [postgres] wins, with a port list; the environment comes last.
        let s = resolve_with_args(
            "",
            "[postgres]\nhost = \"a,b,/run/pg\"\nport = \"1,2,3\"\ntarget_session_attrs = \"primary\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(s.postgres.endpoints().len(), 3);
        assert_eq!(s.postgres.more_hosts[1].host, PgHost::UnixSocketDir("/run/pg".into()));
        let s = resolve_with_args("", "[postgres]\nport = 6000\n", &[]).unwrap();
        assert_eq!(s.postgres.port, 6000);
        let s = resolve_with_args(
            "    host: null\n    port: null\n",
            "",
            &[
                ("PGHOST", "e1,e2".into()),
                ("PGPORT", "7,8".into()),
                ("PGTARGETSESSIONATTRS", "read-write".into()),
            ],
        )
        .unwrap();
        assert_eq!(s.postgres.describe(), "u@e1:7,e2:8/u");
        assert_eq!(s.postgres.target_session_attrs, TargetSessionAttrs::ReadWrite);
        let text = error_text(resolve_with_args("    port: \"55601,x\"\n", "", &[]));
        assert!(
            text.contains("is not a port number") && text.contains("database.args.port in "),
            "{text}"
        );
        let text = error_text(resolve_with_args(
            "",
            "[postgres]\ntarget_session_attrs = \"prefer-standby\"\n",
            &[],
        ));
        assert!(
            text.contains("`[postgres] target_session_attrs`") && text.contains("needs the primary"),
            "{text}"
        );
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
        assert_eq!(
            redacted_url("https://as.example/x?access_token=S3CRET"),
            "https://as.example/x?access_token=***"
        );
        // Every place a configured URL is printed goes through it.
        let f = Fixture::new(&[(
            "a.yaml",
            &reg(
                "a",
                "ftp://as.example/x?token=S3CRET-as",
                "org.matrix.msc3682.account_data: true\n",
            ),
        )]);
        let err = f.resolve("").unwrap_err().to_string();
        assert!(
            err.contains("a.yaml") && err.contains("token=***") && !err.contains("S3CRET"),
            "{err}"
        );
        let f = Fixture::new(&[(
            "a.yaml",
            &reg(
                "a",
                "http://[::1/8f14e45fceea167a5a36dedd4bea2543",
                "org.matrix.msc3682.account_data: true\n",
            ),
        )]);
        let err = f.resolve("").unwrap_err().to_string();
        assert!(err.contains("a.yaml") && !err.contains("8f14e45fceea167a"), "{err}");
        let f = Fixture::new(&[("a.yaml", &reg("a", "http://localhost:1", ""))]);
        let err = f
            .resolve("[synapse]\nclient_url = \"synapse.internal/?access_token=S3CRET-client\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("synapse.client_url") && !err.contains("S3CRET"), "{err}");
    }

    /// Every way the `password` line can be wrong gives the position and the key, never the
    /// line (toml's own message quotes it).
    #[test]
    fn a_bad_password_line_is_located_not_quoted() {
        const PW: &str = "S3CRET-0xd1e5";
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("bad escape", format!("password = \"{PW}\\q\"\n"), true),
            ("misspelt key", format!("pasword = \"{PW}\"\n"), true),
            ("unterminated string", format!("password = \"{PW}\n"), true),
            ("unterminated literal", format!("password = '{PW}\n"), true),
            ("unterminated multi-line", format!("password = \"\"\"{PW}\n"), false),
            ("unquoted", format!("password = {PW}\n"), true),
            ("wrong type", "password = 982451653\n".to_owned(), true),
            ("wrong type (table)", format!("password = {{ {PW} = 1 }}\n"), true),
            (
                "duplicate key",
                format!("password = \"a\"\npassword = \"{PW}\"\n"),
                false,
            ),
            ("junk after the value", format!("password = \"{PW}\" x\n"), true),
            ("no `=`", format!("password \"{PW}\"\n"), false),
        ];
        for (what, line, names_the_key) in cases {
            let path = dir.path().join("relay.toml");
            std::fs::write(&path, format!("# the relay\n[postgres]\nuser = \"relay\"\n{line}")).unwrap();
            let err = RelayConfig::load(&path).unwrap_err().to_string();
            for secret in [PW, "982451653", "S3CRET"] {
                assert!(!err.contains(secret), "{what}: the error quotes the password: {err}");
            }
            assert!(err.contains("relay.toml") && err.contains("line "), "{what}: {err}");
            if names_the_key {
                assert!(err.contains("postgres.pas"), "{what}: no key in {err}");
            }
        }
        // The value of an ordinary key is still shown: it helps, and it is no secret.
        std::fs::write(dir.path().join("r.toml"), "[replication]\non_slot_lost = \"ignore\"\n").unwrap();
        let err = RelayConfig::load(&dir.path().join("r.toml")).unwrap_err().to_string();
        assert!(
            err.contains("line 2, column 16, key `replication.on_slot_lost`") && err.contains("`ignore`"),
            "{err}"
        );
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
    fn http_limits_have_documented_defaults_and_bounds() {
        let f = Fixture::new(&[("a.yaml", &reg("a", "http://localhost:1", ""))]);
        let s = f.resolve("").unwrap();
        assert_eq!(
            s.http_limits,
            HttpLimits {
                header_read_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                max_connections: 64,
            }
        );
        let s = f
            .resolve("[http]\nheader_read_timeout = \"2s\"\nidle_timeout = \"5m\"\nmax_connections = 8\n")
            .unwrap();
        assert_eq!(
            s.http_limits,
            HttpLimits {
                header_read_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(300),
                max_connections: 8,
            }
        );
        for (text, key) in [
            ("header_read_timeout = \"0s\"", "http.header_read_timeout"),
            ("idle_timeout = \"2h\"", "http.idle_timeout"),
            ("max_connections = 0", "http.max_connections"),
        ] {
            let err = f.resolve(&format!("[http]\n{text}\n")).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
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
