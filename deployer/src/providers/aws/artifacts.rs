//! Runner artifacts in the stage bucket, where new runners (their cloud-init)
//! and `boxctl runner upgrade` both fetch them.
//!
//! One build per version, at the resolver's default artifact URL
//! (`artifacts/boxlite-runner/<version>/boxlite-runner-linux-amd64.tar.gz`):
//! the archive carries its SHA-256 as `sha256` object metadata (what `deploy`
//! pins new runners' user data to), with a `.sha256` file beside it and
//! `release.json` (the same record as on local) written last, so a version
//! without its record was never published. Publishing the same build again
//! uploads nothing; a different build of a published version is refused
//! unless forced, because it changes what every runner created from then on
//! installs.

use std::time::Duration;

use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;

use super::AwsProvider;
use super::errors::AwsResult;
use crate::engine::provider::ProviderError;
use crate::platform::artifact::{Artifact, BINARY, Published};

/// How long a presigned download URL handed to a runner stays valid.
pub const URL_TTL: Duration = Duration::from_secs(15 * 60);

/// A release published in the stage bucket.
#[derive(Clone, Debug)]
pub struct S3Release {
    /// Its record.
    pub published: Published,
    /// The stage bucket.
    pub bucket: String,
    /// Key of the archive.
    pub key: String,
}

impl S3Release {
    /// `s3://<bucket>/<key>` of the archive.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// Key of a version's archive: the path of the resolver's default artifact URL.
pub fn archive_key(p: &AwsProvider, version: &str) -> String {
    let url = stack::resolve::aws::default_artifact_url(p.bucket(), version);
    let prefix = format!("s3://{}/", p.bucket());
    url.strip_prefix(&prefix).unwrap_or(&url).to_string()
}

fn beside(key: &str, name: &str) -> String {
    match key.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{name}"),
        None => name.to_string(),
    }
}

fn release_of(p: &AwsProvider, published: Published, key: String) -> S3Release {
    S3Release {
        published,
        bucket: p.bucket().to_string(),
        key,
    }
}

/// The digest recorded on a published archive (`None` when there is none).
async fn published_sha256(p: &AwsProvider, key: &str) -> Result<Option<String>, ProviderError> {
    let what = format!("s3://{}/{key}", p.bucket());
    let head =
        p.c.s3
            .head_object()
            .bucket(p.bucket())
            .key(key)
            .send()
            .await
            .or_missing("HeadObject", &what)?;
    Ok(head.map(|h| {
        h.metadata()
            .and_then(|m| m.get("sha256"))
            .map(|s| s.trim().to_ascii_lowercase())
            .unwrap_or_default()
    }))
}

async fn put(
    p: &AwsProvider,
    key: &str,
    body: Vec<u8>,
    content_type: &str,
    sha256: Option<&str>,
) -> Result<(), ProviderError> {
    let what = format!("s3://{}/{key}", p.bucket());
    let mut req =
        p.c.s3
            .put_object()
            .bucket(p.bucket())
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body));
    if let Some(s) = sha256 {
        req = req.metadata("sha256", s);
    }
    req.send().await.or_fail("PutObject", &what)?;
    Ok(())
}

