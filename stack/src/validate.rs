//! From the file as written to a [`Stack`]: defaults applied, every value checked,
//! every problem reported at once.

use std::collections::{BTreeMap, BTreeSet};

use crate::decode::Sp;
use crate::diagnostic::Diagnostics;
use crate::model::{
    ControlPlaneSettings, DatabaseSettings, DnsProvider, DnsSettings, LocalSettings,
    NetworkSettings, OidcSettings, RunnerSettings, Service, Stack, Stage, Target, defaults,
};
use crate::schema::{ServiceDecl, StackDecl, StageDecl, StageLayer};

/// Service names the platform uses itself.
const RESERVED_SERVICES: &[&str] = &[
    "api",
    "proxy",
    "ssh",
    "ssh-gateway",
    "control-plane",
    "runner",
];

/// Check a decoded file; `None` when any error was reported.
pub fn validate(decl: &StackDecl, d: &mut Diagnostics<'_>) -> Option<Stack> {
    let name = match &decl.name {
        Some(n) => {
            if !is_name(&n.value, 30) {
                d.error(
                    "name",
                    n.span.clone(),
                    format!("stack name {:?} is not valid", n.value),
                )
                .hint("use 2-30 lowercase letters, digits and '-', starting with a letter");
            }
            n.value.clone()
        }
        None => {
            d.error(
                "name",
                decl.span.start..decl.span.start,
                "missing key `name` (the stack name)",
            )
            .hint("add `name = \"boxlite\"` at the top of the file");
            String::new()
        }
    };
    if decl.stages.is_empty() {
        d.error(
            "stages",
            decl.span.start..decl.span.start,
            "no stages declared",
        )
        .hint("declare at least one, e.g. `[stages.dev]` with `target = \"local\"`");
    }
    let mut stages = BTreeMap::new();
    for s in &decl.stages {
        if !is_name(&s.name.value, 20) {
            d.error(
                &format!("stages.{}", s.name.value),
                s.name.span.clone(),
                format!("stage name {:?} is not valid", s.name.value),
            )
            .hint("use 2-20 lowercase letters, digits and '-', starting with a letter");
        }
        let merged = decl.defaults.clone().merge(s.layer.clone());
        if let Some(stage) = stage(s, merged, d) {
            stages.insert(stage.name.clone(), stage);
        }
    }
    (!d.has_errors()).then_some(Stack { name, stages })
}

