//! The aws target: a stage's VPC, runners, ECS services, load balancers,
//! database, bucket and parameters, reconciled through the AWS SDK.
//!
//! Identity lives in the world: every resource carries the `boxctl:*` tags
//! (IAM roles and instance profiles also a `/boxlite/<stack>/<stage>/<id>/`
//! path; SSM parameters a marker in their description, since listing does
//! not return tags). Observation is one tag-filtered (or path-scoped),
//! paginated read per resource kind, all kinds at once, so a no-op `diff`
//! costs the same calls for one runner as for fifty (up to page boundaries).
//! Creates pass tags with the create call, so a resource is never untagged,
//! and idempotency tokens derived from stack/stage/id/generation where the
//! API has them.

pub mod acm;
pub mod artifacts;
pub mod client;
pub mod ec2;
pub mod ecs;
pub mod elb;
pub mod errors;
pub mod iam;
pub mod instances;
pub mod logs;
pub mod props;
pub mod rds;
pub mod s3;
pub mod ssm;
pub mod store;
pub mod tags;
pub mod wait;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use stack::{DesiredGraph, Policy, Props as PropMap, Resource, ResourceId, Value, kinds};

use crate::engine::provider::{Inventory, KindSpec, Observed, Provider, ProviderError, StepCtx};
use client::Clients;
use errors::AwsResult;

