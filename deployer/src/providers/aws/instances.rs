//! Runner hosts on EC2: the AMI found by name pattern and owner, user data
//! rendered from the runner's cloud-init template, termination protection
//! set at launch and again with `ModifyInstanceAttribute`, and recorded in a
//! tag so a crash between the two is repaired by the next deploy.
//!
//! Each host owns its runner token: launching it mints the token into an SSM
//! `SecureString` first (or keeps the one an interrupted launch stored) and
//! tags the instance with the parameter's name and the token's SHA-256, which
//! the runner registry reads as an output; terminating it deletes the token.
//!
//! DescribeInstances does not list user data, so each instance carries the
//! SHA-256 of its user data in a tag: a no-op diff reads no user data at all,
//! and only a runner whose digest differs has its user data fetched, to show
//! the drift as a diff.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::{
    AttributeBooleanValue, BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState,
    IamInstanceProfileSpecification, InstanceAttributeName, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceStateName, InstanceType, ResourceType, Tag, VolumeType,
};
use base64::Engine as _;
use futures::StreamExt;
use stack::{DesiredGraph, Props as PropMap, Resource, ResourceId, Value, kinds, sha256_hex};

use super::ec2::{create_tags, stage_filters, tag_map, tag_spec};
use super::errors::{AwsResult, Kind};
use super::props::{Props, raw_id_set};
use super::wait::{self, Bounds, Poll};
use super::{AwsProvider, out, output, tags};
use crate::engine::provider::{Observed, ProviderError, StepCtx};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Resolve what only AWS knows: the newest AMI matching each runner's name
/// pattern and owner, and the runner artifact's checksum when it is not pinned.
pub async fn prepare(p: &AwsProvider, graph: &mut DesiredGraph) -> Result<(), ProviderError> {
    let mut amis: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut shas: BTreeMap<String, String> = BTreeMap::new();
    let mut user_data = BTreeMap::new();
    for r in graph
        .resources
        .values_mut()
        .filter(|r| r.kind == kinds::AWS_INSTANCE)
    {
        if let Some(Value::Map(lookup)) = r.props.get("ami") {
            let name = lookup
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let owner = lookup
                .get("owner")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let key = (name.to_string(), owner.to_string());
            let image = match amis.get(&key) {
                Some(i) => i.clone(),
                None => {
                    let i = find_ami(p, &r.id, name, owner).await?;
                    amis.insert(key, i.clone());
                    i
                }
            };
            r.props.insert("ami".into(), Value::Str(image));
        }
        if let Some(Value::Map(spec)) = r.props.get("user_data") {
            let text = render_user_data(p, &r.id, spec, &mut shas).await?;
            r.props.insert("user_data".into(), Value::Str(text));
        }
        if let Some(Value::Str(text)) = r.props.get("user_data") {
            user_data.insert(r.id.clone(), text.clone());
        }
    }
    p.prepared.lock().expect("prepared mutex").user_data = user_data;
    Ok(())
}

/// The newest available image named like `pattern` owned by `owner`.
async fn find_ami(
    p: &AwsProvider,
    id: &ResourceId,
    pattern: &str,
    owner: &str,
) -> Result<String, ProviderError> {
    let images =
        p.c.ec2
            .describe_images()
            .owners(owner)
            .filters(Filter::builder().name("name").values(pattern).build())
            .filters(Filter::builder().name("state").values("available").build())
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .or_fail("DescribeImages", id)?;
    let newest = images
        .iter()
        .filter(|i| i.image_id().is_some())
        .max_by(|a, b| a.creation_date().cmp(&b.creation_date()));
    let Some(img) = newest else {
        return Err(ProviderError::hard(
            "DescribeImages",
            format!(
                "{id}: no available AMI named like {pattern:?} owned by {owner} in {}",
                p.region
            ),
        )
        .with_hint(format!(
            "check [runner] ami_name and ami_owner in stack.toml; `aws ec2 describe-images --region {} --owners {owner} --filters Name=name,Values='{pattern}'` lists the candidates",
            p.region
        )));
    };
    let image = img.image_id().unwrap_or_default().to_string();
    if let Some(dev) = img.root_device_name() {
        p.prepared
            .lock()
            .expect("prepared mutex")
            .root_devices
            .insert(image.clone(), dev.to_string());
    }
    Ok(image)
}

