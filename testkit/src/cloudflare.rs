//! A stateful emulator of the DNS part of the Cloudflare v4 API, for tests.
//!
//! [`CloudflareEmulator::start`] serves `http://127.0.0.1:PORT/client/v4/`
//! from its own thread and tokio runtime, so sync and async tests use it
//! alike; dropping it stops the server. Tests seed it with tokens, zones and
//! records, point a client at [`CloudflareEmulator::base_url`], and read back
//! the records and the log of requests.
//!
//! # Endpoints
//!
//! All under `/client/v4`, every answer in Cloudflare's envelope
//! `{"success", "errors": [{"code", "message"}], "messages", "result"}`
//! (plus `result_info` on lists):
//!
//! - `GET /user/tokens/verify` → `{"id", "status": "active"}`.
//! - `GET /zones` (filters `name` with the documented operators
//!   `equal:`, `not_equal:`, `starts_with:`, `ends_with:`, `contains:` and
//!   their `*_case_sensitive` forms, `account.id`, `account.name`, `status`,
//!   `match`, `order`, `direction`, `page`, `per_page` (default 20, max 50)).
//! - `GET /zones/{zone_id}`: a zone as the `cloudflare` crate 0.14's `Zone`
//!   decodes it (Free plan, status `active`, type `full`).
//! - `GET|POST /zones/{zone_id}/dns_records` and
//!   `GET|PUT|PATCH|DELETE /zones/{zone_id}/dns_records/{id}`. Listing takes
//!   `type`, `name` / `name.exact|contains|startswith|endswith`, `content` /
//!   `content.*`, `comment` / `comment.exact|contains|startswith|endswith|present|absent`,
//!   `tag.exact|contains|startswith|endswith|present|absent` with `tag_match`,
//!   `proxied`, `search`, `match` (`all`/`any`), `order`
//!   (`type|name|content|ttl|proxied`), `direction`, `page` and `per_page`
//!   (default 100, max 5,000,000, or the cap set by
//!   [`CloudflareEmulator::set_page_size_cap`]). String filters are
//!   case-insensitive, as documented, and `name` filters compare with the
//!   fully-qualified name. Without `order` records come in creation order
//!   (the real default order is not documented).
//!
//! Records are returned as the current API documents them (the OpenAPI
//! schema behind `developers.cloudflare.com/api/resources/dns/subresources/records`):
//! `id`, `name` (fully qualified, lowercase, no trailing dot), `type`,
//! `content`, `proxiable`, `proxied`, `ttl` (1 = automatic), `settings`,
//! `meta`, `comment` (null when absent), `tags`, `created_on`, `modified_on`
//! (RFC 3339 with microseconds), `comment_modified_on` / `tags_modified_on`
//! when there is a comment / tags, `priority` for MX, SRV and URI, and `data`
//! for the structured types (CAA, SRV, ...; CAA and SRV `content` is derived
//! from `data` as the API does). `zone_id`, `zone_name` and `locked` are not
//! returned: Cloudflare removed them from the schema in 2024.
//!
//! A record name is expanded as the API does: `@` is the apex, a name that is
//! neither the zone nor under it is taken as relative and gets the zone name
//! appended (`api` → `api.example.com`; `www.other.org` in zone
//! `example.com` → `www.other.org.example.com`, which is how the real API
//! files a record sent to the wrong zone). Proxied records get TTL 1, as the
//! API forces "Auto" on them.
//!
//! # Authentication
//!
//! Only `Authorization: Bearer <token>` for a token given to
//! [`CloudflareEmulator::add_token`] is accepted; such a token may do
//! everything. Failures, as the live API answers them (observed answers
//! quoted in public issue trackers; the docs do not list them):
//!
//! | case | HTTP | errors |
//! |---|---|---|
//! | no `Authorization`, `X-Auth-Key` or `X-Auth-Email` | 400 | 9106 "Missing X-Auth-Key, X-Auth-Email or Authorization headers" |
//! | `Authorization` not `Bearer <token>` (or odd characters) | 400 | 6003 "Invalid request headers", `error_chain` 6111 "Invalid format for Authorization header" |
//! | `X-Auth-Key`/`X-Auth-Email` (Global API key; none is valid here) | 403 | 9103 "Unknown X-Auth-Key or X-Auth-Email" (or 6003/6103 for a malformed key) |
//! | unknown token on `/user/tokens/verify` | 401 | 1000 "Invalid API Token" |
//! | unknown token on `/zones` and `/zones/{id}` | 403 | 9109 "Invalid access token" |
//! | unknown token on anything under a zone (`dns_records`) | 403 | 10000 "Authentication error" (one live answer seen was 401; treat 401 and 403 alike) |
//!
//! # Errors
//!
//! | case | HTTP | errors |
//! |---|---|---|
//! | route does not exist | 404 | 7000 "No route for that URI" |
//! | method not served on a route | 405 | 7001 "Method not allowed" (emulator choice) |
//! | zone or record id not 32 hex digits | 400 | 7003 "Could not route to /client/v4/zones/…, perhaps your object identifier is invalid?" |
//! | unknown zone id | 404 | 7003 (same message) |
//! | unknown record id | 404 | 81044 "Record does not exist." |
//! | body not a JSON object, or a field of the wrong JSON type | 400 | 9207 "Request body is invalid." |
//! | unknown record type | 400 | 1004 "DNS Validation Error" › 9020 "Invalid DNS record type" (chain code unverified) |
//! | empty or malformed name | 400 | 1004 › 9000 "DNS name is invalid." |
//! | A content not an IPv4 address | 400 | 9005 "Content for A record must be a valid IPv4 address." |
//! | AAAA content not an IPv6 address | 400 | 9006 "Content for AAAA record must be a valid IPv6 address." |
//! | CNAME content not a hostname | 400 | 1004 › 9007 "Content for CNAME record is invalid." |
//! | other hostname content (MX, NS, PTR) invalid, or missing content | 400 | 1004 › 1008 "Content for {type} record is invalid." (legacy code) |
//! | CAA/SRV `data` missing or invalid | 400 | 1004 › 1065 "Invalid or missing data for {type} record" (legacy code) |
//! | priority outside 0..=65535 | 400 | 1004 › 1024 (legacy code) |
//! | TTL not 1 and not 60..=86400 (non-Enterprise) | 400 | 1004 › 9021 "TTL must be between 60 and 86400 seconds, or 1 for Automatic." |
//! | `proxied` on a type that cannot be proxied (not A/AAAA/CNAME) | 400 | 1004 › 9004 "This record type cannot be proxied." |
//! | `proxied` on a non-public address | 400 | 9003 "Target {ip} is not allowed for a proxied record." |
//! | comment over 100 characters (Free plan) | 400 | 9313 "DNS record comment exceeds the maximum length of 100 characters." |
//! | CNAME where an A, AAAA or CNAME of that name exists | 400 | 81053 "An A, AAAA, or CNAME record with that host already exists." |
//! | A or AAAA where a CNAME of that name exists | 400 | 81054 "A CNAME record with that host already exists." |
//! | same type, name and content (and priority) as another record | 400 | 81058 "An identical record already exists." |
//! | `page` / `per_page` / `proxied` / `order` / `direction` / `match` query value invalid | 400 | 1003 (emulator choice, after the legacy per_page code) |
//!
//! The CNAME rules are the documented ones
//! (`developers.cloudflare.com/dns/manage-dns-records/troubleshooting/records-with-same-name/`):
//! a CNAME conflicts with A, AAAA and CNAME records of its name only;
//! Cloudflare lets TXT, MX, CAA… share a name with a CNAME. A duplicate CNAME
//! answers 81053 (the conflict is checked first, as the live API does).
//! Identical records answered 81057 "Record already exists." until about 2024;
//! the API now answers 81058, which is what this emulator does.
//!
//! Note for clients built on the `cloudflare` crate 0.14: its `ResponseInfo`
//! holds the error code in a `u16`, so an error answer carrying a code above
//! 65535 (81044, 81053, 81054, 81058) does not decode and the crate reports
//! the HTTP status with an empty error list.
//!
//! Not emulated: accounts, tags/comment limits of paid plans, batch
//! (`/dns_records/batch`), import/export, NS-record exclusivity, Punycode
//! conversion of Unicode names (they are rejected with 9000), rate limits.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Body;
use axum::extract::{Query, Request as HttpRequest, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value, json};

