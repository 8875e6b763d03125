//! `boxlite-runner`: the agent that runs isolated boxes on a runner host.
//!
//! Map of the crate:
//! - [`config`]: `runner.toml` and the state directory layout;
//! - [`images`], [`layers`]: the image store (busybox default image, OCI
//!   layout import) and safe application of tar layers;
//! - [`cgroups`]: memory/CPU/pids limits on cgroup v1 and v2 (systemd scopes);
//! - [`seccomp`], [`init_elf`], [`sandbox`]: bubblewrap, the seccomp policy,
//!   the box's PID 1, entering a running box;
//! - [`shim`], [`ipc`]: the per-box process that owns a box and its exec
//!   sessions and outlives the agent, and the protocol to talk to it;
//! - [`disk`]: every box's writable layer on a filesystem of its own, sized by its quota;
//! - [`ids`]: every box's own host uid/gid range, claimed host-wide, and idmapped images;
//! - [`network`]: every box's network namespace, egress through NAT with a deny list, the one way in;
//! - [`boxes`]: lifecycle, persistence and re-adoption;
//! - [`exec`]: one-shot exec and the exec WebSocket;
//! - [`export`], [`imports`]: box archives (export/import with SHA-256), and
//!   the one-time tokens without which nothing is imported;
//! - [`api`], [`admin`], [`health`]: the HTTP API for the control plane, the
//!   local admin socket, and the healthcheck loop;
//! - [`upgrade`]: releases, self-upgrade with verification and rollback;
//! - [`agent`]: start-up and the main loop.

#![warn(missing_docs)]

pub mod admin;
pub mod agent;
pub mod api;
pub mod boxes;
pub mod cgroups;
pub mod config;
pub mod disk;
pub mod exec;
pub mod export;
pub mod health;
pub mod ids;
pub mod images;
pub mod imports;
pub mod init_elf;
pub mod ipc;
pub mod layers;
pub mod network;
pub mod sandbox;
pub mod seccomp;
pub mod shim;
pub mod sys;
pub mod upgrade;

/// Version of this binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// File name of the binary inside a release directory.
pub const BINARY_NAME: &str = "boxlite-runner";
