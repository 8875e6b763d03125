//! ECS on Fargate: the cluster, task definitions and services.
//!
//! A task definition resource is a family; its observed state is the latest
//! ACTIVE revision, compared by content (canonical container definitions) so
//! an unchanged stack registers nothing. Each revision carries the digest of
//! its content in a tag, and a service is up to date when the revision it
//! runs carries the digest the graph asks for. Deploy does not wait for
//! services to settle: ECS rolls them with its circuit breaker (and rolls
//! back a failing deployment) on its own.

use std::collections::BTreeMap;

use aws_sdk_ecs::types::{
    AssignPublicIp, AwsVpcConfiguration, ClusterField, ClusterSetting, ClusterSettingName,
    Compatibility, ContainerDefinition, DeploymentCircuitBreaker, DeploymentConfiguration,
    KeyValuePair, LaunchType, LoadBalancer, LogConfiguration, LogDriver, NetworkConfiguration,
    NetworkMode, PortMapping, PropagateTags, Secret, ServiceField, Tag, TaskDefinitionField,
    TaskDefinitionStatus, TransportProtocol,
};
use serde_json::json;
use stack::resolve::aws::canonical_container_definitions;
use stack::{Props as PropMap, Resource, ResourceId, Value, kinds};

use super::errors::AwsResult;
use super::props::{Props, raw_id_set};
use super::{AwsProvider, out, output, tags};
use crate::engine::provider::{Observed, ProviderError, StepCtx};

