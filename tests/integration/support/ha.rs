//! A PostgreSQL primary and physical standbys as containers on a private Docker network of the
//! test's own, each container with its own address (`docker network create`, `docker run --ip`),
//! so the relay sees a real multi-host setting (`host: "10.x.0.10,10.x.0.11"`), a real
//! promotion (`pg_promote()`), a primary that dies (`docker kill`), one that comes back as a
//! standby (a fresh `pg_basebackup` at its old address), and a standby that stops confirming
//! (`docker pause`). The images are the offline-built test images
//! ([`super::setup::PgTestImage`]); the containers and the network are removed when the value
//! is dropped, or when the test process exits (a watcher, as for the shared container).
//!
//! A standby is made with `pg_basebackup -R -C -S <its physical slot>` from the primary; with
//! [`HaOptions::slot_sync`] it runs with `sync_replication_slots = on`, `hot_standby_feedback =
//! on`, `primary_slot_name` and `dbname` in `primary_conninfo` (PostgreSQL 17+), and the primary
//! gets `synchronized_standby_slots` naming it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Server;
use super::setup::{PgTestImage, ensure_pg_image};

/// How the pair is configured.
#[derive(Clone, Debug)]
pub struct HaOptions {
    /// PostgreSQL 17 or 18.
    pub version: u32,
    /// The standby synchronises failover slots and the primary waits for it
    /// (`synchronized_standby_slots`).
    pub slot_sync: bool,
    /// Extra `postgres -c` settings for every node.
    pub settings: Vec<(String, String)>,
}

impl HaOptions {
    pub fn new(version: u32, slot_sync: bool) -> HaOptions {
        HaOptions {
            version,
            slot_sync,
            settings: Vec::new(),
        }
    }
}

/// One container.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub ip: String,
    /// Its physical slot on the primary (as a standby).
    pub slot: String,
}

