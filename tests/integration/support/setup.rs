//! The suite's own set-up, done on first use and cached, the way testcontainers pulls an image:
//! the PostgreSQL test images and the Synapse (+ mautrix) virtual environment. A fresh machine
//! needs nothing but `cargo test`.
//!
//! Each step runs its `.ci/` script, which does the work under a file lock in
//! `~/.cache/synapse-account-data-relay/` (so parallel test binaries and tests do it once; whoever
//! waited finds it done) and reuses what exists. A step that has work to do prints what it does
//! and how long it took on the terminal (not captured by the test harness). What a step cannot do
//! itself (no Docker daemon, no debootstrap and not root, no C compiler or headers for psycopg2)
//! fails the test with the script's message, which names the command that fixes it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

/// One image build at a time within this process, and one virtualenv step (the scripts' file
/// locks order processes); an image build and the virtualenv may run at the same time.
static IMAGE_SETUP: Mutex<()> = Mutex::new(());
static VENV_SETUP: Mutex<()> = Mutex::new(());

/// A PostgreSQL test image that `.ci/build-pg-image.sh` builds: Debian `suite` with
/// `postgresql-<version>`, imported as `image`.
#[derive(Clone, Debug)]
pub struct PgTestImage {
    pub version: u32,
    pub suite: &'static str,
    pub image: String,
}

impl PgTestImage {
    /// PostgreSQL 17 from Debian stable, named by `RELAY_TEST_PG_IMAGE` (default
    /// [`super::DEFAULT_PG17_IMAGE`]), as `.ci/build-pg17-image.sh` builds it.
    pub fn pg17() -> PgTestImage {
        PgTestImage {
            version: 17,
            suite: "stable",
            image: std::env::var("RELAY_TEST_PG_IMAGE").unwrap_or_else(|_| super::DEFAULT_PG17_IMAGE.into()),
        }
    }

    /// PostgreSQL 18 from Debian testing (which carries `postgresql-18`), named by
    /// `RELAY_TEST_PG18_IMAGE` (default [`super::DEFAULT_PG18_IMAGE`]), built the same way.
    pub fn pg18() -> PgTestImage {
        PgTestImage {
            version: 18,
            suite: "testing",
            image: std::env::var("RELAY_TEST_PG18_IMAGE").unwrap_or_else(|_| super::DEFAULT_PG18_IMAGE.into()),
        }
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci").join(name)
}

/// A line on the terminal even while the harness captures the test's output.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "set-up: {line}");
}

/// Run `command` (a `.ci/` script) for the step `what`; its stdout on success, else an error
/// with its stderr (which says what to install or run).
fn run_step(what: &str, command: &mut Command) -> Result<String, String> {
    say(&format!("{what} (once; later runs reuse it) ..."));
    let started = Instant::now();
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run {command:?}: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("{what} failed ({}):\n{}", out.status, stderr.trim_end()));
    }
    for line in stderr.lines() {
        say(&format!("  {line}"));
    }
    say(&format!("{what}: done in {:.1}s", started.elapsed().as_secs_f64()));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Make sure `spec`'s image exists: build it (`.ci/build-pg-image.sh`) when it is missing.
pub fn ensure_pg_image(spec: &PgTestImage) -> Result<(), String> {
    let _one = IMAGE_SETUP.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let present = Command::new("docker")
        .args(["image", "inspect", &spec.image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| {
            format!(
                "cannot run `docker` ({e}) for the PostgreSQL {} tests: install Docker (Debian/Ubuntu: \
                 `apt-get install docker.io`) and start its daemon",
                spec.version
            )
        })?;
    if present.success() {
        return Ok(());
    }
    run_step(
        &format!(
            "building the PostgreSQL {} test image {} (debootstrap Debian {} + docker import, a few minutes)",
            spec.version, spec.image, spec.suite
        ),
        Command::new("bash")
            .arg(script("build-pg-image.sh"))
            .arg(spec.version.to_string())
            .arg(spec.suite)
            .arg(&spec.image),
    )
    .map(|_| ())
}

/// The virtual environment with the pinned Synapse and mautrix (`.ci/synapse-venv.sh`,
/// `$RELAY_TEST_SYNAPSE_VENV` or its default place), made or completed when it is not ready.
pub fn ensure_synapse_venv() -> Result<PathBuf, String> {
    let _one = VENV_SETUP.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let venv_script = script("synapse-venv.sh");
    let check = Command::new("bash")
        .arg(&venv_script)
        .arg("--check")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", venv_script.display()))?;
    if check.status.success() {
        return Ok(PathBuf::from(String::from_utf8_lossy(&check.stdout).trim()));
    }
    run_step(
        "creating or completing the Synapse + mautrix virtualenv (.ci/synapse-venv.sh; about 3.5 min when new)",
        Command::new("bash").arg(&venv_script),
    )
    .map(PathBuf::from)
}
