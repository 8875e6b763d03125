//! The control plane's API suite, run against SQLite and against PostgreSQL.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::*;
use futures::{SinkExt, StreamExt};
use protocol::*;
use reqwest::Method;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Row;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use uuid::Uuid;

both_backends!(
    health_is_public_and_reports_the_database,
    served_openapi_matches_the_checked_in_document,
    admin_key_is_seeded_once_and_new_keys_are_added,
    declared_runners_are_registered_at_start,
    runner_registration_rules,
    healthcheck_converges_runner_on_desired_state,
    network_modes_and_egress_allow_lists_are_checked_and_passed_on,
    listing_filters_and_paginates,
    placement_explains_why_nothing_fits,
    draining_and_unresponsive_runners_get_nothing,
    concurrent_creates_never_overbook,
    exec_is_proxied_with_the_runner_key,
    a_new_agent_process_gets_a_new_runner_key,
    exec_output_is_bounded_and_byte_exact,
    concurrent_execs_are_bounded_per_organization,
    interactive_exec_is_relayed_over_websocket,
    exec_websocket_messages_are_bounded_both_ways,
    moving_a_box_keeps_its_id_and_data,
    failed_moves_leave_the_box_where_it_was,
    imports_are_announced_to_their_runner_until_they_expire,
    decommission_refuses_while_boxes_remain,
    organizations_and_keys,
    bad_input_gets_json_errors,
    authorization_is_enforced_on_every_route,
    shutdown_finishes_requests_and_closes_sessions,
);