/// Render user data whose artifact checksum is read from the artifact object.
async fn render_user_data(
    p: &AwsProvider,
    id: &ResourceId,
    spec: &BTreeMap<String, Value>,
    shas: &mut BTreeMap<String, String>,
) -> Result<String, ProviderError> {
    let bad = |what: &str| {
        ProviderError::hard(
            "render user data",
            format!("{id}: user data lookup has no {what}"),
        )
    };
    let template_name = spec
        .get("template")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("template"))?;
    let template = stack::template::by_name(template_name).ok_or_else(|| bad("known template"))?;
    let url = spec
        .get("artifact_sha256_from")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("artifact_sha256_from"))?;
    let sha = match shas.get(url) {
        Some(s) => s.clone(),
        None => {
            let s = artifact_sha256(p, id, url).await?;
            shas.insert(url.to_string(), s.clone());
            s
        }
    };
    let mut vars: BTreeMap<&str, String> = spec
        .get("vars")
        .and_then(Value::as_map)
        .ok_or_else(|| bad("vars"))?
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?.to_string())))
        .collect();
    vars.insert("artifact_sha256", sha);
    template
        .render(&vars)
        .map_err(|e| ProviderError::hard("render user data", format!("{id}: {e}")))
}

/// The SHA-256 of an `s3://` artifact: its `sha256` metadata, or its S3 SHA-256 checksum.
async fn artifact_sha256(
    p: &AwsProvider,
    id: &ResourceId,
    url: &str,
) -> Result<String, ProviderError> {
    let hint = format!(
        "publish it: `aws s3 cp boxlite-runner.tar.gz {url} --metadata sha256=$(sha256sum boxlite-runner.tar.gz | cut -d' ' -f1)`, or pin [runner] artifact_url and artifact_sha256 in stack.toml"
    );
    let Some((bucket, key)) = url.strip_prefix("s3://").and_then(|r| r.split_once('/')) else {
        return Err(ProviderError::hard(
            "HeadObject",
            format!(
                "{id}: the runner artifact {url} is not an s3:// URL and has no pinned checksum"
            ),
        )
        .with_hint("set [runner] artifact_sha256 in stack.toml"));
    };
    let head =
        p.c.s3
            .head_object()
            .bucket(bucket)
            .key(key)
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await
            .or_missing("HeadObject", id)?;
    let Some(head) = head else {
        return Err(ProviderError::hard(
            "HeadObject",
            format!("{id}: the runner artifact {url} is not published"),
        )
        .with_hint(hint));
    };
    if let Some(sha) = head
        .metadata()
        .and_then(|m| m.get("sha256"))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Ok(sha);
    }
    // A single-part upload's SHA-256 checksum is the object's digest.
    if let Some(bytes) = head
        .checksum_sha256()
        .filter(|c| !c.contains('-'))
        .and_then(|c| B64.decode(c).ok())
        .filter(|b| b.len() == 32)
    {
        return Ok(hex::encode(bytes));
    }
    Err(ProviderError::hard(
        "HeadObject",
        format!("{id}: the runner artifact {url} has no sha256 metadata or SHA-256 checksum"),
    )
    .with_hint(hint))
}

