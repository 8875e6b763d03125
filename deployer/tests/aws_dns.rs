//! Cloudflare DNS and stage secrets on an aws stage, against moto and the
//! Cloudflare v4 emulator: records and validation records are published and
//! owned through their comment, a rerun changes nothing, a foreign record
//! stops the plan until adopted, a bad token stops before any change, and no
//! secret value appears in anything boxctl printed or wrote.

mod aws_support;

use std::io::Write as _;
use std::process::Stdio;

use aws_support::{Env, Run, STACK, wait};
use serde_json::{Value, json};
use testkit::cloudflare::CloudflareEmulator;

const TOKEN: &str = "cf-token-3c1f0e9a7b5d4e21a8f6";
const ACCOUNT: &str = "0123456789abcdef0123456789abcdef";
const SEARCH_KEY: &str = "search-key-value-9f8e7d6c5b4a";

/// The shared stack with Cloudflare DNS and service secrets on prod.
fn stack_with_dns() -> String {
    let docs = r#"health_path = "/healthz"
"#;
    let with_secrets = STACK.replacen(
        docs,
        r#"health_path = "/healthz"
secrets = { SEARCH_KEY = "search-key" }
optional_secrets = { SENTRY_DSN = "sentry-dsn" }
"#,
        1,
    );
    assert_ne!(
        with_secrets, STACK,
        "the docs service is in the shared stack"
    );
    format!(
        "{with_secrets}\n[stages.prod.dns]\nprovider = \"cloudflare\"\nzone = \"example.com\"\n"
    )
}

struct World {
    env: Env,
    cf: CloudflareEmulator,
    zone: String,
}

impl World {
    fn new() -> World {
        let env = Env::new();
        env.write_stack(&stack_with_dns());
        let cf = CloudflareEmulator::start();
        cf.add_token(TOKEN);
        let zone = cf.add_zone("example.com", ACCOUNT);
        World { env, cf, zone }
    }

    fn boxctl(&self, args: &[&str]) -> std::process::Command {
        let mut c = self.env.boxctl(args);
        c.env("BOXCTL_CLOUDFLARE_API_URL", self.cf.base_url())
            .env_remove("CLOUDFLARE_API_TOKEN")
            .env_remove("CLOUDFLARE_ACCOUNT_ID");
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        wait(
            self.boxctl(args).spawn().expect("spawn boxctl"),
            std::time::Duration::from_secs(300),
        )
    }

