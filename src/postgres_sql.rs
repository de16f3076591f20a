//! Ordinary SQL connections (tokio-postgres) to the same server as the replication connection,
//! from the same [`PgConnectionConfig`] and with the same TLS configurations ([`crate::tls`]).
//!
//! tokio-postgres itself only knows `disable`, `prefer` and `require`; `verify-ca` and
//! `verify-full` are `require` plus the certificate checks of the rustls configuration. As with
//! libpq (and the replication connection), TLS is never attempted over a Unix socket.

use tokio_postgres::config::SslMode as PgSslMode;

use crate::pgconfig::{PgConnectionConfig, PgHost, SslMode};
use crate::tls::{self, TlsConfigError};

/// Why [`connect_sql`] failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL at {target}: {source}")]
pub struct SqlConnectError {
    /// Where the connection went (`PgConnectionConfig::describe()`).
    pub target: String,
    /// The SQLSTATE when the server refused the connection (e.g. `28P01`).
    pub sqlstate: Option<String>,
    #[source]
    pub source: SqlConnectErrorSource,
}

/// The underlying error of a [`SqlConnectError`].
#[derive(Debug, thiserror::Error)]
pub enum SqlConnectErrorSource {
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

impl SqlConnectError {
    /// The SQLSTATE, when the server sent one.
    pub fn sqlstate(&self) -> Option<&str> {
        self.sqlstate.as_deref()
    }
}

/// The tokio-postgres configuration for `cfg` (without TLS, which is chosen by the connector).
pub fn tokio_postgres_config(cfg: &PgConnectionConfig) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    match &cfg.host {
        PgHost::Tcp(host) => {
            config.host(host);
            config.ssl_mode(match cfg.ssl_mode {
                SslMode::Disable => PgSslMode::Disable,
                SslMode::Prefer => PgSslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
            });
        }
        PgHost::UnixSocketDir(dir) => {
            config.host_path(dir);
            config.ssl_mode(PgSslMode::Disable);
        }
    }
    config
        .port(cfg.port)
        .user(&cfg.user)
        .dbname(&cfg.dbname)
        .application_name(&cfg.application_name);
    if let Some(password) = &cfg.password {
        config.password(password.expose());
    }
    if !cfg.connect_timeout.is_zero() {
        config.connect_timeout(cfg.connect_timeout);
    }
    config
}

/// Opens an SQL connection, spawns its connection task (which logs its error, if any, when it
/// ends) and returns the client.
pub async fn connect_sql(cfg: &PgConnectionConfig) -> Result<tokio_postgres::Client, SqlConnectError> {
    connect_sql_with(cfg, None).await
}

/// As [`connect_sql`], for the running relay's own queries: every statement on the connection
/// runs with `statement_timeout` set to `limit` (sent with the startup packet, no extra round
/// trip), so the server cancels any that takes longer, whatever the caller waits for.
pub async fn connect_sql_bounded(
    cfg: &PgConnectionConfig,
    limit: std::time::Duration,
) -> Result<tokio_postgres::Client, SqlConnectError> {
    connect_sql_with(cfg, Some(limit)).await
}

async fn connect_sql_with(
    cfg: &PgConnectionConfig,
    statement_timeout: Option<std::time::Duration>,
) -> Result<tokio_postgres::Client, SqlConnectError> {
    let target = cfg.describe();
    let error = |source: SqlConnectErrorSource| {
        let sqlstate = match &source {
            SqlConnectErrorSource::Postgres(e) => e.code().map(|c| c.code().to_owned()),
            SqlConnectErrorSource::Tls(_) => None,
        };
        SqlConnectError {
            target: target.clone(),
            sqlstate,
            source,
        }
    };
    let mut config = tokio_postgres_config(cfg);
    if let Some(limit) = statement_timeout {
        config.options(format!("-c statement_timeout={}", limit.as_millis().max(1)));
    }
    let tls_config = match cfg.host {
        PgHost::Tcp(_) => tls::client_config_for(cfg).map_err(|e| error(e.into()))?,
        PgHost::UnixSocketDir(_) => None,
    };
    let client = match tls_config {
        None => {
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| error(e.into()))?;
            spawn_connection(connection, target.clone());
            client
        }
        Some(tls_config) => {
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls_config).clone());
            let (client, connection) = config.connect(connector).await.map_err(|e| error(e.into()))?;
            spawn_connection(connection, target.clone());
            client
        }
    };
    Ok(client)
}

fn spawn_connection<F>(connection: F, target: String)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(server = %target, error = %e, "PostgreSQL SQL connection failed");
        }
    });
}
