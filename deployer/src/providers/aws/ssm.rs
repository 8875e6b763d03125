//! SSM parameters of the stage under `/boxlite/<stage>/`: plain configuration
//! parameters and generated secrets (`SecureString`).
//!
//! A secret's value is generated here, at create time, from the operating
//! system's random source; it never enters the graph, the plan, the journal
//! or a log line, and boxctl never reads it back (except the database
//! password, handed straight to RDS). DescribeParameters (filtered by path
//! and by the stack/stage tags) does not return tags, so each parameter also
//! names its resource id, and a secret its format, in its description.

use std::collections::BTreeMap;

use aws_sdk_ssm::types::{ParameterStringFilter, ParameterTier, ParameterType, Tag};
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use stack::{Props as PropMap, Resource, ResourceId, Value, kinds};

use super::errors::{self, AwsResult};
use super::props::Props;
use super::{AwsProvider, out, output, tags};
use crate::engine::provider::{Observed, ProviderError, StepCtx};

/// What a parameter's description records.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    /// `<stack>/<stage>/<id>`.
    boxctl: String,
    /// Generation of the resource.
    #[serde(default)]
    generation: u64,
    /// A secret's prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    /// A secret's random bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes: Option<i64>,
}

fn describe(p: &AwsProvider, ctx: &StepCtx, d: &Resource) -> String {
    let pr = Props::of(&d.id, &d.props);
    let m = Marker {
        boxctl: format!("{}/{}/{}", p.stack, p.stage, d.id),
        generation: ctx.generation,
        prefix: (d.kind == kinds::AWS_SECRET)
            .then(|| pr.opt_str("prefix").unwrap_or("").to_string()),
        bytes: (d.kind == kinds::AWS_SECRET).then(|| pr.int("bytes").unwrap_or(32)),
    };
    serde_json::to_string(&m).expect("marker serializes")
}

fn ssm_tags(p: &AwsProvider, ctx: &StepCtx, d: &Resource) -> Result<Vec<Tag>, ProviderError> {
    p.tags_for(&d.id, &d.policy, ctx.generation)
        .into_iter()
        .map(|(k, v)| {
            Tag::builder()
                .key(k)
                .value(v)
                .build()
                .map_err(|e| ProviderError::hard("tag", format!("{}: {e}", d.id)))
        })
        .collect()
}

fn filter(
    key: &str,
    option: Option<&str>,
    value: &str,
) -> Result<ParameterStringFilter, ProviderError> {
    ParameterStringFilter::builder()
        .key(key)
        .set_option(option.map(str::to_string))
        .values(value)
        .build()
        .map_err(|e| ProviderError::hard("DescribeParameters", e.to_string()))
}

/// Every parameter and secret of the stage.
pub async fn observe(p: &AwsProvider) -> Result<Vec<Observed>, ProviderError> {
    let path = stack::resolve::aws::ssm_prefix(&p.stage);
    let metadata =
        p.c.ssm
            .describe_parameters()
            .parameter_filters(filter(
                "Path",
                Some("Recursive"),
                path.trim_end_matches('/'),
            )?)
            .parameter_filters(filter(
                &format!("tag:{}", stack::tags::STACK),
                None,
                &p.stack,
            )?)
            .parameter_filters(filter(
                &format!("tag:{}", stack::tags::STAGE),
                None,
                &p.stage,
            )?)
            .max_results(50)
            .into_paginator()
            .send()
            .try_collect()
            .await
            .or_fail("DescribeParameters", "observing SSM parameters")?;
    let metadata: Vec<_> = metadata.iter().flat_map(|page| page.parameters()).collect();
    let ours_prefix = format!("{}/{}/", p.stack, p.stage);
    let mut found = Vec::new();
    for m in metadata {
        let (Some(name), Some(desc)) = (m.name(), m.description()) else {
            continue;
        };
        let Ok(marker) = serde_json::from_str::<Marker>(desc) else {
            continue;
        };
        let Some(id) = marker.boxctl.strip_prefix(&ours_prefix) else {
            continue;
        };
        found.push((
            ResourceId::new(id),
            name.to_string(),
            m.r#type().cloned(),
            m.arn().map(str::to_string),
            marker,
        ));
    }
    // Values of the plain parameters, ten names per call.
    let plain: Vec<String> = found
        .iter()
        .filter(|f| f.2 == Some(ParameterType::String))
        .map(|f| f.1.clone())
        .collect();
    let mut values = BTreeMap::new();
    for chunk in plain.chunks(10) {
        let r =
            p.c.ssm
                .get_parameters()
                .set_names(Some(chunk.to_vec()))
                .send()
                .await
                .or_fail("GetParameters", "observing SSM parameters")?;
        for prm in r.parameters() {
            if let (Some(n), Some(v)) = (prm.name(), prm.value()) {
                values.insert(n.to_string(), v.to_string());
            }
        }
    }
    let mut all = Vec::new();
    for (id, name, ty, arn, marker) in found {
        let ident = tags::Identity {
            id,
            policy: Default::default(),
            generation: marker.generation,
        };
        let arn = arn.unwrap_or_default();
        let outputs = out(&[
            ("name", Value::str(name.as_str())),
            ("arn", Value::str(arn)),
        ]);
        let (kind, props) = if ty == Some(ParameterType::SecureString) {
            (
                kinds::AWS_SECRET,
                PropMap::from([
                    ("name".into(), Value::str(name.as_str())),
                    (
                        "prefix".into(),
                        Value::Str(marker.prefix.unwrap_or_default()),
                    ),
                    ("bytes".into(), Value::Int(marker.bytes.unwrap_or(0))),
                ]),
            )
        } else {
            let Some(value) = values.get(&name) else {
                continue;
            };
            (
                kinds::AWS_PARAMETER,
                PropMap::from([
                    ("name".into(), Value::str(name.as_str())),
                    ("value".into(), Value::str(value.as_str())),
                ]),
            )
        };
        all.push(p.observed(ident, kind, props, outputs, Some(name)));
    }
    Ok(all)
}

