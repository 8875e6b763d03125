//! The aws target: the whole platform in one VPC of the stage's region.
//!
//! Pure like the rest of the crate: names, addresses, policies and task
//! definitions are all derived from stack.toml, so the same file gives the
//! same graph. Two values only the world knows are left for the provider to
//! fill in before planning (`prepare`): the newest AMI matching the runner's
//! name pattern (`ami` is `{"name": …, "owner": …}` until then) and, when the
//! runner artifact's checksum is not pinned, the runner user data (a
//! `{"template", "vars", "artifact_sha256_from"}` map until then).
//!
//! References between resources that form a set (subnets of a load balancer,
//! security groups of a service) are maps keyed by the referenced resource's
//! id, so they compare the same whatever order AWS lists them in.

use std::collections::BTreeMap;

use serde_json::json;

use super::kinds::*;
use super::net::{Cidr, Layout};
use super::{ResolveError, sha256_hex};
use crate::graph::{DesiredGraph, Resource, Value};
use crate::model::{Stage, Target};
use crate::template;

/// Port of the control plane API inside its task.
pub const API_PORT: u16 = 8080;
/// Port of the box proxy inside its task.
pub const PROXY_PORT: u16 = 8081;
/// Port of the SSH gateway, inside its task and on the network load balancer.
pub const SSH_PORT: u16 = 2222;
/// Port of the runner API on each runner host.
pub const RUNNER_PORT: u16 = 7100;
/// PostgreSQL port.
pub const DB_PORT: u16 = 5432;
/// Idle timeout of both application load balancers: long WebSocket sessions.
pub const ALB_IDLE_TIMEOUT_SECS: i64 = 3600;
/// Days the services' logs are kept.
pub const LOG_RETENTION_DAYS: i64 = 30;
/// TLS policy of the HTTPS listeners (TLS 1.3 and 1.2 only).
pub const SSL_POLICY: &str = "ELBSecurityPolicy-TLS13-1-2-2021-06";
/// Database user and database name of the control plane.
pub const DB_USER: &str = "boxlite";
/// Key prefix of runner artifacts in the stage bucket.
pub const ARTIFACT_PREFIX: &str = "artifacts/";

/// Program and arguments of each control-plane service (all one image).
/// Reconciled with the control plane's command line at merge.
pub const CONTROL_PLANE_COMMANDS: [(&str, &[&str], u16); 3] = [
    ("api", &["boxlite-control-plane"], API_PORT),
    ("proxy", &["boxlite-control-plane", "proxy"], PROXY_PORT),
    ("ssh", &["boxlite-control-plane", "ssh-gateway"], SSH_PORT),
];

/// `<stack>-<stage>-<suffix>` (or `<stack>-<stage>` without a suffix), shortened
/// to `max` characters with a hash of the full name when longer; never starts
/// or ends with `-` and never holds `--`.
pub fn aws_name(stack: &str, stage: &str, suffix: &str, max: usize) -> String {
    let full = if suffix.is_empty() {
        format!("{stack}-{stage}")
    } else {
        format!("{stack}-{stage}-{suffix}")
    };
    let mut clean = String::with_capacity(full.len());
    for c in full.chars() {
        if c == '-' && clean.ends_with('-') {
            continue;
        }
        clean.push(c);
    }
    if clean.len() <= max {
        return clean;
    }
    let hash = &sha256_hex(&full)[..8];
    let keep = max.saturating_sub(hash.len() + 1);
    let head: String = clean.chars().take(keep).collect();
    format!("{}-{hash}", head.trim_end_matches('-'))
}

/// The stage bucket: `<stack>-<stage>-<hash>`, the hash over stack, stage,
/// region and domain so two deployments of one stack name never collide.
pub fn bucket_name(stack: &str, stage: &str, region: &str, domain: &str) -> String {
    let hash = &sha256_hex(&format!("{stack}/{stage}/{region}/{domain}"))[..8];
    format!("{}-{hash}", aws_name(stack, stage, "", 54))
}

/// The ARN partition of a region.
pub fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// The IAM path that identifies a role or instance profile of the stage:
/// `/boxlite/<stack>/<stage>/<family>/<name>/`.
pub fn iam_path(stack: &str, stage: &str, id: &str) -> String {
    format!("/boxlite/{stack}/{stage}/{id}/")
}

/// The SSM parameter namespace of a stage.
pub fn ssm_prefix(stage: &str) -> String {
    format!("/boxlite/{stage}/")
}

/// The folder of a stage's SSM namespace holding the runner tokens, each
/// owned by its runner host (not observed as parameters of their own).
pub const RUNNER_TOKENS: &str = "runner-tokens";

/// The SSM parameter holding runner `runner`'s token on stage `stage`.
pub fn runner_token_parameter(stage: &str, runner: &str) -> String {
    format!("{}{RUNNER_TOKENS}/{runner}", ssm_prefix(stage))
}

