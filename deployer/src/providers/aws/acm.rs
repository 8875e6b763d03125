//! ACM certificates validated by DNS, and the wait for their issuance.
//!
//! A certificate's DNS validation records are outputs of the certificate
//! (`validation_records`), for whoever serves the zone to publish (boxctl's
//! Cloudflare provider, or the operator). `certvalidation/*` resources stand
//! for "the certificate is issued": observed once ACM says ISSUED, created by
//! waiting (bounded) for it; HTTPS listeners depend on them.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_acm::types::{CertificateStatus, Tag, ValidationMethod};
use stack::{Props as PropMap, Resource, ResourceId, Value, kinds};

use super::errors::{AwsResult, Kind};
use super::props::Props;
use super::wait::{self, Bounds, Poll};
use super::{AwsProvider, out, output, tags};
use crate::engine::provider::{Observed, ProviderError, StepCtx};

/// How long a deploy waits for a certificate to be issued.
pub const ISSUE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

const ALL_STATUSES: [CertificateStatus; 7] = [
    CertificateStatus::PendingValidation,
    CertificateStatus::Issued,
    CertificateStatus::Inactive,
    CertificateStatus::Expired,
    CertificateStatus::ValidationTimedOut,
    CertificateStatus::Revoked,
    CertificateStatus::Failed,
];

/// What `describe_certificate` says about one certificate.
struct Detail {
    domain: String,
    sans: Vec<String>,
    status: String,
    records: Value,
}

