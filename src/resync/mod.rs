//! Resync: takes in keys to record and resync requests (`backfill`, a first opt-in, a lost
//! slot); gives out the relay's durable state in Synapse's database and pages of current values.
//!
//! - [`store`]: the relay's schema in Synapse's database (recorded keys, appservices served,
//!   backfill requests and their cursors) and the messages it writes into the stream;
//! - [`backfill`]: resync requests, and the keyset-paged reads of Synapse's tables that serve
//!   them (delivered by `crate::delivery::worker`).

pub mod backfill;
pub mod store;
