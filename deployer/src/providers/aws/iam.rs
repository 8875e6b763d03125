//! IAM roles (trust policy, managed and inline policies) and instance
//! profiles. Identity is the path `/boxlite/<stack>/<stage>/<id>/` (tags are
//! set too): roles with their policies come from one paginated
//! GetAccountAuthorizationDetails, instance profiles from one path-scoped list.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_iam::types::{EntityType, Tag};
use stack::{Policy, Props as PropMap, Resource, ResourceId, Value, kinds};

use super::errors::AwsResult;
use super::props::Props;
use super::{AwsProvider, out, output, tags};
use crate::engine::provider::{Observed, ProviderError, StepCtx};

fn prefix(p: &AwsProvider) -> String {
    format!("/boxlite/{}/{}/", p.stack, p.stage)
}

/// The resource id encoded in a path of this stage.
fn id_from_path(p: &AwsProvider, path: &str) -> Option<ResourceId> {
    let rest = path.strip_prefix(&prefix(p))?.trim_end_matches('/');
    rest.contains('/').then(|| ResourceId::new(rest))
}

/// Percent-decoding, for policy documents (IAM returns them URL-encoded).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A policy document as canonical JSON (decoded first when URL-encoded).
pub fn canonical_policy(doc: &str) -> String {
    let text = if doc.trim_start().starts_with('{') {
        doc.to_string()
    } else {
        percent_decode(doc)
    };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => stack::resolve::aws::canonical_json(&v),
        Err(_) => text,
    }
}

fn iam_tags(
    p: &AwsProvider,
    id: &ResourceId,
    policy: &Policy,
    generation: u64,
) -> Result<Vec<Tag>, ProviderError> {
    p.tags_for(id, policy, generation)
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

/// Identity from a path, with policies and generation from tags when present.
fn ident_of(p: &AwsProvider, path: &str, t: &[Tag]) -> Option<tags::Identity> {
    let id = id_from_path(p, path)?;
    let map = tags::to_map(t.iter().map(|t| (t.key(), t.value())));
    let from_tags = p.identity(&map);
    Some(tags::Identity {
        id,
        policy: from_tags
            .as_ref()
            .map(|i| i.policy.clone())
            .unwrap_or_default(),
        generation: from_tags.map_or(0, |i| i.generation),
    })
}

/// Every role and instance profile of the stage.
pub async fn observe(p: &AwsProvider) -> Result<Vec<Observed>, ProviderError> {
    let (pages, profiles) = futures::try_join!(
        async {
            p.c.iam
                .get_account_authorization_details()
                .filter(EntityType::Role)
                .into_paginator()
                .send()
                .try_collect()
                .await
                .or_fail("GetAccountAuthorizationDetails", "observing IAM roles")
        },
        async {
            p.c.iam
                .list_instance_profiles()
                .path_prefix(prefix(p))
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("ListInstanceProfiles", "observing instance profiles")
        },
    )?;
    let mut all = Vec::new();
    for role in pages.iter().flat_map(|p| p.role_detail_list()) {
        let (Some(path), Some(name), Some(arn)) = (role.path(), role.role_name(), role.arn())
        else {
            continue;
        };
        let Some(ident) = ident_of(p, path, role.tags()) else {
            continue;
        };
        let mut managed: Vec<String> = role
            .attached_managed_policies()
            .iter()
            .filter_map(|a| a.policy_arn().map(str::to_string))
            .collect();
        managed.sort();
        let inline: BTreeMap<String, Value> = role
            .role_policy_list()
            .iter()
            .filter_map(|d| {
                Some((
                    d.policy_name()?.to_string(),
                    Value::str(canonical_policy(d.policy_document().unwrap_or("{}"))),
                ))
            })
            .collect();
        let props = PropMap::from([
            ("name".into(), Value::str(name)),
            ("path".into(), Value::str(path)),
            (
                "assume_role_policy".into(),
                Value::str(canonical_policy(
                    role.assume_role_policy_document().unwrap_or("{}"),
                )),
            ),
            ("managed_policies".into(), Value::strs(managed)),
            ("inline_policies".into(), Value::Map(inline)),
        ]);
        all.push(p.observed(
            ident,
            kinds::AWS_IAM_ROLE,
            props,
            out(&[("arn", Value::str(arn)), ("name", Value::str(name))]),
            Some(name.to_string()),
        ));
    }
    for prof in &profiles {
        let Some(ident) = ident_of(p, prof.path(), prof.tags()) else {
            continue;
        };
        let name = prof.instance_profile_name();
        let mut props = PropMap::from([
            ("name".into(), Value::str(name)),
            ("path".into(), Value::str(prof.path())),
        ]);
        if let Some(role) = prof.roles().first() {
            props.insert("role".into(), Value::str(role.role_name()));
        }
        all.push(p.observed(
            ident,
            kinds::AWS_INSTANCE_PROFILE,
            props,
            out(&[("arn", Value::str(prof.arn())), ("name", Value::str(name))]),
            Some(name.to_string()),
        ));
    }
    Ok(all)
}

fn already_exists<E>(
    e: &aws_smithy_runtime_api::client::result::SdkError<
        E,
        aws_smithy_runtime_api::client::orchestrator::HttpResponse,
    >,
) -> bool
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    super::errors::code_of(e).as_deref() == Some("EntityAlreadyExists")
}

