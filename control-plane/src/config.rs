//! Configuration: a TOML file (rendered by boxctl) and `BOXLITE_*` environment
//! variables (ECS has no file), the environment overriding the file.
//!
//! | file key                            | environment                                  |
//! |-------------------------------------|----------------------------------------------|
//! | `listen`                            | `BOXLITE_LISTEN`                             |
//! | `public_url`                        | `BOXLITE_PUBLIC_URL`                         |
//! | `database_url`                      | `BOXLITE_DATABASE_URL`                       |
//! | `database_max_connections`          | `BOXLITE_DATABASE_MAX_CONNECTIONS`           |
//! | `admin_key_file`                    | `BOXLITE_ADMIN_KEY_FILE`, or the key itself in `BOXLITE_ADMIN_KEY` |
//! | `runner_unresponsive_after_secs`    | `BOXLITE_RUNNER_UNRESPONSIVE_AFTER_SECS`     |
//! | `runner_healthcheck_interval_secs`  | `BOXLITE_RUNNER_HEALTHCHECK_INTERVAL_SECS`   |
//! | `log_format` (`text` or `json`)     | `BOXLITE_LOG_FORMAT`                         |
//! | `exec_max_output_bytes`             | `BOXLITE_EXEC_MAX_OUTPUT_BYTES`              |
//! | `exec_max_concurrent_per_org`       | `BOXLITE_EXEC_MAX_CONCURRENT_PER_ORG`        |
//! | `[oidc] issuer`, `audience`         | `BOXLITE_OIDC_ISSUER`, `BOXLITE_OIDC_AUDIENCE` |
//!
//! Unknown file keys are an error. Relative paths are relative to the working
//! directory. Secrets (the admin key, a database password) never appear in
//! `Debug` output or logs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use url::Url;

/// A secret string: `Debug` prints `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself; do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for CloudWatch and other collectors).
    Json,
}

/// OIDC settings: tokens must come from `issuer` and name `audience`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcConfig {
    /// Issuer URL (a trailing slash is tolerated).
    pub issuer: String,
    /// Expected `aud`.
    pub audience: String,
}

/// The control plane's settings, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// URL users and runners reach the API at.
    pub public_url: Url,
    /// `postgres://…` or `sqlite://…`.
    pub database_url: Secret,
    /// Size of the database connection pool.
    pub database_max_connections: u32,
    /// The admin API key ensured to exist at start.
    pub admin_key: Secret,
    /// A runner with no healthcheck for this long is unresponsive.
    pub runner_unresponsive_after: Duration,
    /// Interval runners are told to check in at.
    pub runner_healthcheck_interval: Duration,
    /// OIDC, when users sign in with access tokens.
    pub oidc: Option<OidcConfig>,
    /// Log format.
    pub log_format: LogFormat,
    /// Runners registered at start: name → SHA-256 (hex) of its token
    /// (`BOXLITE_RUNNER_TOKEN_HASHES`, a JSON object; set by boxctl on aws).
    pub declared_runners: BTreeMap<String, String>,
    /// The stage's egress allow-list: private destinations a box may ask to
    /// reach (`egress_allow`, or `BOXLITE_EGRESS_ALLOW`, comma-separated CIDRs).
    pub egress_allow: Vec<protocol::Ipv4Cidr>,
    /// Bytes of each of stdout and stderr a one-shot exec answers with at
    /// most (asked of the runner; its answer is read up to the matching size).
    pub exec_max_output_bytes: u64,
    /// One-shot execs an organization may run at once, across replicas.
    pub exec_max_concurrent_per_org: u32,
}

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default unresponsive window.
pub const DEFAULT_UNRESPONSIVE_AFTER_SECS: u64 = 60;
/// Default pool size.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;
/// Minimum admin key length (prefix included).
pub const MIN_ADMIN_KEY_LEN: usize = 24;
/// Default one-shot execs per organization at once.
pub const DEFAULT_EXEC_MAX_CONCURRENT_PER_ORG: u32 = 8;
/// Largest `exec_max_output_bytes` accepted (its answer is held in memory).
pub const MAX_EXEC_OUTPUT_BYTES: u64 = 64 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    public_url: Option<String>,
    database_url: Option<String>,
    database_max_connections: Option<u32>,
    admin_key_file: Option<PathBuf>,
    runner_unresponsive_after_secs: Option<u64>,
    runner_healthcheck_interval_secs: Option<u64>,
    log_format: Option<LogFormat>,
    exec_max_output_bytes: Option<u64>,
    exec_max_concurrent_per_org: Option<u32>,
    oidc: Option<FileOidc>,
    egress_allow: Option<Vec<protocol::Ipv4Cidr>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOidc {
    issuer: Option<String>,
    audience: Option<String>,
}

