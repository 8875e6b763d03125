//! Boxes: what users create, what the control plane places, what runners run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::net::{Ipv4Cidr, NetworkMode};

/// Lifecycle state of a box.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxState {
    /// Placed on a runner, not yet created there.
    Pending,
    /// Its root filesystem exists; not running.
    Stopped,
    /// Running.
    Running,
    /// Being moved to another runner.
    Migrating,
    /// Removal asked for; the runner has not confirmed yet.
    Deleting,
    /// Gone.
    Deleted,
    /// The runner could not create or start it; see `error`.
    Error,
}

/// Resources a box may use, or a runner has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU, thousandths of a core.
    pub cpu_millicores: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, MiB.
    pub disk_mib: u64,
}

/// Everything a runner needs to create a box.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxSpec {
    /// Box id; stays the same across migration.
    pub id: Uuid,
    /// Image name in the runner's image store (`default` is always present).
    pub image: String,
    /// Limits.
    pub resources: Resources,
    /// Environment of every process in the box.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Network mode (`none` by default: a loopback interface only).
    #[serde(default)]
    pub network: NetworkMode,
    /// Destinations the box may reach although the runner's deny list
    /// covers them (egress only; each within the stage's allow-list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<Ipv4Cidr>,
}

/// `POST /api/boxes` body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateBoxRequest {
    /// Image; `default` when absent.
    #[serde(default)]
    pub image: Option<String>,
    /// CPU, millicores; a default applies when absent.
    #[serde(default)]
    pub cpu_millicores: Option<u64>,
    /// Memory, MiB; a default applies when absent.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Disk, MiB; a default applies when absent.
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Labels for filtering.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Network mode: `"none"` (default) or `"egress"`; `true`/`false` are
    /// read as `egress`/`none`.
    #[serde(default)]
    pub network: NetworkMode,
    /// Private destinations (CIDR blocks) an `egress` box may reach, each
    /// within the stage's allow-list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<Ipv4Cidr>,
}

/// A box as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxInfo {
    /// Box id.
    pub id: Uuid,
    /// Owning organization.
    pub organization_id: Uuid,
    /// Runner it is pinned to.
    pub runner: Option<String>,
    /// Image.
    pub image: String,
    /// Current state as last reported.
    pub state: BoxState,
    /// State the control plane is driving it to.
    pub desired_state: BoxState,
    /// Limits.
    pub resources: Resources,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Network mode.
    pub network: NetworkMode,
    /// Private destinations the box may reach (egress).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<Ipv4Cidr>,
    /// Last error reported by the runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// `GET /api/boxes` answer: one page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxPage {
    /// Boxes on this page, oldest first.
    pub boxes: Vec<BoxInfo>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `POST /api/admin/boxes/{id}/move` body (admin): re-pin a box to another
/// runner, copying its files (export from the current runner, import into the
/// target) and keeping its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveBoxRequest {
    /// Name of the target runner (ready, not draining, with room).
    pub runner: String,
}