    /// `boxctl secret set NAME --stage prod` with the value on stdin.
    fn set_secret(&self, name: &str, value: &str) -> Run {
        let mut child = self
            .boxctl(&["secret", "set", name, "--stage", "prod"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn boxctl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{value}\n").as_bytes())
            .unwrap();
        wait(child, std::time::Duration::from_secs(60))
    }

    fn set_credentials(&self) {
        self.set_secret("cloudflare-api-token", TOKEN)
            .expect(0, "set the token");
        self.set_secret("cloudflare-account-id", ACCOUNT)
            .expect(0, "set the account");
    }

    /// Records of the zone by name.
    fn records(&self) -> Vec<Value> {
        self.cf.records(&self.zone)
    }

    fn record(&self, name: &str) -> Option<Value> {
        self.records().into_iter().find(|r| r["name"] == name)
    }
}

#[test]
fn deploy_publishes_owned_records_and_validations_and_reruns_change_nothing() {
    let w = World::new();
    w.set_credentials();
    // A required service secret that is unset stops the deploy, naming it.
    let missing = w
        .run(&["deploy", "--stage", "prod"])
        .expect(1, "no search-key");
    assert!(
        missing.stderr.contains("search-key")
            && missing
                .stderr
                .contains("boxctl secret set NAME --stage prod"),
        "{}",
        missing.stderr
    );
    assert!(
        w.records().is_empty(),
        "nothing published: {:?}",
        w.records()
    );
    w.set_secret("search-key", SEARCH_KEY)
        .expect(0, "set search-key");

    let mut runs = vec![w.run(&["deploy", "--stage", "prod"]).expect(0, "deploy")];

    // The public names point at their load balancers; SSH is DNS-only.
    let c = w.env.clients();
    let rt = w.env.rt();
    let lbs = rt.block_on(c.elb.describe_load_balancers().send()).unwrap();
    let lb_dns = |suffix: &str| {
        lbs.load_balancers()
            .iter()
            .find(|l| l.load_balancer_name().unwrap().ends_with(suffix))
            .and_then(|l| l.dns_name())
            .unwrap()
            .to_ascii_lowercase()
    };
    for (name, lb, proxied) in [
        ("api.boxlite.example.com", "-api", true),
        ("proxy.boxlite.example.com", "-proxy", false),
        ("*.proxy.boxlite.example.com", "-proxy", false),
        ("ssh.boxlite.example.com", "-ssh", false),
        ("docs.boxlite.example.com", "-api", true),
    ] {
        let r = w
            .record(name)
            .unwrap_or_else(|| panic!("{name} missing: {:#?}", w.records()));
        assert_eq!(r["type"], "CNAME", "{r}");
        assert_eq!(r["content"], lb_dns(lb), "{r}");
        assert_eq!(r["proxied"], proxied, "{r}");
        assert!(
            r["comment"]
                .as_str()
                .unwrap()
                .starts_with("boxctl:boxlite/prod/dns/"),
            "{r}"
        );
    }
    // One validation record per certificate, exactly as ACM asks for it.
    let certs = rt.block_on(c.acm.list_certificates().send()).unwrap();
    let mut wanted = Vec::new();
    for s in certs.certificate_summary_list() {
        let d = rt
            .block_on(
                c.acm
                    .describe_certificate()
                    .certificate_arn(s.certificate_arn().unwrap())
                    .send(),
            )
            .unwrap();
        for o in d.certificate().unwrap().domain_validation_options() {
            let rr = o.resource_record().unwrap();
            wanted.push((
                rr.name().trim_end_matches('.').to_ascii_lowercase(),
                rr.value().trim_end_matches('.').to_ascii_lowercase(),
            ));
        }
    }
    wanted.sort();
    wanted.dedup();
    assert_eq!(
        wanted.len(),
        3,
        "api, proxy (+ wildcard) and docs: {wanted:?}"
    );
    for (name, value) in &wanted {
        let r = w
            .record(name)
            .unwrap_or_else(|| panic!("validation {name} missing"));
        assert_eq!(r["content"], value.as_str(), "{r}");
        assert_eq!(r["proxied"], false, "{r}");
    }
    assert_eq!(w.records().len(), 5 + 3, "{:#?}", w.records());

    // The docs service gets its secret by reference; the unset optional one is left out.
    let td = rt
        .block_on(
            c.ecs
                .describe_task_definition()
                .task_definition("boxlite-prod-docs")
                .send(),
        )
        .unwrap();
    let container = &td.task_definition().unwrap().container_definitions()[0];
    let secrets: Vec<(String, String)> = container
        .secrets()
        .iter()
        .map(|s| (s.name().to_string(), s.value_from().to_string()))
        .collect();
    assert_eq!(
        secrets,
        [(
            "SEARCH_KEY".to_string(),
            "/boxlite/prod/search-key".to_string()
        )]
    );

    // A rerun changes nothing, and reads the zone in one list.
    w.cf.clear_requests();
    runs.push(
        w.run(&["diff", "--stage", "prod", "--exit-code"])
            .expect(0, "diff after deploy"),
    );
    let lists =
        w.cf.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/dns_records"))
            .count();
    assert_eq!(lists, 1, "{:#?}", w.cf.requests());
    runs.push(
        w.run(&["deploy", "--stage", "prod"])
            .expect(0, "second deploy"),
    );
    assert!(runs[2].stdout.contains("No changes."), "{}", runs[2].stdout);
    assert!(
        w.cf.requests().iter().all(|r| r.method == "GET"),
        "a no-op deploy wrote to Cloudflare: {:#?}",
        w.cf.requests()
    );
    runs.push(
        w.run(&["secret", "list", "--stage", "prod"])
            .expect(0, "secret list"),
    );
    for name in [
        "cloudflare-api-token",
        "cloudflare-account-id",
        "search-key",
    ] {
        assert!(runs[3].stdout.contains(name), "{}", runs[3].stdout);
    }
    runs.push(w.run(&["status", "--stage", "prod"]).expect(0, "status"));

    // No secret value in anything boxctl printed or wrote: output, the
    // journal and state in the stage bucket, the local state directory.
    let mut written: Vec<(String, String)> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("run {i}"), r.all()))
        .collect();
    let bucket = stack::resolve::aws::bucket_name(
        "boxlite",
        "prod",
        "ap-southeast-1",
        "boxlite.example.com",
    );
    let objects = rt
        .block_on(c.s3.list_objects_v2().bucket(&bucket).send())
        .unwrap();
    assert!(!objects.contents().is_empty());
    for o in objects.contents() {
        let key = o.key().unwrap();
        let body = rt
            .block_on(c.s3.get_object().bucket(&bucket).key(key).send())
            .unwrap();
        let bytes = rt.block_on(body.body.collect()).unwrap().into_bytes();
        written.push((
            format!("s3://{bucket}/{key}"),
            String::from_utf8_lossy(&bytes).into(),
        ));
    }
    for entry in testkit::files_under(&w.env.dir.path().join("state")) {
        written.push((
            entry.display().to_string(),
            String::from_utf8_lossy(&std::fs::read(&entry).unwrap()).into(),
        ));
    }
    for (what, text) in &written {
        for secret in [TOKEN, SEARCH_KEY] {
            assert!(!text.contains(secret), "{what} contains a secret value");
        }
    }
}

