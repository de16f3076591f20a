//! The integration suite: one binary, real PostgreSQL (15 from this machine, 17 in a container),
//! real HTTP receivers, the relay binary itself. Each test runs on both servers.
mod support;

mod end_to_end;
mod provisioning;
