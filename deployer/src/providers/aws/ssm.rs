//! SSM parameters of the stage under `/boxlite/<stage>/`: plain configuration
//! parameters and generated secrets (`SecureString`).
//!
//! A secret's value is generated here, at create time, from the operating
//! system's random source; it never enters the graph, the plan, the journal
//! or a log line, and boxctl never reads it back (except the database
//! password, handed straight to RDS). DescribeParameters (filtered by path
//! and by the stack/stage tags) does not return tags, so each parameter also
//! names its resource id, and a secret its format, in its description.
//!
//! Runner tokens (`runner-tokens/<runner>`) are not resources of their own:
//! each runner host mints its token when it is launched, keeps the digest in
//! a tag and deletes the parameter when it goes. Observation reads the
//! stage's top level and `config/` only, so nothing it lists grows with the
//! number of runners.

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
    /// SHA-256 of a secret's value (what the control plane stores of a
    /// runner token), so it is known without reading the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    /// `json` when the value is a JSON object of strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    format: Option<String>,
}

/// True when a parameter's description is boxctl's marker: the parameter is
/// one boxctl generated for a stage, not an operator's secret.
pub fn is_generated(description: &str) -> bool {
    serde_json::from_str::<Marker>(description).is_ok()
}

fn describe(p: &AwsProvider, ctx: &StepCtx, d: &Resource, sha256: Option<String>) -> String {
    let pr = Props::of(&d.id, &d.props);
    let m = Marker {
        boxctl: format!("{}/{}/{}", p.stack, p.stage, d.id),
        generation: ctx.generation,
        prefix: (d.kind == kinds::AWS_SECRET)
            .then(|| pr.opt_str("prefix").unwrap_or("").to_string()),
        bytes: (d.kind == kinds::AWS_SECRET).then(|| pr.int("bytes").unwrap_or(32)),
        sha256,
        format: pr.opt_str("format").map(str::to_string),
    };
    serde_json::to_string(&m).expect("marker serializes")
}

/// The text stored for a parameter: its value, or a JSON object of strings
/// (`format = "json"`) in canonical form.
fn stored_value(d: &Resource) -> Result<String, ProviderError> {
    let pr = Props::of(&d.id, &d.props);
    match (pr.opt_str("format"), d.props.get("value")) {
        (Some("json"), Some(Value::Map(m))) => {
            let obj: serde_json::Map<String, serde_json::Value> = m
                .iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|s| (k.clone(), serde_json::Value::String(s.to_string())))
                        .ok_or_else(|| {
                            ProviderError::hard(
                                "read properties",
                                format!("{}: value.{k} is not text", d.id),
                            )
                        })
                })
                .collect::<Result<_, _>>()?;
            Ok(serde_json::Value::Object(obj).to_string())
        }
        _ => Ok(pr.str("value")?.to_string()),
    }
}

/// A stored value as the plan compares it.
fn observed_value(text: &str, format: Option<&str>) -> Value {
    if format == Some("json")
        && let Ok(serde_json::Value::Object(m)) = serde_json::from_str(text)
    {
        return Value::Map(
            m.into_iter()
                .map(|(k, v)| (k, Value::Str(v.as_str().unwrap_or_default().to_string())))
                .collect(),
        );
    }
    Value::str(text)
}

