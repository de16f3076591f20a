//! Synapse's own configuration files, read the way Synapse reads them: `homeserver.yaml` (possibly
//! split over several files and directories, merged at the top level with later files winning, as
//! `synapse --config-path A --config-path dir/` does) and the appservice registration files it
//! names, all with YAML 1.1 semantics (`yes`/`no` booleans, `<<:` merge keys) as PyYAML's
//! `safe_load` gives Synapse.
//!
//! Only the keys the relay needs are read; everything else is ignored, as Synapse ignores keys it
//! does not know in a registration file. Parse errors name the file, line and column; they never
//! quote the file's text (which holds tokens and passwords).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::Secret;

/// What went wrong reading one of Synapse's files.
#[derive(Debug, thiserror::Error)]
pub enum SynapseFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML for {what}: {message}")]
    Yaml {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::Options {
        // PyYAML keeps the last of duplicate mapping keys.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::LastWins,
        // Never quote the file in an error: it holds secrets.
        with_snippet: false,
        crop_radius: 0,
        ..Default::default()
    }
}

fn read_text(path: &Path) -> Result<String, SynapseFileError> {
    std::fs::read_to_string(path).map_err(|source| SynapseFileError::Read {
        path: path.into(),
        source,
    })
}

/// `text`, the content of `path`, as YAML (errors name `path` and the key, never quote a secret).
fn parse_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
    what: &'static str,
) -> Result<T, SynapseFileError> {
    serde_saphyr::from_str_with_options(text, yaml_options()).map_err(|e| {
        // The message says where (`at line L, column C`) and may quote a value: the key at that
        // line decides whether the value may be shown (never a token's or password's).
        let at = e.location().map(|l| (l.line() as usize, l.column() as usize));
        let message = e.without_snippet().to_string();
        let message = match at {
            Some((l, c)) => message
                .strip_suffix(&format!(" at line {l}, column {c}"))
                .unwrap_or(&message)
                .to_owned(),
            None => message,
        };
        SynapseFileError::Yaml {
            path: path.into(),
            what,
            message: crate::redact::parse_error(
                text,
                crate::redact::Syntax::Yaml,
                at.map(|a| a.0),
                at.map(|a| a.1),
                &message,
            ),
        }
    })
}

/// A scalar that PyYAML may give as a number or a string (psycopg2 takes either for `port`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl IntOrString {
    pub fn as_text(&self) -> String {
        match self {
            IntOrString::Int(i) => i.to_string(),
            IntOrString::String(s) => s.clone(),
        }
    }
}

/// `database.args`: psycopg2's connection keywords (libpq's names; `database` is psycopg2's alias
/// of `dbname`). The keys the relay uses are fields; every other key is kept in `other` and
/// checked by [`DatabaseArgs::unsupported`], so that none is silently dropped. Read as a mapping
/// first (so duplicate keys keep the last value, as PyYAML), numbers and strings alike as psycopg2
/// takes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseArgs {
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub dbname: Option<String>,
    pub database: Option<String>,
    pub host: Option<String>,
    pub port: Option<IntOrString>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
    pub require_auth: Option<String>,
    pub channel_binding: Option<String>,
    pub connect_timeout: Option<IntOrString>,
    pub options: Option<String>,
    pub keepalives: Option<IntOrString>,
    pub keepalives_idle: Option<IntOrString>,
    pub keepalives_interval: Option<IntOrString>,
    pub keepalives_count: Option<IntOrString>,
    /// libpq's `target_session_attrs` (`any`, `read-write`, `primary`; see `crate::postgres::hosts`).
    pub target_session_attrs: Option<String>,
    /// Every other key with its value.
    pub other: BTreeMap<String, ArgValue>,
}

