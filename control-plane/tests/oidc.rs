//! OIDC access tokens against a local issuer (discovery document and JWKS
//! served in-process on 127.0.0.1) with RS256 tokens signed here.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use common::*;
use control_plane::config::OidcConfig;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use protocol::{AuthMethod, WhoAmI};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

both_backends!(
    valid_tokens_are_accepted_and_bad_ones_refused,
    unknown_kid_refreshes_the_keys_and_rotation_works,
    issuer_trailing_slash_is_tolerated_both_ways,
    unreachable_issuer_is_a_503_and_keys_still_work,
);

const AUDIENCE: &str = "boxlite-api";
const REALM: &str = "/realms/boxlite";

fn fixture(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Public JWK of fixture key `n` under `kid`.
fn jwk(n: u32, kid: &str) -> Value {
    let mut k: Value =
        serde_json::from_str(&fixture(&format!("oidc-rsa-{n}.public.json"))).unwrap();
    k["kid"] = json!(kid);
    k["alg"] = json!("RS256");
    k["use"] = json!("sig");
    k
}

fn signing_key(n: u32) -> EncodingKey {
    EncodingKey::from_rsa_pem(fixture(&format!("oidc-rsa-{n}.pem")).as_bytes()).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct IssuerState {
    /// `issuer` of the discovery document.
    doc_issuer: Mutex<String>,
    base: String,
    jwks: Mutex<Value>,
    discovery_hits: AtomicUsize,
    jwks_hits: AtomicUsize,
}

/// A local OIDC issuer under `http://127.0.0.1:port/realms/boxlite`.
struct Issuer {
    state: Arc<IssuerState>,
    /// Issuer URL without trailing slash.
    url: String,
    task: JoinHandle<()>,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Issuer {
    async fn start(keys: Vec<Value>) -> Issuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let url = format!("{base}{REALM}");
        let state = Arc::new(IssuerState {
            doc_issuer: Mutex::new(url.clone()),
            base,
            jwks: Mutex::new(json!({ "keys": keys })),
            discovery_hits: AtomicUsize::new(0),
            jwks_hits: AtomicUsize::new(0),
        });
        // Exact paths only: a doubled slash in the discovery URL would be a 404.
        let router = Router::new()
            .route(
                &format!("{REALM}/.well-known/openid-configuration"),
                get(discovery),
            )
            .route(&format!("{REALM}/protocol/openid-connect/certs"), get(jwks))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Issuer { state, url, task }
    }

    fn set_keys(&self, keys: Vec<Value>) {
        *self.state.jwks.lock().unwrap() = json!({ "keys": keys });
    }

    fn jwks_hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }
}

async fn discovery(State(s): State<Arc<IssuerState>>) -> axum::Json<Value> {
    s.discovery_hits.fetch_add(1, Ordering::SeqCst);
    let issuer = s.doc_issuer.lock().unwrap().clone();
    axum::Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{}{REALM}/protocol/openid-connect/certs", s.base),
        "authorization_endpoint": format!("{}{REALM}/auth", s.base),
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}

async fn jwks(State(s): State<Arc<IssuerState>>) -> axum::Json<Value> {
    s.jwks_hits.fetch_add(1, Ordering::SeqCst);
    axum::Json(s.jwks.lock().unwrap().clone())
}

/// Claims of a token for `sub` from `iss`.
fn claims(iss: &str, sub: &str) -> Value {
    json!({ "iss": iss, "aud": AUDIENCE, "sub": sub, "iat": now(), "exp": now() + 300, "email": "alice@example.com" })
}

fn sign(key: u32, kid: &str, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.to_string());
    jsonwebtoken::encode(&h, claims, &signing_key(key)).unwrap()
}

