//! Finding and loading stack.toml, and the stage's target and state store.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use stack::{Diagnostic, Severity, Stack, Stage, Target};

use crate::engine::store::{LocalStore, StateStore};
use crate::platform::client::{ApiKey, Client};
use crate::providers::aws::AwsProvider;
use crate::providers::cloudflare::{self, CloudflareCredentials, CloudflareProvider};
use crate::providers::local::{LocalProvider, STATE_DIR};
use crate::render::{ColorChoice, Style};
use crate::secrets::{SecretStore, SecretValue};

/// A loaded, valid stack.
pub struct Loaded {
    /// Where stack.toml is.
    pub path: PathBuf,
    /// The stack.
    pub stack: Stack,
}

impl Loaded {
    /// Directory holding stack.toml.
    pub fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }
}

/// stack.toml given explicitly, or the first found from the current directory upwards.
pub fn find_stack(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    for dir in cwd.ancestors() {
        let candidate = dir.join("stack.toml");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no stack.toml in {} or any parent directory; pass --stack PATH or set BOXCTL_STACK",
        cwd.display()
    )
}

/// Print diagnostics as `path:line:col: severity: message` to stderr.
pub fn print_diagnostics(path: &str, diags: &[Diagnostic], color: ColorChoice) {
    let style = Style::stderr(color);
    for d in diags {
        let text = d.render(path);
        let (first, rest) = text
            .split_once('\n')
            .map_or((text.as_str(), None), |(a, b)| (a, Some(b)));
        let first = match d.severity {
            Severity::Error => first.replacen("error:", &style.danger("error:"), 1),
            Severity::Warning => first.replacen("warning:", &style.yellow("warning:"), 1),
        };
        eprintln!("{first}");
        if let Some(rest) = rest {
            eprintln!("{}", style.dim(rest));
        }
    }
}

/// Read, parse and validate stack.toml; warnings are printed, errors fail.
pub fn load(explicit: Option<&Path>, color: ColorChoice) -> anyhow::Result<Loaded> {
    let path = find_stack(explicit)?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let shown = path.display().to_string();
    match stack::load(&text) {
        Ok(l) => {
            print_diagnostics(&shown, &l.warnings, color);
            Ok(Loaded {
                path,
                stack: l.stack,
            })
        }
        Err(diags) => {
            print_diagnostics(&shown, &diags, color);
            let errors = diags
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .count();
            bail!(
                "{shown} is not valid ({errors} error{})",
                if errors == 1 { "" } else { "s" }
            )
        }
    }
}

/// Root of all local state: `$BOXCTL_STATE_DIR`, else `$XDG_STATE_HOME/boxctl`,
/// else `~/.local/state/boxctl`.
pub fn state_root() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("BOXCTL_STATE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("boxctl"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/state/boxctl")),
        None => bail!("cannot find a state directory: set BOXCTL_STATE_DIR"),
    }
}

/// The provider set of a stage's target.
pub enum Providers {
    /// The local machine.
    Local(LocalProvider),
    /// AWS.
    Aws(Box<AwsProvider>),
}

/// A stage ready to be planned and applied.
pub struct StageTarget {
    /// Its providers.
    pub providers: Providers,
    /// Where its lock and journal live.
    pub store: Arc<dyn StateStore>,
    /// Describes the target in one line.
    pub description: String,
    /// Where the stage's secrets are kept.
    pub secrets: SecretStore,
}

/// Set up the providers and state store of a stage; `endpoint` points every
/// AWS client at an emulator.
pub async fn target(
    loaded: &Loaded,
    stage: &Stage,
    endpoint: Option<&str>,
) -> anyhow::Result<StageTarget> {
    match stage.target {
        Target::Local => {
            let stage_dir = local_stage_dir(loaded, stage)?;
            let store: Arc<dyn StateStore> = Arc::new(LocalStore::new(stage_dir.join(STATE_DIR)));
            let description = format!("local, state in {}", stage_dir.display());
            let secrets = SecretStore::File(crate::secrets::local_file(&stage_dir));
            Ok(StageTarget {
                secrets,
                providers: Providers::Local(LocalProvider::new(
                    &loaded.stack.name,
                    &stage.name,
                    stage_dir,
                    loaded.dir(),
                )),
                store,
                description,
            })
        }
        Target::Aws => {
            let (Some(region), Some(domain)) = (&stage.region, &stage.domain) else {
                bail!(
                    "stage {:?} targets aws without a region and domain",
                    stage.name
                );
            };
            let p =
                AwsProvider::new(&loaded.stack.name, &stage.name, region, domain, endpoint).await;
            let account = p
                .account()
                .await
                .context("checking the AWS credentials (boxctl uses the standard chain: environment, profile, SSO, instance role)")?;
            let store: Arc<dyn StateStore> = Arc::new(p.state_store());
            let description = format!(
                "aws account {account}, {region}{}, state in {}",
                endpoint.map(|e| format!(" via {e}")).unwrap_or_default(),
                store.location()
            );
            let secrets = SecretStore::Ssm {
                client: p.clients().ssm.clone(),
                prefix: stack::resolve::aws::ssm_prefix(&stage.name),
            };
            Ok(StageTarget {
                secrets,
                providers: Providers::Aws(Box::new(p)),
                store,
                description,
            })
        }
    }
}