impl<'de> Deserialize<'de> for DatabaseArgs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map: Option<BTreeMap<String, Option<ArgValue>>> = Option::deserialize(d)?;
        // `key: null` is as good as absent.
        let mut map: BTreeMap<String, ArgValue> = map
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        fn take<E: serde::de::Error>(map: &mut BTreeMap<String, ArgValue>, key: &str) -> Result<Option<String>, E> {
            match map.remove(key) {
                None => Ok(None),
                // Never quote the value: it may be the password.
                Some(v) => v
                    .as_text()
                    .map(Some)
                    .ok_or_else(|| E::custom(format!("database.args.{key} must be a string or a number"))),
            }
        }
        let m = &mut map;
        Ok(DatabaseArgs {
            user: take::<D::Error>(m, "user")?,
            password: take::<D::Error>(m, "password")?.map(Secret::new),
            dbname: take::<D::Error>(m, "dbname")?,
            database: take::<D::Error>(m, "database")?,
            host: take::<D::Error>(m, "host")?,
            port: take::<D::Error>(m, "port")?.map(IntOrString::String),
            sslmode: take::<D::Error>(m, "sslmode")?,
            sslrootcert: take::<D::Error>(m, "sslrootcert")?,
            sslcert: take::<D::Error>(m, "sslcert")?,
            sslkey: take::<D::Error>(m, "sslkey")?,
            require_auth: take::<D::Error>(m, "require_auth")?,
            channel_binding: take::<D::Error>(m, "channel_binding")?,
            connect_timeout: take::<D::Error>(m, "connect_timeout")?.map(IntOrString::String),
            options: take::<D::Error>(m, "options")?,
            keepalives: take::<D::Error>(m, "keepalives")?.map(IntOrString::String),
            keepalives_idle: take::<D::Error>(m, "keepalives_idle")?.map(IntOrString::String),
            keepalives_interval: take::<D::Error>(m, "keepalives_interval")?.map(IntOrString::String),
            keepalives_count: take::<D::Error>(m, "keepalives_count")?.map(IntOrString::String),
            target_session_attrs: take::<D::Error>(m, "target_session_attrs")?,
            other: map,
        })
    }
}

/// A value of `database.args` the relay does not read, kept to be checked.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ArgValue {
    Bool(bool),
    Int(i64),
    Float(FloatText),
    String(String),
    Other(serde::de::IgnoredAny),
}

impl Eq for ArgValue {}

/// A float kept only as text (for `database.args` values nobody computes with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloatText(pub String);

impl<'de> Deserialize<'de> for FloatText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        f64::deserialize(d).map(|f| FloatText(f.to_string()))
    }
}

impl ArgValue {
    /// The value as psycopg2 would pass it to libpq (`None` for a list or mapping).
    pub fn as_text(&self) -> Option<String> {
        match self {
            ArgValue::Bool(b) => Some(if *b { "1" } else { "0" }.to_owned()),
            ArgValue::Int(i) => Some(i.to_string()),
            ArgValue::Float(f) => Some(f.0.clone()),
            ArgValue::String(s) => Some(s.clone()),
            ArgValue::Other(_) => None,
        }
    }
}

/// Keys of `database.args` that Twisted's connection pool (`adbapi`) or Synapse take, never
/// passed to libpq: ignored.
pub const POOL_ONLY_ARGS: &[&str] = &[
    "cp_min",
    "cp_max",
    "cp_noisy",
    "cp_openfun",
    "cp_reconnect",
    "cp_good_sql",
];

