//! Shared by the aws tests: a reset moto server (one per test binary, taken
//! in turns), a counting/fault-injecting proxy in front of it, the real
//! `boxctl` binary pointed at the proxy, and an inventory of moto counted by
//! listing its resources directly (never by asking boxctl).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use deployer::providers::aws::client::Clients;
use stack::kinds;
use testkit::aws_proxy::AwsProxy;
use testkit::moto::{Moto, REGION};

/// A prod-like stage: production, three runners, a public and a private extra service.
pub const STACK: &str = r#"
name = "boxlite"

[stages.prod]
target = "aws"
region = "ap-southeast-1"
domain = "boxlite.example.com"
production = true
runners = 3

[stages.prod.runner]
artifact_url = "https://downloads.example.com/boxlite-runner-0.1.0.tar.gz"
artifact_sha256 = "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"

[stages.prod.control_plane]
image = "registry.example.com/boxlite/control-plane:0.1.0"

[stages.prod.oidc]
issuer = "https://auth.example.com/"
audience = "boxlite-api"

[[stages.prod.services]]
name = "docs"
image = "registry.example.com/docs:1"
port = 9000
public = true
health_path = "/healthz"

[[stages.prod.services]]
name = "worker"
image = "registry.example.com/worker:1"
port = 9100

[stages.staging]
target = "aws"
region = "ap-southeast-1"
domain = "staging.example.com"
runners = 1

[stages.staging.runner]
artifact_url = "https://downloads.example.com/boxlite-runner-0.1.0.tar.gz"
artifact_sha256 = "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"

[stages.staging.control_plane]
image = "registry.example.com/boxlite/control-plane:0.1.0"
"#;

/// The boxctl binary under test: cargo's, or `BOXCTL_TEST_BIN` (a copy
/// taken right after building, when other builds share the target directory).
pub fn boxctl_bin() -> PathBuf {
    std::env::var_os("BOXCTL_TEST_BIN")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_boxctl")),
            PathBuf::from,
        )
}

/// One test's world: moto (reset, held for the test), a proxy, a directory.
pub struct Env {
    _turn: MutexGuard<'static, ()>,
    /// The moto server.
    pub moto: &'static Moto,
    /// The proxy boxctl talks through.
    pub proxy: AwsProxy,
    /// Scratch directory (stack.toml, local state).
    pub dir: tempfile::TempDir,
}