/// The app, configured for `issuer_url`, with org "acme" and user "alice".
async fn app_for(b: Backend, issuer_url: &str) -> TestApp {
    let oidc = OidcConfig {
        issuer: issuer_url.to_string(),
        audience: AUDIENCE.to_string(),
    };
    let app = TestApp::start_with(b, |c| c.oidc = Some(oidc)).await;
    let (org, _) = app.org("acme").await;
    let (s, v) = app
        .admin(
            Method::POST,
            &format!("/api/admin/organizations/{org}/users"),
            Some(json!({ "subject": "alice" })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    app
}

async fn me(app: &TestApp, token: &str) -> (StatusCode, Value) {
    app.call(Method::GET, "/api/me", Some(token), None).await
}

async fn valid_tokens_are_accepted_and_bad_ones_refused(b: Backend) {
    let issuer = Issuer::start(vec![jwk(1, "k1")]).await;
    let app = app_for(b, &issuer.url).await;

    let good = sign(1, "k1", &claims(&issuer.url, "alice"));
    let (s, v) = me(&app, &good).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let who: WhoAmI = serde_json::from_value(v).unwrap();
    assert_eq!(who.auth, AuthMethod::Oidc);
    assert_eq!(who.organization_name, "acme");
    assert!(who.user_id.is_some() && !who.admin);
    // Keys are cached: more requests, no more fetches.
    for _ in 0..3 {
        assert_eq!(me(&app, &good).await.0, StatusCode::OK);
    }
    assert_eq!(issuer.jwks_hits(), 1);
    assert_eq!(issuer.state.discovery_hits.load(Ordering::SeqCst), 1);
    // An OIDC user reaches the user API (placement answers for the org; no runner here).
    let (s, v) = app
        .call(Method::POST, "/api/boxes", Some(&good), Some(json!({})))
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("no_runners_ready"))
    );
    // But not the admin API.
    let (s, _) = app
        .call(Method::GET, "/api/admin/runners", Some(&good), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let refused = |token: String, why: &'static str| {
        let app = &app;
        async move {
            let (s, v) = me(app, &token).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{why}: {v}");
            assert_eq!(v["code"], "unauthorized");
            assert!(v["message"].as_str().unwrap().contains(why), "{why}: {v}");
        }
    };
    refused(
        sign(1, "k1", &claims("https://evil.example.com", "alice")),
        "another issuer",
    )
    .await;
    let mut c = claims(&issuer.url, "alice");
    c["aud"] = json!("someone-else");
    refused(sign(1, "k1", &c), "another audience").await;
    let mut c = claims(&issuer.url, "alice");
    c["exp"] = json!(now() - 3600);
    refused(sign(1, "k1", &c), "expired").await;
    let mut c = claims(&issuer.url, "alice");
    c["nbf"] = json!(now() + 3600);
    refused(sign(1, "k1", &c), "not valid yet").await;
    let mut c = claims(&issuer.url, "alice");
    c.as_object_mut().unwrap().remove("sub");
    refused(sign(1, "k1", &c), "lacks a required claim").await;
    // Signed by another key under k1's name.
    refused(sign(2, "k1", &claims(&issuer.url, "alice")), "signature").await;
    // Symmetric algorithms are never accepted, whatever the key id.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let hs = jsonwebtoken::encode(
        &h,
        &claims(&issuer.url, "alice"),
        &EncodingKey::from_secret(b"secret"),
    )
    .unwrap();
    refused(hs, "algorithm").await;
    // Tampered payload.
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[1] = parts[1].chars().rev().collect();
    refused(parts.join("."), "token").await;

    // A valid token for a subject no organization knows: authenticated, not authorized.
    let (s, v) = me(&app, &sign(1, "k1", &claims(&issuer.url, "mallory"))).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "{v}"
    );
    // None of this refetched the keys (all named k1, which is known).
    assert_eq!(issuer.jwks_hits(), 1);
}

