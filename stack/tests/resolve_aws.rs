//! The aws target's desired graph: its shape, policies, addresses and the
//! properties the provider relies on.

use std::collections::BTreeSet;

use stack::{DesiredGraph, ResourceId, Value, kinds};

const STACK: &str = r#"
name = "boxlite"

[defaults.runner]
instance_type = "c7i.large"

[stages.prod]
target = "aws"
region = "ap-southeast-1"
domain = "boxlite.example.com"
production = true
runners = 3

[stages.prod.runner]
artifact_url = "https://downloads.example.com/boxlite-runner-0.1.0.tar.gz"
artifact_sha256 = "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"

[stages.prod.control_plane]
image = "registry.example.com/boxlite/control-plane:0.1.0"

[stages.prod.oidc]
issuer = "https://auth.example.com/"
audience = "boxlite-api"

[[stages.prod.services]]
name = "docs"
image = "registry.example.com/docs:1"
port = 9000
public = true
health_path = "/healthz"

[[stages.prod.services]]
name = "worker"
image = "registry.example.com/worker:1"
port = 9100

[stages.staging]
target = "aws"
region = "eu-west-1"
domain = "staging.example.com"
runners = 1

[stages.staging.control_plane]
image = "registry.example.com/boxlite/control-plane:0.1.0"
"#;

fn graph(stage: &str) -> DesiredGraph {
    stack::load(STACK).unwrap().stack.resolve(stage).unwrap()
}

fn get<'a>(g: &'a DesiredGraph, id: &str) -> &'a stack::Resource {
    g.resources
        .get(&ResourceId::from(id))
        .unwrap_or_else(|| panic!("{id} is not in the graph"))
}

fn s<'a>(g: &'a DesiredGraph, id: &str, key: &str) -> &'a str {
    get(g, id).props[key]
        .as_str()
        .unwrap_or_else(|| panic!("{id}.{key} is not text"))
}

#[test]
fn the_same_stack_gives_the_same_graph_byte_for_byte() {
    assert_eq!(
        graph("prod").to_canonical_json(),
        graph("prod").to_canonical_json()
    );
}

#[test]
fn a_prod_stage_has_every_part_of_the_platform() {
    let g = graph("prod");
    let ids: BTreeSet<&str> = g.resources.keys().map(ResourceId::as_str).collect();
    for id in [
        "vpc/main",
        "igw/main",
        "subnet/public-a",
        "subnet/public-b",
        "subnet/private-a",
        "subnet/private-b",
        "subnet/runners-a",
        "subnet/runners-b",
        "eip/nat-a",
        "eip/nat-b",
        "nat/a",
        "nat/b",
        "rt/public",
        "rt/private-a",
        "rt/private-b",
        "sg/alb",
        "sg/nlb",
        "sg/services",
        "sg/runners",
        "sg/database",
        "role/runner",
        "profile/runner",
        "role/task-execution",
        "role/task",
        "logs/services",
        "cluster/main",
        "taskdef/api",
        "taskdef/proxy",
        "taskdef/ssh",
        "taskdef/docs",
        "taskdef/worker",
        "service/api",
        "service/proxy",
        "service/ssh",
        "service/docs",
        "service/worker",
        "lb/api",
        "lb/proxy",
        "lb/ssh",
        "tg/api",
        "tg/proxy",
        "tg/ssh",
        "tg/svc-docs",
        "rule/svc-docs",
        "listener/api-https",
        "listener/api-http",
        "listener/proxy-https",
        "listener/proxy-http",
        "listener/ssh",
        "cert/api",
        "cert/proxy",
        "certvalidation/api",
        "certvalidation/proxy",
        "dbsubnets/main",
        "db/main",
        "bucket/main",
        "secret/admin-api-key",
        "secret/database-password",
        "param/database-url",
        "param/api-url",
        "param/bucket",
        "runner/runner-1",
        "runner/runner-2",
        "runner/runner-3",
    ] {
        assert!(ids.contains(id), "{id} missing");
    }
    assert!(!ids.contains("runner/runner-4"));
    // Every resource is an aws kind.
    assert!(g.resources.values().all(|r| r.kind.starts_with("aws.")));
    // A non-production stage shares one NAT gateway.
    let staging = graph("staging");
    assert!(staging.resources.contains_key(&ResourceId::from("nat/a")));
    assert!(!staging.resources.contains_key(&ResourceId::from("nat/b")));
    assert_eq!(
        get(&staging, "rt/private-b").props["routes"],
        get(&staging, "rt/private-a").props["routes"]
    );
}

