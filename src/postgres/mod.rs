//! PostgreSQL as every part reaches it. Takes in libpq's connection settings (with its
//! environment fallbacks); gives out the server to use among the hosts, TLS and SQL connections.
//!
//! - [`config`]: libpq's connection settings (`sslmode`, `sslrootcert`, `require_auth`,
//!   `channel_binding`, …);
//! - [`hosts`] (pure): libpq's multi-host lists, `target_session_attrs` and the order hosts are
//!   tried in;
//! - [`socket`]: libpq's TCP keepalive settings on a connection's socket;
//! - [`tls`]: TLS as libpq does it;
//! - [`sql`]: ordinary SQL connections on the relay's own socket.
//!
//! The replication connection is [`crate::replication::connection`], on the same settings.

pub mod config;
pub mod hosts;
pub mod socket;
pub mod sql;
pub mod tls;
