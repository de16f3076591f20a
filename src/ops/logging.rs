//! Log output: human-readable lines by default, JSON lines (`--log-format json`) for journald or
//! Loki; the level comes from a `RUST_LOG`-style filter (default `info`). Logs go to stderr,
//! coloured only when stderr is a terminal (never into journald or a file).

use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Install the global subscriber. `filter` is a `RUST_LOG`-style directive (e.g. `info`,
/// `synapse_account_data_relay=debug`); an invalid one falls back to `info` with a warning.
pub fn init(format: LogFormat, filter: Option<&str>) {
    let directive = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let (env_filter, bad) = match EnvFilter::try_new(&directive) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new("info"),
            Some(format!("invalid log filter {directive:?} ({e}); using \"info\"")),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
    if let Some(msg) = bad {
        tracing::warn!("{msg}");
    }
}
