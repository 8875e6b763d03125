//! The stage bucket: artifacts, backups, and boxctl's lock and journal.
//!
//! It must exist before a deploy can take its lock, so `deploy` and
//! `destroy` first run a small idempotent bootstrap ([`ensure`]) that creates
//! it with the same settings and tags the graph declares; from then on it is
//! observed like any other resource. Its name is derived from the stack, so
//! it is looked up directly rather than listed.
//!
//! Destroying a non-production stage empties it (every version) except the
//! lock and journal while the apply runs; the bucket itself goes last, after
//! the lock is released ([`remove`]).

use std::collections::BTreeMap;

use aws_sdk_s3::types::{
    BucketLocationConstraint, BucketVersioningStatus, CreateBucketConfiguration, Delete,
    ObjectIdentifier, PublicAccessBlockConfiguration, ServerSideEncryption,
    ServerSideEncryptionByDefault, ServerSideEncryptionConfiguration, ServerSideEncryptionRule,
    Tag, Tagging, VersioningConfiguration,
};
use stack::{Props as PropMap, Resource, ResourceId, Value, kinds};

use super::errors::{self, AwsResult};
use super::props::Props;
use super::store::STATE_PREFIX;
use super::{AwsProvider, out, tags};
use crate::engine::provider::{Observed, ProviderError, StepCtx};

fn outputs(p: &AwsProvider, name: &str) -> BTreeMap<String, Value> {
    let partition = stack::resolve::aws::partition(&p.region);
    out(&[
        ("name", Value::str(name)),
        ("arn", Value::str(format!("arn:{partition}:s3:::{name}"))),
    ])
}

/// The bucket's tags: `None` when there is no bucket, an empty map when it has none.
async fn bucket_tags(
    p: &AwsProvider,
    what: &dyn std::fmt::Display,
) -> Result<Option<BTreeMap<String, String>>, ProviderError> {
    match p.c.s3.get_bucket_tagging().bucket(&p.bucket).send().await {
        Ok(t) => Ok(Some(tags::to_map(
            t.tag_set().iter().map(|t| (t.key(), t.value())),
        ))),
        Err(e) => match errors::code_of(&e).as_deref() {
            Some("NoSuchTagSet") => Ok(Some(BTreeMap::new())),
            Some("NoSuchBucket") => Ok(None),
            _ if errors::kind_of(&e) == errors::Kind::NotFound => Ok(None),
            _ => Err(errors::to_provider("GetBucketTagging", what, &e)),
        },
    }
}

fn foreign(p: &AwsProvider, t: &BTreeMap<String, String>) -> ProviderError {
    ProviderError::hard(
        "GetBucketTagging",
        format!(
            "bucket {} belongs to {}/{}, not to {}/{}",
            p.bucket,
            t.get(stack::tags::STACK).map_or("?", String::as_str),
            t.get(stack::tags::STAGE).map_or("?", String::as_str),
            p.stack,
            p.stage
        ),
    )
    .with_hint("two stages resolve to one bucket name; rename the stack or stage")
}

/// The stage bucket, if it exists and is this stage's.
pub async fn observe(p: &AwsProvider) -> Result<Vec<Observed>, ProviderError> {
    let Some(t) = bucket_tags(p, &"observing the stage bucket").await? else {
        return Ok(Vec::new());
    };
    let Some(ident) = p.identity(&t) else {
        if t.contains_key(stack::tags::STACK) {
            return Err(foreign(p, &t));
        }
        // Created by a bootstrap that died before tagging: the next create adopts it.
        return Ok(Vec::new());
    };
    let b = &p.bucket;
    let what = ident.id.clone();
    let (versioning, pab, enc) = futures::try_join!(
        async {
            p.c.s3
                .get_bucket_versioning()
                .bucket(b)
                .send()
                .await
                .or_fail("GetBucketVersioning", &what)
        },
        async {
            p.c.s3
                .get_public_access_block()
                .bucket(b)
                .send()
                .await
                .or_missing("GetPublicAccessBlock", &what)
        },
        async {
            p.c.s3
                .get_bucket_encryption()
                .bucket(b)
                .send()
                .await
                .or_missing("GetBucketEncryption", &what)
        },
    )?;
    let blocked = pab
        .as_ref()
        .and_then(|r| r.public_access_block_configuration())
        .is_some_and(|c| {
            c.block_public_acls() == Some(true)
                && c.ignore_public_acls() == Some(true)
                && c.block_public_policy() == Some(true)
                && c.restrict_public_buckets() == Some(true)
        });
    let encryption = enc
        .as_ref()
        .and_then(|r| r.server_side_encryption_configuration())
        .and_then(|c| c.rules().first())
        .and_then(|r| r.apply_server_side_encryption_by_default())
        .map(|d| d.sse_algorithm().as_str().to_string())
        .unwrap_or_else(|| "none".to_string());
    let props = PropMap::from([
        ("name".into(), Value::str(b.as_str())),
        (
            "versioning".into(),
            Value::Bool(versioning.status() == Some(&BucketVersioningStatus::Enabled)),
        ),
        ("block_public_access".into(), Value::Bool(blocked)),
        ("encryption".into(), Value::Str(encryption)),
    ]);
    Ok(vec![p.observed(
        ident,
        kinds::AWS_BUCKET,
        props,
        outputs(p, b),
        Some(b.clone()),
    )])
}