/// Validate one stage's merged settings.
fn stage(decl: &StageDecl, l: StageLayer, d: &mut Diagnostics<'_>) -> Option<Stage> {
    let name = decl.name.value.clone();
    let key = |k: &str| format!("stages.{name}.{k}");
    let here = decl.name.span.clone();
    let mut ok = true;

    let target = match &l.target {
        None => Target::Local,
        Some(t) => match t.value.as_str() {
            "local" => Target::Local,
            "aws" => Target::Aws,
            other => {
                d.error(
                    &key("target"),
                    t.span.clone(),
                    format!("unknown target {other:?}"),
                )
                .hint("use \"local\" or \"aws\"");
                ok = false;
                Target::Local
            }
        },
    };
    let aws = target == Target::Aws;

    let region = l.region.as_ref().map(|r| r.value.clone());
    match &l.region {
        Some(r) if !is_region(&r.value) => {
            d.error(
                &key("region"),
                r.span.clone(),
                format!("{:?} is not an AWS region", r.value),
            )
            .hint("e.g. \"ap-southeast-1\"");
            ok = false;
        }
        None if aws => {
            d.error(
                &key("region"),
                here.clone(),
                format!("stage {name:?} targets aws but sets no `region`"),
            )
            .hint("add `region = \"ap-southeast-1\"` to the stage or to [defaults]");
            ok = false;
        }
        _ => {}
    }

    let domain = l.domain.as_ref().map(|v| v.value.to_ascii_lowercase());
    match &l.domain {
        Some(v) if !is_hostname(&v.value) => {
            d.error(&key("domain"), v.span.clone(), format!("domain {:?} is not a hostname", v.value))
                .hint("a hostname has two or more dot-separated labels of letters, digits and '-', e.g. \"boxlite.example.com\"");
            ok = false;
        }
        Some(v) if !aws => {
            d.warning(
                &key("domain"),
                v.span.clone(),
                "`domain` is ignored by the local target",
            );
        }
        None if aws => {
            d.error(
                &key("domain"),
                here.clone(),
                format!("stage {name:?} targets aws but sets no `domain`"),
            )
            .hint("add e.g. `domain = \"boxlite.example.com\"`");
            ok = false;
        }
        _ => {}
    }

    let production = l.production.as_ref().is_some_and(|p| p.value);
    let runners = match &l.runners {
        None => defaults::RUNNERS,
        Some(r) if r.value < 0 => {
            d.error(
                &key("runners"),
                r.span.clone(),
                format!("`runners` cannot be negative ({})", r.value),
            );
            ok = false;
            0
        }
        Some(r) if r.value > i64::from(defaults::MAX_RUNNERS) => {
            d.error(
                &key("runners"),
                r.span.clone(),
                format!(
                    "`runners` is {}, above the limit of {}",
                    r.value,
                    defaults::MAX_RUNNERS
                ),
            )
            .hint(
                "split the fleet across stages, or raise the limit deliberately in the stack crate",
            );
            ok = false;
            0
        }
        Some(r) => r.value as u32,
    };

    let rl = &l.runner;
    let instance_type = value_or(&rl.instance_type, defaults::INSTANCE_TYPE);
    if let Some(v) = &rl.instance_type
        && !is_instance_type(&v.value)
    {
        d.error(
            &key("runner.instance_type"),
            v.span.clone(),
            format!("{:?} is not an EC2 instance type", v.value),
        )
        .hint("e.g. \"c7i.xlarge\"");
        ok = false;
    }
    let ami_name = value_or(&rl.ami_name, defaults::AMI_NAME);
    if let Some(v) = &rl.ami_name
        && v.value.trim().is_empty()
    {
        d.error(
            &key("runner.ami_name"),
            v.span.clone(),
            "`runner.ami_name` is empty",
        );
        ok = false;
    }
    let ami_owner = value_or(&rl.ami_owner, defaults::AMI_OWNER);
    if let Some(v) = &rl.ami_owner
        && !(v.value.len() == 12 && v.value.bytes().all(|b| b.is_ascii_digit())
            || ["amazon", "aws-marketplace", "self"].contains(&v.value.as_str()))
    {
        d.error(&key("runner.ami_owner"), v.span.clone(), format!("{:?} is not an AMI owner", v.value))
            .hint("a 12-digit account id (Canonical is \"099720109477\") or amazon, aws-marketplace, self");
        ok = false;
    }
    let root_volume_gb = ranged(
        d,
        &key("runner.root_volume_gb"),
        &rl.root_volume_gb,
        8,
        16384,
        defaults::ROOT_VOLUME_GB,
        &mut ok,
    );
    let version = value_or(&rl.version, defaults::RUNNER_VERSION);
    if let Some(v) = &rl.version
        && !is_version(&v.value)
    {
        d.error(
            &key("runner.version"),
            v.span.clone(),
            format!("{:?} is not a version", v.value),
        )
        .hint("use MAJOR.MINOR.PATCH, e.g. \"0.1.0\"");
        ok = false;
    }
    let artifact_url = rl.artifact_url.as_ref().map(|v| v.value.clone());
    if let Some(v) = &rl.artifact_url
        && !is_artifact_url(&v.value)
    {
        d.error(
            &key("runner.artifact_url"),
            v.span.clone(),
            format!("{:?} is not an s3:// or https:// URL", v.value),
        )
        .hint("e.g. \"s3://my-bucket/artifacts/boxlite-runner-0.1.0.tar.gz\"");
        ok = false;
    }
    let artifact_sha256 = rl
        .artifact_sha256
        .as_ref()
        .map(|v| v.value.to_ascii_lowercase());
    if let Some(v) = &rl.artifact_sha256
        && !(v.value.len() == 64 && v.value.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        d.error(
            &key("runner.artifact_sha256"),
            v.span.clone(),
            format!("{:?} is not a SHA-256 (64 hex digits)", v.value),
        )
        .hint("the output of `sha256sum boxlite-runner.tar.gz`");
        ok = false;
    }
    if let Some(v) = &rl.artifact_url
        && v.value.starts_with("https://")
        && rl.artifact_sha256.is_none()
    {
        d.error(
            &key("runner.artifact_url"),
            v.span.clone(),
            "an https:// runner artifact needs `runner.artifact_sha256`",
        )
        .hint("pin its checksum: add `artifact_sha256 = \"<sha256sum of the file>\"` next to it");
        ok = false;
    }

    let dl = &l.database;
    let engine_version = value_or(&dl.engine_version, defaults::DB_ENGINE_VERSION);
    if let Some(v) = &dl.engine_version
        && (v.value.is_empty() || !v.value.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
    {
        d.error(
            &key("database.engine_version"),
            v.span.clone(),
            format!("{:?} is not a PostgreSQL version", v.value),
        )
        .hint("e.g. \"16\"");
        ok = false;
    }
    let instance_class = value_or(&dl.instance_class, defaults::DB_INSTANCE_CLASS);
    if let Some(v) = &dl.instance_class
        && !(v.value.starts_with("db.") && is_instance_type(&v.value[3..]))
    {
        d.error(
            &key("database.instance_class"),
            v.span.clone(),
            format!("{:?} is not an RDS instance class", v.value),
        )
        .hint("e.g. \"db.t4g.small\"");
        ok = false;
    }
    let storage_gb = ranged(
        d,
        &key("database.storage_gb"),
        &dl.storage_gb,
        20,
        65536,
        defaults::DB_STORAGE_GB,
        &mut ok,
    );
    let backup_retention_days = ranged(
        d,
        &key("database.backup_retention_days"),
        &dl.backup_retention_days,
        0,
        35,
        defaults::DB_BACKUP_RETENTION_DAYS,
        &mut ok,
    );

    let cl = &l.control_plane;
    if aws && cl.image.is_none() {
        d.error(&key("control_plane.image"), here.clone(), format!("stage {name:?} targets aws but sets no `control_plane.image`"))
            .hint("add `[control_plane] image = \"<registry>/boxlite-control-plane:<tag>\"` to the stage or [defaults]");
        ok = false;
    }
    check_image(d, &key("control_plane.image"), &cl.image, &mut ok);
    let cp_cpu = fargate_cpu(
        d,
        &key("control_plane.cpu"),
        &cl.cpu,
        defaults::CP_CPU,
        &mut ok,
    );
    let cp_memory = ranged(
        d,
        &key("control_plane.memory_mb"),
        &cl.memory_mb,
        512,
        122_880,
        defaults::CP_MEMORY_MB,
        &mut ok,
    );
    let cp_replicas = ranged(
        d,
        &key("control_plane.replicas"),
        &cl.replicas,
        1,
        20,
        defaults::CP_REPLICAS,
        &mut ok,
    );

    let vpc_cidr = value_or(&l.network.vpc_cidr, defaults::VPC_CIDR);
    if let Some(v) = &l.network.vpc_cidr
        && !is_vpc_cidr(&v.value)
    {
        d.error(
            &key("network.vpc_cidr"),
            v.span.clone(),
            format!("{:?} is not a usable VPC CIDR", v.value),
        )
        .hint("an IPv4 network with a prefix from /16 to /24, e.g. \"10.42.0.0/16\"");
        ok = false;
    }

    let oidc = match &l.oidc {
        None => None,
        Some((span, o)) => match (&o.issuer, &o.audience) {
            (Some(issuer), Some(audience)) => {
                let local_http = issuer.value.starts_with("http://localhost")
                    || issuer.value.starts_with("http://127.0.0.1");
                if !(issuer.value.starts_with("https://") || local_http)
                    || !is_url_host(&issuer.value)
                {
                    d.error(&key("oidc.issuer"), issuer.span.clone(), format!("issuer {:?} is not an https URL", issuer.value))
                            .hint("use the issuer exactly as in the `iss` claim, e.g. \"https://login.example.com/\"");
                    ok = false;
                } else if !issuer.value.ends_with('/') {
                    d.warning(
                            &key("oidc.issuer"),
                            issuer.span.clone(),
                            format!("issuer {:?} has no trailing slash", issuer.value),
                        )
                        .hint(format!(
                            "tokens are accepted only when `iss` matches exactly; many providers (Auth0, Okta) issue \"{}/\"",
                            issuer.value
                        ));
                }
                if audience.value.trim().is_empty() {
                    d.error(
                        &key("oidc.audience"),
                        audience.span.clone(),
                        "`oidc.audience` is empty",
                    );
                    ok = false;
                }
                Some(OidcSettings {
                    issuer: issuer.value.clone(),
                    audience: audience.value.clone(),
                })
            }
            (issuer, _) => {
                let missing = if issuer.is_none() {
                    "issuer"
                } else {
                    "audience"
                };
                d.error(
                    &key("oidc"),
                    span.clone(),
                    format!("`[oidc]` needs both `issuer` and `audience`; `{missing}` is missing"),
                );
                ok = false;
                None
            }
        },
    };

    let dns = match &l.dns {
        None => None,
        Some((span, dl)) => {
            let provider = match &dl.provider {
                None => {
                    d.error(
                        &key("dns.provider"),
                        span.clone(),
                        "`[dns]` needs `provider`",
                    )
                    .hint("provider = \"cloudflare\"");
                    ok = false;
                    None
                }
                Some(p) if p.value == "cloudflare" => Some(DnsProvider::Cloudflare),
                Some(p) => {
                    d.error(
                        &key("dns.provider"),
                        p.span.clone(),
                        format!("unknown DNS provider {:?}", p.value),
                    )
                    .hint("supported: \"cloudflare\"");
                    ok = false;
                    None
                }
            };
            let zone = match &dl.zone {
                None => {
                    d.error(&key("dns.zone"), span.clone(), "`[dns]` needs `zone`")
                        .hint("the Cloudflare zone that holds the domain, e.g. \"example.com\"");
                    ok = false;
                    None
                }
                Some(z) if !is_hostname(&z.value) => {
                    d.error(
                        &key("dns.zone"),
                        z.span.clone(),
                        format!("zone {:?} is not a hostname", z.value),
                    );
                    ok = false;
                    None
                }
                Some(z) => {
                    let zone = z.value.to_ascii_lowercase();
                    if let Some(dom) = &domain
                        && !(dom == &zone || dom.ends_with(&format!(".{zone}")))
                    {
                        d.error(
                            &key("dns.zone"),
                            z.span.clone(),
                            format!("domain {dom:?} is not inside zone {zone:?}"),
                        )
                        .hint("the zone must be the domain itself or one of its parents");
                        ok = false;
                    }
                    Some(zone)
                }
            };
            if !aws {
                d.warning(
                    &key("dns"),
                    span.clone(),
                    "`[dns]` is ignored by the local target",
                );
            }
            match (provider, zone) {
                (Some(provider), Some(zone)) => Some(DnsSettings { provider, zone }),
                _ => None,
            }
        }
    };

    let ll = &l.local;
    let api_port = port(
        d,
        &key("local.api_port"),
        &ll.api_port,
        defaults::API_PORT,
        &mut ok,
    );
    let runner_port_base = port(
        d,
        &key("local.runner_port_base"),
        &ll.runner_port_base,
        defaults::RUNNER_PORT_BASE,
        &mut ok,
    );
    if target == Target::Local && u32::from(runner_port_base) + runners > 65535 {
        let span = ll
            .runner_port_base
            .as_ref()
            .map_or(here.clone(), |s| s.span.clone());
        d.error(
            &key("local.runner_port_base"),
            span,
            format!(
                "runner ports {}..={} run past 65535",
                u32::from(runner_port_base) + 1,
                u32::from(runner_port_base) + runners
            ),
        );
        ok = false;
    }
    let bin_dir = ll.bin_dir.as_ref().map(|b| b.value.clone());

    let services = services(d, &name, target, &l.services, &mut ok);

    if target == Target::Local {
        // Every local process needs its own port.
        let mut used: BTreeMap<u16, String> = BTreeMap::new();
        used.insert(api_port, "the control plane (local.api_port)".into());
        for n in 1..=runners {
            used.entry((u32::from(runner_port_base) + n) as u16)
                .or_insert_with(|| format!("runner-{n}"));
        }
        for (svc, decl) in services.iter().zip(&l.services) {
            if let Some(other) = used.get(&svc.port) {
                let span = decl
                    .layer
                    .port
                    .as_ref()
                    .map_or(decl.span.clone(), |p| p.span.clone());
                d.error(
                    &format!("{}.port", decl.path),
                    span,
                    format!(
                        "port {} of service {:?} is already used by {other}",
                        svc.port, svc.name
                    ),
                );
                ok = false;
            } else {
                used.insert(svc.port, format!("service {:?}", svc.name));
            }
        }
    }

    ok.then(|| Stage {
        name,
        target,
        region,
        domain,
        production,
        runners,
        runner: RunnerSettings {
            instance_type,
            ami_name,
            ami_owner,
            root_volume_gb,
            version,
            artifact_url,
            artifact_sha256,
        },
        database: DatabaseSettings {
            engine_version,
            instance_class,
            storage_gb,
            multi_az: dl.multi_az.as_ref().is_some_and(|m| m.value),
            backup_retention_days,
        },
        control_plane: ControlPlaneSettings {
            image: cl.image.as_ref().map(|i| i.value.clone()),
            cpu: cp_cpu,
            memory_mb: cp_memory,
            replicas: cp_replicas,
        },
        network: NetworkSettings { vpc_cidr },
        oidc,
        dns,
        local: LocalSettings {
            api_port,
            runner_port_base,
            bin_dir,
        },
        services,
    })
}

fn services(
    d: &mut Diagnostics<'_>,
    stage: &str,
    target: Target,
    decls: &[ServiceDecl],
    ok: &mut bool,
) -> Vec<Service> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    for s in decls {
        let l = &s.layer;
        let k = |f: &str| format!("{}.{f}", s.path);
        let name = match &l.name {
            None => {
                d.error(
                    &k("name"),
                    s.span.clone(),
                    format!("a service of stage {stage:?} has no `name`"),
                );
                *ok = false;
                continue;
            }
            Some(n) => n,
        };
        if !is_label(&name.value) {
            d.error(
                &k("name"),
                name.span.clone(),
                format!("service name {:?} is not a DNS label", name.value),
            )
            .hint("use 1-63 lowercase letters, digits and '-', not starting or ending with '-'");
            *ok = false;
        } else if RESERVED_SERVICES.contains(&name.value.as_str()) {
            d.error(
                &k("name"),
                name.span.clone(),
                format!("service name {:?} is reserved by the platform", name.value),
            )
            .hint(format!("reserved names: {}", RESERVED_SERVICES.join(", ")));
            *ok = false;
        }
        if !seen.insert(name.value.clone()) {
            d.error(
                &k("name"),
                name.span.clone(),
                format!("duplicate service name {:?}", name.value),
            )
            .hint("service names must be unique within a stage");
            *ok = false;
        }
        let port = match &l.port {
            None => {
                d.error(
                    &k("port"),
                    s.span.clone(),
                    format!("service {:?} has no `port`", name.value),
                );
                *ok = false;
                0
            }
            Some(p) => port(d, &k("port"), &Some(p.clone()), 0, ok),
        };
        check_image(d, &k("image"), &l.image, ok);
        match target {
            Target::Aws if l.image.is_none() => {
                d.error(
                    &k("image"),
                    s.span.clone(),
                    format!(
                        "service {:?} needs an `image` on the aws target",
                        name.value
                    ),
                );
                *ok = false;
            }
            Target::Local if l.command.as_ref().is_none_or(|c| c.value.is_empty()) => {
                let span = l
                    .command
                    .as_ref()
                    .map_or(s.span.clone(), |c| c.span.clone());
                d.error(
                    &k("command"),
                    span,
                    format!(
                        "service {:?} needs a non-empty `command` on the local target",
                        name.value
                    ),
                )
                .hint("e.g. command = [\"python3\", \"-m\", \"http.server\", \"8000\"]");
                *ok = false;
            }
            _ => {}
        }
        if let Some(h) = &l.health_path
            && !h.value.starts_with('/')
        {
            d.error(
                &k("health_path"),
                h.span.clone(),
                format!("health path {:?} must start with '/'", h.value),
            );
            *ok = false;
        }
        let mut env = BTreeMap::new();
        if let Some(e) = &l.env {
            for (var, value) in &e.value {
                if !is_env_name(var) {
                    d.error(
                        &k(&format!("env.{var}")),
                        value.span.clone(),
                        format!("{var:?} is not an environment variable name"),
                    )
                    .hint("use letters, digits and '_', not starting with a digit");
                    *ok = false;
                }
                env.insert(var.clone(), value.value.clone());
            }
        }
        let mut secret_maps = [BTreeMap::new(), BTreeMap::new()];
        for (slot, (key, decl)) in secret_maps.iter_mut().zip([
            ("secrets", &l.secrets),
            ("optional_secrets", &l.optional_secrets),
        ]) {
            let Some(decl) = decl else { continue };
            for (var, secret) in &decl.value {
                let key = k(&format!("{key}.{var}"));
                if !is_env_name(var) {
                    d.error(
                        &key,
                        secret.span.clone(),
                        format!("{var:?} is not an environment variable name"),
                    )
                    .hint("use letters, digits and '_', not starting with a digit");
                    *ok = false;
                } else if env.contains_key(var) {
                    d.error(
                        &key,
                        secret.span.clone(),
                        format!("{var} is set twice (in `env` and as a secret)"),
                    );
                    *ok = false;
                }
                if let Err(why) = crate::secrets::check_name(&secret.value) {
                    d.error(&key, secret.span.clone(), why)
                        .hint("stage secret names are lowercase letters, digits and '-', e.g. \"sentry-dsn\"");
                    *ok = false;
                }
                slot.insert(var.clone(), secret.value.clone());
            }
        }
        let [secrets, optional_secrets] = secret_maps;
        for var in optional_secrets.keys().filter(|v| secrets.contains_key(*v)) {
            d.error(
                &k(&format!("optional_secrets.{var}")),
                s.span.clone(),
                format!("{var} is both a required and an optional secret"),
            );
            *ok = false;
        }
        out.push(Service {
            name: name.value.clone(),
            image: l.image.as_ref().map(|i| i.value.clone()),
            command: l
                .command
                .as_ref()
                .map(|c| c.value.iter().map(|a| a.value.clone()).collect())
                .unwrap_or_default(),
            port,
            public: l.public.as_ref().is_some_and(|p| p.value),
            health_path: l.health_path.as_ref().map(|h| h.value.clone()),
            cpu: fargate_cpu(d, &k("cpu"), &l.cpu, defaults::SERVICE_CPU, ok),
            memory_mb: ranged(
                d,
                &k("memory_mb"),
                &l.memory_mb,
                512,
                122_880,
                defaults::SERVICE_MEMORY_MB,
                ok,
            ),
            replicas: ranged(d, &k("replicas"), &l.replicas, 0, 50, 1, ok),
            env,
            secrets,
            optional_secrets,
        });
    }
    out
}

