//! Failover: takes in what the servers among the relay's hosts say (system identifier, timeline,
//! settings, slots); gives out which history to trust and whether a promotion keeps the slot.
//!
//! Surviving a PostgreSQL failover.
//!
//! - [`timeline`] (pure): which server a replication connection reached compared with the last
//!   one (a promotion, a former primary, another cluster), so the relay never confirms a
//!   position from another timeline's history;
//! - [`slots`] (pure): what a PostgreSQL 17+ failover slot needs on the primary and the
//!   standbys (with the statements that set it), and whether a promotion *now* keeps the slot;
//! - [`inspect`]: reading those facts (the standbys are the other hosts of the relay's own
//!   connection settings), and the running relay's periodic look ([`inspect::watch`]), which
//!   sets the failover [`metrics`].
//!
//! Connecting to the right server after a failover is `crate::postgres::hosts` (libpq's multi-host
//! settings and `target_session_attrs`).

pub mod inspect;
pub mod metrics;
pub mod slots;
pub mod timeline;
