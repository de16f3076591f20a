//! Ordinary SQL connections (tokio-postgres) to the same server as the replication connection,
//! from the same [`PgConnectionConfig`] and with the same TLS configurations ([`crate::postgres::tls`]).
//!
//! tokio-postgres itself only knows `disable`, `prefer` and `require`; `verify-ca` and
//! `verify-full` are `require` plus the certificate checks of the rustls configuration. As with
//! libpq (and the replication connection), TLS is never attempted over a Unix socket.
//!
//! The relay opens the socket itself (libpq's `keepalives*`, `connect_timeout` over the whole)
//! and hands it to tokio-postgres (`connect_raw`) through an [`AuthGuard`], which enforces
//! libpq's `require_auth` (tokio-postgres has no such setting): it follows the server's messages
//! up to `AuthenticationOk` and fails the read of a forbidden request, so tokio-postgres never
//! answers it with a password. `channel_binding` is tokio-postgres's own; the TLS session
//! offers `tls-server-end-point` from [`crate::postgres::tls::tls_server_end_point`].

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{ChannelBinding as PgChannelBinding, SslMode as PgSslMode};
use tokio_postgres::tls::{ChannelBinding, NoTls, TlsConnect, TlsStream};

use crate::postgres::config::{AuthRequest, ChannelBindingMode, PgConnectionConfig, RequireAuth, SslMode};
use crate::postgres::hosts::{AttemptOutcome, PgHost, ServerRole, TargetSessionAttrs, TryError, try_in_order};
use crate::postgres::tls::{self, TlsConfigError};

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
    #[error("{}", postgres_error_text(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("connecting: {0}")]
    Io(#[from] io::Error),
    #[error("no connection within {0:?} (connect_timeout)")]
    Timeout(Duration),
    /// The server asked for an authentication method `require_auth` forbids.
    #[error("{0}")]
    AuthRefused(String),
    /// No host was the server wanted (see [`crate::postgres::hosts`]): every host tried, and why.
    #[error("{0}")]
    NoHostAccepted(crate::postgres::hosts::NoHostAccepted),
}

/// tokio-postgres's error with its cause (its `Display` shows only the kind).
fn postgres_error_text(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!("{}: {}", db.severity(), db.message()),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

impl SqlConnectError {
    /// The SQLSTATE, when the server sent one.
    pub fn sqlstate(&self) -> Option<&str> {
        self.sqlstate.as_deref()
    }

    /// How this failure on one host counts when several are tried: unreachable, timed out, or
    /// not accepting connections now (starting up, shutting down, too many connections) is
    /// worth trying again; anything else (authentication, TLS) is not.
    pub fn attempt_outcome(&self) -> AttemptOutcome {
        let text = self.source.to_string();
        let transient = match &self.source {
            SqlConnectErrorSource::Io(_) | SqlConnectErrorSource::Timeout(_) => true,
            SqlConnectErrorSource::Postgres(e) => match e.code() {
                Some(code) => {
                    let c = code.code();
                    c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "53300")
                }
                None => true,
            },
            SqlConnectErrorSource::NoHostAccepted(all) => all.is_transient(),
            SqlConnectErrorSource::Tls(_) | SqlConnectErrorSource::AuthRefused(_) => false,
        };
        if transient {
            AttemptOutcome::Unreachable(text)
        } else {
            AttemptOutcome::Failed(text)
        }
    }
}

/// The tokio-postgres configuration for `cfg` (the socket and TLS are set up by
/// [`connect_sql`]).
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
        .application_name(&cfg.application_name)
        .channel_binding(match cfg.channel_binding {
            ChannelBindingMode::Disable => PgChannelBinding::Disable,
            ChannelBindingMode::Prefer => PgChannelBinding::Prefer,
            ChannelBindingMode::Require => PgChannelBinding::Require,
        });
    if let Some(options) = &cfg.options {
        config.options(options);
    }
    if let Some(password) = &cfg.password {
        config.password(password.expose());
    }
    config
}

/// What every relay SQL session sets first, whatever the server's (or database's, or role's)
/// defaults: keys the recorder writes must be durable before the slot is confirmed past them,
/// so commits wait for the WAL flush (`synchronous_commit = on`).
pub const SESSION_SETUP_SQL: &str = "SET synchronous_commit = on";

