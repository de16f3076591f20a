//! libpq's multi-host connection settings, as pure data and decisions (no I/O): the lists of
//! hosts and ports (`host=pg1,pg2 port=5432,5433`, tried in order), `target_session_attrs`, which
//! server a connection accepts, and the error that names every host tried and why it was refused.
//!
//! The relay follows a primary the way Synapse does through psycopg2 (libpq): the same
//! `database.args` (or `[postgres]`, or `PGHOST`/`PGPORT`), each host tried in order with
//! `connect_timeout` per host, and a server accepted only if it can be the relay's primary. The
//! relay needs a primary for its slot and its state schema, so `any` (libpq's default) is read
//! as `primary` (see [`TargetSessionAttrs::for_relay`]); `read-only`, `standby` and
//! `prefer-standby` are refused when the settings are resolved. The connection code
//! (`replication::connection`, `postgres::sql`) calls [`try_in_order`] with a function that
//! connects to one host and reports the server's [`ServerRole`].

use std::fmt;
use std::path::PathBuf;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgHost {
    /// A host name or IP address (TCP).
    Tcp(String),
    /// A directory holding the server's Unix socket `.s.PGSQL.<port>` (libpq: a host starting with `/`).
    UnixSocketDir(PathBuf),
}

/// One host (or Unix socket directory) and its port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgEndpoint {
    pub host: PgHost,
    pub port: u16,
}

impl fmt::Display for PgEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            PgHost::Tcp(h) if h.contains(':') => write!(f, "[{h}]:{}", self.port),
            PgHost::Tcp(h) => write!(f, "{h}:{}", self.port),
            PgHost::UnixSocketDir(d) => write!(f, "{}/.s.PGSQL.{}", d.display(), self.port),
        }
    }
}

/// PostgreSQL's default port.
pub const DEFAULT_PORT: u16 = 5432;

/// The endpoints of libpq's `host` and `port` settings: `host` a comma-separated list (an empty
/// entry, or no `host` at all, is `default_host`; an entry starting with `/` is a Unix socket
/// directory), `port` either one port for every host or one per host (an empty entry is 5432),
/// as libpq pairs them. Errors say what does not match, quoting the values (never secrets).
pub fn parse_endpoints(
    host: Option<&str>,
    port: Option<&str>,
    default_host: &dyn Fn() -> PgHost,
) -> Result<Vec<PgEndpoint>, String> {
    let hosts: Vec<PgHost> = match host {
        None => vec![default_host()],
        Some(text) => text
            .split(',')
            .map(|h| {
                let h = h.trim();
                if h.is_empty() {
                    default_host()
                } else if h.starts_with('/') {
                    PgHost::UnixSocketDir(h.into())
                } else {
                    PgHost::Tcp(h.to_owned())
                }
            })
            .collect(),
    };
    let ports: Vec<u16> = match port {
        None => vec![DEFAULT_PORT],
        Some(text) => text
            .split(',')
            .map(|p| {
                let p = p.trim();
                if p.is_empty() {
                    return Ok(DEFAULT_PORT);
                }
                match p.parse::<u16>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!("{p:?} is not a port number (1 to 65535)")),
                }
            })
            .collect::<Result<_, _>>()?,
    };
    let ports = match (ports.len(), hosts.len()) {
        (1, n) => vec![ports[0]; n],
        (p, h) if p == h => ports,
        (p, h) => {
            return Err(format!(
                "{p} ports for {h} host{}: give one port for all hosts or one per host (as libpq)",
                if h == 1 { "" } else { "s" }
            ));
        }
    };
    Ok(hosts
        .into_iter()
        .zip(ports)
        .map(|(host, port)| PgEndpoint { host, port })
        .collect())
}

/// libpq's `target_session_attrs`: which server a connection accepts. The relay's own
/// connections use [`TargetSessionAttrs::for_relay`]; [`TargetSessionAttrs::Standby`] is how the
/// relay looks at standbys (their copy of the failover slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    /// Any server.
    Any,
    /// Not in recovery and `default_transaction_read_only` off.
    ReadWrite,
    /// Not in recovery (the relay's default).
    #[default]
    Primary,
    /// In recovery (hot standby).
    Standby,
}

