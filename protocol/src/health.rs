//! `GET /api/health` of the control plane and of a runner.

use serde::{Deserialize, Serialize};

/// Overall health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Serving normally.
    Ok,
    /// Serving, but a dependency (e.g. the database) is unreachable.
    Degraded,
}

/// Answer of the control plane's `GET /api/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlPlaneHealth {
    /// Overall status.
    pub status: HealthStatus,
    /// Control plane version.
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Whether the database answered.
    pub database: bool,
}

/// Answer of a runner's `GET /api/health` without the runner's bearer key:
/// whether it is alive, nothing else (no name, version, box counts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerLiveness {
    /// Overall status (`degraded` comes with HTTP 503).
    pub status: HealthStatus,
}

/// Answer of a runner's `GET /api/health` to the holder of its bearer key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerHealth {
    /// Overall status.
    pub status: HealthStatus,
    /// Runner name.
    pub name: String,
    /// `boxlite-runner` version.
    pub version: String,
    /// Seconds since this agent process started.
    pub uptime_secs: u64,
    /// Boxes currently running.
    pub boxes_running: u32,
    /// Boxes found running at start and re-adopted by this agent process.
    pub boxes_adopted: u32,
}
