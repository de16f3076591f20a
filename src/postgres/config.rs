//! How to reach PostgreSQL: the resolved connection settings shared by the replication connection
//! and the ordinary SQL connection. Built from Synapse's `database.args` (see `synapse::files`),
//! optionally overridden by the relay's own config. Pure data; no I/O. Several hosts (libpq's
//! `host=pg1,pg2`) and `target_session_attrs` are in [`crate::postgres::hosts`].

use std::path::PathBuf;
use std::time::Duration;

use crate::model::Secret;
use crate::postgres::hosts::{PgEndpoint, PgHost, TargetSessionAttrs};

/// libpq's `sslmode`, with the same meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS if the server offers it, without verifying the certificate (libpq's default).
    #[default]
    Prefer,
    /// Require TLS, without verifying the certificate.
    Require,
    /// Require TLS and verify the certificate chain against the root certificates.
    VerifyCa,
    /// Require TLS, verify the chain and that the certificate names the host.
    VerifyFull,
}

impl SslMode {
    /// The mode's name as libpq spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::str::FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            // libpq's `allow` tries without TLS first; we treat it as `prefer`.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "unknown sslmode {other:?} (expected disable, allow, prefer, require, verify-ca or verify-full)"
                ));
            }
        })
    }
}

/// Resolved connection settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgConnectionConfig {
    pub host: PgHost,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub ssl_mode: SslMode,
    /// PEM file with the root certificates the server's chain is verified against, as libpq's
    /// `sslrootcert`: when set, every TLS mode verifies the chain (`prefer` and `require` as
    /// `verify-ca`, as libpq does when a root file exists). [`SYSTEM_ROOT_CERTS`] (`"system"`)
    /// means the system's trust store (only with `verify-full`, as libpq 16+). `None`: no root
    /// file, so the chain is not verified (`verify-ca`/`verify-full` are refused when the
    /// settings are resolved, see `config::resolve_postgres`).
    pub ssl_root_cert: Option<PathBuf>,
    /// A client certificate and its key (libpq's `sslcert` and `sslkey`), sent when the server
    /// asks for one.
    pub ssl_client_cert: Option<ClientCert>,
    /// libpq's `require_auth`: the authentication methods the server may ask for.
    pub require_auth: RequireAuth,
    /// libpq's `channel_binding`.
    pub channel_binding: ChannelBindingMode,
    pub application_name: String,
    pub connect_timeout: Duration,
    /// libpq's `options` (command-line options for the server session, e.g. `-c search_path=x`).
    pub options: Option<String>,
    /// TCP keepalives (libpq's `keepalives*`).
    pub keepalives: Keepalives,
    /// The hosts after `host`/`port`, tried in order when the one before is not reachable or
    /// not the wanted kind of server (libpq's `host=pg1,pg2`); empty for one host.
    pub more_hosts: Vec<PgEndpoint>,
    /// Which server a connection accepts (see [`TargetSessionAttrs::for_relay`]).
    pub target_session_attrs: TargetSessionAttrs,
}

/// libpq's `keepalives`, `keepalives_idle`, `keepalives_interval` and `keepalives_count`: on by
/// default, with the system's timings unless set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalives {
    pub enabled: bool,
    pub idle: Option<Duration>,
    pub interval: Option<Duration>,
    pub count: Option<u32>,
}

impl Default for Keepalives {
    fn default() -> Self {
        Keepalives {
            enabled: true,
            idle: None,
            interval: None,
            count: None,
        }
    }
}

/// libpq's magic `sslrootcert` value for the system's trust store.
pub const SYSTEM_ROOT_CERTS: &str = "system";

/// A client certificate chain (PEM) and its private key (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// libpq's `channel_binding`: whether SCRAM-SHA-256-PLUS (channel binding to the TLS connection)
/// is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChannelBindingMode {
    /// Never bind, even when the server offers it.
    Disable,
    /// Bind when TLS is used and the server offers SCRAM-SHA-256-PLUS (libpq's default).
    #[default]
    Prefer,
    /// The server must authenticate with SCRAM-SHA-256-PLUS: any other method (or none) fails.
    Require,
}

impl ChannelBindingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelBindingMode::Disable => "disable",
            ChannelBindingMode::Prefer => "prefer",
            ChannelBindingMode::Require => "require",
        }
    }
}