/// libpq settings the relay accepts only at the value that changes nothing for it, with that
/// value (compared case-insensitively), and why.
const NO_OP_ARGS: &[(&str, &[&str], &str)] = &[
    (
        "fallback_application_name",
        &[],
        "the relay always sets its own application_name",
    ),
    (
        "application_name",
        &[],
        "it names Synapse's own connections; the relay's are named by `[postgres] application_name`",
    ),
    ("krbsrvname", &[], "GSSAPI is not used"),
    ("gsslib", &[], "GSSAPI is not used"),
    (
        "gssencmode",
        &["disable", "prefer"],
        "GSSAPI encryption is not supported",
    ),
    ("gssdelegation", &["0"], "GSSAPI is not used"),
    ("sslcompression", &["0"], "TLS compression is not supported"),
    ("sslsni", &["1"], "Server Name Indication is always sent for host names"),
    ("sslcertmode", &["allow"], "only `allow` (libpq's default) is supported"),
    (
        "sslnegotiation",
        &["postgres"],
        "only `postgres` (libpq's default) is supported",
    ),
    (
        "client_encoding",
        &["utf8", "utf-8", "unicode"],
        "the relay's connections always use UTF8",
    ),
    (
        "load_balance_hosts",
        &["disable"],
        "the relay tries the hosts in the order given, as libpq's default",
    ),
    (
        "ssl_min_protocol_version",
        &["tlsv1", "tlsv1.1", "tlsv1.2"],
        "the relay uses TLS 1.2 or 1.3",
    ),
];

impl DatabaseArgs {
    /// The keys of `database.args` the relay cannot honour, each with why; empty when all are
    /// honoured (or are pool settings of Synapse, [`POOL_ONLY_ARGS`]).
    pub fn unsupported(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, value) in &self.other {
            if POOL_ONLY_ARGS.contains(&key.as_str()) {
                continue;
            }
            let text = value.as_text();
            match NO_OP_ARGS.iter().find(|(k, _, _)| k == key) {
                Some((_, [], _)) => {}
                Some((_, accepted, why)) => {
                    let ok = text
                        .as_deref()
                        .is_some_and(|t| accepted.iter().any(|a| a.eq_ignore_ascii_case(t.trim())));
                    if !ok {
                        out.push(format!(
                            "{key}: only {} is supported ({why})",
                            accepted.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
                None => out.push(match key.as_str() {
                    "hostaddr"
                    | "passfile"
                    | "service"
                    | "sslpassword"
                    | "sslcrl"
                    | "sslcrldir"
                    | "sslkeylogfile"
                    | "ssl_max_protocol_version"
                    | "requirepeer"
                    | "tcp_user_timeout"
                    | "replication"
                    | "max_protocol_version"
                    | "min_protocol_version"
                    | "oauth_issuer"
                    | "oauth_client_id"
                    | "oauth_client_secret"
                    | "oauth_scope" => format!(
                        "{key}: this libpq setting is not supported by the relay; remove it, or override the \
                         connection in the relay's `[postgres]` section"
                    ),
                    _ => format!("{key}: not a libpq connection setting the relay knows"),
                }),
            }
        }
        out
    }
}

/// `database:` in homeserver.yaml.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct DatabaseSection {
    pub name: Option<String>,
    #[serde(default)]
    pub args: DatabaseArgs,
}

/// The keys of one homeserver config file the relay reads; all optional because Synapse's
/// config may be split over several files.
#[derive(Debug, Clone, Default, Deserialize)]
struct HomeserverFile {
    server_name: Option<String>,
    database: Option<DatabaseSection>,
    app_service_config_files: Option<Vec<String>>,
    use_appservice_legacy_authorization: Option<bool>,
    listeners: Option<Vec<Listener>>,
}

/// One of Synapse's `listeners` (only what the relay needs to find the client API).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Listener {
    pub port: Option<u16>,
    pub bind_addresses: Option<Vec<String>>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub tls: Option<bool>,
    #[serde(default)]
    pub resources: Vec<ListenerResource>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct ListenerResource {
    #[serde(default)]
    pub names: Vec<String>,
}

impl Listener {
    /// The URL of this listener's client API as seen from this host, if it serves one.
    pub fn client_url(&self) -> Option<String> {
        let port = self.port?;
        if self.kind.as_deref().unwrap_or("http") != "http"
            || !self.resources.iter().any(|r| r.names.iter().any(|n| n == "client"))
        {
            return None;
        }
        let scheme = if self.tls.unwrap_or(false) { "https" } else { "http" };
        let addresses = self.bind_addresses.clone().unwrap_or_default();
        let host = if addresses.is_empty()
            || addresses
                .iter()
                .any(|a| a == "0.0.0.0" || a == "127.0.0.1" || a == "::")
        {
            "127.0.0.1".to_owned()
        } else if addresses.iter().any(|a| a == "::1") {
            "[::1]".to_owned()
        } else if addresses[0].contains(':') {
            format!("[{}]", addresses[0])
        } else {
            addresses[0].clone()
        };
        Some(format!("{scheme}://{host}:{port}"))
    }
}

/// Synapse's configuration as the relay needs it, merged from all files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeserverConfig {
    pub server_name: String,
    pub database: DatabaseSection,
    /// Registration file paths; relative entries resolved, as Synapse does, against Synapse's
    /// working directory (`working_directory`), not the config file's folder.
    pub app_service_config_files: Vec<PathBuf>,
    /// The `app_service_config_files` entries as written, in the same order.
    pub app_service_config_entries: Vec<String>,
    /// The file whose `app_service_config_files` was used (the last that has one).
    pub app_service_config_named_in: Option<PathBuf>,
    /// The directory relative entries were resolved against.
    pub working_directory: PathBuf,
    pub use_appservice_legacy_authorization: bool,
    /// The URL of Synapse's client API from its first client listener, if there is one.
    pub client_url: Option<String>,
    /// The files read, in order (for messages).
    pub files: Vec<PathBuf>,
}

/// Expand `--synapse-config` arguments as Synapse does: a file is read; a directory contributes
/// its `*.yaml` files in name order.
pub fn expand_config_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, SynapseFileError> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|source| SynapseFileError::Read {
                    path: p.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "yaml"))
                .collect();
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