/// Default and largest `per_page` of `GET /zones`.
const ZONES_PER_PAGE: (usize, usize) = (20, 50);
/// Default and largest `per_page` of `GET /zones/{id}/dns_records`.
const RECORDS_PER_PAGE: (usize, usize) = (100, 5_000_000);
/// Longest record comment on the Free plan.
const COMMENT_MAX: usize = 100;
/// Record types the API knows (its `type` enum).
const RECORD_TYPES: &[&str] = &[
    "A",
    "AAAA",
    "CAA",
    "CERT",
    "CNAME",
    "DNSKEY",
    "DS",
    "HTTPS",
    "LOC",
    "MX",
    "NAPTR",
    "NS",
    "OPENPGPKEY",
    "PTR",
    "SMIMEA",
    "SRV",
    "SSHFP",
    "SVCB",
    "TLSA",
    "TXT",
    "URI",
];

/// One request the emulator received, in arrival order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// HTTP method, e.g. `"GET"`.
    pub method: String,
    /// URL path, e.g. `"/client/v4/zones"`.
    pub path: String,
    /// Raw query string without the `?` (empty when there is none).
    pub query: String,
    /// Whether it carried a valid API token.
    pub authorized: bool,
}

/// A running Cloudflare API emulator; the server stops when it is dropped.
pub struct CloudflareEmulator {
    base_url: String,
    state: Arc<Mutex<Inner>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CloudflareEmulator {
    /// Start serving on a free port of 127.0.0.1, from a background thread
    /// with its own tokio runtime.
    pub fn start() -> CloudflareEmulator {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for the emulator");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("local addr").port();
        let state = Arc::new(Mutex::new(Inner::new()));
        let served = state.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cloudflare-emulator".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("emulator runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let app = axum::Router::new().fallback(serve).with_state(served);
                    // Stop at once on drop, even with keep-alive connections
                    // open: dropping the runtime ends their tasks.
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .expect("spawn the emulator thread");
        CloudflareEmulator {
            base_url: format!("http://127.0.0.1:{port}/client/v4/"),
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// The API base URL, `http://127.0.0.1:PORT/client/v4/` (with the
    /// trailing slash the `cloudflare` crate's `Environment::Custom` needs).
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Accept `token` as a valid API token with every permission.
    pub fn add_token(&self, token: &str) {
        let mut s = self.lock();
        let id = new_id();
        s.tokens.insert(token.to_string(), id);
    }

    /// Add an active zone named `name` (lowercased) in account `account_id`;
    /// returns its id (32 lowercase hex digits).
    pub fn add_zone(&self, name: &str, account_id: &str) -> String {
        let mut s = self.lock();
        let id = new_id();
        let now = now();
        s.zones.push(Zone {
            id: id.clone(),
            name: name.trim().trim_end_matches('.').to_ascii_lowercase(),
            account_id: account_id.to_string(),
            account_name: format!("Account {account_id}"),
            created_on: now,
        });
        id
    }

    /// The records of zone `zone_id` in creation order, as the API returns
    /// them (empty for an unknown zone).
    pub fn records(&self, zone_id: &str) -> Vec<Value> {
        let s = self.lock();
        s.records
            .iter()
            .filter(|r| r.zone_id == zone_id)
            .map(Record::to_json)
            .collect()
    }

    /// Put a record straight into zone `zone_id`, as if someone else had
    /// created it: `record` is the JSON body of a create (`type`, `name`,
    /// `content` or `data`, and optionally `ttl`, `proxied`, `comment`,
    /// `tags`, `settings`, `priority`, and an `id` of 32 hex digits). It is
    /// validated like a create but not checked against existing records.
    /// Fills the id and timestamps; returns the id.
    ///
    /// Panics on an unknown zone or an invalid record (a test setup error).
    pub fn insert_record(&self, zone_id: &str, record: Value) -> String {
        let mut s = self.lock();
        let zone_name = match s.zone(zone_id) {
            Some(z) => z.name.clone(),
            None => panic!("insert_record: no zone {zone_id}"),
        };
        let Some(body) = record.as_object() else {
            panic!("insert_record: a record is a JSON object, got {record}");
        };
        let now = now();
        let id = match body.get("id").and_then(Value::as_str) {
            Some(id) if s.records.iter().any(|r| r.id.eq_ignore_ascii_case(id)) => {
                panic!("insert_record: a record with id {id} exists already")
            }
            Some(id) if is_identifier(id) => id.to_ascii_lowercase(),
            Some(id) => panic!("insert_record: id {id:?} is not 32 hex digits"),
            None => new_id(),
        };
        let mut rec = Record::blank(id.clone(), zone_id.to_string(), &now);
        let mut fields = Fields::default();
        if let Err(e) = fields.read(body) {
            panic!("insert_record: {}", e.summary());
        }
        fields.apply(&mut rec);
        if let Err(e) = finalize(&mut rec, &zone_name) {
            panic!("insert_record: {}", e.summary());
        }
        rec.seq = s.next_seq();
        stamp_new(&mut rec, &now);
        s.records.push(rec);
        id
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Forget the requests received so far.
    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// Lower the largest `per_page` the lists accept (at least 1), so tests
    /// can force pagination; larger requested pages are clamped to it.
    pub fn set_page_size_cap(&self, n: usize) {
        self.lock().page_cap = n.max(1);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for CloudflareEmulator {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// State

struct Zone {
    id: String,
    name: String,
    account_id: String,
    account_name: String,
    created_on: String,
}

impl Zone {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "status": "active",
            "paused": false,
            "type": "full",
            "development_mode": 0,
            "name_servers": ["ada.ns.cloudflare.com", "bob.ns.cloudflare.com"],
            "original_name_servers": null,
            "original_registrar": null,
            "original_dnshost": null,
            "vanity_name_servers": [],
            "created_on": self.created_on,
            "modified_on": self.created_on,
            "activated_on": self.created_on,
            "meta": {
                "step": 2,
                "custom_certificate_quota": 0,
                "page_rule_quota": 3,
                "phishing_detected": false,
                "cdn_only": false,
                "dns_only": false,
                "foundation_dns": false,
            },
            "owner": {"id": null, "type": "user", "email": null},
            "account": {"id": self.account_id, "name": self.account_name},
            "tenant": {"id": null, "name": null},
            "tenant_unit": {"id": null},
            "permissions": ["#dns_records:edit", "#dns_records:read", "#zone:read"],
            "plan": {
                "id": "0feeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
                "name": "Free Website",
                "price": 0,
                "currency": "USD",
                "frequency": "",
                "is_subscribed": true,
                "can_subscribe": false,
                "legacy_id": "free",
                "legacy_discount": false,
                "externally_managed": false,
            },
        })
    }
}

#[derive(Clone, Debug)]
struct Record {
    id: String,
    zone_id: String,
    /// Creation order.
    seq: u64,
    /// As sent until `finalize`, then fully qualified.
    name: String,
    rtype: String,
    content: String,
    data: Option<Map<String, Value>>,
    priority: Option<u64>,
    proxied: bool,
    ttl: u64,
    comment: Option<String>,
    tags: Vec<String>,
    settings: Map<String, Value>,
    created_on: String,
    modified_on: String,
    comment_modified_on: Option<String>,
    tags_modified_on: Option<String>,
}

impl Record {
    fn blank(id: String, zone_id: String, now: &str) -> Record {
        Record {
            id,
            zone_id,
            seq: 0,
            name: String::new(),
            rtype: String::new(),
            content: String::new(),
            data: None,
            priority: None,
            proxied: false,
            ttl: 1,
            comment: None,
            tags: Vec::new(),
            settings: Map::new(),
            created_on: now.to_string(),
            modified_on: now.to_string(),
            comment_modified_on: None,
            tags_modified_on: None,
        }
    }

    fn proxiable(&self) -> bool {
        match self.rtype.as_str() {
            "A" | "AAAA" => self
                .content
                .parse::<IpAddr>()
                .map(is_public)
                .unwrap_or(false),
            "CNAME" => true,
            _ => false,
        }
    }

    fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("id".into(), json!(self.id));
        o.insert("name".into(), json!(self.name));
        o.insert("type".into(), json!(self.rtype));
        o.insert("content".into(), json!(self.content));
        o.insert("proxiable".into(), json!(self.proxiable()));
        o.insert("proxied".into(), json!(self.proxied));
        o.insert("ttl".into(), json!(self.ttl));
        if let Some(p) = self.priority {
            o.insert("priority".into(), json!(p));
        }
        if let Some(d) = &self.data {
            o.insert("data".into(), Value::Object(d.clone()));
        }
        o.insert("settings".into(), Value::Object(self.settings.clone()));
        o.insert("meta".into(), json!({}));
        o.insert("comment".into(), json!(self.comment));
        o.insert("tags".into(), json!(self.tags));
        o.insert("created_on".into(), json!(self.created_on));
        o.insert("modified_on".into(), json!(self.modified_on));
        if let Some(t) = &self.comment_modified_on {
            o.insert("comment_modified_on".into(), json!(t));
        }
        if let Some(t) = &self.tags_modified_on {
            o.insert("tags_modified_on".into(), json!(t));
        }
        Value::Object(o)
    }

    /// What makes two records "identical" for the API: type, name, content
    /// (case-insensitive but for TXT), priority and data.
    fn identity(&self) -> (String, String, String, Option<u64>, Option<String>) {
        let content = if self.rtype == "TXT" {
            self.content.clone()
        } else {
            self.content.to_ascii_lowercase()
        };
        let data = self
            .data
            .as_ref()
            .map(|d| Value::Object(d.clone()).to_string());
        (
            self.rtype.clone(),
            self.name.clone(),
            content,
            self.priority,
            data,
        )
    }
}

struct Inner {
    /// Token → token id.
    tokens: HashMap<String, String>,
    zones: Vec<Zone>,
    records: Vec<Record>,
    requests: Vec<Request>,
    page_cap: usize,
    seq: u64,
}

impl Inner {
    fn new() -> Inner {
        Inner {
            tokens: HashMap::new(),
            zones: Vec::new(),
            records: Vec::new(),
            requests: Vec::new(),
            page_cap: usize::MAX,
            seq: 0,
        }
    }

    fn zone(&self, id: &str) -> Option<&Zone> {
        self.zones.iter().find(|z| z.id == id)
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

// ---------------------------------------------------------------------------
// Errors

/// An error answer: HTTP status and the `errors` array.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    errors: Vec<Value>,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            errors: vec![json!({"code": code, "message": message.into()})],
        }
    }

    fn chained(
        status: StatusCode,
        code: u32,
        message: &str,
        chain_code: u32,
        chain_message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            errors: vec![json!({
                "code": code,
                "message": message,
                "error_chain": [{"code": chain_code, "message": chain_message.into()}],
            })],
        }
    }

    fn bad(code: u32, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// `1004 DNS Validation Error` wrapping the actual reason.
    fn validation(code: u32, message: impl Into<String>) -> ApiError {
        ApiError::chained(
            StatusCode::BAD_REQUEST,
            1004,
            "DNS Validation Error",
            code,
            message,
        )
    }

    fn body_invalid() -> ApiError {
        ApiError::bad(9207, "Request body is invalid.")
    }

    fn bad_query(name: &str, value: &str) -> ApiError {
        ApiError::bad(
            1003,
            format!("Invalid value for the query parameter {name}: {value:?}"),
        )
    }

    fn no_route() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, 7000, "No route for that URI")
    }