#[test]
fn subnets_are_carved_from_the_vpc_in_two_zones() {
    let g = graph("prod");
    assert_eq!(s(&g, "vpc/main", "cidr"), "10.42.0.0/16");
    assert_eq!(s(&g, "subnet/public-a", "cidr"), "10.42.0.0/19");
    assert_eq!(
        s(&g, "subnet/public-a", "availability_zone"),
        "ap-southeast-1a"
    );
    assert_eq!(
        s(&g, "subnet/public-b", "availability_zone"),
        "ap-southeast-1b"
    );
    assert_eq!(s(&g, "subnet/runners-b", "cidr"), "10.42.192.0/18");
    assert_eq!(
        get(&g, "subnet/public-a").props["public"],
        Value::Bool(true)
    );
    assert_eq!(
        get(&g, "subnet/private-a").props["public"],
        Value::Bool(false)
    );
}

#[test]
fn runners_are_protected_alternate_zones_and_carry_no_secret() {
    let g = graph("prod");
    let r1 = get(&g, "runner/runner-1");
    let r2 = get(&g, "runner/runner-2");
    assert_eq!(r1.kind, kinds::AWS_INSTANCE);
    assert!(r1.policy.protect);
    assert_eq!(
        r1.policy.ignore_changes,
        BTreeSet::from(["ami".to_string(), "user_data".to_string()])
    );
    assert_eq!(r1.props["private_ip"], Value::str("10.42.128.4"));
    assert_eq!(r2.props["private_ip"], Value::str("10.42.192.4"));
    assert_eq!(
        r1.props["subnet_id"],
        Value::reference("subnet/runners-a", "id")
    );
    assert_eq!(
        r2.props["subnet_id"],
        Value::reference("subnet/runners-b", "id")
    );
    // The AMI is a lookup the provider resolves before planning.
    assert_eq!(
        r1.props["ami"],
        Value::Map(
            [
                (
                    "name".to_string(),
                    Value::str(stack::model::defaults::AMI_NAME)
                ),
                ("owner".to_string(), Value::str("099720109477")),
            ]
            .into()
        )
    );
    let ud = s(&g, "runner/runner-1", "user_data");
    assert!(ud.starts_with("#cloud-config"));
    assert!(!ud.contains("{{"));
    assert!(ud.contains("/boxlite/prod/runner-tokens/runner-1"));
    assert!(ud.contains("advertise_url = \"http://10.42.128.4:7100\""));
    assert!(ud.contains("abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"));
    assert!(ud.contains("https://downloads.example.com/boxlite-runner-0.1.0.tar.gz"));
    // The host owns its token: a SecureString minted with it, read at boot.
    assert_eq!(
        s(&g, "runner/runner-1", "token_parameter"),
        "/boxlite/prod/runner-tokens/runner-1"
    );
    assert!(!g.resources.keys().any(|id| id.as_str().ends_with("-token")));
    // The registry names each runner's digest, as its host records it.
    let registry = get(&g, "param/runner-token-hashes").props["value"]
        .as_map()
        .unwrap()
        .clone();
    assert_eq!(registry.len(), 3);
    assert_eq!(
        registry["runner-2"],
        Value::reference("runner/runner-2", "token_sha256")
    );
}

