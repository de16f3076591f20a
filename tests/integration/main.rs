//! The integration suite: one binary, real PostgreSQL (15 from this machine, 17 in a container),
//! real HTTP receivers, the relay binary itself. Each test runs on both servers, except those
//! that need a server configured for them (authentication methods, TLS, tiny WAL), which run on
//! local clusters of their own.
mod support;

mod delivery_limits;
mod delivery_tls;
mod end_to_end;
mod failover;
mod mautrix_python;
mod operations;
mod provisioning;
mod real_synapse;
mod recovery;
mod replication_connection;
mod retention;