async fn health_is_public_and_reports_the_database(b: Backend) {
    let app = TestApp::start(b).await;
    let (s, v) = app.call(Method::GET, "/api/health", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let h: ControlPlaneHealth = serde_json::from_value(v).unwrap();
    assert_eq!(h.status, HealthStatus::Ok);
    assert!(h.database);
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    // Once the database is gone, health says so (and the status code tells load balancers).
    app.state.db.close().await;
    let (s, v) = app.call(Method::GET, "/api/health", None, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["status"], "degraded");
    assert_eq!(v["database"], false);
}

async fn served_openapi_matches_the_checked_in_document(b: Backend) {
    let app = TestApp::start(b).await;
    let resp = app
        .http
        .get(format!("{}/api/openapi.json", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let served = resp.text().await.unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    if std::env::var_os("BOXLITE_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, format!("{served}\n")).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    let a: Value = serde_json::from_str(&served).unwrap();
    let b: Value = serde_json::from_str(&checked_in).unwrap_or(Value::Null);
    assert!(
        a == b,
        "control-plane/openapi.json is out of date with the code; regenerate it with\n  \
         BOXLITE_UPDATE_OPENAPI=1 cargo test -p control-plane --test api openapi\nand commit it"
    );
}

async fn key_count(app: &TestApp) -> i64 {
    sqlx::query("SELECT COUNT(*) AS n FROM api_keys")
        .fetch_one(app.state.db.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap()
}

async fn admin_key_is_seeded_once_and_new_keys_are_added(b: Backend) {
    let mut first = TestApp::start(b).await;
    let (s, v) = first.admin(Method::GET, "/api/me", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["admin"], true);
    assert_eq!(v["organization_name"], "admin");
    assert_eq!(key_count(&first).await, 1);
    // The database stores only the hash.
    let stored: String = sqlx::query("SELECT key_sha256 FROM api_keys")
        .fetch_one(first.state.db.pool())
        .await
        .unwrap()
        .try_get("key_sha256")
        .unwrap();
    assert_eq!(stored, control_plane::tokens::sha256_hex(&first.admin_key));
    first.stop().await;
    let dir = first.take_dir();

    // Restart with the same key: nothing changes.
    let old_key = first.admin_key.clone();
    let same = control_plane::Config::new(first.database_url.clone(), old_key.clone());
    let server = control_plane::Server::new(same, first.clock.clone())
        .await
        .unwrap();
    let mut second = TestApp::serve(
        server,
        b,
        first.database_url.clone(),
        old_key.clone(),
        first.clock.clone(),
        None,
    )
    .await;
    assert_eq!(key_count(&second).await, 1);
    second.stop().await;

    // Restart with a new key: it is added, the old one keeps working until revoked.
    let new_key = new_admin_key();
    let cfg = control_plane::Config::new(first.database_url.clone(), new_key.clone());
    let server = control_plane::Server::new(cfg, first.clock.clone())
        .await
        .unwrap();
    let third = TestApp::serve(
        server,
        b,
        first.database_url.clone(),
        new_key.clone(),
        first.clock.clone(),
        dir,
    )
    .await;
    assert_eq!(key_count(&third).await, 2);
    for k in [&old_key, &new_key] {
        let (s, _) = third
            .call(Method::GET, "/api/admin/runners", Some(k), None)
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    let (_, keys) = third.admin(Method::GET, "/api/keys", None).await;
    let keys: Vec<ApiKeyInfo> = serde_json::from_value(keys).unwrap();
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter()
            .all(|k| k.prefix.len() == 12 && !k.prefix.contains(&old_key[12..]))
    );
    let old_id = keys
        .iter()
        .find(|k| old_key.starts_with(&k.prefix))
        .unwrap()
        .id;
    let (s, v) = third
        .admin(Method::DELETE, &format!("/api/keys/{old_id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["revoked_at"].is_string());
    let (s, v) = third
        .call(Method::GET, "/api/me", Some(&old_key), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["code"], "unauthorized");
}

async fn runner_registration_rules(b: Backend) {
    let app = TestApp::start(b).await;
    // Without a hash the control plane mints the token and shows it once.
    let (s, v) = app
        .admin(
            Method::POST,
            "/api/admin/runners",
            Some(json!({ "name": "r-minted" })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let minted: RegisterRunnerResponse = serde_json::from_value(v).unwrap();
    let token = minted.token.expect("token shown once");
    assert!(token.starts_with(RUNNER_TOKEN_PREFIX));
    assert_eq!(minted.runner.state, RunnerState::Initializing);
    let fake = FakeRunner::serve(&app, "r-minted", token.clone(), res(4000, 8192, 65536)).await;
    assert_eq!(fake.sync().await.state, RunnerState::Ready);
    // Registering it again without a hash cannot return the token: refused.
    let (s, v) = app
        .admin(
            Method::POST,
            "/api/admin/runners",
            Some(json!({ "name": "r-minted" })),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["code"], "runner_exists");

    // boxctl style: the caller sends the hash; the same hash again is idempotent.
    let tok = control_plane::tokens::generate(RUNNER_TOKEN_PREFIX);
    let hash = control_plane::tokens::sha256_hex(&tok);
    let body = json!({ "name": "r-boxctl", "token_sha256": hash.to_uppercase() });
    let (s, v) = app
        .admin(Method::POST, "/api/admin/runners", Some(body.clone()))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v.get("token").is_none());
    let id = v["runner"]["id"].clone();
    let (s, v) = app
        .admin(Method::POST, "/api/admin/runners", Some(body))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["runner"]["id"], id);
    // Another hash for the same live runner: 409.
    let other = control_plane::tokens::sha256_hex("bxr_other");
    let (s, v) = app
        .admin(
            Method::POST,
            "/api/admin/runners",
            Some(json!({ "name": "r-boxctl", "token_sha256": other })),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["code"], "runner_exists");
    // A token already used by another runner: 409.
    let (s, v) = app
        .admin(
            Method::POST,
            "/api/admin/runners",
            Some(json!({ "name": "r-copy", "token_sha256": hash })),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["code"], "token_in_use");
    // Malformed input.
    for body in [
        json!({ "name": "r", "token_sha256": "xyz" }),
        json!({ "name": "bad name" }),
        json!({ "name": "" }),
        json!({ "name": "-r" }),
    ] {
        let (s, v) = app
            .admin(Method::POST, "/api/admin/runners", Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {v}");
    }

    // Decommissioned: its token stops working, and it can come back fresh with a new hash.
    let (s, v) = app
        .admin(
            Method::POST,
            "/api/admin/runners/r-minted/decommission",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "decommissioned");
    let (s, _) = fake.healthcheck_raw(&token, &fake.report()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = app
        .admin(Method::POST, "/api/admin/runners/r-minted/drain", None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["code"], "runner_decommissioned");
    let fresh = control_plane::tokens::generate(RUNNER_TOKEN_PREFIX);
    let (s, v) = app
        .admin(
            Method::POST,
            "/api/admin/runners",
            Some(json!({ "name": "r-minted", "token_sha256": control_plane::tokens::sha256_hex(&fresh) })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["runner"]["state"], "initializing");
    assert_eq!(v["runner"]["capacity"]["cpu_millicores"], 0);
    let back = FakeRunner::serve(&app, "r-minted", fresh, res(1000, 1024, 4096)).await;
    let r = back.sync().await;
    assert_eq!(r.state, RunnerState::Ready);
    // The per-runner API key is regenerated for the fresh runner, and stable afterwards.
    assert_ne!(Some(r.api_key.clone()), fake.state.lock().unwrap().api_key);
    assert_eq!(back.sync().await.api_key, r.api_key);
    assert!(r.api_key.starts_with(RUNNER_API_KEY_PREFIX));

    let (s, v) = app.admin(Method::GET, "/api/admin/runners", None).await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["r-boxctl", "r-minted"]);
    let (s, _) = app
        .admin(Method::GET, "/api/admin/runners/nope", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

async fn network_modes_and_egress_allow_lists_are_checked_and_passed_on(b: Backend) {
    let app = TestApp::start_with(b, |c| {
        c.egress_allow = vec!["10.1.0.0/16".parse().unwrap()];
    })
    .await;
    let (_, key) = app.org("acme").await;
    let runner = FakeRunner::register(&app, "runner-1", res(8000, 16384, 100_000)).await;
    runner.sync().await;
    // The old boolean still reads; the default is none.
    let old = app.create_box(&key, json!({ "network": true })).await;
    assert_eq!(old.network, protocol::NetworkMode::Egress);
    let plain = app.create_box(&key, json!({})).await;
    assert_eq!(plain.network, protocol::NetworkMode::None);
    let (_, v) = app
        .call(
            Method::GET,
            &format!("/api/boxes/{}", plain.id),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(v["network"], "none", "{v}");
    // An allow-list within the stage's is kept (deduplicated) and reaches the runner.
    let allowed = app
        .create_box(
            &key,
            json!({ "network": "egress", "egress_allow": ["10.1.2.0/24", "10.1.9.9", "10.1.2.0/24"] }),
        )
        .await;
    let want: Vec<protocol::Ipv4Cidr> = vec![
        "10.1.2.0/24".parse().unwrap(),
        "10.1.9.9/32".parse().unwrap(),
    ];
    assert_eq!(allowed.egress_allow, want);
    let r = runner.sync().await;
    let spec = r
        .actions
        .iter()
        .find_map(|a| match a {
            RunnerAction::Create { spec } if spec.id == allowed.id => Some(spec.clone()),
            _ => None,
        })
        .expect("create action");
    assert_eq!(spec.network, protocol::NetworkMode::Egress);
    assert_eq!(spec.egress_allow, want);
    // Refused, with the reason: outside the stage's list, on a none box,
    // unknown modes, host bits, too many entries.
    for (body, code) in [
        (
            json!({ "network": "egress", "egress_allow": ["192.168.0.0/24"] }),
            "egress_not_allowed",
        ),
        (
            json!({ "network": "egress", "egress_allow": ["10.0.0.0/8"] }),
            "egress_not_allowed",
        ),
        (
            json!({ "network": "none", "egress_allow": ["10.1.0.0/16"] }),
            "invalid_network",
        ),
        (
            json!({ "egress_allow": ["10.1.0.0/16"] }),
            "invalid_network",
        ),
        (
            json!({ "network": "egress", "egress_allow": (0..65).map(|i| format!("10.1.{i}.0/24")).collect::<Vec<_>>() }),
            "invalid_network",
        ),
    ] {
        let (s, v) = app
            .call(Method::POST, "/api/boxes", Some(&key), Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["code"], code, "{body}: {v}");
    }
    for body in [
        json!({ "network": "host" }),
        json!({ "network": "egress", "egress_allow": ["10.1.0.1/16"] }),
        json!({ "network": "egress", "egress_allow": ["fd00::/8"] }),
    ] {
        let (s, v) = app
            .call(Method::POST, "/api/boxes", Some(&key), Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
}

async fn healthcheck_converges_runner_on_desired_state(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let runner = FakeRunner::register(&app, "runner-1", res(8000, 16384, 100_000)).await;
    let first = runner.sync().await;
    assert_eq!(first.state, RunnerState::Ready);
    assert!(first.actions.is_empty());
    assert_eq!(first.interval_secs, 10);
    let info = app.runner("runner-1").await;
    assert_eq!(info.version.as_deref(), Some("fake-1.0"));
    assert_eq!(info.address.as_deref(), Some(runner.address.as_str()));
    assert_eq!(
        info.binary_sha256.as_deref(),
        Some(runner.binary_sha256.as_str())
    );
    assert_eq!(info.capacity, res(8000, 16384, 100_000));

    // Three boxes while the runner is not calling: one call brings all three.
    let mut ids = Vec::new();
    for i in 0..3 {
        let bx = app
            .create_box(&key, json!({ "image": "default", "env": { "N": i.to_string() }, "cpu_millicores": 1000 }))
            .await;
        assert_eq!(bx.state, BoxState::Pending);
        assert_eq!(bx.desired_state, BoxState::Running);
        assert_eq!(bx.runner.as_deref(), Some("runner-1"));
        ids.push(bx.id);
    }
    let r = runner.sync().await;
    let created: HashSet<Uuid> = r
        .actions
        .iter()
        .map(|a| match a {
            RunnerAction::Create { spec } => spec.id,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(created, ids.iter().copied().collect());
    let spec_env = r.actions.iter().find_map(|a| match a {
        RunnerAction::Create { spec } if spec.id == ids[2] => Some(spec.env.clone()),
        _ => None,
    });
    assert_eq!(spec_env.unwrap()["N"], "2");
    // The next call records what the runner did and asks nothing more.
    assert!(runner.sync().await.actions.is_empty());
    assert_eq!(app.get_box(&key, ids[0]).await.state, BoxState::Running);
    assert_eq!(
        app.runner("runner-1").await.allocated,
        res(3000, 3072, 12288)
    );

    // Stop, start, level-triggered: repeated until the runner complies.
    let (s, v) = app
        .call(
            Method::POST,
            &format!("/api/boxes/{}/stop", ids[0]),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["desired_state"], "stopped");
    let report = runner.report();
    for _ in 0..2 {
        let (_, v) = runner.healthcheck_raw(&runner.token, &report).await;
        let r: HealthcheckResponse = serde_json::from_value(v).unwrap();
        assert_eq!(r.actions, vec![RunnerAction::Stop { id: ids[0] }]);
    }
    runner.sync().await;
    runner.sync().await;
    assert_eq!(app.get_box(&key, ids[0]).await.state, BoxState::Stopped);
    app.call(
        Method::POST,
        &format!("/api/boxes/{}/start", ids[0]),
        Some(&key),
        None,
    )
    .await;
    assert_eq!(
        runner.sync().await.actions,
        vec![RunnerAction::Start { id: ids[0] }]
    );
    runner.sync().await;
    assert_eq!(app.get_box(&key, ids[0]).await.state, BoxState::Running);

    // Delete: deleting until the runner confirms, then deleted and resources released.
    let (s, v) = app
        .call(
            Method::DELETE,
            &format!("/api/boxes/{}", ids[1]),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["state"], "deleting");
    let (s, _) = app
        .call(
            Method::DELETE,
            &format!("/api/boxes/{}", ids[1]),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "delete is idempotent");
    let (s, v) = app
        .call(
            Method::POST,
            &format!("/api/boxes/{}/start", ids[1]),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["code"], "box_deleted");
    assert_eq!(
        runner.sync().await.actions,
        vec![RunnerAction::Delete { id: ids[1] }]
    );
    assert_eq!(
        app.runner("runner-1").await.boxes,
        3,
        "counted until the runner confirms"
    );
    assert!(runner.sync().await.actions.is_empty());
    let gone = app.get_box(&key, ids[1]).await;
    assert_eq!(gone.state, BoxState::Deleted);
    let info = app.runner("runner-1").await;
    assert_eq!(info.boxes, 2);
    assert_eq!(info.allocated, res(2000, 2048, 8192));

    // A box the control plane does not know is deleted; one the runner lost is created again.
    let stray = Uuid::now_v7();
    {
        let mut st = runner.state.lock().unwrap();
        let sample = st.boxes.values().next().unwrap().clone();
        st.boxes.insert(
            stray,
            FakeBox {
                spec: BoxSpec {
                    id: stray,
                    ..sample.spec.clone()
                },
                ..sample
            },
        );
        st.boxes.remove(&ids[2]);
    }
    let actions = runner.sync().await.actions;
    assert!(
        actions.contains(&RunnerAction::Delete { id: stray }),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, RunnerAction::Create { spec } if spec.id == ids[2])),
        "{actions:?}"
    );
    assert_eq!(app.get_box(&key, ids[2]).await.state, BoxState::Pending);
    runner.sync().await;
    assert_eq!(app.get_box(&key, ids[2]).await.state, BoxState::Running);

    // A runner's reported error is kept on the box.
    let mut report = runner.report();
    report
        .boxes
        .iter_mut()
        .find(|r| r.id == ids[2])
        .unwrap()
        .state = BoxState::Error;
    report
        .boxes
        .iter_mut()
        .find(|r| r.id == ids[2])
        .unwrap()
        .error = Some("image missing".into());
    runner.healthcheck_raw(&runner.token, &report).await;
    let bx = app.get_box(&key, ids[2]).await;
    assert_eq!(bx.state, BoxState::Error);
    assert_eq!(bx.error.as_deref(), Some("image missing"));

    // Healthcheck input is checked.
    let mut bad = runner.report();
    bad.address = "not a url".into();
    let (s, v) = runner.healthcheck_raw(&runner.token, &bad).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_address"))
    );
    let mut bad = runner.report();
    bad.binary_sha256 = Some("not-a-digest".into());
    let (s, v) = runner.healthcheck_raw(&runner.token, &bad).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_binary_sha256"))
    );
    let mut dup = runner.report();
    let first = dup.boxes[0].clone();
    dup.boxes.push(first);
    let (s, v) = runner.healthcheck_raw(&runner.token, &dup).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("duplicate_box"))
    );
}

async fn listing_filters_and_paginates(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let (_, other) = app.org("other").await;
    let runner = FakeRunner::register(&app, "runner-1", res(100_000, 100_000, 1_000_000)).await;
    runner.sync().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let team = if i % 2 == 0 { "a" } else { "b" };
        let bx = app
            .create_box(
                &key,
                json!({ "labels": { "team": team, "n": i.to_string() }, "cpu_millicores": 100 }),
            )
            .await;
        ids.push(bx.id);
    }
    app.create_box(&other, json!({ "labels": { "team": "a" } }))
        .await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("/api/boxes?limit=3&cursor={c}"),
            None => "/api/boxes?limit=3".to_string(),
        };
        let (s, v) = app.call(Method::GET, &q, Some(&key), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let page: BoxPage = serde_json::from_value(v).unwrap();
        pages += 1;
        assert!(page.boxes.len() <= 3);
        seen.extend(page.boxes.iter().map(|b| b.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen, ids,
        "every box once, oldest first, none of the other organization's"
    );

    let list = |q: String| {
        let app = &app;
        let key = key.clone();
        async move {
            let (s, v) = app.call(Method::GET, &q, Some(&key), None).await;
            assert_eq!(s, StatusCode::OK, "{q}: {v}");
            serde_json::from_value::<BoxPage>(v).unwrap().boxes
        }
    };
    let team_a = list("/api/boxes?label=team%3Da".into()).await;
    assert_eq!(
        team_a.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![ids[0], ids[2], ids[4], ids[6]]
    );
    let one = list("/api/boxes?label=team=b&label=n=3".into()).await;
    assert_eq!(one.iter().map(|b| b.id).collect::<Vec<_>>(), vec![ids[3]]);
    assert!(list("/api/boxes?label=team=c".into()).await.is_empty());

    runner.sync().await;
    runner.sync().await;
    app.call(
        Method::POST,
        &format!("/api/boxes/{}/stop", ids[1]),
        Some(&key),
        None,
    )
    .await;
    runner.sync().await;
    runner.sync().await;
    app.call(
        Method::DELETE,
        &format!("/api/boxes/{}", ids[5]),
        Some(&key),
        None,
    )
    .await;
    runner.sync().await;
    runner.sync().await;
    let stopped = list("/api/boxes?state=stopped".into()).await;
    assert_eq!(
        stopped.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![ids[1]]
    );
    let live = list("/api/boxes".into()).await;
    assert_eq!(live.len(), 6, "deleted boxes are not listed by default");
    let deleted = list("/api/boxes?state=deleted".into()).await;
    assert_eq!(
        deleted.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![ids[5]]
    );
    let both = list("/api/boxes?state=stopped,deleted&label=team=b".into()).await;
    assert_eq!(
        both.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![ids[1], ids[5]]
    );

    for bad in [
        "/api/boxes?limit=0",
        "/api/boxes?cursor=xyz",
        "/api/boxes?state=bogus",
        "/api/boxes?sort=id",
    ] {
        let (s, v) = app.call(Method::GET, bad, Some(&key), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert!(v["code"].is_string() && v["message"].is_string());
    }
}

async fn placement_explains_why_nothing_fits(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let create = |body: Value| {
        let app = &app;
        let key = key.clone();
        async move {
            app.call(Method::POST, "/api/boxes", Some(&key), Some(body))
                .await
        }
    };
    let (s, v) = create(json!({})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["code"], "no_runners_ready");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("no runner is registered")
    );

    let runner = FakeRunner::register(&app, "runner-1", res(2000, 2048, 8192)).await;
    let (_, v) = create(json!({})).await;
    assert_eq!(v["code"], "no_runners_ready");
    assert!(
        v["message"].as_str().unwrap().contains("1 initializing"),
        "{v}"
    );

    runner.sync().await;
    app.admin(Method::POST, "/api/admin/runners/runner-1/drain", None)
        .await;
    let (s, v) = create(json!({})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["code"], "all_runners_draining");
    assert_eq!(runner.sync().await.state, RunnerState::Draining);
    let (s, v) = app
        .admin(Method::POST, "/api/admin/runners/runner-1/undrain", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["state"], "ready");

    let (s, v) = create(json!({ "cpu_millicores": 3000 })).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["code"], "no_capacity");
    assert!(
        v["message"].as_str().unwrap().contains("3000 millicores"),
        "{v}"
    );
    let (s, _) =
        create(json!({ "cpu_millicores": 2000, "memory_mib": 2048, "disk_mib": 8192 })).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = create(json!({ "cpu_millicores": 50, "memory_mib": 32, "disk_mib": 64 })).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("no_capacity"))
    );

    // Silent past the window: unresponsive, and the error says so.
    app.advance(61);
    assert_eq!(
        app.runner("runner-1").await.state,
        RunnerState::Unresponsive
    );
    let (_, v) = create(json!({})).await;
    assert_eq!(v["code"], "no_runners_ready");
    assert!(
        v["message"].as_str().unwrap().contains("1 unresponsive"),
        "{v}"
    );
    // Checking in again makes it ready.
    assert_eq!(runner.sync().await.state, RunnerState::Ready);
    assert_eq!(app.runner("runner-1").await.state, RunnerState::Ready);
}

async fn draining_and_unresponsive_runners_get_nothing(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let big = res(64_000, 128_000, 1_000_000);
    let ready = FakeRunner::register(&app, "a-ready", res(16_000, 32_000, 200_000)).await;
    let draining = FakeRunner::register(&app, "b-draining", big).await;
    let silent = FakeRunner::register(&app, "c-silent", big).await;
    silent.sync().await;
    app.advance(30);
    ready.sync().await;
    draining.sync().await;
    app.admin(Method::POST, "/api/admin/runners/b-draining/drain", None)
        .await;
    app.advance(31); // c-silent: 61 s without a healthcheck
    ready.sync().await;
    draining.sync().await;
    assert_eq!(
        app.runner("c-silent").await.state,
        RunnerState::Unresponsive
    );
    assert_eq!(app.runner("b-draining").await.state, RunnerState::Draining);
    for _ in 0..10 {
        let bx = app
            .create_box(&key, json!({ "cpu_millicores": 500, "memory_mib": 512 }))
            .await;
        assert_eq!(
            bx.runner.as_deref(),
            Some("a-ready"),
            "the emptier runners are not eligible"
        );
    }
    assert!(draining.sync().await.actions.is_empty());
    assert_eq!(ready.sync().await.actions.len(), 10);

    // With two ready runners, the emptier one is preferred.
    let fresh = FakeRunner::register(&app, "d-fresh", res(16_000, 32_000, 200_000)).await;
    fresh.sync().await;
    let bx = app
        .create_box(&key, json!({ "cpu_millicores": 500, "memory_mib": 512 }))
        .await;
    assert_eq!(bx.runner.as_deref(), Some("d-fresh"));
    // A draining runner still gets actions for boxes it has (it is emptied, not abandoned).
    app.admin(Method::POST, "/api/admin/runners/a-ready/drain", None)
        .await;
    let victim = app.create_box(&key, json!({})).await;
    assert_eq!(victim.runner.as_deref(), Some("d-fresh"));
    let any_on_ready = *ready.boxes().keys().next().unwrap();
    app.call(
        Method::DELETE,
        &format!("/api/boxes/{any_on_ready}"),
        Some(&key),
        None,
    )
    .await;
    assert_eq!(
        ready.sync().await.actions,
        vec![RunnerAction::Delete { id: any_on_ready }]
    );
}

async fn concurrent_creates_never_overbook(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    // Room for 20 boxes on one runner and 7 on the other (CPU is the limit).
    let r1 = FakeRunner::register(&app, "runner-1", res(20_000, 1_000_000, 10_000_000)).await;
    let r2 = FakeRunner::register(&app, "runner-2", res(7_000, 1_000_000, 10_000_000)).await;
    r1.sync().await;
    r2.sync().await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let http = app.http.clone();
        let url = format!("{}/api/boxes", app.url);
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(key)
                .json(&json!({ "cpu_millicores": 1000, "memory_mib": 64, "disk_mib": 64, "labels": { "i": i.to_string() } }))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        }));
    }
    let mut per_runner: BTreeMap<String, u32> = BTreeMap::new();
    let mut refused = 0;
    for t in tasks {
        let (s, v) = t.await.unwrap();
        match s {
            StatusCode::CREATED => {
                *per_runner
                    .entry(v["runner"].as_str().unwrap().to_string())
                    .or_default() += 1
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(v["code"], "no_capacity", "{v}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(per_runner.get("runner-1"), Some(&20), "{per_runner:?}");
    assert_eq!(per_runner.get("runner-2"), Some(&7), "{per_runner:?}");
    assert_eq!(refused, 23);
    // The stored allocation equals the boxes actually pinned.
    for (name, n) in [("runner-1", 20u64), ("runner-2", 7)] {
        let info = app.runner(name).await;
        assert_eq!(info.boxes as u64, n);
        assert_eq!(info.allocated.cpu_millicores, n * 1000);
        assert!(info.allocated.cpu_millicores <= info.capacity.cpu_millicores);
        let pinned: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM boxes WHERE runner_id = $1 AND deleted_at IS NULL",
        )
        .bind(info.id.to_string())
        .fetch_one(app.state.db.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
        assert_eq!(pinned as u64, n);
    }
    assert_eq!(r1.sync().await.actions.len(), 20);
    assert_eq!(r2.sync().await.actions.len(), 7);
}

async fn running_box(app: &TestApp, key: &str, runner: &FakeRunner) -> Uuid {
    let bx = app.create_box(key, json!({ "env": { "A": "1" } })).await;
    runner.sync().await;
    runner.sync().await;
    assert_eq!(app.get_box(key, bx.id).await.state, BoxState::Running);
    bx.id
}

async fn exec_is_proxied_with_the_runner_key(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let runner = FakeRunner::register(&app, "runner-1", res(8000, 16384, 100_000)).await;
    runner.sync().await;
    let id = running_box(&app, &key, &runner).await;
    let exec = |body: Value| {
        let app = &app;
        let key = key.clone();
        async move {
            app.call(
                Method::POST,
                &format!("/api/boxes/{id}/exec"),
                Some(&key),
                Some(body),
            )
            .await
        }
    };
    let (s, v) =
        exec(json!({ "command": ["echo", "hi"], "stdin": "!", "env": { "X": "y" } })).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r: ExecResponse = serde_json::from_value(v).unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "echo hi!", r#"{"X":"y"}"#)
    );
    let (_, v) = exec(json!({ "command": ["false"] })).await;
    assert_eq!(v["exit_code"], 1);
    {
        let st = runner.state.lock().unwrap();
        assert_eq!(
            st.refused, 0,
            "the control plane presented the runner's key"
        );
        assert_eq!(st.calls.iter().filter(|c| c.ends_with("/exec")).count(), 2);
    }
    let (s, v) = exec(json!({ "command": [] })).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_command"))
    );
    let (s, v) = exec(json!({ "command": ["x"], "timeout_secs": 0 })).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_timeout"))
    );

    // The runner's own 4xx comes through with its code; a wrong key is its 401.
    runner
        .state
        .lock()
        .unwrap()
        .boxes
        .get_mut(&id)
        .unwrap()
        .state = BoxState::Stopped;
    let (s, v) = exec(json!({ "command": ["ls"] })).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_running")),
        "{v}"
    );
    runner
        .state
        .lock()
        .unwrap()
        .boxes
        .get_mut(&id)
        .unwrap()
        .state = BoxState::Running;

    // Not running in the control plane's view: refused before calling the runner.
    app.call(
        Method::POST,
        &format!("/api/boxes/{id}/stop"),
        Some(&key),
        None,
    )
    .await;
    runner.sync().await;
    runner.sync().await;
    let (s, v) = exec(json!({ "command": ["ls"] })).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::CONFLICT, Some("box_not_running"))
    );
    app.call(
        Method::POST,
        &format!("/api/boxes/{id}/start"),
        Some(&key),
        None,
    )
    .await;
    runner.sync().await;
    runner.sync().await;

    // Unresponsive runner: 503; unreachable runner: 502.
    app.advance(61);
    let (s, v) = exec(json!({ "command": ["ls"] })).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("runner_unavailable"))
    );
    let mut report = runner.report();
    report.address = format!("http://127.0.0.1:{}", testkit::free_port());
    runner.healthcheck_raw(&runner.token, &report).await;
    let (s, v) = exec(json!({ "command": ["ls"] })).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("runner_unreachable"))
    );
}