#[test]
fn an_unpinned_artifact_leaves_the_user_data_for_the_provider() {
    let g = graph("staging");
    let ud = get(&g, "runner/runner-1").props["user_data"]
        .as_map()
        .expect("a lookup map");
    let url = ud["artifact_sha256_from"].as_str().unwrap();
    assert!(url.starts_with("s3://boxlite-staging-"), "{url}");
    assert!(url.ends_with("/boxlite-runner-linux-amd64.tar.gz"), "{url}");
    assert_eq!(ud["template"], Value::str("runner/cloud-init.yaml"));
    assert!(!ud["vars"].as_map().unwrap().contains_key("artifact_sha256"));
}

#[test]
fn security_groups_are_least_privilege() {
    let g = graph("prod");
    let ingress = |id: &str| get(&g, id).props["ingress"].as_map().unwrap().clone();
    let sources = |id: &str| -> BTreeSet<String> {
        ingress(id)
            .values()
            .map(|r| {
                let r = r.as_map().unwrap();
                match (&r.get("cidr"), &r.get("source")) {
                    (Some(Value::Str(c)), _) => c.clone(),
                    (_, Some(Value::Ref(r))) => r.id.to_string(),
                    other => panic!("{other:?}"),
                }
            })
            .collect()
    };
    assert_eq!(
        sources("sg/runners"),
        BTreeSet::from(["sg/services".into()])
    );
    assert_eq!(
        sources("sg/database"),
        BTreeSet::from(["sg/services".into()])
    );
    assert_eq!(
        sources("sg/services"),
        BTreeSet::from(["sg/alb".into(), "sg/nlb".into()])
    );
    assert_eq!(sources("sg/alb"), BTreeSet::from(["0.0.0.0/0".into()]));
    let ports: BTreeSet<i64> = ingress("sg/alb")
        .values()
        .map(|r| r.as_map().unwrap()["from_port"].as_int().unwrap())
        .collect();
    assert_eq!(ports, BTreeSet::from([80, 443]));
    let nlb: Vec<i64> = ingress("sg/nlb")
        .values()
        .map(|r| r.as_map().unwrap()["from_port"].as_int().unwrap())
        .collect();
    assert_eq!(nlb, [2222]);
}

#[test]
fn load_balancers_terminate_tls_and_keep_websockets_open() {
    let g = graph("prod");
    for lb in ["lb/api", "lb/proxy"] {
        assert_eq!(get(&g, lb).props["idle_timeout_seconds"], Value::Int(3600));
        assert_eq!(s(&g, lb, "type"), "application");
    }
    assert_eq!(s(&g, "lb/ssh", "type"), "network");
    let https = get(&g, "listener/proxy-https");
    assert_eq!(https.props["port"], Value::Int(443));
    assert_eq!(
        https.props["certificate"],
        Value::reference("cert/proxy", "arn")
    );
    assert!(
        https
            .deps
            .contains(&ResourceId::from("certvalidation/proxy"))
    );
    let http = get(&g, "listener/api-http").props["default_action"]
        .as_map()
        .unwrap();
    assert_eq!(http["type"], Value::str("redirect"));
    assert_eq!(http["protocol"], Value::str("HTTPS"));
    assert_eq!(get(&g, "listener/ssh").props["port"], Value::Int(2222));
    assert_eq!(s(&g, "cert/proxy", "domain"), "proxy.boxlite.example.com");
    assert_eq!(
        get(&g, "cert/proxy").props["alternative_names"],
        Value::strs(["*.proxy.boxlite.example.com"])
    );
    assert_eq!(
        get(&g, "cert/api").props["alternative_names"],
        Value::List(Vec::new())
    );
    assert_eq!(s(&g, "cert/svc-docs", "domain"), "docs.boxlite.example.com");
    assert_eq!(
        get(&g, "rule/svc-docs").props["certificate"],
        Value::reference("cert/svc-docs", "arn")
    );
    assert_eq!(s(&g, "rule/svc-docs", "host"), "docs.boxlite.example.com");
    assert!(s(&g, "lb/proxy", "name").len() <= 32);
}