/// Every runner host of the stage.
pub async fn observe(p: &AwsProvider) -> Result<Vec<Observed>, ProviderError> {
    let mut filters = stage_filters(p);
    filters.push(live());
    let (reservations, volumes) = futures::try_join!(
        async {
            p.c.ec2
                .describe_instances()
                .set_filters(Some(filters))
                .max_results(1000)
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("DescribeInstances", "observing runners")
        },
        async {
            p.c.ec2
                .describe_volumes()
                .set_filters(Some(stage_filters(p)))
                .max_results(1000)
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("DescribeVolumes", "observing runner volumes")
        },
    )?;
    // Root volume size per instance (volumes are tagged at launch).
    let mut sizes: BTreeMap<(String, String), i64> = BTreeMap::new();
    for v in &volumes {
        for a in v.attachments() {
            if let (Some(i), Some(dev)) = (a.instance_id(), a.device()) {
                sizes.insert(
                    (i.to_string(), dev.to_string()),
                    i64::from(v.size().unwrap_or(0)),
                );
            }
        }
    }
    let desired_user_data = p.prepared.lock().expect("prepared mutex").user_data.clone();
    let prepared = p.was_prepared.load(std::sync::atomic::Ordering::SeqCst);
    let mut all = Vec::new();
    let mut fetch = Vec::new();
    for inst in reservations.iter().flat_map(|r| r.instances()) {
        let t = tag_map(inst.tags());
        let (Some(ident), Some(instance_id)) = (p.identity(&t), inst.instance_id()) else {
            continue;
        };
        let mut props = PropMap::from([
            (
                "name".into(),
                Value::str(t.get(tags::NAME).cloned().unwrap_or_default()),
            ),
            (
                "ami".into(),
                Value::str(inst.image_id().unwrap_or_default()),
            ),
            (
                "instance_type".into(),
                Value::str(
                    inst.instance_type()
                        .map(InstanceType::as_str)
                        .unwrap_or_default(),
                ),
            ),
            (
                "subnet_id".into(),
                Value::str(inst.subnet_id().unwrap_or_default()),
            ),
            (
                "private_ip".into(),
                Value::str(inst.private_ip_address().unwrap_or_default()),
            ),
            (
                "security_groups".into(),
                raw_id_set(inst.security_groups().iter().filter_map(|g| g.group_id())),
            ),
            (
                "termination_protection".into(),
                Value::Bool(
                    t.get(tags::TERMINATION_PROTECTION)
                        .is_some_and(|v| v == "true"),
                ),
            ),
            (
                "token_parameter".into(),
                Value::str(t.get(tags::TOKEN_PARAMETER).cloned().unwrap_or_default()),
            ),
        ]);
        if let Some(arn) = inst.iam_instance_profile().and_then(|i| i.arn()) {
            let name = arn.rsplit('/').next().unwrap_or(arn);
            props.insert("instance_profile".into(), Value::str(name));
        }
        if let Some(size) = inst
            .root_device_name()
            .and_then(|dev| sizes.get(&(instance_id.to_string(), dev.to_string())))
        {
            props.insert("root_volume_gb".into(), Value::Int(*size));
        }
        let digest = t.get(tags::USER_DATA_SHA256).cloned().unwrap_or_default();
        let user_data = match desired_user_data.get(&ident.id) {
            Some(text) if sha256_hex(text) == digest => Some(text.clone()),
            _ if prepared => {
                // Read below, for the drifted hosts only.
                fetch.push((all.len(), ident.id.clone(), instance_id.to_string()));
                None
            }
            _ => Some(format!("(user data with sha256 {digest})")),
        };
        if let Some(text) = user_data {
            props.insert("user_data".into(), Value::Str(text));
        }
        let ip = inst.private_ip_address().unwrap_or_default().to_string();
        all.push(p.observed(
            ident,
            kinds::AWS_INSTANCE,
            props,
            outputs(
                instance_id,
                ip,
                t.get(tags::TOKEN_SHA256).cloned().unwrap_or_default(),
            ),
            Some(instance_id.to_string()),
        ));
    }
    // User data of the hosts whose digest differs from the desired one,
    // a few at a time: only drift costs calls.
    let texts: Vec<(usize, Result<String, ProviderError>)> = futures::stream::iter(fetch)
        .map(|(i, id, instance)| async move { (i, user_data_of(p, &id, &instance).await) })
        .buffer_unordered(8)
        .collect()
        .await;
    for (i, text) in texts {
        all[i].props.insert("user_data".into(), Value::Str(text?));
    }
    Ok(all)
}

/// Hosts that exist (not terminated or shutting down).
fn live() -> Filter {
    Filter::builder()
        .name("instance-state-name")
        .values("pending")
        .values("running")
        .values("stopping")
        .values("stopped")
        .build()
}