/// Issue 12: the runner's API key is replaced at the first check-in of every
/// agent process (a new `agent_instance`), so a key captured while the agent
/// restarted is useless once it is back; check-ins of one process keep it,
/// and a runner that sends no instance (an older build) keeps its key.
async fn a_new_agent_process_gets_a_new_runner_key(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let runner = FakeRunner::register(&app, "runner-1", res(8000, 16384, 100_000)).await;
    let k1 = runner.sync().await.api_key;
    assert!(k1.starts_with(RUNNER_API_KEY_PREFIX));
    assert_eq!(runner.sync().await.api_key, k1, "same process, same key");
    let id = running_box(&app, &key, &runner).await;
    let exec = || {
        let app = &app;
        let key = key.clone();
        async move {
            app.call(
                Method::POST,
                &format!("/api/boxes/{id}/exec"),
                Some(&key),
                Some(json!({ "command": ["true"] })),
            )
            .await
        }
    };
    assert_eq!(exec().await.0, StatusCode::OK);
    let stored = || async {
        sqlx::query("SELECT api_key FROM runners WHERE name = 'runner-1'")
            .fetch_one(app.state.db.pool())
            .await
            .unwrap()
            .try_get::<String, _>("api_key")
            .unwrap()
    };

    // The agent restarts: its first check-in brings a new key, and the control
    // plane presents only that one from then on.
    runner.restart();
    let k2 = runner.sync().await.api_key;
    assert_ne!(k2, k1, "a new agent process gets a new key");
    assert!(k2.starts_with(RUNNER_API_KEY_PREFIX));
    assert_eq!(stored().await, k2);
    assert_eq!(runner.sync().await.api_key, k2);
    assert_eq!(exec().await.0, StatusCode::OK);
    assert_eq!(runner.state.lock().unwrap().refused, 0);

    // An older runner sends no instance: its key stays.
    let mut legacy = runner.report();
    legacy.agent_instance = None;
    let (s, v) = runner.healthcheck_raw(&runner.token, &legacy).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["api_key"], k2.as_str());
    // A malformed instance is refused, and changes nothing.
    for bad in ["", "has space", &"x".repeat(65)] {
        let mut r = runner.report();
        r.agent_instance = Some(bad.to_string());
        let (s, v) = runner.healthcheck_raw(&runner.token, &r).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_agent_instance")),
            "{bad:?}: {v}"
        );
    }
    assert_eq!(stored().await, k2);
    // Concurrent check-ins of one new process agree on one key.
    runner.restart();
    let report = runner.report();
    let (a, b2) = tokio::join!(
        runner.healthcheck_raw(&runner.token, &report),
        runner.healthcheck_raw(&runner.token, &report)
    );
    assert_eq!((a.0, b2.0), (StatusCode::OK, StatusCode::OK));
    assert_eq!(a.1["api_key"], b2.1["api_key"]);
    assert_ne!(a.1["api_key"], k2.as_str());
    assert_eq!(a.1["api_key"], stored().await.as_str());
}