fn ssm_tags(
    p: &AwsProvider,
    ctx: &StepCtx,
    id: &ResourceId,
    policy: &stack::Policy,
) -> Result<Vec<Tag>, ProviderError> {
    p.tags_for(id, policy, ctx.generation)
        .into_iter()
        .map(|(k, v)| {
            Tag::builder()
                .key(k)
                .value(v)
                .build()
                .map_err(|e| ProviderError::hard("tag", format!("{id}: {e}")))
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

/// The stage's parameters one level below `folder` (tag-filtered, paginated).
async fn list_level(
    p: &AwsProvider,
    folder: &str,
) -> Result<Vec<aws_sdk_ssm::types::ParameterMetadata>, ProviderError> {
    let pages =
        p.c.ssm
            .describe_parameters()
            .parameter_filters(filter("Path", Some("OneLevel"), folder)?)
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
    Ok(pages
        .into_iter()
        .flat_map(|page| page.parameters.unwrap_or_default())
        .collect())
}

/// Every parameter and secret of the stage (runner tokens belong to their hosts).
pub async fn observe(p: &AwsProvider) -> Result<Vec<Observed>, ProviderError> {
    let path = stack::resolve::aws::ssm_prefix(&p.stage);
    let top = path.trim_end_matches('/');
    let config = format!("{path}config");
    let (mut metadata, config) = futures::try_join!(list_level(p, top), list_level(p, &config))?;
    metadata.extend(config);
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
        let mut outputs = out(&[
            ("name", Value::str(name.as_str())),
            ("arn", Value::str(arn)),
        ]);
        if let Some(h) = &marker.sha256 {
            outputs.insert("sha256".into(), Value::str(h.as_str()));
        }
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
            outputs.insert("value_sha256".into(), Value::str(stack::sha256_hex(value)));
            let mut props = PropMap::from([
                ("name".into(), Value::str(name.as_str())),
                (
                    "value".into(),
                    observed_value(value, marker.format.as_deref()),
                ),
            ]);
            if let Some(f) = &marker.format {
                props.insert("format".into(), Value::str(f.as_str()));
            }
            (kinds::AWS_PARAMETER, props)
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

/// Mint the token of runner host `id` into the SecureString `name`, or keep
/// the one an interrupted launch of the same host already stored there.
/// Returns the token's SHA-256, the only thing of it boxctl keeps.
pub async fn mint_runner_token(
    p: &AwsProvider,
    ctx: &StepCtx,
    id: &ResourceId,
    policy: &stack::Policy,
    name: &str,
) -> Result<String, ProviderError> {
    if let Some(sha) = runner_token_digest(p, id, name).await? {
        return Ok(sha);
    }
    let owner = format!("{}/{}/{id}", p.stack, p.stage);
    let token = generate(protocol::RUNNER_TOKEN_PREFIX, 32);
    let sha = stack::sha256_hex(&token);
    let marker = Marker {
        boxctl: owner,
        generation: ctx.generation,
        prefix: Some(protocol::RUNNER_TOKEN_PREFIX.to_string()),
        bytes: Some(32),
        sha256: Some(sha.clone()),
        format: None,
    };
    let r =
        p.c.ssm
            .put_parameter()
            .name(name)
            .value(&token)
            .r#type(ParameterType::SecureString)
            .tier(ParameterTier::Standard)
            .description(serde_json::to_string(&marker).expect("marker serializes"))
            .set_tags(Some(ssm_tags(p, ctx, id, policy)?))
            .send()
            .await;
    if let Err(e) = r {
        // Another writer got there between the look and the put: look again.
        let err = if errors::code_of(&e).as_deref() == Some("ParameterAlreadyExists") {
            ProviderError::retryable("PutParameter", format!("{id}: {name} appeared meanwhile"))
        } else {
            errors::to_provider("PutParameter", id, &e)
        };
        return Err(errors::redact(err, &token));
    }
    Ok(sha)
}

/// The SHA-256 of runner host `id`'s token stored in `name`, from the
/// parameter's marker; `None` when there is no such parameter, an error when
/// it is not this runner's. A token minted before hosts owned their tokens
/// (marked `secret/<runner>-token`) is this runner's too.
pub async fn runner_token_digest(
    p: &AwsProvider,
    id: &ResourceId,
    name: &str,
) -> Result<Option<String>, ProviderError> {
    let Some(existing) = described(p, id, name).await? else {
        return Ok(None);
    };
    let runner = id.as_str().trim_start_matches("runner/");
    let owners = [
        format!("{}/{}/{id}", p.stack, p.stage),
        format!("{}/{}/secret/{runner}-token", p.stack, p.stage),
    ];
    match existing
        .description()
        .and_then(|d| serde_json::from_str::<Marker>(d).ok())
    {
        Some(Marker {
            boxctl,
            sha256: Some(sha),
            ..
        }) if owners.contains(&boxctl) => Ok(Some(sha)),
        _ => Err(ProviderError::hard(
            "PutParameter",
            format!("{id}: the parameter {name} exists and is not this runner's token"),
        )
        .with_hint("delete or rename it (`aws ssm delete-parameter --name …`); boxctl never overwrites a parameter it did not create")),
    }
}

/// Delete the stage's runner tokens that outlived their hosts (a launch that
/// failed after minting, its runner then no longer declared). Only `destroy`
/// calls this, once every host is gone: nothing else lists the tokens.
pub async fn sweep_runner_tokens(p: &AwsProvider) -> Result<usize, ProviderError> {
    let folder = format!(
        "{}{}",
        stack::resolve::aws::ssm_prefix(&p.stage),
        stack::resolve::aws::RUNNER_TOKENS
    );
    let ours = format!("{}/{}/", p.stack, p.stage);
    let mut swept = 0;
    for m in list_level(p, &folder).await? {
        let owned = m
            .description()
            .and_then(|d| serde_json::from_str::<Marker>(d).ok())
            .is_some_and(|marker| marker.boxctl.starts_with(&ours));
        if let (true, Some(name)) = (owned, m.name()) {
            delete_named(p, &ResourceId::new(name), name).await?;
            swept += 1;
        }
    }
    Ok(swept)
}

/// One parameter's metadata by exact name, if it exists.
async fn described(
    p: &AwsProvider,
    id: &ResourceId,
    name: &str,
) -> Result<Option<aws_sdk_ssm::types::ParameterMetadata>, ProviderError> {
    let r =
        p.c.ssm
            .describe_parameters()
            .parameter_filters(filter("Name", Some("Equals"), name)?)
            .send()
            .await
            .or_fail("DescribeParameters", id)?;
    Ok(r.parameters.unwrap_or_default().into_iter().next())
}

/// Delete the parameter `name` of resource `id` (already gone is fine).
pub async fn delete_named(
    p: &AwsProvider,
    id: &ResourceId,
    name: &str,
) -> Result<(), ProviderError> {
    p.c.ssm
        .delete_parameter()
        .name(name)
        .send()
        .await
        .or_missing("DeleteParameter", id)?;
    Ok(())
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
        (stored_value(d)?, ParameterType::String)
    };
    let value_sha256 = stack::sha256_hex(&value);
    let secret_sha256 = (ty == ParameterType::SecureString).then(|| value_sha256.clone());
    let r =
        p.c.ssm
            .put_parameter()
            .name(name)
            .value(&value)
            .r#type(ty.clone())
            .tier(ParameterTier::Standard)
            .description(describe(p, ctx, d, secret_sha256.clone()))
            .set_tags(Some(ssm_tags(p, ctx, &d.id, &d.policy)?))
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
    let arn = match described(p, id, name).await?.as_ref().and_then(|m| m.arn()) {
        Some(a) => a.to_string(),
        None => format!(
            "arn:{}:ssm:{}:{}:parameter{name}",
            stack::resolve::aws::partition(&p.region),
            p.region,
            "*"
        ),
    };
    let mut outputs = out(&[("name", Value::str(name)), ("arn", Value::Str(arn))]);
    match secret_sha256 {
        Some(h) => outputs.insert("sha256".into(), Value::Str(h)),
        None => outputs.insert("value_sha256".into(), Value::Str(value_sha256)),
    };
    Ok(p.after(ctx, d, outputs, Some(name.to_string())))
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
    let mut outputs = current.outputs.clone();
    if d.kind == kinds::AWS_PARAMETER {
        let pr = Props::of(id, &d.props);
        let value = stored_value(d)?;
        p.c.ssm
            .put_parameter()
            .name(pr.str("name")?)
            .value(&value)
            .r#type(ParameterType::String)
            .description(describe(p, &ctx, d, None))
            .overwrite(true)
            .send()
            .await
            .or_fail("PutParameter", id)?;
        outputs.insert("value_sha256".into(), Value::str(stack::sha256_hex(&value)));
    }
    Ok(p.after(&ctx, d, outputs, current.handle.clone()))
}

/// Delete a parameter or secret.
pub async fn delete(p: &AwsProvider, _ctx: &StepCtx, o: &Observed) -> Result<(), ProviderError> {
    delete_named(p, &o.id, output(o, "name")?).await
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
            boxctl: "boxlite/prod/runner/runner-1".into(),
            generation: 2,
            prefix: Some("bxr_".into()),
            bytes: Some(32),
            sha256: Some("ab".repeat(32)),
            format: None,
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Marker>(&text).unwrap(), m);
        assert!(text.len() < 1024, "fits an SSM description");
    }
}