/// Opens an SQL connection, spawns its connection task (which logs its error, if any, when it
/// ends), sets the session up ([`SESSION_SETUP_SQL`]) and returns the client. Each host of `cfg`
/// is tried in order, each attempt bounded by `cfg.connect_timeout` (zero: no bound), until one
/// is the server `cfg.target_session_attrs` wants (the primary); when none is, the error names
/// every host tried and why it was refused. With one host, a failure to connect is that host's
/// own error.
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
    let endpoints = cfg.endpoints();
    let wanted = cfg.target_session_attrs;
    let result = try_in_order(
        &endpoints,
        wanted,
        |i| {
            let one = cfg.at(&endpoints[i]);
            async move {
                match connect_one(&one, wanted, statement_timeout).await {
                    Ok(x) => Ok(x),
                    Err(e) => {
                        let outcome = e.attempt_outcome();
                        Err((e, outcome))
                    }
                }
            }
        },
        // Dropping the client ends its connection (Terminate).
        |client: tokio_postgres::Client| async move { drop(client) },
    )
    .await;
    match result {
        Ok(found) => {
            if found.index > 0 {
                tracing::debug!(skipped = %found.skipped.reasons(), "SQL connection: earlier hosts of the list were refused");
            }
            Ok(found.conn)
        }
        Err(TryError::Single(e)) => Err(e),
        Err(TryError::All(all)) => Err(SqlConnectError {
            target: cfg.describe(),
            sqlstate: None,
            source: SqlConnectErrorSource::NoHostAccepted(all),
        }),
    }
}

/// Connects to `cfg`'s first host only and tells what kind of server it is (when `wanted` is
/// not `any`).
async fn connect_one(
    cfg: &PgConnectionConfig,
    wanted: TargetSessionAttrs,
    statement_timeout: Option<std::time::Duration>,
) -> Result<(tokio_postgres::Client, ServerRole), SqlConnectError> {
    let target = cfg.describe();
    let error = |source: SqlConnectErrorSource| {
        let sqlstate = match &source {
            SqlConnectErrorSource::Postgres(e) => e.code().map(|c| c.code().to_owned()),
            _ => None,
        };
        SqlConnectError {
            target: target.clone(),
            sqlstate,
            source,
        }
    };
    let attempt = async {
        let (client, reported) = connect_unbounded(cfg, &target, statement_timeout).await?;
        let role = match reported {
            Some(role) => role,
            None if wanted == TargetSessionAttrs::Any => ServerRole::default(),
            None => {
                let row = client
                    .query_one(
                        "SELECT pg_catalog.pg_is_in_recovery(), \
                         pg_catalog.current_setting('default_transaction_read_only') = 'on'",
                        &[],
                    )
                    .await?;
                ServerRole {
                    in_recovery: row.try_get(0)?,
                    default_read_only: row.try_get(1)?,
                }
            }
        };
        Ok::<_, SqlConnectErrorSource>((client, role))
    };
    let result = if cfg.connect_timeout.is_zero() {
        attempt.await
    } else {
        tokio::time::timeout(cfg.connect_timeout, attempt)
            .await
            .unwrap_or(Err(SqlConnectErrorSource::Timeout(cfg.connect_timeout)))
    };
    result.map_err(error)
}

async fn connect_unbounded(
    cfg: &PgConnectionConfig,
    target: &str,
    statement_timeout: Option<std::time::Duration>,
) -> Result<(tokio_postgres::Client, Option<ServerRole>), SqlConnectErrorSource> {
    let mut config = tokio_postgres_config(cfg);
    if let Some(limit) = statement_timeout {
        // Appended to the user's own `options` (libpq's), if any.
        let timeout = format!("-c statement_timeout={}", limit.as_millis().max(1));
        let options = match &cfg.options {
            Some(own) => format!("{own} {timeout}"),
            None => timeout,
        };
        config.options(&options);
    }
    let refusal = Arc::new(Mutex::new(None));
    match &cfg.host {
        PgHost::UnixSocketDir(dir) => {
            let stream = UnixStream::connect(dir.join(format!(".s.PGSQL.{}", cfg.port))).await?;
            let stream = AuthGuard::new(stream, false, cfg.require_auth.clone(), None, refusal.clone());
            handshake(&config, stream, NoTls, target, &refusal).await
        }
        PgHost::Tcp(host) => {
            let tcp = TcpStream::connect((host.as_str(), cfg.port)).await?;
            tcp.set_nodelay(true)?;
            crate::postgres::socket::set_keepalives(&tcp, &cfg.keepalives)?;
            match tls::client_config_for(cfg)? {
                None => {
                    let stream = AuthGuard::new(tcp, false, cfg.require_auth.clone(), None, refusal.clone());
                    handshake(&config, stream, NoTls, target, &refusal).await
                }
                Some(tls_config) => {
                    // The guard on the socket watches the plain bytes if the server declines TLS
                    // (`prefer`); the one above TLS watches the session otherwise.
                    let stream = AuthGuard::new(tcp, true, cfg.require_auth.clone(), None, refusal.clone());
                    let connect = RelayTlsConnect {
                        config: tls_config,
                        server_name: tls::server_name(host, cfg.ssl_mode)?,
                        require_auth: cfg.require_auth.clone(),
                        refusal: refusal.clone(),
                    };
                    handshake(&config, stream, connect, target, &refusal).await
                }
            }
        }
    }
}