fn ecs_tags(p: &AwsProvider, ctx: &StepCtx, d: &Resource) -> Vec<Tag> {
    p.tags_for(&d.id, &d.policy, ctx.generation)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// A service's tags: identity, and what it was last restarted for.
fn service_tags(p: &AwsProvider, ctx: &StepCtx, d: &Resource, pr: &Props<'_>) -> Vec<Tag> {
    let mut t = ecs_tags(p, ctx, d);
    if let Some(r) = pr.opt_str("restart_on") {
        t.push(Tag::builder().key(tags::RESTART_ON).value(r).build());
    }
    t
}

fn tag_map(t: &[Tag]) -> BTreeMap<String, String> {
    tags::to_map(
        t.iter()
            .filter_map(|t| Some((t.key()?, t.value().unwrap_or("")))),
    )
}

/// `<family>` of `arn:…:task-definition/<family>:<revision>`.
fn family_of(arn: &str) -> &str {
    arn.rsplit('/')
        .next()
        .and_then(|s| s.rsplit_once(':'))
        .map_or(arn, |(f, _)| f)
}

/// Container definitions as returned by ECS, in canonical text.
fn canonical(defs: &[ContainerDefinition]) -> String {
    let v: Vec<serde_json::Value> = defs
        .iter()
        .map(|c| {
            json!({
                "name": c.name(),
                "image": c.image(),
                "essential": c.essential(),
                "command": c.command(),
                "entryPoint": c.entry_point(),
                "portMappings": c.port_mappings().iter().map(|p| json!({
                    "containerPort": p.container_port(),
                    "protocol": p.protocol().map(|p| p.as_str()),
                })).collect::<Vec<_>>(),
                "environment": c.environment().iter().map(|e| json!({"name": e.name(), "value": e.value()})).collect::<Vec<_>>(),
                "secrets": c.secrets().iter().map(|s| json!({"name": s.name(), "valueFrom": s.value_from()})).collect::<Vec<_>>(),
                "logConfiguration": c.log_configuration().map(|l| json!({
                    "logDriver": l.log_driver().as_str(),
                    "options": l.options().cloned().unwrap_or_default().into_iter().collect::<BTreeMap<_, _>>(),
                })),
            })
        })
        .collect();
    canonical_container_definitions(&serde_json::Value::Array(v))
}

/// The SDK's container definitions from their canonical JSON text.
fn container_definitions(
    id: &ResourceId,
    text: &str,
) -> Result<Vec<ContainerDefinition>, ProviderError> {
    let bad = |why: String| {
        ProviderError::hard(
            "RegisterTaskDefinition",
            format!("{id}: container definitions: {why}"),
        )
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let strs = |x: Option<&serde_json::Value>| -> Vec<String> {
        x.and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for c in v.as_array().ok_or_else(|| bad("not a list".into()))? {
        let s = |k: &str| c.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let mut b = ContainerDefinition::builder()
            .set_name(s("name"))
            .set_image(s("image"))
            .set_essential(c.get("essential").and_then(serde_json::Value::as_bool))
            .set_command(Some(strs(c.get("command"))).filter(|v| !v.is_empty()))
            .set_entry_point(Some(strs(c.get("entryPoint"))).filter(|v| !v.is_empty()));
        for pm in c
            .get("portMappings")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
        {
            let port = pm
                .get("containerPort")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(0);
            b = b.port_mappings(
                PortMapping::builder()
                    .container_port(i32::try_from(port).map_err(|_| bad(format!("port {port}")))?)
                    .protocol(TransportProtocol::from(
                        pm.get("protocol").and_then(|x| x.as_str()).unwrap_or("tcp"),
                    ))
                    .build(),
            );
        }
        for e in c
            .get("environment")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
        {
            b = b.environment(
                KeyValuePair::builder()
                    .set_name(e.get("name").and_then(|x| x.as_str()).map(str::to_string))
                    .set_value(e.get("value").and_then(|x| x.as_str()).map(str::to_string))
                    .build(),
            );
        }
        for e in c
            .get("secrets")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
        {
            b = b.secrets(
                Secret::builder()
                    .set_name(e.get("name").and_then(|x| x.as_str()).map(str::to_string))
                    .set_value_from(
                        e.get("valueFrom")
                            .and_then(|x| x.as_str())
                            .map(str::to_string),
                    )
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            );
        }
        if let Some(l) = c.get("logConfiguration") {
            let options = l.get("options").and_then(|o| o.as_object()).map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            });
            b = b.log_configuration(
                LogConfiguration::builder()
                    .log_driver(LogDriver::from(
                        l.get("logDriver")
                            .and_then(|x| x.as_str())
                            .unwrap_or("awslogs"),
                    ))
                    .set_options(options)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            );
        }
        out.push(b.build());
    }
    Ok(out)
}

/// The cluster, task definition families and services of the stage.
pub async fn observe(p: &AwsProvider) -> Result<Vec<Observed>, ProviderError> {
    let ecs = &p.c.ecs;
    let family_prefix = format!(
        "{}-",
        stack::resolve::aws::aws_name(&p.stack, &p.stage, "", 255)
    );
    let (cluster_arns, families) = futures::try_join!(
        async {
            ecs.list_clusters()
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("ListClusters", "observing ECS clusters")
        },
        async {
            ecs.list_task_definition_families()
                .family_prefix(&family_prefix)
                .status(aws_sdk_ecs::types::TaskDefinitionFamilyStatus::Active)
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("ListTaskDefinitionFamilies", "observing task definitions")
        },
    )?;
    let mut all = Vec::new();

    // Clusters, 100 per describe.
    let mut ours = Vec::new();
    for chunk in cluster_arns.chunks(100) {
        let r = ecs
            .describe_clusters()
            .set_clusters(Some(chunk.to_vec()))
            .include(ClusterField::Tags)
            .include(ClusterField::Settings)
            .send()
            .await
            .or_fail("DescribeClusters", "observing ECS clusters")?;
        for c in r.clusters() {
            let t = tag_map(c.tags());
            let (Some(ident), Some(arn), Some(name)) =
                (p.identity(&t), c.cluster_arn(), c.cluster_name())
            else {
                continue;
            };
            if c.status() == Some("INACTIVE") {
                continue;
            }
            let insights = c
                .settings()
                .iter()
                .find(|s| s.name() == Some(&ClusterSettingName::ContainerInsights))
                .and_then(|s| s.value())
                .unwrap_or("disabled");
            ours.push(arn.to_string());
            all.push(p.observed(
                ident,
                kinds::AWS_ECS_CLUSTER,
                PropMap::from([
                    ("name".into(), Value::str(name)),
                    ("container_insights".into(), Value::str(insights)),
                ]),
                out(&[("arn", Value::str(arn)), ("name", Value::str(name))]),
                Some(name.to_string()),
            ));
        }
    }

    // The latest revision of each family (one describe per family: per
    // service, never per runner).
    let mut digests: BTreeMap<String, String> = BTreeMap::new();
    let described = futures::future::try_join_all(families.iter().map(|family| async move {
        ecs.describe_task_definition()
            .task_definition(family)
            .include(TaskDefinitionField::Tags)
            .send()
            .await
            .or_missing(
                "DescribeTaskDefinition",
                format!("observing task definition {family}"),
            )
    }))
    .await?;
    for r in described.into_iter().flatten() {
        let t = tag_map(r.tags());
        let (Some(ident), Some(td)) = (p.identity(&t), r.task_definition()) else {
            continue;
        };
        let (Some(arn), Some(family)) = (td.task_definition_arn(), td.family()) else {
            continue;
        };
        if td.status() != Some(&TaskDefinitionStatus::Active) {
            continue;
        }
        let digest = t.get(tags::CONTENT_SHA256).cloned().unwrap_or_default();
        digests.insert(arn.to_string(), digest.clone());
        let mut props = PropMap::from([
            ("family".into(), Value::str(family)),
            ("cpu".into(), Value::str(td.cpu().unwrap_or_default())),
            ("memory".into(), Value::str(td.memory().unwrap_or_default())),
            (
                "container_definitions".into(),
                Value::str(canonical(td.container_definitions())),
            ),
            ("content_sha256".into(), Value::str(digest)),
        ]);
        if let Some(r) = td.execution_role_arn() {
            props.insert("execution_role_arn".into(), Value::str(r));
        }
        if let Some(r) = td.task_role_arn() {
            props.insert("task_role_arn".into(), Value::str(r));
        }
        all.push(p.observed(
            ident,
            kinds::AWS_TASK_DEFINITION,
            props,
            out(&[
                ("arn", Value::str(arn)),
                ("family", Value::str(family)),
                ("revision", Value::Int(i64::from(td.revision()))),
            ]),
            Some(arn.to_string()),
        ));
    }

    // Services of our clusters, 10 per describe.
    for cluster in &ours {
        let arns: Vec<String> = ecs
            .list_services()
            .cluster(cluster)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .or_fail("ListServices", "observing ECS services")?;
        for chunk in arns.chunks(10) {
            let r = ecs
                .describe_services()
                .cluster(cluster)
                .set_services(Some(chunk.to_vec()))
                .include(ServiceField::Tags)
                .send()
                .await
                .or_fail("DescribeServices", "observing ECS services")?;
            for s in r.services() {
                let t = tag_map(s.tags());
                let (Some(ident), Some(arn), Some(name)) =
                    (p.identity(&t), s.service_arn(), s.service_name())
                else {
                    continue;
                };
                if matches!(s.status(), Some("INACTIVE" | "DRAINING")) {
                    continue;
                }
                let taskdef = s.task_definition().unwrap_or_default();
                let digest = digests
                    .get(taskdef)
                    .cloned()
                    .unwrap_or_else(|| format!("(runs {taskdef}, not the latest revision)"));
                let vpc = s
                    .network_configuration()
                    .and_then(|n| n.awsvpc_configuration());
                let lbs: Vec<Value> = s
                    .load_balancers()
                    .iter()
                    .map(|l| {
                        Value::Map(BTreeMap::from([
                            (
                                "target_group".to_string(),
                                Value::str(l.target_group_arn().unwrap_or_default()),
                            ),
                            (
                                "container_name".to_string(),
                                Value::str(l.container_name().unwrap_or_default()),
                            ),
                            (
                                "container_port".to_string(),
                                Value::Int(i64::from(l.container_port().unwrap_or(0))),
                            ),
                        ]))
                    })
                    .collect();
                let props = PropMap::from([
                    ("name".into(), Value::str(name)),
                    (
                        "cluster".into(),
                        Value::str(s.cluster_arn().unwrap_or(cluster)),
                    ),
                    (
                        "task_definition_family".into(),
                        Value::str(family_of(taskdef)),
                    ),
                    ("task_definition_sha256".into(), Value::Str(digest)),
                    (
                        "desired_count".into(),
                        Value::Int(i64::from(s.desired_count())),
                    ),
                    (
                        "launch_type".into(),
                        Value::str(s.launch_type().map(LaunchType::as_str).unwrap_or_default()),
                    ),
                    (
                        "subnets".into(),
                        raw_id_set(vpc.map(|v| v.subnets().to_vec()).unwrap_or_default()),
                    ),
                    (
                        "security_groups".into(),
                        raw_id_set(
                            vpc.map(|v| v.security_groups().to_vec())
                                .unwrap_or_default(),
                        ),
                    ),
                    (
                        "assign_public_ip".into(),
                        Value::Bool(
                            vpc.and_then(|v| v.assign_public_ip())
                                == Some(&AssignPublicIp::Enabled),
                        ),
                    ),
                    ("load_balancers".into(), Value::List(lbs)),
                ]);
                let mut props = props;
                if let Some(r) = t.get(tags::RESTART_ON) {
                    props.insert("restart_on".into(), Value::str(r.as_str()));
                }
                all.push(p.observed(
                    ident,
                    kinds::AWS_ECS_SERVICE,
                    props,
                    out(&[("arn", Value::str(arn)), ("name", Value::str(name))]),
                    Some(arn.to_string()),
                ));
            }
        }
    }
    Ok(all)
}

/// Register a revision with the desired content, then deregister every other
/// ACTIVE revision of the family (older ones, or one left by a crashed run).
async fn register(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
) -> Result<BTreeMap<String, Value>, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let family = pr.str("family")?;
    let mut t = ecs_tags(p, ctx, d);
    t.push(
        Tag::builder()
            .key(tags::CONTENT_SHA256)
            .value(pr.str("content_sha256")?)
            .build(),
    );
    let r =
        p.c.ecs
            .register_task_definition()
            .family(family)
            .network_mode(NetworkMode::Awsvpc)
            .requires_compatibilities(Compatibility::Fargate)
            .cpu(pr.str("cpu")?)
            .memory(pr.str("memory")?)
            .execution_role_arn(pr.str("execution_role_arn")?)
            .task_role_arn(pr.str("task_role_arn")?)
            .set_container_definitions(Some(container_definitions(
                id,
                pr.str("container_definitions")?,
            )?))
            .set_tags(Some(t))
            .send()
            .await
            .or_fail("RegisterTaskDefinition", id)?;
    let td = r.task_definition().ok_or_else(|| {
        ProviderError::retryable(
            "RegisterTaskDefinition",
            format!("{id}: AWS answered without the revision"),
        )
    })?;
    let arn = td.task_definition_arn().unwrap_or_default().to_string();
    let others: Vec<String> =
        p.c.ecs
            .list_task_definitions()
            .family_prefix(family)
            .status(TaskDefinitionStatus::Active)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .or_fail("ListTaskDefinitions", id)?;
    for old in others
        .iter()
        .filter(|a| **a != arn && family_of(a) == family)
    {
        p.c.ecs
            .deregister_task_definition()
            .task_definition(old)
            .send()
            .await
            .or_missing("DeregisterTaskDefinition", id)?;
    }
    Ok(out(&[
        ("arn", Value::str(arn)),
        ("family", Value::str(family)),
        ("revision", Value::Int(i64::from(td.revision()))),
    ]))
}