    fn not_routed(status: StatusCode, path: &str) -> ApiError {
        ApiError::new(
            status,
            7003,
            format!("Could not route to {path}, perhaps your object identifier is invalid?"),
        )
    }

    fn summary(&self) -> String {
        self.errors
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

type Answer = Result<(Value, Option<Value>), ApiError>;

/// The status and body of an answer (200 for a success).
fn envelope(answer: Answer) -> (StatusCode, Value) {
    match answer {
        Ok((result, info)) => {
            let mut body = json!({
                "success": true,
                "errors": [],
                "messages": [],
                "result": result,
            });
            if let Some(info) = info {
                body["result_info"] = info;
            }
            (StatusCode::OK, body)
        }
        Err(e) => (
            e.status,
            json!({
                "success": false,
                "errors": e.errors,
                "messages": [],
                "result": null,
            }),
        ),
    }
}

// ---------------------------------------------------------------------------
// HTTP

async fn serve(State(state): State<Arc<Mutex<Inner>>>, req: HttpRequest) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let query = match Query::<Vec<(String, String)>>::try_from_uri(&parts.uri) {
        Ok(Query(q)) => Ok(q),
        Err(_) => Err(()),
    };
    let (status, json) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        dispatch(
            &mut s,
            &parts.method,
            parts.uri.path(),
            parts.uri.query().unwrap_or(""),
            query,
            &parts.headers,
            &body,
        )
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json.to_string()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// Which flavour of "unknown token" answer a path gets.
enum AuthScope {
    Verify,
    Account,
    Zone,
}

fn auth_scope(segments: &[&str]) -> AuthScope {
    match segments {
        ["user", "tokens", "verify"] => AuthScope::Verify,
        ["zones"] | ["zones", _] => AuthScope::Account,
        _ => AuthScope::Zone,
    }
}

/// The token id of a valid bearer token, or the error to answer.
fn authenticate(
    s: &Inner,
    headers: &HeaderMap,
    scope: &AuthScope,
) -> Result<(String, String), ApiError> {
    let Some(auth) = headers.get(header::AUTHORIZATION) else {
        if let Some(key) = headers.get("x-auth-key") {
            let key = key.to_str().unwrap_or("");
            let well_formed = key.len() == 37 && key.bytes().all(|b| b.is_ascii_hexdigit());
            if !well_formed {
                return Err(ApiError::chained(
                    StatusCode::BAD_REQUEST,
                    6003,
                    "Invalid request headers",
                    6103,
                    "Invalid format for X-Auth-Key header",
                ));
            }
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                9103,
                "Unknown X-Auth-Key or X-Auth-Email",
            ));
        }
        if headers.contains_key("x-auth-email") {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                9103,
                "Unknown X-Auth-Key or X-Auth-Email",
            ));
        }
        return Err(ApiError::bad(
            9106,
            "Missing X-Auth-Key, X-Auth-Email or Authorization headers",
        ));
    };
    let malformed = || {
        ApiError::chained(
            StatusCode::BAD_REQUEST,
            6003,
            "Invalid request headers",
            6111,
            "Invalid format for Authorization header",
        )
    };
    let auth = auth.to_str().map_err(|_| malformed())?;
    let token = auth.strip_prefix("Bearer ").ok_or_else(malformed)?;
    let token_chars = |c: char| c.is_ascii_alphanumeric() || "-_.~+/=".contains(c);
    if token.is_empty() || !token.chars().all(token_chars) {
        return Err(malformed());
    }
    match s.tokens.get(token) {
        Some(id) => Ok((token.to_string(), id.clone())),
        None => Err(match scope {
            AuthScope::Verify => ApiError::new(StatusCode::UNAUTHORIZED, 1000, "Invalid API Token"),
            AuthScope::Account => {
                ApiError::new(StatusCode::FORBIDDEN, 9109, "Invalid access token")
            }
            AuthScope::Zone => ApiError::new(StatusCode::FORBIDDEN, 10000, "Authentication error"),
        }),
    }
}

