//! Delivery: per-appservice queues with coalescing ([`queue`]), transaction bodies and ids
//! ([`transaction`]), what an answer means and how long to wait ([`retry`]) — all pure — and the
//! I/O shell: the per-appservice worker that sends over HTTP ([`worker`]).

pub mod queue;
pub mod retry;
pub mod state;
pub mod transaction;
pub mod worker;
