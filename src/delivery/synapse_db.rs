//! The SQL connection the workers and the recorder share (the metrics poll and the failover watch
//! borrow it), and the bound on each operation over it.

use std::sync::Arc;
use std::time::Duration;

use crate::postgres::config::PgConnectionConfig;
use crate::resync::store::StoreError;

/// One lazily (re)connected SQL connection to Synapse's database, shared by the workers and the
/// recorder (statements are pipelined over it), so the relay adds one connection, not one per
/// appservice.
pub struct SynapseDb {
    config: PgConnectionConfig,
    client: tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
}

impl SynapseDb {
    pub fn new(config: PgConnectionConfig) -> SynapseDb {
        SynapseDb {
            config,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The connection, connecting if there is none or it closed.
    pub async fn client(&self) -> Result<Arc<tokio_postgres::Client>, StoreError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let c = crate::postgres::sql::connect_sql_bounded(&self.config, SQL_TIMEOUT)
            .await
            .map_err(|e| StoreError {
                what: "connecting to Synapse's database",
                message: e.to_string(),
                sqlstate: e.sqlstate().map(str::to_owned),
                connection_lost: true,
            })?;
        let c = Arc::new(c);
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Forget the connection (it did not answer in time, or it went to a server that is no
    /// longer the primary): the next use connects again.
    pub async fn forget(&self) {
        *self.client.lock().await = None;
    }

    /// Forget the connection after an error that says it is gone.
    pub async fn forget_if_lost(&self, e: &StoreError) {
        if e.connection_lost {
            *self.client.lock().await = None;
        }
    }
}

/// How long one database operation of the workers or the recorder may take. A connection that
/// takes longer (a network partition TCP does not report) is dropped and made again.
pub const SQL_TIMEOUT: Duration = Duration::from_secs(30);

/// `op`, or a "connection lost" error after [`SQL_TIMEOUT`] (each statement is also bounded on
/// the server: [`SynapseDb`] connections run with `statement_timeout` = [`SQL_TIMEOUT`]).
pub async fn bounded<T>(op: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    match tokio::time::timeout(SQL_TIMEOUT, op).await {
        Ok(r) => r,
        Err(_) => Err(StoreError {
            what: "a database operation",
            message: format!("no answer within {SQL_TIMEOUT:?}"),
            sqlstate: None,
            connection_lost: true,
        }),
    }
}