/// JSON text with object keys sorted, pretty-printed: the form in which
/// policies and container definitions are compared and shown as diffs.
pub fn canonical_json(v: &serde_json::Value) -> String {
    fn sort(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(o) => {
                let mut keys: Vec<&String> = o.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    out.insert(k.clone(), sort(&o[k]));
                }
                serde_json::Value::Object(out)
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string_pretty(&sort(v)).expect("JSON values serialize")
}

/// Container definitions reduced to the fields boxctl manages (defaults that
/// ECS adds, such as `cpu: 0` or empty `mountPoints`, are dropped; environment
/// and secrets are sorted by name), as canonical JSON. Desired and observed
/// definitions go through the same function, so equal content compares equal.
pub fn canonical_container_definitions(v: &serde_json::Value) -> String {
    use serde_json::Value as J;
    let containers = v.as_array().cloned().unwrap_or_default();
    let out: Vec<J> = containers
        .iter()
        .map(|c| {
            let mut m = serde_json::Map::new();
            for key in ["name", "image", "essential"] {
                if let Some(x) = c.get(key).filter(|x| !x.is_null()) {
                    m.insert(key.into(), x.clone());
                }
            }
            for key in ["command", "entryPoint"] {
                if let Some(x) = c.get(key).and_then(J::as_array).filter(|a| !a.is_empty()) {
                    m.insert(key.into(), J::Array(x.clone()));
                }
            }
            if let Some(ports) = c
                .get("portMappings")
                .and_then(J::as_array)
                .filter(|a| !a.is_empty())
            {
                let ports: Vec<J> = ports
                    .iter()
                    .map(|p| {
                        json!({
                            "containerPort": p.get("containerPort").cloned().unwrap_or(J::Null),
                            "protocol": p.get("protocol").and_then(J::as_str).unwrap_or("tcp"),
                        })
                    })
                    .collect();
                m.insert("portMappings".into(), J::Array(ports));
            }
            for (key, value_key) in [("environment", "value"), ("secrets", "valueFrom")] {
                if let Some(items) = c.get(key).and_then(J::as_array).filter(|a| !a.is_empty()) {
                    let mut pairs: Vec<(String, J)> = items
                        .iter()
                        .map(|e| {
                            (
                                e.get("name").and_then(J::as_str).unwrap_or("").to_string(),
                                e.get(value_key).cloned().unwrap_or(J::Null),
                            )
                        })
                        .collect();
                    pairs.sort_by(|a, b| a.0.cmp(&b.0));
                    let items: Vec<J> = pairs
                        .into_iter()
                        .map(|(name, value)| json!({ "name": name, value_key: value }))
                        .collect();
                    m.insert(key.into(), J::Array(items));
                }
            }
            if let Some(log) = c.get("logConfiguration").filter(|x| !x.is_null()) {
                m.insert(
                    "logConfiguration".into(),
                    json!({
                        "logDriver": log.get("logDriver").cloned().unwrap_or(J::Null),
                        "options": log.get("options").cloned().unwrap_or(json!({})),
                    }),
                );
            }
            J::Object(m)
        })
        .collect();
    canonical_json(&J::Array(out))
}

/// Digest of what makes a task definition revision: the service runs the
/// revision carrying this digest, so a change registers exactly one revision.
pub fn task_definition_sha256(
    family: &str,
    cpu: &str,
    memory: &str,
    container_definitions: &str,
    roles: &[&str],
) -> String {
    sha256_hex(&format!(
        "{family}\n{cpu}\n{memory}\n{}\n{container_definitions}",
        roles.join("\n")
    ))
}

/// `s3://<bucket>/artifacts/boxlite-runner/<version>/boxlite-runner-linux-amd64.tar.gz`.
pub fn default_artifact_url(bucket: &str, version: &str) -> String {
    format!(
        "s3://{bucket}/{ARTIFACT_PREFIX}boxlite-runner/{version}/boxlite-runner-linux-amd64.tar.gz"
    )
}

/// Everything the resolver derives once per stage.
struct Ctx<'a> {
    stack: &'a str,
    stage: &'a Stage,
    region: &'a str,
    domain: &'a str,
    partition: &'static str,
    bucket: String,
    layout: Layout,
    zones: [String; 2],
    vpc: Cidr,
}

impl Ctx<'_> {
    fn name(&self, suffix: &str) -> String {
        aws_name(self.stack, &self.stage.name, suffix, 255)
    }

    /// Names of load balancers and target groups: 32 characters at most.
    fn lb_name(&self, suffix: &str) -> String {
        aws_name(self.stack, &self.stage.name, suffix, 32)
    }

    fn ssm(&self, rest: &str) -> String {
        format!("{}{rest}", ssm_prefix(&self.stage.name))
    }

    fn ssm_arn(&self, rest: &str) -> String {
        format!(
            "arn:{}:ssm:{}:*:parameter{}",
            self.partition,
            self.region,
            self.ssm(rest)
        )
    }

    fn managed_policy(&self, name: &str) -> String {
        format!("arn:{}:iam::aws:policy/{name}", self.partition)
    }
}

/// A map of references to the same output of several resources, keyed by id.
fn ref_set(ids: &[&str], output: &str) -> Value {
    Value::Map(
        ids.iter()
            .map(|id| (id.to_string(), Value::reference(id, output)))
            .collect(),
    )
}

/// One ingress rule: protocol, port range and either a CIDR or a security group.
fn rule(port: u16, source: Value) -> Value {
    let mut m = BTreeMap::from([
        ("protocol".to_string(), Value::str("tcp")),
        ("from_port".to_string(), Value::from(port)),
        ("to_port".to_string(), Value::from(port)),
    ]);
    match source {
        Value::Str(cidr) => m.insert("cidr".into(), Value::Str(cidr)),
        other => m.insert("source".into(), other),
    };
    Value::Map(m)
}

fn policy_doc(statements: serde_json::Value) -> String {
    canonical_json(&json!({"Version": "2012-10-17", "Statement": statements}))
}

fn trust(service: &str) -> String {
    policy_doc(json!([{
        "Effect": "Allow",
        "Principal": {"Service": service},
        "Action": "sts:AssumeRole",
    }]))
}

/// Resolve an aws stage.
pub fn resolve(stack: &str, s: &Stage) -> Result<DesiredGraph, ResolveError> {
    let region = s
        .region
        .as_deref()
        .expect("validated: aws stages have a region");
    let domain = s
        .domain
        .as_deref()
        .expect("validated: aws stages have a domain");
    let vpc = Cidr::parse(&s.network.vpc_cidr).expect("validated: the VPC CIDR parses");
    let layout = Layout::carve(vpc).expect("validated: the VPC is a /16 to /24");
    let c = Ctx {
        stack,
        stage: s,
        region,
        domain,
        partition: partition(region),
        bucket: bucket_name(stack, &s.name, region, domain),
        layout,
        zones: [format!("{region}a"), format!("{region}b")],
        vpc,
    };
    let mut g = DesiredGraph::new(stack, &s.name, Target::Aws);
    network(&c, &mut g)?;
    security_groups(&c, &mut g)?;
    storage(&c, &mut g)?;
    identity(&c, &mut g)?;
    database(&c, &mut g)?;
    load_balancers(&c, &mut g)?;
    services(&c, &mut g)?;
    runners(&c, &mut g)?;
    dns(&c, &mut g)?;
    outputs(&c, &mut g);
    Ok(g)
}

