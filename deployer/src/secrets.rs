//! Stage secrets set by operators (`boxctl secret`): SSM `SecureString`
//! parameters under `/boxlite/<stage>/` on aws, a 0600 JSON file in the stage
//! directory on local. Values go to the services that name them and nowhere
//! else: not into plans, journals, logs or errors.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use aws_sdk_ssm::types::{ParameterStringFilter, ParameterType};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A secret value; its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    /// Wrap a value.
    pub fn new(value: impl Into<String>) -> Self {
        SecretValue(value.into())
    }

    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A secret's name and when it last changed; never its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    /// Name.
    pub name: String,
    /// Last change, when known.
    #[serde(with = "time::serde::rfc3339::option")]
    pub modified: Option<OffsetDateTime>,
}

/// Where a stage's secrets live.
pub enum SecretStore {
    /// A 0600 JSON file (local stages).
    File(PathBuf),
    /// SSM `SecureString` parameters under a prefix (aws stages).
    Ssm {
        /// SSM client.
        client: aws_sdk_ssm::Client,
        /// `/boxlite/<stage>/`.
        prefix: String,
    },
}

/// The file of a local stage's secrets.
pub fn local_file(stage_dir: &Path) -> PathBuf {
    stage_dir.join("secrets").join("stage-secrets.json")
}

/// Contents of the local secrets file.
#[derive(Default, Serialize, Deserialize)]
struct FileContents {
    /// Random per stage; salts digests of values so a digest reveals nothing.
    salt: String,
    secrets: BTreeMap<String, FileEntry>,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    value: String,
    #[serde(with = "time::serde::rfc3339")]
    modified: OffsetDateTime,
}

fn read_file(path: &Path) -> anyhow::Result<FileContents> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a valid secrets file; fix or remove it, then set the secrets again",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileContents::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_file(path: &Path, contents: &FileContents) -> anyhow::Result<()> {
    let dir = path.parent().context("the secrets file has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(contents)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The description boxctl gives an operator's secret in SSM (not the
/// ownership marker of generated parameters: deploys never touch these).
const SSM_DESCRIPTION: &str = "BoxLite stage secret (boxctl secret set)";

impl SecretStore {
    /// Set (or replace) a secret.
    pub async fn set(&self, name: &str, value: &SecretValue) -> anyhow::Result<()> {
        stack::secrets::check_name(name).map_err(anyhow::Error::msg)?;
        if value.expose().is_empty() {
            bail!(
                "the value of {name} is empty; an unset secret is removed with `boxctl secret rm`"
            );
        }
        match self {
            SecretStore::File(path) => {
                let mut c = read_file(path)?;
                if c.salt.is_empty() {
                    c.salt = hex::encode(rand::random::<[u8; 16]>());
                }
                c.secrets.insert(
                    name.to_string(),
                    FileEntry {
                        value: value.expose().to_string(),
                        modified: OffsetDateTime::now_utc(),
                    },
                );
                write_file(path, &c)
            }
            SecretStore::Ssm { client, prefix } => {
                client
                    .put_parameter()
                    .name(format!("{prefix}{name}"))
                    .r#type(ParameterType::SecureString)
                    .value(value.expose())
                    .description(SSM_DESCRIPTION)
                    .overwrite(true)
                    .send()
                    .await
                    .map_err(|e| ssm_error("PutParameter", name, e))?;
                Ok(())
            }
        }
    }

    /// A secret's value, if it is set.
    pub async fn get(&self, name: &str) -> anyhow::Result<Option<SecretValue>> {
        match self {
            SecretStore::File(path) => Ok(read_file(path)?
                .secrets
                .remove(name)
                .map(|e| SecretValue(e.value))),
            SecretStore::Ssm { client, prefix } => {
                match client
                    .get_parameter()
                    .name(format!("{prefix}{name}"))
                    .with_decryption(true)
                    .send()
                    .await
                {
                    Ok(r) => Ok(r.parameter().and_then(|p| p.value()).map(SecretValue::new)),
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|e| e.is_parameter_not_found()) =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(ssm_error("GetParameter", name, e)),
                }
            }
        }
    }

    /// Remove a secret; false when it was not set.
    pub async fn remove(&self, name: &str) -> anyhow::Result<bool> {
        match self {
            SecretStore::File(path) => {
                let mut c = read_file(path)?;
                if c.secrets.remove(name).is_none() {
                    return Ok(false);
                }
                write_file(path, &c)?;
                Ok(true)
            }
            SecretStore::Ssm { client, prefix } => {
                if !self.list().await?.iter().any(|s| s.name == name) {
                    // Never delete what boxctl generated for the stage.
                    return Ok(false);
                }
                match client
                    .delete_parameter()
                    .name(format!("{prefix}{name}"))
                    .send()
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|e| e.is_parameter_not_found()) =>
                    {
                        Ok(false)
                    }
                    Err(e) => Err(ssm_error("DeleteParameter", name, e)),
                }
            }
        }
    }

    /// Every secret set for the stage (names and times, never values).
    pub async fn list(&self) -> anyhow::Result<Vec<SecretInfo>> {
        match self {
            SecretStore::File(path) => Ok(read_file(path)?
                .secrets
                .into_iter()
                .map(|(name, e)| SecretInfo {
                    name,
                    modified: Some(e.modified),
                })
                .collect()),
            SecretStore::Ssm { client, prefix } => {
                let filter = ParameterStringFilter::builder()
                    .key("Path")
                    .option("OneLevel")
                    .values(prefix.trim_end_matches('/'))
                    .build()
                    .map_err(|e| anyhow::anyhow!("building the parameter filter: {e}"))?;
                let pages: Vec<_> = client
                    .describe_parameters()
                    .parameter_filters(filter)
                    .max_results(50)
                    .into_paginator()
                    .send()
                    .try_collect()
                    .await
                    .map_err(|e| ssm_error("DescribeParameters", "", e))?;
                let mut out = Vec::new();
                for page in pages {
                    for p in page.parameters() {
                        let Some(name) = p.name().and_then(|n| n.strip_prefix(prefix.as_str()))
                        else {
                            continue;
                        };
                        // Generated parameters carry boxctl's marker;
                        // operators' secrets are SecureStrings with a valid name.
                        let generated = p
                            .description()
                            .is_some_and(crate::providers::aws::ssm::is_generated);
                        if generated
                            || p.r#type() != Some(&ParameterType::SecureString)
                            || stack::secrets::check_name(name).is_err()
                        {
                            continue;
                        }
                        out.push(SecretInfo {
                            name: name.to_string(),
                            modified: p
                                .last_modified_date()
                                .and_then(|d| OffsetDateTime::from_unix_timestamp(d.secs()).ok()),
                        });
                    }
                }
                out.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(out)
            }
        }
    }

    /// Names of the secrets that are set.
    pub async fn names(&self) -> anyhow::Result<BTreeSet<String>> {
        Ok(self.list().await?.into_iter().map(|s| s.name).collect())
    }
}