/// True when a live host other than `instance` carries the id `id`.
async fn other_host_with_id(
    p: &AwsProvider,
    id: &ResourceId,
    instance: &str,
) -> Result<bool, ProviderError> {
    let mut filters = stage_filters(p);
    filters.push(
        Filter::builder()
            .name(format!("tag:{}", stack::tags::ID))
            .values(id.as_str())
            .build(),
    );
    filters.push(live());
    let hosts: Vec<_> =
        p.c.ec2
            .describe_instances()
            .set_filters(Some(filters))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .or_fail("DescribeInstances", id)?;
    Ok(hosts
        .iter()
        .flat_map(|r| r.instances())
        .any(|i| i.instance_id().is_some_and(|x| x != instance)))
}

/// What a runner host gives others: its id, address and token digest.
fn outputs(instance_id: &str, ip: String, token_sha256: String) -> BTreeMap<String, Value> {
    out(&[
        ("id", Value::str(instance_id)),
        ("private_ip", Value::Str(ip)),
        ("token_sha256", Value::Str(token_sha256)),
    ])
}

/// The user data of one instance, as text (only for runners whose digest differs).
async fn user_data_of(
    p: &AwsProvider,
    id: &ResourceId,
    instance: &str,
) -> Result<String, ProviderError> {
    let r =
        p.c.ec2
            .describe_instance_attribute()
            .instance_id(instance)
            .attribute(InstanceAttributeName::UserData)
            .send()
            .await
            .or_fail("DescribeInstanceAttribute", id)?;
    let encoded = r.user_data().and_then(|v| v.value()).unwrap_or_default();
    Ok(B64
        .decode(encoded)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default())
}

/// Launch a runner host.
pub async fn create(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let ami = pr.str("ami")?;
    let root_device = root_device(p, id, ami).await?;
    let user_data = pr.str("user_data")?;
    let token_parameter = pr.str("token_parameter")?;
    // The token exists before the host that reads it at boot.
    let token_sha256 =
        super::ssm::mint_runner_token(p, ctx, id, &d.policy, token_parameter).await?;
    let mut t = create_tags(p, ctx, d);
    t.push((tags::USER_DATA_SHA256.to_string(), sha256_hex(user_data)));
    t.push((
        tags::TOKEN_PARAMETER.to_string(),
        token_parameter.to_string(),
    ));
    t.push((tags::TOKEN_SHA256.to_string(), token_sha256.clone()));
    let volume_tags = p.tags_for(id, &d.policy, ctx.generation);
    let groups = pr.id_set("security_groups")?;
    // A token AWS still remembers from a terminated incarnation answers with
    // that dead instance: step over it.
    let mut launched = None;
    for salt in 0..=super::MAX_SALT {
        let r =
            p.c.ec2
                .run_instances()
                .image_id(ami)
                .instance_type(InstanceType::from(pr.str("instance_type")?))
                .min_count(1)
                .max_count(1)
                .subnet_id(pr.str("subnet_id")?)
                .private_ip_address(pr.str("private_ip")?)
                .set_security_group_ids(Some(groups.clone()))
                .iam_instance_profile(
                    IamInstanceProfileSpecification::builder()
                        .name(pr.str("instance_profile")?)
                        .build(),
                )
                .user_data(B64.encode(user_data))
                .block_device_mappings(
                    BlockDeviceMapping::builder()
                        .device_name(&root_device)
                        .ebs(
                            EbsBlockDevice::builder()
                                .volume_size(pr.i32("root_volume_gb")?)
                                .volume_type(VolumeType::Gp3)
                                .encrypted(true)
                                .delete_on_termination(true)
                                .build(),
                        )
                        .build(),
                )
                .metadata_options(
                    InstanceMetadataOptionsRequest::builder()
                        .http_tokens(HttpTokensState::Required)
                        .http_endpoint(InstanceMetadataEndpointState::Enabled)
                        .build(),
                )
                // Protected from the first instant on AWS; set again below.
                .disable_api_termination(pr.bool("termination_protection")?)
                .client_token(super::token(ctx, id, salt, 64, false))
                .tag_specifications(tag_spec(ResourceType::Instance, &t))
                .tag_specifications(tag_spec(ResourceType::Volume, &volume_tags))
                .send()
                .await
                .or_fail("RunInstances", id)?;
        let inst = r.instances().first().cloned().ok_or_else(|| {
            ProviderError::retryable(
                "RunInstances",
                format!("{id}: AWS answered without an instance"),
            )
        })?;
        let dead = matches!(
            inst.state().and_then(|s| s.name()),
            Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
        );
        if !dead {
            launched = Some(inst);
            break;
        }
    }
    let inst = launched.ok_or_else(|| {
        ProviderError::hard(
            "RunInstances",
            format!("{id}: every idempotency token answered with a terminated instance"),
        )
        .with_hint("wait an hour for AWS to forget the old tokens, then deploy again")
    })?;
    let instance_id = inst.instance_id().unwrap_or_default().to_string();
    let ip = inst.private_ip_address().unwrap_or_default().to_string();
    if pr.bool("termination_protection")? {
        protect(p, id, &instance_id, true).await?;
    }
    Ok(p.after(
        ctx,
        d,
        outputs(&instance_id, ip, token_sha256),
        Some(instance_id),
    ))
}

