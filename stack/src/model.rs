//! The validated stack: every stage with its defaults applied and every value checked.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a stage runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The whole platform on this machine, as supervised processes.
    Local,
    /// AWS, with Cloudflare DNS.
    Aws,
}

impl Target {
    /// The name used in stack.toml.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Local => "local",
            Target::Aws => "aws",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated stack.toml.
#[derive(Clone, Debug, Serialize)]
pub struct Stack {
    /// Stack name: part of every resource's identity.
    pub name: String,
    /// Stages by name.
    pub stages: BTreeMap<String, Stage>,
}

/// One stage with defaults applied.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    /// Stage name.
    pub name: String,
    /// Where it runs.
    pub target: Target,
    /// AWS region (aws stages).
    pub region: Option<String>,
    /// Public domain (aws stages).
    pub domain: Option<String>,
    /// Production stages retain data on destroy and protect the database.
    pub production: bool,
    /// Number of runners.
    pub runners: u32,
    /// Runner host settings.
    pub runner: RunnerSettings,
    /// Database settings (aws).
    pub database: DatabaseSettings,
    /// Control plane service settings.
    pub control_plane: ControlPlaneSettings,
    /// Network settings (aws).
    pub network: NetworkSettings,
    /// OIDC login, when configured.
    pub oidc: Option<OidcSettings>,
    /// Public DNS, when configured.
    pub dns: Option<DnsSettings>,
    /// Local target settings.
    pub local: LocalSettings,
    /// Extra services, in declaration order.
    pub services: Vec<Service>,
}

/// How each runner host is built.
#[derive(Clone, Debug, Serialize)]
pub struct RunnerSettings {
    /// EC2 instance type.
    pub instance_type: String,
    /// AMI name pattern.
    pub ami_name: String,
    /// AMI owner.
    pub ami_owner: String,
    /// Root volume size, GiB.
    pub root_volume_gb: u32,
    /// `boxlite-runner` version.
    pub version: String,
    /// Where new runners download the runner artifact; `None` means the stage bucket (aws).
    pub artifact_url: Option<String>,
    /// Pinned SHA-256 of the artifact, lowercase hex.
    pub artifact_sha256: Option<String>,
}

/// RDS PostgreSQL settings.
#[derive(Clone, Debug, Serialize)]
pub struct DatabaseSettings {
    /// PostgreSQL major version.
    pub engine_version: String,
    /// Instance class.
    pub instance_class: String,
    /// Storage, GiB.
    pub storage_gb: u32,
    /// Multi-AZ standby.
    pub multi_az: bool,
    /// Days of automated backups.
    pub backup_retention_days: u32,
}

/// Control plane services (API, proxy, SSH gateway).
#[derive(Clone, Debug, Serialize)]
pub struct ControlPlaneSettings {
    /// Container image (aws).
    pub image: Option<String>,
    /// Fargate CPU units.
    pub cpu: u32,
    /// Fargate memory, MiB.
    pub memory_mb: u32,
    /// Tasks per service.
    pub replicas: u32,
}

/// VPC settings.
#[derive(Clone, Debug, Serialize)]
pub struct NetworkSettings {
    /// VPC CIDR.
    pub vpc_cidr: String,
}

/// OIDC issuer and audience.
#[derive(Clone, Debug, Serialize)]
pub struct OidcSettings {
    /// Issuer URL.
    pub issuer: String,
    /// Audience.
    pub audience: String,
}

/// DNS provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsProvider {
    /// Cloudflare.
    Cloudflare,
}

/// Public DNS settings.
#[derive(Clone, Debug, Serialize)]
pub struct DnsSettings {
    /// Provider.
    pub provider: DnsProvider,
    /// Zone holding the domain.
    pub zone: String,
}

/// Local target settings.
#[derive(Clone, Debug, Serialize)]
pub struct LocalSettings {
    /// Control plane port on 127.0.0.1.
    pub api_port: u16,
    /// Runner N listens on base + N.
    pub runner_port_base: u16,
    /// Where the platform binaries are, relative to stack.toml; `None` means next to boxctl.
    pub bin_dir: Option<String>,
}

/// An extra service.
#[derive(Clone, Debug, Serialize)]
pub struct Service {
    /// Name (DNS label).
    pub name: String,
    /// Container image (aws).
    pub image: Option<String>,
    /// Program and arguments (local).
    pub command: Vec<String>,
    /// Listening port.
    pub port: u16,
    /// Reachable from the internet.
    pub public: bool,
    /// Health check path.
    pub health_path: Option<String>,
    /// Fargate CPU units.
    pub cpu: u32,
    /// Fargate memory, MiB.
    pub memory_mb: u32,
    /// Task count.
    pub replicas: u32,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Environment variable → stage secret name, required.
    pub secrets: BTreeMap<String, String>,
    /// Environment variable → stage secret name, passed only when set.
    pub optional_secrets: BTreeMap<String, String>,
}

/// Built-in defaults, applied under `[defaults]`.
pub mod defaults {
    /// Default runner instance type.
    pub const INSTANCE_TYPE: &str = "c7i.xlarge";
    /// Ubuntu 24.04 LTS (noble) amd64 server images.
    pub const AMI_NAME: &str = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*";
    /// Canonical's AWS account.
    pub const AMI_OWNER: &str = "099720109477";
    /// Runner root volume, GiB.
    pub const ROOT_VOLUME_GB: u32 = 100;
    /// Runners per stage.
    pub const RUNNERS: u32 = 1;
    /// Most runners a stage may declare.
    pub const MAX_RUNNERS: u32 = 100;
    /// PostgreSQL major version.
    pub const DB_ENGINE_VERSION: &str = "16";
    /// RDS instance class.
    pub const DB_INSTANCE_CLASS: &str = "db.t4g.small";
    /// RDS storage, GiB.
    pub const DB_STORAGE_GB: u32 = 20;
    /// Backup retention, days.
    pub const DB_BACKUP_RETENTION_DAYS: u32 = 7;
    /// Fargate CPU units for the control plane.
    pub const CP_CPU: u32 = 512;
    /// Fargate memory for the control plane, MiB.
    pub const CP_MEMORY_MB: u32 = 1024;
    /// Control plane tasks per service.
    pub const CP_REPLICAS: u32 = 2;
    /// VPC CIDR.
    pub const VPC_CIDR: &str = "10.42.0.0/16";
    /// Local control plane port.
    pub const API_PORT: u16 = 7070;
    /// Local runner port base.
    pub const RUNNER_PORT_BASE: u16 = 7100;
    /// Service CPU units.
    pub const SERVICE_CPU: u32 = 256;
    /// Service memory, MiB.
    pub const SERVICE_MEMORY_MB: u32 = 512;
    /// The runner version boxctl ships with.
    pub const RUNNER_VERSION: &str = env!("CARGO_PKG_VERSION");
}
