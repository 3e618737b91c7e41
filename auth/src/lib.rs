//! SkyGate credentials: password hashing and policy, JWT access tokens, opaque rotating refresh
//! tokens, and roles.
//!
//! This crate is pure logic: it speaks neither HTTP nor SQL. The control plane owns storage and
//! transport and calls in here for every decision that touches a secret, so that the security
//! rules live in one place with their tests.

pub mod api_token;
pub mod error;
pub mod password;
pub mod refresh;
pub mod role;
pub mod token;

pub use error::AuthError;
pub use role::Role;