fn dispatch(
    s: &mut Inner,
    method: &Method,
    path: &str,
    raw_query: &str,
    query: Result<Vec<(String, String)>, ()>,
    headers: &HeaderMap,
    body: &[u8],
) -> (StatusCode, Value) {
    let rest = path
        .strip_prefix("/client/v4/")
        .or_else(|| if path == "/client/v4" { Some("") } else { None });
    let segments: Vec<&str> = match rest {
        Some(r) => r.strip_suffix('/').unwrap_or(r).split('/').collect(),
        None => Vec::new(),
    };
    let scope = auth_scope(&segments);
    let auth = authenticate(s, headers, &scope);
    s.requests.push(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: raw_query.to_string(),
        authorized: auth.is_ok(),
    });
    let (_, token_id) = match auth {
        Ok(t) => t,
        Err(e) => return envelope(Err(e)),
    };
    if rest.is_none() {
        return envelope(Err(ApiError::no_route()));
    }
    let Ok(query) = query else {
        return envelope(Err(ApiError::bad(1003, "The query string is malformed.")));
    };
    let q = Params::new(query);
    envelope(route(s, method, path, &segments, &q, body, &token_id))
}

fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, 7001, "Method not allowed")
}

fn route(
    s: &mut Inner,
    method: &Method,
    path: &str,
    segments: &[&str],
    q: &Params,
    body: &[u8],
    token_id: &str,
) -> Answer {
    match segments {
        ["user", "tokens", "verify"] => {
            if method != Method::GET {
                return Err(method_not_allowed());
            }
            Ok((json!({"id": token_id, "status": "active"}), None))
        }
        ["zones"] => {
            if method != Method::GET {
                return Err(method_not_allowed());
            }
            list_zones(s, q)
        }
        ["zones", zone_id, tail @ ..] => {
            let zone_id = resolve_zone(s, zone_id, path)?;
            match tail {
                [] => {
                    if method != Method::GET {
                        return Err(method_not_allowed());
                    }
                    let zone = s.zone(&zone_id).map(Zone::to_json);
                    Ok((zone.unwrap_or(Value::Null), None))
                }
                ["dns_records"] => match *method {
                    Method::GET => list_records(s, &zone_id, q),
                    Method::POST => create_record(s, &zone_id, body),
                    _ => Err(method_not_allowed()),
                },
                ["dns_records", record_id] => {
                    if !is_identifier(record_id) {
                        return Err(ApiError::not_routed(StatusCode::BAD_REQUEST, path));
                    }
                    let record_id = record_id.to_ascii_lowercase();
                    match *method {
                        Method::GET => get_record(s, &zone_id, &record_id),
                        Method::PUT => update_record(s, &zone_id, &record_id, body, true),
                        Method::PATCH => update_record(s, &zone_id, &record_id, body, false),
                        Method::DELETE => delete_record(s, &zone_id, &record_id),
                        _ => Err(method_not_allowed()),
                    }
                }
                _ => Err(ApiError::no_route()),
            }
        }
        _ => Err(ApiError::no_route()),
    }
}

