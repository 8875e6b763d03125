//! Runners: registration, the healthcheck loop, and the admin view.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::boxes::{BoxSpec, BoxState, Resources};

/// Lifecycle state of a runner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunnerState {
    /// Registered, no healthcheck yet.
    Initializing,
    /// Checking in and schedulable.
    Ready,
    /// Checking in; gets no new boxes.
    Draining,
    /// No healthcheck within the configured window.
    Unresponsive,
    /// Retired; its token no longer works.
    Decommissioned,
}

/// `POST /api/admin/runners` body (admin).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRunnerRequest {
    /// Unique runner name (`runner-1`).
    pub name: String,
    /// SHA-256 (hex) of a token minted by the caller; when absent the control
    /// plane mints one and returns it once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
}

/// `POST /api/admin/runners` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRunnerResponse {
    /// The runner.
    pub runner: RunnerInfo,
    /// The minted token, shown this once (absent when the caller sent its hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// One box as a runner reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxReport {
    /// Box id.
    pub id: Uuid,
    /// Its state on the runner.
    pub state: BoxState,
    /// What it uses now, from its cgroup.
    #[serde(default)]
    pub usage: Resources,
    /// Last error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /api/runners/healthcheck` body (runner token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthcheckRequest {
    /// `boxlite-runner` version.
    pub version: String,
    /// Base URL where the control plane reaches this runner's API.
    pub address: String,
    /// What the runner can give to boxes in total.
    pub capacity: Resources,
    /// What its boxes use now (sum of their cgroups, not the host's totals).
    pub usage: Resources,
    /// SHA-256 (hex) of the running `boxlite-runner` binary, which tells two
    /// builds of one version apart (`boxctl runner upgrade` confirms by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_sha256: Option<String>,
    /// Random id of this agent process (1-64 of `[A-Za-z0-9_-]`), new at
    /// every start and re-exec. When it differs from the last one seen, the
    /// control plane issues a new `api_key`: a key captured before (e.g. by
    /// squatting the runner's port while the agent restarted) is useless once
    /// the real agent checks in. Absent from older runners (no rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_instance: Option<String>,
    /// Every box the runner has, whatever its state.
    pub boxes: Vec<BoxReport>,
}

/// What the control plane wants a runner to do with one box.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RunnerAction {
    /// Create (and start) a box the runner does not have.
    Create {
        /// The box.
        spec: BoxSpec,
    },
    /// Start a stopped box.
    Start {
        /// Box id.
        id: Uuid,
    },
    /// Stop a running box.
    Stop {
        /// Box id.
        id: Uuid,
    },
    /// Delete a box and its files.
    Delete {
        /// Box id.
        id: Uuid,
    },
}

/// An import of a box archive the control plane announced to a runner (for a
/// move, or a restore from a backup). The import request presents the token
/// in [`crate::IMPORT_TOKEN_HEADER`]; the runner accepts it once, for this box,
/// until `expires_at`, and only when its SHA-256 is the one announced here —
/// over the runner's own authenticated call to the control plane, which the
/// holder of the runner's bearer key cannot forge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportGrant {
    /// The box the archive must hold.
    pub box_id: Uuid,
    /// SHA-256 (hex) of the one-time token.
    pub token_sha256: String,
    /// When the token stops being accepted.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// `POST /api/runners/healthcheck` answer: level-triggered, so a runner that
/// missed calls converges on the next one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthcheckResponse {
    /// The runner's state as the control plane sees it.
    pub state: RunnerState,
    /// Actions to apply now.
    pub actions: Vec<RunnerAction>,
    /// Bearer key the control plane presents when it calls this runner's API;
    /// replaced whenever a new agent process checks in (`agent_instance`).
    pub api_key: String,
    /// Seconds until the next healthcheck is expected.
    pub interval_secs: u64,
    /// Imports announced to this runner and not yet expired or withdrawn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imports: Vec<ImportGrant>,
}

/// A runner as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerInfo {
    /// Runner id.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// State.
    pub state: RunnerState,
    /// Reported version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Reported address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Reported SHA-256 of its binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_sha256: Option<String>,
    /// Reported capacity.
    pub capacity: Resources,
    /// Reported usage.
    pub usage: Resources,
    /// Sum of the limits of the boxes pinned to it: what placement counts against capacity.
    #[serde(default)]
    pub allocated: Resources,
    /// Marked draining by an operator (kept while it is unresponsive too).
    #[serde(default)]
    pub draining: bool,
    /// Boxes pinned to it (not deleted).
    pub boxes: u32,
    /// Last healthcheck.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_seen_at: Option<OffsetDateTime>,
}