/// `{"runner-1": "<sha256 hex>", …}`: names and token hashes, checked.
fn parse_declared_runners(text: &str) -> Result<BTreeMap<String, String>> {
    let map: BTreeMap<String, String> = serde_json::from_str(text).map_err(|e| {
        anyhow!("BOXLITE_RUNNER_TOKEN_HASHES: expected a JSON object of runner name to token SHA-256: {e}")
    })?;
    for (name, hash) in &map {
        if crate::runners::validate_runner_name(name).is_err() {
            bail!("BOXLITE_RUNNER_TOKEN_HASHES: {name:?} is not a runner name");
        }
        if !crate::tokens::is_sha256_hex(hash) {
            bail!("BOXLITE_RUNNER_TOKEN_HASHES: the token hash of {name} is not 64 hex characters");
        }
    }
    Ok(map
        .into_iter()
        .map(|(n, h)| (n, h.to_ascii_lowercase()))
        .collect())
}

impl Config {
    /// Defaults for everything but the database and the admin key (used by tests and tools).
    pub fn new(database_url: impl Into<String>, admin_key: impl Into<String>) -> Self {
        let listen: SocketAddr = DEFAULT_LISTEN.parse().expect("valid default");
        Config {
            listen,
            public_url: Url::parse(&format!("http://{listen}")).expect("valid default"),
            database_url: Secret::new(database_url),
            database_max_connections: DEFAULT_MAX_CONNECTIONS,
            admin_key: Secret::new(admin_key),
            runner_unresponsive_after: Duration::from_secs(DEFAULT_UNRESPONSIVE_AFTER_SECS),
            runner_healthcheck_interval: default_interval(DEFAULT_UNRESPONSIVE_AFTER_SECS),
            oidc: None,
            log_format: LogFormat::Text,
            declared_runners: BTreeMap::new(),
            egress_allow: Vec::new(),
            exec_max_output_bytes: protocol::DEFAULT_MAX_OUTPUT_BYTES,
            exec_max_concurrent_per_org: DEFAULT_EXEC_MAX_CONCURRENT_PER_ORG,
        }
    }