async fn unknown_kid_refreshes_the_keys_and_rotation_works(b: Backend) {
    let issuer = Issuer::start(vec![jwk(1, "k1")]).await;
    let app = app_for(b, &issuer.url).await;
    let t1 = sign(1, "k1", &claims(&issuer.url, "alice"));
    let t2 = sign(2, "k2", &claims(&issuer.url, "alice"));
    assert_eq!(me(&app, &t1).await.0, StatusCode::OK);
    assert_eq!(issuer.jwks_hits(), 1);

    // Unknown kid: refetch once (the issuer still does not have it) and refuse.
    app.advance(11);
    let (s, v) = me(&app, &t2).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        v["message"].as_str().unwrap().contains("unknown key"),
        "{v}"
    );
    assert_eq!(issuer.jwks_hits(), 2);
    // Random kids cannot make us hammer the issuer: no refetch within 10 s.
    for _ in 0..5 {
        assert_eq!(me(&app, &t2).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(issuer.jwks_hits(), 2);

    // The issuer rotates to k2; once the rate limit allows, the new kid triggers a refresh.
    issuer.set_keys(vec![jwk(2, "k2")]);
    assert_eq!(
        me(&app, &t2).await.0,
        StatusCode::UNAUTHORIZED,
        "still rate limited"
    );
    app.advance(11);
    let (s, v) = me(&app, &t2).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(issuer.jwks_hits(), 3);
    // k1 is gone from the set now.
    app.advance(11);
    assert_eq!(me(&app, &t1).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(issuer.jwks_hits(), 4);

    // Both keys published during an overlap: both work after one refresh.
    issuer.set_keys(vec![jwk(1, "k1"), jwk(2, "k2")]);
    app.advance(11);
    assert_eq!(me(&app, &t1).await.0, StatusCode::OK);
    assert_eq!(me(&app, &t2).await.0, StatusCode::OK);
    assert_eq!(issuer.jwks_hits(), 5);

    // After max age the set is refetched even for known kids.
    app.advance(3601);
    assert_eq!(me(&app, &t2).await.0, StatusCode::OK);
    assert_eq!(issuer.jwks_hits(), 6);
}

async fn issuer_trailing_slash_is_tolerated_both_ways(b: Backend) {
    // Configured with a trailing slash; the issuer's own documents and tokens have none.
    let issuer = Issuer::start(vec![jwk(1, "k1")]).await;
    let app = app_for(b, &format!("{}/", issuer.url)).await;
    let (s, v) = me(&app, &sign(1, "k1", &claims(&issuer.url, "alice"))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = me(
        &app,
        &sign(1, "k1", &claims(&format!("{}/", issuer.url), "alice")),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        issuer.state.discovery_hits.load(Ordering::SeqCst),
        1,
        "discovery found without a doubled slash"
    );

    // Configured without; the issuer says it has one (Auth0 style).
    let issuer2 = Issuer::start(vec![jwk(2, "k2")]).await;
    *issuer2.state.doc_issuer.lock().unwrap() = format!("{}/", issuer2.url);
    let app2 = app_for(b, &issuer2.url).await;
    let (s, v) = me(
        &app2,
        &sign(2, "k2", &claims(&format!("{}/", issuer2.url), "alice")),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // A discovery document naming another issuer is not trusted.
    let issuer3 = Issuer::start(vec![jwk(1, "k1")]).await;
    *issuer3.state.doc_issuer.lock().unwrap() = "https://elsewhere.example.com".into();
    let app3 = app_for(b, &issuer3.url).await;
    let (s, v) = me(&app3, &sign(1, "k1", &claims(&issuer3.url, "alice"))).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("oidc_unavailable")),
        "{v}"
    );
}

async fn unreachable_issuer_is_a_503_and_keys_still_work(b: Backend) {
    let url = format!("http://127.0.0.1:{}{REALM}", testkit::free_port());
    let app = app_for(b, &url).await;
    let (s, v) = me(&app, &sign(1, "k1", &claims(&url, "alice"))).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("oidc_unavailable")),
        "{v}"
    );
    // API keys do not depend on the issuer.
    let (s, _) = app.admin(Method::GET, "/api/me", None).await;
    assert_eq!(s, StatusCode::OK);

    // Cached keys keep working when the issuer goes away.
    let issuer = Issuer::start(vec![jwk(1, "k1")]).await;
    let app = app_for(b, &issuer.url).await;
    let token = sign(1, "k1", &claims(&issuer.url, "alice"));
    assert_eq!(me(&app, &token).await.0, StatusCode::OK);
    let hits = issuer.jwks_hits();
    drop(issuer);
    tokio::time::sleep(Duration::from_millis(50)).await;
    app.advance(3601);
    let (s, v) = me(&app, &token).await;
    assert_eq!(
        s,
        StatusCode::OK,
        "stale keys are still used when the refresh fails: {v}"
    );
    assert!(hits >= 1);
}
