//! How to reach PostgreSQL: the resolved connection settings shared by the replication connection
//! and the ordinary SQL connection. Built from Synapse's `database.args` (see `synapse::config`),
//! optionally overridden by the relay's own config. Pure data; no I/O.

use std::path::PathBuf;
use std::time::Duration;

use crate::model::Secret;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgHost {
    /// A host name or IP address (TCP).
    Tcp(String),
    /// A directory holding the server's Unix socket `.s.PGSQL.<port>` (libpq: a host starting with `/`).
    UnixSocketDir(PathBuf),
}

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
    /// PEM file with the root certificates for `verify-ca`/`verify-full`; `None` means the
    /// system's trust roots (libpq's `sslrootcert=system`).
    pub ssl_root_cert: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Duration,
}

impl PgConnectionConfig {
    /// Where this connects, for error messages and logs (never includes the password).
    pub fn describe(&self) -> String {
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
