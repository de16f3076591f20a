//! Delivery: takes in the account-data changes routed to each appservice; gives out MSC3682
//! transactions PUT to it, and the oldest commit each appservice has not accepted yet.
//!
//! Per-appservice queues with coalescing ([`queue`]) and modes ([`state`]), transaction bodies and
//! ids ([`transaction`]), what an answer means and how long to wait ([`retry`]) — all pure — and
//! the I/O shell: the per-appservice worker that sends over HTTP ([`worker`]), reading answers
//! with a bound ([`response_body`]). Each appservice's [`handle`] is what the replication task,
//! its worker and `crate::ops` share, with its [`metrics`]; the workers share one SQL connection
//! ([`synapse_db`]).

pub mod handle;
pub mod metrics;
pub mod queue;
pub mod response_body;
pub mod retry;
pub mod state;
pub mod synapse_db;
pub mod transaction;
pub mod worker;