impl std::str::FromStr for ChannelBindingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => ChannelBindingMode::Disable,
            "prefer" => ChannelBindingMode::Prefer,
            "require" => ChannelBindingMode::Require,
            other => {
                return Err(format!(
                    "unknown channel_binding {other:?} (expected disable, prefer or require)"
                ));
            }
        })
    }
}

/// An authentication request of the server, as `require_auth` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AuthRequest {
    /// The server asked for nothing (trust, peer, a client certificate alone…).
    None,
    /// A cleartext password (pg_hba `password`).
    Password,
    /// An MD5-hashed password.
    Md5,
    /// SASL (SCRAM-SHA-256 or SCRAM-SHA-256-PLUS).
    ScramSha256,
    /// GSSAPI (also Kerberos V5).
    Gss,
    /// SSPI.
    Sspi,
}

impl AuthRequest {
    /// The name `require_auth` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthRequest::None => "none",
            AuthRequest::Password => "password",
            AuthRequest::Md5 => "md5",
            AuthRequest::ScramSha256 => "scram-sha-256",
            AuthRequest::Gss => "gss",
            AuthRequest::Sspi => "sspi",
        }
    }

    fn from_name(name: &str) -> Option<AuthRequest> {
        Some(match name {
            "none" => AuthRequest::None,
            "password" => AuthRequest::Password,
            "md5" => AuthRequest::Md5,
            "scram-sha-256" => AuthRequest::ScramSha256,
            "gss" => AuthRequest::Gss,
            "sspi" => AuthRequest::Sspi,
            _ => return None,
        })
    }

    /// The request of an `AuthenticationXXX` message (its first field, the request code), as
    /// the server sends it: `None` for codes that are not a request (SASL continuation/final,
    /// GSS continuation, …) or unknown.
    pub fn from_code(code: i32) -> Option<AuthRequest> {
        Some(match code {
            0 => AuthRequest::None,
            3 => AuthRequest::Password,
            5 => AuthRequest::Md5,
            10 => AuthRequest::ScramSha256,
            2 | 7 => AuthRequest::Gss,
            9 => AuthRequest::Sspi,
            _ => return None,
        })
    }
}

/// libpq's `require_auth`: a comma-separated list of methods the server may use
/// (`scram-sha-256,md5`), or of methods it may not (`!password,!md5`); the default allows all.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RequireAuth {
    /// `true`: `methods` are forbidden; `false`: only `methods` are allowed (empty: all are).
    negated: bool,
    methods: Vec<AuthRequest>,
}

impl RequireAuth {
    /// Whether the server may authenticate the client with `request`.
    pub fn allows(&self, request: AuthRequest) -> bool {
        if self.methods.is_empty() {
            return true;
        }
        self.methods.contains(&request) != self.negated
    }

    /// Whether this is libpq's default (every method allowed).
    pub fn is_default(&self) -> bool {
        self.methods.is_empty()
    }

    /// The error text when the server asks for `request` and that is not allowed.
    pub fn refusal(&self, request: AuthRequest) -> String {
        match request {
            AuthRequest::None => {
                format!("the server did not ask the client to authenticate, which require_auth={self} does not allow")
            }
            other => format!(
                "the server asked for {} authentication, which require_auth={self} does not allow (no password was sent)",
                other.as_str()
            ),
        }
    }
}

impl std::fmt::Display for RequireAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let prefix = if self.negated { "!" } else { "" };
        let names: Vec<String> = self.methods.iter().map(|m| format!("{prefix}{}", m.as_str())).collect();
        f.write_str(&names.join(","))
    }
}

impl std::str::FromStr for RequireAuth {
    type Err = String;
    /// libpq's syntax: methods separated by commas, all negated with `!` or none; each at
    /// most once.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = RequireAuth::default();
        if s.is_empty() {
            return Ok(out);
        }
        for (i, item) in s.split(',').enumerate() {
            let (negated, name) = match item.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, item),
            };
            if i > 0 && negated != out.negated {
                return Err(format!(
                    "require_auth {s:?} mixes negative and positive methods (libpq refuses that too)"
                ));
            }
            out.negated = negated;
            let method = AuthRequest::from_name(name).ok_or_else(|| {
                format!(
                    "require_auth {s:?}: unknown method {name:?} (expected password, md5, gss, sspi, scram-sha-256 or none, optionally with a leading !)"
                )
            })?;
            if out.methods.contains(&method) {
                return Err(format!("require_auth {s:?} names {name:?} twice"));
            }
            out.methods.push(method);
        }
        Ok(out)
    }
}