const fn spec(kind: &'static str, replace_on: &'static [&'static str], order: u32) -> KindSpec {
    KindSpec {
        kind,
        replace_on,
        order,
        create_before_delete: false,
        volatile_outputs: &[],
    }
}

/// Every kind the aws provider manages. `order` sequences deletes of
/// undeclared resources (highest first): what uses a thing goes before it.
pub const KINDS: &[KindSpec] = &[
    spec(kinds::AWS_BUCKET, &["name"], 5),
    spec(kinds::AWS_VPC, &["cidr"], 10),
    spec(kinds::AWS_IAM_ROLE, &["name", "path"], 12),
    spec(kinds::AWS_ECS_CLUSTER, &["name"], 12),
    spec(kinds::AWS_LOG_GROUP, &["name"], 12),
    KindSpec {
        kind: kinds::AWS_CERTIFICATE,
        replace_on: &["domain", "alternative_names", "validation_method"],
        order: 12,
        // The listener moves to the new certificate before the old one goes.
        create_before_delete: true,
        volatile_outputs: &[],
    },
    spec(
        kinds::AWS_SUBNET,
        &["vpc_id", "cidr", "availability_zone"],
        14,
    ),
    spec(kinds::AWS_INTERNET_GATEWAY, &[], 15),
    spec(kinds::AWS_EIP, &[], 16),
    spec(kinds::AWS_SECRET, &["name", "prefix", "bytes"], 18),
    KindSpec {
        kind: kinds::AWS_PARAMETER,
        replace_on: &["name"],
        order: 20,
        create_before_delete: false,
        // Services restart on the digest of what they read at start.
        volatile_outputs: &["value_sha256"],
    },
    spec(kinds::AWS_INSTANCE_PROFILE, &["name", "path"], 24),
    spec(
        kinds::AWS_SECURITY_GROUP,
        &["name", "description", "vpc_id"],
        25,
    ),
    spec(kinds::AWS_ROUTE_TABLE, &["vpc_id"], 28),
    spec(kinds::AWS_NAT_GATEWAY, &["subnet_id", "allocation_id"], 30),
    spec(kinds::AWS_DB_SUBNET_GROUP, &["name"], 35),
    spec(
        kinds::AWS_DB_INSTANCE,
        &[
            "identifier",
            "engine",
            "db_name",
            "master_username",
            "storage_encrypted",
            "subnet_group",
        ],
        40,
    ),
    spec(kinds::AWS_CERTIFICATE_VALIDATION, &["certificate"], 42),
    spec(
        kinds::AWS_TARGET_GROUP,
        &["name", "protocol", "port", "vpc_id", "target_type"],
        44,
    ),
    spec(kinds::AWS_LOAD_BALANCER, &["name", "type", "scheme"], 45),
    spec(kinds::AWS_TASK_DEFINITION, &["family"], 50),
    spec(kinds::AWS_LISTENER, &["load_balancer", "port"], 50),
    spec(kinds::AWS_LISTENER_RULE, &["listener"], 55),
    spec(
        kinds::AWS_ECS_SERVICE,
        &["name", "cluster", "launch_type"],
        60,
    ),
    KindSpec {
        kind: kinds::AWS_INSTANCE,
        replace_on: &[
            "ami",
            "user_data",
            "instance_type",
            "root_volume_gb",
            "subnet_id",
            "private_ip",
            "instance_profile",
        ],
        order: 60,
        create_before_delete: false,
        // Re-tagging a host from its token parameter tells its digest anew.
        volatile_outputs: &["token_sha256"],
    },
];

/// Properties that are reference sets (maps keyed by resource id), per kind.
const REFERENCE_SETS: &[(&str, &str)] = &[
    (kinds::AWS_ROUTE_TABLE, "subnets"),
    (kinds::AWS_INSTANCE, "security_groups"),
    (kinds::AWS_ECS_SERVICE, "subnets"),
    (kinds::AWS_ECS_SERVICE, "security_groups"),
    (kinds::AWS_LOAD_BALANCER, "subnets"),
    (kinds::AWS_LOAD_BALANCER, "security_groups"),
    (kinds::AWS_DB_SUBNET_GROUP, "subnets"),
    (kinds::AWS_DB_INSTANCE, "security_groups"),
];

/// What the provider learnt while preparing the desired graph.
#[derive(Default)]
pub(crate) struct Prepared {
    /// Desired user data of each runner, to recognise unchanged hosts by digest.
    pub user_data: BTreeMap<ResourceId, String>,
    /// Root device name of each AMI looked up.
    pub root_devices: BTreeMap<String, String>,
}

/// The aws provider of one stage.
pub struct AwsProvider {
    pub(crate) stack: String,
    pub(crate) stage: String,
    pub(crate) region: String,
    pub(crate) domain: String,
    pub(crate) bucket: String,
    pub(crate) c: Clients,
    pub(crate) endpoint: Option<String>,
    pub(crate) prepared: Mutex<Prepared>,
    pub(crate) was_prepared: AtomicBool,
}

impl AwsProvider {
    /// The provider of `stack`/`stage` in `region` for `domain`, talking to
    /// `endpoint` (an emulator) when given.
    pub async fn new(
        stack: &str,
        stage: &str,
        region: &str,
        domain: &str,
        endpoint: Option<&str>,
    ) -> AwsProvider {
        AwsProvider {
            stack: stack.to_string(),
            stage: stage.to_string(),
            region: region.to_string(),
            domain: domain.to_string(),
            bucket: stack::resolve::aws::bucket_name(stack, stage, region, domain),
            c: Clients::new(region, endpoint).await,
            endpoint: endpoint.map(str::to_string),
            prepared: Mutex::new(Prepared::default()),
            was_prepared: AtomicBool::new(false),
        }
    }

    /// The account the credentials belong to (one STS call); fails early and
    /// clearly when there are no usable credentials.
    pub async fn account(&self) -> Result<String, ProviderError> {
        let who = self
            .c
            .sts
            .get_caller_identity()
            .send()
            .await
            .or_fail("GetCallerIdentity", "checking the AWS credentials")?;
        Ok(who.account().unwrap_or("unknown").to_string())
    }

    /// Region of the stage.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The stage bucket (lock, journal, artifacts, backups).
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The endpoint override, if any.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The SDK clients.
    pub fn clients(&self) -> &Clients {
        &self.c
    }

    /// The stage's lock and journal store (in the stage bucket).
    pub fn state_store(&self) -> store::S3Store {
        store::S3Store::new(self.c.s3.clone(), &self.bucket)
    }

    /// Create the stage bucket if it does not exist yet, so the deploy lock can
    /// be taken in it; `graph` holds its desired settings. True when created.
    pub async fn ensure_state_bucket(&self, graph: &DesiredGraph) -> Result<bool, ProviderError> {
        let d = graph
            .resources
            .get(&ResourceId::from("bucket/main"))
            .ok_or_else(|| ProviderError::hard("bootstrap", "the graph has no bucket/main"))?;
        s3::ensure(self, d).await
    }

    /// After a successful destroy: delete runner tokens no host took, then
    /// the stage bucket (every version, lock and journal included) unless it
    /// is retained. True when the bucket was deleted.
    pub async fn finish_destroy(&self, graph: &DesiredGraph) -> Result<bool, ProviderError> {
        ssm::sweep_runner_tokens(self).await?;
        let declared = graph
            .resources
            .get(&ResourceId::from("bucket/main"))
            .is_some_and(|r| r.policy.retain);
        let recorded = s3::observe(self).await?.iter().any(|o| o.policy.retain);
        if declared || recorded {
            return Ok(false);
        }
        s3::remove(self).await?;
        Ok(true)
    }

    /// Delete the token of `runner` when no host of it exists (its launch
    /// failed after minting). True when there was such a token.
    pub async fn reclaim_runner_token(&self, runner: &str) -> Result<bool, ProviderError> {
        let id = ResourceId::new(format!("runner/{runner}"));
        let name = stack::resolve::aws::runner_token_parameter(&self.stage, runner);
        if ssm::runner_token_digest(self, &id, &name).await?.is_none() {
            return Ok(false);
        }
        ssm::delete_named(self, &id, &name).await?;
        Ok(true)
    }

    /// The identity tags for a resource being created or tagged.
    pub(crate) fn tags_for(
        &self,
        id: &ResourceId,
        policy: &Policy,
        generation: u64,
    ) -> Vec<(String, String)> {
        tags::identity_tags(&self.stack, &self.stage, id, policy, generation)
    }

    /// The identity in `t`, if the resource belongs to this stage.
    pub(crate) fn identity(&self, t: &BTreeMap<String, String>) -> Option<tags::Identity> {
        tags::identity(t, &self.stack, &self.stage)
    }

    /// An observation from an identity, kind, properties and outputs.
    pub(crate) fn observed(
        &self,
        ident: tags::Identity,
        kind: &str,
        props: PropMap,
        outputs: BTreeMap<String, Value>,
        handle: Option<String>,
    ) -> Observed {
        Observed {
            id: ident.id,
            kind: kind.to_string(),
            props,
            outputs,
            policy: ident.policy,
            generation: ident.generation,
            handle,
        }
    }

    /// What a create or update leaves: the desired properties, with outputs.
    pub(crate) fn after(
        &self,
        ctx: &StepCtx,
        d: &Resource,
        outputs: BTreeMap<String, Value>,
        handle: Option<String>,
    ) -> Observed {
        Observed {
            id: d.id.clone(),
            kind: d.kind.clone(),
            props: d.props.clone(),
            outputs,
            policy: d.policy.clone(),
            generation: ctx.generation,
            handle,
        }
    }

    /// Put every reference set of `inv` in terms of resource ids.
    fn rekey(observed: &mut [Observed]) {
        let mut index: BTreeMap<String, ResourceId> = BTreeMap::new();
        for o in observed.iter() {
            if (o.kind == kinds::AWS_SUBNET || o.kind == kinds::AWS_SECURITY_GROUP)
                && let Some(Value::Str(aws_id)) = o.outputs.get("id")
            {
                index.entry(aws_id.clone()).or_insert_with(|| o.id.clone());
            }
        }
        for o in observed.iter_mut() {
            for (_, key) in REFERENCE_SETS.iter().filter(|(k, _)| *k == o.kind) {
                if let Some(Value::Map(m)) = o.props.get_mut(*key) {
                    let rekeyed = std::mem::take(m)
                        .into_values()
                        .map(|v| {
                            let key = v.as_str().and_then(|s| index.get(s)).map_or_else(
                                || v.as_str().unwrap_or_default().to_string(),
                                ResourceId::to_string,
                            );
                            (key, v)
                        })
                        .collect();
                    *m = rekeyed;
                }
            }
        }
    }

    fn family(kind: &str) -> Result<&'static str, ProviderError> {
        Ok(match kind {
            kinds::AWS_INSTANCE => "instances",
            k if k.starts_with("aws.ec2.") => "ec2",
            k if k.starts_with("aws.iam.") => "iam",
            k if k.starts_with("aws.ecs.") => "ecs",
            k if k.starts_with("aws.elb.") => "elb",
            k if k.starts_with("aws.acm.") => "acm",
            k if k.starts_with("aws.rds.") => "rds",
            k if k.starts_with("aws.s3.") => "s3",
            k if k.starts_with("aws.ssm.") => "ssm",
            k if k.starts_with("aws.logs.") => "logs",
            other => {
                return Err(ProviderError::hard(
                    "dispatch",
                    format!("the aws provider has no kind {other}"),
                ));
            }
        })
    }
}