    /// Load from the file at `path` (if any) and the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        Self::load_with(path, |k| std::env::var(k).ok())
    }

    /// Load from the file at `path` (if any) and the variables `env` returns
    /// (empty values count as unset).
    pub fn load_with(path: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let file: FileConfig = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("read config file {}", p.display()))?;
                toml::from_str(&text)
                    .map_err(|e| anyhow!("config file {}: {}", p.display(), e.message()))?
            }
            None => FileConfig::default(),
        };
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let num = |k: &str| -> Result<Option<u64>> {
            env(k)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| anyhow!("{k}: expected a whole number, got {v:?}"))
                })
                .transpose()
        };

        let listen_s = env("BOXLITE_LISTEN")
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen: SocketAddr = listen_s
            .trim()
            .parse()
            .map_err(|_| anyhow!("listen: {listen_s:?} is not an address like 127.0.0.1:8080"))?;

        let public_url_s = env("BOXLITE_PUBLIC_URL")
            .or(file.public_url)
            .unwrap_or_else(|| format!("http://{listen}"));
        let public_url = Url::parse(public_url_s.trim()).map_err(|e| anyhow!("public_url: {e}"))?;
        if !matches!(public_url.scheme(), "http" | "https") {
            bail!("public_url: must be an http:// or https:// URL");
        }

        let database_url = env("BOXLITE_DATABASE_URL")
            .or(file.database_url)
            .ok_or_else(|| {
                anyhow!("database_url is not set (config file key or BOXLITE_DATABASE_URL)")
            })?;
        let database_url = database_url.trim().to_string();
        if !(database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://")
            || database_url.starts_with("sqlite:"))
        {
            bail!("database_url: must start with postgres://, postgresql:// or sqlite:");
        }

        let database_max_connections = match num("BOXLITE_DATABASE_MAX_CONNECTIONS")? {
            Some(n) => u32::try_from(n)
                .map_err(|_| anyhow!("BOXLITE_DATABASE_MAX_CONNECTIONS is too large"))?,
            None => file
                .database_max_connections
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
        };
        if database_max_connections == 0 {
            bail!("database_max_connections: must be at least 1");
        }

        let admin_key = if let Some(k) = env("BOXLITE_ADMIN_KEY") {
            k
        } else {
            let path = env("BOXLITE_ADMIN_KEY_FILE").map(PathBuf::from).or(file.admin_key_file).ok_or_else(|| {
                anyhow!("no admin key: set admin_key_file (or BOXLITE_ADMIN_KEY_FILE), or BOXLITE_ADMIN_KEY")
            })?;
            std::fs::read_to_string(&path)
                .with_context(|| format!("read admin_key_file {}", path.display()))?
        };
        let admin_key = admin_key.trim().to_string();
        if !admin_key.starts_with(protocol::API_KEY_PREFIX) || admin_key.len() < MIN_ADMIN_KEY_LEN {
            bail!(
                "admin key: must start with {} and be at least {MIN_ADMIN_KEY_LEN} characters long",
                protocol::API_KEY_PREFIX
            );
        }
        if admin_key
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            bail!("admin key: must not contain whitespace");
        }

        let unresponsive = num("BOXLITE_RUNNER_UNRESPONSIVE_AFTER_SECS")?
            .or(file.runner_unresponsive_after_secs)
            .unwrap_or(DEFAULT_UNRESPONSIVE_AFTER_SECS);
        if unresponsive == 0 {
            bail!("runner_unresponsive_after_secs: must be at least 1");
        }
        let interval = match num("BOXLITE_RUNNER_HEALTHCHECK_INTERVAL_SECS")?
            .or(file.runner_healthcheck_interval_secs)
        {
            Some(0) => bail!("runner_healthcheck_interval_secs: must be at least 1"),
            Some(i) if i >= unresponsive => bail!(
                "runner_healthcheck_interval_secs ({i}) must be shorter than runner_unresponsive_after_secs ({unresponsive})"
            ),
            Some(i) => Duration::from_secs(i),
            None => default_interval(unresponsive),
        };

        let log_format = match env("BOXLITE_LOG_FORMAT") {
            Some(v) => match v.trim() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => bail!("BOXLITE_LOG_FORMAT: expected text or json, got {other:?}"),
            },
            None => file.log_format.unwrap_or_default(),
        };

        let exec_max_output_bytes = num("BOXLITE_EXEC_MAX_OUTPUT_BYTES")?
            .or(file.exec_max_output_bytes)
            .unwrap_or(protocol::DEFAULT_MAX_OUTPUT_BYTES);
        if !(1..=MAX_EXEC_OUTPUT_BYTES).contains(&exec_max_output_bytes) {
            bail!("exec_max_output_bytes: must be 1 to {MAX_EXEC_OUTPUT_BYTES}");
        }
        let exec_max_concurrent_per_org = match num("BOXLITE_EXEC_MAX_CONCURRENT_PER_ORG")? {
            Some(n) => u32::try_from(n)
                .map_err(|_| anyhow!("BOXLITE_EXEC_MAX_CONCURRENT_PER_ORG is too large"))?,
            None => file
                .exec_max_concurrent_per_org
                .unwrap_or(DEFAULT_EXEC_MAX_CONCURRENT_PER_ORG),
        };
        if !(1..=10_000).contains(&exec_max_concurrent_per_org) {
            bail!("exec_max_concurrent_per_org: must be 1 to 10000");
        }

        let file_oidc = file.oidc.unwrap_or_default();
        let issuer = env("BOXLITE_OIDC_ISSUER").or(file_oidc.issuer);
        let audience = env("BOXLITE_OIDC_AUDIENCE").or(file_oidc.audience);
        let oidc = match (issuer, audience) {
            (None, None) => None,
            (Some(issuer), Some(audience)) => {
                let issuer = issuer.trim().to_string();
                let u = Url::parse(&issuer).map_err(|e| anyhow!("oidc.issuer: {e}"))?;
                let loopback = matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
                if u.scheme() != "https" && !(u.scheme() == "http" && loopback) {
                    bail!("oidc.issuer: must be an https:// URL (http:// only for loopback)");
                }
                Some(OidcConfig {
                    issuer,
                    audience: audience.trim().to_string(),
                })
            }
            _ => bail!("oidc: set both issuer and audience, or neither"),
        };

        let declared_runners = match env("BOXLITE_RUNNER_TOKEN_HASHES") {
            None => BTreeMap::new(),
            Some(text) => parse_declared_runners(&text)?,
        };

        let egress_allow = match env("BOXLITE_EGRESS_ALLOW") {
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(|c| c.parse().map_err(|e| anyhow!("BOXLITE_EGRESS_ALLOW: {e}")))
                .collect::<Result<Vec<protocol::Ipv4Cidr>>>()?,
            None => file.egress_allow.unwrap_or_default(),
        };

        Ok(Config {
            declared_runners,
            egress_allow,
            listen,
            public_url,
            database_url: Secret::new(database_url),
            database_max_connections,
            admin_key: Secret::new(admin_key),
            runner_unresponsive_after: Duration::from_secs(unresponsive),
            runner_healthcheck_interval: interval,
            oidc,
            log_format,
            exec_max_output_bytes,
            exec_max_concurrent_per_org,
        })
    }
}