/// `POST /api/boxes/{id}/exec` with `body`: status, `Retry-After`, body bytes.
async fn exec_raw(
    app: &TestApp,
    key: &str,
    id: Uuid,
    body: Value,
) -> (StatusCode, Option<String>, Vec<u8>) {
    let resp = app
        .http
        .post(format!("{}/api/boxes/{id}/exec", app.url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, resp.bytes().await.unwrap().to_vec())
}

async fn exec_output_is_bounded_and_byte_exact(b: Backend) {
    let app = TestApp::start_with(b, |c| c.exec_max_output_bytes = 4096).await;
    let (_, key) = app.org("acme").await;
    let runner = FakeRunner::register(&app, "runner-1", res(8000, 16384, 100_000)).await;
    runner.sync().await;
    let id = running_box(&app, &key, &runner).await;
    let asked = || {
        runner
            .state
            .lock()
            .unwrap()
            .last_exec
            .clone()
            .unwrap()
            .max_output_bytes
    };

    // Binary output comes through byte for byte, as base64, within the limit.
    let (s, _, body) = exec_raw(&app, &key, id, json!({ "command": ["bytes", "256"] })).await;
    assert_eq!(s, StatusCode::OK);
    let r: ExecResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(r.stdout_encoding, OutputEncoding::Base64);
    assert_eq!(r.stdout_bytes().unwrap(), pattern(256));
    assert!(!r.stdout_truncated);
    assert_eq!(
        asked(),
        Some(4096),
        "the runner is asked for the control plane's limit"
    );
    // More than the limit: the first 4096 bytes, marked truncated.
    let (_, _, body) = exec_raw(&app, &key, id, json!({ "command": ["bytes", "100000"] })).await;
    assert!(
        body.len() as u64 <= ExecResponse::max_json_len(4096),
        "{}",
        body.len()
    );
    let r: ExecResponse = serde_json::from_slice(&body).unwrap();
    assert!(r.stdout_truncated);
    assert_eq!(r.stdout_bytes().unwrap(), pattern(4096));
    // A caller may ask for less, never for more.
    let (_, _, body) = exec_raw(
        &app,
        &key,
        id,
        json!({ "command": ["bytes", "1000"], "max_output_bytes": 100 }),
    )
    .await;
    let r: ExecResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (r.stdout_bytes().unwrap(), r.stdout_truncated),
        (pattern(100), true)
    );
    exec_raw(
        &app,
        &key,
        id,
        json!({ "command": ["bytes", "1"], "max_output_bytes": 1u64 << 40 }),
    )
    .await;
    assert_eq!(asked(), Some(4096));
    let (s, _, body) = exec_raw(
        &app,
        &key,
        id,
        json!({ "command": ["ls"], "max_output_bytes": 0 }),
    )
    .await;
    let e: ApiError = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (s, e.code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_max_output_bytes")
    );
    // A runner that ignores the limit (50 MiB answer) is cut off, not buffered or relayed.
    let (s, _, body) = exec_raw(&app, &key, id, json!({ "command": ["flood", "52428800"] })).await;
    let e: ApiError = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (s, e.code.as_str()),
        (StatusCode::BAD_GATEWAY, "runner_output_too_large"),
        "{}",
        e.message
    );
    // Text within the limit is still plain text.
    let (_, _, body) = exec_raw(&app, &key, id, json!({ "command": ["flood", "4000"] })).await;
    let r: ExecResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (r.stdout_encoding, r.stdout.len()),
        (OutputEncoding::Utf8, 4000)
    );
}