async fn describe(
    p: &AwsProvider,
    what: &dyn std::fmt::Display,
    arn: &str,
) -> Result<Option<Detail>, ProviderError> {
    let r =
        p.c.acm
            .describe_certificate()
            .certificate_arn(arn)
            .send()
            .await
            .or_missing("DescribeCertificate", what)?;
    let Some(c) = r.as_ref().and_then(|r| r.certificate()) else {
        return Ok(None);
    };
    let domain = c.domain_name().unwrap_or_default().to_string();
    let mut sans: Vec<String> = c
        .subject_alternative_names()
        .iter()
        .filter(|s| **s != domain)
        .cloned()
        .collect();
    sans.sort();
    // A wildcard and its base name share one record: list each once.
    let mut records: BTreeMap<String, Value> = BTreeMap::new();
    for o in c.domain_validation_options() {
        if let Some(rr) = o.resource_record() {
            records.insert(
                rr.name().to_string(),
                Value::Map(BTreeMap::from([
                    ("name".to_string(), Value::str(rr.name())),
                    ("type".to_string(), Value::str(rr.r#type().as_str())),
                    ("value".to_string(), Value::str(rr.value())),
                ])),
            );
        }
    }
    Ok(Some(Detail {
        domain,
        sans,
        status: c
            .status()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        records: Value::List(records.into_values().collect()),
    }))
}

/// Certificates of the stage (among those for names under its domain) and
/// the validations that are complete.
pub async fn observe(p: &AwsProvider) -> Result<Vec<Observed>, ProviderError> {
    let summaries =
        p.c.acm
            .list_certificates()
            .set_certificate_statuses(Some(ALL_STATUSES.to_vec()))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .or_fail("ListCertificates", "observing certificates")?;
    let suffix = format!(".{}", p.domain);
    let candidates: Vec<String> = summaries
        .iter()
        .filter(|s| {
            s.domain_name()
                .is_some_and(|d| d == p.domain || d.ends_with(&suffix))
        })
        .filter_map(|s| s.certificate_arn().map(str::to_string))
        .collect();
    let found = futures::future::try_join_all(candidates.iter().map(|arn| async move {
        let t =
            p.c.acm
                .list_tags_for_certificate()
                .certificate_arn(arn)
                .send()
                .await
                .or_missing("ListTagsForCertificate", "observing certificates")?;
        let Some(t) = t else { return Ok(None) };
        let map = tags::to_map(t.tags().iter().map(|t| (t.key(), t.value().unwrap_or(""))));
        let Some(ident) = p.identity(&map) else {
            return Ok(None);
        };
        let detail = describe(p, &ident.id, arn).await?;
        Ok::<_, ProviderError>(detail.map(|d| (ident, arn.clone(), d)))
    }))
    .await?;
    let mut found: Vec<_> = found.into_iter().flatten().collect();
    found.sort_by(|a, b| {
        a.0.id
            .cmp(&b.0.id)
            .then(b.0.generation.cmp(&a.0.generation))
    });
    let mut all = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (ident, arn, d) in found {
        let newest = seen.insert(ident.id.clone());
        if newest && d.status == CertificateStatus::Issued.as_str() {
            let v = tags::Identity {
                id: ResourceId::new(format!("certvalidation/{}", ident.id.name())),
                policy: Default::default(),
                generation: ident.generation,
            };
            all.push(p.observed(
                v,
                kinds::AWS_CERTIFICATE_VALIDATION,
                PropMap::from([("certificate".into(), Value::str(arn.as_str()))]),
                out(&[("arn", Value::str(arn.as_str()))]),
                Some(arn.clone()),
            ));
        }
        all.push(p.observed(
            ident,
            kinds::AWS_CERTIFICATE,
            PropMap::from([
                ("domain".into(), Value::str(d.domain)),
                ("alternative_names".into(), Value::strs(d.sans)),
                ("validation_method".into(), Value::str("DNS")),
            ]),
            {
                let mut o = validation_outputs(&d.records);
                o.extend(out(&[
                    ("arn", Value::str(arn.as_str())),
                    ("validation_records", d.records),
                    ("status", Value::Str(d.status)),
                ]));
                o
            },
            Some(arn),
        ));
    }
    Ok(all)
}

/// Request a certificate (or wait for one to be issued).
pub async fn create(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    if d.kind == kinds::AWS_CERTIFICATE_VALIDATION {
        let arn = pr.str("certificate")?;
        wait_issued(p, id, arn).await?;
        return Ok(p.after(
            ctx,
            d,
            out(&[("arn", Value::str(arn))]),
            Some(arn.to_string()),
        ));
    }
    let t: Vec<Tag> = p
        .tags_for(id, &d.policy, ctx.generation)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect::<Result<_, _>>()
        .map_err(|e| ProviderError::hard("tag", format!("{id}: {e}")))?;
    let sans = pr.strs("alternative_names")?;
    let domain = pr.str("domain")?;
    let mut names = vec![domain.to_string()];
    names.extend(sans);
    // ACM answers a token with its certificate for an hour, even after that
    // certificate was deleted: a token whose certificate never becomes
    // visible is stale, and the next salt is tried.
    let mut found = None;
    for salt in 0..=super::MAX_SALT {
        let r =
            p.c.acm
                .request_certificate()
                .domain_name(domain)
                .set_subject_alternative_names(Some(names.clone()))
                .validation_method(ValidationMethod::Dns)
                .idempotency_token(super::token(ctx, id, salt, 32, true))
                .set_tags(Some(t.clone()))
                .send()
                .await
                .or_fail("RequestCertificate", id)?;
        let arn = r.certificate_arn().unwrap_or_default().to_string();
        if let Some(records) = validation_records(p, id, &arn).await? {
            found = Some((arn, records));
            break;
        }
    }
    let (arn, records) = found.ok_or_else(|| {
        ProviderError::hard(
            "RequestCertificate",
            format!("{id}: every idempotency token answered with a deleted certificate"),
        )
        .with_hint("wait an hour for ACM to forget the old tokens, then deploy again")
    })?;
    let mut outputs = validation_outputs(&records);
    outputs.extend(out(&[
        ("arn", Value::str(arn.as_str())),
        ("validation_records", records),
    ]));
    Ok(p.after(ctx, d, outputs, Some(arn)))
}

/// `validation_name` and `validation_value`: the certificate's one DNS
/// validation record (a name and its wildcard share it) as a DNS provider
/// stores it, lowercase without the trailing dot.
fn validation_outputs(records: &Value) -> BTreeMap<String, Value> {
    let field = |r: &Value, k: &str| {
        r.as_map()
            .and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
    };
    let first = records.as_list().and_then(|l| l.first());
    match first.and_then(|r| Some((field(r, "name")?, field(r, "value")?))) {
        Some((name, value)) => out(&[
            ("validation_name", Value::Str(name)),
            ("validation_value", Value::Str(value)),
        ]),
        None => BTreeMap::new(),
    }
}

/// The validation records of a certificate just requested, once ACM has
/// assigned them (seconds); `None` when the certificate never shows up (the
/// request's token belonged to a deleted certificate).
async fn validation_records(
    p: &AwsProvider,
    id: &ResourceId,
    arn: &str,
) -> Result<Option<Value>, ProviderError> {
    let started = tokio::time::Instant::now();
    let mut interval = Duration::from_millis(500);
    let mut seen = false;
    loop {
        match describe(p, id, arn).await {
            Ok(Some(d)) if d.records.as_list().is_some_and(|l| !l.is_empty()) => {
                return Ok(Some(d.records));
            }
            Ok(Some(_)) => seen = true,
            Ok(None) => {}
            Err(e) if e.is_retryable() => {}
            Err(e) => return Err(e),
        }
        let elapsed = started.elapsed();
        if !seen && elapsed >= Duration::from_secs(60) {
            return Ok(None);
        }
        if elapsed >= Duration::from_secs(180) {
            return Err(ProviderError::hard(
                "DescribeCertificate",
                format!("{id}: ACM assigned no DNS validation records to {arn} within 3 minutes"),
            )
            .with_hint("run deploy again; the certificate is found by its tags"));
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_secs(10));
    }
}

async fn wait_issued(p: &AwsProvider, id: &ResourceId, arn: &str) -> Result<(), ProviderError> {
    let detail = describe(p, id, arn).await?;
    let records = detail
        .as_ref()
        .map(|d| crate::render::inline(&d.records))
        .unwrap_or_default();
    if detail.is_some_and(|d| d.status == CertificateStatus::PendingValidation.as_str()) {
        eprintln!(
            "      wait  {id}: ACM issues the certificate once these DNS records exist: {records}"
        );
    }
    wait::until(
        id,
        "DescribeCertificate",
        "the certificate to be issued (its DNS validation records must be published)",
        Bounds::up_to(ISSUE_TIMEOUT),
        &format!("publish the validation records in the zone, then run deploy again: {records}"),
        || async {
            let Some(d) = describe(p, id, arn).await? else {
                return Ok(Poll::Pending("not visible yet".into()));
            };
            match d.status.as_str() {
                "ISSUED" => Ok(Poll::Ready(())),
                "PENDING_VALIDATION" => Ok(Poll::Pending(d.status)),
                other => Err(ProviderError::hard(
                    "DescribeCertificate",
                    format!("{id}: certificate {arn} is {other}, it will not be issued"),
                )
                .with_hint("delete the certificate in ACM; the next deploy requests a new one")),
            }
        },
    )
    .await
}

/// Certificates cannot change in place; only validations "update" (by waiting).
pub async fn update(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
    current: &Observed,
    _changed: &[String],
) -> Result<Observed, ProviderError> {
    if d.kind == kinds::AWS_CERTIFICATE_VALIDATION {
        let arn = Props::of(&d.id, &d.props).str("certificate")?;
        wait_issued(p, &d.id, arn).await?;
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

/// Delete a certificate. During a replacement the old certificate is still
/// attached to its listener until the listener moves to the new one: it is
/// then left for the next deploy to delete (as a duplicate of the newer one).
pub async fn delete(p: &AwsProvider, _ctx: &StepCtx, o: &Observed) -> Result<(), ProviderError> {
    if o.kind == kinds::AWS_CERTIFICATE_VALIDATION {
        return Ok(());
    }
    let id = &o.id;
    let arn = output(o, "arn")?;
    match p
        .c
        .acm
        .delete_certificate()
        .certificate_arn(arn)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if super::errors::kind_of(&e) == Kind::NotFound => Ok(()),
        Err(e) if super::errors::code_of(&e).as_deref() == Some("ResourceInUseException") => {
            if newer_exists(p, o).await? {
                eprintln!(
                    "      note  {id}: the replaced certificate {arn} is still attached; the next deploy deletes it"
                );
                Ok(())
            } else {
                Err(super::errors::build(
                    Kind::Eventual,
                    "DeleteCertificate",
                    format!("{id}: certificate {arn} is still in use by a listener"),
                ))
            }
        }
        Err(e) => Err(super::errors::to_provider("DeleteCertificate", id, &e)),
    }
}

async fn newer_exists(p: &AwsProvider, o: &Observed) -> Result<bool, ProviderError> {
    Ok(observe(p)
        .await?
        .iter()
        .any(|c| c.id == o.id && c.kind == o.kind && c.generation > o.generation))
}