/// Publish `artifact` to the stage bucket; true when something was uploaded.
/// A different build already published under the same version is refused
/// unless `force`.
pub async fn publish(
    p: &AwsProvider,
    artifact: &Artifact,
    force: bool,
) -> Result<(S3Release, bool), ProviderError> {
    let key = archive_key(p, &artifact.version);
    let record_key = beside(&key, "release.json");
    let published = Published {
        release: artifact.release(),
        version: artifact.version.clone(),
        sha256: artifact.sha256.clone(),
        binary_sha256: artifact.binary_sha256.clone(),
        path: Default::default(),
    };
    let existing = published_sha256(p, &key).await?;
    let same = existing.as_deref() == Some(artifact.sha256.as_str());
    if let Some(other) = existing.as_deref().filter(|_| !same && !force) {
        let other = if other.is_empty() {
            "no recorded sha256".to_string()
        } else {
            format!("sha256 {}", &other[..other.len().min(12)])
        };
        return Err(ProviderError::hard(
            "PutObject",
            format!(
                "version {} is already published at s3://{}/{key} as another build ({other}; this one is {})",
                artifact.version,
                p.bucket(),
                &artifact.sha256[..12]
            ),
        )
        .with_hint(
            "every runner created from now on would install the new build: give the runner a new version, or pass --force to replace the published build",
        ));
    }
    let record_missing = same
        && p.c
            .s3
            .head_object()
            .bucket(p.bucket())
            .key(&record_key)
            .send()
            .await
            .or_missing("HeadObject", format!("s3://{}/{record_key}", p.bucket()))?
            .is_none();
    if same && !record_missing {
        return Ok((release_of(p, published, key), false));
    }
    if !same {
        put(
            p,
            &key,
            artifact.bytes.clone(),
            "application/gzip",
            Some(&artifact.sha256),
        )
        .await?;
    }
    let file = key.rsplit('/').next().unwrap_or(BINARY);
    put(
        p,
        &format!("{key}.sha256"),
        format!("{}  {file}\n", artifact.sha256).into_bytes(),
        "text/plain",
        None,
    )
    .await?;
    // Written last: a version without its record was never published.
    let record = serde_json::to_vec_pretty(&published)
        .map_err(|e| ProviderError::hard("PutObject", e.to_string()))?;
    put(p, &record_key, record, "application/json", None).await?;
    Ok((release_of(p, published, key), true))
}

/// A published release by version (`0.1.0`) or exact release name
/// (`0.1.0-3f800c499e02`).
pub async fn find(p: &AwsProvider, wanted: &str) -> Result<S3Release, ProviderError> {
    let version = match wanted.rsplit_once('-') {
        Some((v, sha12)) if sha12.len() == 12 && sha12.bytes().all(|b| b.is_ascii_hexdigit()) => v,
        _ => wanted,
    };
    let key = archive_key(p, version);
    let record_key = beside(&key, "release.json");
    let what = format!("s3://{}/{record_key}", p.bucket());
    let got =
        p.c.s3
            .get_object()
            .bucket(p.bucket())
            .key(&record_key)
            .send()
            .await
            .or_missing("GetObject", &what)?;
    let Some(got) = got else {
        return Err(ProviderError::hard(
            "GetObject",
            format!("no runner release {wanted:?} is published in s3://{}/{}", p.bucket(), beside(&key, "")),
        )
        .with_hint("publish one with `boxctl runner publish`, or omit --version to publish the workspace's runner"));
    };
    let bytes = got
        .body
        .collect()
        .await
        .map_err(|e| ProviderError::retryable("GetObject", format!("{what}: {e}")))?
        .into_bytes();
    let published: Published = serde_json::from_slice(&bytes).map_err(|e| {
        ProviderError::hard("GetObject", format!("{what} is not a release record: {e}"))
    })?;
    if published.release != wanted && published.version != wanted {
        return Err(ProviderError::hard(
            "GetObject",
            format!(
                "version {version} is published as release {}, not {wanted}",
                published.release
            ),
        )
        .with_hint(format!(
            "the bucket holds one build per version: roll out --version {version}"
        )));
    }
    Ok(release_of(p, published, key))
}

/// A GET URL for `key` in the stage bucket, valid for `ttl`. Signed locally
/// with the caller's credentials: no call to AWS.
pub async fn presign(p: &AwsProvider, key: &str, ttl: Duration) -> Result<String, ProviderError> {
    let config = PresigningConfig::expires_in(ttl)
        .map_err(|e| ProviderError::hard("presign GetObject", e.to_string()))?;
    let req =
        p.c.s3
            .get_object()
            .bucket(p.bucket())
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| {
                ProviderError::hard(
                    "presign GetObject",
                    format!("s3://{}/{key}: {e}", p.bucket()),
                )
                .with_hint("check the AWS credentials boxctl runs with")
            })?;
    Ok(req.uri().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_sit_beside_the_archive() {
        assert_eq!(
            beside("artifacts/boxlite-runner/0.1.0/x.tar.gz", "release.json"),
            "artifacts/boxlite-runner/0.1.0/release.json"
        );
    }
}