async fn concurrent_execs_are_bounded_per_organization(b: Backend) {
    // A pool of one connection: execs that waited on the runner while
    // holding a connection would stall every other request.
    let app = TestApp::start_with(b, |c| {
        c.exec_max_concurrent_per_org = 2;
        c.database_max_connections = 1;
    })
    .await;
    let (acme_id, acme) = app.org("acme").await;
    let (_, other) = app.org("other").await;
    let runner = FakeRunner::register(&app, "runner-1", res(8000, 16384, 100_000)).await;
    runner.sync().await;
    let a = running_box(&app, &acme, &runner).await;
    let o = running_box(&app, &other, &runner).await;
    let execs_on = |id: Uuid| {
        let path = format!("POST /api/boxes/{id}/exec");
        runner
            .state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| **c == path)
            .count()
    };
    let slow = |secs: &str| {
        let http = app.http.clone();
        let url = format!("{}/api/boxes/{a}/exec", app.url);
        let key = acme.clone();
        let body = json!({ "command": ["sleep", secs] });
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let (first, second) = (slow("3"), slow("3"));
    let t0 = std::time::Instant::now();
    while execs_on(a) < 2 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "execs did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // acme's third is refused, with a code and Retry-After, and never reaches the runner.
    let (s, retry, body) = exec_raw(&app, &acme, a, json!({ "command": ["echo", "x"] })).await;
    let e: ApiError = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (s, e.code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_execs")
    );
    assert_eq!(retry.as_deref(), Some("2"));
    assert!(
        e.message.contains("acme") && e.message.contains('2'),
        "{}",
        e.message
    );
    assert_eq!(execs_on(a), 2);
    // Another organization is not affected, and the API answers promptly.
    let t1 = std::time::Instant::now();
    let (s, _, body) = exec_raw(&app, &other, o, json!({ "command": ["echo", "hi"] })).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (s, _) = app.call(Method::GET, "/api/boxes", Some(&acme), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        t1.elapsed() < std::time::Duration::from_secs(2),
        "requests waited {:?} behind the running execs",
        t1.elapsed()
    );
    assert_eq!(first.await.unwrap(), reqwest::StatusCode::OK);
    assert_eq!(second.await.unwrap(), reqwest::StatusCode::OK);
    // Finished execs gave their slots back.
    for _ in 0..2 {
        let (s, _, _) = exec_raw(&app, &acme, a, json!({ "command": ["echo", "x"] })).await;
        assert_eq!(s, StatusCode::OK);
    }

    // A client that goes away mid-exec gives its slot back too.
    let gone = app
        .http
        .post(format!("{}/api/boxes/{a}/exec", app.url))
        .bearer_auth(&acme)
        .json(&json!({ "command": ["sleep", "30"] }))
        .timeout(std::time::Duration::from_millis(500))
        .send()
        .await;
    assert!(gone.is_err());
    let held = || async {
        sqlx::query("SELECT COUNT(*) AS n FROM exec_slots WHERE holder IS NOT NULL")
            .fetch_one(app.state.db.pool())
            .await
            .unwrap()
            .try_get::<i64, _>("n")
            .unwrap()
    };
    let t2 = std::time::Instant::now();
    while held().await > 0 {
        assert!(
            t2.elapsed() < std::time::Duration::from_secs(10),
            "slot not given back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Slots are shared storage: those another replica holds count, until
    // their lease runs out without a renewal (the replica died).
    let now = app.clock.now_ms();
    for slot in 0..2i64 {
        sqlx::query(
            "UPDATE exec_slots SET holder = 'dead-replica', expires_at = $1 \
             WHERE organization_id = $2 AND slot = $3",
        )
        .bind(now + 30_000)
        .bind(acme_id.to_string())
        .bind(slot)
        .execute(app.state.db.pool())
        .await
        .unwrap();
    }
    let (s, _, _) = exec_raw(&app, &acme, a, json!({ "command": ["echo", "x"] })).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    app.advance(31);
    let (s, _, body) = exec_raw(&app, &acme, a, json!({ "command": ["echo", "x"] })).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
}

async fn interactive_exec_is_relayed_over_websocket(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let runner = FakeRunner::register(&app, "runner-1", res(8000, 16384, 100_000)).await;
    runner.sync().await;
    let id = running_box(&app, &key, &runner).await;
    let ws_url = format!(
        "{}/api/boxes/{id}/exec/ws",
        app.url.replace("http://", "ws://")
    );
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade through the control plane");
    assert!(resp.headers().contains_key("x-request-id"));
    let start = ExecStart {
        command: vec!["bash".into()],
        tty: true,
        rows: Some(24),
        cols: Some(80),
        ..Default::default()
    };
    ws.send(Message::text(serde_json::to_string(&start).unwrap()))
        .await
        .unwrap();
    let next_text =
        |m: Message| -> ExecEvent { serde_json::from_str(m.to_text().unwrap()).unwrap() };
    let first = ws.next().await.unwrap().unwrap();
    assert_eq!(
        next_text(first),
        ExecEvent::Started {
            session: "s-bash".into()
        }
    );
    ws.send(Message::binary(b"ls -l\n".to_vec())).await.unwrap();
    let out = ws.next().await.unwrap().unwrap().into_data();
    assert_eq!(out[0], STDOUT);
    assert_eq!(&out[1..], b"ls -l\n");
    let resize = ExecControl::Resize {
        rows: 50,
        cols: 132,
    };
    ws.send(Message::text(serde_json::to_string(&resize).unwrap()))
        .await
        .unwrap();
    let out = ws.next().await.unwrap().unwrap().into_data();
    assert_eq!(out[0], STDERR);
    assert_eq!(&out[1..], b"resize 50x132");
    let sig = ExecControl::Signal {
        signal: "TERM".into(),
    };
    ws.send(Message::text(serde_json::to_string(&sig).unwrap()))
        .await
        .unwrap();
    ws.send(Message::text(
        serde_json::to_string(&ExecControl::StdinEof).unwrap(),
    ))
    .await
    .unwrap();
    let exit = ws.next().await.unwrap().unwrap();
    assert_eq!(next_text(exit), ExecEvent::Exit { code: 3 });
    match ws.next().await {
        Some(Ok(Message::Close(_))) | None => {}
        other => panic!("expected close, got {other:?}"),
    }
    assert_eq!(runner.state.lock().unwrap().refused, 0);

    // Errors before the upgrade are plain JSON answers.
    let plain = app
        .call(
            Method::GET,
            &format!("/api/boxes/{id}/exec/ws"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(
        (plain.0, plain.1["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("websocket_required"))
    );
    let mut req = format!(
        "{}/api/boxes/{}/exec/ws",
        app.url.replace("http://", "ws://"),
        Uuid::now_v7()
    )
    .into_client_request()
    .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::NOT_FOUND)
        }
        other => panic!("expected a 404, got {other:?}"),
    }
}

async fn exec_websocket_messages_are_bounded_both_ways(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let runner = FakeRunner::register(&app, "runner-1", res(8000, 16384, 100_000)).await;
    runner.sync().await;
    let id = running_box(&app, &key, &runner).await;
    let open = |command: Vec<String>| {
        let url = format!(
            "{}/api/boxes/{id}/exec/ws",
            app.url.replace("http://", "ws://")
        );
        let key = key.clone();
        async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
            // The test's own client accepts anything, to see what is relayed.
            let cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .max_message_size(None)
                .max_frame_size(None);
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(cfg), false)
                .await
                .unwrap();
            let start = ExecStart {
                command,
                ..Default::default()
            };
            ws.send(Message::text(serde_json::to_string(&start).unwrap()))
                .await
                .unwrap();
            let started = ws.next().await.unwrap().unwrap();
            assert!(started.is_text(), "{started:?}");
            ws
        }
    };
    // Within the limit, either way: relayed.
    let mut ws = open(vec!["cat".into()]).await;
    ws.send(Message::binary(vec![7u8; 1 << 20])).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap().into_data();
    assert_eq!(echo.len(), (1 << 20) + 1);
    // A client's 3 MiB message is refused, not buffered and relayed.
    let _ = ws.send(Message::binary(vec![7u8; 3 << 20])).await;
    while let Some(Ok(m)) = ws.next().await {
        assert!(
            m.len() < MAX_WS_MESSAGE_BYTES,
            "relayed a {} byte message",
            m.len()
        );
        if m.is_close() {
            break;
        }
    }
    // A runner's 3 MiB message is refused too: the client is told the runner
    // connection is lost, and never gets the message.
    let mut ws = open(vec!["flood".into(), (3 << 20).to_string()]).await;
    let mut closed = None;
    while let Some(Ok(m)) = ws.next().await {
        assert!(
            m.len() < MAX_WS_MESSAGE_BYTES,
            "relayed a {} byte message",
            m.len()
        );
        if let Message::Close(f) = m {
            closed = f.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(closed, Some(1011));
    // Just under the limit still goes through.
    let mut ws = open(vec!["flood".into(), ((1 << 20) + 5).to_string()]).await;
    let out = ws.next().await.unwrap().unwrap().into_data();
    assert_eq!(out.len(), (1 << 20) + 6);
}

async fn moving_a_box_keeps_its_id_and_data(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    // runner-a is clearly emptier, so the box is placed there.
    let a = FakeRunner::register(&app, "runner-a", res(16000, 32768, 200_000)).await;
    let bb = FakeRunner::register(&app, "runner-b", res(8000, 16384, 100_000)).await;
    a.sync().await;
    bb.sync().await;
    let id = running_box(&app, &key, &a).await;
    app.admin(Method::POST, "/api/admin/runners/runner-a/drain", None)
        .await;
    let (s, v) = app
        .admin(Method::GET, "/api/admin/runners/runner-a/boxes", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), 1);
    let original = a.state.lock().unwrap().boxes[&id].clone();

    // Cannot move onto a draining runner, or to a runner that does not exist.
    let (s, v) = app
        .admin(
            Method::POST,
            &format!("/api/admin/boxes/{id}/move"),
            Some(json!({ "runner": "runner-a" })),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "moving to where it is is a no-op: {v}");
    let (s, _) = app
        .admin(
            Method::POST,
            &format!("/api/admin/boxes/{id}/move"),
            Some(json!({ "runner": "nope" })),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, v) = app
        .admin(
            Method::POST,
            &format!("/api/admin/boxes/{id}/move"),
            Some(json!({ "runner": "runner-b" })),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let moved: BoxInfo = serde_json::from_value(v).unwrap();
    assert_eq!(moved.id, id);
    assert_eq!(moved.runner.as_deref(), Some("runner-b"));
    assert_eq!(moved.desired_state, BoxState::Running);
    // The files arrived intact, under the same id.
    {
        let st = bb.state.lock().unwrap();
        assert_eq!(st.boxes[&id].data, original.data);
        assert_eq!(st.boxes[&id].spec, original.spec);
        assert_eq!(st.refused, 0);
        // Announced to the target in its healthcheck answer, with the hash of
        // the one-time token the import presented.
        assert_eq!(st.presented.len(), 1);
        let (token, grant) = &st.presented[0];
        assert!(token.starts_with(IMPORT_TOKEN_PREFIX), "{token}");
        assert_eq!(grant.box_id, id);
        assert_eq!(grant.token_sha256, control_plane::tokens::sha256_hex(token));
        let ttl = grant.expires_at - app.clock.now();
        assert!(
            ttl > time::Duration::ZERO && ttl <= time::Duration::minutes(2),
            "{ttl}"
        );
    }
    // Withdrawn once the import returned: nothing left to replay.
    assert_eq!(import_rows(&app).await, 0);
    assert_eq!(a.state.lock().unwrap().refused, 0);
    // Old runner is told to delete its copy, new runner to start it.
    assert_eq!(a.sync().await.actions, vec![RunnerAction::Delete { id }]);
    assert_eq!(bb.sync().await.actions, vec![RunnerAction::Start { id }]);
    bb.sync().await;
    assert_eq!(app.get_box(&key, id).await.state, BoxState::Running);
    assert_eq!(app.runner("runner-a").await.allocated, res(0, 0, 0));
    assert_eq!(app.runner("runner-b").await.boxes, 1);
    let (_, v) = app
        .admin(Method::GET, "/api/admin/runners/runner-a/boxes", None)
        .await;
    assert!(v.as_array().unwrap().is_empty());
    // The emptied runner can now be decommissioned.
    let (s, _) = app
        .admin(
            Method::POST,
            "/api/admin/runners/runner-a/decommission",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
}

async fn import_rows(app: &TestApp) -> i64 {
    sqlx::query("SELECT COUNT(*) AS n FROM box_imports")
        .fetch_one(app.state.db.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap()
}

/// Issue 12: an import is announced to its target runner alone, in that
/// runner's healthcheck answers, as the SHA-256 of a one-time token (the only
/// form the database keeps), until it expires or is withdrawn.
async fn imports_are_announced_to_their_runner_until_they_expire(b: Backend) {
    use control_plane::imports::{self, Purpose};
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    // runner-a is clearly emptier, so the box is placed there.
    let a = FakeRunner::register(&app, "runner-a", res(16000, 32768, 200_000)).await;
    let bb = FakeRunner::register(&app, "runner-b", res(8000, 16384, 100_000)).await;
    a.sync().await;
    assert!(bb.sync().await.imports.is_empty());
    let id = running_box(&app, &key, &a).await;
    let b_id = app.runner("runner-b").await.id.to_string();
    let token = imports::announce(&app.state, id, &b_id, Purpose::Move)
        .await
        .unwrap();
    let token = token.expose().to_string();
    assert!(token.starts_with(IMPORT_TOKEN_PREFIX));
    let grants = bb.sync().await.imports;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].box_id, id);
    assert_eq!(
        grants[0].token_sha256,
        control_plane::tokens::sha256_hex(&token)
    );
    assert_eq!(
        grants[0].expires_at,
        app.clock.now() + time::Duration::milliseconds(imports::TOKEN_TTL_MS)
    );
    assert!(
        a.sync().await.imports.is_empty(),
        "only the target hears of it"
    );
    let stored: String = sqlx::query("SELECT token_sha256 FROM box_imports")
        .fetch_one(app.state.db.pool())
        .await
        .unwrap()
        .try_get("token_sha256")
        .unwrap();
    assert_eq!(stored, grants[0].token_sha256, "only the hash is stored");
    // A new announcement replaces the old one.
    let again = imports::announce(&app.state, id, &b_id, Purpose::Move)
        .await
        .unwrap();
    let grants = bb.sync().await.imports;
    assert_eq!(grants.len(), 1);
    assert_eq!(
        grants[0].token_sha256,
        control_plane::tokens::sha256_hex(again.expose())
    );
    // Expired: no longer announced (and pruned by the next announcement).
    app.advance(121);
    assert!(bb.sync().await.imports.is_empty());
    imports::announce(&app.state, id, &b_id, Purpose::Restore)
        .await
        .unwrap();
    assert_eq!(import_rows(&app).await, 1);
    assert_eq!(bb.sync().await.imports.len(), 1);
    // Withdrawn: gone.
    imports::withdraw(&app.state, id, &b_id).await.unwrap();
    assert!(bb.sync().await.imports.is_empty());
    assert_eq!(import_rows(&app).await, 0);
}

async fn failed_moves_leave_the_box_where_it_was(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let a = FakeRunner::register(&app, "runner-a", res(8000, 16384, 100_000)).await;
    let bb = FakeRunner::register(&app, "runner-b", res(1000, 16384, 100_000)).await;
    a.sync().await;
    bb.sync().await;
    let id = running_box(&app, &key, &a).await;
    let mv = || {
        let app = &app;
        async move {
            app.admin(
                Method::POST,
                &format!("/api/admin/boxes/{id}/move"),
                Some(json!({ "runner": "runner-b" })),
            )
            .await
        }
    };
    a.state.lock().unwrap().fail_export = true;
    let (s, v) = mv().await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("runner_error")),
        "{v}"
    );
    let bx = app.get_box(&key, id).await;
    assert_eq!(bx.runner.as_deref(), Some("runner-a"));
    assert_eq!(bx.state, BoxState::Running);
    assert_eq!(
        app.runner("runner-b").await.allocated,
        res(0, 0, 0),
        "reservation released"
    );

    a.state.lock().unwrap().fail_export = false;
    a.state.lock().unwrap().lie_about_checksum = true;
    let (s, v) = mv().await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "the target refused the corrupt archive: {v}"
    );
    assert_eq!(v["code"], "checksum_mismatch");
    assert_eq!(
        app.get_box(&key, id).await.runner.as_deref(),
        Some("runner-a")
    );
    a.state.lock().unwrap().lie_about_checksum = false;

    // Target draining: refused up front.
    app.admin(Method::POST, "/api/admin/runners/runner-b/drain", None)
        .await;
    let (s, v) = mv().await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::CONFLICT, Some("runner_unavailable")),
        "{v}"
    );
    app.admin(Method::POST, "/api/admin/runners/runner-b/undrain", None)
        .await;
    // Target full: refused up front.
    app.admin(Method::POST, "/api/admin/runners/runner-a/drain", None)
        .await;
    let filler = app
        .create_box(&key, json!({ "cpu_millicores": 1000 }))
        .await;
    assert_eq!(filler.runner.as_deref(), Some("runner-b"));
    let (s, v) = mv().await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("no_capacity")),
        "{v}"
    );
    // Healthchecks never lost the box on either side.
    assert!(a.sync().await.actions.is_empty());
    assert!(a.boxes().contains_key(&id));
}