/// The root device name of an AMI (from the lookup, or asked for).
async fn root_device(p: &AwsProvider, id: &ResourceId, ami: &str) -> Result<String, ProviderError> {
    if let Some(d) = p
        .prepared
        .lock()
        .expect("prepared mutex")
        .root_devices
        .get(ami)
    {
        return Ok(d.clone());
    }
    let r =
        p.c.ec2
            .describe_images()
            .image_ids(ami)
            .send()
            .await
            .or_fail("DescribeImages", id)?;
    r.images()
        .first()
        .and_then(|i| i.root_device_name())
        .map(str::to_string)
        .ok_or_else(|| {
            ProviderError::hard("DescribeImages", format!("{id}: AMI {ami} does not exist"))
                .with_hint("check [runner] ami_name and ami_owner in stack.toml")
        })
}

/// Set (or lift) termination protection, then record it in a tag. A new
/// instance may not be visible to every EC2 endpoint yet: wait for it.
async fn protect(
    p: &AwsProvider,
    id: &ResourceId,
    instance: &str,
    on: bool,
) -> Result<(), ProviderError> {
    wait::until(
        id,
        "ModifyInstanceAttribute",
        "termination protection to be set",
        Bounds::up_to(Duration::from_secs(120)),
        "run deploy again: the runner is found by its tags and protected then",
        || async {
            let r =
                p.c.ec2
                    .modify_instance_attribute()
                    .instance_id(instance)
                    .disable_api_termination(AttributeBooleanValue::builder().value(on).build())
                    .send()
                    .await;
            match r {
                Ok(_) => Ok(Poll::Ready(())),
                Err(e) if super::errors::kind_of(&e) == Kind::NotFound => {
                    Ok(Poll::Pending("instance not visible yet".into()))
                }
                Err(e) => Err(super::errors::to_provider(
                    "ModifyInstanceAttribute",
                    id,
                    &e,
                )),
            }
        },
    )
    .await?;
    if on {
        p.c.ec2
            .create_tags()
            .resources(instance)
            .tags(
                Tag::builder()
                    .key(tags::TERMINATION_PROTECTION)
                    .value("true")
                    .build(),
            )
            .send()
            .await
            .or_fail("CreateTags", id)?;
    } else {
        p.c.ec2
            .delete_tags()
            .resources(instance)
            .tags(Tag::builder().key(tags::TERMINATION_PROTECTION).build())
            .send()
            .await
            .or_missing("DeleteTags", id)?;
    }
    Ok(())
}

