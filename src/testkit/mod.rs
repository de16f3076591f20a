//! Test kit: takes in what a test wants (server settings, `pg_hba.conf` lines, TLS, appservices);
//! gives out throw-away PostgreSQL clusters, a recording appservice and Synapse-style writes.
//!
//! Throw-away PostgreSQL clusters from the machine's own `initdb`/`pg_ctl`, for the `demo`
//! subcommand and the test suite (the one PostgreSQL harness; the tests add a containerised
//! backend on top, in `tests/integration/support`).
//!
//! A [`LocalCluster`] lives in a temporary directory, listens on 127.0.0.1 on a free port and on
//! a Unix socket in its own directory, runs with `wal_level=logical`, and trusts local
//! connections. When the process runs as root, `initdb` and `postgres` (which refuse to run as
//! root) run as the system user `postgres` through `runuser`; files the server must read (its TLS
//! certificate and key) are copied into the cluster's directory and given to that user.
//!
//! [`LocalClusterOptions`] adjusts a cluster for a test: server settings (which override the
//! defaults above), `pg_hba.conf` lines, `initdb` arguments, TLS. [`LocalCluster::psql`] runs SQL
//! as the superuser, [`LocalCluster::log`] reads the server log.
//!
//! Cleanup: dropping the cluster stops it (`pg_ctl stop -m immediate`) and removes its
//! directory. A cluster that is never dropped (one shared by a whole test binary) is given a
//! watcher process ([`LocalCluster::stop_when_process_exits`]) that does the same once this
//! process is gone, however it ended.

pub mod proxy;
pub mod receiver;
pub mod synapse_writes;

use std::fmt;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::postgres::config::{PgConnectionConfig, SslMode};
use crate::postgres::hosts::PgHost;

/// Synapse's exact definitions of the tables the relay reads (and one busy table it does not).
pub const SYNAPSE_SCHEMA_SQL: &str = include_str!("../../tests/fixtures/synapse_schema.sql");

/// Why a throw-away cluster could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install them \
         (Debian/Ubuntu: `apt-get install postgresql`) or point RELAY_TEST_PG_BINDIR at the \
         directory holding them (e.g. /usr/lib/postgresql/15/bin)"
    )]
    BinariesNotFound,
    #[error("running as root, but there is no system user `postgres` to run PostgreSQL as: {0}")]
    NoPostgresUser(String),
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestkitError {
    let what = what.into();
    move |source| TestkitError::Io { what, source }
}

/// Options for [`LocalCluster::start`].
#[derive(Clone, Debug, Default)]
pub struct LocalClusterOptions {
    /// Server settings, passed as `-c name=value`. A setting named here replaces the harness's
    /// default for it (`listen_addresses`, `wal_level`, `max_connections`, ...; `port` and
    /// `unix_socket_directories` are the harness's own and cannot be replaced).
    pub settings: Vec<(String, String)>,
    /// Lines added to the top of `pg_hba.conf` (first match wins), before the trust lines.
    pub hba_lines: Vec<String>,
    /// Extra `initdb` arguments, e.g. `--wal-segsize=1`.
    pub initdb_args: Vec<String>,
    /// Serve TLS with this certificate and key (`ssl = on`).
    pub tls: Option<ServerTls>,
    /// Paths (files or directories) to remove together with the cluster: when it is dropped, or
    /// by the watcher of [`LocalCluster::stop_when_process_exits`]. For files that must live as
    /// long as the cluster, such as the certificates its clients trust.
    pub remove_with: Vec<PathBuf>,
}

/// The server certificate (PEM, possibly followed by intermediates) and its private key (PEM)
/// for a TLS-serving cluster. Both are copied into the cluster's directory, readable only by the
/// server's user (the key with mode 0600, as PostgreSQL demands), so the originals may live
/// anywhere and be owned by anyone.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A running throw-away PostgreSQL cluster on this machine.
pub struct LocalCluster {
    bindir: PathBuf,
    base: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    run_as_postgres: bool,
    settings: Vec<(String, String)>,
    tls_cert_file: Option<PathBuf>,
    remove_with: Vec<PathBuf>,
    keep_on_drop: bool,
    version: String,
}

