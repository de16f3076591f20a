//! The PostgreSQL streaming-replication protocol, as used for logical decoding with pgoutput.
//!
//! - [`wire`]: the CopyData payloads exchanged once `START_REPLICATION` has begun (XLogData,
//!   primary keepalive, standby status update) and PostgreSQL-epoch time conversions.
//! - [`pgoutput`]: the messages of the `pgoutput` output plugin (protocol version 1) carried in
//!   XLogData: Begin/Commit, Relation, Insert/Update/Delete, ….
//!
//! Both are pure (bytes in, typed values out; no I/O, no clock reads) and never panic on any
//! input: malformed bytes are typed errors.

pub mod pgoutput;
pub mod wire;