async fn decommission_refuses_while_boxes_remain(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let r = FakeRunner::register(&app, "runner-1", res(8000, 16384, 100_000)).await;
    r.sync().await;
    let id = running_box(&app, &key, &r).await;
    let (s, v) = app
        .admin(
            Method::POST,
            "/api/admin/runners/runner-1/decommission",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["code"], "runner_not_empty");
    assert!(v["message"].as_str().unwrap().contains("1 box"), "{v}");
    assert_eq!(app.runner("runner-1").await.state, RunnerState::Ready);
    let (s, v) = app
        .admin(
            Method::POST,
            "/api/admin/runners/runner-1/decommission?force=yes",
            None,
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_query"))
    );
    let (s, v) = app
        .admin(
            Method::POST,
            "/api/admin/runners/runner-1/decommission?force=true",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "decommissioned");
    assert_eq!(v["boxes"], 0);
    let bx = app.get_box(&key, id).await;
    assert_eq!(bx.state, BoxState::Deleted);
    assert!(bx.error.unwrap().contains("decommissioned"));
    let (s, _) = app
        .admin(
            Method::POST,
            "/api/admin/runners/runner-1/decommission",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "idempotent");
}

async fn organizations_and_keys(b: Backend) {
    let app = TestApp::start(b).await;
    let (org_id, key) = app.org("acme").await;
    assert!(key.starts_with(API_KEY_PREFIX));
    let (s, v) = app.call(Method::GET, "/api/me", Some(&key), None).await;
    assert_eq!(s, StatusCode::OK);
    let me: WhoAmI = serde_json::from_value(v).unwrap();
    assert_eq!(
        (me.organization_id, me.admin, me.auth),
        (org_id, false, AuthMethod::ApiKey)
    );
    for (name, code) in [
        ("acme", StatusCode::CONFLICT),
        ("admin", StatusCode::CONFLICT),
        ("Bad_Name", StatusCode::BAD_REQUEST),
    ] {
        let (s, _) = app
            .admin(
                Method::POST,
                "/api/admin/organizations",
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(s, code, "{name}");
    }
    let (_, v) = app
        .admin(Method::GET, "/api/admin/organizations", None)
        .await;
    let orgs: Vec<OrganizationInfo> = serde_json::from_value(v).unwrap();
    assert_eq!(
        orgs.iter()
            .map(|o| (o.name.as_str(), o.admin))
            .collect::<Vec<_>>(),
        vec![("acme", false), ("admin", true)]
    );

    let (s, v) = app
        .call(
            Method::POST,
            "/api/keys",
            Some(&key),
            Some(json!({ "name": "ci" })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let created: CreateApiKeyResponse = serde_json::from_value(v).unwrap();
    assert!(created.key.starts_with(&created.info.prefix));
    let (_, v) = app
        .call(Method::GET, "/api/keys", Some(&created.key), None)
        .await;
    let text = v.to_string();
    assert!(
        !text.contains(&created.key) && !text.contains(&key),
        "listings never show keys"
    );
    assert_eq!(v.as_array().unwrap().len(), 2);
    let (s, _) = app
        .call(
            Method::POST,
            "/api/keys",
            Some(&key),
            Some(json!({ "name": "" })),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Another organization's key id is not found; own key revoked.
    let (_, admin_keys) = app.admin(Method::GET, "/api/keys", None).await;
    let admin_key_id = admin_keys[0]["id"].as_str().unwrap().to_string();
    let (s, _) = app
        .call(
            Method::DELETE,
            &format!("/api/keys/{admin_key_id}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app
        .call(
            Method::DELETE,
            &format!("/api/keys/{}", created.info.id),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = app
        .call(Method::GET, "/api/me", Some(&created.key), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Users for OIDC.
    let (s, v) = app
        .admin(
            Method::POST,
            &format!("/api/admin/organizations/{org_id}/users"),
            Some(json!({ "subject": "alice", "email": "a@x.io" })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = app
        .admin(
            Method::POST,
            &format!("/api/admin/organizations/{org_id}/users"),
            Some(json!({ "subject": "alice" })),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::CONFLICT, Some("subject_taken"))
    );
    let (s, _) = app
        .admin(
            Method::POST,
            &format!("/api/admin/organizations/{}/users", Uuid::now_v7()),
            Some(json!({ "subject": "bob" })),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, v) = app
        .admin(
            Method::GET,
            &format!("/api/admin/organizations/{org_id}/users"),
            None,
        )
        .await;
    assert_eq!(v[0]["subject"], "alice");
}

async fn bad_input_gets_json_errors(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let r = FakeRunner::register(&app, "runner-1", res(8000, 16384, 100_000)).await;
    r.sync().await;
    let raw = |method: Method, path: &str, body: Vec<u8>, ctype: Option<&str>| {
        let mut rb = app
            .http
            .request(method, format!("{}{path}", app.url))
            .bearer_auth(&key)
            .body(body);
        if let Some(c) = ctype {
            rb = rb.header("content-type", c);
        }
        async move {
            let resp = rb.send().await.unwrap();
            let s = resp.status();
            let v: Value = resp.json().await.expect("every error is JSON");
            assert!(v["code"].is_string() && v["message"].is_string(), "{v}");
            (s, v["code"].as_str().unwrap().to_string())
        }
    };
    let json_ct = Some("application/json");
    type Case<'a> = (
        Method,
        &'a str,
        Vec<u8>,
        Option<&'a str>,
        StatusCode,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/api/boxes",
            b"{not json".to_vec(),
            json_ct,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/api/boxes",
            br#"{"cpu_millicores":"lots"}"#.to_vec(),
            json_ct,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/api/boxes",
            br#"{"cpu_millicores":-1}"#.to_vec(),
            json_ct,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/api/boxes",
            br#""text""#.to_vec(),
            json_ct,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/api/boxes",
            b"{}".to_vec(),
            None,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/api/boxes",
            vec![b' '; 2 * 1024 * 1024],
            json_ct,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Method::POST,
            "/api/boxes",
            br#"{"image":"a b"}"#.to_vec(),
            json_ct,
            StatusCode::BAD_REQUEST,
            "invalid_image",
        ),
        (
            Method::POST,
            "/api/boxes",
            br#"{"memory_mib":1}"#.to_vec(),
            json_ct,
            StatusCode::BAD_REQUEST,
            "invalid_resources",
        ),
        (
            Method::POST,
            "/api/boxes",
            br#"{"labels":{"":"x"}}"#.to_vec(),
            json_ct,
            StatusCode::BAD_REQUEST,
            "invalid_labels",
        ),
        (
            Method::GET,
            "/api/boxes/not-a-uuid",
            vec![],
            None,
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            Method::GET,
            "/api/boxes/00000000-0000-0000-0000-000000000000",
            vec![],
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::DELETE,
            "/api/boxes/%FF%FE",
            vec![],
            None,
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            Method::GET,
            "/api/nothing-here",
            vec![],
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::PUT,
            "/api/boxes",
            vec![],
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (m, path, body, ct, want, code) in cases {
        let (s, c) = raw(m.clone(), path, body, ct).await;
        assert_eq!((s, c.as_str()), (want, code), "{m} {path}");
    }
    let (s, v) = app
        .admin(
            Method::POST,
            "/api/admin/runners",
            Some(json!({ "name": 7 })),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json")),
        "{v}"
    );
    // A large (but allowed) healthcheck is accepted on its own, higher limit.
    let mut report = r.report();
    for _ in 0..20_000 {
        report.boxes.push(BoxReport {
            id: Uuid::now_v7(),
            state: BoxState::Deleted,
            usage: Resources::default(),
            error: None,
        });
    }
    assert!(serde_json::to_vec(&report).unwrap().len() > 1024 * 1024);
    let (s, v) = r.healthcheck_raw(&r.token, &report).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Request ids: generated, or kept when the client sends a sane one.
    let resp = app
        .http
        .get(format!("{}/api/health", app.url))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let resp = app
        .http
        .get(format!("{}/api/health", app.url))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_ne!(resp.headers()["x-request-id"], "bad id with spaces");
    assert_eq!(resp.headers()["x-request-id"].len(), 36);
}

/// What a request for a route should be made of, to get past body parsing.
fn sample_body(method: &Method, path: &str) -> Option<Value> {
    Some(match (method.as_str(), path) {
        ("POST", "/api/boxes") => json!({}),
        ("POST", "/api/boxes/{id}/exec") => json!({ "command": ["ls"] }),
        ("POST", "/api/keys") => json!({ "name": "k" }),
        ("POST", "/api/runners/healthcheck") => json!({
            "version": "1", "address": "http://127.0.0.1:1", "capacity": { "cpu_millicores": 1, "memory_mib": 1, "disk_mib": 1 },
            "usage": { "cpu_millicores": 0, "memory_mib": 0, "disk_mib": 0 }, "boxes": []
        }),
        ("POST", "/api/admin/organizations") => json!({ "name": "zzz" }),
        ("POST", "/api/admin/organizations/{id}/users") => json!({ "subject": "s" }),
        ("POST", "/api/admin/runners") => json!({ "name": "zzz" }),
        ("POST", "/api/admin/boxes/{id}/move") => json!({ "runner": "runner-1" }),
        (_, p) if p.contains("/exec/ws") => return None,
        ("POST", _) | ("GET", _) | ("DELETE", _) => return None,
        _ => panic!("no sample for {method} {path}"),
    })
}

async fn authorization_is_enforced_on_every_route(b: Backend) {
    let app = TestApp::start(b).await;
    let (org_a, key_a) = app.org("org-a").await;
    let (_, key_b) = app.org("org-b").await;
    let runner = FakeRunner::register(&app, "runner-1", res(64_000, 64_000, 1_000_000)).await;
    runner.sync().await;
    let box_a = app.create_box(&key_a, json!({})).await.id;
    let (_, keys_a) = app.call(Method::GET, "/api/keys", Some(&key_a), None).await;
    let key_a_id = keys_a[0]["id"].as_str().unwrap().to_string();
    let (_, revoked) = app
        .call(
            Method::POST,
            "/api/keys",
            Some(&key_a),
            Some(json!({ "name": "old" })),
        )
        .await;
    let revoked_key = revoked["key"].as_str().unwrap().to_string();
    app.call(
        Method::DELETE,
        &format!("/api/keys/{}", revoked["info"]["id"].as_str().unwrap()),
        Some(&key_a),
        None,
    )
    .await;

    let routes = control_plane::api::routes();
    // The table the router is built from is what the OpenAPI document lists: every route is here.
    let (_, doc) = app.call(Method::GET, "/api/openapi.json", None, None).await;
    let documented: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert_eq!(documented, routes.len());

    let fill = |p: &str| {
        p.replace("/api/boxes/{id}", &format!("/api/boxes/{box_a}"))
            .replace(
                "/api/admin/boxes/{id}",
                &format!("/api/admin/boxes/{box_a}"),
            )
            .replace("/api/keys/{id}", &format!("/api/keys/{key_a_id}"))
            .replace(
                "/api/admin/organizations/{id}",
                &format!("/api/admin/organizations/{org_a}"),
            )
            .replace("{name}", "runner-1")
    };
    let bad_tokens = [
        "bxk_thisKeyDoesNotExist0000000000000000000".to_string(),
        "bxr_thisTokenDoesNotExist000000000000000000".to_string(),
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln".to_string(),
        "garbage".to_string(),
        revoked_key,
    ];
    let mut checked = 0;
    for r in &routes {
        let access = r.access;
        let path = fill(r.path);
        assert!(!path.contains('{'), "no sample for {}", r.path);
        let body = sample_body(&r.method, r.path);
        let call = |key: Option<String>| {
            let app = &app;
            let method = r.method.clone();
            let path = path.clone();
            let body = body.clone();
            async move { app.call(method, &path, key.as_deref(), body).await }
        };
        let what = format!("{} {}", r.method, r.path);
        if access == control_plane::api::Access::Public {
            let (s, _) = call(None).await;
            assert!(s.is_success(), "{what}: public, got {s}");
            checked += 1;
            continue;
        }
        // No credentials, and unusable ones: 401 with a JSON body.
        let (s, v) = call(None).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized")),
            "{what}: no credentials"
        );
        for t in &bad_tokens {
            let (s, v) = call(Some(t.clone())).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: bad token {t}: {v}");
        }
        let resp = app
            .http
            .get(format!("{}{path}", app.url))
            .header("authorization", "Basic dXNlcjpwdw==")
            .send()
            .await
            .unwrap();
        assert!(
            matches!(
                resp.status(),
                StatusCode::UNAUTHORIZED | StatusCode::METHOD_NOT_ALLOWED
            ),
            "{what}: basic auth"
        );
        // A runner token where a user is expected: 403; a user where a runner is expected: 403.
        let (s, v) = call(Some(runner.token.clone())).await;
        match access {
            control_plane::api::Access::Runner => {
                assert_eq!(s, StatusCode::OK, "{what}: runner token: {v}")
            }
            _ => assert_eq!(
                (s, v["code"].as_str()),
                (StatusCode::FORBIDDEN, Some("forbidden")),
                "{what}: runner token"
            ),
        }
        // Another organization's key.
        let (s, v) = call(Some(key_b.clone())).await;
        match access {
            control_plane::api::Access::Admin | control_plane::api::Access::Runner => {
                assert_eq!(
                    (s, v["code"].as_str()),
                    (StatusCode::FORBIDDEN, Some("forbidden")),
                    "{what}: other org"
                )
            }
            control_plane::api::Access::Member if r.path.contains("{id}") => {
                assert_eq!(
                    (s, v["code"].as_str()),
                    (StatusCode::NOT_FOUND, Some("not_found")),
                    "{what}: other org's object must not be visible"
                )
            }
            control_plane::api::Access::Member => {
                // Collection routes answer for the caller's own organization only.
                assert!(s.is_success(), "{what}: other org, own collection: {s} {v}");
                assert!(
                    !v.to_string().contains(&box_a.to_string()),
                    "{what}: leaks org A's box"
                );
                assert!(
                    !v.to_string().contains(&key_a_id),
                    "{what}: leaks org A's key"
                );
            }
            control_plane::api::Access::Public => unreachable!(),
        }
        // Org A's own key on member routes is never refused for auth reasons.
        if access == control_plane::api::Access::Member {
            let (s, v) = call(Some(key_a.clone())).await;
            assert!(
                !matches!(
                    s,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
                ),
                "{what}: owner got {s} {v}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, routes.len());
}

async fn shutdown_finishes_requests_and_closes_sessions(b: Backend) {
    let mut app = TestApp::start(b).await;
    let (_, key) = app.org("acme").await;
    let runner = FakeRunner::register(&app, "runner-1", res(8000, 16384, 100_000)).await;
    runner.sync().await;
    let id = running_box(&app, &key, &runner).await;

    // An interactive session that is open when the shutdown starts.
    let mut req = format!(
        "{}/api/boxes/{id}/exec/ws",
        app.url.replace("http://", "ws://")
    )
    .into_client_request()
    .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text(
        serde_json::to_string(&ExecStart::default()).unwrap(),
    ))
    .await
    .unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));

    // A slow request in flight when the shutdown starts.
    runner.state.lock().unwrap().exec_delay = std::time::Duration::from_millis(700);
    let http = app.http.clone();
    let url = format!("{}/api/boxes/{id}/exec", app.url);
    let k = key.clone();
    let slow = tokio::spawn(async move {
        let r = http
            .post(url)
            .bearer_auth(k)
            .json(&json!({ "command": ["sleep"] }))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    });
    // Wait until the runner has the request: it is in flight through the control plane.
    while !runner
        .state
        .lock()
        .unwrap()
        .calls
        .iter()
        .any(|c| c.ends_with("/exec"))
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    app.stop().await;
    let (s, v) = slow.await.unwrap();
    assert_eq!(s, StatusCode::OK, "the in-flight request finished: {v}");
    assert_eq!(v["stdout"], "sleep");
    // The session was told the server is going away.
    let mut code = None;
    while let Some(m) = ws.next().await {
        if let Ok(Message::Close(Some(f))) = m {
            code = Some(u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(1001));
    // Nothing accepts connections any more.
    assert!(
        app.http
            .get(format!("{}/api/health", app.url))
            .send()
            .await
            .is_err()
    );
}

async fn declared_runners_are_registered_at_start(b: Backend) {
    use control_plane::tokens::sha256_hex;
    let hash = |t: &str| sha256_hex(t);
    let declared = std::collections::BTreeMap::from([
        ("runner-1".to_string(), hash("bxr_token-one")),
        ("runner-2".to_string(), hash("bxr_token-two")),
    ]);
    let d = declared.clone();
    let mut first = TestApp::start_with(b, move |c| c.declared_runners = d).await;
    let stored = |app: &TestApp| {
        let pool = app.state.db.pool().clone();
        async move {
            let rows = sqlx::query("SELECT name, token_sha256 FROM runners ORDER BY name")
                .fetch_all(&pool)
                .await
                .unwrap();
            rows.iter()
                .map(|r| {
                    (
                        r.try_get::<String, _>("name").unwrap(),
                        r.try_get::<String, _>("token_sha256").unwrap(),
                    )
                })
                .collect::<std::collections::BTreeMap<_, _>>()
        }
    };
    assert_eq!(stored(&first).await, declared);
    let (s, v) = first.admin(Method::GET, "/api/admin/runners", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    first.stop().await;
    let dir = first.take_dir();

    // Restarted with runner-2's hash changed behind its back: the start
    // succeeds, runner-2 keeps its registered token, runner-3 is added.
    let mut changed = declared.clone();
    changed.insert("runner-2".into(), hash("bxr_other"));
    changed.insert("runner-3".into(), hash("bxr_token-three"));
    let mut cfg = control_plane::Config::new(first.database_url.clone(), first.admin_key.clone());
    cfg.declared_runners = changed;
    let server = control_plane::Server::new(cfg, first.clock.clone())
        .await
        .unwrap();
    let second = TestApp::serve(
        server,
        b,
        first.database_url.clone(),
        first.admin_key.clone(),
        first.clock.clone(),
        dir,
    )
    .await;
    let now = stored(&second).await;
    assert_eq!(now["runner-2"], hash("bxr_token-two"));
    assert_eq!(now["runner-3"], hash("bxr_token-three"));
    assert_eq!(now.len(), 3);
}