fn network(c: &Ctx<'_>, g: &mut DesiredGraph) -> Result<(), ResolveError> {
    g.add(
        Resource::new("vpc/main", AWS_VPC)
            .prop("name", c.name("vpc"))
            .prop("cidr", c.vpc.to_string())
            .prop("dns_hostnames", true)
            .prop("dns_support", true),
    )?;
    g.add(
        Resource::new("igw/main", AWS_INTERNET_GATEWAY)
            .prop("name", c.name("igw"))
            .prop("vpc_id", Value::reference("vpc/main", "id")),
    )?;
    let tiers = [
        ("public", c.layout.public, true),
        ("private", c.layout.private, false),
        ("runners", c.layout.runners, false),
    ];
    for (tier, cidrs, public) in tiers {
        for (i, zone) in ["a", "b"].iter().enumerate() {
            g.add(
                Resource::new(format!("subnet/{tier}-{zone}"), AWS_SUBNET)
                    .prop("name", c.name(&format!("{tier}-{zone}")))
                    .prop("vpc_id", Value::reference("vpc/main", "id"))
                    .prop("cidr", cidrs[i].to_string())
                    .prop("availability_zone", c.zones[i].as_str())
                    .prop("public", public),
            )?;
        }
    }
    // One NAT gateway per zone in production (a zone outage leaves the other
    // zone's runners and services their egress); one shared NAT otherwise.
    let nat_zones: &[&str] = if c.stage.production {
        &["a", "b"]
    } else {
        &["a"]
    };
    for zone in nat_zones {
        g.add(
            Resource::new(format!("eip/nat-{zone}"), AWS_EIP)
                .prop("name", c.name(&format!("nat-{zone}"))),
        )?;
        g.add(
            Resource::new(format!("nat/{zone}"), AWS_NAT_GATEWAY)
                .prop("name", c.name(&format!("nat-{zone}")))
                .prop(
                    "subnet_id",
                    Value::reference(&format!("subnet/public-{zone}"), "id"),
                )
                .prop(
                    "allocation_id",
                    Value::reference(&format!("eip/nat-{zone}"), "allocation_id"),
                )
                .dep("igw/main"),
        )?;
    }
    g.add(
        Resource::new("rt/public", AWS_ROUTE_TABLE)
            .prop("name", c.name("public"))
            .prop("vpc_id", Value::reference("vpc/main", "id"))
            .prop(
                "routes",
                Value::Map(BTreeMap::from([(
                    "0.0.0.0/0".to_string(),
                    Value::Map(BTreeMap::from([(
                        "gateway_id".to_string(),
                        Value::reference("igw/main", "id"),
                    )])),
                )])),
            )
            .prop(
                "subnets",
                ref_set(&["subnet/public-a", "subnet/public-b"], "id"),
            ),
    )?;
    for zone in ["a", "b"] {
        let nat = if nat_zones.contains(&zone) {
            format!("nat/{zone}")
        } else {
            "nat/a".to_string()
        };
        let private = format!("subnet/private-{zone}");
        let runners = format!("subnet/runners-{zone}");
        g.add(
            Resource::new(format!("rt/private-{zone}"), AWS_ROUTE_TABLE)
                .prop("name", c.name(&format!("private-{zone}")))
                .prop("vpc_id", Value::reference("vpc/main", "id"))
                .prop(
                    "routes",
                    Value::Map(BTreeMap::from([(
                        "0.0.0.0/0".to_string(),
                        Value::Map(BTreeMap::from([(
                            "nat_gateway_id".to_string(),
                            Value::reference(&nat, "id"),
                        )])),
                    )])),
                )
                .prop("subnets", ref_set(&[&private, &runners], "id")),
        )?;
    }
    Ok(())
}

fn security_groups(c: &Ctx<'_>, g: &mut DesiredGraph) -> Result<(), ResolveError> {
    let sg = |id: &str, what: &str, ingress: Vec<(&str, Value)>| {
        let name = id.split_once('/').map_or(id, |(_, n)| n);
        Resource::new(id, AWS_SECURITY_GROUP)
            .prop("name", c.name(name))
            .prop(
                "description",
                format!("BoxLite {}/{}: {what}", c.stack, c.stage.name),
            )
            .prop("vpc_id", Value::reference("vpc/main", "id"))
            .prop(
                "ingress",
                Value::Map(
                    ingress
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                ),
            )
    };
    let from = |id: &str| Value::reference(id, "id");
    let internet = || Value::str("0.0.0.0/0");
    g.add(sg(
        "sg/alb",
        "application load balancers",
        vec![
            ("https from the internet", rule(443, internet())),
            (
                "http from the internet (redirected to https)",
                rule(80, internet()),
            ),
        ],
    ))?;
    g.add(sg(
        "sg/nlb",
        "ssh load balancer",
        vec![("ssh from the internet", rule(SSH_PORT, internet()))],
    ))?;
    let mut services = vec![
        (
            "api from the load balancers".to_string(),
            rule(API_PORT, from("sg/alb")),
        ),
        (
            "proxy from the load balancers".to_string(),
            rule(PROXY_PORT, from("sg/alb")),
        ),
        (
            "ssh gateway from the ssh load balancer".to_string(),
            rule(SSH_PORT, from("sg/nlb")),
        ),
    ];
    for svc in c.stage.services.iter().filter(|s| s.public) {
        services.push((
            format!("service {} from the load balancers", svc.name),
            rule(svc.port, from("sg/alb")),
        ));
    }
    g.add(sg(
        "sg/services",
        "control plane and services",
        services
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect(),
    ))?;
    g.add(sg(
        "sg/runners",
        "runners",
        vec![(
            "runner api from the control plane services",
            rule(RUNNER_PORT, from("sg/services")),
        )],
    ))?;
    g.add(sg(
        "sg/database",
        "database",
        vec![(
            "postgres from the control plane services",
            rule(DB_PORT, from("sg/services")),
        )],
    ))?;
    Ok(())
}