impl HomeserverConfig {
    /// Read and merge Synapse's config files (see [`expand_config_paths`]); relative
    /// `app_service_config_files` entries are resolved against `working_directory`, Synapse's.
    pub fn load(paths: &[PathBuf], working_directory: &Path) -> Result<HomeserverConfig, SynapseFileError> {
        let files = expand_config_paths(paths)?;
        if files.is_empty() {
            return Err(SynapseFileError::Invalid {
                path: paths.first().cloned().unwrap_or_default(),
                message: "no Synapse config file found (a directory contributes its *.yaml files)".into(),
            });
        }
        let texts = files
            .into_iter()
            .map(|f| read_text(&f).map(|t| (f, t)))
            .collect::<Result<Vec<_>, _>>()?;
        HomeserverConfig::from_yaml(&texts, working_directory)
    }

    /// Merge Synapse's config files, given as `(path, content)` in the order Synapse reads them
    /// (pure: the paths only name the files in errors); relative `app_service_config_files`
    /// entries are resolved against `working_directory`, Synapse's.
    pub fn from_yaml(
        texts: &[(PathBuf, String)],
        working_directory: &Path,
    ) -> Result<HomeserverConfig, SynapseFileError> {
        let files: Vec<PathBuf> = texts.iter().map(|(f, _)| f.clone()).collect();
        let first = files.first().cloned().unwrap_or_default();
        let mut server_name: Option<(String, PathBuf)> = None;
        let mut database: Option<(DatabaseSection, PathBuf)> = None;
        let mut as_files: Option<(Vec<String>, PathBuf)> = None;
        let mut legacy = None;
        let mut listeners: Option<Vec<Listener>> = None;
        for (f, text) in texts {
            // An empty file (only comments) is valid YAML for Synapse: it contributes nothing.
            let parsed: Option<HomeserverFile> = parse_yaml(text, f, "a Synapse config file")?;
            let Some(parsed) = parsed else { continue };
            if let Some(n) = parsed.server_name {
                server_name = Some((n, f.clone()));
            }
            if let Some(d) = parsed.database {
                database = Some((d, f.clone()));
            }
            if let Some(list) = parsed.app_service_config_files {
                as_files = Some((list, f.clone()));
            }
            if let Some(l) = parsed.use_appservice_legacy_authorization {
                legacy = Some(l);
            }
            if let Some(l) = parsed.listeners {
                listeners = Some(l);
            }
        }
        let (server_name, _) = server_name.ok_or_else(|| SynapseFileError::Invalid {
            path: first.clone(),
            message: format!(
                "no `server_name` in {} (Synapse requires it; Debian keeps it in /etc/matrix-synapse/conf.d/server_name.yaml, \
                 so pass that file or directory too)",
                files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        })?;
        let (database, db_file) = database.ok_or_else(|| SynapseFileError::Invalid {
            path: first.clone(),
            message: "no `database` section: Synapse is using SQLite, and the relay needs PostgreSQL".into(),
        })?;
        match database.name.as_deref() {
            Some("psycopg2") | Some("psycopg") => {}
            other => {
                return Err(SynapseFileError::Invalid {
                    path: db_file,
                    message: format!(
                        "database.name is {other:?}: the relay reads PostgreSQL through logical replication, \
                         so Synapse must use `psycopg2` (PostgreSQL), not SQLite"
                    ),
                });
            }
        }
        let unsupported = database.args.unsupported();
        if !unsupported.is_empty() {
            return Err(SynapseFileError::Invalid {
                path: db_file,
                message: format!(
                    "database.args: {} (the relay reads the same connection settings as Synapse and will not \
                     silently drop one)",
                    unsupported.join("; ")
                ),
            });
        }
        let (entries, named_in) = match as_files {
            Some((entries, file)) => (entries, Some(file)),
            None => (Vec::new(), None),
        };
        Ok(HomeserverConfig {
            server_name,
            database,
            app_service_config_files: entries.iter().map(|e| working_directory.join(e)).collect(),
            app_service_config_entries: entries,
            app_service_config_named_in: named_in,
            working_directory: working_directory.to_owned(),
            use_appservice_legacy_authorization: legacy.unwrap_or(false),
            client_url: listeners.unwrap_or_default().iter().find_map(Listener::client_url),
            files,
        })
    }
}

/// One entry of a registration's namespace list.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct NamespaceEntry {
    pub regex: String,
    pub exclusive: bool,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Namespaces {
    #[serde(default)]
    pub users: Vec<NamespaceEntry>,
}

/// The opt-in key a registration file can carry (Synapse ignores it).
pub const OPT_IN_KEY: &str = "org.matrix.msc3682.account_data";

#[derive(Debug, Clone, Deserialize)]
struct RegistrationFile {
    id: Option<String>,
    // Missing and `null` both deserialise to None here; the text check below tells them apart.
    url: Option<String>,
    as_token: Option<Secret>,
    hs_token: Option<Secret>,
    sender_localpart: Option<String>,
    #[serde(default)]
    namespaces: Option<Namespaces>,
    #[serde(rename = "org.matrix.msc3682.account_data")]
    opt_in: Option<bool>,
}

/// An appservice registration, as Synapse loads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub id: String,
    /// `None` for an explicit `url: null`: Synapse sends such an appservice nothing.
    pub url: Option<String>,
    pub as_token: Secret,
    pub hs_token: Secret,
    pub sender_localpart: String,
    pub user_namespaces: Vec<NamespaceEntry>,
    /// `org.matrix.msc3682.account_data` in the file: `Some(true)` opts in.
    pub opt_in: Option<bool>,
    pub path: PathBuf,
}

