//! The schemas against serde's real output, and the document's integrity.

use std::collections::BTreeMap;

use protocol::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use time::macros::datetime;
use uuid::Uuid;

use super::*;
use crate::api;

/// Validate `v` against `schema` (the subset of JSON Schema the document uses).
fn check(
    defs: &BTreeMap<String, Value>,
    schema: &Value,
    v: &Value,
    at: &str,
) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        let target = defs
            .get(name)
            .ok_or_else(|| format!("{at}: dangling $ref {r}"))?;
        return check(defs, target, v, at);
    }
    if let Some(alts) = schema.get("anyOf").and_then(Value::as_array) {
        return if alts.iter().any(|s| check(defs, s, v, at).is_ok()) {
            Ok(())
        } else {
            Err(format!("{at}: {v} matches no anyOf alternative"))
        };
    }
    if let Some(alts) = schema.get("oneOf").and_then(Value::as_array) {
        let n = alts
            .iter()
            .filter(|s| check(defs, s, v, at).is_ok())
            .count();
        return if n == 1 {
            Ok(())
        } else {
            let errs: Vec<String> = alts
                .iter()
                .filter_map(|s| check(defs, s, v, at).err())
                .collect();
            Err(format!(
                "{at}: {v} matches {n} oneOf alternatives ({})",
                errs.join(" | ")
            ))
        };
    }
    if let Some(c) = schema.get("const")
        && c != v
    {
        return Err(format!("{at}: expected {c}, got {v}"));
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        return Err(format!("{at}: {v} not in {e:?}"));
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let ok = match ty {
        None => true,
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("boolean") => v.is_boolean(),
        Some("null") => v.is_null(),
        Some("array") => v.is_array(),
        Some("object") => v.is_object(),
        Some(other) => return Err(format!("{at}: unknown type {other}")),
    };
    if !ok {
        return Err(format!("{at}: expected {}, got {v}", ty.unwrap_or("?")));
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64())
        && n < min
    {
        return Err(format!("{at}: {n} < minimum {min}"));
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check(defs, items, x, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        let extra = schema.get("additionalProperties");
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let k = req.as_str().unwrap();
            if !obj.contains_key(k) {
                return Err(format!("{at}: required property {k} missing in {v}"));
            }
        }
        for (k, x) in obj {
            match (props.and_then(|p| p.get(k)), extra) {
                (Some(s), _) => check(defs, s, x, &format!("{at}.{k}"))?,
                (None, Some(s)) => check(defs, s, x, &format!("{at}.{k}"))?,
                (None, None) if props.is_some() => {
                    return Err(format!("{at}: property {k} is not in the schema"));
                }
                (None, None) => {}
            }
        }
    }
    Ok(())
}

/// Property names of a named object schema (or of the oneOf alternative matching `v`).
fn property_names(defs: &BTreeMap<String, Value>, schema: &Value, v: &Value) -> Vec<String> {
    let s = match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => &defs[r.trim_start_matches("#/components/schemas/")],
        None => schema,
    };
    if let Some(alts) = s.get("oneOf").and_then(Value::as_array) {
        let alt = alts
            .iter()
            .find(|a| check(defs, a, v, "").is_ok())
            .expect("an alternative matches");
        return property_names(defs, alt, v);
    }
    s.get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

struct Case {
    name: String,
    schema: Value,
    full: Value,
    minimal: Value,
    round_trip: fn(&Value) -> Result<(), String>,
}

