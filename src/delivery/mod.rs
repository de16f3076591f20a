//! Delivery: per-appservice queues with coalescing ([`queue`]), transaction bodies and ids
//! ([`transaction`]), what an answer means and how long to wait ([`retry`]) — all pure — and the
//! I/O shell: the per-appservice worker that sends over HTTP ([`worker`]), reading answers
//! with a bound ([`response_body`]).

pub mod handle;
pub mod metrics;
pub mod queue;
pub mod response_body;
pub mod retry;
pub mod state;
pub mod synapse_db;
pub mod transaction;
pub mod worker;
