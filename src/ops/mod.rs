//! The operational edge: logging setup (and, later, metrics, health and systemd).

pub mod health;
pub mod logging;
