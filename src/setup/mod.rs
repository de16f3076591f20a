//! What `setup`, `check`, `teardown` and `run` know of Synapse's database. Takes in a connection
//! and the relay's names; gives out the state found, what is wrong with it, and the SQL to fix it.

pub mod plan;
pub mod privileges;
