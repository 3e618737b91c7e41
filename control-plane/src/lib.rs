//! SkyGate control plane: the REST API (`api`), use-cases (`app`), pure domain rules
//! (`model`) and the database (`store`). `main.rs` is a thin command-line shell around it.

pub mod agents;
pub mod api;
pub mod app;
pub mod config;
pub mod error;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod reconciler;
pub mod server;
pub mod store;
pub mod timing;
pub mod worker;

pub use error::{Error, Result};
