//! Replication: takes in the bytes of a replication connection to PostgreSQL (settings from
//! `crate::postgres`); gives out typed messages: pgoutput's changes in XLogData, keepalives.
//!
//! The PostgreSQL streaming-replication protocol, as used for logical decoding with pgoutput.
//!
//! - [`wire`]: the CopyData payloads exchanged once `START_REPLICATION` has begun (XLogData,
//!   primary keepalive, standby status update) and PostgreSQL-epoch time conversions.
//! - [`pgoutput`]: the messages of the `pgoutput` output plugin (protocol version 1) carried in
//!   XLogData: Begin/Commit, Relation, Insert/Update/Delete, ….
//!
//! Both are pure (bytes in, typed values out; no I/O, no clock reads) and never panic on any
//! input: malformed bytes are typed errors.
//!
//! - [`connection`]: the one I/O part: our own replication connection (TCP or Unix socket, TLS,
//!   authentication, simple queries, `START_REPLICATION` and the CopyBoth stream), with typed
//!   errors carrying the SQLSTATE ([`error`]).

pub mod connection;
pub mod error;
pub mod pgoutput;
pub mod wire;