impl fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCluster")
            .field("version", &self.version)
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `$RELAY_TEST_PG_BINDIR`, else the
/// newest `/usr/lib/postgresql/*/bin`, else `pg_config --bindir`, else the directory of `initdb`
/// on `PATH`.
pub fn find_pg_bindir() -> Result<PathBuf, TestkitError> {
    let has_binaries = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("RELAY_TEST_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_binaries(&dir) {
            Ok(dir)
        } else {
            Err(TestkitError::BinariesNotFound)
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_binaries(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_binaries(&dir) {
            return Ok(dir);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if has_binaries(&dir) {
            return Ok(dir);
        }
    }
    Err(TestkitError::BinariesNotFound)
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn postgres_user_ids() -> Result<(u32, u32), TestkitError> {
    let id = |flag: &str| -> Result<u32, TestkitError> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| TestkitError::NoPostgresUser(e.to_string()))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| TestkitError::NoPostgresUser(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    };
    Ok((id("-u")?, id("-g")?))
}

/// Quote `s` for `sh` (pg_ctl hands the server options to a shell).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, TestkitError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding a free port"))?;
    Ok(l.local_addr().map_err(io_err("reading a free port"))?.port())
}

impl LocalCluster {
    /// `initdb` a new cluster in a fresh temporary directory and start it.
    pub fn start(options: LocalClusterOptions) -> Result<LocalCluster, TestkitError> {
        let bindir = find_pg_bindir()?;
        let run_as_postgres = running_as_root();
        let base = tempfile::Builder::new()
            .prefix("relay-pg-")
            .tempdir()
            .map_err(io_err("creating a temporary directory"))?
            .keep();
        let data_dir = base.join("data");
        let socket_dir = base.join("socket");
        std::fs::create_dir(&socket_dir).map_err(io_err("creating the socket directory"))?;
        let owner = if run_as_postgres {
            Some(postgres_user_ids()?)
        } else {
            None
        };
        let give_to_server = |path: &Path, mode: Option<u32>| -> Result<(), TestkitError> {
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .map_err(io_err(format!("chown {} to postgres", path.display())))?;
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(io_err(format!("chmod {} {mode:o}", path.display())))?;
            }
            Ok(())
        };
        give_to_server(&base, None)?;
        give_to_server(&socket_dir, None)?;
        let mut settings = options.settings.clone();
        let mut tls_cert_file = None;
        if let Some(tls) = &options.tls {
            let dir = base.join("tls");
            std::fs::create_dir(&dir).map_err(io_err("creating the TLS directory"))?;
            give_to_server(&dir, Some(0o700))?;
            let cert = dir.join("server.crt");
            let key = dir.join("server.key");
            for (from, to, mode) in [(&tls.cert_file, &cert, 0o644), (&tls.key_file, &key, 0o600)] {
                std::fs::copy(from, to).map_err(io_err(format!("copying {}", from.display())))?;
                give_to_server(to, Some(mode))?;
            }
            settings.push(("ssl".into(), "on".into()));
            settings.push(("ssl_cert_file".into(), cert.display().to_string()));
            settings.push(("ssl_key_file".into(), key.display().to_string()));
            tls_cert_file = Some(cert);
        }
        let version = Command::new(bindir.join("postgres"))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let mut cluster = LocalCluster {
            log_file: base.join("postgres.log"),
            bindir,
            base,
            data_dir,
            socket_dir,
            port: 0,
            run_as_postgres,
            settings,
            tls_cert_file,
            remove_with: options.remove_with.clone(),
            keep_on_drop: false,
            version,
        };
        let data_dir = cluster.data_dir.to_string_lossy().into_owned();
        let mut initdb_args = vec![
            "-D",
            &data_dir,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ];
        initdb_args.extend(options.initdb_args.iter().map(String::as_str));
        cluster.run("initdb", &initdb_args)?;
        let mut hba = options.hba_lines.join("\n");
        hba.push_str(
            "\nlocal all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n\
             local replication all trust\nhost replication all 127.0.0.1/32 trust\n",
        );
        // pg_hba.conf belongs to the postgres user; rewriting it in place keeps its owner.
        std::fs::write(cluster.data_dir.join("pg_hba.conf"), hba).map_err(io_err("writing pg_hba.conf"))?;
        let mut last_error = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or(TestkitError::BinariesNotFound))
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), TestkitError> {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("running {program}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(TestkitError::Command {
                what: format!("{program} {}", args.join(" ")),
                detail: format!(
                    "{}{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tail()
                ),
            })
        }
    }

    /// The last lines of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(20);
        if lines.is_empty() {
            String::new()
        } else {
            format!("\nserver log:\n{}", lines[start..].join("\n"))
        }
    }

    fn pg_ctl_start(&self) -> Result<(), TestkitError> {
        let defaults = [
            ("listen_addresses", "127.0.0.1"),
            ("wal_level", "logical"),
            ("max_replication_slots", "200"),
            ("max_wal_senders", "200"),
            ("max_connections", "300"),
            ("fsync", "off"),
            ("full_page_writes", "off"),
            ("wal_sender_timeout", "60s"),
        ];
        let mut opts = format!(
            "-c port={} -c {}",
            self.port,
            shell_quote(&format!("unix_socket_directories={}", self.socket_dir.display()))
        );
        let overridden = |name: &str| self.settings.iter().any(|(k, _)| k == name);
        let settings = defaults
            .iter()
            .filter(|(k, _)| !overridden(k))
            .map(|(k, v)| (*k, *v))
            .chain(self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (k, v) in settings {
            opts.push_str(&format!(" -c {}", shell_quote(&format!("{k}={v}"))));
        }
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir.to_string_lossy(),
                "-l",
                &self.log_file.to_string_lossy(),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        )
    }

    /// Stop the server: `mode` is `fast`, `smart` or `immediate` (a crash, as `kill -9` would do).
    pub fn stop(&self, mode: &str) -> Result<(), TestkitError> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir.to_string_lossy(),
                "-w",
                "-t",
                "60",
                "-m",
                mode,
                "stop",
            ],
        )
    }

    /// Start the server again after [`LocalCluster::stop`], on the same port.
    pub fn restart(&self) -> Result<(), TestkitError> {
        self.pg_ctl_start()
    }

    /// Keep the cluster running after this value is dropped, and stop it (and remove its
    /// directory) only when this process exits: for a cluster shared by a whole test binary.
    pub fn stop_when_process_exits(&mut self) -> Result<(), TestkitError> {
        let pg_ctl = self.bindir.join("pg_ctl");
        let stop = format!(
            "{} {} -D {} -m immediate stop >/dev/null 2>&1",
            if self.run_as_postgres {
                "runuser -u postgres --"
            } else {
                ""
            },
            shell_quote(&pg_ctl.display().to_string()),
            shell_quote(&self.data_dir.display().to_string())
        );
        let remove = std::iter::once(&self.base)
            .chain(&self.remove_with)
            .map(|p| shell_quote(&p.display().to_string()))
            .collect::<Vec<_>>()
            .join(" ");
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf {remove}",
            pid = std::process::id(),
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("starting the cleanup watcher"))?;
        self.keep_on_drop = true;
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
    /// The directory of the cluster's binaries (for `pg_recvlogical` and friends).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }
    /// What `postgres --version` printed.
    pub fn version(&self) -> &str {
        &self.version
    }
    /// The server's certificate (its copy), when started with [`LocalClusterOptions::tls`].
    pub fn tls_cert_file(&self) -> Option<&Path> {
        self.tls_cert_file.as_deref()
    }
    /// The server log file.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }
    /// The whole server log so far (empty if it cannot be read).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Run `sql` (one or more statements) in `dbname` as the superuser `postgres`, over the Unix
    /// socket, with `psql` (from the server's directory, else `PATH`), stopping at the first
    /// error. Returns what psql printed (unaligned, tuples only), trimmed.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, TestkitError> {
        let beside = self.bindir.join("psql");
        let program = if beside.is_file() {
            beside
        } else {
            PathBuf::from("psql")
        };
        let out = Command::new(&program)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-d",
                dbname,
                "-h",
            ])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| TestkitError::Command {
                what: format!("running {}", program.display()),
                detail: format!(
                    "{e}: install the PostgreSQL client (Debian/Ubuntu: `apt-get install postgresql-client`)"
                ),
            })?;
        if !out.status.success() {
            return Err(TestkitError::Command {
                what: format!("psql -c {sql:?}"),
                detail: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Connection settings for `dbname` as the superuser `postgres`, over TCP.
    pub fn connection_config(&self, dbname: &str) -> PgConnectionConfig {
        PgConnectionConfig {
            host: PgHost::Tcp("127.0.0.1".into()),
            port: self.port,
            user: "postgres".into(),
            password: None,
            dbname: dbname.into(),
            ssl_mode: SslMode::Disable,
            ssl_root_cert: None,
            application_name: "relay-test".into(),
            connect_timeout: Duration::from_secs(10),
            ssl_client_cert: None,
            require_auth: Default::default(),
            channel_binding: Default::default(),
            options: None,
            keepalives: Default::default(),
            more_hosts: Vec::new(),
            target_session_attrs: Default::default(),
        }
    }

    /// Connection settings for `dbname` as the superuser `postgres`, over the Unix socket (where
    /// TLS is never used).
    pub fn unix_socket_config(&self, dbname: &str) -> PgConnectionConfig {
        PgConnectionConfig {
            host: PgHost::UnixSocketDir(self.socket_dir.clone()),
            ..self.connection_config(dbname)
        }
    }

    /// A libpq-style connection string for `dbname` as `postgres` (for tokio-postgres, psql).
    pub fn connection_string(&self, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={dbname}", self.port)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.keep_on_drop {
            return;
        }
        let _ = self.stop("immediate");
        let _ = std::fs::remove_dir_all(&self.base);
        for path in &self.remove_with {
            let _ = std::fs::remove_dir_all(path).or_else(|_| std::fs::remove_file(path));
        }
    }
}