/// What a boxctl run printed and how it ended.
pub struct Run {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Panic with the output unless the exit code is `code`.
    pub fn expect(self, code: i32, what: &str) -> Run {
        assert_eq!(
            self.code,
            Some(code),
            "{what}: exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Both streams.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl Env {
    /// A fresh world with [`STACK`] written as stack.toml.
    pub fn new() -> Env {
        let (turn, moto) = Moto::exclusive();
        let proxy = AwsProxy::start(moto.url());
        let env = Env {
            _turn: turn,
            moto,
            proxy,
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        env.write_stack(STACK);
        env
    }

    /// Replace stack.toml.
    pub fn write_stack(&self, text: &str) {
        std::fs::write(self.stack_path(), text).expect("write stack.toml");
    }

    /// Path of stack.toml.
    pub fn stack_path(&self) -> PathBuf {
        self.dir.path().join("stack.toml")
    }

    /// A `boxctl` command talking to AWS through `endpoint`.
    pub fn boxctl_via(&self, endpoint: &str, args: &[&str]) -> Command {
        let mut c = Command::new(boxctl_bin());
        c.arg("--stack")
            .arg(self.stack_path())
            .arg("--endpoint-url")
            .arg(endpoint)
            .arg("--color")
            .arg("never")
            .args(args)
            .current_dir(self.dir.path())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("BOXCTL_AWS_ENDPOINT_URL")
            .env_remove("BOXCTL_STAGE")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("BOXCTL_STATE_DIR", self.dir.path().join("state"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// A `boxctl` command talking through the proxy.
    pub fn boxctl(&self, args: &[&str]) -> Command {
        self.boxctl_via(self.proxy.url(), args)
    }

    /// Run boxctl to the end (at most 5 minutes).
    pub fn run(&self, args: &[&str]) -> Run {
        wait(
            self.boxctl(args).spawn().expect("spawn boxctl"),
            Duration::from_secs(300),
        )
    }

    /// A tokio runtime for SDK calls made by the test itself.
    pub fn rt(&self) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// SDK clients talking to moto directly (not through the proxy).
    pub fn clients(&self) -> Clients {
        self.rt().block_on(clients(self.moto.url()))
    }

    /// The value of an SSM parameter in moto (decrypted).
    pub fn ssm_value(&self, name: &str) -> String {
        let c = self.clients();
        let r = self
            .rt()
            .block_on(
                c.ssm
                    .get_parameter()
                    .name(name)
                    .with_decryption(true)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        r.parameter().unwrap().value().unwrap().to_string()
    }

    /// The runner registry of `stage`: runner name → SHA-256 of its token.
    pub fn registry(&self, stage: &str) -> BTreeMap<String, String> {
        let text = self.ssm_value(&format!("/boxlite/{stage}/config/runner-token-hashes"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("registry {text}: {e}"))
    }

    /// Refuse the next runner launch as AWS refuses a missing permission.
    pub fn refuse_next_launch(&self) {
        self.proxy.answer_next(
            "RunInstances",
            1,
            403,
            "<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>You are not authorized to perform this operation.</Message></Error></Errors><RequestID>r-1</RequestID></Response>",
        );
    }

    /// Count what exists in moto, per kind.
    pub fn inventory(&self) -> BTreeMap<&'static str, usize> {
        let c = self.clients();
        self.rt().block_on(inventory(&c))
    }
}

/// The test's own SDK clients, with static test credentials, talking to `endpoint`.
pub async fn clients(endpoint: &str) -> Clients {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_types::region::Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .load()
        .await;
    let s3 = aws_sdk_s3::config::Builder::from(&conf)
        .force_path_style(true)
        .build();
    Clients {
        ec2: aws_sdk_ec2::Client::new(&conf),
        ecs: aws_sdk_ecs::Client::new(&conf),
        elb: aws_sdk_elasticloadbalancingv2::Client::new(&conf),
        ssm: aws_sdk_ssm::Client::new(&conf),
        s3: aws_sdk_s3::Client::from_conf(s3),
        rds: aws_sdk_rds::Client::new(&conf),
        acm: aws_sdk_acm::Client::new(&conf),
        iam: aws_sdk_iam::Client::new(&conf),
        sts: aws_sdk_sts::Client::new(&conf),
        logs: aws_sdk_cloudwatchlogs::Client::new(&conf),
    }
}

/// Wait for a child, killing it after `timeout`; collect its output.
pub fn wait(mut child: Child, timeout: Duration) -> Run {
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for boxctl") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = e.join().unwrap_or_default();
            panic!("boxctl did not finish within {timeout:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
    }
}

/// Exit output of a child that was started by hand.
pub fn finish(child: Child) -> Output {
    child.wait_with_output().expect("wait for boxctl")
}

/// What a resolved stage should have in the world, per kind (certificate
/// validations are not things in the world).
pub fn expected(stage: &str) -> BTreeMap<&'static str, usize> {
    let g = stack::load(STACK).unwrap().stack.resolve(stage).unwrap();
    expected_of(&g)
}

/// Expected world of a graph.
pub fn expected_of(g: &stack::DesiredGraph) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for r in g.resources.values() {
        // Validations are not things; DNS records live in Cloudflare.
        if r.kind == kinds::AWS_CERTIFICATE_VALIDATION || r.kind == kinds::CLOUDFLARE_DNS_RECORD {
            continue;
        }
        let k: &'static str = KIND_NAMES
            .iter()
            .find(|k| **k == r.kind)
            .unwrap_or_else(|| panic!("unknown kind {}", r.kind));
        *m.entry(k).or_insert(0) += 1;
        // Each runner host owns its token parameter.
        if r.kind == kinds::AWS_INSTANCE {
            *m.entry(RUNNER_TOKEN).or_insert(0) += 1;
        }
    }
    m
}

/// What the inventory calls a runner token parameter (not a resource of its own).
pub const RUNNER_TOKEN: &str = "runner token parameter";

const KIND_NAMES: &[&str] = &[
    kinds::AWS_VPC,
    kinds::AWS_SUBNET,
    kinds::AWS_INTERNET_GATEWAY,
    kinds::AWS_EIP,
    kinds::AWS_NAT_GATEWAY,
    kinds::AWS_ROUTE_TABLE,
    kinds::AWS_SECURITY_GROUP,
    kinds::AWS_INSTANCE,
    kinds::AWS_IAM_ROLE,
    kinds::AWS_INSTANCE_PROFILE,
    kinds::AWS_ECS_CLUSTER,
    kinds::AWS_TASK_DEFINITION,
    kinds::AWS_ECS_SERVICE,
    kinds::AWS_LOG_GROUP,
    kinds::AWS_LOAD_BALANCER,
    kinds::AWS_TARGET_GROUP,
    kinds::AWS_LISTENER,
    kinds::AWS_LISTENER_RULE,
    kinds::AWS_CERTIFICATE,
    kinds::AWS_DB_SUBNET_GROUP,
    kinds::AWS_DB_INSTANCE,
    kinds::AWS_BUCKET,
    kinds::AWS_PARAMETER,
    kinds::AWS_SECRET,
];

/// Everything in moto that is not moto's own default, counted per kind by
/// listing each service (no tags or boxctl involved).
pub async fn inventory(c: &Clients) -> BTreeMap<&'static str, usize> {
    let mut m: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut add = |k: &'static str, n: usize| {
        if n > 0 {
            *m.entry(k).or_insert(0) += n;
        }
    };
    let vpcs = c.ec2.describe_vpcs().send().await.unwrap();
    let ours: Vec<String> = vpcs
        .vpcs()
        .iter()
        .filter(|v| v.is_default() != Some(true))
        .filter_map(|v| v.vpc_id().map(str::to_string))
        .collect();
    add(kinds::AWS_VPC, ours.len());
    let in_ours = |v: Option<&str>| v.is_some_and(|v| ours.iter().any(|o| o == v));
    let subnets = c.ec2.describe_subnets().send().await.unwrap();
    add(
        kinds::AWS_SUBNET,
        subnets
            .subnets()
            .iter()
            .filter(|s| in_ours(s.vpc_id()))
            .count(),
    );
    let igws = c.ec2.describe_internet_gateways().send().await.unwrap();
    add(kinds::AWS_INTERNET_GATEWAY, igws.internet_gateways().len());
    let eips = c.ec2.describe_addresses().send().await.unwrap();
    add(kinds::AWS_EIP, eips.addresses().len());
    let nats = c.ec2.describe_nat_gateways().send().await.unwrap();
    add(
        kinds::AWS_NAT_GATEWAY,
        nats.nat_gateways()
            .iter()
            .filter(|n| {
                !matches!(
                    n.state().map(|s| s.as_str()),
                    Some("deleted" | "deleting" | "failed")
                )
            })
            .count(),
    );
    let rts = c.ec2.describe_route_tables().send().await.unwrap();
    add(
        kinds::AWS_ROUTE_TABLE,
        rts.route_tables()
            .iter()
            .filter(|t| {
                in_ours(t.vpc_id()) && !t.associations().iter().any(|a| a.main() == Some(true))
            })
            .count(),
    );
    let sgs = c.ec2.describe_security_groups().send().await.unwrap();
    add(
        kinds::AWS_SECURITY_GROUP,
        sgs.security_groups()
            .iter()
            .filter(|g| in_ours(g.vpc_id()) && g.group_name() != Some("default"))
            .count(),
    );
    let res = c.ec2.describe_instances().send().await.unwrap();
    add(
        kinds::AWS_INSTANCE,
        res.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| {
                !matches!(
                    i.state().and_then(|s| s.name()).map(|n| n.as_str()),
                    Some("terminated" | "shutting-down")
                )
            })
            .count(),
    );
    let roles = c
        .iam
        .list_roles()
        .path_prefix("/boxlite/")
        .send()
        .await
        .unwrap();
    add(kinds::AWS_IAM_ROLE, roles.roles().len());
    let profiles = c
        .iam
        .list_instance_profiles()
        .path_prefix("/boxlite/")
        .send()
        .await
        .unwrap();
    add(
        kinds::AWS_INSTANCE_PROFILE,
        profiles.instance_profiles().len(),
    );
    let clusters = c.ecs.list_clusters().send().await.unwrap();
    if !clusters.cluster_arns().is_empty() {
        let d = c
            .ecs
            .describe_clusters()
            .set_clusters(Some(clusters.cluster_arns().to_vec()))
            .send()
            .await
            .unwrap();
        add(
            kinds::AWS_ECS_CLUSTER,
            d.clusters()
                .iter()
                .filter(|c| c.status() == Some("ACTIVE"))
                .count(),
        );
    }
    let tds = c
        .ecs
        .list_task_definitions()
        .status(aws_sdk_ecs::types::TaskDefinitionStatus::Active)
        .send()
        .await
        .unwrap();
    add(kinds::AWS_TASK_DEFINITION, tds.task_definition_arns().len());
    for cluster in clusters.cluster_arns() {
        let s = c.ecs.list_services().cluster(cluster).send().await.unwrap();
        if s.service_arns().is_empty() {
            continue;
        }
        let d = c
            .ecs
            .describe_services()
            .cluster(cluster)
            .set_services(Some(s.service_arns().to_vec()))
            .send()
            .await
            .unwrap();
        add(
            kinds::AWS_ECS_SERVICE,
            d.services()
                .iter()
                .filter(|s| s.status() == Some("ACTIVE"))
                .count(),
        );
    }
    let groups = c.logs.describe_log_groups().send().await.unwrap();
    add(kinds::AWS_LOG_GROUP, groups.log_groups().len());
    let lbs = c.elb.describe_load_balancers().send().await.unwrap();
    add(kinds::AWS_LOAD_BALANCER, lbs.load_balancers().len());
    for lb in lbs.load_balancers() {
        let ls = c
            .elb
            .describe_listeners()
            .load_balancer_arn(lb.load_balancer_arn().unwrap())
            .send()
            .await
            .unwrap();
        add(kinds::AWS_LISTENER, ls.listeners().len());
        for l in ls.listeners() {
            let rules = c
                .elb
                .describe_rules()
                .listener_arn(l.listener_arn().unwrap())
                .send()
                .await
                .unwrap();
            add(
                kinds::AWS_LISTENER_RULE,
                rules
                    .rules()
                    .iter()
                    .filter(|r| r.is_default() != Some(true))
                    .count(),
            );
        }
    }
    let tgs = c.elb.describe_target_groups().send().await.unwrap();
    add(kinds::AWS_TARGET_GROUP, tgs.target_groups().len());
    let certs = c.acm.list_certificates().send().await.unwrap();
    add(
        kinds::AWS_CERTIFICATE,
        certs.certificate_summary_list().len(),
    );
    let dbs = c.rds.describe_db_instances().send().await.unwrap();
    add(kinds::AWS_DB_INSTANCE, dbs.db_instances().len());
    let sng = c.rds.describe_db_subnet_groups().send().await.unwrap();
    add(kinds::AWS_DB_SUBNET_GROUP, sng.db_subnet_groups().len());
    let buckets = c.s3.list_buckets().send().await.unwrap();
    add(kinds::AWS_BUCKET, buckets.buckets().len());
    let params = c
        .ssm
        .describe_parameters()
        .max_results(50)
        .into_paginator()
        .send()
        .try_collect()
        .await
        .unwrap();
    for p in params.iter().flat_map(|p| p.parameters()) {
        let kind = if p.name().unwrap_or_default().contains("/runner-tokens/") {
            RUNNER_TOKEN
        } else if p.r#type() == Some(&aws_sdk_ssm::types::ParameterType::SecureString) {
            kinds::AWS_SECRET
        } else {
            kinds::AWS_PARAMETER
        };
        add(kind, 1);
    }
    m
}

/// Every secret value of the stage in moto (runner tokens, admin key, database password).
pub fn secret_values(env: &Env) -> Vec<String> {
    let c = env.clients();
    env.rt().block_on(async {
        let pages = c
            .ssm
            .get_parameters_by_path()
            .path("/boxlite/")
            .recursive(true)
            .with_decryption(true)
            .into_paginator()
            .send()
            .try_collect()
            .await
            .unwrap();
        pages
            .iter()
            .flat_map(|p| p.parameters())
            .filter(|p| p.r#type() == Some(&aws_sdk_ssm::types::ParameterType::SecureString))
            .filter_map(|p| p.value().map(str::to_string))
            .collect()
    })
}

/// Ids of the runner instances, by `boxctl:id` tag.
pub fn runner_instances(env: &Env) -> BTreeMap<String, String> {
    let c = env.clients();
    env.rt().block_on(async {
        let r = c.ec2.describe_instances().send().await.unwrap();
        r.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated"))
            .filter_map(|i| {
                let id = i
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some(stack::tags::ID))?
                    .value()?
                    .to_string();
                Some((id, i.instance_id()?.to_string()))
            })
            .collect()
    })
}
