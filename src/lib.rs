//! synapse-account-data-relay: pushes Synapse account-data changes to Matrix application services
//! (MSC3682), read from a PostgreSQL logical replication slot.
//!
//! The crate is a pipeline; see `ARCHITECTURE.md` for the whole picture and the checkpoint invariant.
//! Each stage is a folder (or one file); [`model`], [`config`] and [`redact`] serve them all.
//!
//! - [`postgres`]: how every part reaches PostgreSQL: libpq's connection settings and host lists,
//!   TLS, ordinary SQL connections.
//! - [`replication`]: the replication wire protocol and the pgoutput decoder (bytes in, typed messages out),
//!   and the one file that owns the socket.
//! - [`synapse`]: Synapse's configuration and registration files, and rows of Synapse's tables turned into
//!   account-data changes.
//! - [`routing`]: user id → interested appservices, with Synapse's regex semantics.
//! - [`delivery`]: per-appservice queues, coalescing, transaction ids and bodies, HTTP and retries.
//! - [`resync`], beside delivery: the relay's state store in Synapse's database, resync and backfill
//!   requests.
//! - [`checkpoint`]: which LSN is safe to confirm to PostgreSQL.
//! - [`pipeline`]: the replication task that wires the stages together, and the supervisor of its tasks.
//! - [`setup`] and [`failover`]: what `setup`/`check`/`teardown` know of the database; surviving a failover.
//! - [`ops`] and [`cmd`]: the edge: CLI subcommands, logging, metrics, the HTTP endpoint.
//! - [`testkit`]: throw-away PostgreSQL clusters and a recording appservice, for `demo` and the tests.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod cmd;
pub mod config;
pub mod delivery;
pub mod failover;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod postgres;
pub mod redact;
pub mod replication;
pub mod resync;
pub mod routing;
pub mod setup;
pub mod synapse;
pub mod testkit;