async fn put_tags(
    p: &AwsProvider,
    id: &ResourceId,
    pairs: Vec<(String, String)>,
) -> Result<(), ProviderError> {
    let set = pairs
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProviderError::hard("PutBucketTagging", format!("{id}: {e}")))?;
    let tagging = Tagging::builder()
        .set_tag_set(Some(set))
        .build()
        .map_err(|e| ProviderError::hard("PutBucketTagging", format!("{id}: {e}")))?;
    p.c.s3
        .put_bucket_tagging()
        .bucket(&p.bucket)
        .tagging(tagging)
        .send()
        .await
        .or_fail("PutBucketTagging", id)?;
    Ok(())
}

async fn configure(
    p: &AwsProvider,
    d: &Resource,
    changed: Option<&[String]>,
) -> Result<(), ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let b = &p.bucket;
    let wants = |k: &str| changed.is_none_or(|c| c.iter().any(|x| x == k));
    if wants("block_public_access") {
        let on = pr.bool("block_public_access")?;
        p.c.s3
            .put_public_access_block()
            .bucket(b)
            .public_access_block_configuration(
                PublicAccessBlockConfiguration::builder()
                    .block_public_acls(on)
                    .ignore_public_acls(on)
                    .block_public_policy(on)
                    .restrict_public_buckets(on)
                    .build(),
            )
            .send()
            .await
            .or_fail("PutPublicAccessBlock", id)?;
    }
    if wants("versioning") {
        let status = if pr.bool("versioning")? {
            BucketVersioningStatus::Enabled
        } else {
            BucketVersioningStatus::Suspended
        };
        p.c.s3
            .put_bucket_versioning()
            .bucket(b)
            .versioning_configuration(VersioningConfiguration::builder().status(status).build())
            .send()
            .await
            .or_fail("PutBucketVersioning", id)?;
    }
    if wants("encryption") {
        let by_default = ServerSideEncryptionByDefault::builder()
            .sse_algorithm(ServerSideEncryption::from(pr.str("encryption")?))
            .build()
            .map_err(|e| ProviderError::hard("PutBucketEncryption", format!("{id}: {e}")))?;
        let conf = ServerSideEncryptionConfiguration::builder()
            .rules(
                ServerSideEncryptionRule::builder()
                    .apply_server_side_encryption_by_default(by_default)
                    .build(),
            )
            .build()
            .map_err(|e| ProviderError::hard("PutBucketEncryption", format!("{id}: {e}")))?;
        p.c.s3
            .put_bucket_encryption()
            .bucket(b)
            .server_side_encryption_configuration(conf)
            .send()
            .await
            .or_fail("PutBucketEncryption", id)?;
    }
    Ok(())
}

/// Create the bucket, or adopt it when an earlier run created it (ours, untagged).
pub async fn create(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let mut req = p.c.s3.create_bucket().bucket(&p.bucket);
    if p.region != "us-east-1" {
        req = req.create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(p.region.as_str()))
                .build(),
        );
    }
    match req.send().await {
        Ok(_) => {}
        Err(e) => match errors::code_of(&e).as_deref() {
            Some("BucketAlreadyOwnedByYou") => {
                let t = bucket_tags(p, id).await?.unwrap_or_default();
                if t.contains_key(stack::tags::STACK) && p.identity(&t).is_none() {
                    return Err(foreign(p, &t));
                }
            }
            Some("BucketAlreadyExists") => {
                return Err(ProviderError::hard(
                    "CreateBucket",
                    format!("{id}: the bucket name {} is taken by another AWS account", p.bucket),
                )
                .with_hint("bucket names are global; change the stack or stage name (the bucket name is derived from them)"));
            }
            _ => return Err(errors::to_provider("CreateBucket", id, &e)),
        },
    }
    put_tags(p, id, p.tags_for(id, &d.policy, ctx.generation)).await?;
    configure(p, d, None).await?;
    Ok(p.after(ctx, d, outputs(p, &p.bucket), Some(p.bucket.clone())))
}