/// The id of an existing zone, or 7003 (400 for a malformed id, 404 for an
/// unknown one).
fn resolve_zone(s: &Inner, zone_id: &str, path: &str) -> Result<String, ApiError> {
    if !is_identifier(zone_id) {
        return Err(ApiError::not_routed(StatusCode::BAD_REQUEST, path));
    }
    let zone_id = zone_id.to_ascii_lowercase();
    if s.zone(&zone_id).is_none() {
        return Err(ApiError::not_routed(StatusCode::NOT_FOUND, path));
    }
    Ok(zone_id)
}

// ---------------------------------------------------------------------------
// Query parameters

struct Params {
    values: HashMap<String, String>,
}

impl Params {
    fn new(pairs: Vec<(String, String)>) -> Params {
        Params {
            values: pairs.into_iter().collect(),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    fn positive(&self, name: &str) -> Result<Option<usize>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Some(n)),
                _ => Err(ApiError::bad_query(name, v)),
            },
        }
    }

    /// `page` and `per_page` (clamped to `1..=max`, `max` lowered by the cap).
    fn paging(&self, default: usize, max: usize, cap: usize) -> Result<(usize, usize), ApiError> {
        let page = self.positive("page")?.unwrap_or(1);
        let max = max.min(cap).max(1);
        let per_page = self.positive("per_page")?.unwrap_or(default).min(max);
        Ok((page, per_page))
    }

    /// `match`: true for `all` (the default), false for `any`.
    fn match_all(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None | Some("all") => Ok(true),
            Some("any") => Ok(false),
            Some(v) => Err(ApiError::bad_query(name, v)),
        }
    }

    /// `direction`: true for `desc`.
    fn descending(&self) -> Result<bool, ApiError> {
        match self.get("direction") {
            None | Some("asc") => Ok(false),
            Some("desc") => Ok(true),
            Some(v) => Err(ApiError::bad_query("direction", v)),
        }
    }
}

/// One page of `items` and its `result_info`.
fn paginate(items: Vec<Value>, page: usize, per_page: usize) -> (Value, Value) {
    let total = items.len();
    let total_pages = total.div_ceil(per_page);
    let start = (page - 1).saturating_mul(per_page);
    let slice: Vec<Value> = items.into_iter().skip(start).take(per_page).collect();
    let info = json!({
        "page": page,
        "per_page": per_page,
        "count": slice.len(),
        "total_count": total,
        "total_pages": total_pages,
    });
    (Value::Array(slice), info)
}

/// A `name`-style filter of the zones list: `operator:value` or a bare value.
fn zone_name_matches(spec: &str, actual: &str) -> bool {
    let (op, value) = match spec.split_once(':') {
        Some((op, v))
            if [
                "equal",
                "not_equal",
                "starts_with",
                "ends_with",
                "contains",
                "starts_with_case_sensitive",
                "ends_with_case_sensitive",
                "contains_case_sensitive",
            ]
            .contains(&op) =>
        {
            (op, v)
        }
        _ => ("equal", spec),
    };
    let (a, v) = if op.ends_with("_case_sensitive") {
        (actual.to_string(), value.to_string())
    } else {
        (actual.to_lowercase(), value.to_lowercase())
    };
    match op {
        "equal" => a == v,
        "not_equal" => a != v,
        "starts_with" | "starts_with_case_sensitive" => a.starts_with(&v),
        "ends_with" | "ends_with_case_sensitive" => a.ends_with(&v),
        _ => a.contains(&v),
    }
}

fn list_zones(s: &Inner, q: &Params) -> Answer {
    let all = q.match_all("match")?;
    let desc = q.descending()?;
    let order = q.get("order");
    if let Some(o) = order
        && !["name", "status", "account.id", "account.name"].contains(&o)
    {
        return Err(ApiError::bad_query("order", o));
    }
    let (page, per_page) = q.paging(ZONES_PER_PAGE.0, ZONES_PER_PAGE.1, s.page_cap)?;
    let mut zones: Vec<&Zone> = s
        .zones
        .iter()
        .filter(|z| {
            let mut tests = Vec::new();
            if let Some(n) = q.get("name") {
                tests.push(zone_name_matches(n, &z.name));
            }
            if let Some(id) = q.get("account.id") {
                tests.push(z.account_id == id);
            }
            if let Some(n) = q.get("account.name") {
                tests.push(zone_name_matches(n, &z.account_name));
            }
            if let Some(st) = q.get("status") {
                tests.push(st == "active");
            }
            tests.is_empty()
                || if all {
                    tests.iter().all(|t| *t)
                } else {
                    tests.iter().any(|t| *t)
                }
        })
        .collect();
    if let Some(o) = order {
        zones.sort_by(|a, b| {
            let key = |z: &Zone| match o {
                "name" => z.name.clone(),
                "account.id" => z.account_id.clone(),
                "account.name" => z.account_name.clone(),
                _ => "active".to_string(),
            };
            key(a).cmp(&key(b))
        });
    }
    if desc {
        zones.reverse();
    }
    let items = zones.into_iter().map(Zone::to_json).collect();
    let (result, info) = paginate(items, page, per_page);
    Ok((result, Some(info)))
}

/// A case-insensitive string filter family (`exact`, `contains`, ...).
fn text_matches(op: &str, value: &str, actual: &str) -> bool {
    let a = actual.to_lowercase();
    let v = value.to_lowercase();
    match op {
        "exact" => a == v,
        "contains" => a.contains(&v),
        "startswith" => a.starts_with(&v),
        "endswith" => a.ends_with(&v),
        _ => false,
    }
}

type Predicate<'a> = Box<dyn Fn(&Record) -> bool + 'a>;