async fn handshake<S, T>(
    config: &tokio_postgres::Config,
    stream: S,
    tls: T,
    target: &str,
    refusal: &Mutex<Option<String>>,
) -> Result<(tokio_postgres::Client, Option<ServerRole>), SqlConnectErrorSource>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: TlsConnect<S>,
    T::Stream: Send + 'static,
{
    match config.connect_raw(stream, tls).await {
        Ok((client, connection)) => {
            // What the server reported at start (PostgreSQL 14+), before the connection task
            // takes the connection.
            let role = ServerRole::from_parameters(
                connection.parameter("in_hot_standby"),
                connection.parameter("default_transaction_read_only"),
            );
            spawn_connection(connection, target.to_owned());
            client.batch_execute(SESSION_SETUP_SQL).await?;
            Ok((client, role))
        }
        Err(e) => match refusal.lock().ok().and_then(|mut r| r.take()) {
            Some(reason) => Err(SqlConnectErrorSource::AuthRefused(reason)),
            None => Err(e.into()),
        },
    }
}

fn spawn_connection<F>(connection: F, target: String)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(server = %target, error = %postgres_error_text(&e), "PostgreSQL SQL connection failed");
        }
    });
}

/// The TLS handshake of an SQL connection with the relay's rustls configuration; the session is
/// watched by an [`AuthGuard`] and offers `tls-server-end-point` channel binding
/// ([`tls::tls_server_end_point`]).
struct RelayTlsConnect {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    require_auth: RequireAuth,
    refusal: Arc<Mutex<Option<String>>>,
}

type TlsConnectFuture<S> =
    Pin<Box<dyn std::future::Future<Output = io::Result<AuthGuard<tokio_rustls::client::TlsStream<S>>>> + Send>>;

impl<S> TlsConnect<S> for RelayTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = AuthGuard<tokio_rustls::client::TlsStream<S>>;
    type Error = io::Error;
    type Future = TlsConnectFuture<S>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.server_name, stream)
                .await?;
            let end_point = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| tls::tls_server_end_point(cert));
            Ok(AuthGuard::new(
                stream,
                false,
                self.require_auth,
                end_point,
                self.refusal,
            ))
        })
    }
}

/// Where an [`AuthGuard`] is in the server's byte stream.
#[derive(Debug, Clone, Copy)]
enum GuardState {
    /// The next byte is the reply to SSLRequest: `S` (TLS follows: nothing more to watch here)
    /// or anything else (no TLS: messages follow).
    SslReply,
    /// Reading a message header (tag and length); `have` bytes of it so far.
    Header { header: [u8; 5], have: usize },
    /// Reading the body of a message: `remaining` bytes; for an Authentication message, its
    /// request code (first four bytes) as far as read.
    Body {
        remaining: usize,
        auth_code: Option<([u8; 4], usize)>,
    },
    /// Authentication is over (or TLS took over): bytes pass unwatched.
    Done,
}

/// A stream that watches the server's messages up to `AuthenticationOk` and fails the read
/// (before tokio-postgres sees the request, so before any password is sent) when the server asks
/// for a method `require_auth` forbids. Never looks at what the client sends.
pub struct AuthGuard<S> {
    inner: S,
    state: GuardState,
    require_auth: RequireAuth,
    /// Whether the server has asked for any authentication yet.
    asked: bool,
    channel_binding: Option<Vec<u8>>,
    refusal: Arc<Mutex<Option<String>>>,
}

impl<S> AuthGuard<S> {
    fn new(
        inner: S,
        expect_ssl_reply: bool,
        require_auth: RequireAuth,
        channel_binding: Option<Vec<u8>>,
        refusal: Arc<Mutex<Option<String>>>,
    ) -> Self {
        let state = if require_auth.is_default() {
            GuardState::Done
        } else if expect_ssl_reply {
            GuardState::SslReply
        } else {
            GuardState::Header {
                header: [0; 5],
                have: 0,
            }
        };
        AuthGuard {
            inner,
            state,
            require_auth,
            asked: false,
            channel_binding,
            refusal,
        }
    }

