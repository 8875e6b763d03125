//! The stack.toml schema as written: layers of optional, spanned settings.
//!
//! `[defaults]` and every `[stages.<name>]` are the same [`StageLayer`]; a stage's
//! layer is merged over the defaults key by key (tables recursively, services by
//! name) before validation turns the result into a [`crate::Stage`].

use std::collections::BTreeMap;

use crate::decode::{Sp, Table};
use crate::diagnostic::{Diagnostics, Span};

/// Declares a layer struct whose fields are all optional and spanned, with its
/// decoder (one typed read per key) and its merge (the overriding layer wins).
macro_rules! layer {
    ($(#[$meta:meta])* $name:ident { $( $(#[$fmeta:meta])* $field:ident : $ty:ty = $read:ident ),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: Option<Sp<$ty>>, )*
        }

        impl $name {
            fn decode_keys(t: &mut Table<'_, '_>, d: &mut Diagnostics<'_>) -> Self {
                Self { $( $field: t.$read(stringify!($field), d), )* }
            }

            /// Decode `parent.<key>` when present, with the span of the table.
            pub fn decode_table(parent: &mut Table<'_, '_>, key: &'static str, d: &mut Diagnostics<'_>) -> Option<(Span, Self)> {
                let mut t = parent.table(key, d)?;
                let layer = Self::decode_keys(&mut t, d);
                let span = t.span();
                t.finish(d);
                Some((span, layer))
            }

            /// This layer with every key that `over` sets replaced by `over`'s value.
            pub fn merge(self, over: Self) -> Self {
                Self { $( $field: over.$field.or(self.$field), )* }
            }
        }
    };
}

layer! {
    /// `[runner]`: how each runner host is built.
    RunnerLayer {
        /// EC2 instance type.
        instance_type: String = string,
        /// AMI name pattern (`*` wildcards) searched among `ami_owner`'s images.
        ami_name: String = string,
        /// Account id (or alias) owning the AMI.
        ami_owner: String = string,
        /// Root volume size in GiB.
        root_volume_gb: i64 = integer,
        /// Version of `boxlite-runner` to install.
        version: String = string,
        /// Where a new runner downloads `boxlite-runner` from (`s3://…` or `https://…`).
        artifact_url: String = string,
        /// SHA-256 of that artifact, hex; read from the object's metadata when unset.
        artifact_sha256: String = string,
    }
}

layer! {
    /// `[database]`: the control plane's PostgreSQL on aws (local uses SQLite).
    DatabaseLayer {
        /// PostgreSQL major version.
        engine_version: String = string,
        /// RDS instance class.
        instance_class: String = string,
        /// Allocated storage in GiB.
        storage_gb: i64 = integer,
        /// Standby in a second availability zone.
        multi_az: bool = boolean,
        /// Days of automated backups.
        backup_retention_days: i64 = integer,
    }
}

layer! {
    /// `[control_plane]`: the API, proxy and SSH gateway services.
    ControlPlaneLayer {
        /// Container image (aws).
        image: String = string,
        /// Fargate CPU units per task.
        cpu: i64 = integer,
        /// Fargate memory per task, MiB.
        memory_mb: i64 = integer,
        /// Tasks per service.
        replicas: i64 = integer,
    }
}

layer! {
    /// `[network]`: the stage's VPC (aws).
    NetworkLayer {
        /// IPv4 CIDR of the VPC.
        vpc_cidr: String = string,
    }
}

layer! {
    /// `[oidc]`: the identity provider whose access tokens the API accepts.
    OidcLayer {
        /// Issuer URL, exactly as in the tokens' `iss` claim.
        issuer: String = string,
        /// Expected `aud` claim.
        audience: String = string,
    }
}

layer! {
    /// `[dns]`: who serves the stage's public names.
    DnsLayer {
        /// DNS provider (`cloudflare`).
        provider: String = string,
        /// The zone that holds `domain`.
        zone: String = string,
    }
}