fn list_records(s: &Inner, zone_id: &str, q: &Params) -> Answer {
    let all = q.match_all("match")?;
    let tags_all = q.match_all("tag_match")?;
    let desc = q.descending()?;
    let order = q.get("order");
    if let Some(o) = order
        && !["type", "name", "content", "ttl", "proxied"].contains(&o)
    {
        return Err(ApiError::bad_query("order", o));
    }
    let (page, per_page) = q.paging(RECORDS_PER_PAGE.0, RECORDS_PER_PAGE.1, s.page_cap)?;

    let mut tests: Vec<Predicate> = Vec::new();
    let mut tag_tests: Vec<Predicate> = Vec::new();
    if let Some(t) = q.get("type") {
        let t = t.to_ascii_uppercase();
        tests.push(Box::new(move |r| r.rtype == t));
    }
    if let Some(p) = q.get("proxied") {
        let p = match p {
            "true" => true,
            "false" => false,
            other => return Err(ApiError::bad_query("proxied", other)),
        };
        tests.push(Box::new(move |r| r.proxied == p));
    }
    for (key, value) in &q.values {
        let (field, op) = match key.split_once('.') {
            Some((f, op)) => (f, op),
            None => (key.as_str(), "exact"),
        };
        let value = value.as_str();
        match field {
            "name" | "content" => {
                if !["exact", "contains", "startswith", "endswith"].contains(&op) {
                    continue;
                }
                let is_name = field == "name";
                tests.push(Box::new(move |r| {
                    let actual = if is_name { &r.name } else { &r.content };
                    text_matches(op, value, actual)
                }));
            }
            "comment" => match op {
                "present" => tests.push(Box::new(|r| r.comment.is_some())),
                "absent" => tests.push(Box::new(|r| r.comment.is_none())),
                "exact" | "contains" | "startswith" | "endswith" => {
                    tests.push(Box::new(move |r| {
                        r.comment
                            .as_deref()
                            .is_some_and(|c| text_matches(op, value, c))
                    }));
                }
                _ => {}
            },
            "tag" if key.contains('.') => match op {
                "present" => tag_tests.push(Box::new(move |r| {
                    r.tags
                        .iter()
                        .any(|t| tag_name(t).eq_ignore_ascii_case(value))
                })),
                "absent" => tag_tests.push(Box::new(move |r| {
                    !r.tags
                        .iter()
                        .any(|t| tag_name(t).eq_ignore_ascii_case(value))
                })),
                "exact" | "contains" | "startswith" | "endswith" => {
                    let (want_name, want_value) = value.split_once(':').unwrap_or((value, ""));
                    tag_tests.push(Box::new(move |r| {
                        r.tags.iter().any(|t| {
                            let (n, v) = t.split_once(':').unwrap_or((t, ""));
                            n.eq_ignore_ascii_case(want_name) && text_matches(op, want_value, v)
                        })
                    }));
                }
                _ => {}
            },
            _ => {}
        }
    }
    if !tag_tests.is_empty() {
        tests.push(Box::new(move |r| {
            if tags_all {
                tag_tests.iter().all(|t| t(r))
            } else {
                tag_tests.iter().any(|t| t(r))
            }
        }));
    }
    let search = q.get("search").map(str::to_lowercase);

    let mut records: Vec<&Record> = s
        .records
        .iter()
        .filter(|r| r.zone_id == zone_id)
        .filter(|r| {
            tests.is_empty()
                || if all {
                    tests.iter().all(|t| t(r))
                } else {
                    tests.iter().any(|t| t(r))
                }
        })
        .filter(|r| match &search {
            None => true,
            Some(needle) => {
                r.name.contains(needle.as_str())
                    || r.content.to_lowercase().contains(needle.as_str())
                    || r.comment
                        .as_deref()
                        .is_some_and(|c| c.to_lowercase().contains(needle.as_str()))
                    || r.tags
                        .iter()
                        .any(|t| t.to_lowercase().contains(needle.as_str()))
            }
        })
        .collect();
    records.sort_by_key(|r| r.seq);
    if let Some(o) = order {
        records.sort_by(|a, b| match o {
            "type" => a.rtype.cmp(&b.rtype),
            "name" => a.name.cmp(&b.name),
            "content" => a.content.cmp(&b.content),
            "ttl" => a.ttl.cmp(&b.ttl),
            _ => a.proxied.cmp(&b.proxied),
        });
    }
    if desc {
        records.reverse();
    }
    let items = records.into_iter().map(Record::to_json).collect();
    let (result, info) = paginate(items, page, per_page);
    Ok((result, Some(info)))
}

fn tag_name(tag: &str) -> &str {
    tag.split_once(':').map_or(tag, |(n, _)| n)
}

// ---------------------------------------------------------------------------
// Record changes

/// The fields a request body sets (`None`: not sent).
#[derive(Default)]
struct Fields {
    rtype: Option<String>,
    name: Option<String>,
    content: Option<String>,
    data: Option<Option<Map<String, Value>>>,
    priority: Option<Option<Value>>,
    ttl: Option<Value>,
    proxied: Option<bool>,
    comment: Option<Option<String>>,
    tags: Option<Vec<String>>,
    settings: Option<Map<String, Value>>,
}

impl Fields {
    /// Read a body; a field of the wrong JSON type is 9207.
    fn read(&mut self, body: &Map<String, Value>) -> Result<(), ApiError> {
        let string = |v: &Value| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(ApiError::body_invalid)
        };
        for (key, v) in body {
            match key.as_str() {
                "type" => self.rtype = Some(string(v)?.trim().to_ascii_uppercase()),
                "name" => self.name = Some(string(v)?),
                "content" => self.content = Some(string(v)?),
                "data" => {
                    self.data = Some(match v {
                        Value::Null => None,
                        Value::Object(o) => Some(o.clone()),
                        _ => return Err(ApiError::body_invalid()),
                    })
                }
                "priority" => {
                    self.priority = Some(match v {
                        Value::Null => None,
                        Value::Number(_) => Some(v.clone()),
                        _ => return Err(ApiError::body_invalid()),
                    })
                }
                "ttl" => match v {
                    Value::Number(_) => self.ttl = Some(v.clone()),
                    Value::Null => self.ttl = None,
                    _ => return Err(ApiError::body_invalid()),
                },
                "proxied" => match v {
                    Value::Bool(b) => self.proxied = Some(*b),
                    Value::Null => self.proxied = None,
                    _ => return Err(ApiError::body_invalid()),
                },
                "comment" => {
                    self.comment = Some(match v {
                        Value::Null => None,
                        Value::String(c) if c.is_empty() => None,
                        Value::String(c) => Some(c.clone()),
                        _ => return Err(ApiError::body_invalid()),
                    })
                }
                "tags" => match v {
                    Value::Null => self.tags = Some(Vec::new()),
                    Value::Array(items) => {
                        let tags = items
                            .iter()
                            .map(|t| t.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(ApiError::body_invalid)?;
                        self.tags = Some(tags);
                    }
                    _ => return Err(ApiError::body_invalid()),
                },
                "settings" => match v {
                    Value::Null => self.settings = Some(Map::new()),
                    Value::Object(o) => self.settings = Some(o.clone()),
                    _ => return Err(ApiError::body_invalid()),
                },
                _ => {}
            }
        }
        Ok(())
    }

