//! Stage resolution: a validated stage becomes its desired resource graph.
//! This module dispatches by target; `aws` holds the aws target's graph.

pub mod aws;
pub mod net;

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use crate::diagnostic::closest;
use crate::graph::{DesiredGraph, GraphError, Resource, Value};
use crate::model::{Stack, Stage, Target};
use crate::template::{self, TemplateError};

/// Resource kinds the resolver produces, one per provider-specific shape.
pub mod kinds {
    /// A directory under the stage directory.
    pub const LOCAL_DIRECTORY: &str = "local.directory";
    /// A generated credential kept in a 0600 file; its value never appears in the graph.
    pub const LOCAL_SECRET: &str = "local.secret";
    /// A rendered file under the stage directory.
    pub const LOCAL_FILE: &str = "local.file";
    /// A supervised long-running process.
    pub const LOCAL_PROCESS: &str = "local.process";
    /// A runner registered with the control plane by the hash of its token.
    pub const LOCAL_RUNNER_REGISTRATION: &str = "local.runner-registration";

    /// A VPC.
    pub const AWS_VPC: &str = "aws.ec2.vpc";
    /// A subnet.
    pub const AWS_SUBNET: &str = "aws.ec2.subnet";
    /// An internet gateway attached to the VPC.
    pub const AWS_INTERNET_GATEWAY: &str = "aws.ec2.internet_gateway";
    /// An Elastic IP address.
    pub const AWS_EIP: &str = "aws.ec2.eip";
    /// A NAT gateway.
    pub const AWS_NAT_GATEWAY: &str = "aws.ec2.nat_gateway";
    /// A route table with its routes and subnet associations.
    pub const AWS_ROUTE_TABLE: &str = "aws.ec2.route_table";
    /// A security group with its ingress rules.
    pub const AWS_SECURITY_GROUP: &str = "aws.ec2.security_group";
    /// An EC2 instance (a runner host).
    pub const AWS_INSTANCE: &str = "aws.ec2.instance";
    /// An IAM role with its managed and inline policies.
    pub const AWS_IAM_ROLE: &str = "aws.iam.role";
    /// An IAM instance profile holding one role.
    pub const AWS_INSTANCE_PROFILE: &str = "aws.iam.instance_profile";
    /// An ECS cluster.
    pub const AWS_ECS_CLUSTER: &str = "aws.ecs.cluster";
    /// An ECS task definition family (its latest revision).
    pub const AWS_TASK_DEFINITION: &str = "aws.ecs.task_definition";
    /// An ECS service.
    pub const AWS_ECS_SERVICE: &str = "aws.ecs.service";
    /// A CloudWatch Logs log group.
    pub const AWS_LOG_GROUP: &str = "aws.logs.log_group";
    /// An application or network load balancer.
    pub const AWS_LOAD_BALANCER: &str = "aws.elb.load_balancer";
    /// A target group.
    pub const AWS_TARGET_GROUP: &str = "aws.elb.target_group";
    /// A load balancer listener.
    pub const AWS_LISTENER: &str = "aws.elb.listener";
    /// A host-header rule of a listener.
    pub const AWS_LISTENER_RULE: &str = "aws.elb.listener_rule";
    /// An ACM certificate validated by DNS.
    pub const AWS_CERTIFICATE: &str = "aws.acm.certificate";
    /// That a certificate is issued (waits for its DNS validation).
    pub const AWS_CERTIFICATE_VALIDATION: &str = "aws.acm.certificate_validation";
    /// An RDS DB subnet group.
    pub const AWS_DB_SUBNET_GROUP: &str = "aws.rds.subnet_group";
    /// An RDS PostgreSQL instance.
    pub const AWS_DB_INSTANCE: &str = "aws.rds.instance";
    /// An S3 bucket.
    pub const AWS_BUCKET: &str = "aws.s3.bucket";
    /// A plain SSM parameter (configuration).
    pub const AWS_PARAMETER: &str = "aws.ssm.parameter";
    /// A generated SSM `SecureString`; its value never appears in the graph.
    pub const AWS_SECRET: &str = "aws.ssm.secret";

    /// A DNS record in a Cloudflare zone, owned through its comment.
    pub const CLOUDFLARE_DNS_RECORD: &str = "cloudflare.dns_record";
}