impl Provider for AwsProvider {
    fn kinds(&self) -> &[KindSpec] {
        KINDS
    }

    async fn prepare(&self, graph: &mut DesiredGraph) -> Result<(), ProviderError> {
        instances::prepare(self, graph).await?;
        self.was_prepared.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn observe(&self) -> Result<Inventory, ProviderError> {
        let (net, inst, iam, ecs, elb, rds, s3, ssm, acm, logs) = futures::try_join!(
            ec2::observe(self),
            instances::observe(self),
            iam::observe(self),
            ecs::observe(self),
            elb::observe(self),
            rds::observe(self),
            s3::observe(self),
            ssm::observe(self),
            acm::observe(self),
            logs::observe(self),
        )?;
        let mut all: Vec<Observed> = [net, inst, iam, ecs, elb, rds, s3, ssm, acm, logs]
            .into_iter()
            .flatten()
            .collect();
        // The newest generation of an id is the resource; older copies are duplicates.
        all.sort_by(|a, b| a.id.cmp(&b.id).then(b.generation.cmp(&a.generation)));
        Self::rekey(&mut all);
        let mut inv = Inventory::default();
        for o in all {
            inv.add(o);
        }
        Ok(inv)
    }

    async fn create(&self, ctx: &StepCtx, d: &Resource) -> Result<Observed, ProviderError> {
        match Self::family(&d.kind)? {
            "instances" => instances::create(self, ctx, d).await,
            "ec2" => ec2::create(self, ctx, d).await,
            "iam" => iam::create(self, ctx, d).await,
            "ecs" => ecs::create(self, ctx, d).await,
            "elb" => elb::create(self, ctx, d).await,
            "acm" => acm::create(self, ctx, d).await,
            "rds" => rds::create(self, ctx, d).await,
            "s3" => s3::create(self, ctx, d).await,
            "ssm" => ssm::create(self, ctx, d).await,
            _ => logs::create(self, ctx, d).await,
        }
    }

    async fn update(
        &self,
        ctx: &StepCtx,
        d: &Resource,
        current: &Observed,
        changed: &[String],
    ) -> Result<Observed, ProviderError> {
        match Self::family(&d.kind)? {
            "instances" => instances::update(self, ctx, d, current, changed).await,
            "ec2" => ec2::update(self, ctx, d, current, changed).await,
            "iam" => iam::update(self, ctx, d, current, changed).await,
            "ecs" => ecs::update(self, ctx, d, current, changed).await,
            "elb" => elb::update(self, ctx, d, current, changed).await,
            "acm" => acm::update(self, ctx, d, current, changed).await,
            "rds" => rds::update(self, ctx, d, current, changed).await,
            "s3" => s3::update(self, ctx, d, current, changed).await,
            "ssm" => ssm::update(self, ctx, d, current, changed).await,
            _ => logs::update(self, ctx, d, current, changed).await,
        }
    }

    async fn delete(&self, ctx: &StepCtx, current: &Observed) -> Result<(), ProviderError> {
        match Self::family(&current.kind)? {
            "instances" => instances::delete(self, ctx, current).await,
            "ec2" => ec2::delete(self, ctx, current).await,
            "iam" => iam::delete(self, ctx, current).await,
            "ecs" => ecs::delete(self, ctx, current).await,
            "elb" => elb::delete(self, ctx, current).await,
            "acm" => acm::delete(self, ctx, current).await,
            "rds" => rds::delete(self, ctx, current).await,
            "s3" => s3::delete(self, ctx, current).await,
            "ssm" => ssm::delete(self, ctx, current).await,
            _ => logs::delete(self, ctx, current).await,
        }
    }
}

/// An idempotency token for an AWS create call: the engine's token (stack,
/// stage, id, generation), then `salt` when a stale token must be stepped
/// over, shortened to what the API accepts (`max` characters, letters and
/// digits only when `alnum`). The same inputs always give the same token, so
/// a rerun after a crash repeats the same request.
///
/// AWS remembers a token for a while after its resource is gone (an hour for
/// ACM; EC2 returns the terminated instance): a create whose token answers
/// with a dead resource tries the next salt, still deterministically.
pub(crate) fn token(ctx: &StepCtx, id: &ResourceId, salt: u32, max: usize, alnum: bool) -> String {
    let base = ctx.idempotency_token(id);
    let salted = if salt == 0 {
        base
    } else {
        format!("{base}-{salt}")
    };
    let cleaned: String = if alnum {
        let digest = stack::sha256_hex(&salted);
        digest.chars().filter(char::is_ascii_alphanumeric).collect()
    } else if salted.len() > max {
        format!(
            "boxctl-{}",
            &stack::sha256_hex(&salted)[..max.saturating_sub(7)]
        )
    } else {
        salted
    };
    cleaned.chars().take(max).collect()
}

/// How many stale tokens a create steps over before giving up.
pub(crate) const MAX_SALT: u32 = 5;

/// The text of an output, or an error naming the resource.
pub(crate) fn output<'a>(o: &'a Observed, key: &str) -> Result<&'a str, ProviderError> {
    o.outputs.get(key).and_then(Value::as_str).ok_or_else(|| {
        ProviderError::hard(
            "read outputs",
            format!("{} ({}) was observed without its `{key}`", o.id, o.kind),
        )
    })
}

