//! The PostgreSQL streaming-replication protocol, as used for logical decoding with pgoutput.

pub mod connection;
pub mod error;