/// Create a role or instance profile; one of the same name already on this
/// stage's path (an earlier run died before its answer) is adopted.
pub async fn create(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let name = pr.str("name")?;
    let path = pr.str("path")?;
    let t = iam_tags(p, id, &d.policy, ctx.generation)?;
    let foreign = |what: &str, actual: &str| {
        ProviderError::hard(
            "Create",
            format!("{id}: an IAM {what} named {name:?} already exists outside this stage (path {actual})"),
        )
        .with_hint("rename or delete it, or change the stack or stage name")
    };
    match d.kind.as_str() {
        kinds::AWS_IAM_ROLE => {
            let r =
                p.c.iam
                    .create_role()
                    .role_name(name)
                    .path(path)
                    .assume_role_policy_document(pr.str("assume_role_policy")?)
                    .set_tags(Some(t))
                    .send()
                    .await;
            let arn = match r {
                Ok(o) => o.role().map(|r| r.arn().to_string()).unwrap_or_default(),
                Err(e) if already_exists(&e) => {
                    let g =
                        p.c.iam
                            .get_role()
                            .role_name(name)
                            .send()
                            .await
                            .or_fail("GetRole", id)?;
                    let role = g.role().ok_or_else(|| {
                        ProviderError::retryable("GetRole", format!("{id}: not visible yet"))
                    })?;
                    if role.path() != path {
                        return Err(foreign("role", role.path()));
                    }
                    role.arn().to_string()
                }
                Err(e) => return Err(super::errors::to_provider("CreateRole", id, &e)),
            };
            // Converge policies from nothing (or from whatever an earlier run attached).
            let empty = Observed::new(id.clone(), &d.kind, PropMap::new());
            converge_role(p, d, &empty, true).await?;
            Ok(p.after(
                ctx,
                d,
                out(&[("arn", Value::str(arn)), ("name", Value::str(name))]),
                Some(name.to_string()),
            ))
        }
        kinds::AWS_INSTANCE_PROFILE => {
            let r =
                p.c.iam
                    .create_instance_profile()
                    .instance_profile_name(name)
                    .path(path)
                    .set_tags(Some(t))
                    .send()
                    .await;
            let (arn, roles) = match r {
                Ok(o) => (
                    o.instance_profile()
                        .map(|i| i.arn().to_string())
                        .unwrap_or_default(),
                    Vec::new(),
                ),
                Err(e) if already_exists(&e) => {
                    let g =
                        p.c.iam
                            .get_instance_profile()
                            .instance_profile_name(name)
                            .send()
                            .await
                            .or_fail("GetInstanceProfile", id)?;
                    let ip = g.instance_profile().ok_or_else(|| {
                        ProviderError::retryable(
                            "GetInstanceProfile",
                            format!("{id}: not visible yet"),
                        )
                    })?;
                    if ip.path() != path {
                        return Err(foreign("instance profile", ip.path()));
                    }
                    (
                        ip.arn().to_string(),
                        ip.roles()
                            .iter()
                            .map(|r| r.role_name().to_string())
                            .collect(),
                    )
                }
                Err(e) => return Err(super::errors::to_provider("CreateInstanceProfile", id, &e)),
            };
            let role = pr.str("role")?;
            if !roles.iter().any(|r| r == role) {
                p.c.iam
                    .add_role_to_instance_profile()
                    .instance_profile_name(name)
                    .role_name(role)
                    .send()
                    .await
                    .or_fail("AddRoleToInstanceProfile", id)?;
            }
            Ok(p.after(
                ctx,
                d,
                out(&[("arn", Value::str(arn)), ("name", Value::str(name))]),
                Some(name.to_string()),
            ))
        }
        other => Err(ProviderError::hard(
            "create",
            format!("{id}: unknown kind {other}"),
        )),
    }
}

