//! Elastic Load Balancing v2: load balancers (with the idle timeout
//! attribute), target groups, listeners and host rules. ELB has no tag
//! filter on its describe calls: load balancers and target groups are listed
//! once, narrowed to this stage's name prefix, and their tags read 20 at a
//! time; listeners and rules are listed per load balancer or listener of the
//! stage (a fixed number, whatever the runner count).

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, Certificate, HostHeaderConditionConfig, IpAddressType,
    LoadBalancerAttribute, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum,
    RedirectActionConfig, RedirectActionStatusCodeEnum, RuleCondition, Tag, TargetTypeEnum,
};
use stack::{Props as PropMap, Resource, ResourceId, Value, kinds};

use super::errors::AwsResult;
use super::props::{Props, raw_id_set};
use super::{AwsProvider, out, output, tags};
use crate::engine::provider::{Observed, ProviderError, StepCtx};

const IDLE_TIMEOUT: &str = "idle_timeout.timeout_seconds";

fn elb_tags(p: &AwsProvider, ctx: &StepCtx, d: &Resource) -> Vec<Tag> {
    p.tags_for(&d.id, &d.policy, ctx.generation)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// Every name this stage gives a load balancer or target group starts with this.
fn name_prefix(p: &AwsProvider) -> String {
    let full = format!(
        "{}-",
        stack::resolve::aws::aws_name(&p.stack, &p.stage, "", 255)
    );
    full.chars().take(22).collect()
}

/// Tags of many ELB resources, 20 ARNs per call.
async fn tags_of(
    p: &AwsProvider,
    arns: &[String],
) -> Result<BTreeMap<String, BTreeMap<String, String>>, ProviderError> {
    let mut out = BTreeMap::new();
    for chunk in arns.chunks(20) {
        let r =
            p.c.elb
                .describe_tags()
                .set_resource_arns(Some(chunk.to_vec()))
                .send()
                .await
                .or_fail("DescribeTags", "observing load balancer tags")?;
        for d in r.tag_descriptions() {
            if let Some(arn) = d.resource_arn() {
                out.insert(
                    arn.to_string(),
                    tags::to_map(
                        d.tags()
                            .iter()
                            .filter_map(|t| Some((t.key()?, t.value().unwrap_or("")))),
                    ),
                );
            }
        }
    }
    Ok(out)
}

fn action_value(actions: &[Action]) -> Value {
    let Some(a) = actions.iter().min_by_key(|a| a.order().unwrap_or(0)) else {
        return Value::Map(BTreeMap::new());
    };
    let mut m = BTreeMap::new();
    match a.r#type() {
        Some(ActionTypeEnum::Forward) => {
            m.insert("type".to_string(), Value::str("forward"));
            let tg = a.target_group_arn().or_else(|| {
                a.forward_config()
                    .and_then(|f| f.target_groups().first())
                    .and_then(|t| t.target_group_arn())
            });
            m.insert(
                "target_group".to_string(),
                Value::str(tg.unwrap_or_default()),
            );
        }
        Some(ActionTypeEnum::Redirect) => {
            m.insert("type".to_string(), Value::str("redirect"));
            if let Some(r) = a.redirect_config() {
                m.insert(
                    "protocol".to_string(),
                    Value::str(r.protocol().unwrap_or("#{protocol}")),
                );
                m.insert(
                    "port".to_string(),
                    Value::str(r.port().unwrap_or("#{port}")),
                );
                m.insert(
                    "status_code".to_string(),
                    Value::str(r.status_code().map(|s| s.as_str()).unwrap_or_default()),
                );
            }
        }
        other => {
            m.insert(
                "type".to_string(),
                Value::str(other.map(|t| t.as_str()).unwrap_or("unknown")),
            );
        }
    }
    Value::Map(m)
}

fn action_of(id: &ResourceId, v: &BTreeMap<String, Value>) -> Result<Action, ProviderError> {
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    match s("type").as_str() {
        "forward" => Ok(Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn(s("target_group"))
            .build()),
        "redirect" => Ok(Action::builder()
            .r#type(ActionTypeEnum::Redirect)
            .redirect_config(
                RedirectActionConfig::builder()
                    .protocol(s("protocol"))
                    .port(s("port"))
                    .status_code(RedirectActionStatusCodeEnum::from(
                        s("status_code").as_str(),
                    ))
                    .build(),
            )
            .build()),
        other => Err(ProviderError::hard(
            "listener action",
            format!("{id}: unknown action type {other:?}"),
        )),
    }
}