/// The stage's DNS provider, connected: credentials from the environment
/// (`CLOUDFLARE_API_TOKEN`, `CLOUDFLARE_ACCOUNT_ID`) or the stage's secrets,
/// the token checked and the zone found, before anything is planned.
pub async fn dns(
    loaded: &Loaded,
    stage: &Stage,
    target: &StageTarget,
) -> anyhow::Result<Option<CloudflareProvider>> {
    let Some(settings) = &stage.dns else {
        return Ok(None);
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let wanted = |var: &'static str, secret: &'static str| async move {
        if let Some(v) = env(var) {
            return Ok::<_, anyhow::Error>(SecretValue::new(v.trim()));
        }
        match target.secrets.get(secret).await.with_context(|| {
            format!(
                "reading the Cloudflare credentials of stage {:?}",
                stage.name
            )
        })? {
            Some(v) => Ok(v),
            None => bail!(
                "stage {:?} uses Cloudflare DNS but {secret} is not set: run `boxctl secret set {secret} --stage {}` (or set {var})",
                stage.name,
                stage.name
            ),
        }
    };
    let token = wanted("CLOUDFLARE_API_TOKEN", stack::secrets::CLOUDFLARE_API_TOKEN).await?;
    let account = wanted(
        "CLOUDFLARE_ACCOUNT_ID",
        stack::secrets::CLOUDFLARE_ACCOUNT_ID,
    )
    .await?;
    let base = cloudflare::api_url(env(cloudflare::API_URL_ENV).as_deref())?;
    let p = CloudflareProvider::connect(
        &loaded.stack.name,
        &stage.name,
        &settings.zone,
        CloudflareCredentials {
            token,
            account_id: account.expose().trim().to_string(),
        },
        &base,
    )
    .await?;
    Ok(Some(p))
}

/// The local stage directory of a stage.
pub fn local_stage_dir(loaded: &Loaded, stage: &Stage) -> anyhow::Result<PathBuf> {
    Ok(state_root()?.join(&loaded.stack.name).join(&stage.name))
}

/// A client of the stage's control plane, with the admin key: the stage's own
/// (its 0600 file on local; its SSM `SecureString`, which boxctl generated,
/// on aws). `BOXLITE_API_URL` and `BOXLITE_API_KEY` override either.
pub async fn control_plane(
    loaded: &Loaded,
    stage: &Stage,
    endpoint: Option<&str>,
) -> anyhow::Result<Client> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let url = match (env("BOXLITE_API_URL"), stage.target) {
        (Some(u), _) => u,
        (None, Target::Local) => format!("http://127.0.0.1:{}", stage.local.api_port),
        (None, Target::Aws) => format!(
            "https://api.{}",
            stage
                .domain
                .as_deref()
                .context("an aws stage has a domain")?
        ),
    };
    let key = match (env("BOXLITE_API_KEY"), stage.target) {
        (Some(k), _) => k,
        (None, Target::Local) => {
            let path = local_stage_dir(loaded, stage)?.join("secrets/admin-api-key");
            std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "reading the admin API key {}; is stage {:?} deployed? (`boxctl deploy --stage {}`)",
                    path.display(),
                    stage.name,
                    stage.name
                )
            })?
        }
        (None, Target::Aws) => aws_admin_key(stage, endpoint).await?,
    };
    Ok(Client::new(&url, ApiKey::new(key)))
}

/// The admin key boxctl generated for an aws stage, read from SSM.
async fn aws_admin_key(stage: &Stage, endpoint: Option<&str>) -> anyhow::Result<String> {
    let region = stage
        .region
        .as_deref()
        .context("an aws stage has a region")?;
    let name = format!(
        "{}admin-api-key",
        stack::resolve::aws::ssm_prefix(&stage.name)
    );
    let clients = crate::providers::aws::client::Clients::new(region, endpoint).await;
    let missing = || {
        format!(
            "no admin API key for stage {:?}: set BOXLITE_API_KEY, or deploy the stage (boxctl keeps its key in SSM {name})",
            stage.name
        )
    };
    match clients
        .ssm
        .get_parameter()
        .name(&name)
        .with_decryption(true)
        .send()
        .await
    {
        Ok(r) => r
            .parameter()
            .and_then(|p| p.value())
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!(missing())),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_parameter_not_found()) =>
        {
            bail!(missing())
        }
        Err(e) => {
            use aws_sdk_ssm::error::ProvideErrorMetadata as _;
            bail!(
                "reading the admin API key of stage {:?} from SSM {name} failed ({}: {}); set BOXLITE_API_KEY, or allow ssm:GetParameter on it",
                stage.name,
                e.code().unwrap_or("error"),
                e.message().unwrap_or("no message")
            )
        }
    }
}