fn case<T: ApiSchema + Serialize + DeserializeOwned>(
    reg: &mut Registry,
    full: T,
    minimal: T,
) -> Case {
    Case {
        name: std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap()
            .to_string(),
        schema: T::schema(reg),
        full: serde_json::to_value(full).unwrap(),
        minimal: serde_json::to_value(minimal).unwrap(),
        round_trip: |v| {
            serde_json::from_value::<T>(v.clone())
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    }
}

fn res() -> Resources {
    Resources {
        cpu_millicores: 1000,
        memory_mib: 512,
        disk_mib: 2048,
    }
}

fn cases(reg: &mut Registry) -> Vec<Case> {
    let t = datetime!(2030-01-02 03:04:05 UTC);
    let id = Uuid::now_v7();
    let map: BTreeMap<String, String> = [("K".to_string(), "v".to_string())].into();
    let spec = BoxSpec {
        id,
        image: "default".into(),
        resources: res(),
        env: map.clone(),
        network: NetworkMode::Egress,
        egress_allow: vec!["10.1.0.0/16".parse().unwrap()],
    };
    let box_info = |full: bool| BoxInfo {
        id,
        organization_id: id,
        runner: full.then(|| "runner-1".into()),
        image: "default".into(),
        state: BoxState::Running,
        desired_state: BoxState::Running,
        resources: res(),
        labels: if full { map.clone() } else { BTreeMap::new() },
        network: if full {
            NetworkMode::Egress
        } else {
            NetworkMode::None
        },
        egress_allow: if full {
            vec!["10.1.2.3/32".parse().unwrap()]
        } else {
            vec![]
        },
        error: full.then(|| "oops".into()),
        created_at: t,
        updated_at: t,
    };
    let runner = |full: bool| RunnerInfo {
        id,
        name: "runner-1".into(),
        state: RunnerState::Ready,
        version: full.then(|| "1.0".into()),
        address: full.then(|| "http://10.0.0.1:9000".into()),
        binary_sha256: full.then(|| "ab".repeat(32)),
        capacity: res(),
        usage: res(),
        allocated: res(),
        draining: full,
        boxes: 3,
        last_seen_at: full.then_some(t),
    };
    let key = |full: bool| ApiKeyInfo {
        id,
        organization_id: id,
        name: "ci".into(),
        prefix: "bxk_abcdefgh".into(),
        created_at: t,
        revoked_at: full.then_some(t),
    };
    let org = OrganizationInfo {
        id,
        name: "acme".into(),
        admin: false,
        created_at: t,
    };
    let created_key = |full: bool| CreateApiKeyResponse {
        info: key(full),
        key: "bxk_secret".into(),
    };
    let report = |full: bool| BoxReport {
        id,
        state: BoxState::Stopped,
        usage: res(),
        error: full.then(|| "x".into()),
    };
    vec![
        case(reg, ApiError::new("c", "m"), ApiError::new("c", "m")),
        case(
            reg,
            ControlPlaneHealth {
                status: HealthStatus::Degraded,
                version: "1".into(),
                uptime_secs: 1,
                database: false,
            },
            ControlPlaneHealth {
                status: HealthStatus::Ok,
                version: "1".into(),
                uptime_secs: 0,
                database: true,
            },
        ),
        case(reg, res(), Resources::default()),
        case(
            reg,
            spec.clone(),
            BoxSpec {
                env: BTreeMap::new(),
                network: NetworkMode::None,
                egress_allow: vec![],
                ..spec.clone()
            },
        ),
        case(
            reg,
            CreateBoxRequest {
                image: Some("img".into()),
                cpu_millicores: Some(1),
                memory_mib: Some(2),
                disk_mib: Some(3),
                env: map.clone(),
                labels: map.clone(),
                network: NetworkMode::Egress,
                egress_allow: vec!["192.168.0.0/24".parse().unwrap()],
            },
            CreateBoxRequest::default(),
        ),
        case(reg, box_info(true), box_info(false)),
        case(
            reg,
            BoxPage {
                boxes: vec![box_info(true)],
                next_cursor: Some("c".into()),
            },
            BoxPage {
                boxes: vec![],
                next_cursor: None,
            },
        ),
        case(
            reg,
            MoveBoxRequest { runner: "r".into() },
            MoveBoxRequest { runner: "r".into() },
        ),
        case(
            reg,
            ExecRequest {
                command: vec!["ls".into()],
                env: map.clone(),
                cwd: Some("/".into()),
                timeout_secs: Some(3),
                stdin: Some("in".into()),
                max_output_bytes: Some(10),
            },
            ExecRequest {
                command: vec!["ls".into()],
                ..Default::default()
            },
        ),
        case(
            reg,
            ExecResponse {
                exit_code: -1,
                stdout: "o".into(),
                stdout_encoding: OutputEncoding::Utf8,
                stdout_truncated: true,
                stderr: "/w==".into(),
                stderr_encoding: OutputEncoding::Base64,
                stderr_truncated: false,
                timed_out: true,
            },
            ExecResponse::from_output(
                0,
                CapturedOutput::default(),
                CapturedOutput::default(),
                false,
            ),
        ),
        case(
            reg,
            ExecStart {
                command: vec!["sh".into()],
                env: map.clone(),
                cwd: Some("/".into()),
                tty: true,
                rows: Some(24),
                cols: Some(80),
                attach: Some("s".into()),
            },
            ExecStart::default(),
        ),
        case(
            reg,
            ExecControl::Resize { rows: 1, cols: 2 },
            ExecControl::StdinEof,
        ),
        case(
            reg,
            ExecControl::Signal {
                signal: "INT".into(),
            },
            ExecControl::StdinEof,
        ),
        case(
            reg,
            ExecEvent::Started {
                session: "s".into(),
            },
            ExecEvent::Exit { code: 0 },
        ),
        case(
            reg,
            ExecEvent::Error {
                message: "m".into(),
            },
            ExecEvent::Exit { code: 1 },
        ),
        case(
            reg,
            RegisterRunnerRequest {
                name: "r".into(),
                token_sha256: Some("ab".into()),
            },
            RegisterRunnerRequest {
                name: "r".into(),
                token_sha256: None,
            },
        ),
        case(reg, runner(true), runner(false)),
        case(
            reg,
            RegisterRunnerResponse {
                runner: runner(true),
                token: Some("bxr_x".into()),
            },
            RegisterRunnerResponse {
                runner: runner(false),
                token: None,
            },
        ),
        case(reg, report(true), report(false)),
        case(
            reg,
            HealthcheckRequest {
                version: "1".into(),
                address: "http://a".into(),
                capacity: res(),
                usage: res(),
                binary_sha256: Some("cd".repeat(32)),
                agent_instance: Some("0123abcd".into()),
                boxes: vec![report(true)],
            },
            HealthcheckRequest {
                version: "1".into(),
                address: "http://a".into(),
                capacity: res(),
                usage: res(),
                binary_sha256: None,
                agent_instance: None,
                boxes: vec![],
            },
        ),
        case(
            reg,
            RunnerAction::Create { spec: spec.clone() },
            RunnerAction::Start { id },
        ),
        case(reg, RunnerAction::Stop { id }, RunnerAction::Delete { id }),
        case(
            reg,
            HealthcheckResponse {
                state: RunnerState::Draining,
                actions: vec![
                    RunnerAction::Create { spec },
                    RunnerAction::Start { id },
                    RunnerAction::Stop { id },
                    RunnerAction::Delete { id },
                ],
                api_key: "bxc_k".into(),
                interval_secs: 10,
                imports: vec![ImportGrant {
                    box_id: id,
                    token_sha256: "ef".repeat(32),
                    expires_at: t,
                }],
            },
            HealthcheckResponse {
                state: RunnerState::Ready,
                actions: vec![],
                api_key: "bxc_k".into(),
                interval_secs: 10,
                imports: vec![],
            },
        ),
        case(
            reg,
            ImportGrant {
                box_id: id,
                token_sha256: "ef".repeat(32),
                expires_at: t,
            },
            ImportGrant {
                box_id: id,
                token_sha256: "ef".repeat(32),
                expires_at: t,
            },
        ),
        case(reg, org.clone(), org.clone()),
        case(
            reg,
            CreateOrganizationRequest { name: "a".into() },
            CreateOrganizationRequest { name: "a".into() },
        ),
        case(reg, key(true), key(false)),
        case(reg, created_key(true), created_key(false)),
        case(
            reg,
            CreateOrganizationResponse {
                organization: org.clone(),
                api_key: created_key(true),
            },
            CreateOrganizationResponse {
                organization: org,
                api_key: created_key(false),
            },
        ),
        case(
            reg,
            CreateApiKeyRequest { name: "n".into() },
            CreateApiKeyRequest { name: "n".into() },
        ),
        case(
            reg,
            UserInfo {
                id,
                organization_id: id,
                subject: "s".into(),
                email: Some("a@b".into()),
                created_at: t,
            },
            UserInfo {
                id,
                organization_id: id,
                subject: "s".into(),
                email: None,
                created_at: t,
            },
        ),
        case(
            reg,
            CreateUserRequest {
                subject: "s".into(),
                email: Some("a@b".into()),
            },
            CreateUserRequest {
                subject: "s".into(),
                email: None,
            },
        ),
        case(
            reg,
            WhoAmI {
                organization_id: id,
                organization_name: "o".into(),
                admin: true,
                auth: AuthMethod::Oidc,
                user_id: Some(id),
                api_key_id: Some(id),
            },
            WhoAmI {
                organization_id: id,
                organization_name: "o".into(),
                admin: false,
                auth: AuthMethod::ApiKey,
                user_id: None,
                api_key_id: None,
            },
        ),
    ]
}

#[test]
fn every_schema_matches_what_serde_writes_and_reads() {
    let mut reg = Registry::default();
    let cases = cases(&mut reg);
    let defs = reg.schemas().clone();
    for c in &cases {
        check(&defs, &c.schema, &c.full, &c.name)
            .unwrap_or_else(|e| panic!("full {}: {e}", c.name));
        check(&defs, &c.schema, &c.minimal, &c.name)
            .unwrap_or_else(|e| panic!("minimal {}: {e}", c.name));
        // A fully populated value shows every property the schema lists: none is stale.
        let mut names = property_names(&defs, &c.schema, &c.full);
        let mut keys: Vec<String> = c
            .full
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        keys.sort();
        assert_eq!(
            names, keys,
            "{}: schema properties vs serialized fields",
            c.name
        );
        // Only the required properties are enough to deserialize: `opt` really is optional.
        if let Some(obj) = c.full.as_object() {
            let s = match c.schema.get("$ref").and_then(Value::as_str) {
                Some(r) => &defs[r.trim_start_matches("#/components/schemas/")],
                None => &c.schema,
            };
            let required: Vec<String> = match s.get("oneOf").and_then(Value::as_array) {
                Some(alts) => {
                    let alt = alts
                        .iter()
                        .find(|a| check(&defs, a, &c.full, "").is_ok())
                        .unwrap();
                    alt.get("required")
                        .and_then(Value::as_array)
                        .map(|r| r.iter().map(|x| x.as_str().unwrap().to_string()).collect())
                        .unwrap_or_default()
                }
                None => s
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| r.iter().map(|x| x.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default(),
            };
            let minimal: Map<String, Value> = obj
                .iter()
                .filter(|(k, _)| required.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (c.round_trip)(&Value::Object(minimal))
                .unwrap_or_else(|e| panic!("{}: required-only body: {e}", c.name));
        }
        (c.round_trip)(&c.full).unwrap_or_else(|e| panic!("{}: round trip: {e}", c.name));
    }
    // Every named schema is exercised by at least one case.
    let covered: std::collections::HashSet<String> = cases
        .iter()
        .flat_map(|c| {
            let mut v = vec![c.name.clone()];
            if let Some(r) = c.schema.get("$ref").and_then(Value::as_str) {
                v.push(r.trim_start_matches("#/components/schemas/").to_string());
            }
            v
        })
        .collect();
    for name in defs.keys() {
        let is_enum = defs[name].get("enum").is_some();
        assert!(
            is_enum || covered.contains(name),
            "schema {name} has no test case"
        );
    }
}

fn enum_matches_serde<T: WireEnum + Serialize + ApiSchema>() {
    let mut reg = Registry::default();
    let r = T::schema(&mut reg);
    let name = r["$ref"]
        .as_str()
        .unwrap()
        .trim_start_matches("#/components/schemas/")
        .to_string();
    let listed: Vec<Value> = reg.schemas()[&name]["enum"].as_array().unwrap().clone();
    let variants = T::wire_variants();
    assert_eq!(listed.len(), variants.len(), "{name}");
    for (v, s) in variants {
        assert_eq!(serde_json::to_value(&v).unwrap(), json!(s), "{name}");
    }
}

#[test]
fn string_enums_match_serde() {
    enum_matches_serde::<BoxState>();
    enum_matches_serde::<RunnerState>();
    enum_matches_serde::<HealthStatus>();
    enum_matches_serde::<AuthMethod>();
    enum_matches_serde::<OutputEncoding>();
}

#[test]
fn document_is_complete_and_consistent() {
    let routes = api::routes();
    let doc = document(&routes);
    let defs: BTreeMap<String, Value> =
        serde_json::from_value(doc["components"]["schemas"].clone()).unwrap();
    // Every $ref resolves.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in &all {
        let name = r.trim_start_matches("#/components/schemas/");
        assert!(defs.contains_key(name), "dangling {r}");
    }
    // One operation per route, unique operation ids, path parameters declared.
    let mut ids = std::collections::HashSet::new();
    let mut ops = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (_, op) in item.as_object().unwrap() {
            ops += 1;
            assert!(ids.insert(op["operationId"].as_str().unwrap().to_string()));
            let declared: Vec<&str> = op["parameters"]
                .as_array()
                .map(|p| {
                    p.iter()
                        .filter(|x| x["in"] == "path")
                        .map(|x| x["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            for seg in path.split('/').filter(|s| s.starts_with('{')) {
                assert!(
                    declared.contains(&seg.trim_matches(|c| c == '{' || c == '}')),
                    "{path}"
                );
            }
        }
    }
    assert_eq!(ops, routes.len());
}
