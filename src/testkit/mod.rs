//! Throw-away PostgreSQL clusters from the machine's own `initdb`/`pg_ctl`, for the `demo`
//! subcommand and the test suite (the one PostgreSQL harness; the tests add a containerised
//! backend on top, in `tests/support`).
//!
//! A [`LocalCluster`] lives in a temporary directory, listens on 127.0.0.1 on a free port and on
//! a Unix socket in its own directory, runs with `wal_level=logical`, and trusts local
//! connections. When the process runs as root, `initdb` and `postgres` (which refuse to run as
//! root) run as the system user `postgres` through `runuser`.
//!
//! Cleanup: dropping the cluster stops it (`pg_ctl stop -m immediate`) and removes its
//! directory. A cluster that is never dropped (one shared by a whole test binary) is given a
//! watcher process ([`LocalCluster::stop_when_process_exits`]) that does the same once this
//! process is gone, however it ended.

pub mod receiver;
pub mod synapse_writes;

use std::fmt;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::pgconfig::{PgConnectionConfig, PgHost, SslMode};

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
    /// Extra `postgresql.conf` settings, passed as `-c name=value`.
    pub settings: Vec<(String, String)>,
    /// Lines added to the top of `pg_hba.conf` (first match wins), before the trust lines.
    pub hba_lines: Vec<String>,
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
        if run_as_postgres {
            let (uid, gid) = postgres_user_ids()?;
            for dir in [&base, &socket_dir] {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .map_err(io_err(format!("chown {} to postgres", dir.display())))?;
            }
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
            settings: options.settings.clone(),
            keep_on_drop: false,
            version,
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data_dir.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
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
        let mut opts = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level=logical \
             -c max_replication_slots=200 -c max_wal_senders=200 -c max_connections=300 -c fsync=off \
             -c full_page_writes=off -c wal_sender_timeout=60s",
            self.port,
            self.socket_dir.display()
        );
        for (k, v) in &self.settings {
            opts.push_str(&format!(" -c {k}={v}"));
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
            "{} {} -D '{}' -m immediate stop >/dev/null 2>&1",
            if self.run_as_postgres {
                "runuser -u postgres --"
            } else {
                ""
            },
            pg_ctl.display(),
            self.data_dir.display()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf '{base}'",
            pid = std::process::id(),
            base = self.base.display()
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
    }
}