/// The network and its nodes (index 0 starts as the primary).
pub struct HaCluster {
    pub network: String,
    pub options: HaOptions,
    pub nodes: Vec<Node>,
    image: String,
}

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!("cannot run docker ({e}): install Docker (Debian/Ubuntu: `apt-get install docker.io`) and start its daemon")
        })?;
    if !out.status.success() {
        return Err(format!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Remove `what` (`rm -f <id>` or `network rm <id>`) when this process exits.
fn remove_at_exit(what: &str) {
    let script = format!(
        "while kill -0 {} 2>/dev/null; do sleep 1; done; docker {what} >/dev/null 2>&1",
        std::process::id()
    );
    let _ = Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl HaCluster {
    /// A primary and `standbys` standbys, all running and the standbys streaming.
    pub fn start(label: &str, options: HaOptions, standbys: usize) -> HaCluster {
        Self::try_start(label, options, standbys).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start(label: &str, options: HaOptions, standbys: usize) -> Result<HaCluster, String> {
        let spec = match options.version {
            17 => PgTestImage::pg17(),
            18 => PgTestImage::pg18(),
            v => return Err(format!("no test image for PostgreSQL {v}")),
        };
        ensure_pg_image(&spec)?;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let network = format!("relay-ha-{}-{n}-{label}", std::process::id());
        // `--ip` needs a subnet of the network's own: pick a /24 nobody uses (other test runs
        // on this machine may hold some).
        let mut prefix = None;
        let mut last_error = String::new();
        for attempt in 0..40u32 {
            let third = (std::process::id() + n * 7 + attempt * 13) % 250 + 1;
            let candidate = format!("10.213.{third}");
            match docker(&["network", "create", "--subnet", &format!("{candidate}.0/24"), &network]) {
                Ok(_) => {
                    prefix = Some(candidate);
                    break;
                }
                Err(e) => last_error = e,
            }
        }
        let prefix = prefix.ok_or_else(|| format!("cannot create a Docker network for {label}: {last_error}"))?;
        remove_at_exit(&format!("network rm {network}"));
        let nodes = (0..=standbys)
            .map(|i| Node {
                name: format!("{network}-n{i}"),
                ip: format!("{prefix}.{}", 10 + i),
                slot: format!("standby_n{i}"),
            })
            .collect();
        let cluster = HaCluster {
            network,
            options,
            nodes,
            image: spec.image,
        };
        cluster.run_primary(0)?;
        for i in 1..=standbys {
            cluster.run_standby(i, 0)?;
        }
        if cluster.options.slot_sync && standbys > 0 {
            let names: Vec<String> = (1..=standbys).map(|i| cluster.nodes[i].slot.clone()).collect();
            cluster.set_synchronized_standby_slots(0, &names)?;
        }
        Ok(cluster)
    }

    /// `synchronized_standby_slots` on node `i` (a primary), reloaded.
    pub fn set_synchronized_standby_slots(&self, i: usize, slots: &[String]) -> Result<(), String> {
        self.psql(
            i,
            &format!("ALTER SYSTEM SET synchronized_standby_slots = '{}'", slots.join(",")),
        )?;
        self.psql(i, "SELECT pg_reload_conf()").map(|_| ())
    }

    fn bin(&self) -> String {
        format!("/usr/lib/postgresql/{}/bin", self.options.version)
    }

    fn common_settings(&self) -> String {
        let mut s = String::from(
            " -c listen_addresses='*' -c wal_level=logical -c max_replication_slots=50 -c max_wal_senders=50 \
             -c max_connections=200 -c fsync=off -c unix_socket_directories=/tmp -c hot_standby=on \
             -c hot_standby_feedback=on -c wal_sender_timeout=5s -c wal_receiver_timeout=5s",
        );
        for (k, v) in &self.options.settings {
            s.push_str(&format!(" -c {k}={v}"));
        }
        s
    }

    fn run_container(&self, i: usize, script: &str) -> Result<(), String> {
        let node = &self.nodes[i];
        let _ = docker(&["rm", "-f", &node.name]);
        docker(&[
            "run",
            "-d",
            "--name",
            &node.name,
            "--network",
            &self.network,
            "--ip",
            &node.ip,
            "--user",
            "postgres",
            &self.image,
            "sh",
            "-c",
            script,
        ])?;
        remove_at_exit(&format!("rm -f {}", node.name));
        self.wait_ready(i)
    }

    /// Node `i` as a new primary (a fresh cluster).
    fn run_primary(&self, i: usize) -> Result<(), String> {
        let script = format!(
            "set -e; export PATH={}:$PATH; initdb -D /tmp/pgdata -U postgres --auth=trust --no-sync >/dev/null; \
             echo 'host all all all trust' >> /tmp/pgdata/pg_hba.conf; \
             echo 'host replication all all trust' >> /tmp/pgdata/pg_hba.conf; \
             exec postgres -D /tmp/pgdata{}",
            self.bin(),
            self.common_settings()
        );
        self.run_container(i, &script)
    }

    /// Node `i` as a standby of node `of` (a fresh base backup, its own physical slot there).
    fn run_standby(&self, i: usize, of: usize) -> Result<(), String> {
        let (node, primary) = (&self.nodes[i], &self.nodes[of]);
        // The physical slot may be left over from an earlier life of this node.
        let _ = self.psql(
            of,
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{}' AND NOT active",
                node.slot
            ),
        );
        let sync = if self.options.slot_sync {
            format!(" -c sync_replication_slots=on -c primary_slot_name={}", node.slot)
        } else {
            String::new()
        };
        let script = format!(
            "set -e; export PATH={bin}:$PATH; \
             until pg_isready -q -h {p} -p 5432; do sleep 0.2; done; \
             pg_basebackup -h {p} -p 5432 -U postgres -D /tmp/pgdata -X stream -R -C -S {slot} --checkpoint=fast --no-sync >/dev/null; \
             exec postgres -D /tmp/pgdata{common}{sync} \
               -c \"primary_conninfo=host={p} port=5432 user=postgres dbname=postgres application_name={slot}\"",
            bin = self.bin(),
            p = primary.ip,
            slot = node.slot,
            common = self.common_settings(),
        );
        self.run_container(i, &script)
    }

    fn wait_ready(&self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.psql(i, "SELECT 1").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs = Command::new("docker")
                    .args(["logs", "--tail", "40", &self.nodes[i].name])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                return Err(format!(
                    "node {} did not become ready within 120s:\n{logs}",
                    self.nodes[i].name
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `sql` run by psql inside node `i` (as `postgres`, database `db`); the rows as text.
    pub fn psql_db(&self, i: usize, db: &str, sql: &str) -> Result<String, String> {
        docker(&[
            "exec",
            &self.nodes[i].name,
            &format!("{}/psql", self.bin()),
            "-h",
            "/tmp",
            "-U",
            "postgres",
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            sql,
        ])
    }

    pub fn psql(&self, i: usize, sql: &str) -> Result<String, String> {
        self.psql_db(i, "postgres", sql)
    }

    /// A [`Server`] naming the nodes in `order` (its connection strings follow the primary:
    /// `target_session_attrs=read-write`), leaked for the test's lifetime.
    pub fn server(&self, order: &[usize]) -> &'static Server {
        let hosts: Vec<&str> = order.iter().map(|&i| self.nodes[i].ip.as_str()).collect();
        Box::leak(Box::new(Server {
            label: "ha",
            host: hosts.join(","),
            port: 5432,
            local: None,
        }))
    }

    /// `docker kill`: the node dies at once, and its address stops answering.
    pub fn kill(&self, i: usize) {
        docker(&["kill", &self.nodes[i].name]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `SELECT pg_promote()` on node `i`, waiting for it to finish.
    pub fn promote(&self, i: usize) {
        let out = self
            .psql(i, "SELECT pg_promote(true, 60)")
            .unwrap_or_else(|e| panic!("promoting {}: {e}", self.nodes[i].name));
        assert_eq!(out, "t", "pg_promote on {}", self.nodes[i].name);
    }

    /// Node `i` comes back at its address as a standby of node `of`: a fresh base backup (what
    /// an administrator does after a failover, or `pg_rewind`).
    pub fn rejoin_as_standby(&self, i: usize, of: usize) {
        self.run_standby(i, of).unwrap_or_else(|e| panic!("{e}"));
        if self.options.slot_sync {
            let slots: Vec<String> = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != of)
                .map(|(_, n)| n.slot.clone())
                .collect();
            self.set_synchronized_standby_slots(of, &slots)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Freeze node `i` (`docker pause`): a standby that stops receiving and confirming.
    pub fn pause(&self, i: usize) {
        docker(&["pause", &self.nodes[i].name]).unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn unpause(&self, i: usize) {
        docker(&["unpause", &self.nodes[i].name]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The last lines of node `i`'s server log.
    pub fn logs(&self, i: usize) -> String {
        Command::new("docker")
            .args(["logs", "--tail", "60", &self.nodes[i].name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    }

    /// Wait until node `i`'s copy of `slot` is synced and persisted (not temporary).
    pub fn wait_for_synced_copy(&self, i: usize, slot: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .psql(
                    i,
                    &format!("SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = '{slot}'"),
                )
                .is_ok_and(|v| v == "t")
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            let _ = docker(&["rm", "-f", &n.name]);
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}
