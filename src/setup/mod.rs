//! What `setup`, `check`, `teardown` and `run` know of Synapse's database. Takes in a connection
//! and the relay's names; gives out the state found, what is wrong with it, and the SQL to fix it.
//!
//! - [`state`]: the database as found (the server's settings, the role, the three published
//!   tables and their replica identity, the publications, the slot, the relay's schema);
//! - [`inspect`]: reading it (I/O, read-only), and the roles `setup --grant-to` and `run` use;
//! - [`checks`] (pure): what is wrong, for `check`, `setup` and `run`;
//! - [`plan`] (pure): the SQL `setup` and `teardown` run, also shipped in `sql/`;
//! - [`privileges`] (pure): the grants of `setup --grant-to` and what `check` says of `run`'s role;
//! - [`execute`]: running a plan, a transaction per group, retrying steps whose locks wait.

pub mod checks;
pub mod execute;
pub mod inspect;
pub mod plan;
pub mod privileges;
pub mod state;