    /// Follows `bytes` from the server; `Err` with the reason when a request is refused.
    fn watch(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            match &mut self.state {
                GuardState::Done => return Ok(()),
                GuardState::SslReply => {
                    self.state = if bytes[0] == b'S' {
                        GuardState::Done
                    } else {
                        GuardState::Header {
                            header: [0; 5],
                            have: 0,
                        }
                    };
                    bytes = &bytes[1..];
                }
                GuardState::Header { header, have } => {
                    let take = (5 - *have).min(bytes.len());
                    header[*have..*have + take].copy_from_slice(&bytes[..take]);
                    *have += take;
                    bytes = &bytes[take..];
                    if *have == 5 {
                        let tag = header[0];
                        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
                        self.state = GuardState::Body {
                            remaining: len.saturating_sub(4),
                            auth_code: (tag == b'R').then_some(([0; 4], 0)),
                        };
                        self.end_of_body_check()?;
                    }
                }
                GuardState::Body { remaining, auth_code } => {
                    let take = (*remaining).min(bytes.len());
                    let mut code_complete = None;
                    if let Some((code, have)) = auth_code
                        && *have < 4
                    {
                        let n = (4 - *have).min(take);
                        code[*have..*have + n].copy_from_slice(&bytes[..n]);
                        *have += n;
                        if *have == 4 {
                            code_complete = Some(i32::from_be_bytes(*code));
                        }
                    }
                    *remaining -= take;
                    bytes = &bytes[take..];
                    if let Some(code) = code_complete {
                        self.check_request(code)?;
                    }
                    self.end_of_body_check()?;
                }
            }
        }
        Ok(())
    }

    fn end_of_body_check(&mut self) -> Result<(), String> {
        if let GuardState::Body { remaining: 0, .. } = self.state {
            self.state = GuardState::Header {
                header: [0; 5],
                have: 0,
            };
        }
        Ok(())
    }

    fn check_request(&mut self, code: i32) -> Result<(), String> {
        let Some(request) = AuthRequest::from_code(code) else {
            return Ok(()); // SASL continue/final, GSS continue
        };
        if request == AuthRequest::None {
            self.state = GuardState::Done;
            if self.asked {
                return Ok(());
            }
        }
        self.asked = true;
        if self.require_auth.allows(request) {
            Ok(())
        } else {
            Err(self.require_auth.refusal(request))
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthGuard<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let GuardState::Done = this.state {
                    return Poll::Ready(Ok(()));
                }
                let new = buf.filled()[before..].to_vec();
                match this.watch(&new) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(reason) => {
                        buf.set_filled(before);
                        if let Ok(mut slot) = this.refusal.lock() {
                            *slot = Some(reason.clone());
                        }
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::PermissionDenied, reason)))
                    }
                }
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthGuard<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for AuthGuard<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match &self.channel_binding {
            Some(data) => ChannelBinding::tls_server_end_point(data.clone()),
            None => ChannelBinding::none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth_message(code: i32, extra: &[u8]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&(8 + extra.len() as u32).to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(extra);
        m
    }

    fn guard(require: &str, ssl: bool) -> AuthGuard<tokio::io::Empty> {
        AuthGuard::new(
            tokio::io::empty(),
            ssl,
            require.parse().unwrap(),
            None,
            Arc::new(Mutex::new(None)),
        )
    }

    #[test]
    fn refuses_forbidden_requests_in_any_split() {
        let cleartext = auth_message(3, b"");
        let sasl = auth_message(10, b"SCRAM-SHA-256\0\0");
        let notice = [b'N', 0, 0, 0, 6, b'x', 0];
        for (require, stream, refused) in [
            ("scram-sha-256", [&notice[..], &cleartext].concat(), true),
            ("scram-sha-256", sasl.clone(), false),
            ("!password", cleartext.clone(), true),
            ("password", cleartext.clone(), false),
            ("scram-sha-256", auth_message(0, b""), true),
            ("none", auth_message(0, b""), false),
            (
                "scram-sha-256",
                [
                    sasl.clone(),
                    auth_message(11, b"r=x"),
                    auth_message(12, b"v=y"),
                    auth_message(0, b""),
                    cleartext.clone(),
                ]
                .concat(),
                false,
            ),
        ] {
            // Every split point of the stream gives the same verdict.
            for cut in 0..=stream.len() {
                let mut g = guard(require, false);
                let verdict = g.watch(&stream[..cut]).and_then(|()| g.watch(&stream[cut..]));
                assert_eq!(verdict.is_err(), refused, "{require} cut {cut}: {verdict:?}");
            }
            // Byte by byte.
            let mut g = guard(require, false);
            let verdict = stream.iter().try_for_each(|b| g.watch(std::slice::from_ref(b)));
            assert_eq!(verdict.is_err(), refused, "{require} bytewise");
        }
    }

    #[test]
    fn ssl_reply_then_tls_is_not_watched() {
        let mut g = guard("scram-sha-256", true);
        // 'S' then TLS records: not messages.
        assert!(g.watch(b"S\x16\x03\x03\x00\x05Rxxxx\x00\x00\x00\x03").is_ok());
        // 'N' then a plain cleartext request.
        let mut g = guard("scram-sha-256", true);
        let err = g.watch(&[b"N".as_slice(), &auth_message(3, b"")].concat()).unwrap_err();
        assert!(err.contains("password"), "{err}");
    }
}