#[test]
fn production_data_is_retained_and_protected() {
    let g = graph("prod");
    let db = get(&g, "db/main");
    assert!(db.policy.retain && db.policy.protect);
    assert_eq!(db.props["deletion_protection"], Value::Bool(true));
    assert_eq!(
        db.props["master_password"],
        Value::Secret("database-password".into())
    );
    assert!(get(&g, "bucket/main").policy.retain);
    let staging = graph("staging");
    let db = get(&staging, "db/main");
    assert!(!db.policy.retain && !db.policy.protect);
    assert_eq!(db.props["deletion_protection"], Value::Bool(false));
    assert!(!get(&staging, "bucket/main").policy.retain);
}

#[test]
fn task_definitions_are_multi_line_json_with_secret_references_only() {
    let g = graph("prod");
    let defs = s(&g, "taskdef/api", "container_definitions");
    assert!(defs.lines().count() > 10);
    let parsed: serde_json::Value = serde_json::from_str(defs).unwrap();
    let c = &parsed[0];
    assert_eq!(
        c["image"],
        "registry.example.com/boxlite/control-plane:0.1.0"
    );
    let secrets: Vec<(&str, &str)> = c["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap(),
                s["valueFrom"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(secrets.contains(&("BOXLITE_ADMIN_KEY", "/boxlite/prod/admin-api-key")));
    assert!(secrets.contains(&("PGPASSWORD", "/boxlite/prod/database-password")));
    assert_eq!(
        s(&g, "taskdef/api", "content_sha256"),
        s(&g, "service/api", "task_definition_sha256")
    );
    // A change of content changes the digest the service follows.
    let other = STACK.replace("control-plane:0.1.0", "control-plane:0.2.0");
    let g2 = stack::load(&other).unwrap().stack.resolve("prod").unwrap();
    assert_ne!(
        s(&g, "taskdef/api", "content_sha256"),
        s(&g2, "taskdef/api", "content_sha256")
    );
    // Services are on the private subnets behind their listener.
    let svc = get(&g, "service/api");
    assert!(svc.deps.contains(&ResourceId::from("listener/api-https")));
    assert_eq!(svc.props["desired_count"], Value::Int(2));
}

#[test]
fn outputs_name_what_an_operator_needs() {
    let g = graph("prod");
    let keys: BTreeSet<&str> = g.outputs.keys().map(String::as_str).collect();
    for k in [
        "api_url",
        "proxy_url",
        "ssh_endpoint",
        "api_lb_dns",
        "bucket",
        "database_endpoint",
        "cluster",
        "runners",
        "certificate_validation_records",
    ] {
        assert!(keys.contains(k), "{k}");
    }
    assert_eq!(
        g.outputs["api_url"],
        Value::str("https://api.boxlite.example.com")
    );
}

#[test]
fn the_repository_stack_resolves_its_prod_stage() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../stack.toml")).unwrap();
    let g = stack::load(&text).unwrap().stack.resolve("prod").unwrap();
    assert!(
        g.resources
            .contains_key(&ResourceId::from("runner/runner-3"))
    );
}

/// [`STACK`] with Cloudflare DNS on prod and secrets on its docs service.
fn with_dns_and_secrets() -> stack::Stack {
    let text = STACK.replacen(
        "health_path = \"/healthz\"\n",
        "health_path = \"/healthz\"\nsecrets = { SEARCH_KEY = \"search-key\" }\noptional_secrets = { SENTRY_DSN = \"sentry-dsn\" }\n",
        1,
    ) + "\n[stages.prod.dns]\nprovider = \"cloudflare\"\nzone = \"example.com\"\n";
    stack::load(&text).unwrap().stack
}

#[test]
fn cloudflare_dns_publishes_the_public_names_and_each_validation_record() {
    let g = with_dns_and_secrets().resolve("prod").unwrap();
    let dns: Vec<&stack::Resource> = g
        .resources
        .values()
        .filter(|r| r.kind == kinds::CLOUDFLARE_DNS_RECORD)
        .collect();
    let ids: Vec<&str> = dns.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "dns/acm-api",
            "dns/acm-proxy",
            "dns/acm-svc-docs",
            "dns/api",
            "dns/proxy",
            "dns/proxy-wildcard",
            "dns/ssh",
            "dns/svc-docs",
        ]
    );
    assert_eq!(s(&g, "dns/ssh", "name"), "ssh.boxlite.example.com");
    assert_eq!(get(&g, "dns/ssh").props["proxied"], Value::Bool(false));
    assert_eq!(get(&g, "dns/api").props["proxied"], Value::Bool(true));
    assert_eq!(
        get(&g, "dns/ssh").props["content"],
        Value::reference("lb/ssh", "dns_name")
    );
    assert_eq!(
        get(&g, "dns/acm-proxy").props["name"],
        Value::reference("cert/proxy", "validation_name")
    );
    // A certificate is waited for only once its record is published.
    assert!(
        get(&g, "certvalidation/proxy")
            .deps
            .contains(&ResourceId::from("dns/acm-proxy"))
    );
    for r in &dns {
        assert_eq!(r.props["zone"], Value::str("example.com"));
    }
    // Without [dns] there are no records and validations wait for the operator.
    let staging = graph("staging");
    assert!(
        staging
            .resources
            .values()
            .all(|r| r.kind != kinds::CLOUDFLARE_DNS_RECORD)
    );
    assert!(get(&staging, "certvalidation/api").deps.is_empty());
}