/// Values of `names` from a local secrets file, and a salted digest of them
/// (to restart a process when one changes without revealing anything).
pub fn local_values(
    path: &Path,
    names: &BTreeMap<String, String>,
) -> anyhow::Result<(BTreeMap<String, SecretValue>, String)> {
    use sha2::{Digest, Sha256};
    let c = read_file(path)?;
    let mut values = BTreeMap::new();
    let mut h = Sha256::new();
    h.update(c.salt.as_bytes());
    for (var, name) in names {
        let Some(e) = c.secrets.get(name) else {
            bail!("secret {name} (for {var}) is not set; set it with `boxctl secret set {name}`");
        };
        h.update(var.as_bytes());
        h.update([0]);
        h.update(e.value.as_bytes());
        h.update([0]);
        values.insert(var.clone(), SecretValue(e.value.clone()));
    }
    Ok((values, hex::encode(h.finalize())))
}

fn ssm_error<E>(call: &str, name: &str, e: aws_sdk_ssm::error::SdkError<E>) -> anyhow::Error
where
    E: std::error::Error + aws_sdk_ssm::error::ProvideErrorMetadata + Send + Sync + 'static,
{
    use aws_sdk_ssm::error::ProvideErrorMetadata as _;
    let what = if name.is_empty() {
        String::new()
    } else {
        format!(" for secret {name}")
    };
    let code = e.code().unwrap_or("error").to_string();
    let message = e.message().unwrap_or("no message").to_string();
    let hint = match code.as_str() {
        "AccessDeniedException" => {
            "; the credentials need ssm:PutParameter/GetParameter/DeleteParameter/DescribeParameters on /boxlite/<stage>/* and kms:Decrypt/Encrypt on the SSM key"
        }
        _ => "",
    };
    anyhow::anyhow!("SSM {call}{what} failed: {code}: {message}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_local_file_keeps_names_and_values_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = local_file(dir.path());
        let store = SecretStore::File(path.clone());
        assert!(store.list().await.unwrap().is_empty());
        store
            .set("sentry-dsn", &SecretValue::new("https://k@sentry"))
            .await
            .unwrap();
        store
            .set("search-key", &SecretValue::new("s3cr3t"))
            .await
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["search-key", "sentry-dsn"]);
        assert_eq!(
            store.get("search-key").await.unwrap(),
            Some(SecretValue::new("s3cr3t"))
        );
        assert!(store.set("Bad Name", &SecretValue::new("x")).await.is_err());
        assert!(store.set("empty", &SecretValue::new("")).await.is_err());
        assert!(store.remove("search-key").await.unwrap());
        assert!(!store.remove("search-key").await.unwrap());
        assert_eq!(store.get("search-key").await.unwrap(), None);
        assert_eq!(
            format!("{:?}", SecretValue::new("s3cr3t")),
            "SecretValue(<redacted>)"
        );

        let wanted = BTreeMap::from([("SENTRY_DSN".to_string(), "sentry-dsn".to_string())]);
        let (values, d1) = local_values(&path, &wanted).unwrap();
        assert_eq!(values["SENTRY_DSN"].expose(), "https://k@sentry");
        assert!(!d1.contains("sentry"));
        store
            .set("sentry-dsn", &SecretValue::new("https://other@sentry"))
            .await
            .unwrap();
        let (_, d2) = local_values(&path, &wanted).unwrap();
        assert_ne!(d1, d2, "a changed value changes the digest");
        let missing = BTreeMap::from([("X".to_string(), "absent".to_string())]);
        let e = local_values(&path, &missing).unwrap_err().to_string();
        assert!(
            e.contains("absent") && e.contains("boxctl secret set"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_corrupt_file_is_a_precise_error_and_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = local_file(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{not json").unwrap();
        let store = SecretStore::File(path.clone());
        let e = store
            .set("a", &SecretValue::new("v"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid secrets file"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"{not json");
    }
}