impl Registration {
    /// Load one registration file with Synapse's checks (required string fields; `url` a string
    /// or an explicit null, never missing).
    pub fn load(path: &Path) -> Result<Registration, SynapseFileError> {
        Registration::from_yaml(&read_text(path)?, path)
    }

    /// As [`Registration::load`], from the file's content `text` (pure; `path` names it in errors).
    pub fn from_yaml(text: &str, path: &Path) -> Result<Registration, SynapseFileError> {
        let raw: RegistrationFile = parse_yaml(text, path, "an appservice registration")?;
        let invalid = |message: String| SynapseFileError::Invalid {
            path: path.into(),
            message,
        };
        let required = |v: Option<String>, key: &str| {
            v.filter(|s| !s.is_empty()).ok_or_else(|| {
                invalid(format!(
                    "required string field `{key}` is missing (Synapse rejects this file too)"
                ))
            })
        };
        let required_secret = |v: Option<Secret>, key: &str| {
            v.filter(|s| !s.is_empty()).ok_or_else(|| {
                invalid(format!(
                    "required string field `{key}` is missing (Synapse rejects this file too)"
                ))
            })
        };
        if raw.url.is_none() && !has_explicit_null_url(text) {
            return Err(invalid(
                "required field `url` is missing: it must be a URL or an explicit `url: null` (Synapse rejects this file too)"
                    .into(),
            ));
        }
        Ok(Registration {
            id: required(raw.id, "id")?,
            url: raw.url,
            as_token: required_secret(raw.as_token, "as_token")?,
            hs_token: required_secret(raw.hs_token, "hs_token")?,
            sender_localpart: required(raw.sender_localpart, "sender_localpart")?,
            user_namespaces: raw.namespaces.unwrap_or_default().users,
            opt_in: raw.opt_in,
            path: path.into(),
        })
    }