/// One output map entry.
pub(crate) fn out(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_the_resolver_emits_has_a_spec() {
        let text = r#"
name = "boxlite"
[stages.prod]
target = "aws"
region = "eu-west-1"
domain = "example.com"
production = true
runners = 2
[stages.prod.control_plane]
image = "registry.example.com/cp:1"
[[stages.prod.services]]
name = "docs"
image = "registry.example.com/docs:1"
port = 9000
public = true
"#;
        let g = stack::load(text).unwrap().stack.resolve("prod").unwrap();
        for r in g.resources.values() {
            assert!(
                KINDS.iter().any(|k| k.kind == r.kind),
                "{} has no spec",
                r.kind
            );
            AwsProvider::family(&r.kind).unwrap();
        }
        // Deletes run highest order first: users before what they use.
        let order = |k: &str| KINDS.iter().find(|s| s.kind == k).unwrap().order;
        assert!(order(kinds::AWS_INSTANCE) > order(kinds::AWS_SECURITY_GROUP));
        assert!(order(kinds::AWS_INSTANCE) > order(kinds::AWS_INSTANCE_PROFILE));
        assert!(order(kinds::AWS_INSTANCE_PROFILE) > order(kinds::AWS_IAM_ROLE));
        assert!(order(kinds::AWS_NAT_GATEWAY) > order(kinds::AWS_EIP));
        assert!(order(kinds::AWS_EIP) > order(kinds::AWS_INTERNET_GATEWAY));
        assert!(order(kinds::AWS_LISTENER) > order(kinds::AWS_TARGET_GROUP));
        assert!(order(kinds::AWS_LISTENER) > order(kinds::AWS_CERTIFICATE));
        assert!(order(kinds::AWS_DB_INSTANCE) > order(kinds::AWS_DB_SUBNET_GROUP));
        assert!(order(kinds::AWS_ECS_SERVICE) > order(kinds::AWS_ECS_CLUSTER));
        assert!(
            KINDS
                .iter()
                .all(|k| k.order > order(kinds::AWS_BUCKET) || k.kind == kinds::AWS_BUCKET)
        );
    }

    #[test]
    fn tokens_are_deterministic_bounded_and_salted() {
        let ctx = StepCtx {
            stack: "boxlite".into(),
            stage: "prod".into(),
            generation: 0,
            attempt: 1,
        };
        let id = ResourceId::from("runner/runner-1");
        let t = token(&ctx, &id, 0, 64, false);
        assert_eq!(
            t,
            token(
                &StepCtx {
                    attempt: 3,
                    ..ctx.clone()
                },
                &id,
                0,
                64,
                false
            )
        );
        assert_ne!(t, token(&ctx, &id, 1, 64, false));
        assert_ne!(
            t,
            token(&ctx, &ResourceId::from("runner/runner-2"), 0, 64, false)
        );
        assert_ne!(
            t,
            token(
                &StepCtx {
                    generation: 1,
                    ..ctx.clone()
                },
                &id,
                0,
                64,
                false
            )
        );
        let acm = token(&ctx, &id, 0, 32, true);
        assert_eq!(acm.len(), 32);
        assert!(acm.chars().all(|c| c.is_ascii_alphanumeric()));
        let ecs = token(&ctx, &id, 2, 36, false);
        assert!(ecs.len() <= 36, "{ecs}");
        assert_eq!(ecs, token(&ctx, &id, 2, 36, false));
    }

    #[test]
    fn reference_sets_are_rekeyed_by_resource_id() {
        let mut subnet = Observed::new("subnet/public-a".into(), kinds::AWS_SUBNET, PropMap::new());
        subnet.outputs.insert("id".into(), Value::str("subnet-1"));
        let mut lb = Observed::new("lb/api".into(), kinds::AWS_LOAD_BALANCER, PropMap::new());
        lb.props.insert(
            "subnets".into(),
            props::raw_id_set(["subnet-1", "subnet-foreign"]),
        );
        let mut all = vec![subnet, lb];
        AwsProvider::rekey(&mut all);
        let m = all[1].props["subnets"].as_map().unwrap();
        assert_eq!(m["subnet/public-a"], Value::str("subnet-1"));
        assert_eq!(m["subnet-foreign"], Value::str("subnet-foreign"));
    }
}