impl TargetSessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
        }
    }

    /// The setting the relay's connections use for the configured value: the relay needs a
    /// primary (its slot and state schema are written there), so `any` and no setting mean
    /// `primary`; `read-write` also refuses a primary with `default_transaction_read_only = on`.
    /// `read-only`, `standby` and `prefer-standby` are refused (the error says why).
    pub fn for_relay(configured: Option<&str>) -> Result<TargetSessionAttrs, String> {
        match configured.map(str::trim) {
            None | Some("") | Some("any") | Some("primary") => Ok(TargetSessionAttrs::Primary),
            Some("read-write") => Ok(TargetSessionAttrs::ReadWrite),
            Some(v @ ("read-only" | "standby" | "prefer-standby")) => Err(format!(
                "target_session_attrs {v:?}: the relay needs the primary (its replication slot and its state schema \
                 are written there); use \"read-write\" or \"primary\" (\"any\" is read as \"primary\")"
            )),
            Some(other) => Err(format!(
                "unknown target_session_attrs {other:?} (expected any, read-write or primary)"
            )),
        }
    }

    /// Why a server with `role` is not acceptable, or `None` when it is.
    pub fn refusal(self, role: ServerRole) -> Option<String> {
        match self {
            TargetSessionAttrs::Any => None,
            TargetSessionAttrs::Primary | TargetSessionAttrs::ReadWrite if role.in_recovery => Some(format!(
                "it is a standby (in recovery), and the relay needs the primary (target_session_attrs={})",
                self.as_str()
            )),
            TargetSessionAttrs::ReadWrite if role.default_read_only => Some(
                "it is read-only (default_transaction_read_only = on), and target_session_attrs=read-write".to_owned(),
            ),
            TargetSessionAttrs::Standby if !role.in_recovery => Some("it is a primary, not a standby".to_owned()),
            _ => None,
        }
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a server says about itself: PostgreSQL 14+ reports `in_hot_standby` and
/// `default_transaction_read_only` at connection start (ParameterStatus); older servers are
/// asked (`pg_is_in_recovery()`, `SHOW default_transaction_read_only`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServerRole {
    pub in_recovery: bool,
    pub default_read_only: bool,
}

impl ServerRole {
    /// From the reported parameters, when both are there (`on`/`off`, as PostgreSQL reports
    /// booleans).
    pub fn from_parameters(in_hot_standby: Option<&str>, default_read_only: Option<&str>) -> Option<ServerRole> {
        Some(ServerRole {
            in_recovery: parse_bool(in_hot_standby?)?,
            default_read_only: parse_bool(default_read_only?)?,
        })
    }
}

/// A PostgreSQL boolean as text (`on`, `off`, `t`, `f`, `true`, `false`).
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "on" | "t" | "true" | "1" => Some(true),
        "off" | "f" | "false" | "0" => Some(false),
        _ => None,
    }
}

/// How one host's attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Not reachable, timed out, shutting down or starting up: worth trying again.
    Unreachable(String),
    /// Reached, but not the kind of server wanted (a standby when the primary is needed).
    Refused(String),
    /// Reached, and refused the relay for good (authentication, TLS, a missing database).
    Failed(String),
}

impl AttemptOutcome {
    fn reason(&self) -> &str {
        match self {
            AttemptOutcome::Unreachable(r) | AttemptOutcome::Refused(r) | AttemptOutcome::Failed(r) => r,
        }
    }
}

/// One host tried: where, and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAttempt {
    pub endpoint: PgEndpoint,
    pub outcome: AttemptOutcome,
}

/// No host was accepted: every attempt, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoHostAccepted {
    pub attempts: Vec<HostAttempt>,
    pub wanted: TargetSessionAttrs,
}

impl NoHostAccepted {
    /// Worth trying again: some host was unreachable or not (yet) the wanted kind of server, so
    /// a restart or a promotion may change the answer. Only when every host refused the relay
    /// for good (authentication, TLS) is it not.
    pub fn is_transient(&self) -> bool {
        self.attempts
            .iter()
            .any(|a| !matches!(a.outcome, AttemptOutcome::Failed(_)))
    }

    /// Whether some host was refused because of what it is (a standby).
    pub fn any_refused(&self) -> bool {
        self.attempts
            .iter()
            .any(|a| matches!(a.outcome, AttemptOutcome::Refused(_)))
    }
}

impl NoHostAccepted {
    /// Each host tried and why it was refused: `pg1:5432: …; pg2:5432: …`.
    pub fn reasons(&self) -> String {
        self.attempts
            .iter()
            .map(|a| format!("{}: {}", a.endpoint, a.outcome.reason()))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for NoHostAccepted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.attempts.len();
        write!(
            f,
            "no server accepted (target_session_attrs={}); tried {n} host{}: {}",
            self.wanted,
            if n == 1 { "" } else { "s" },
            self.reasons()
        )
    }
}

impl std::error::Error for NoHostAccepted {}

/// What connecting to one host gave: a connection and the server's role, or an error with how
/// to count it.
pub type OneHost<C, E> = Result<(C, ServerRole), (E, AttemptOutcome)>;