    /// The appservice's own user, `@<sender_localpart>:<server_name>`.
    pub fn sender_user_id(&self, server_name: &str) -> String {
        format!("@{}:{}", self.sender_localpart, server_name)
    }
}

/// Whether the file has a top-level `url` key whose value is null (`null`, `~`, `Null`, `NULL` or
/// nothing), as opposed to no `url` key at all.
fn has_explicit_null_url(text: &str) -> bool {
    #[derive(Deserialize)]
    struct Keys(BTreeMap<String, serde::de::IgnoredAny>);
    serde_saphyr::from_str_with_options::<Keys>(text, yaml_options())
        .map(|k| k.0.contains_key("url"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(text.as_bytes()).unwrap();
        p
    }

    const REG: &str = "id: irc\nurl: http://localhost:9000\nas_token: astok\nhs_token: hstok\nsender_localpart: ircbot\n\
                       base: &b\n  exclusive: yes\nnamespaces:\n  users:\n    - <<: *b\n      regex: '@irc_.*'\n    - regex: '@x'\n      exclusive: no\n\
                       rate_limited: false\norg.matrix.msc3682.account_data: yes\n";

    #[test]
    fn registration_reads_yaml_1_1_booleans_and_merge_keys() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registration::load(&write(dir.path(), "r.yaml", REG)).unwrap();
        assert_eq!(reg.id, "irc");
        assert_eq!(reg.url.as_deref(), Some("http://localhost:9000"));
        assert_eq!(reg.hs_token.expose(), "hstok");
        assert_eq!(
            reg.user_namespaces,
            vec![
                NamespaceEntry {
                    regex: "@irc_.*".into(),
                    exclusive: true
                },
                NamespaceEntry {
                    regex: "@x".into(),
                    exclusive: false
                }
            ]
        );
        assert_eq!(reg.opt_in, Some(true));
        assert_eq!(reg.sender_user_id("example.org"), "@ircbot:example.org");
    }

    #[test]
    fn registration_url_null_versus_missing() {
        let dir = tempfile::tempdir().unwrap();
        let null = REG.replace("url: http://localhost:9000", "url: null");
        assert_eq!(
            Registration::load(&write(dir.path(), "a.yaml", &null)).unwrap().url,
            None
        );
        let tilde = REG.replace("url: http://localhost:9000", "url: ~");
        assert_eq!(
            Registration::load(&write(dir.path(), "b.yaml", &tilde)).unwrap().url,
            None
        );
        let missing = REG.replace("url: http://localhost:9000\n", "");
        let err = Registration::load(&write(dir.path(), "c.yaml", &missing))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`url` is missing") && err.contains("c.yaml"), "{err}");
    }

    #[test]
    fn registration_errors_name_the_file_and_never_quote_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let broken = REG.replace("sender_localpart: ircbot", "sender_localpart: [");
        let err = Registration::load(&write(dir.path(), "broken.yaml", &broken))
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.yaml") && err.contains("line"), "{err}");
        assert!(!err.contains("astok") && !err.contains("hstok"), "{err}");
        let no_token = REG.replace("hs_token: hstok\n", "");
        let err = Registration::load(&write(dir.path(), "nohs.yaml", &no_token))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`hs_token`"), "{err}");
        let bad_exclusive = REG.replace("exclusive: no", "exclusive: maybe");
        let err = Registration::load(&write(dir.path(), "ex.yaml", &bad_exclusive))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`maybe`") && err.contains("key `exclusive`"),
            "an ordinary value is shown: {err}"
        );
        // Each way a token's line can be wrong: located, never quoted.
        for bad in [
            "hs_token: [S3CRET-hs",
            "hs_token: {x: S3CRET-hs}",
            "hs_token: \"S3CRET-hs\\q\"",
            "hs_token: \"S3CRET-hs",
            "hs_token: !!int S3CRET-hs",
            "hs_token: !!bool S3CRET-hs",
            "hs_token: !!float S3CRET-hs",
            "hs_token: S3CRET-hs: x",
        ] {
            let text = REG.replace("hs_token: hstok", bad);
            let err = Registration::load(&write(dir.path(), "tok.yaml", &text))
                .unwrap_err()
                .to_string();
            assert!(!err.contains("S3CRET") && !err.contains("astok"), "{bad}: {err}");
            assert!(err.contains("tok.yaml") && err.contains("line 4"), "{bad}: {err}");
        }
    }

    #[test]
    fn homeserver_config_merges_files_and_directories_like_synapse() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "homeserver.yaml",
            "server_name: wrong.example\ndatabase:\n  name: psycopg2\n  args:\n    user: synapse\n    password: pw\n    database: synapse\n    host: /var/run/postgresql\n    port: '5433'\n    cp_min: 5\napp_service_config_files:\n  - appservices/irc.yaml\n  - /abs/other.yaml\nunknown_key: {a: [1, 2]}\n",
        );
        let confd = dir.path().join("conf.d");
        std::fs::create_dir(&confd).unwrap();
        write(
            &confd,
            "server_name.yaml",
            "# Debian puts the server name here\nserver_name: example.org\n",
        );
        write(&confd, "empty.yaml", "# nothing\n");
        write(&confd, "ignored.txt", "server_name: not-yaml-ext\n");
        // Relative entries are opened from Synapse's working directory, as Synapse does.
        let hs = HomeserverConfig::load(&[main, confd], Path::new("/var/lib/matrix-synapse")).unwrap();
        assert_eq!(hs.server_name, "example.org");
        assert_eq!(hs.database.args.database.as_deref(), Some("synapse"));
        assert_eq!(hs.database.args.password.as_ref().map(|p| p.expose()), Some("pw"));
        assert_eq!(hs.database.args.port, Some(IntOrString::String("5433".into())));
        assert_eq!(
            hs.app_service_config_files,
            vec![
                PathBuf::from("/var/lib/matrix-synapse/appservices/irc.yaml"),
                PathBuf::from("/abs/other.yaml")
            ]
        );
        assert!(!hs.use_appservice_legacy_authorization);
    }

    #[test]
    fn homeserver_config_on_sqlite_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "hs.yaml",
            "server_name: a\ndatabase:\n  name: sqlite3\n  args:\n    database: /data/homeserver.db\n",
        );
        let err = HomeserverConfig::load(&[f], dir.path()).unwrap_err().to_string();
        assert!(err.contains("SQLite") && err.contains("hs.yaml"), "{err}");
        let f = write(dir.path(), "hs2.yaml", "database:\n  name: psycopg2\n");
        let err = HomeserverConfig::load(&[f], dir.path()).unwrap_err().to_string();
        assert!(err.contains("server_name"), "{err}");
    }
}