#[test]
fn a_foreign_record_stops_the_plan_until_adopted() {
    let w = World::new();
    w.set_credentials();
    w.set_secret("search-key", SEARCH_KEY)
        .expect(0, "set search-key");
    let foreign = w.cf.insert_record(
        &w.zone,
        json!({"type": "CNAME", "name": "api.boxlite.example.com", "content": "old-host.example.net", "proxied": false, "ttl": 300}),
    );
    w.env.proxy.reset_counts();
    let diff = w
        .run(&["diff", "--stage", "prod"])
        .expect(1, "diff with a foreign record");
    let shown = diff.all();
    for want in [
        "api.boxlite.example.com",
        "old-host.example.net",
        "dns/api",
        "--adopt dns/api",
    ] {
        assert!(shown.contains(want), "{want} missing:\n{shown}");
    }
    let deploy = w
        .run(&["deploy", "--stage", "prod"])
        .expect(1, "deploy with a foreign record");
    assert!(
        deploy.stderr.contains("nothing was changed"),
        "{}",
        deploy.stderr
    );
    // Nothing changed: the foreign record is as it was, and AWS saw only
    // reads (and the stage bucket that holds the lock).
    let r = w.record("api.boxlite.example.com").unwrap();
    assert_eq!(
        (r["id"].as_str().unwrap(), r["content"].as_str().unwrap()),
        (foreign.as_str(), "old-host.example.net")
    );
    assert_eq!(w.records().len(), 1);
    assert_eq!(w.env.inventory().get(stack::kinds::AWS_VPC), None);

    // Adopted deliberately, it is rewritten and owned from then on.
    w.run(&["deploy", "--stage", "prod", "--adopt", "dns/api"])
        .expect(0, "deploy --adopt dns/api");
    let r = w.record("api.boxlite.example.com").unwrap();
    assert_eq!(r["id"], foreign.as_str(), "the same record, rewritten");
    assert_eq!(r["comment"], "boxctl:boxlite/prod/dns/api");
    assert_ne!(r["content"], "old-host.example.net");
    w.run(&["diff", "--stage", "prod", "--exit-code"])
        .expect(0, "owned after adoption");
    // Adopting something the stage does not declare is refused.
    let bad = w
        .run(&["diff", "--stage", "prod", "--adopt", "dns/nope"])
        .expect(1, "unknown adopt");
    assert!(bad.stderr.contains("dns/nope"), "{}", bad.stderr);
}

#[test]
fn a_missing_or_rejected_token_fails_before_anything_changes() {
    let w = World::new();
    w.set_secret("search-key", SEARCH_KEY)
        .expect(0, "set search-key");
    w.env.proxy.reset_counts();
    // No token anywhere.
    let none = w.run(&["deploy", "--stage", "prod"]).expect(1, "no token");
    assert!(
        none.stderr.contains("cloudflare-api-token is not set")
            && none
                .stderr
                .contains("boxctl secret set cloudflare-api-token --stage prod"),
        "{}",
        none.stderr
    );
    // A rejected token, from the environment (as CI passes it).
    let bad = wait(
        w.boxctl(&["deploy", "--stage", "prod"])
            .env("CLOUDFLARE_API_TOKEN", "not-a-valid-token")
            .env("CLOUDFLARE_ACCOUNT_ID", ACCOUNT)
            .spawn()
            .unwrap(),
        std::time::Duration::from_secs(120),
    )
    .expect(1, "bad token");
    assert!(
        bad.stderr.contains("Cloudflare API token was rejected"),
        "{}",
        bad.stderr
    );
    assert!(
        !bad.all().contains("not-a-valid-token"),
        "the token was printed"
    );
    assert_eq!(
        w.env.proxy.mutating(),
        0,
        "AWS was changed: {:?}",
        w.env.proxy.actions()
    );
    let inventory = w.env.inventory();
    assert!(
        inventory
            .keys()
            .all(|k| *k == stack::kinds::AWS_SECRET || *k == stack::kinds::AWS_PARAMETER),
        "only the operator's secret exists: {inventory:?}"
    );
    assert!(w.cf.requests().iter().all(|r| r.method == "GET"));
    assert!(w.records().is_empty());
}