fn value_or(v: &Option<Sp<String>>, default: &str) -> String {
    v.as_ref()
        .map_or_else(|| default.to_string(), |s| s.value.clone())
}

fn ranged(
    d: &mut Diagnostics<'_>,
    key: &str,
    v: &Option<Sp<i64>>,
    min: i64,
    max: i64,
    default: u32,
    ok: &mut bool,
) -> u32 {
    match v {
        None => default,
        Some(s) if s.value < min || s.value > max => {
            d.error(
                key,
                s.span.clone(),
                format!("`{key}` is {}, outside {min}..={max}", s.value),
            );
            *ok = false;
            default
        }
        Some(s) => s.value as u32,
    }
}

fn port(
    d: &mut Diagnostics<'_>,
    key: &str,
    v: &Option<Sp<i64>>,
    default: u16,
    ok: &mut bool,
) -> u16 {
    match v {
        None => default,
        Some(s) if !(1..=65535).contains(&s.value) => {
            d.error(
                key,
                s.span.clone(),
                format!("port {} is out of range", s.value),
            )
            .hint("ports are 1 to 65535");
            *ok = false;
            default
        }
        Some(s) => s.value as u16,
    }
}

fn fargate_cpu(
    d: &mut Diagnostics<'_>,
    key: &str,
    v: &Option<Sp<i64>>,
    default: u32,
    ok: &mut bool,
) -> u32 {
    const VALID: [i64; 7] = [256, 512, 1024, 2048, 4096, 8192, 16384];
    match v {
        None => default,
        Some(s) if !VALID.contains(&s.value) => {
            d.error(
                key,
                s.span.clone(),
                format!("{} is not a Fargate CPU size", s.value),
            )
            .hint("one of 256, 512, 1024, 2048, 4096, 8192, 16384 (1024 = 1 vCPU)");
            *ok = false;
            default
        }
        Some(s) => s.value as u32,
    }
}