layer! {
    /// `[local]`: settings of the local target.
    LocalLayer {
        /// Port of the control plane API on 127.0.0.1.
        api_port: i64 = integer,
        /// Runner `N` listens on `runner_port_base + N`.
        runner_port_base: i64 = integer,
        /// Directory holding the platform binaries, relative to stack.toml.
        bin_dir: String = string,
    }
}

layer! {
    /// One `[[services]]` entry: an extra service deployed beside the platform.
    ServiceLayer {
        /// Service name, a DNS label.
        name: String = string,
        /// Container image (aws).
        image: String = string,
        /// Program and arguments (local).
        command: Vec<Sp<String>> = string_list,
        /// Port the service listens on.
        port: i64 = integer,
        /// Reachable from the internet through the load balancer.
        public: bool = boolean,
        /// HTTP path answering 2xx when healthy.
        health_path: String = string,
        /// Fargate CPU units.
        cpu: i64 = integer,
        /// Fargate memory, MiB.
        memory_mb: i64 = integer,
        /// Number of tasks.
        replicas: i64 = integer,
        /// Environment variables (never secrets: use `secrets`).
        env: BTreeMap<String, Sp<String>> = string_map,
        /// Environment variable → stage secret (`boxctl secret set`); the
        /// deploy stops while one is unset.
        secrets: BTreeMap<String, Sp<String>> = string_map,
        /// Like `secrets`, but an unset secret leaves the variable out (the
        /// feature it enables is off).
        optional_secrets: BTreeMap<String, Sp<String>> = string_map,
    }
}

/// A `[[services]]` entry with the span of its table.
#[derive(Clone, Debug)]
pub struct ServiceDecl {
    /// The entry's settings.
    pub layer: ServiceLayer,
    /// Where the entry is.
    pub span: Span,
    /// Its dotted path (`stages.prod.services[1]`).
    pub path: String,
}

/// The scalar keys of a stage, plus its tables and services.
#[derive(Clone, Debug, Default)]
pub struct StageLayer {
    /// `local` or `aws`.
    pub target: Option<Sp<String>>,
    /// AWS region.
    pub region: Option<Sp<String>>,
    /// Public domain of the stage.
    pub domain: Option<Sp<String>>,
    /// A production stage keeps its data on destroy and protects its database.
    pub production: Option<Sp<bool>>,
    /// Number of runners.
    pub runners: Option<Sp<i64>>,
    /// `[runner]`.
    pub runner: RunnerLayer,
    /// `[database]`.
    pub database: DatabaseLayer,
    /// `[control_plane]`.
    pub control_plane: ControlPlaneLayer,
    /// `[network]`.
    pub network: NetworkLayer,
    /// `[oidc]`, with the span of the table when present.
    pub oidc: Option<(Span, OidcLayer)>,
    /// `[dns]`, with the span of the table when present.
    pub dns: Option<(Span, DnsLayer)>,
    /// `[local]`.
    pub local: LocalLayer,
    /// `[[services]]`.
    pub services: Vec<ServiceDecl>,
}

impl StageLayer {
    fn decode(t: &mut Table<'_, '_>, d: &mut Diagnostics<'_>) -> Self {
        let target = t.string("target", d);
        let region = t.string("region", d);
        let domain = t.string("domain", d);
        let production = t.boolean("production", d);
        let runners = t.integer("runners", d);
        let runner = RunnerLayer::decode_table(t, "runner", d)
            .map(|(_, l)| l)
            .unwrap_or_default();
        let database = DatabaseLayer::decode_table(t, "database", d)
            .map(|(_, l)| l)
            .unwrap_or_default();
        let control_plane = ControlPlaneLayer::decode_table(t, "control_plane", d)
            .map(|(_, l)| l)
            .unwrap_or_default();
        let network = NetworkLayer::decode_table(t, "network", d)
            .map(|(_, l)| l)
            .unwrap_or_default();
        let oidc = OidcLayer::decode_table(t, "oidc", d);
        let dns = DnsLayer::decode_table(t, "dns", d);
        let local = LocalLayer::decode_table(t, "local", d)
            .map(|(_, l)| l)
            .unwrap_or_default();
        let services = t
            .table_array("services", d)
            .unwrap_or_default()
            .into_iter()
            .map(|mut s| {
                let layer = ServiceLayer::decode_keys(&mut s, d);
                let decl = ServiceDecl {
                    layer,
                    span: s.span(),
                    path: s.path().to_string(),
                };
                s.finish(d);
                decl
            })
            .collect();
        StageLayer {
            target,
            region,
            domain,
            production,
            runners,
            runner,
            database,
            control_plane,
            network,
            oidc,
            dns,
            local,
            services,
        }
    }

