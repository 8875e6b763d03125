//! RDS PostgreSQL and its subnet group.
//!
//! The master password is a stage secret (a generated SSM SecureString): the
//! graph holds only its name, the value is read at create time and handed to
//! RDS, never logged or recorded. A create waits (bounded) for the endpoint,
//! which the services' database URL needs; modifications apply immediately,
//! and pending ones count as done so a rerun does not repeat them.

use std::time::Duration;

use aws_sdk_rds::types::Tag;
use stack::{Props as PropMap, Resource, ResourceId, Value, kinds};

use super::errors::AwsResult;
use super::props::{Props, raw_id_set};
use super::wait::{self, Bounds, Poll};
use super::{AwsProvider, out, output, tags};
use crate::engine::provider::{Observed, ProviderError, StepCtx};

/// How long a create waits for the database endpoint, and a delete for it to go.
pub const DB_TIMEOUT: Duration = Duration::from_secs(60 * 60);

fn rds_tags(pairs: Vec<(String, String)>) -> Vec<Tag> {
    pairs
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn tag_map(t: &[Tag]) -> std::collections::BTreeMap<String, String> {
    tags::to_map(
        t.iter()
            .filter_map(|t| Some((t.key()?, t.value().unwrap_or("")))),
    )
}

fn db_url(address: &str, port: i64, user: &str, db: &str) -> String {
    format!("postgres://{user}@{address}:{port}/{db}?sslmode=require")
}

fn identifier(p: &AwsProvider) -> String {
    stack::resolve::aws::aws_name(&p.stack, &p.stage, "", 63)
}

/// The database instance and subnet group of the stage.
pub async fn observe(p: &AwsProvider) -> Result<Vec<Observed>, ProviderError> {
    let name = identifier(p);
    let (instances, group) = futures::try_join!(
        async {
            p.c.rds
                .describe_db_instances()
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("DescribeDBInstances", "observing databases")
        },
        async {
            p.c.rds
                .describe_db_subnet_groups()
                .db_subnet_group_name(&name)
                .send()
                .await
                .or_missing("DescribeDBSubnetGroups", "observing database subnet groups")
        },
    )?;
    let mut all = Vec::new();
    for g in group.iter().flat_map(|g| g.db_subnet_groups()) {
        let Some(arn) = g.db_subnet_group_arn() else {
            continue;
        };
        let t =
            p.c.rds
                .list_tags_for_resource()
                .resource_name(arn)
                .send()
                .await
                .or_fail("ListTagsForResource", "observing database subnet groups")?;
        let Some(ident) = p.identity(&tag_map(t.tag_list())) else {
            continue;
        };
        let gname = g.db_subnet_group_name().unwrap_or_default();
        all.push(p.observed(
            ident,
            kinds::AWS_DB_SUBNET_GROUP,
            PropMap::from([
                ("name".into(), Value::str(gname)),
                (
                    "description".into(),
                    Value::str(g.db_subnet_group_description().unwrap_or_default()),
                ),
                (
                    "subnets".into(),
                    raw_id_set(g.subnets().iter().filter_map(|s| s.subnet_identifier())),
                ),
            ]),
            out(&[("name", Value::str(gname)), ("arn", Value::str(arn))]),
            Some(gname.to_string()),
        ));
    }
    for db in &instances {
        let t = tag_map(db.tag_list());
        let (Some(ident), Some(idf)) = (p.identity(&t), db.db_instance_identifier()) else {
            continue;
        };
        if db.db_instance_status() == Some("deleting") {
            continue;
        }
        // Pending modifications are as good as applied: they are under way.
        let pending = db.pending_modified_values();
        let class = pending
            .and_then(|m| m.db_instance_class())
            .or(db.db_instance_class())
            .unwrap_or_default();
        let storage = pending
            .and_then(|m| m.allocated_storage())
            .or(db.allocated_storage())
            .unwrap_or(0);
        let multi_az = pending
            .and_then(|m| m.multi_az())
            .or(db.multi_az())
            .unwrap_or(false);
        let version = pending
            .and_then(|m| m.engine_version())
            .or(db.engine_version())
            .unwrap_or_default();
        let retention = pending
            .and_then(|m| m.backup_retention_period())
            .or(db.backup_retention_period())
            .unwrap_or(0);
        let user = db.master_username().unwrap_or_default();
        let dbname = db.db_name().unwrap_or_default();
        let mut props = PropMap::from([
            ("identifier".into(), Value::str(idf)),
            ("engine".into(), Value::str(db.engine().unwrap_or_default())),
            (
                "engine_version".into(),
                Value::str(version.split('.').next().unwrap_or(version)),
            ),
            ("instance_class".into(), Value::str(class)),
            (
                "allocated_storage_gb".into(),
                Value::Int(i64::from(storage)),
            ),
            (
                "storage_type".into(),
                Value::str(db.storage_type().unwrap_or_default()),
            ),
            (
                "storage_encrypted".into(),
                Value::Bool(db.storage_encrypted().unwrap_or(false)),
            ),
            ("multi_az".into(), Value::Bool(multi_az)),
            (
                "backup_retention_days".into(),
                Value::Int(i64::from(retention)),
            ),
            ("db_name".into(), Value::str(dbname)),
            ("master_username".into(), Value::str(user)),
            (
                "subnet_group".into(),
                Value::str(
                    db.db_subnet_group()
                        .and_then(|g| g.db_subnet_group_name())
                        .unwrap_or_default(),
                ),
            ),
            (
                "security_groups".into(),
                raw_id_set(
                    db.vpc_security_groups()
                        .iter()
                        .filter_map(|g| g.vpc_security_group_id()),
                ),
            ),
            (
                "publicly_accessible".into(),
                Value::Bool(db.publicly_accessible().unwrap_or(false)),
            ),
            (
                "deletion_protection".into(),
                Value::Bool(db.deletion_protection().unwrap_or(false)),
            ),
        ]);
        // RDS never shows the password; the secret it was set from is recorded.
        if let Some(secret) = t.get(tags::PASSWORD_SECRET) {
            props.insert("master_password".into(), Value::Secret(secret.clone()));
        }
        let mut outputs = out(&[
            ("identifier", Value::str(idf)),
            ("arn", Value::str(db.db_instance_arn().unwrap_or_default())),
        ]);
        if let Some(e) = db.endpoint()
            && let Some(address) = e.address()
        {
            let port = i64::from(e.port().unwrap_or(5432));
            outputs.insert("address".into(), Value::str(address));
            outputs.insert("port".into(), Value::Int(port));
            outputs.insert(
                "url".into(),
                Value::str(db_url(address, port, user, dbname)),
            );
        }
        all.push(p.observed(
            ident,
            kinds::AWS_DB_INSTANCE,
            props,
            outputs,
            Some(idf.to_string()),
        ));
    }
    Ok(all)
}

/// The value of a stage secret (for handing to RDS only).
async fn secret_value(
    p: &AwsProvider,
    id: &ResourceId,
    secret: &str,
) -> Result<String, ProviderError> {
    let name = format!("{}{secret}", stack::resolve::aws::ssm_prefix(&p.stage));
    let r =
        p.c.ssm
            .get_parameter()
            .name(&name)
            .with_decryption(true)
            .send()
            .await
            .or_missing("GetParameter", id)?;
    r.and_then(|r| r.parameter().and_then(|p| p.value().map(str::to_string)))
        .ok_or_else(|| {
            ProviderError::hard(
                "GetParameter",
                format!("{id}: the secret {name} does not exist"),
            )
            .with_hint("deploy creates it before the database; run deploy again")
        })
}

/// Wait for an instance to have an endpoint; its outputs.
async fn wait_endpoint(
    p: &AwsProvider,
    id: &ResourceId,
    idf: &str,
) -> Result<std::collections::BTreeMap<String, Value>, ProviderError> {
    wait::until(
        id,
        "DescribeDBInstances",
        "the database to get its endpoint",
        Bounds::up_to(DB_TIMEOUT),
        "check the instance in the RDS console; run deploy again once it is available",
        || async {
            let r =
                p.c.rds
                    .describe_db_instances()
                    .db_instance_identifier(idf)
                    .send()
                    .await
                    .or_missing("DescribeDBInstances", id)?;
            let Some(db) = r.as_ref().and_then(|r| r.db_instances().first()) else {
                return Ok(Poll::Pending("not visible yet".into()));
            };
            let status = db.db_instance_status().unwrap_or("unknown").to_string();
            if matches!(
                status.as_str(),
                "failed" | "incompatible-parameters" | "incompatible-network" | "storage-full"
            ) {
                return Err(ProviderError::hard(
                    "CreateDBInstance",
                    format!("{id}: the database is {status}"),
                )
                .with_hint("see the instance's events in the RDS console"));
            }
            match db.endpoint().and_then(|e| Some((e.address()?, e.port()))) {
                Some((address, port)) => {
                    let port = i64::from(port.unwrap_or(5432));
                    let user = db.master_username().unwrap_or_default();
                    let name = db.db_name().unwrap_or_default();
                    Ok(Poll::Ready(out(&[
                        ("identifier", Value::str(idf)),
                        ("arn", Value::str(db.db_instance_arn().unwrap_or_default())),
                        ("address", Value::str(address)),
                        ("port", Value::Int(port)),
                        ("url", Value::str(db_url(address, port, user, name))),
                    ])))
                }
                None => Ok(Poll::Pending(status)),
            }
        },
    )
    .await
}

/// Create the subnet group or the database instance.
pub async fn create(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let mut t = p.tags_for(id, &d.policy, ctx.generation);
    match d.kind.as_str() {
        kinds::AWS_DB_SUBNET_GROUP => {
            let name = pr.str("name")?;
            let r =
                p.c.rds
                    .create_db_subnet_group()
                    .db_subnet_group_name(name)
                    .db_subnet_group_description(pr.str("description")?)
                    .set_subnet_ids(Some(pr.id_set("subnets")?))
                    .set_tags(Some(rds_tags(t)))
                    .send()
                    .await
                    .or_fail("CreateDBSubnetGroup", id)?;
            let arn = r
                .db_subnet_group()
                .and_then(|g| g.db_subnet_group_arn())
                .unwrap_or_default();
            Ok(p.after(
                ctx,
                d,
                out(&[("name", Value::str(name)), ("arn", Value::str(arn))]),
                Some(name.to_string()),
            ))
        }
        kinds::AWS_DB_INSTANCE => {
            let Some(Value::Secret(secret)) = d.props.get("master_password") else {
                return Err(ProviderError::hard(
                    "CreateDBInstance",
                    format!("{id}: master_password must name a stage secret"),
                ));
            };
            t.push((tags::PASSWORD_SECRET.to_string(), secret.clone()));
            let password = secret_value(p, id, secret).await?;
            let idf = pr.str("identifier")?;
            p.c.rds
                .create_db_instance()
                .db_instance_identifier(idf)
                .engine(pr.str("engine")?)
                .engine_version(pr.str("engine_version")?)
                .db_instance_class(pr.str("instance_class")?)
                .allocated_storage(pr.i32("allocated_storage_gb")?)
                .storage_type(pr.str("storage_type")?)
                .storage_encrypted(pr.bool("storage_encrypted")?)
                .multi_az(pr.bool("multi_az")?)
                .backup_retention_period(pr.i32("backup_retention_days")?)
                .db_name(pr.str("db_name")?)
                .master_username(pr.str("master_username")?)
                .master_user_password(&password)
                .db_subnet_group_name(pr.str("subnet_group")?)
                .set_vpc_security_group_ids(Some(pr.id_set("security_groups")?))
                .publicly_accessible(pr.bool("publicly_accessible")?)
                .deletion_protection(pr.bool("deletion_protection")?)
                .copy_tags_to_snapshot(true)
                .set_tags(Some(rds_tags(t)))
                .send()
                .await
                .or_fail("CreateDBInstance", id)
                .map_err(|e| super::errors::redact(e, &password))?;
            drop(password);
            let outputs = wait_endpoint(p, id, idf).await?;
            Ok(p.after(ctx, d, outputs, Some(idf.to_string())))
        }
        other => Err(ProviderError::hard(
            "create",
            format!("{id}: unknown kind {other}"),
        )),
    }
}

/// Modify the subnet group or the instance (applied immediately).
pub async fn update(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
    current: &Observed,
    changed: &[String],
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let has = |k: &str| changed.iter().any(|c| c == k);
    match d.kind.as_str() {
        kinds::AWS_DB_SUBNET_GROUP => {
            p.c.rds
                .modify_db_subnet_group()
                .db_subnet_group_name(pr.str("name")?)
                .db_subnet_group_description(pr.str("description")?)
                .set_subnet_ids(Some(pr.id_set("subnets")?))
                .send()
                .await
                .or_fail("ModifyDBSubnetGroup", id)?;
        }
        _ => {
            let mut m =
                p.c.rds
                    .modify_db_instance()
                    .db_instance_identifier(pr.str("identifier")?)
                    .apply_immediately(true);
            if has("engine_version") {
                m = m
                    .engine_version(pr.str("engine_version")?)
                    .allow_major_version_upgrade(true);
            }
            if has("instance_class") {
                m = m.db_instance_class(pr.str("instance_class")?);
            }
            if has("allocated_storage_gb") {
                m = m.allocated_storage(pr.i32("allocated_storage_gb")?);
            }
            if has("storage_type") {
                m = m.storage_type(pr.str("storage_type")?);
            }
            if has("multi_az") {
                m = m.multi_az(pr.bool("multi_az")?);
            }
            if has("backup_retention_days") {
                m = m.backup_retention_period(pr.i32("backup_retention_days")?);
            }
            if has("security_groups") {
                m = m.set_vpc_security_group_ids(Some(pr.id_set("security_groups")?));
            }
            if has("publicly_accessible") {
                m = m.publicly_accessible(pr.bool("publicly_accessible")?);
            }
            if has("deletion_protection") {
                m = m.deletion_protection(pr.bool("deletion_protection")?);
            }
            m.send().await.or_fail("ModifyDBInstance", id)?;
        }
    }
    let mut o = p.after(
        &StepCtx {
            generation: current.generation,
            ..ctx.clone()
        },
        d,
        current.outputs.clone(),
        current.handle.clone(),
    );
    // The password is set once, at creation.
    if let Some(v) = current.props.get("master_password") {
        o.props.insert("master_password".into(), v.clone());
    }
    Ok(o)
}

/// Delete the instance (no final snapshot: only non-production stages, whose
/// data is not retained, get here) and wait until it is gone, or the subnet group.
pub async fn delete(p: &AwsProvider, _ctx: &StepCtx, o: &Observed) -> Result<(), ProviderError> {
    let id = &o.id;
    match o.kind.as_str() {
        kinds::AWS_DB_SUBNET_GROUP => {
            let name = output(o, "name")?;
            wait::while_in_use(
                id,
                "DeleteDBSubnetGroup",
                Duration::from_secs(10 * 60),
                || async {
                    p.c.rds
                        .delete_db_subnet_group()
                        .db_subnet_group_name(name)
                        .send()
                        .await
                        .or_missing("DeleteDBSubnetGroup", id)
                        .map(drop)
                },
            )
            .await
        }
        _ => {
            let idf = output(o, "identifier")?;
            if o.props.get("deletion_protection") == Some(&Value::Bool(true)) {
                p.c.rds
                    .modify_db_instance()
                    .db_instance_identifier(idf)
                    .deletion_protection(false)
                    .apply_immediately(true)
                    .send()
                    .await
                    .or_missing("ModifyDBInstance", id)?;
            }
            let gone =
                p.c.rds
                    .delete_db_instance()
                    .db_instance_identifier(idf)
                    .skip_final_snapshot(true)
                    .delete_automated_backups(true)
                    .send()
                    .await
                    .or_missing("DeleteDBInstance", id)?
                    .is_none();
            if gone {
                return Ok(());
            }
            wait::until(
                id,
                "DescribeDBInstances",
                "the database to be deleted",
                Bounds::up_to(DB_TIMEOUT),
                "check the instance in the RDS console; run the command again once it is gone",
                || async {
                    let r =
                        p.c.rds
                            .describe_db_instances()
                            .db_instance_identifier(idf)
                            .send()
                            .await
                            .or_missing("DescribeDBInstances", id)?;
                    Ok(match r.as_ref().and_then(|r| r.db_instances().first()) {
                        None => Poll::Ready(()),
                        Some(db) => {
                            Poll::Pending(db.db_instance_status().unwrap_or("unknown").to_string())
                        }
                    })
                },
            )
            .await
        }
    }
}
