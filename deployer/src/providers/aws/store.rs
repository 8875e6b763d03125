//! The deploy lock and journal of an aws stage, in the stage's S3 bucket.
//!
//! S3's conditional requests make the lock atomic without DynamoDB: a write
//! with `If-None-Match: *` succeeds only if the object does not exist, one
//! with `If-Match: <etag>` only if it is still at that version, and S3
//! serialises them (a loser gets 412 Precondition Failed, or 409 when two
//! conditional writes race; both mean "someone else wrote first"). Deletes
//! are conditional too (`If-Match` on DeleteObject), so releasing a lock
//! that was taken over in the meantime leaves the new holder's lock alone.

use aws_sdk_s3::primitives::ByteStream;
use futures::future::BoxFuture;

use super::errors::{self, Kind};
use crate::engine::store::{Condition, Etag, StateStore, StoreError};

/// Key prefix of boxctl's state (lock and journal) in the stage bucket.
pub const STATE_PREFIX: &str = "boxctl/state/";

/// A [`StateStore`] under a prefix of an S3 bucket.
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl S3Store {
    /// The store of `bucket`, keys under [`STATE_PREFIX`].
    pub fn new(client: aws_sdk_s3::Client, bucket: &str) -> Self {
        S3Store {
            client,
            bucket: bucket.to_string(),
            prefix: STATE_PREFIX.to_string(),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

fn quoted(etag: &str) -> String {
    format!("\"{}\"", etag.trim_matches('"'))
}

fn unquoted(etag: Option<&str>) -> Etag {
    etag.unwrap_or_default().trim_matches('"').to_string()
}

/// How an S3 error reads to the lock: a lost race, a missing object, or a failure.
enum Outcome {
    Precondition,
    Missing,
    Failed(String),
}

fn outcome<E>(
    op: &str,
    location: &str,
    e: &aws_smithy_runtime_api::client::result::SdkError<
        E,
        aws_smithy_runtime_api::client::orchestrator::HttpResponse,
    >,
) -> Outcome
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    let (code, status, message) = errors::parts(e);
    match (code.as_deref(), status) {
        (Some("PreconditionFailed" | "ConditionalRequestConflict"), _) | (_, Some(412 | 409)) => {
            Outcome::Precondition
        }
        (Some("NoSuchKey" | "NoSuchBucket" | "NotFound"), _) | (_, Some(404)) => Outcome::Missing,
        _ => {
            let kind = errors::kind_of(e);
            let what = if kind == Kind::Denied || kind == Kind::Credentials {
                format!(
                    "{op} {location}: {}{message} (the deploying identity needs s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket on the stage bucket)",
                    code.map(|c| format!("{c}: ")).unwrap_or_default()
                )
            } else {
                format!(
                    "{op} {location}: {}{message}",
                    code.map(|c| format!("{c}: ")).unwrap_or_default()
                )
            };
            Outcome::Failed(what)
        }
    }
}

impl StateStore for S3Store {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix.trim_end_matches('/'))
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<(Vec<u8>, Etag)>, StoreError>> {
        Box::pin(async move {
            let r = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.key(key))
                .send()
                .await;
            match r {
                Ok(o) => {
                    let etag = unquoted(o.e_tag());
                    let body = o.body.collect().await.map_err(|e| {
                        StoreError::Other(format!("reading {}/{key}: {e}", self.location()))
                    })?;
                    Ok(Some((body.into_bytes().to_vec(), etag)))
                }
                Err(e) => match outcome("GetObject", &self.location(), &e) {
                    Outcome::Missing => Ok(None),
                    Outcome::Precondition => Ok(None),
                    Outcome::Failed(m) => Err(StoreError::Other(m)),
                },
            }
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        body: Vec<u8>,
        cond: Condition,
    ) -> BoxFuture<'a, Result<Etag, StoreError>> {
        Box::pin(async move {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(self.key(key))
                .content_type("application/json")
                .body(ByteStream::from(body));
            match &cond {
                Condition::None => {}
                Condition::IfAbsent => req = req.if_none_match("*"),
                Condition::IfMatch(etag) => req = req.if_match(quoted(etag)),
            }
            match req.send().await {
                Ok(o) => Ok(unquoted(o.e_tag())),
                Err(e) => match outcome("PutObject", &self.location(), &e) {
                    Outcome::Precondition => Err(StoreError::PreconditionFailed),
                    // If-Match on an object that no longer exists.
                    Outcome::Missing if cond != Condition::None => {
                        Err(StoreError::PreconditionFailed)
                    }
                    Outcome::Missing => Err(StoreError::Other(format!(
                        "{} does not exist; `boxctl deploy` creates the stage bucket",
                        self.location()
                    ))),
                    Outcome::Failed(m) => Err(StoreError::Other(m)),
                },
            }
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        cond: Condition,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut req = self
                .client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.key(key));
            if let Condition::IfMatch(etag) = &cond {
                req = req.if_match(quoted(etag));
            }
            match req.send().await {
                Ok(_) => Ok(()),
                Err(e) => match outcome("DeleteObject", &self.location(), &e) {
                    Outcome::Precondition => Err(StoreError::PreconditionFailed),
                    Outcome::Missing if matches!(cond, Condition::IfMatch(_)) => {
                        Err(StoreError::PreconditionFailed)
                    }
                    Outcome::Missing => Ok(()),
                    Outcome::Failed(m) => Err(StoreError::Other(m)),
                },
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let r = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.key(prefix))
                .into_paginator()
                .send()
                .try_collect()
                .await;
            match r {
                Ok(pages) => {
                    let mut keys: Vec<String> = pages
                        .iter()
                        .flat_map(|p| p.contents())
                        .filter_map(|o| o.key())
                        .filter_map(|k| k.strip_prefix(&self.prefix).map(str::to_string))
                        .collect();
                    keys.sort();
                    Ok(keys)
                }
                Err(e) => match outcome("ListObjectsV2", &self.location(), &e) {
                    Outcome::Missing => Ok(Vec::new()),
                    Outcome::Precondition => Ok(Vec::new()),
                    Outcome::Failed(m) => Err(StoreError::Other(m)),
                },
            }
        })
    }
}
