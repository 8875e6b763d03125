//! The services' CloudWatch Logs log group.

use stack::{Props as PropMap, Resource, Value, kinds};

use super::errors::{self, AwsResult};
use super::props::Props;
use super::{AwsProvider, out, output, tags};
use crate::engine::provider::{Observed, ProviderError, StepCtx};

fn name(p: &AwsProvider) -> String {
    format!("/boxlite/{}/{}", p.stack, p.stage)
}

/// The stage's log group, if it exists and is this stage's.
pub async fn observe(p: &AwsProvider) -> Result<Vec<Observed>, ProviderError> {
    let wanted = name(p);
    let groups =
        p.c.logs
            .describe_log_groups()
            .log_group_name_prefix(&wanted)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .or_fail("DescribeLogGroups", "observing log groups")?;
    let mut all = Vec::new();
    for g in groups
        .iter()
        .filter(|g| g.log_group_name() == Some(wanted.as_str()))
    {
        let arn = g
            .log_group_arn()
            .map(str::to_string)
            .or_else(|| g.arn().map(|a| a.trim_end_matches(":*").to_string()))
            .unwrap_or_default();
        let t =
            p.c.logs
                .list_tags_for_resource()
                .resource_arn(&arn)
                .send()
                .await
                .or_fail("ListTagsForResource", "observing log groups")?;
        let map = tags::to_map(
            t.tags()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let Some(ident) = p.identity(&map) else {
            continue;
        };
        all.push(p.observed(
            ident,
            kinds::AWS_LOG_GROUP,
            PropMap::from([
                ("name".into(), Value::str(wanted.as_str())),
                (
                    "retention_days".into(),
                    Value::Int(i64::from(g.retention_in_days().unwrap_or(0))),
                ),
            ]),
            out(&[
                ("name", Value::str(wanted.as_str())),
                ("arn", Value::Str(arn)),
            ]),
            Some(wanted.clone()),
        ));
    }
    Ok(all)
}

async fn retention(p: &AwsProvider, d: &Resource) -> Result<(), ProviderError> {
    let pr = Props::of(&d.id, &d.props);
    p.c.logs
        .put_retention_policy()
        .log_group_name(pr.str("name")?)
        .retention_in_days(pr.i32("retention_days")?)
        .send()
        .await
        .or_fail("PutRetentionPolicy", &d.id)?;
    Ok(())
}

/// Create the log group (adopting one an earlier run created).
pub async fn create(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let group = pr.str("name")?;
    let mut req = p.c.logs.create_log_group().log_group_name(group);
    for (k, v) in p.tags_for(id, &d.policy, ctx.generation) {
        req = req.tags(k, v);
    }
    match req.send().await {
        Ok(_) => {}
        Err(e) if errors::code_of(&e).as_deref() == Some("ResourceAlreadyExistsException") => {}
        Err(e) => return Err(errors::to_provider("CreateLogGroup", id, &e)),
    }
    retention(p, d).await?;
    let partition = stack::resolve::aws::partition(&p.region);
    let arn = format!("arn:{partition}:logs:{}:*:log-group:{group}", p.region);
    Ok(p.after(
        ctx,
        d,
        out(&[("name", Value::str(group)), ("arn", Value::Str(arn))]),
        Some(group.to_string()),
    ))
}

/// Change the retention.
pub async fn update(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
    current: &Observed,
    _changed: &[String],
) -> Result<Observed, ProviderError> {
    retention(p, d).await?;
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

/// Delete the log group.
pub async fn delete(p: &AwsProvider, _ctx: &StepCtx, o: &Observed) -> Result<(), ProviderError> {
    p.c.logs
        .delete_log_group()
        .log_group_name(output(o, "name")?)
        .send()
        .await
        .or_missing("DeleteLogGroup", &o.id)?;
    Ok(())
}