    /// This layer (the defaults) with `over` (a stage) applied on top.
    pub fn merge(self, over: StageLayer) -> StageLayer {
        // Services merge by name: a stage entry replaces the default entry of the
        // same name. Only default entries are replaced, so two entries with one
        // name in the same list both stay and validation reports the duplicate.
        let defaults = self.services.len();
        let mut services = self.services;
        let mut replaced = vec![false; defaults];
        for s in over.services {
            let name = s.layer.name.as_ref().map(|n| n.value.clone());
            let slot = name.and_then(|n| {
                (0..defaults).find(|&i| {
                    !replaced[i]
                        && services[i]
                            .layer
                            .name
                            .as_ref()
                            .is_some_and(|dn| dn.value == n)
                })
            });
            match slot {
                Some(i) => {
                    services[i] = s;
                    replaced[i] = true;
                }
                None => services.push(s),
            }
        }
        StageLayer {
            target: over.target.or(self.target),
            region: over.region.or(self.region),
            domain: over.domain.or(self.domain),
            production: over.production.or(self.production),
            runners: over.runners.or(self.runners),
            runner: self.runner.merge(over.runner),
            database: self.database.merge(over.database),
            control_plane: self.control_plane.merge(over.control_plane),
            network: self.network.merge(over.network),
            oidc: merge_table(self.oidc, over.oidc, OidcLayer::merge),
            dns: merge_table(self.dns, over.dns, DnsLayer::merge),
            local: self.local.merge(over.local),
            services,
        }
    }
}

fn merge_table<L>(
    base: Option<(Span, L)>,
    over: Option<(Span, L)>,
    merge: fn(L, L) -> L,
) -> Option<(Span, L)> {
    match (base, over) {
        (Some((_, b)), Some((span, o))) => Some((span, merge(b, o))),
        (b, o) => o.or(b),
    }
}

/// A `[stages.<name>]` table as written.
#[derive(Clone, Debug)]
pub struct StageDecl {
    /// The stage name and the span of its key.
    pub name: Sp<String>,
    /// Span of the whole table.
    pub span: Span,
    /// Its settings.
    pub layer: StageLayer,
}

/// The whole file as written, before defaults are applied and values checked.
#[derive(Clone, Debug)]
pub struct StackDecl {
    /// `name`.
    pub name: Option<Sp<String>>,
    /// Span of the whole document.
    pub span: Span,
    /// `[defaults]`.
    pub defaults: StageLayer,
    /// `[stages.<name>]`, in file order.
    pub stages: Vec<StageDecl>,
}

impl StackDecl {
    /// Decode the document root, reporting unknown keys and type errors.
    pub fn decode(root: &mut Table<'_, '_>, d: &mut Diagnostics<'_>) -> StackDecl {
        let name = root.string("name", d);
        let defaults = match root.table("defaults", d) {
            Some(mut t) => {
                let l = StageLayer::decode(&mut t, d);
                t.finish(d);
                l
            }
            None => StageLayer::default(),
        };
        let mut stages: Vec<StageDecl> = root
            .named_tables("stages", d)
            .into_iter()
            .map(|(name, mut t)| {
                let layer = StageLayer::decode(&mut t, d);
                let span = t.span();
                t.finish(d);
                StageDecl { name, span, layer }
            })
            .collect();
        stages.sort_by_key(|s| s.span.start);
        StackDecl {
            name,
            span: root.span(),
            defaults,
            stages,
        }
    }
}