/// Make a role's trust policy, managed and inline policies match.
async fn converge_role(
    p: &AwsProvider,
    d: &Resource,
    current: &Observed,
    fresh: bool,
) -> Result<(), ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let name = pr.str("name")?;
    let iam = &p.c.iam;
    if !fresh && current.props.get("assume_role_policy") != d.props.get("assume_role_policy") {
        iam.update_assume_role_policy()
            .role_name(name)
            .policy_document(pr.str("assume_role_policy")?)
            .send()
            .await
            .or_fail("UpdateAssumeRolePolicy", id)?;
    }
    // What is attached now: from the observation, or asked for on a fresh or adopted role.
    let (have_managed, have_inline): (BTreeSet<String>, BTreeMap<String, Value>) = if fresh {
        let attached = iam
            .list_attached_role_policies()
            .role_name(name)
            .send()
            .await
            .or_fail("ListAttachedRolePolicies", id)?;
        let inline = iam
            .list_role_policies()
            .role_name(name)
            .send()
            .await
            .or_fail("ListRolePolicies", id)?;
        (
            attached
                .attached_policies()
                .iter()
                .filter_map(|a| a.policy_arn().map(str::to_string))
                .collect(),
            inline
                .policy_names()
                .iter()
                .map(|n| (n.clone(), Value::str("")))
                .collect(),
        )
    } else {
        (
            current
                .props
                .get("managed_policies")
                .and_then(Value::as_list)
                .unwrap_or_default()
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            current
                .props
                .get("inline_policies")
                .and_then(Value::as_map)
                .cloned()
                .unwrap_or_default(),
        )
    };
    let want_managed: BTreeSet<String> = pr.strs("managed_policies")?.into_iter().collect();
    for arn in want_managed.difference(&have_managed) {
        iam.attach_role_policy()
            .role_name(name)
            .policy_arn(arn)
            .send()
            .await
            .or_fail("AttachRolePolicy", id)?;
    }
    for arn in have_managed.difference(&want_managed) {
        iam.detach_role_policy()
            .role_name(name)
            .policy_arn(arn)
            .send()
            .await
            .or_missing("DetachRolePolicy", id)?;
    }
    let want_inline = pr.map("inline_policies")?;
    for (policy, doc) in want_inline {
        if have_inline.get(policy) == Some(doc) {
            continue;
        }
        iam.put_role_policy()
            .role_name(name)
            .policy_name(policy)
            .policy_document(doc.as_str().unwrap_or("{}"))
            .send()
            .await
            .or_fail("PutRolePolicy", id)?;
    }
    for policy in have_inline.keys().filter(|k| !want_inline.contains_key(*k)) {
        iam.delete_role_policy()
            .role_name(name)
            .policy_name(policy)
            .send()
            .await
            .or_missing("DeleteRolePolicy", id)?;
    }
    Ok(())
}

