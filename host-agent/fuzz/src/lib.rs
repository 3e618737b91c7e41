//! The host agent's two pure renderers, compiled from their own source files for the fuzz
//! targets: `domain_xml` (host-agent/src/domain_xml/mod.rs), `seed` (host-agent/src/seed.rs),
//! the agent's domain types both use (`model`, host-agent/src/model.rs, a leaf) and the key-line
//! rule `seed` applies (proto/src/ssh_key.rs, reached as `proto::ssh_key`).
//!
//! Why not depend on the `host-agent` crate: its library pulls in the whole agent (tonic,
//! reqwest, rustls, ring, libvirt's `virt`, the `proto` build with protox), about 210 crates
//! that cargo-fuzz builds with sanitizer instrumentation in release mode. Measured here: 10 min
//! 49 s cold on 2 busy cores, against the seconds it takes to build these files and their few
//! dependencies. The alternatives rejected: a `fuzzing` feature in host-agent cannot drop those
//! dependencies (every other module uses them); moving the two modules into a crate of their
//! own would be the cleanest, but is a refactor of the agent for the sake of its tests.
//!
//! The price: these files must keep compiling outside their crate (no `crate::` paths but
//! `crate::model`, which is compiled here too; their dependencies listed in this Cargo.toml). scripts/fuzz.sh, run by scripts/test.sh, builds
//! this crate, so a change that breaks that fails CI at once.

// seed.rs calls `proto::ssh_key::check_key_line`: this crate stands in for `proto`.
extern crate self as proto;

#[path = "../../../proto/src/ssh_key.rs"]
pub mod ssh_key;

#[path = "../../src/model.rs"]
pub mod model;

#[path = "../../src/domain_xml/mod.rs"]
pub mod domain_xml;

#[path = "../../src/seed.rs"]
pub mod seed;
