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
    /// The connection (TCP, TLS, authentication, session set-up) took longer than
    /// `connect_timeout`, as libpq's bound.
    #[error("no connection within connect_timeout ({0:?})")]
    Timeout(std::time::Duration),
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

/// What every relay SQL session sets first, whatever the server's (or database's, or role's)
/// defaults: keys the recorder writes must be durable before the slot is confirmed past them,
/// so commits wait for the WAL flush (`synchronous_commit = on`).
pub const SESSION_SETUP_SQL: &str = "SET synchronous_commit = on";

/// Opens an SQL connection, spawns its connection task (which logs its error, if any, when it
/// ends), sets the session up ([`SESSION_SETUP_SQL`]) and returns the client.
pub async fn connect_sql(cfg: &PgConnectionConfig) -> Result<tokio_postgres::Client, SqlConnectError> {
    let target = cfg.describe();
    let error = |source: SqlConnectErrorSource| {
        let sqlstate = match &source {
            SqlConnectErrorSource::Postgres(e) => e.code().map(|c| c.code().to_owned()),
            SqlConnectErrorSource::Tls(_) | SqlConnectErrorSource::Timeout(_) => None,
        };
        SqlConnectError {
            target: target.clone(),
            sqlstate,
            source,
        }
    };
    if cfg.connect_timeout.is_zero() {
        return connect_unbounded(cfg, &error).await;
    }
    // tokio-postgres bounds only the TCP connect; libpq's connect_timeout bounds the whole
    // start-up (a partition after the TCP handshake would otherwise hang here for good).
    match tokio::time::timeout(cfg.connect_timeout, connect_unbounded(cfg, &error)).await {
        Ok(r) => r,
        Err(_) => Err(error(SqlConnectErrorSource::Timeout(cfg.connect_timeout))),
    }
}

async fn connect_unbounded(
    cfg: &PgConnectionConfig,
    error: &impl Fn(SqlConnectErrorSource) -> SqlConnectError,
) -> Result<tokio_postgres::Client, SqlConnectError> {
    let target = cfg.describe();
    let config = tokio_postgres_config(cfg);
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
    client
        .batch_execute(SESSION_SETUP_SQL)
        .await
        .map_err(|e| error(e.into()))?;
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
