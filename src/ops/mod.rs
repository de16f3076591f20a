//! The operational edge: logging, health and readiness, metrics, the HTTP endpoint, systemd's
//! notify protocol, and configuration reloads.

pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod systemd;
