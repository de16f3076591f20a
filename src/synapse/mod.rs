//! Synapse: takes in its configuration and registration files and the decoded rows of its tables;
//! gives out its settings, the appservices' registrations, account-data changes and current values.
//!
//! Its configuration and registration files ([`files`]), rows of its tables turned into
//! account-data changes ([`rows`], pure), current values read from its tables ([`current`]), and
//! push rules read from its client API ([`client_api`]).

pub mod client_api;
pub mod current;
pub mod files;
pub mod rows;
