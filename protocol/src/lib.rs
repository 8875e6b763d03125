//! Wire types shared by the control plane, the runner and boxctl.
//!
//! Everything here is plain data with serde derives: JSON over HTTP and
//! WebSocket. Field names are the API's field names; changing one is an API
//! change for every part at once, which is why they live in one crate.

pub mod boxes;
pub mod error;
pub mod exec;
pub mod health;
pub mod net;
pub mod orgs;
pub mod runners;
pub mod ws;

pub use boxes::*;
pub use error::ApiError;
pub use exec::*;
pub use health::*;
pub use net::{Ipv4Cidr, NetworkMode};
pub use orgs::*;
pub use runners::*;

/// Prefix of user API keys, so they are recognisable in logs and by leak scanners.
pub const API_KEY_PREFIX: &str = "bxk_";
/// Prefix of runner tokens.
pub const RUNNER_TOKEN_PREFIX: &str = "bxr_";
/// Prefix of the per-runner keys the control plane presents when it calls a runner's API.
pub const RUNNER_API_KEY_PREFIX: &str = "bxc_";
/// Response header carrying the SHA-256 (hex) of a box archive (export and import).
pub const ARCHIVE_SHA256_HEADER: &str = "x-boxlite-sha256";
/// Request header of a box import carrying the one-time token the control
/// plane announced for it (see [`ImportGrant`]).
pub const IMPORT_TOKEN_HEADER: &str = "x-boxlite-import-token";
/// Prefix of one-time import tokens.
pub const IMPORT_TOKEN_PREFIX: &str = "bxi_";
