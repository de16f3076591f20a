//! The operational edge: takes in the running relay's state (health, the appservices' handles,
//! the slot) and SIGHUP; gives out logs, metrics, the HTTP endpoint, systemd notices and reloads.
//!
//! Logging, health and readiness, metrics, the HTTP endpoint, systemd's notify protocol, and
//! configuration reloads.

pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod systemd;