#[test]
fn destroy_removes_the_records_it_owns_and_leaves_the_others() {
    let w = World::new();
    let text = format!(
        "{}\n[stages.staging.dns]\nprovider = \"cloudflare\"\nzone = \"example.com\"\n",
        STACK
    );
    w.env.write_stack(&text);
    let keep = w.cf.insert_record(
        &w.zone,
        json!({"type": "TXT", "name": "example.com", "content": "\"v=spf1 -all\"", "ttl": 3600}),
    );
    let creds = |args: &[&str]| {
        wait(
            w.boxctl(args)
                .env("CLOUDFLARE_API_TOKEN", TOKEN)
                .env("CLOUDFLARE_ACCOUNT_ID", ACCOUNT)
                .spawn()
                .unwrap(),
            std::time::Duration::from_secs(300),
        )
    };
    creds(&["deploy", "--stage", "staging"]).expect(0, "deploy staging");
    let owned = w
        .records()
        .iter()
        .filter(|r| {
            r["comment"]
                .as_str()
                .is_some_and(|c| c.starts_with("boxctl:boxlite/staging/"))
        })
        .count();
    assert_eq!(
        owned,
        4 + 2,
        "api, proxy, *.proxy, ssh and two validations: {:#?}",
        w.records()
    );
    creds(&["destroy", "--stage", "staging", "--yes"]).expect(0, "destroy staging");
    let left = w.records();
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0]["id"], keep.as_str());
}

#[test]
fn a_foreign_record_at_a_validation_name_stops_the_plan_once_the_name_is_known() {
    let w = World::new();
    w.set_credentials();
    w.set_secret("search-key", SEARCH_KEY)
        .expect(0, "set search-key");
    // Deployed first without [dns]: the certificates, and so their
    // validation names, exist before boxctl manages the zone.
    w.env.write_stack(&stack_with_dns().replace(
        "[stages.prod.dns]\nprovider = \"cloudflare\"\nzone = \"example.com\"\n",
        "",
    ));
    w.run(&["deploy", "--stage", "prod"])
        .expect(0, "deploy without dns");
    let c = w.env.clients();
    let rt = w.env.rt();
    let arn = rt
        .block_on(c.acm.list_certificates().send())
        .unwrap()
        .certificate_summary_list()
        .iter()
        .find(|s| s.domain_name() == Some("api.boxlite.example.com"))
        .and_then(|s| s.certificate_arn())
        .unwrap()
        .to_string();
    let cert = rt
        .block_on(c.acm.describe_certificate().certificate_arn(&arn).send())
        .unwrap();
    let rr = cert.certificate().unwrap().domain_validation_options()[0]
        .resource_record()
        .unwrap()
        .clone();
    let name = rr.name().trim_end_matches('.').to_ascii_lowercase();
    // Someone published the validation record by hand.
    w.cf.insert_record(
        &w.zone,
        json!({"type": "CNAME", "name": name, "content": rr.value().trim_end_matches('.'), "ttl": 300}),
    );
    w.env.write_stack(&stack_with_dns());
    let diff = w.run(&["diff", "--stage", "prod"]).expect(1, "diff");
    let shown = diff.all();
    for want in [name.as_str(), "dns/acm-api", "--adopt dns/acm-api"] {
        assert!(shown.contains(want), "{want} missing:\n{shown}");
    }
    // Adopted, it becomes boxctl's; nothing else held a name.
    w.run(&["deploy", "--stage", "prod", "--adopt", "dns/acm-api"])
        .expect(0, "deploy --adopt dns/acm-api");
    let r = w.record(&name).unwrap();
    assert_eq!(r["comment"], "boxctl:boxlite/prod/dns/acm-api");
    assert_eq!(w.records().len(), 8, "{:#?}", w.records());
}