/// A quarter of the unresponsive window, between 1 and 10 seconds.
fn default_interval(unresponsive_secs: u64) -> Duration {
    Duration::from_secs((unresponsive_secs / 4).clamp(1, 10))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const KEY: &str = "bxk_0123456789abcdefghijklmnop";

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn reads_the_file_boxctl_renders() {
        let dir = tempfile::tempdir().unwrap();
        let key = write(dir.path(), "admin.key", &format!("{KEY}\n"));
        let cfg = write(
            dir.path(),
            "cp.toml",
            &format!(
                "listen = \"127.0.0.1:7000\"\npublic_url = \"http://127.0.0.1:7000\"\n\
                 database_url = \"sqlite://data/cp.db?mode=rwc\"\nadmin_key_file = \"{}\"\n\
                 runner_unresponsive_after_secs = 60\n\n[oidc]\nissuer = \"https://id.example.com/\"\naudience = \"boxlite\"\n",
                key.display()
            ),
        );
        let c = Config::load_with(Some(&cfg), no_env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(c.database_url.expose(), "sqlite://data/cp.db?mode=rwc");
        assert_eq!(c.admin_key.expose(), KEY);
        assert_eq!(c.runner_unresponsive_after, Duration::from_secs(60));
        assert_eq!(c.runner_healthcheck_interval, Duration::from_secs(10));
        assert_eq!(c.exec_max_output_bytes, 1 << 20);
        assert_eq!(c.exec_max_concurrent_per_org, 8);
        assert_eq!(c.oidc.as_ref().unwrap().issuer, "https://id.example.com/");
        assert!(
            !format!("{c:?}").contains(KEY),
            "Debug must not print the admin key"
        );
    }

    #[test]
    fn unknown_keys_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write(
            dir.path(),
            "cp.toml",
            "database_url = \"sqlite://x.db\"\nlisten_port = 3\n",
        );
        let e = Config::load_with(Some(&cfg), no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen_port"), "{e}");
        let cfg = write(
            dir.path(),
            "cp2.toml",
            "[oidc]\nissuer = \"https://a\"\nclient = \"x\"\n",
        );
        let e = Config::load_with(Some(&cfg), no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("client"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file_and_works_alone() {
        let dir = tempfile::tempdir().unwrap();
        let key = write(dir.path(), "admin.key", KEY);
        let cfg = write(
            dir.path(),
            "cp.toml",
            &format!(
                "database_url = \"sqlite://a.db\"\nadmin_key_file = \"{}\"\n",
                key.display()
            ),
        );
        let env: HashMap<&str, String> = [
            (
                "BOXLITE_DATABASE_URL",
                "postgres://u:pw@db/boxlite".to_string(),
            ),
            (
                "BOXLITE_ADMIN_KEY",
                "bxk_fromenvironment_0123456789".to_string(),
            ),
            ("BOXLITE_LISTEN", "0.0.0.0:9000".to_string()),
            (
                "BOXLITE_OIDC_ISSUER",
                "https://issuer.example.com".to_string(),
            ),
            ("BOXLITE_OIDC_AUDIENCE", "api".to_string()),
            ("BOXLITE_RUNNER_UNRESPONSIVE_AFTER_SECS", "30".to_string()),
            ("BOXLITE_LOG_FORMAT", "json".to_string()),
            ("BOXLITE_EXEC_MAX_OUTPUT_BYTES", "4096".to_string()),
            ("BOXLITE_EXEC_MAX_CONCURRENT_PER_ORG", "3".to_string()),
        ]
        .into_iter()
        .collect();
        let get = |k: &str| env.get(k).cloned();
        let c = Config::load_with(Some(&cfg), get).unwrap();
        assert_eq!(c.database_url.expose(), "postgres://u:pw@db/boxlite");
        assert_eq!(c.admin_key.expose(), "bxk_fromenvironment_0123456789");
        assert_eq!(c.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(c.runner_unresponsive_after, Duration::from_secs(30));
        assert_eq!(c.runner_healthcheck_interval, Duration::from_secs(7));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            (c.exec_max_output_bytes, c.exec_max_concurrent_per_org),
            (4096, 3)
        );
        assert_eq!(c.oidc.unwrap().audience, "api");
        let dbg = format!("{:?}", Config::load_with(None, get).unwrap());
        assert!(
            !dbg.contains("pw@") && !dbg.contains("fromenvironment"),
            "{dbg}"
        );
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
            let owned: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move |k: &str| owned.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        }
        let base = [
            ("BOXLITE_DATABASE_URL", "sqlite://x.db"),
            ("BOXLITE_ADMIN_KEY", KEY),
        ];
        let e = Config::load_with(None, env(&[("BOXLITE_ADMIN_KEY", KEY)])).unwrap_err();
        assert!(e.to_string().contains("database_url"), "{e}");
        let e = Config::load_with(None, env(&[base[0]])).unwrap_err();
        assert!(e.to_string().contains("no admin key"), "{e}");
        let e =
            Config::load_with(None, env(&[base[0], ("BOXLITE_ADMIN_KEY", "short")])).unwrap_err();
        assert!(e.to_string().contains("bxk_"), "{e}");
        let e = Config::load_with(None, env(&[base[0], base[1], ("BOXLITE_LISTEN", "nope")]))
            .unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e = Config::load_with(
            None,
            env(&[base[0], base[1], ("BOXLITE_OIDC_ISSUER", "https://x")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
        let e = Config::load_with(
            None,
            env(&[
                base[0],
                base[1],
                ("BOXLITE_OIDC_ISSUER", "http://id.example.com"),
                ("BOXLITE_OIDC_AUDIENCE", "a"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("https"), "{e}");
        let e = Config::load_with(None, env(&[("BOXLITE_DATABASE_URL", "mysql://x"), base[1]]))
            .unwrap_err();
        assert!(e.to_string().contains("postgres://"), "{e}");
        let e = Config::load_with(
            None,
            env(&[
                base[0],
                base[1],
                ("BOXLITE_RUNNER_UNRESPONSIVE_AFTER_SECS", "x"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("whole number"), "{e}");
        for (k, v) in [
            ("BOXLITE_EXEC_MAX_OUTPUT_BYTES", "0"),
            ("BOXLITE_EXEC_MAX_CONCURRENT_PER_ORG", "0"),
        ] {
            let e = Config::load_with(None, env(&[base[0], base[1], (k, v)])).unwrap_err();
            assert!(e.to_string().contains("must be 1 to"), "{k}: {e}");
        }
        let e = Config::load_with(
            None,
            env(&[
                ("BOXLITE_DATABASE_URL", "sqlite://x.db"),
                ("BOXLITE_ADMIN_KEY_FILE", "/nonexistent/k"),
            ]),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/k"), "{e:#}");
    }

    #[test]
    fn declared_runners_are_checked() {
        let h = "a".repeat(64);
        let ok =
            parse_declared_runners(&format!(r#"{{"runner-1":"{}"}}"#, h.to_uppercase())).unwrap();
        assert_eq!(ok["runner-1"], h);
        assert!(parse_declared_runners("{}").unwrap().is_empty());
        for bad in [
            "not json".to_string(),
            r#"["runner-1"]"#.to_string(),
            format!(r#"{{"bad name!":"{h}"}}"#),
            r#"{"runner-1":"abc"}"#.to_string(),
        ] {
            assert!(parse_declared_runners(&bad).is_err(), "{bad} accepted");
        }
    }
}