/// Every load balancer, target group, listener and rule of the stage.
pub async fn observe(p: &AwsProvider) -> Result<Vec<Observed>, ProviderError> {
    let elb = &p.c.elb;
    let prefix = name_prefix(p);
    let (lbs, tgs) = futures::try_join!(
        async {
            elb.describe_load_balancers()
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("DescribeLoadBalancers", "observing load balancers")
        },
        async {
            elb.describe_target_groups()
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("DescribeTargetGroups", "observing target groups")
        },
    )?;
    let lbs: Vec<_> = lbs
        .into_iter()
        .filter(|l| {
            l.load_balancer_name()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    let tgs: Vec<_> = tgs
        .into_iter()
        .filter(|t| {
            t.target_group_name()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    let arns: Vec<String> = lbs
        .iter()
        .filter_map(|l| l.load_balancer_arn().map(str::to_string))
        .chain(
            tgs.iter()
                .filter_map(|t| t.target_group_arn().map(str::to_string)),
        )
        .collect();
    let tagged = tags_of(p, &arns).await?;
    let ident = |arn: Option<&str>| arn.and_then(|a| tagged.get(a)).and_then(|t| p.identity(t));
    let mut all = Vec::new();

    let our_lbs: Vec<_> = lbs
        .iter()
        .filter_map(|l| Some((ident(l.load_balancer_arn())?, l)))
        .collect();
    // Listeners and (for ALBs) attributes of each load balancer of the stage.
    let details = futures::future::try_join_all(our_lbs.iter().map(|(_, l)| async move {
        let arn = l.load_balancer_arn().unwrap_or_default();
        let listeners = elb
            .describe_listeners()
            .load_balancer_arn(arn)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .or_fail("DescribeListeners", "observing listeners")?;
        let idle = if l.r#type() == Some(&LoadBalancerTypeEnum::Application) {
            let attrs = elb
                .describe_load_balancer_attributes()
                .load_balancer_arn(arn)
                .send()
                .await
                .or_fail("DescribeLoadBalancerAttributes", "observing load balancers")?;
            attrs
                .attributes()
                .iter()
                .find(|a| a.key() == Some(IDLE_TIMEOUT))
                .and_then(|a| a.value())
                .and_then(|v| v.parse::<i64>().ok())
        } else {
            None
        };
        Ok::<_, ProviderError>((listeners, idle))
    }))
    .await?;

    let mut listeners = Vec::new();
    for ((ident, l), (ls, idle)) in our_lbs.into_iter().zip(details) {
        let arn = l.load_balancer_arn().unwrap_or_default();
        let name = l.load_balancer_name().unwrap_or_default();
        let mut props = PropMap::from([
            ("name".into(), Value::str(name)),
            (
                "type".into(),
                Value::str(l.r#type().map(|t| t.as_str()).unwrap_or_default()),
            ),
            (
                "scheme".into(),
                Value::str(l.scheme().map(|s| s.as_str()).unwrap_or_default()),
            ),
            (
                "subnets".into(),
                raw_id_set(l.availability_zones().iter().filter_map(|z| z.subnet_id())),
            ),
            (
                "security_groups".into(),
                raw_id_set(l.security_groups().iter().cloned()),
            ),
        ]);
        if let Some(idle) = idle {
            props.insert("idle_timeout_seconds".into(), Value::Int(idle));
        }
        all.push(p.observed(
            ident,
            kinds::AWS_LOAD_BALANCER,
            props,
            out(&[
                ("arn", Value::str(arn)),
                ("dns_name", Value::str(l.dns_name().unwrap_or_default())),
                (
                    "zone_id",
                    Value::str(l.canonical_hosted_zone_id().unwrap_or_default()),
                ),
                ("name", Value::str(name)),
            ]),
            Some(name.to_string()),
        ));
        listeners.extend(ls);
    }

    for t in &tgs {
        let Some(ident) = ident(t.target_group_arn()) else {
            continue;
        };
        let arn = t.target_group_arn().unwrap_or_default();
        let mut props = PropMap::from([
            (
                "name".into(),
                Value::str(t.target_group_name().unwrap_or_default()),
            ),
            (
                "protocol".into(),
                Value::str(t.protocol().map(|p| p.as_str()).unwrap_or_default()),
            ),
            ("port".into(), Value::Int(i64::from(t.port().unwrap_or(0)))),
            ("vpc_id".into(), Value::str(t.vpc_id().unwrap_or_default())),
            (
                "target_type".into(),
                Value::str(t.target_type().map(|p| p.as_str()).unwrap_or_default()),
            ),
            (
                "health_check_protocol".into(),
                Value::str(
                    t.health_check_protocol()
                        .map(|p| p.as_str())
                        .unwrap_or_default(),
                ),
            ),
        ]);
        if matches!(
            t.health_check_protocol(),
            Some(ProtocolEnum::Http | ProtocolEnum::Https)
        ) && let Some(path) = t.health_check_path()
        {
            props.insert("health_check_path".into(), Value::str(path));
        }
        all.push(p.observed(
            ident,
            kinds::AWS_TARGET_GROUP,
            props,
            out(&[("arn", Value::str(arn))]),
            Some(arn.to_string()),
        ));
    }

    let listener_arns: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.listener_arn().map(str::to_string))
        .collect();
    let listener_tags = tags_of(p, &listener_arns).await?;
    let mut https = Vec::new();
    for l in &listeners {
        let arn = l.listener_arn().unwrap_or_default();
        let Some(ident) = listener_tags.get(arn).and_then(|t| p.identity(t)) else {
            continue;
        };
        let protocol = l.protocol().map(|p| p.as_str()).unwrap_or_default();
        let mut props = PropMap::from([
            (
                "load_balancer".into(),
                Value::str(l.load_balancer_arn().unwrap_or_default()),
            ),
            ("port".into(), Value::Int(i64::from(l.port().unwrap_or(0)))),
            ("protocol".into(), Value::str(protocol)),
            ("default_action".into(), action_value(l.default_actions())),
        ]);
        if matches!(l.protocol(), Some(ProtocolEnum::Https | ProtocolEnum::Tls)) {
            if let Some(c) = l.certificates().first().and_then(|c| c.certificate_arn()) {
                props.insert("certificate".into(), Value::str(c));
            }
            if let Some(s) = l.ssl_policy() {
                props.insert("ssl_policy".into(), Value::str(s));
            }
            https.push(arn.to_string());
        }
        all.push(p.observed(
            ident,
            kinds::AWS_LISTENER,
            props,
            out(&[("arn", Value::str(arn))]),
            Some(arn.to_string()),
        ));
    }

    // Rules and extra certificates of the stage's HTTPS listeners.
    let per_listener = futures::future::try_join_all(https.iter().map(|arn| async move {
        let rules = elb
            .describe_rules()
            .listener_arn(arn)
            .send()
            .await
            .or_fail("DescribeRules", "observing listener rules")?;
        let certs = elb
            .describe_listener_certificates()
            .listener_arn(arn)
            .send()
            .await
            .or_fail(
                "DescribeListenerCertificates",
                "observing listener certificates",
            )?;
        let certs: BTreeSet<String> = certs
            .certificates()
            .iter()
            .filter(|c| !c.is_default().unwrap_or(false))
            .filter_map(|c| c.certificate_arn().map(str::to_string))
            .collect();
        Ok::<_, ProviderError>((arn.clone(), rules.rules().to_vec(), certs))
    }))
    .await?;
    let rule_arns: Vec<String> = per_listener
        .iter()
        .flat_map(|(_, rules, _)| rules.iter())
        .filter(|r| !r.is_default().unwrap_or(false))
        .filter_map(|r| r.rule_arn().map(str::to_string))
        .collect();
    let rule_tags = tags_of(p, &rule_arns).await?;
    for (listener, rules, certs) in &per_listener {
        for r in rules.iter().filter(|r| !r.is_default().unwrap_or(false)) {
            let arn = r.rule_arn().unwrap_or_default();
            let Some(t) = rule_tags.get(arn) else {
                continue;
            };
            let Some(ident) = p.identity(t) else { continue };
            let host = r
                .conditions()
                .iter()
                .find(|c| c.field() == Some("host-header"))
                .and_then(|c| {
                    c.host_header_config()
                        .and_then(|h| h.values().first().cloned())
                        .or_else(|| c.values().first().cloned())
                })
                .unwrap_or_default();
            let tg = match action_value(r.actions()) {
                Value::Map(m) => m.get("target_group").cloned().unwrap_or(Value::str("")),
                _ => Value::str(""),
            };
            let mut props = PropMap::from([
                ("listener".into(), Value::str(listener.as_str())),
                (
                    "priority".into(),
                    Value::Int(r.priority().and_then(|p| p.parse().ok()).unwrap_or(0)),
                ),
                ("host".into(), Value::Str(host)),
                ("target_group".into(), tg),
            ]);
            if let Some(cert) = t.get(tags::CERTIFICATE).filter(|c| certs.contains(*c)) {
                props.insert("certificate".into(), Value::str(cert.as_str()));
            }
            all.push(p.observed(
                ident,
                kinds::AWS_LISTENER_RULE,
                props,
                out(&[("arn", Value::str(arn))]),
                Some(arn.to_string()),
            ));
        }
    }
    Ok(all)
}

async fn set_idle_timeout(
    p: &AwsProvider,
    id: &ResourceId,
    arn: &str,
    secs: i64,
) -> Result<(), ProviderError> {
    p.c.elb
        .modify_load_balancer_attributes()
        .load_balancer_arn(arn)
        .attributes(
            LoadBalancerAttribute::builder()
                .key(IDLE_TIMEOUT)
                .value(secs.to_string())
                .build(),
        )
        .send()
        .await
        .or_fail("ModifyLoadBalancerAttributes", id)?;
    Ok(())
}

async fn attach_certificate(
    p: &AwsProvider,
    id: &ResourceId,
    listener: &str,
    cert: &str,
    attach: bool,
) -> Result<(), ProviderError> {
    let c = Certificate::builder().certificate_arn(cert).build();
    if attach {
        p.c.elb
            .add_listener_certificates()
            .listener_arn(listener)
            .certificates(c)
            .send()
            .await
            .or_fail("AddListenerCertificates", id)?;
    } else {
        p.c.elb
            .remove_listener_certificates()
            .listener_arn(listener)
            .certificates(c)
            .send()
            .await
            .or_missing("RemoveListenerCertificates", id)?;
    }
    Ok(())
}

fn host_condition(host: &str) -> RuleCondition {
    RuleCondition::builder()
        .field("host-header")
        .host_header_config(HostHeaderConditionConfig::builder().values(host).build())
        .build()
}

/// Create a load balancer, target group, listener or rule.
pub async fn create(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let elb = &p.c.elb;
    let t = elb_tags(p, ctx, d);
    match d.kind.as_str() {
        kinds::AWS_LOAD_BALANCER => {
            // Creating one with the same name and settings returns the existing one.
            let r = elb
                .create_load_balancer()
                .name(pr.str("name")?)
                .r#type(LoadBalancerTypeEnum::from(pr.str("type")?))
                .scheme(LoadBalancerSchemeEnum::from(pr.str("scheme")?))
                .ip_address_type(IpAddressType::Ipv4)
                .set_subnets(Some(pr.id_set("subnets")?))
                .set_security_groups(Some(pr.id_set("security_groups")?))
                .set_tags(Some(t))
                .send()
                .await
                .or_fail("CreateLoadBalancer", id)?;
            let lb = r.load_balancers().first().ok_or_else(|| {
                ProviderError::retryable(
                    "CreateLoadBalancer",
                    format!("{id}: AWS answered without it"),
                )
            })?;
            let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
            if let Some(Value::Int(secs)) = d.props.get("idle_timeout_seconds") {
                set_idle_timeout(p, id, &arn, *secs).await?;
            }
            Ok(p.after(
                ctx,
                d,
                out(&[
                    ("arn", Value::str(arn.as_str())),
                    ("dns_name", Value::str(lb.dns_name().unwrap_or_default())),
                    (
                        "zone_id",
                        Value::str(lb.canonical_hosted_zone_id().unwrap_or_default()),
                    ),
                    ("name", Value::str(pr.str("name")?)),
                ]),
                Some(pr.str("name")?.to_string()),
            ))
        }
        kinds::AWS_TARGET_GROUP => {
            let r = elb
                .create_target_group()
                .name(pr.str("name")?)
                .protocol(ProtocolEnum::from(pr.str("protocol")?))
                .port(pr.i32("port")?)
                .vpc_id(pr.str("vpc_id")?)
                .target_type(TargetTypeEnum::from(pr.str("target_type")?))
                .health_check_protocol(ProtocolEnum::from(pr.str("health_check_protocol")?))
                .set_health_check_path(pr.opt_str("health_check_path").map(str::to_string))
                .set_tags(Some(t))
                .send()
                .await
                .or_fail("CreateTargetGroup", id)?;
            let arn = r
                .target_groups()
                .first()
                .and_then(|t| t.target_group_arn())
                .unwrap_or_default()
                .to_string();
            Ok(p.after(ctx, d, out(&[("arn", Value::str(arn.as_str()))]), Some(arn)))
        }
        kinds::AWS_LISTENER => {
            let action = action_of(id, pr.map("default_action")?)?;
            let r = elb
                .create_listener()
                .load_balancer_arn(pr.str("load_balancer")?)
                .port(pr.i32("port")?)
                .protocol(ProtocolEnum::from(pr.str("protocol")?))
                .set_certificates(
                    pr.opt_str("certificate")
                        .map(|c| vec![Certificate::builder().certificate_arn(c).build()]),
                )
                .set_ssl_policy(pr.opt_str("ssl_policy").map(str::to_string))
                .default_actions(action)
                .set_tags(Some(t))
                .send()
                .await
                .or_fail("CreateListener", id)?;
            let arn = r
                .listeners()
                .first()
                .and_then(|l| l.listener_arn())
                .unwrap_or_default()
                .to_string();
            Ok(p.after(ctx, d, out(&[("arn", Value::str(arn.as_str()))]), Some(arn)))
        }
        kinds::AWS_LISTENER_RULE => {
            let listener = pr.str("listener")?;
            let mut t = t;
            if let Some(cert) = pr.opt_str("certificate") {
                attach_certificate(p, id, listener, cert, true).await?;
                t.push(Tag::builder().key(tags::CERTIFICATE).value(cert).build());
            }
            let r = elb
                .create_rule()
                .listener_arn(listener)
                .priority(pr.i32("priority")?)
                .conditions(host_condition(pr.str("host")?))
                .actions(
                    Action::builder()
                        .r#type(ActionTypeEnum::Forward)
                        .target_group_arn(pr.str("target_group")?)
                        .build(),
                )
                .set_tags(Some(t))
                .send()
                .await
                .or_fail("CreateRule", id)?;
            let arn = r
                .rules()
                .first()
                .and_then(|r| r.rule_arn())
                .unwrap_or_default()
                .to_string();
            Ok(p.after(ctx, d, out(&[("arn", Value::str(arn.as_str()))]), Some(arn)))
        }
        other => Err(ProviderError::hard(
            "create",
            format!("{id}: unknown kind {other}"),
        )),
    }
}

/// Change a load balancer, target group, listener or rule in place.
pub async fn update(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
    current: &Observed,
    changed: &[String],
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let elb = &p.c.elb;
    let arn = output(current, "arn")?;
    let has = |k: &str| changed.iter().any(|c| c == k);
    match d.kind.as_str() {
        kinds::AWS_LOAD_BALANCER => {
            if has("subnets") {
                elb.set_subnets()
                    .load_balancer_arn(arn)
                    .set_subnets(Some(pr.id_set("subnets")?))
                    .send()
                    .await
                    .or_fail("SetSubnets", id)?;
            }
            if has("security_groups") {
                elb.set_security_groups()
                    .load_balancer_arn(arn)
                    .set_security_groups(Some(pr.id_set("security_groups")?))
                    .send()
                    .await
                    .or_fail("SetSecurityGroups", id)?;
            }
            if has("idle_timeout_seconds") {
                set_idle_timeout(p, id, arn, pr.int("idle_timeout_seconds")?).await?;
            }
        }
        kinds::AWS_TARGET_GROUP => {
            elb.modify_target_group()
                .target_group_arn(arn)
                .health_check_protocol(ProtocolEnum::from(pr.str("health_check_protocol")?))
                .set_health_check_path(pr.opt_str("health_check_path").map(str::to_string))
                .send()
                .await
                .or_fail("ModifyTargetGroup", id)?;
        }
        kinds::AWS_LISTENER => {
            elb.modify_listener()
                .listener_arn(arn)
                .protocol(ProtocolEnum::from(pr.str("protocol")?))
                .set_certificates(
                    pr.opt_str("certificate")
                        .map(|c| vec![Certificate::builder().certificate_arn(c).build()]),
                )
                .set_ssl_policy(pr.opt_str("ssl_policy").map(str::to_string))
                .default_actions(action_of(id, pr.map("default_action")?)?)
                .send()
                .await
                .or_fail("ModifyListener", id)?;
        }
        kinds::AWS_LISTENER_RULE => {
            let listener = pr.str("listener")?;
            if has("certificate") {
                let old = current.props.get("certificate").and_then(Value::as_str);
                if let Some(cert) = pr.opt_str("certificate") {
                    attach_certificate(p, id, listener, cert, true).await?;
                    elb.add_tags()
                        .resource_arns(arn)
                        .tags(Tag::builder().key(tags::CERTIFICATE).value(cert).build())
                        .send()
                        .await
                        .or_fail("AddTags", id)?;
                }
                if let Some(old) = old.filter(|o| Some(*o) != pr.opt_str("certificate")) {
                    attach_certificate(p, id, listener, old, false).await?;
                }
            }
            if has("host") || has("target_group") {
                elb.modify_rule()
                    .rule_arn(arn)
                    .conditions(host_condition(pr.str("host")?))
                    .actions(
                        Action::builder()
                            .r#type(ActionTypeEnum::Forward)
                            .target_group_arn(pr.str("target_group")?)
                            .build(),
                    )
                    .send()
                    .await
                    .or_fail("ModifyRule", id)?;
            }
            if has("priority") {
                elb.set_rule_priorities()
                    .rule_priorities(
                        aws_sdk_elasticloadbalancingv2::types::RulePriorityPair::builder()
                            .rule_arn(arn)
                            .priority(pr.i32("priority")?)
                            .build(),
                    )
                    .send()
                    .await
                    .or_fail("SetRulePriorities", id)?;
            }
        }
        _ => {}
    }
    Ok(p.after(
        &StepCtx {
            generation: current.generation,
            ..ctx.clone()
        },
        d,
        current.outputs.clone(),
        current.handle.clone(),
    ))
}

/// Delete a load balancer, target group, listener or rule.
pub async fn delete(p: &AwsProvider, _ctx: &StepCtx, o: &Observed) -> Result<(), ProviderError> {
    let id = &o.id;
    let elb = &p.c.elb;
    let arn = output(o, "arn")?;
    match o.kind.as_str() {
        kinds::AWS_LOAD_BALANCER => {
            elb.delete_load_balancer()
                .load_balancer_arn(arn)
                .send()
                .await
                .or_missing("DeleteLoadBalancer", id)?;
        }
        kinds::AWS_TARGET_GROUP => {
            // In use until its listener or service is gone.
            super::wait::while_in_use(
                id,
                "DeleteTargetGroup",
                std::time::Duration::from_secs(10 * 60),
                || async {
                    elb.delete_target_group()
                        .target_group_arn(arn)
                        .send()
                        .await
                        .or_missing("DeleteTargetGroup", id)
                        .map(drop)
                },
            )
            .await?;
        }
        kinds::AWS_LISTENER => {
            elb.delete_listener()
                .listener_arn(arn)
                .send()
                .await
                .or_missing("DeleteListener", id)?;
        }
        _ => {
            elb.delete_rule()
                .rule_arn(arn)
                .send()
                .await
                .or_missing("DeleteRule", id)?;
            if let (Some(listener), Some(cert)) = (
                o.props.get("listener").and_then(Value::as_str),
                o.props.get("certificate").and_then(Value::as_str),
            ) {
                attach_certificate(p, id, listener, cert, false).await?;
            }
        }
    }
    Ok(())
}
