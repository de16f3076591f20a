//! Synapse: its configuration and registration files ([`files`]), and rows of its tables turned
//! into account-data changes ([`rows`], pure).

pub mod client_api;
pub mod current;
pub mod files;
pub mod rows;