/// The ARN of a family's latest ACTIVE revision: services are pointed at an
/// explicit revision (the one this deploy registered), never at "whatever
/// is latest when ECS looks".
async fn latest_revision(
    p: &AwsProvider,
    id: &ResourceId,
    family: &str,
) -> Result<String, ProviderError> {
    let r =
        p.c.ecs
            .describe_task_definition()
            .task_definition(family)
            .send()
            .await
            .or_fail("DescribeTaskDefinition", id)?;
    r.task_definition()
        .and_then(|t| t.task_definition_arn())
        .map(str::to_string)
        .ok_or_else(|| {
            ProviderError::retryable(
                "DescribeTaskDefinition",
                format!("{id}: task definition {family} has no revision yet"),
            )
        })
}

fn network(id: &ResourceId, pr: &Props<'_>) -> Result<NetworkConfiguration, ProviderError> {
    let vpc = AwsVpcConfiguration::builder()
        .set_subnets(Some(pr.id_set("subnets")?))
        .set_security_groups(Some(pr.id_set("security_groups")?))
        .assign_public_ip(if pr.bool("assign_public_ip")? {
            AssignPublicIp::Enabled
        } else {
            AssignPublicIp::Disabled
        })
        .build()
        .map_err(|e| ProviderError::hard("CreateService", format!("{id}: {e}")))?;
    Ok(NetworkConfiguration::builder()
        .awsvpc_configuration(vpc)
        .build())
}