/// Change a runner host in place (security groups, protection, name, token tags).
pub async fn update(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
    current: &Observed,
    changed: &[String],
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let instance = output(current, "id")?.to_string();
    let mut outputs = current.outputs.clone();
    for field in changed {
        match field.as_str() {
            // A host without its token tags (launched before hosts owned
            // their tokens, or tags removed by hand) is re-tagged from its
            // token parameter; the token itself never changes in place.
            "token_parameter" => {
                let name = pr.str("token_parameter")?;
                let Some(sha) = super::ssm::runner_token_digest(p, id, name).await? else {
                    let runner = id.as_str().trim_start_matches("runner/");
                    return Err(ProviderError::hard(
                        "DescribeParameters",
                        format!("{id}: its token parameter {name} is missing, and a running host cannot be given a new token in place"),
                    )
                    .with_hint(format!("`boxctl decommission {runner}`, then deploy to launch it afresh with a new token")));
                };
                p.c.ec2
                    .create_tags()
                    .resources(&instance)
                    .tags(
                        Tag::builder()
                            .key(tags::TOKEN_PARAMETER)
                            .value(name)
                            .build(),
                    )
                    .tags(Tag::builder().key(tags::TOKEN_SHA256).value(&sha).build())
                    .send()
                    .await
                    .or_fail("CreateTags", id)?;
                outputs.insert("token_sha256".into(), Value::Str(sha));
            }
            "termination_protection" => {
                protect(p, id, &instance, pr.bool("termination_protection")?).await?
            }
            "security_groups" => {
                p.c.ec2
                    .modify_instance_attribute()
                    .instance_id(&instance)
                    .set_groups(Some(pr.id_set("security_groups")?))
                    .send()
                    .await
                    .or_fail("ModifyInstanceAttribute", id)?;
            }
            "name" => {
                p.c.ec2
                    .create_tags()
                    .resources(&instance)
                    .tags(
                        Tag::builder()
                            .key(tags::NAME)
                            .value(pr.str("name")?)
                            .build(),
                    )
                    .send()
                    .await
                    .or_fail("CreateTags", id)?;
            }
            other => {
                return Err(ProviderError::hard(
                    "update",
                    format!("{id}: `{other}` of a runner host cannot change in place"),
                ));
            }
        }
    }
    let mut o = p.after(
        &StepCtx {
            generation: current.generation,
            ..ctx.clone()
        },
        d,
        outputs,
        current.handle.clone(),
    );
    // Ignored fields keep what the host really has.
    for k in ["ami", "user_data"] {
        if let Some(v) = current.props.get(k) {
            o.props.insert(k.to_string(), v.clone());
        }
    }
    Ok(o)
}

/// Terminate a runner host: lift its protection first (only `destroy`,
/// `decommission` and duplicate clean-up get here), delete its token, then
/// wait until it is gone.
pub async fn delete(p: &AwsProvider, _ctx: &StepCtx, o: &Observed) -> Result<(), ProviderError> {
    let id = &o.id;
    let instance = output(o, "id")?;
    let lifted =
        p.c.ec2
            .modify_instance_attribute()
            .instance_id(instance)
            .disable_api_termination(AttributeBooleanValue::builder().value(false).build())
            .send()
            .await
            .or_missing("ModifyInstanceAttribute", id)?;
    // The token goes first: a rerun after a crash still finds the host by
    // its tags, never a token without a host. A duplicate host shares the
    // token of the one that stays, so the token goes with the last host only.
    if let Some(Value::Str(name)) = o.props.get("token_parameter")
        && !name.is_empty()
        && !other_host_with_id(p, id, instance).await?
    {
        super::ssm::delete_named(p, id, name).await?;
    }
    if lifted.is_none() {
        return Ok(());
    }
    p.c.ec2
        .terminate_instances()
        .instance_ids(instance)
        .send()
        .await
        .or_missing("TerminateInstances", id)?;
    wait::until(
        id,
        "DescribeInstances",
        "the instance to terminate",
        Bounds::up_to(Duration::from_secs(15 * 60)),
        "check the instance in the EC2 console; run the command again once it is terminated",
        || async {
            let r =
                p.c.ec2
                    .describe_instances()
                    .instance_ids(instance)
                    .send()
                    .await
                    .or_missing("DescribeInstances", id)?;
            let state = r
                .as_ref()
                .and_then(|r| r.reservations().first())
                .and_then(|r| r.instances().first())
                .and_then(|i| i.state())
                .and_then(|s| s.name().cloned());
            Ok(match state {
                None | Some(InstanceStateName::Terminated) => Poll::Ready(()),
                Some(s) => Poll::Pending(s.as_str().to_string()),
            })
        },
    )
    .await
}