#[test]
fn services_get_set_secrets_by_reference_and_unset_optional_ones_are_left_out() {
    let stack = with_dns_and_secrets();
    let containers = |g: &DesiredGraph| -> serde_json::Value {
        serde_json::from_str(s(g, "taskdef/docs", "container_definitions")).unwrap()
    };
    let none = BTreeSet::new();
    let e = stack
        .resolve_with_secrets("prod", &none)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("search-key (service docs, SEARCH_KEY)") && e.contains("boxctl secret set"),
        "{e}"
    );
    let required = BTreeSet::from(["search-key".to_string()]);
    let g = stack.resolve_with_secrets("prod", &required).unwrap();
    assert_eq!(
        containers(&g)[0]["secrets"],
        serde_json::json!([{"name": "SEARCH_KEY", "valueFrom": "/boxlite/prod/search-key"}])
    );
    let both = BTreeSet::from(["search-key".to_string(), "sentry-dsn".to_string()]);
    let g2 = stack.resolve_with_secrets("prod", &both).unwrap();
    assert_eq!(containers(&g2)[0]["secrets"].as_array().unwrap().len(), 2);
    // Turning the optional feature on changes the task definition (a new revision).
    assert_ne!(
        s(&g, "taskdef/docs", "content_sha256"),
        s(&g2, "taskdef/docs", "content_sha256")
    );
}

#[test]
fn secret_declarations_are_checked() {
    let bad = STACK.replacen(
        "health_path = \"/healthz\"\n",
        "health_path = \"/healthz\"\nenv = { TOKEN = \"x\" }\nsecrets = { TOKEN = \"Bad Name\", \"1X\" = \"ok\" }\noptional_secrets = { TOKEN = \"admin-api-key\" }\n",
        1,
    );
    let diags = stack::load(&bad).unwrap_err();
    let text: Vec<String> = diags.iter().map(|d| d.render("stack.toml")).collect();
    let all = text.join("\n");
    for want in [
        "\"Bad Name\" may hold only lowercase",
        "\"1X\" is not an environment variable name",
        "is reserved",
        "TOKEN is set twice",
        "TOKEN is both a required and an optional secret",
    ] {
        assert!(all.contains(want), "{want} missing:\n{all}");
    }
}