fn load_balancers(id: &ResourceId, d: &Resource) -> Result<Vec<LoadBalancer>, ProviderError> {
    let list = d
        .props
        .get("load_balancers")
        .and_then(Value::as_list)
        .unwrap_or_default();
    list.iter()
        .map(|l| {
            let m = l.as_map().ok_or_else(|| {
                ProviderError::hard(
                    "CreateService",
                    format!("{id}: a load balancer entry is not a map"),
                )
            })?;
            Ok(LoadBalancer::builder()
                .set_target_group_arn(
                    m.get("target_group")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                )
                .set_container_name(
                    m.get("container_name")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                )
                .set_container_port(
                    m.get("container_port")
                        .and_then(Value::as_int)
                        .and_then(|p| i32::try_from(p).ok()),
                )
                .build())
        })
        .collect()
}

/// Create the cluster, a task definition family or a service.
pub async fn create(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let ecs = &p.c.ecs;
    match d.kind.as_str() {
        kinds::AWS_ECS_CLUSTER => {
            // CreateCluster is idempotent by name.
            let r = ecs
                .create_cluster()
                .cluster_name(pr.str("name")?)
                .settings(
                    ClusterSetting::builder()
                        .name(ClusterSettingName::ContainerInsights)
                        .value(pr.str("container_insights")?)
                        .build(),
                )
                .set_tags(Some(ecs_tags(p, ctx, d)))
                .send()
                .await
                .or_fail("CreateCluster", id)?;
            let arn = r
                .cluster()
                .and_then(|c| c.cluster_arn())
                .unwrap_or_default();
            Ok(p.after(
                ctx,
                d,
                out(&[
                    ("arn", Value::str(arn)),
                    ("name", Value::str(pr.str("name")?)),
                ]),
                Some(arn.to_string()),
            ))
        }
        kinds::AWS_TASK_DEFINITION => {
            let outputs = register(p, ctx, d).await?;
            let handle = outputs
                .get("arn")
                .and_then(Value::as_str)
                .map(str::to_string);
            Ok(p.after(ctx, d, outputs, handle))
        }
        kinds::AWS_ECS_SERVICE => {
            let lbs = load_balancers(id, d)?;
            let token = super::token(ctx, id, 0, 36, false);
            let revision = latest_revision(p, id, pr.str("task_definition_family")?).await?;
            let r = ecs
                .create_service()
                .cluster(pr.str("cluster")?)
                .service_name(pr.str("name")?)
                .task_definition(&revision)
                .desired_count(pr.i32("desired_count")?)
                .launch_type(LaunchType::from(pr.str("launch_type")?))
                .network_configuration(network(id, &pr)?)
                .set_health_check_grace_period_seconds((!lbs.is_empty()).then_some(60))
                .set_load_balancers(Some(lbs))
                .deployment_configuration(
                    DeploymentConfiguration::builder()
                        .deployment_circuit_breaker(
                            DeploymentCircuitBreaker::builder()
                                .enable(true)
                                .rollback(true)
                                .build(),
                        )
                        .maximum_percent(200)
                        .minimum_healthy_percent(100)
                        .build(),
                )
                .propagate_tags(PropagateTags::Service)
                .enable_ecs_managed_tags(true)
                .set_tags(Some(service_tags(p, ctx, d, &pr)))
                .client_token(token)
                .send()
                .await
                .or_fail("CreateService", id)?;
            let arn = r
                .service()
                .and_then(|s| s.service_arn())
                .unwrap_or_default();
            Ok(p.after(
                ctx,
                d,
                out(&[
                    ("arn", Value::str(arn)),
                    ("name", Value::str(pr.str("name")?)),
                ]),
                Some(arn.to_string()),
            ))
        }
        other => Err(ProviderError::hard(
            "create",
            format!("{id}: unknown kind {other}"),
        )),
    }
}