    /// Write the sent fields onto `rec` (a blank record for a create or a
    /// full overwrite, the stored one for a patch). A TTL that is not an integer is kept as 0, which
    /// `finalize` rejects with the TTL error.
    fn apply(self, rec: &mut Record) {
        if let Some(t) = self.rtype {
            rec.rtype = t;
        }
        if let Some(n) = self.name {
            rec.name = n;
        }
        if let Some(c) = self.content {
            rec.content = c;
        }
        if let Some(d) = self.data {
            rec.data = d;
        }
        if let Some(p) = self.priority {
            rec.priority = p.map(|p| p.as_u64().unwrap_or(u64::MAX));
        }
        if let Some(t) = self.ttl {
            rec.ttl = t.as_u64().unwrap_or(0);
        }
        if let Some(p) = self.proxied {
            rec.proxied = p;
        }
        if let Some(c) = self.comment {
            rec.comment = c;
        }
        if let Some(t) = self.tags {
            rec.tags = t;
        }
        if let Some(s) = self.settings {
            rec.settings = s;
        }
    }
}

fn parse_body(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        _ => Err(ApiError::body_invalid()),
    }
}

/// Expand `raw` to a fully-qualified lowercase name in `zone`, as the API
/// does, or 9000.
fn expand_name(raw: &str, zone: &str) -> Result<String, ApiError> {
    let invalid = || ApiError::validation(9000, "DNS name is invalid.");
    let trimmed = raw.trim();
    let n = trimmed
        .strip_suffix('.')
        .unwrap_or(trimmed)
        .to_ascii_lowercase();
    if n.is_empty() {
        return Err(invalid());
    }
    let fqdn = if n == "@" {
        zone.to_string()
    } else if n == zone || n.ends_with(&format!(".{zone}")) {
        n
    } else {
        format!("{n}.{zone}")
    };
    if fqdn.len() > 253 {
        return Err(invalid());
    }
    for (i, label) in fqdn.split('.').enumerate() {
        let ok = if label == "*" {
            i == 0
        } else {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !ok {
            return Err(invalid());
        }
    }
    Ok(fqdn)
}

/// A hostname (trailing dot dropped), if `s` is one and not an IP address.
fn hostname(s: &str) -> Option<String> {
    let h = s.trim();
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.is_empty() || h.len() > 253 || h.parse::<IpAddr>().is_ok() {
        return None;
    }
    let ok = h.split('.').enumerate().all(|(i, label)| {
        (label == "*" && i == 0)
            || (!label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    });
    ok.then(|| h.to_string())
}

/// An address Cloudflare would proxy to.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.octets()[0] == 0
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64))
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80)
        }
    }
}

fn u64_field(data: &Map<String, Value>, key: &str, max: u64) -> Option<u64> {
    data.get(key).and_then(Value::as_u64).filter(|n| *n <= max)
}

/// Validate and normalise a record about to be stored (name expanded,
/// content canonical, derived fields set).
fn finalize(rec: &mut Record, zone: &str) -> Result<(), ApiError> {
    if !RECORD_TYPES.contains(&rec.rtype.as_str()) {
        return Err(ApiError::validation(9020, "Invalid DNS record type"));
    }
    rec.name = expand_name(&rec.name, zone)?;
    let t = rec.rtype.clone();
    let content_invalid =
        || ApiError::validation(1008, format!("Content for {t} record is invalid."));
    let data_invalid =
        || ApiError::validation(1065, format!("Invalid or missing data for {t} record"));
    match t.as_str() {
        "A" => {
            let ip: Ipv4Addr = rec.content.trim().parse().map_err(|_| {
                ApiError::bad(9005, "Content for A record must be a valid IPv4 address.")
            })?;
            rec.content = ip.to_string();
        }
        "AAAA" => {
            let ip: Ipv6Addr = rec.content.trim().parse().map_err(|_| {
                ApiError::bad(
                    9006,
                    "Content for AAAA record must be a valid IPv6 address.",
                )
            })?;
            rec.content = ip.to_string();
        }
        "CNAME" => {
            rec.content = hostname(&rec.content).ok_or_else(|| {
                ApiError::validation(9007, "Content for CNAME record is invalid.")
            })?;
        }
        "MX" | "NS" | "PTR" => {
            rec.content = hostname(&rec.content).ok_or_else(content_invalid)?;
        }
        "CAA" => {
            let data = rec.data.as_ref().ok_or_else(data_invalid)?;
            let flags = match data.get("flags") {
                None => 0,
                Some(_) => u64_field(data, "flags", 255).ok_or_else(data_invalid)?,
            };
            let tag = data
                .get("tag")
                .and_then(Value::as_str)
                .filter(|t| ["issue", "issuewild", "iodef"].contains(t))
                .ok_or_else(data_invalid)?
                .to_string();
            let value = data
                .get("value")
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
                .ok_or_else(data_invalid)?
                .to_string();
            rec.content = format!("{flags} {tag} \"{value}\"");
            rec.data = Some(
                json!({"flags": flags, "tag": tag, "value": value})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            );
        }
        "SRV" => {
            let data = rec.data.as_ref().ok_or_else(data_invalid)?;
            let priority = u64_field(data, "priority", 65535).ok_or_else(data_invalid)?;
            let weight = u64_field(data, "weight", 65535).ok_or_else(data_invalid)?;
            let port = u64_field(data, "port", 65535).ok_or_else(data_invalid)?;
            let target = data
                .get("target")
                .and_then(Value::as_str)
                .and_then(|t| {
                    if t == "." {
                        Some(".".into())
                    } else {
                        hostname(t)
                    }
                })
                .ok_or_else(data_invalid)?;
            rec.content = format!("{weight} {port} {target}");
            rec.priority = Some(priority);
            rec.data = Some(
                json!({"priority": priority, "weight": weight, "port": port, "target": target})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            );
        }
        "TXT" => {
            if rec.content.is_empty() {
                return Err(content_invalid());
            }
        }
        _ => {
            if rec.content.is_empty() && rec.data.is_none() {
                return Err(data_invalid());
            }
        }
    }
    match t.as_str() {
        "MX" | "URI" => {
            let p = rec.priority.unwrap_or(0);
            if p > 65535 {
                return Err(ApiError::validation(
                    1024,
                    "Invalid priority, priority must be set and be between 0 and 65535",
                ));
            }
            rec.priority = Some(p);
        }
        "SRV" => {}
        _ => rec.priority = None,
    }
    if !rec_has_data(&t) {
        rec.data = None;
    }
    if rec.ttl != 1 && !(60..=86400).contains(&rec.ttl) {
        return Err(ApiError::validation(
            9021,
            "TTL must be between 60 and 86400 seconds, or 1 for Automatic.",
        ));
    }
    if rec.proxied {
        if !matches!(t.as_str(), "A" | "AAAA" | "CNAME") {
            return Err(ApiError::validation(
                9004,
                "This record type cannot be proxied.",
            ));
        }
        if !rec.proxiable() {
            return Err(ApiError::bad(
                9003,
                format!(
                    "Target {} is not allowed for a proxied record.",
                    rec.content
                ),
            ));
        }
        rec.ttl = 1;
    }
    if let Some(c) = &rec.comment
        && c.chars().count() > COMMENT_MAX
    {
        return Err(ApiError::bad(
            9313,
            format!("DNS record comment exceeds the maximum length of {COMMENT_MAX} characters."),
        ));
    }
    Ok(())
}