/// Apply changed settings.
pub async fn update(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
    current: &Observed,
    changed: &[String],
) -> Result<Observed, ProviderError> {
    configure(p, d, Some(changed)).await?;
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

/// Empty the bucket, keeping boxctl's lock and journal; [`remove`] deletes the
/// rest and the bucket once the lock is released.
pub async fn delete(p: &AwsProvider, _ctx: &StepCtx, o: &Observed) -> Result<(), ProviderError> {
    empty(p, &o.id, true).await
}

/// Delete every object version and delete marker (except the state prefix when `keep_state`).
async fn empty(p: &AwsProvider, id: &ResourceId, keep_state: bool) -> Result<(), ProviderError> {
    loop {
        let mut doomed = Vec::new();
        let (mut key_marker, mut version_marker) = (None::<String>, None::<String>);
        loop {
            let page =
                p.c.s3
                    .list_object_versions()
                    .bucket(&p.bucket)
                    .set_key_marker(key_marker.clone())
                    .set_version_id_marker(version_marker.clone())
                    .send()
                    .await
                    .or_missing("ListObjectVersions", id)?;
            let Some(page) = page else { return Ok(()) };
            let versions = page
                .versions()
                .iter()
                .map(|v| (v.key(), v.version_id()))
                .chain(
                    page.delete_markers()
                        .iter()
                        .map(|m| (m.key(), m.version_id())),
                );
            for (key, version) in versions {
                let Some(key) = key else { continue };
                if keep_state && key.starts_with(STATE_PREFIX) {
                    continue;
                }
                doomed.push(
                    ObjectIdentifier::builder()
                        .key(key)
                        .set_version_id(version.map(str::to_string))
                        .build()
                        .map_err(|e| ProviderError::hard("DeleteObjects", format!("{id}: {e}")))?,
                );
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            version_marker = page.next_version_id_marker().map(str::to_string);
        }
        if doomed.is_empty() {
            return Ok(());
        }
        for chunk in doomed.chunks(1000) {
            let batch = Delete::builder()
                .set_objects(Some(chunk.to_vec()))
                .quiet(true)
                .build()
                .map_err(|e| ProviderError::hard("DeleteObjects", format!("{id}: {e}")))?;
            let r =
                p.c.s3
                    .delete_objects()
                    .bucket(&p.bucket)
                    .delete(batch)
                    .send()
                    .await
                    .or_fail("DeleteObjects", id)?;
            if let Some(err) = r.errors().first() {
                return Err(errors::build(
                    errors::Kind::Eventual,
                    "DeleteObjects",
                    format!(
                        "{id}: could not delete {}: {}",
                        err.key().unwrap_or("an object"),
                        err.message().unwrap_or("no reason given")
                    ),
                ));
            }
        }
    }
}

/// Make sure the stage bucket exists and is tagged as this stage's, before
/// the deploy lock is taken in it. `d` is the graph's `bucket/main`.
pub async fn ensure(p: &AwsProvider, d: &Resource) -> Result<bool, ProviderError> {
    match bucket_tags(p, &d.id).await? {
        Some(t) if p.identity(&t).is_some() => Ok(false),
        Some(t) if t.contains_key(stack::tags::STACK) => Err(foreign(p, &t)),
        _ => {
            let ctx = StepCtx {
                stack: p.stack.clone(),
                stage: p.stage.clone(),
                generation: 0,
                attempt: 1,
            };
            create(p, &ctx, d).await?;
            Ok(true)
        }
    }
}

/// Delete the stage bucket with everything in it (every version), once the
/// deploy lock of a destroyed stage has been released.
pub async fn remove(p: &AwsProvider) -> Result<(), ProviderError> {
    let id = ResourceId::from("bucket/main");
    empty(p, &id, false).await?;
    p.c.s3
        .delete_bucket()
        .bucket(&p.bucket)
        .send()
        .await
        .or_missing("DeleteBucket", &id)?;
    Ok(())
}