/// Change cluster settings, register a new revision, or update a service.
pub async fn update(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
    current: &Observed,
    changed: &[String],
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let ecs = &p.c.ecs;
    let ctx = StepCtx {
        generation: current.generation,
        ..ctx.clone()
    };
    let mut outputs = current.outputs.clone();
    match d.kind.as_str() {
        kinds::AWS_ECS_CLUSTER => {
            ecs.update_cluster_settings()
                .cluster(pr.str("name")?)
                .settings(
                    ClusterSetting::builder()
                        .name(ClusterSettingName::ContainerInsights)
                        .value(pr.str("container_insights")?)
                        .build(),
                )
                .send()
                .await
                .or_fail("UpdateClusterSettings", id)?;
        }
        kinds::AWS_TASK_DEFINITION => outputs = register(p, &ctx, d).await?,
        kinds::AWS_ECS_SERVICE => {
            // The family's latest revision: the one this deploy registered.
            let revision = latest_revision(p, id, pr.str("task_definition_family")?).await?;
            // What the tasks read at start changed: new tasks, same revision.
            let restart = changed.iter().any(|c| c == "restart_on");
            ecs.update_service()
                .cluster(pr.str("cluster")?)
                .service(pr.str("name")?)
                .task_definition(&revision)
                .desired_count(pr.i32("desired_count")?)
                .network_configuration(network(id, &pr)?)
                .set_load_balancers(Some(load_balancers(id, d)?))
                .force_new_deployment(restart)
                .send()
                .await
                .or_fail("UpdateService", id)?;
            if restart {
                ecs.tag_resource()
                    .resource_arn(output(current, "arn")?)
                    .set_tags(Some(service_tags(p, &ctx, d, &pr)))
                    .send()
                    .await
                    .or_fail("TagResource", id)?;
            }
        }
        _ => {}
    }
    Ok(p.after(&ctx, d, outputs, current.handle.clone()))
}

