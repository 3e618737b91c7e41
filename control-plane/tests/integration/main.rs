//! Black-box tests of the control plane over real HTTP on 127.0.0.1, each run against both
//! stores (SQLite and PostgreSQL). One binary, one file per resource.

// Test code: a panic is how an assertion fails, harness helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod abuse;
mod audit;
mod catalog;
mod cli;
mod client;
mod faults;
mod fleet;
mod gateway;
mod machines;
mod pagination;
mod provisioning;
mod sessions;
mod skygate_cli;
mod store;
mod tokens;
mod users;