fn storage(c: &Ctx<'_>, g: &mut DesiredGraph) -> Result<(), ResolveError> {
    let production = c.stage.production;
    g.add(
        Resource::new("bucket/main", AWS_BUCKET)
            .prop("name", c.bucket.as_str())
            .prop("versioning", true)
            .prop("block_public_access", true)
            .prop("encryption", "AES256")
            .retain(production),
    )?;
    let secret = |id: &str, rest: &str, prefix: &str| {
        Resource::new(id, AWS_SECRET)
            .prop("name", c.ssm(rest))
            .prop("prefix", prefix)
            .prop("bytes", 32u32)
    };
    g.add(secret("secret/admin-api-key", "admin-api-key", "bxk_"))?;
    g.add(secret("secret/database-password", "database-password", ""))?;
    let param = |id: &str, rest: &str, value: Value| {
        Resource::new(id, AWS_PARAMETER)
            .prop("name", c.ssm(rest))
            .prop("value", value)
    };
    g.add(param(
        "param/database-url",
        "config/database-url",
        Value::reference("db/main", "url"),
    ))?;
    g.add(param(
        "param/api-url",
        "config/api-url",
        Value::str(format!("https://api.{}", c.domain)),
    ))?;
    g.add(param(
        "param/bucket",
        "config/bucket",
        Value::reference("bucket/main", "name"),
    ))?;
    // The runners the control plane registers at start: name → SHA-256 of
    // its token (each runner host owns its token parameter and carries the
    // digest; the control plane learns hashes only).
    g.add(
        param(
            "param/runner-token-hashes",
            "config/runner-token-hashes",
            Value::Map(
                (1..=c.stage.runners)
                    .map(|n| {
                        (
                            format!("runner-{n}"),
                            Value::reference(&format!("runner/runner-{n}"), "token_sha256"),
                        )
                    })
                    .collect(),
            ),
        )
        .prop("format", "json"),
    )?;
    g.add(
        Resource::new("logs/services", AWS_LOG_GROUP)
            .prop("name", format!("/boxlite/{}/{}", c.stack, c.stage.name))
            .prop("retention_days", LOG_RETENTION_DAYS),
    )?;
    Ok(())
}