/// Delete a service (scaled to zero first), a task definition family
/// (every ACTIVE revision deregistered) or the cluster.
pub async fn delete(p: &AwsProvider, _ctx: &StepCtx, o: &Observed) -> Result<(), ProviderError> {
    let id = &o.id;
    let ecs = &p.c.ecs;
    match o.kind.as_str() {
        kinds::AWS_ECS_SERVICE => {
            let cluster = o
                .props
                .get("cluster")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let arn = output(o, "arn")?;
            if ecs
                .update_service()
                .cluster(cluster)
                .service(arn)
                .desired_count(0)
                .send()
                .await
                .or_missing("UpdateService", id)?
                .is_none()
            {
                return Ok(());
            }
            ecs.delete_service()
                .cluster(cluster)
                .service(arn)
                .force(true)
                .send()
                .await
                .or_missing("DeleteService", id)?;
        }
        kinds::AWS_TASK_DEFINITION => {
            let family = output(o, "family")?;
            let arns: Vec<String> = ecs
                .list_task_definitions()
                .family_prefix(family)
                .status(TaskDefinitionStatus::Active)
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("ListTaskDefinitions", id)?;
            for arn in arns.iter().filter(|a| family_of(a) == family) {
                ecs.deregister_task_definition()
                    .task_definition(arn)
                    .send()
                    .await
                    .or_missing("DeregisterTaskDefinition", id)?;
            }
        }
        _ => {
            ecs.delete_cluster()
                .cluster(output(o, "arn")?)
                .send()
                .await
                .or_missing("DeleteCluster", id)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_come_from_revision_arns() {
        assert_eq!(
            family_of("arn:aws:ecs:eu-west-1:1:task-definition/boxlite-prod-api:7"),
            "boxlite-prod-api"
        );
    }

    #[test]
    fn container_definitions_survive_the_round_trip_through_the_sdk() {
        let g = stack::load(
            r#"
name = "boxlite"
[stages.prod]
target = "aws"
region = "eu-west-1"
domain = "example.com"
runners = 0
[stages.prod.control_plane]
image = "registry.example.com/cp:1"
"#,
        )
        .unwrap()
        .stack
        .resolve("prod")
        .unwrap();
        let defs = g.resources[&ResourceId::from("taskdef/api")].props["container_definitions"]
            .as_str()
            .unwrap()
            .to_string();
        let sdk = container_definitions(&ResourceId::from("taskdef/api"), &defs).unwrap();
        assert_eq!(canonical(&sdk), defs);
    }
}