/// Why a stage cannot be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The stage is not declared.
    #[error("stage {name:?} does not exist in stack {stack:?} (stages: {}){}", known.join(", "), suggestion.as_ref().map(|s| format!("; did you mean {s:?}?")).unwrap_or_default())]
    UnknownStage {
        /// Stack name.
        stack: String,
        /// The stage asked for.
        name: String,
        /// Declared stages.
        known: Vec<String>,
        /// The closest declared stage.
        suggestion: Option<String>,
    },
    /// The target is not available in this build.
    #[error("stage {stage:?} targets {target}, which this build of boxctl cannot deploy yet")]
    Unsupported {
        /// Stage.
        stage: String,
        /// Target.
        target: Target,
    },
    /// Required secrets are not set.
    #[error("stage {stage:?} needs secrets that are not set: {}; set each with `boxctl secret set NAME --stage {stage}`", missing.join(", "))]
    MissingSecrets {
        /// Stage.
        stage: String,
        /// Each missing secret, with the service and variable wanting it.
        missing: Vec<String>,
    },
    /// A template failed to render.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The graph is inconsistent (a bug in the resolver).
    #[error("internal error in the resource graph: {0}")]
    Graph(#[from] GraphError),
}

impl Stack {
    /// A stage by name, or an error that lists the declared ones.
    pub fn stage(&self, name: &str) -> Result<&Stage, ResolveError> {
        self.stages
            .get(name)
            .ok_or_else(|| ResolveError::UnknownStage {
                stack: self.name.clone(),
                name: name.to_string(),
                known: self.stages.keys().cloned().collect(),
                suggestion: closest(name, self.stages.keys().map(String::as_str))
                    .map(str::to_string),
            })
    }

    /// The desired resource graph of a stage, every declared secret referenced
    /// (for showing the graph; deploys use [`Stack::resolve_with_secrets`]).
    pub fn resolve(&self, stage: &str) -> Result<DesiredGraph, ResolveError> {
        let s = self.stage(stage)?;
        resolve_stage(&self.name, s)
    }

    /// The desired resource graph of a stage given the names of its secrets
    /// that are set: an unset optional secret is left out (its feature is
    /// off); an unset required one fails, naming it.
    pub fn resolve_with_secrets(
        &self,
        stage: &str,
        set: &BTreeSet<String>,
    ) -> Result<DesiredGraph, ResolveError> {
        let mut s = self.stage(stage)?.clone();
        let mut missing = Vec::new();
        for svc in &mut s.services {
            for (var, name) in &svc.secrets {
                if !set.contains(name) {
                    missing.push(format!("{name} (service {}, {var})", svc.name));
                }
            }
            svc.optional_secrets.retain(|_, name| set.contains(name));
        }
        if !missing.is_empty() {
            return Err(ResolveError::MissingSecrets {
                stage: s.name.clone(),
                missing,
            });
        }
        resolve_stage(&self.name, &s)
    }
}

fn resolve_stage(stack: &str, s: &Stage) -> Result<DesiredGraph, ResolveError> {
    let graph = match s.target {
        Target::Local => local(stack, s)?,
        Target::Aws => aws::resolve(stack, s)?,
    };
    graph.check()?;
    Ok(graph)
}

/// The secrets a service receives: environment variable → stage secret name.
pub fn service_secrets(svc: &crate::model::Service) -> BTreeMap<String, String> {
    svc.secrets
        .iter()
        .chain(&svc.optional_secrets)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// SHA-256 of text, hex.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn program(stage: &Stage, name: &str) -> String {
    match &stage.local.bin_dir {
        Some(dir) => format!("{}/{name}", dir.trim_end_matches('/')),
        None => name.to_string(),
    }
}