/// Types whose value lives in `data`.
fn rec_has_data(t: &str) -> bool {
    matches!(
        t,
        "CAA"
            | "CERT"
            | "DNSKEY"
            | "DS"
            | "HTTPS"
            | "LOC"
            | "NAPTR"
            | "SMIMEA"
            | "SRV"
            | "SSHFP"
            | "SVCB"
            | "TLSA"
            | "URI"
    )
}

/// The record conflicts of `rec` with the other records of its zone.
fn check_conflicts(s: &Inner, rec: &Record) -> Result<(), ApiError> {
    let others = || {
        s.records
            .iter()
            .filter(move |o| o.zone_id == rec.zone_id && o.id != rec.id && o.name == rec.name)
    };
    if rec.rtype == "CNAME" && others().any(|o| matches!(o.rtype.as_str(), "A" | "AAAA" | "CNAME"))
    {
        return Err(ApiError::bad(
            81053,
            "An A, AAAA, or CNAME record with that host already exists.",
        ));
    }
    if matches!(rec.rtype.as_str(), "A" | "AAAA") && others().any(|o| o.rtype == "CNAME") {
        return Err(ApiError::bad(
            81054,
            "A CNAME record with that host already exists.",
        ));
    }
    let me = rec.identity();
    if others().any(|o| o.identity() == me) {
        return Err(ApiError::bad(81058, "An identical record already exists."));
    }
    Ok(())
}

fn stamp_new(rec: &mut Record, now: &str) {
    rec.created_on = now.to_string();
    rec.modified_on = now.to_string();
    rec.comment_modified_on = rec.comment.as_ref().map(|_| now.to_string());
    rec.tags_modified_on = (!rec.tags.is_empty()).then(|| now.to_string());
}

fn zone_name(s: &Inner, zone_id: &str) -> String {
    s.zone(zone_id).map(|z| z.name.clone()).unwrap_or_default()
}

fn create_record(s: &mut Inner, zone_id: &str, body: &[u8]) -> Answer {
    let body = parse_body(body)?;
    let now = now();
    let mut rec = Record::blank(new_id(), zone_id.to_string(), &now);
    let mut fields = Fields::default();
    fields.read(&body)?;
    fields.apply(&mut rec);
    finalize(&mut rec, &zone_name(s, zone_id))?;
    check_conflicts(s, &rec)?;
    stamp_new(&mut rec, &now);
    rec.seq = s.next_seq();
    let out = rec.to_json();
    s.records.push(rec);
    Ok((out, None))
}

fn find_record(s: &Inner, zone_id: &str, record_id: &str) -> Result<usize, ApiError> {
    s.records
        .iter()
        .position(|r| r.zone_id == zone_id && r.id == record_id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, 81044, "Record does not exist."))
}

fn get_record(s: &Inner, zone_id: &str, record_id: &str) -> Answer {
    let i = find_record(s, zone_id, record_id)?;
    Ok((s.records[i].to_json(), None))
}

fn update_record(
    s: &mut Inner,
    zone_id: &str,
    record_id: &str,
    body: &[u8],
    overwrite: bool,
) -> Answer {
    let i = find_record(s, zone_id, record_id)?;
    let body = parse_body(body)?;
    let old = s.records[i].clone();
    let now = now();
    let mut rec = if overwrite {
        let mut fresh = Record::blank(old.id.clone(), old.zone_id.clone(), &old.created_on);
        fresh.seq = old.seq;
        fresh
    } else {
        old.clone()
    };
    let mut fields = Fields::default();
    fields.read(&body)?;
    fields.apply(&mut rec);
    finalize(&mut rec, &zone_name(s, zone_id))?;
    check_conflicts(s, &rec)?;
    rec.created_on = old.created_on.clone();
    rec.modified_on = now.clone();
    rec.comment_modified_on = match (&rec.comment, &old.comment) {
        (None, _) => None,
        (Some(new), Some(prev)) if new == prev => old.comment_modified_on.clone(),
        (Some(_), _) => Some(now.clone()),
    };
    rec.tags_modified_on = if rec.tags.is_empty() {
        None
    } else if rec.tags == old.tags {
        old.tags_modified_on.clone()
    } else {
        Some(now.clone())
    };
    let out = rec.to_json();
    s.records[i] = rec;
    Ok((out, None))
}

fn delete_record(s: &mut Inner, zone_id: &str, record_id: &str) -> Answer {
    let i = find_record(s, zone_id, record_id)?;
    let rec = s.records.remove(i);
    Ok((json!({"id": rec.id}), None))
}

// ---------------------------------------------------------------------------
// Helpers

/// A new identifier: 32 lowercase hex digits, like Cloudflare's.
fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn is_identifier(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The current time as the API writes it: `2024-01-01T05:20:00.123456Z`.
fn now() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000000Z".to_string())
}