fn identity(c: &Ctx<'_>, g: &mut DesiredGraph) -> Result<(), ResolveError> {
    let p = c.partition;
    let bucket_arn = format!("arn:{p}:s3:::{}", c.bucket);
    let role = |id: &str, suffix: &str, trusted: &str| {
        Resource::new(id, AWS_IAM_ROLE)
            .prop("name", aws_name(c.stack, &c.stage.name, suffix, 64))
            .prop("path", iam_path(c.stack, &c.stage.name, id))
            .prop("assume_role_policy", trust(trusted))
    };
    let inline = |name: &str, statements: serde_json::Value| {
        Value::Map(BTreeMap::from([(
            name.to_string(),
            Value::str(policy_doc(statements)),
        )]))
    };
    // Runners: Session Manager and Run Command (upgrades), their own tokens,
    // and the runner artifacts; nothing else.
    g.add(
        role("role/runner", "runner", "ec2.amazonaws.com")
            .prop(
                "managed_policies",
                Value::strs([c.managed_policy("AmazonSSMManagedInstanceCore")]),
            )
            .prop(
                "inline_policies",
                inline(
                    "boxlite-runner",
                    json!([
                        {
                            "Sid": "RunnerTokens",
                            "Effect": "Allow",
                            "Action": ["ssm:GetParameter"],
                            "Resource": [c.ssm_arn(&format!("{RUNNER_TOKENS}/*"))],
                        },
                        {
                            "Sid": "RunnerArtifacts",
                            "Effect": "Allow",
                            "Action": ["s3:GetObject"],
                            "Resource": [format!("{bucket_arn}/{ARTIFACT_PREFIX}*")],
                        },
                    ]),
                ),
            ),
    )?;
    g.add(
        Resource::new("profile/runner", AWS_INSTANCE_PROFILE)
            .prop("name", aws_name(c.stack, &c.stage.name, "runner", 128))
            .prop("path", iam_path(c.stack, &c.stage.name, "profile/runner"))
            .prop("role", Value::reference("role/runner", "name")),
    )?;
    // ECS pulls images, writes logs and reads the services' secrets and
    // configuration, never the runner tokens.
    g.add(
        role(
            "role/task-execution",
            "task-execution",
            "ecs-tasks.amazonaws.com",
        )
        .prop(
            "managed_policies",
            Value::strs([c.managed_policy("service-role/AmazonECSTaskExecutionRolePolicy")]),
        )
        .prop(
            "inline_policies",
            inline(
                "boxlite-task-execution",
                json!([
                    {
                        "Sid": "StageParameters",
                        "Effect": "Allow",
                        "Action": ["ssm:GetParameters"],
                        "Resource": [c.ssm_arn("*")],
                    },
                    {
                        "Sid": "NotRunnerTokensOrDnsCredentials",
                        "Effect": "Deny",
                        "Action": ["ssm:*"],
                        "Resource": [c.ssm_arn(&format!("{RUNNER_TOKENS}/*")), c.ssm_arn("cloudflare-*")],
                    },
                ]),
            ),
        ),
    )?;
    // What the control plane itself may do: the stage bucket (backups, artifacts).
    g.add(
        role("role/task", "task", "ecs-tasks.amazonaws.com")
            .prop("managed_policies", Value::List(Vec::new()))
            .prop(
                "inline_policies",
                inline(
                    "boxlite-control-plane",
                    json!([
                        {
                            "Sid": "StageBucketObjects",
                            "Effect": "Allow",
                            "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                            "Resource": [format!("{bucket_arn}/backups/*"), format!("{bucket_arn}/{ARTIFACT_PREFIX}*")],
                        },
                        {
                            "Sid": "StageBucketList",
                            "Effect": "Allow",
                            "Action": ["s3:ListBucket"],
                            "Resource": [bucket_arn],
                        },
                    ]),
                ),
            ),
    )?;
    Ok(())
}

fn database(c: &Ctx<'_>, g: &mut DesiredGraph) -> Result<(), ResolveError> {
    let d = &c.stage.database;
    let production = c.stage.production;
    let identifier = aws_name(c.stack, &c.stage.name, "", 63);
    g.add(
        Resource::new("dbsubnets/main", AWS_DB_SUBNET_GROUP)
            .prop("name", identifier.as_str())
            .prop(
                "description",
                format!("BoxLite {}/{} database", c.stack, c.stage.name),
            )
            .prop(
                "subnets",
                ref_set(&["subnet/private-a", "subnet/private-b"], "id"),
            ),
    )?;
    let major = d
        .engine_version
        .split('.')
        .next()
        .unwrap_or(&d.engine_version);
    let mut db = Resource::new("db/main", AWS_DB_INSTANCE)
        .prop("identifier", identifier.as_str())
        .prop("engine", "postgres")
        .prop("engine_version", major)
        .prop("instance_class", d.instance_class.as_str())
        .prop("allocated_storage_gb", d.storage_gb)
        .prop("storage_type", "gp3")
        .prop("storage_encrypted", true)
        .prop("multi_az", d.multi_az)
        .prop("backup_retention_days", d.backup_retention_days)
        .prop("db_name", DB_USER)
        .prop("master_username", DB_USER)
        .prop(
            "master_password",
            Value::Secret("database-password".to_string()),
        )
        .prop("subnet_group", Value::reference("dbsubnets/main", "name"))
        .prop("security_groups", ref_set(&["sg/database"], "id"))
        .prop("publicly_accessible", false)
        .prop("deletion_protection", production)
        .dep("secret/database-password")
        .retain(production);
    if production {
        db = db.protect();
    }
    g.add(db)?;
    Ok(())
}

fn load_balancers(c: &Ctx<'_>, g: &mut DesiredGraph) -> Result<(), ResolveError> {
    let domain = c.domain;
    let public_subnets = || ref_set(&["subnet/public-a", "subnet/public-b"], "id");
    let public_services: Vec<_> = c.stage.services.iter().filter(|s| s.public).collect();

    // Certificates, validated by DNS; the validation records are outputs of
    // the certificate, for whoever serves the zone to publish. Each public
    // service has its own certificate (attached to the API listener by its
    // rule), so adding one never replaces a certificate in use.
    let mut certs = vec![
        ("api".to_string(), format!("api.{domain}"), Vec::new()),
        (
            "proxy".to_string(),
            format!("proxy.{domain}"),
            vec![format!("*.proxy.{domain}")],
        ),
    ];
    for svc in &public_services {
        certs.push((
            format!("svc-{}", svc.name),
            format!("{}.{domain}", svc.name),
            Vec::new(),
        ));
    }
    for (name, domain_name, sans) in &certs {
        g.add(
            Resource::new(format!("cert/{name}"), AWS_CERTIFICATE)
                .prop("domain", domain_name.as_str())
                .prop(
                    "alternative_names",
                    Value::strs(sans.iter().map(String::as_str)),
                )
                .prop("validation_method", "DNS"),
        )?;
        let mut validation =
            Resource::new(format!("certvalidation/{name}"), AWS_CERTIFICATE_VALIDATION).prop(
                "certificate",
                Value::reference(&format!("cert/{name}"), "arn"),
            );
        if c.stage.dns.is_some() {
            // boxctl publishes the validation record itself.
            validation = validation.dep(&format!("dns/acm-{name}"));
        }
        g.add(validation)?;
    }

    for (name, kind, sg) in [
        ("api", "application", "sg/alb"),
        ("proxy", "application", "sg/alb"),
        ("ssh", "network", "sg/nlb"),
    ] {
        let mut lb = Resource::new(format!("lb/{name}"), AWS_LOAD_BALANCER)
            .prop("name", c.lb_name(name))
            .prop("type", kind)
            .prop("scheme", "internet-facing")
            .prop("subnets", public_subnets())
            .prop("security_groups", ref_set(&[sg], "id"))
            .dep("igw/main");
        if kind == "application" {
            lb = lb.prop("idle_timeout_seconds", ALB_IDLE_TIMEOUT_SECS);
        }
        g.add(lb)?;
    }

    let tg = |id: &str, name: &str, protocol: &str, port: u16, health: Option<&str>| {
        let mut r = Resource::new(id, AWS_TARGET_GROUP)
            .prop("name", c.lb_name(name))
            .prop("protocol", protocol)
            .prop("port", port)
            .prop("vpc_id", Value::reference("vpc/main", "id"))
            .prop("target_type", "ip");
        match health {
            Some(path) => {
                r = r
                    .prop("health_check_protocol", "HTTP")
                    .prop("health_check_path", path)
            }
            None => r = r.prop("health_check_protocol", "TCP"),
        }
        r
    };
    g.add(tg("tg/api", "api", "HTTP", API_PORT, Some("/api/health")))?;
    g.add(tg(
        "tg/proxy",
        "proxy",
        "HTTP",
        PROXY_PORT,
        Some("/api/health"),
    ))?;
    g.add(tg("tg/ssh", "ssh", "TCP", SSH_PORT, None))?;

    let forward = |tg: &str| {
        Value::Map(BTreeMap::from([
            ("type".to_string(), Value::str("forward")),
            ("target_group".to_string(), Value::reference(tg, "arn")),
        ]))
    };
    let redirect = || {
        Value::Map(BTreeMap::from([
            ("type".to_string(), Value::str("redirect")),
            ("protocol".to_string(), Value::str("HTTPS")),
            ("port".to_string(), Value::str("443")),
            ("status_code".to_string(), Value::str("HTTP_301")),
        ]))
    };
    for name in ["api", "proxy"] {
        g.add(
            Resource::new(format!("listener/{name}-https"), AWS_LISTENER)
                .prop(
                    "load_balancer",
                    Value::reference(&format!("lb/{name}"), "arn"),
                )
                .prop("port", 443u16)
                .prop("protocol", "HTTPS")
                .prop(
                    "certificate",
                    Value::reference(&format!("cert/{name}"), "arn"),
                )
                .prop("ssl_policy", SSL_POLICY)
                .prop("default_action", forward(&format!("tg/{name}")))
                .dep(&format!("certvalidation/{name}")),
        )?;
        g.add(
            Resource::new(format!("listener/{name}-http"), AWS_LISTENER)
                .prop(
                    "load_balancer",
                    Value::reference(&format!("lb/{name}"), "arn"),
                )
                .prop("port", 80u16)
                .prop("protocol", "HTTP")
                .prop("default_action", redirect()),
        )?;
    }
    g.add(
        Resource::new("listener/ssh", AWS_LISTENER)
            .prop("load_balancer", Value::reference("lb/ssh", "arn"))
            .prop("port", SSH_PORT)
            .prop("protocol", "TCP")
            .prop("default_action", forward("tg/ssh")),
    )?;

    // Public extra services: a host rule on the API load balancer each.
    let mut priorities = std::collections::BTreeSet::new();
    for svc in &public_services {
        let id = format!("tg/svc-{}", svc.name);
        g.add(tg(
            &id,
            &format!("svc-{}", svc.name),
            "HTTP",
            svc.port,
            Some(svc.health_path.as_deref().unwrap_or("/")),
        ))?;
        // A stable priority per name (rules of other services keep theirs);
        // collisions move to the next free number.
        let digest = sha256_hex(&svc.name);
        let mut priority = 1 + u32::from_str_radix(&digest[..6], 16).unwrap_or(0) % 40_000;
        while !priorities.insert(priority) {
            priority += 1;
        }
        g.add(
            Resource::new(format!("rule/svc-{}", svc.name), AWS_LISTENER_RULE)
                .prop("listener", Value::reference("listener/api-https", "arn"))
                .prop("priority", priority)
                .prop("host", format!("{}.{domain}", svc.name))
                .prop("target_group", Value::reference(&id, "arn"))
                .prop(
                    "certificate",
                    Value::reference(&format!("cert/svc-{}", svc.name), "arn"),
                )
                .dep(&format!("certvalidation/svc-{}", svc.name)),
        )?;
    }
    Ok(())
}

/// Public names in the stage's DNS zone (Cloudflare): the API, the proxy and
/// its wildcard, SSH and public services point at their load balancers, and
/// each certificate's DNS validation record is published so ACM issues it
/// without manual steps.
///
/// Proxied through Cloudflare: the API and public services (names one label
/// under the zone's apex certificate). Not proxied: `proxy.` and
/// `*.proxy.` (Cloudflare's universal certificate covers one label, not a
/// wildcard below a subdomain), `ssh.` (raw TCP cannot be proxied) and the
/// validation records (ACM must see them as they are).
fn dns(c: &Ctx<'_>, g: &mut DesiredGraph) -> Result<(), ResolveError> {
    let Some(dns) = &c.stage.dns else {
        return Ok(());
    };
    let zone = dns.zone.to_ascii_lowercase();
    let domain = c.domain.to_ascii_lowercase();
    let record = |id: String, name: Value, content: Value, proxied: bool| {
        Resource::new(id, CLOUDFLARE_DNS_RECORD)
            .prop("zone", zone.as_str())
            .prop("name", name)
            .prop("type", "CNAME")
            .prop("content", content)
            .prop("proxied", proxied)
            .prop("ttl", 1u32)
    };
    let to_lb = |lb: &str| Value::reference(&format!("lb/{lb}"), "dns_name");
    for (id, name, lb, proxied) in [
        ("dns/api", format!("api.{domain}"), "api", true),
        ("dns/proxy", format!("proxy.{domain}"), "proxy", false),
        (
            "dns/proxy-wildcard",
            format!("*.proxy.{domain}"),
            "proxy",
            false,
        ),
        ("dns/ssh", format!("ssh.{domain}"), "ssh", false),
    ] {
        g.add(record(id.to_string(), Value::str(name), to_lb(lb), proxied))?;
    }
    for svc in c.stage.services.iter().filter(|s| s.public) {
        g.add(record(
            format!("dns/svc-{}", svc.name),
            Value::str(format!("{}.{domain}", svc.name)),
            to_lb("api"),
            true,
        ))?;
    }
    let certs: Vec<String> = g
        .resources
        .values()
        .filter(|r| r.kind == AWS_CERTIFICATE)
        .map(|r| r.id.name().to_string())
        .collect();
    for cert in certs {
        let of = format!("cert/{cert}");
        g.add(record(
            format!("dns/acm-{cert}"),
            Value::reference(&of, "validation_name"),
            Value::reference(&of, "validation_value"),
            false,
        ))?;
    }
    Ok(())
}

/// One container, in the canonical form the plan compares.
#[allow(clippy::too_many_arguments)]
fn container_definitions(
    c: &Ctx<'_>,
    name: &str,
    image: &str,
    command: &[&str],
    port: u16,
    env: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, String>,
) -> String {
    let env: Vec<serde_json::Value> = env
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    let secrets: Vec<serde_json::Value> = secrets
        .iter()
        .map(|(k, v)| json!({"name": k, "valueFrom": v}))
        .collect();
    canonical_container_definitions(&json!([{
        "name": name,
        "image": image,
        "essential": true,
        "command": command,
        "portMappings": [{"containerPort": port, "protocol": "tcp"}],
        "environment": env,
        "secrets": secrets,
        "logConfiguration": {
            "logDriver": "awslogs",
            "options": {
                "awslogs-group": format!("/boxlite/{}/{}", c.stack, c.stage.name),
                "awslogs-region": c.region,
                "awslogs-stream-prefix": name,
            },
        },
    }]))
}

/// A task definition and the service running it.
struct ServiceSpec<'a> {
    name: &'a str,
    image: &'a str,
    command: &'a [&'a str],
    port: u16,
    cpu: u32,
    memory_mb: u32,
    replicas: u32,
    env: BTreeMap<String, String>,
    secrets: BTreeMap<String, String>,
    target_group: Option<String>,
    after: Vec<String>,
    /// What the tasks read at start; a change starts new tasks.
    restart_on: Option<Value>,
}

fn service(c: &Ctx<'_>, g: &mut DesiredGraph, spec: ServiceSpec<'_>) -> Result<(), ResolveError> {
    let family = c.name(spec.name);
    let cpu = spec.cpu.to_string();
    let memory = spec.memory_mb.to_string();
    let defs = container_definitions(
        c,
        spec.name,
        spec.image,
        spec.command,
        spec.port,
        &spec.env,
        &spec.secrets,
    );
    let exec_role = aws_name(c.stack, &c.stage.name, "task-execution", 64);
    let task_role = aws_name(c.stack, &c.stage.name, "task", 64);
    let digest = task_definition_sha256(&family, &cpu, &memory, &defs, &[&exec_role, &task_role]);
    let taskdef = format!("taskdef/{}", spec.name);
    g.add(
        Resource::new(&taskdef, AWS_TASK_DEFINITION)
            .prop("family", family.as_str())
            .prop("cpu", cpu.as_str())
            .prop("memory", memory.as_str())
            .prop(
                "execution_role_arn",
                Value::reference("role/task-execution", "arn"),
            )
            .prop("task_role_arn", Value::reference("role/task", "arn"))
            .prop("container_definitions", defs)
            .prop("content_sha256", digest.as_str())
            .dep("logs/services"),
    )?;
    let mut svc = Resource::new(format!("service/{}", spec.name), AWS_ECS_SERVICE)
        .prop("name", spec.name)
        .prop("cluster", Value::reference("cluster/main", "arn"))
        .prop("task_definition_family", family.as_str())
        .prop("task_definition_sha256", digest.as_str())
        .prop("desired_count", spec.replicas)
        .prop("launch_type", "FARGATE")
        .prop(
            "subnets",
            ref_set(&["subnet/private-a", "subnet/private-b"], "id"),
        )
        .prop("security_groups", ref_set(&["sg/services"], "id"))
        .prop("assign_public_ip", false)
        .dep(&taskdef)
        // Egress (image pulls, the database) must exist before tasks start.
        .dep("rt/private-a")
        .dep("rt/private-b");
    let lbs = match &spec.target_group {
        Some(tg) => Value::List(vec![Value::Map(BTreeMap::from([
            ("target_group".to_string(), Value::reference(tg, "arn")),
            ("container_name".to_string(), Value::str(spec.name)),
            ("container_port".to_string(), Value::from(spec.port)),
        ]))]),
        None => Value::List(Vec::new()),
    };
    svc = svc.prop("load_balancers", lbs);
    if let Some(r) = spec.restart_on {
        svc = svc.prop("restart_on", r);
    }
    for dep in &spec.after {
        svc = svc.dep(dep);
    }
    g.add(svc)?;
    Ok(())
}

fn services(c: &Ctx<'_>, g: &mut DesiredGraph) -> Result<(), ResolveError> {
    g.add(
        Resource::new("cluster/main", AWS_ECS_CLUSTER)
            .prop("name", c.name(""))
            .prop("container_insights", "enabled"),
    )?;
    let cp = &c.stage.control_plane;
    let image = cp
        .image
        .as_deref()
        .expect("validated: aws stages have a control plane image");
    let domain = c.domain;
    let cp_secrets = BTreeMap::from([
        ("BOXLITE_ADMIN_KEY".to_string(), c.ssm("admin-api-key")),
        (
            "BOXLITE_DATABASE_URL".to_string(),
            c.ssm("config/database-url"),
        ),
        // libpq's variable: the URL carries no password.
        ("PGPASSWORD".to_string(), c.ssm("database-password")),
    ]);
    for (name, command, port) in CONTROL_PLANE_COMMANDS {
        let mut env = BTreeMap::from([
            ("BOXLITE_LISTEN".to_string(), format!("0.0.0.0:{port}")),
            (
                "BOXLITE_PUBLIC_URL".to_string(),
                format!("https://api.{domain}"),
            ),
            ("BOXLITE_LOG_FORMAT".to_string(), "json".to_string()),
        ]);
        if let Some(o) = &c.stage.oidc {
            env.insert("BOXLITE_OIDC_ISSUER".into(), o.issuer.clone());
            env.insert("BOXLITE_OIDC_AUDIENCE".into(), o.audience.clone());
        }
        let mut secrets = cp_secrets.clone();
        let mut after = Vec::new();
        let mut restart_on = None;
        if name == "api" {
            // The API registers the declared runners when it starts.
            secrets.insert(
                "BOXLITE_RUNNER_TOKEN_HASHES".into(),
                c.ssm("config/runner-token-hashes"),
            );
            after.push("param/runner-token-hashes".to_string());
            restart_on = Some(Value::reference(
                "param/runner-token-hashes",
                "value_sha256",
            ));
        }
        let listener = if name == "ssh" {
            "listener/ssh".to_string()
        } else {
            format!("listener/{name}-https")
        };
        service(
            c,
            g,
            ServiceSpec {
                name,
                image,
                command,
                port,
                cpu: cp.cpu,
                memory_mb: cp.memory_mb,
                replicas: cp.replicas,
                env,
                secrets,
                target_group: Some(format!("tg/{name}")),
                after: [
                    listener,
                    "param/database-url".into(),
                    "secret/admin-api-key".into(),
                ]
                .into_iter()
                .chain(after)
                .collect(),
                restart_on,
            },
        )?;
    }
    for svc in &c.stage.services {
        let image = svc
            .image
            .as_deref()
            .expect("validated: aws services have an image");
        let mut env = svc.env.clone();
        env.insert("PORT".into(), svc.port.to_string());
        let after = if svc.public {
            vec![format!("rule/svc-{}", svc.name)]
        } else {
            Vec::new()
        };
        service(
            c,
            g,
            ServiceSpec {
                name: &svc.name,
                image,
                command: &[],
                port: svc.port,
                cpu: svc.cpu,
                memory_mb: svc.memory_mb,
                replicas: svc.replicas,
                env,
                secrets: super::service_secrets(svc)
                    .into_iter()
                    .map(|(var, name)| (var, c.ssm(&name)))
                    .collect(),
                target_group: svc.public.then(|| format!("tg/svc-{}", svc.name)),
                after,
                restart_on: None,
            },
        )?;
    }
    Ok(())
}

fn runners(c: &Ctx<'_>, g: &mut DesiredGraph) -> Result<(), ResolveError> {
    let r = &c.stage.runner;
    let artifact_url = r
        .artifact_url
        .clone()
        .unwrap_or_else(|| default_artifact_url(&c.bucket, &r.version));
    for n in 1..=c.stage.runners {
        let name = format!("runner-{n}");
        let (zone, ip) = c
            .layout
            .runner_address(n)
            .expect("validated: a runner subnet holds the largest runner count");
        let zone_letter = ["a", "b"][zone];
        let token_parameter = runner_token_parameter(&c.stage.name, &name);
        let mut vars: BTreeMap<&str, String> = BTreeMap::from([
            ("name", name.clone()),
            ("stage", c.stage.name.clone()),
            ("region", c.region.to_string()),
            ("artifact_url", artifact_url.clone()),
            ("token_parameter", token_parameter.clone()),
            ("control_plane_url", format!("https://api.{}", c.domain)),
            ("advertise_url", format!("http://{ip}:{RUNNER_PORT}")),
            ("port", RUNNER_PORT.to_string()),
        ]);
        let user_data = match &r.artifact_sha256 {
            Some(sha) => {
                vars.insert("artifact_sha256", sha.clone());
                Value::Str(template::RUNNER_CLOUD_INIT.render(&vars)?)
            }
            None => Value::Map(BTreeMap::from([
                (
                    "template".to_string(),
                    Value::str(template::RUNNER_CLOUD_INIT.name),
                ),
                (
                    "vars".to_string(),
                    Value::Map(
                        vars.iter()
                            .map(|(k, v)| (k.to_string(), Value::str(v.as_str())))
                            .collect(),
                    ),
                ),
                (
                    "artifact_sha256_from".to_string(),
                    Value::str(artifact_url.as_str()),
                ),
            ])),
        };
        let ami = Value::Map(BTreeMap::from([
            ("name".to_string(), Value::str(r.ami_name.as_str())),
            ("owner".to_string(), Value::str(r.ami_owner.as_str())),
        ]));
        // Runners are stateful: protected, and their AMI and user data only
        // matter when the host is created; `boxctl runner upgrade` rolls the binary.
        g.add(
            Resource::new(format!("runner/{name}"), AWS_INSTANCE)
                .prop("name", c.name(&name))
                .prop("ami", ami)
                .prop("instance_type", r.instance_type.as_str())
                .prop("root_volume_gb", r.root_volume_gb)
                .prop(
                    "subnet_id",
                    Value::reference(&format!("subnet/runners-{zone_letter}"), "id"),
                )
                .prop("private_ip", ip.to_string())
                .prop("security_groups", ref_set(&["sg/runners"], "id"))
                .prop(
                    "instance_profile",
                    Value::reference("profile/runner", "name"),
                )
                .prop("user_data", user_data)
                .prop("termination_protection", true)
                // Minted with the host, stored as a SecureString it reads at boot.
                .prop("token_parameter", token_parameter)
                .dep(&format!("rt/private-{zone_letter}"))
                .protect()
                .ignore_changes(&["ami", "user_data"]),
        )?;
    }
    Ok(())
}

fn outputs(c: &Ctx<'_>, g: &mut DesiredGraph) {
    let domain = c.domain;
    let validation: Vec<Value> = g
        .resources
        .values()
        .filter(|r| r.kind == AWS_CERTIFICATE)
        .map(|r| Value::reference(r.id.as_str(), "validation_records"))
        .collect();
    let o = &mut g.outputs;
    o.insert(
        "api_url".into(),
        Value::str(format!("https://api.{domain}")),
    );
    o.insert(
        "proxy_url".into(),
        Value::str(format!("https://proxy.{domain}")),
    );
    o.insert(
        "ssh_endpoint".into(),
        Value::str(format!("ssh.{domain}:{SSH_PORT}")),
    );
    o.insert("api_lb_dns".into(), Value::reference("lb/api", "dns_name"));
    o.insert(
        "proxy_lb_dns".into(),
        Value::reference("lb/proxy", "dns_name"),
    );
    o.insert("ssh_lb_dns".into(), Value::reference("lb/ssh", "dns_name"));
    o.insert("bucket".into(), Value::reference("bucket/main", "name"));
    o.insert(
        "database_endpoint".into(),
        Value::reference("db/main", "address"),
    );
    o.insert("cluster".into(), Value::reference("cluster/main", "name"));
    o.insert(
        "certificate_validation_records".into(),
        Value::List(validation),
    );
    if c.stage.runners > 0 {
        o.insert(
            "runners".into(),
            Value::Map(
                (1..=c.stage.runners)
                    .map(|n| {
                        (
                            format!("runner-{n}"),
                            Value::reference(&format!("runner/runner-{n}"), "id"),
                        )
                    })
                    .collect(),
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_their_limits_deterministically() {
        assert_eq!(aws_name("boxlite", "prod", "api", 32), "boxlite-prod-api");
        assert_eq!(aws_name("boxlite", "prod", "", 63), "boxlite-prod");
        let long = aws_name(
            "a-very-long-stack-name-indeed",
            "and-a-long-stage",
            "svc-metrics",
            32,
        );
        assert!(long.len() <= 32 && long.len() >= 30, "{long}");
        assert!(!long.contains("--") && !long.starts_with('-') && !long.ends_with('-'));
        assert_eq!(
            long,
            aws_name(
                "a-very-long-stack-name-indeed",
                "and-a-long-stage",
                "svc-metrics",
                32
            )
        );
        assert_ne!(
            long,
            aws_name(
                "a-very-long-stack-name-indeed",
                "and-a-long-stage",
                "svc-metricz",
                32
            )
        );
        assert_eq!(aws_name("a--b", "c", "", 63), "a-b-c");
    }

    #[test]
    fn bucket_names_are_valid_and_distinct_per_region_and_domain() {
        let a = bucket_name("boxlite", "prod", "ap-southeast-1", "boxlite.dev");
        let b = bucket_name("boxlite", "prod", "eu-west-1", "boxlite.dev");
        assert_ne!(a, b);
        assert!(a.starts_with("boxlite-prod-") && a.len() <= 63);
        let long = bucket_name(&"s".repeat(30), &"t".repeat(20), "us-east-1", "x.io");
        assert!(long.len() <= 63, "{long}");
    }

    #[test]
    fn partitions_follow_the_region() {
        assert_eq!(partition("ap-southeast-1"), "aws");
        assert_eq!(partition("cn-north-1"), "aws-cn");
        assert_eq!(partition("us-gov-west-1"), "aws-us-gov");
    }

    #[test]
    fn container_definitions_normalize_what_ecs_adds() {
        let desired = json!([{
            "name": "api", "image": "img", "essential": true,
            "portMappings": [{"containerPort": 8080, "protocol": "tcp"}],
            "environment": [{"name": "B", "value": "2"}, {"name": "A", "value": "1"}],
            "secrets": [],
        }]);
        // What DescribeTaskDefinition returns: defaults filled in, another order.
        let observed = json!([{
            "cpu": 0, "mountPoints": [], "volumesFrom": [], "systemControls": [],
            "environment": [{"value": "1", "name": "A"}, {"name": "B", "value": "2"}],
            "essential": true, "image": "img", "name": "api",
            "portMappings": [{"containerPort": 8080, "hostPort": 8080, "protocol": "tcp"}],
        }]);
        let a = canonical_container_definitions(&desired);
        assert_eq!(a, canonical_container_definitions(&observed));
        assert!(a.contains('\n'), "multi-line, for unified diffs");
        let changed = json!([{"name": "api", "image": "img2", "essential": true}]);
        assert_ne!(a, canonical_container_definitions(&changed));
    }
}