/// The local target: the platform as supervised processes under the stage directory.
fn local(stack: &str, s: &Stage) -> Result<DesiredGraph, ResolveError> {
    use kinds::*;
    let mut g = DesiredGraph::new(stack, &s.name, Target::Local);
    let api_port = s.local.api_port;
    let api_url = format!("http://127.0.0.1:{api_port}");

    g.add(
        Resource::new("dir/data", LOCAL_DIRECTORY)
            .prop("path", "data")
            .prop("mode", "0700"),
    )?;
    g.add(
        Resource::new("secret/admin-api-key", LOCAL_SECRET)
            .prop("path", "secrets/admin-api-key")
            .prop("prefix", "bxk_")
            .prop("bytes", 32u32),
    )?;

    let oidc = match &s.oidc {
        Some(o) => format!(
            "\n[oidc]\nissuer = {:?}\naudience = {:?}\n",
            o.issuer, o.audience
        ),
        None => String::new(),
    };
    let cp_config = template::LOCAL_CONTROL_PLANE.render(&BTreeMap::from([
        ("stage", s.name.clone()),
        ("api_port", api_port.to_string()),
        (
            "database_url",
            "sqlite://data/control-plane.db?mode=rwc".to_string(),
        ),
        ("admin_key_file", "secrets/admin-api-key".to_string()),
        ("oidc", oidc),
    ]))?;
    let cp_config_sha = sha256_hex(&cp_config);
    g.add(
        Resource::new("config/control-plane", LOCAL_FILE)
            .prop("path", "config/control-plane.toml")
            .prop("content", cp_config)
            .prop("mode", "0600"),
    )?;
    g.add(
        Resource::new("process/control-plane", LOCAL_PROCESS)
            .prop("program", program(s, "boxlite-control-plane"))
            .prop(
                "args",
                Value::strs(["--config", "config/control-plane.toml"]),
            )
            .prop("env", Value::str_map([("RUST_LOG", "info")]))
            .prop("health", format!("{api_url}/api/health"))
            .prop("log", "logs/control-plane.log")
            .prop("running", true)
            .prop("config_sha256", cp_config_sha)
            .dep("dir/data")
            .dep("secret/admin-api-key")
            .dep("config/control-plane"),
    )?;

    for n in 1..=s.runners {
        let name = format!("runner-{n}");
        let port = u32::from(s.local.runner_port_base) + n;
        let token_file = format!("secrets/{name}-token");
        g.add(
            Resource::new(format!("secret/{name}-token"), LOCAL_SECRET)
                .prop("path", token_file.as_str())
                .prop("prefix", "bxr_")
                .prop("bytes", 32u32),
        )?;
        let config = template::LOCAL_RUNNER.render(&BTreeMap::from([
            ("stage", s.name.clone()),
            ("name", name.clone()),
            ("port", port.to_string()),
            ("api_port", api_port.to_string()),
            ("token_file", token_file.clone()),
            ("state_dir", format!("data/runners/{name}")),
        ]))?;
        let config_sha = sha256_hex(&config);
        let config_path = format!("config/{name}.toml");
        // boxctl minted the token; the control plane learns only its hash.
        g.add(
            Resource::new(format!("registration/{name}"), LOCAL_RUNNER_REGISTRATION)
                .prop("name", name.as_str())
                .prop("control_plane", api_url.as_str())
                .prop("admin_key_path", "secrets/admin-api-key")
                .prop(
                    "token_sha256",
                    Value::reference(&format!("secret/{name}-token"), "sha256"),
                )
                .dep("process/control-plane"),
        )?;
        g.add(
            Resource::new(format!("config/{name}"), LOCAL_FILE)
                .prop("path", config_path.as_str())
                .prop("content", config)
                .prop("mode", "0600"),
        )?;
        // Runners are stateful: protected, and their binary is rolled by
        // `boxctl runner upgrade`, not by deploy. Their boxes outlive the
        // agent, so retiring one first deletes its boxes (`on_delete`).
        g.add(
            Resource::new(format!("runner/{name}"), LOCAL_PROCESS)
                .prop("program", program(s, "boxlite-runner"))
                .prop("args", Value::strs(["--config", config_path.as_str()]))
                .prop("env", Value::str_map([("RUST_LOG", "info")]))
                .prop("health", format!("http://127.0.0.1:{port}/api/health"))
                .prop("log", format!("logs/{name}.log"))
                .prop("running", true)
                .prop("config_sha256", config_sha)
                .prop(
                    "on_delete",
                    Value::strs(["--config", config_path.as_str(), "purge"]),
                )
                .dep("dir/data")
                .dep(&format!("secret/{name}-token"))
                .dep(&format!("config/{name}"))
                .dep(&format!("registration/{name}"))
                .protect()
                .ignore_changes(&["program_sha256"]),
        )?;
    }

    for svc in &s.services {
        let mut env: BTreeMap<String, Value> = svc
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::str(v.as_str())))
            .collect();
        env.insert("PORT".into(), Value::str(svc.port.to_string()));
        let health = match &svc.health_path {
            Some(path) => format!("http://127.0.0.1:{}{path}", svc.port),
            None => format!("tcp://127.0.0.1:{}", svc.port),
        };
        let (prog, args) = svc
            .command
            .split_first()
            .expect("validated: command is not empty on local");
        let mut r = Resource::new(format!("service/{}", svc.name), LOCAL_PROCESS)
            .prop("program", prog.as_str())
            .prop("args", Value::strs(args.iter().map(String::as_str)))
            .prop("env", Value::Map(env))
            .prop("health", health)
            .prop("log", format!("logs/service-{}.log", svc.name))
            .prop("running", true)
            .dep("dir/data");
        // Names only: the provider reads the values from the stage's secrets
        // file when it starts the process.
        let secrets = service_secrets(svc);
        if !secrets.is_empty() {
            r = r.prop("secret_env", Value::str_map(secrets));
        }
        g.add(r)?;
    }

    g.outputs.insert("api_url".into(), Value::str(api_url));
    Ok(g)
}