impl PgConnectionConfig {
    /// Settings for `user` on `dbname` at `host`/`port` with libpq's defaults for the rest
    /// (no password, `sslmode=prefer` without root file, every authentication method allowed).
    pub fn new(host: PgHost, port: u16, user: &str, dbname: &str) -> PgConnectionConfig {
        PgConnectionConfig {
            host,
            port,
            user: user.to_owned(),
            password: None,
            dbname: dbname.to_owned(),
            ssl_mode: SslMode::default(),
            ssl_root_cert: None,
            ssl_client_cert: None,
            require_auth: RequireAuth::default(),
            channel_binding: ChannelBindingMode::default(),
            application_name: "synapse-account-data-relay".to_owned(),
            connect_timeout: Duration::from_secs(10),
            options: None,
            keepalives: Keepalives::default(),
            more_hosts: Vec::new(),
            target_session_attrs: TargetSessionAttrs::default(),
        }
    }

    /// Every host, in the order they are tried.
    pub fn endpoints(&self) -> Vec<PgEndpoint> {
        let mut out = vec![PgEndpoint {
            host: self.host.clone(),
            port: self.port,
        }];
        out.extend(self.more_hosts.iter().cloned());
        out
    }

    /// These settings for one of the hosts only.
    pub fn at(&self, endpoint: &PgEndpoint) -> PgConnectionConfig {
        PgConnectionConfig {
            host: endpoint.host.clone(),
            port: endpoint.port,
            more_hosts: Vec::new(),
            ..self.clone()
        }
    }

    /// The same hosts, accepting the server `attrs` wants.
    pub fn with_target(&self, attrs: TargetSessionAttrs) -> PgConnectionConfig {
        PgConnectionConfig {
            target_session_attrs: attrs,
            ..self.clone()
        }
    }

    /// Where this connects, for error messages and logs (never includes the password). Several
    /// hosts are listed in order: `user@pg1:5432,pg2:5432/synapse`.
    pub fn describe(&self) -> String {
        if !self.more_hosts.is_empty() {
            let hosts: Vec<String> = self.endpoints().iter().map(|e| e.to_string()).collect();
            return format!("{}@{}/{}", self.user, hosts.join(","), self.dbname);
        }
        match &self.host {
            PgHost::Tcp(h) => format!("{}@{}:{}/{}", self.user, h, self.port, self.dbname),
            PgHost::UnixSocketDir(d) => {
                format!(
                    "{}@{}/.s.PGSQL.{} (database {})",
                    self.user,
                    d.display(),
                    self.port,
                    self.dbname
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_auth_as_libpq_reads_it() {
        let any: RequireAuth = "".parse().unwrap();
        assert!(any.is_default() && any.allows(AuthRequest::Password) && any.allows(AuthRequest::None));
        let scram: RequireAuth = "scram-sha-256".parse().unwrap();
        assert!(scram.allows(AuthRequest::ScramSha256));
        for r in [
            AuthRequest::None,
            AuthRequest::Password,
            AuthRequest::Md5,
            AuthRequest::Gss,
        ] {
            assert!(!scram.allows(r), "{r:?}");
        }
        let not_plain: RequireAuth = "!password,!md5".parse().unwrap();
        assert!(!not_plain.allows(AuthRequest::Password) && !not_plain.allows(AuthRequest::Md5));
        assert!(not_plain.allows(AuthRequest::ScramSha256) && not_plain.allows(AuthRequest::None));
        assert_eq!(not_plain.to_string(), "!password,!md5");
        let list: RequireAuth = "md5,none".parse().unwrap();
        assert!(list.allows(AuthRequest::None) && list.allows(AuthRequest::Md5) && !list.allows(AuthRequest::Password));
        for bad in [
            "scram-sha-256,!md5",
            "!md5,scram-sha-256",
            "kerberos",
            "md5,md5",
            "md5,",
            "!",
        ] {
            assert!(bad.parse::<RequireAuth>().is_err(), "{bad}");
        }
        assert!(
            scram
                .refusal(AuthRequest::Password)
                .contains("require_auth=scram-sha-256")
        );
        assert_eq!(AuthRequest::from_code(3), Some(AuthRequest::Password));
        assert_eq!(AuthRequest::from_code(11), None);
    }

    #[test]
    fn channel_binding_modes() {
        assert_eq!("require".parse::<ChannelBindingMode>(), Ok(ChannelBindingMode::Require));
        assert_eq!(ChannelBindingMode::default(), ChannelBindingMode::Prefer);
        assert!("yes".parse::<ChannelBindingMode>().is_err());
    }
}