fn check_image(d: &mut Diagnostics<'_>, key: &str, v: &Option<Sp<String>>, ok: &mut bool) {
    if let Some(i) = v
        && (i.value.is_empty()
            || i.value
                .chars()
                .any(|c| c.is_whitespace() || c.is_ascii_uppercase()))
    {
        d.error(
            key,
            i.span.clone(),
            format!("{:?} is not a container image reference", i.value),
        )
        .hint("e.g. \"123456789012.dkr.ecr.ap-southeast-1.amazonaws.com/boxlite/api:1.2.0\"");
        *ok = false;
    }
}

/// Stack and stage names: lowercase, starting with a letter, usable in AWS names.
fn is_name(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    (2..=max).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// One DNS label.
pub fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A hostname of two or more labels.
pub fn is_hostname(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    let labels: Vec<&str> = s.split('.').collect();
    s.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| is_label(l))
        && !labels
            .last()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
}

fn is_url_host(url: &str) -> bool {
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    host == "localhost" || host == "127.0.0.1" || is_hostname(host)
}

fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn is_instance_type(s: &str) -> bool {
    match s.split_once('.') {
        Some((family, size)) => {
            !family.is_empty()
                && !size.is_empty()
                && family
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && size
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        }
        None => false,
    }
}

fn is_version(s: &str) -> bool {
    let core = s.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn is_artifact_url(s: &str) -> bool {
    let rest = s
        .strip_prefix("s3://")
        .or_else(|| s.strip_prefix("https://"));
    rest.is_some_and(|r| {
        r.split('/').next().is_some_and(|host| !host.is_empty())
            && r.contains('/')
            && !r.ends_with('/')
            && r.chars()
                .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\')
    })
}

fn is_env_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && !b[0].is_ascii_digit()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

fn is_vpc_cidr(s: &str) -> bool {
    let Some((ip, prefix)) = s.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    let Ok(ip) = ip.parse::<std::net::Ipv4Addr>() else {
        return false;
    };
    (16..=24).contains(&prefix) && u32::from(ip) & !(u32::MAX << (32 - prefix)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        assert!(is_hostname("boxlite.example.com"));
        assert!(is_hostname("a-b.io"));
        assert!(!is_hostname("localhost"));
        assert!(!is_hostname("-bad.example.com"));
        assert!(!is_hostname("bad_host.example.com"));
        assert!(!is_hostname("1.2.3.4"));
        assert!(!is_hostname("exa mple.com"));
    }

    #[test]
    fn regions_and_cidrs() {
        assert!(is_region("ap-southeast-1"));
        assert!(is_region("us-gov-west-1"));
        assert!(!is_region("mars"));
        assert!(is_vpc_cidr("10.42.0.0/16"));
        assert!(!is_vpc_cidr("10.42.0.1/16"));
        assert!(is_artifact_url("s3://bucket/a/runner.tar.gz"));
        assert!(is_artifact_url("https://example.com/r.tar.gz"));
        assert!(!is_artifact_url("http://example.com/r.tar.gz"));
        assert!(!is_artifact_url("s3://bucket/"));
        assert!(!is_artifact_url("s3://bucket/a b"));
        assert!(!is_vpc_cidr("10.0.0.0/8"));
    }

    #[test]
    fn versions_and_instance_types() {
        assert!(is_version("0.1.0"));
        assert!(is_version("1.2.3-rc.1"));
        assert!(!is_version("1.2"));
        assert!(is_instance_type("c7i.xlarge"));
        assert!(!is_instance_type("large"));
    }
}