/// What [`try_in_order`] returns when no host was accepted: the error of a single host as it
/// came (so one host behaves exactly as before), or every attempt.
#[derive(Debug)]
pub enum TryError<E> {
    /// One host, which failed to connect: its own error.
    Single(E),
    /// Several hosts, or one host that was not the wanted kind of server.
    All(NoHostAccepted),
}

/// A connection [`try_in_order`] found: the index of its endpoint, and the hosts tried before
/// it with why each was refused.
#[derive(Debug)]
pub struct Found<C> {
    pub conn: C,
    pub index: usize,
    pub skipped: NoHostAccepted,
}

/// Tries `endpoints` in order with `connect_one` (which connects to one host, bounded by its
/// `connect_timeout`) and returns the first connection whose server `wanted` accepts. A
/// connection to a refused server is handed to `close` (so it ends politely) before the next
/// host is tried. No I/O of its own.
pub async fn try_in_order<C, E, F, Fut, Close, CloseFut>(
    endpoints: &[PgEndpoint],
    wanted: TargetSessionAttrs,
    mut connect_one: F,
    mut close: Close,
) -> Result<Found<C>, TryError<E>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = OneHost<C, E>>,
    Close: FnMut(C) -> CloseFut,
    CloseFut: std::future::Future<Output = ()>,
{
    let mut attempts = Vec::with_capacity(endpoints.len());
    let mut single_error = None;
    for (i, endpoint) in endpoints.iter().enumerate() {
        match connect_one(i).await {
            Ok((conn, role)) => match wanted.refusal(role) {
                None => {
                    return Ok(Found {
                        conn,
                        index: i,
                        skipped: NoHostAccepted { attempts, wanted },
                    });
                }
                Some(reason) => {
                    close(conn).await;
                    attempts.push(HostAttempt {
                        endpoint: endpoint.clone(),
                        outcome: AttemptOutcome::Refused(reason),
                    });
                }
            },
            Err((e, outcome)) => {
                attempts.push(HostAttempt {
                    endpoint: endpoint.clone(),
                    outcome,
                });
                single_error = Some(e);
            }
        }
    }
    match (endpoints.len(), single_error) {
        (1, Some(e)) => Err(TryError::Single(e)),
        _ => Err(TryError::All(NoHostAccepted { attempts, wanted })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> PgHost {
        PgHost::UnixSocketDir("/var/run/postgresql".into())
    }

    fn tcp(h: &str, port: u16) -> PgEndpoint {
        PgEndpoint {
            host: PgHost::Tcp(h.into()),
            port,
        }
    }

    #[test]
    fn hosts_and_ports_pair_as_libpq_pairs_them() {
        assert_eq!(
            parse_endpoints(None, None, &local).unwrap(),
            vec![PgEndpoint {
                host: local(),
                port: 5432
            }]
        );
        assert_eq!(
            parse_endpoints(Some("pg1,pg2"), Some("5433"), &local).unwrap(),
            vec![tcp("pg1", 5433), tcp("pg2", 5433)]
        );
        assert_eq!(
            parse_endpoints(Some("127.0.0.1,127.0.0.1"), Some("55601,55602"), &local).unwrap(),
            vec![tcp("127.0.0.1", 55601), tcp("127.0.0.1", 55602)]
        );
        assert_eq!(
            parse_endpoints(Some("pg1, /run/pg ,"), Some("1,,3"), &local).unwrap(),
            vec![
                tcp("pg1", 1),
                PgEndpoint {
                    host: PgHost::UnixSocketDir("/run/pg".into()),
                    port: 5432
                },
                PgEndpoint { host: local(), port: 3 }
            ]
        );
        assert_eq!(parse_endpoints(None, Some("6000"), &local).unwrap()[0].port, 6000);
        let e = parse_endpoints(Some("a,b,c"), Some("1,2"), &local).unwrap_err();
        assert!(e.contains("2 ports for 3 hosts"), "{e}");
        let e = parse_endpoints(None, Some("1,2"), &local).unwrap_err();
        assert!(e.contains("2 ports for 1 host:"), "{e}");
        for bad in ["0", "65536", "x", "5432,x"] {
            let e = parse_endpoints(Some("a,b"), Some(bad), &local).unwrap_err();
            assert!(e.contains("is not a port number"), "{bad}: {e}");
        }
    }

    #[test]
    fn endpoints_display_for_errors() {
        assert_eq!(tcp("db", 5432).to_string(), "db:5432");
        assert_eq!(tcp("::1", 5432).to_string(), "[::1]:5432");
        assert_eq!(
            PgEndpoint {
                host: local(),
                port: 5432
            }
            .to_string(),
            "/var/run/postgresql/.s.PGSQL.5432"
        );
    }

    #[test]
    fn the_relay_needs_a_primary() {
        assert_eq!(TargetSessionAttrs::for_relay(None), Ok(TargetSessionAttrs::Primary));
        assert_eq!(
            TargetSessionAttrs::for_relay(Some("any")),
            Ok(TargetSessionAttrs::Primary)
        );
        assert_eq!(
            TargetSessionAttrs::for_relay(Some("primary")),
            Ok(TargetSessionAttrs::Primary)
        );
        assert_eq!(
            TargetSessionAttrs::for_relay(Some("read-write")),
            Ok(TargetSessionAttrs::ReadWrite)
        );
        for v in ["read-only", "standby", "prefer-standby"] {
            let e = TargetSessionAttrs::for_relay(Some(v)).unwrap_err();
            assert!(e.contains("needs the primary"), "{e}");
        }
        assert!(
            TargetSessionAttrs::for_relay(Some("rw"))
                .unwrap_err()
                .contains("unknown")
        );
    }

    #[test]
    fn which_server_each_setting_accepts() {
        let primary = ServerRole::default();
        let standby = ServerRole {
            in_recovery: true,
            default_read_only: false,
        };
        let read_only_primary = ServerRole {
            in_recovery: false,
            default_read_only: true,
        };
        use TargetSessionAttrs::*;
        assert_eq!(Primary.refusal(primary), None);
        assert!(Primary.refusal(standby).unwrap().contains("standby"));
        assert_eq!(Primary.refusal(read_only_primary), None);
        assert!(ReadWrite.refusal(standby).unwrap().contains("standby"));
        assert!(ReadWrite.refusal(read_only_primary).unwrap().contains("read-only"));
        assert_eq!(ReadWrite.refusal(primary), None);
        assert_eq!(Standby.refusal(standby), None);
        assert!(Standby.refusal(primary).is_some());
        for role in [primary, standby, read_only_primary] {
            assert_eq!(Any.refusal(role), None);
        }
        assert_eq!(ServerRole::from_parameters(Some("on"), Some("off")), Some(standby));
        assert_eq!(ServerRole::from_parameters(None, Some("off")), None);
        assert_eq!(ServerRole::from_parameters(Some("maybe"), Some("off")), None);
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn hosts_are_tried_in_order_and_every_refusal_is_named() {
        let endpoints = vec![tcp("old", 5432), tcp("gone", 5432), tcp("new", 5432)];
        let standby = ServerRole {
            in_recovery: true,
            default_read_only: false,
        };
        let mut closed = Vec::new();
        let result = block_on(try_in_order(
            &endpoints,
            TargetSessionAttrs::Primary,
            |i| async move {
                match i {
                    0 => Ok(("old", standby)),
                    1 => Err(("io", AttemptOutcome::Unreachable("connection refused".into()))),
                    _ => Ok(("new", ServerRole::default())),
                }
            },
            |c| {
                closed.push(c);
                async {}
            },
        ));
        let found = result.unwrap();
        assert_eq!((found.conn, found.index), ("new", 2));
        assert_eq!(found.skipped.attempts.len(), 2);
        assert!(
            found.skipped.reasons().starts_with("old:5432: it is a standby"),
            "{}",
            found.skipped
        );
        assert_eq!(closed, vec!["old"]);

        let result = block_on(try_in_order(
            &endpoints[..2],
            TargetSessionAttrs::Primary,
            |i| async move {
                match i {
                    0 => Ok(("old", standby)),
                    _ => Err(("io", AttemptOutcome::Unreachable("connection refused".into()))),
                }
            },
            |_| async {},
        ));
        let Err(TryError::All(all)) = result else {
            panic!("{result:?}")
        };
        let text = all.to_string();
        assert!(
            text.contains("tried 2 hosts: old:5432: it is a standby") && text.contains("gone:5432: connection refused"),
            "{text}"
        );
        assert!(all.is_transient() && all.any_refused());

        // One host that fails to connect: its own error, as before multi-host settings.
        let result: Result<Found<&str>, _> = block_on(try_in_order(
            &endpoints[..1],
            TargetSessionAttrs::Primary,
            |_| async {
                Err((
                    "its own error",
                    AttemptOutcome::Failed("password authentication failed".into()),
                ))
            },
            |_| async {},
        ));
        assert!(matches!(result, Err(TryError::Single("its own error"))));

        // Every host refusing the relay for good is not worth retrying.
        let all = NoHostAccepted {
            attempts: vec![HostAttempt {
                endpoint: tcp("a", 1),
                outcome: AttemptOutcome::Failed("no".into()),
            }],
            wanted: TargetSessionAttrs::Primary,
        };
        assert!(!all.is_transient());
    }
}
