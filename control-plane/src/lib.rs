//! BoxLite control plane: the API operators, users and runners talk to.
//!
//! Organizations own boxes and API keys; users sign in with OIDC. Runners
//! register with a token (stored as a hash), check in with healthchecks and
//! get back the actions that converge them on the desired state. Boxes are
//! placed on a ready runner with room and pinned there; exec is proxied to
//! that runner. PostgreSQL in production, SQLite on the local target, one
//! code path for both.

#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod boxes;
pub mod clock;
pub mod config;
pub mod db;
pub mod error;
pub mod exec_proxy;
pub mod exec_slots;
pub mod imports;
pub mod migrate;
pub mod oidc;
pub mod openapi;
pub mod orgs;
pub mod runners;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod tokens;

pub use clock::Clock;
pub use config::Config;
pub use server::Server;