/// Change a role's policies or an instance profile's role.
pub async fn update(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
    current: &Observed,
    _changed: &[String],
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    match d.kind.as_str() {
        kinds::AWS_IAM_ROLE => converge_role(p, d, current, false).await?,
        _ => {
            let name = pr.str("name")?;
            if let Some(old) = current.props.get("role").and_then(Value::as_str) {
                p.c.iam
                    .remove_role_from_instance_profile()
                    .instance_profile_name(name)
                    .role_name(old)
                    .send()
                    .await
                    .or_missing("RemoveRoleFromInstanceProfile", id)?;
            }
            p.c.iam
                .add_role_to_instance_profile()
                .instance_profile_name(name)
                .role_name(pr.str("role")?)
                .send()
                .await
                .or_fail("AddRoleToInstanceProfile", id)?;
        }
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

/// Delete a role (after detaching everything) or an instance profile.
pub async fn delete(p: &AwsProvider, _ctx: &StepCtx, o: &Observed) -> Result<(), ProviderError> {
    let id = &o.id;
    let name = output(o, "name")?;
    let iam = &p.c.iam;
    match o.kind.as_str() {
        kinds::AWS_IAM_ROLE => {
            let Some(attached) = iam
                .list_attached_role_policies()
                .role_name(name)
                .send()
                .await
                .or_missing("ListAttachedRolePolicies", id)?
            else {
                return Ok(());
            };
            for a in attached.attached_policies() {
                if let Some(arn) = a.policy_arn() {
                    iam.detach_role_policy()
                        .role_name(name)
                        .policy_arn(arn)
                        .send()
                        .await
                        .or_missing("DetachRolePolicy", id)?;
                }
            }
            if let Some(inline) = iam
                .list_role_policies()
                .role_name(name)
                .send()
                .await
                .or_missing("ListRolePolicies", id)?
            {
                for policy in inline.policy_names() {
                    iam.delete_role_policy()
                        .role_name(name)
                        .policy_name(policy)
                        .send()
                        .await
                        .or_missing("DeleteRolePolicy", id)?;
                }
            }
            if let Some(profiles) = iam
                .list_instance_profiles_for_role()
                .role_name(name)
                .send()
                .await
                .or_missing("ListInstanceProfilesForRole", id)?
            {
                for ip in profiles.instance_profiles() {
                    iam.remove_role_from_instance_profile()
                        .instance_profile_name(ip.instance_profile_name())
                        .role_name(name)
                        .send()
                        .await
                        .or_missing("RemoveRoleFromInstanceProfile", id)?;
                }
            }
            iam.delete_role()
                .role_name(name)
                .send()
                .await
                .or_missing("DeleteRole", id)?;
        }
        _ => {
            if let Some(role) = o.props.get("role").and_then(Value::as_str) {
                iam.remove_role_from_instance_profile()
                    .instance_profile_name(name)
                    .role_name(role)
                    .send()
                    .await
                    .or_missing("RemoveRoleFromInstanceProfile", id)?;
            }
            iam.delete_instance_profile()
                .instance_profile_name(name)
                .send()
                .await
                .or_missing("DeleteInstanceProfile", id)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_documents_compare_whatever_their_encoding() {
        let plain = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"sts:AssumeRole","Principal":{"Service":"ec2.amazonaws.com"}}]}"#;
        let encoded = "%7B%22Version%22%3A%222012-10-17%22%2C%22Statement%22%3A%5B%7B%22Principal%22%3A%7B%22Service%22%3A%22ec2.amazonaws.com%22%7D%2C%22Effect%22%3A%22Allow%22%2C%22Action%22%3A%22sts%3AAssumeRole%22%7D%5D%7D";
        assert_eq!(canonical_policy(plain), canonical_policy(encoded));
        assert!(canonical_policy(plain).contains('\n'));
    }
}