/// A new random secret: prefix, then `bytes` random bytes in base64url.
fn generate(prefix: &str, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
    )
}

/// Create a parameter, or generate and store a secret.
pub async fn create(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let name = pr.str("name")?;
    let (value, ty) = if d.kind == kinds::AWS_SECRET {
        let bytes = usize::try_from(pr.int("bytes")?.clamp(16, 256)).unwrap_or(32);
        (
            generate(pr.str("prefix")?, bytes),
            ParameterType::SecureString,
        )
    } else {
        (pr.str("value")?.to_string(), ParameterType::String)
    };
    let r =
        p.c.ssm
            .put_parameter()
            .name(name)
            .value(&value)
            .r#type(ty)
            .tier(ParameterTier::Standard)
            .description(describe(p, ctx, d))
            .set_tags(Some(ssm_tags(p, ctx, d)?))
            .send()
            .await;
    if let Err(e) = r {
        let err = if errors::code_of(&e).as_deref() == Some("ParameterAlreadyExists") {
            ProviderError::hard(
                "PutParameter",
                format!("{id}: the parameter {name} already exists and is not this stage's"),
            )
            .with_hint("delete or rename it (`aws ssm delete-parameter --name …`); boxctl never overwrites a parameter it did not create")
        } else {
            errors::to_provider("PutParameter", id, &e)
        };
        return Err(errors::redact(err, &value));
    }
    drop(value);
    let arn = match p
        .c
        .ssm
        .describe_parameters()
        .parameter_filters(filter("Name", Some("Equals"), name)?)
        .send()
        .await
        .or_fail("DescribeParameters", id)?
        .parameters()
        .first()
        .and_then(|m| m.arn())
    {
        Some(a) => a.to_string(),
        None => format!(
            "arn:{}:ssm:{}:{}:parameter{name}",
            stack::resolve::aws::partition(&p.region),
            p.region,
            "*"
        ),
    };
    Ok(p.after(
        ctx,
        d,
        out(&[("name", Value::str(name)), ("arn", Value::Str(arn))]),
        Some(name.to_string()),
    ))
}

/// Change a parameter's value (secrets only change by replacement).
pub async fn update(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
    current: &Observed,
    _changed: &[String],
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let ctx = StepCtx {
        generation: current.generation,
        ..ctx.clone()
    };
    if d.kind == kinds::AWS_PARAMETER {
        let pr = Props::of(id, &d.props);
        p.c.ssm
            .put_parameter()
            .name(pr.str("name")?)
            .value(pr.str("value")?)
            .r#type(ParameterType::String)
            .description(describe(p, &ctx, d))
            .overwrite(true)
            .send()
            .await
            .or_fail("PutParameter", id)?;
    }
    Ok(p.after(&ctx, d, current.outputs.clone(), current.handle.clone()))
}

/// Delete a parameter or secret.
pub async fn delete(p: &AwsProvider, _ctx: &StepCtx, o: &Observed) -> Result<(), ProviderError> {
    p.c.ssm
        .delete_parameter()
        .name(output(o, "name")?)
        .send()
        .await
        .or_missing("DeleteParameter", &o.id)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_random_and_carry_their_prefix() {
        let a = generate("bxr_", 32);
        let b = generate("bxr_", 32);
        assert_ne!(a, b);
        assert!(a.starts_with("bxr_"));
        assert_eq!(a.len(), 4 + 43);
        assert!(
            a[4..]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }

    #[test]
    fn markers_name_the_resource_and_never_a_value() {
        let m = Marker {
            boxctl: "boxlite/prod/secret/runner-1-token".into(),
            generation: 2,
            prefix: Some("bxr_".into()),
            bytes: Some(32),
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Marker>(&text).unwrap(), m);
        assert!(text.len() < 1024, "fits an SSM description");
    }
}
