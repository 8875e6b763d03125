//! An HTTP proxy in front of an AWS emulator, for tests: it counts the calls
//! that pass (per API action, and which of them change something), can
//! answer a share of them with throttling or server errors in each AWS
//! protocol's own shape, can hold every call (to keep a deploy holding its
//! lock), and can SIGKILL a process at the exact moment its N-th changing
//! call reaches AWS (before it is forwarded, or after AWS acted on it but
//! before the answer is returned). It keeps a log of the calls, in order
//! ([`AwsProxy::calls`]: action, path and, except for S3, the request body),
//! so tests can check which calls were made with which parameters.
//!
//! It also corrects one conformance bug of moto 5.2.5 that the AWS SDK for
//! Rust (rightly) refuses: moto answers GetBucketVersioning with a
//! `<GetBucketVersioningResponse>` root element where S3 documents and sends
//! `<VersioningConfiguration>`. The proxy renames that root element and
//! nothing else; boxctl's code is the same as against AWS.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use tokio::sync::watch;

/// How many calls fail, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Faults {
    /// Every call is forwarded.
    None,
    /// Every n-th call fails, alternately with throttling (400, or 503 for
    /// EC2 and S3 as they answer) and with a 5xx server error.
    EveryNth(u64),
}

/// When a process is killed relative to its N-th changing call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillPoint {
    /// Before the call reaches AWS.
    BeforeForwarding,
    /// After AWS acted on it, before the caller hears back.
    AfterForwarding,
}

#[derive(Clone, Copy, Debug)]
struct KillAt {
    pid: i32,
    mutation: u64,
    point: KillPoint,
}

struct Inner {
    upstream: String,
    client: reqwest::Client,
    total: AtomicU64,
    mutating: AtomicU64,
    faulted: AtomicU64,
    faults: Mutex<Faults>,
    kill: Mutex<Option<KillAt>>,
    killed: Mutex<Option<u64>>,
    actions: Mutex<BTreeMap<String, u64>>,
    calls: Mutex<Vec<Call>>,
    canned: Mutex<Vec<Canned>>,
    upstream_time: Mutex<BTreeMap<String, Duration>>,
    open: watch::Sender<bool>,
}

/// One call that reached the proxy, as it was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The API action (`SendCommand`, `TerminateInstances`, `S3 PUT Object`).
    pub action: String,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// The request body as text (form or JSON); empty for S3, whose bodies
    /// are objects.
    pub body: String,
}

impl Call {
    /// A form parameter of a Query or EC2 call (`DisableApiTermination.Value`), decoded.
    pub fn form(&self, key: &str) -> Option<String> {
        let url = reqwest::Url::parse(&format!("http://form/?{}", self.body)).ok()?;
        url.query_pairs()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    /// The JSON body of a JSON-protocol call (SSM, ECS, …).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// An answer given instead of the emulator's to the next calls of one action.
#[derive(Clone, Debug)]
struct Canned {
    action: String,
    times: u32,
    status: u16,
    body: String,
}

/// A running proxy; stopped when dropped.
pub struct AwsProxy {
    url: String,
    inner: Arc<Inner>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The protocol of an AWS request, read from how it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// `X-Amz-Target` + JSON body (ECS, SSM, ACM, CloudWatch Logs).
    Json,
    /// Form body with `Version=2016-11-15`.
    Ec2,
    /// Form body (IAM, ELB, RDS, STS).
    Query,
    /// REST-XML (S3).
    S3,
}

fn classify(method: &str, headers: &HeaderMap, body: &[u8], path: &str) -> (Protocol, String) {
    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        let action = target.rsplit('.').next().unwrap_or(target).to_string();
        return (Protocol::Json, action);
    }
    let form = std::str::from_utf8(body).unwrap_or("");
    if let Some(action) = form.split('&').find_map(|kv| kv.strip_prefix("Action=")) {
        let proto = if form.split('&').any(|kv| kv == "Version=2016-11-15") {
            Protocol::Ec2
        } else {
            Protocol::Query
        };
        return (proto, action.to_string());
    }
    let what = if path.trim_matches('/').contains('/') {
        "Object"
    } else {
        "Bucket"
    };
    (Protocol::S3, format!("S3 {method} {what}"))
}

fn is_mutating(method: &str, protocol: Protocol, action: &str) -> bool {
    const VERBS: &[&str] = &[
        "Create",
        "Run",
        "Put",
        "Register",
        "Allocate",
        "Attach",
        "Associate",
        "Modify",
        "Authorize",
        "Request",
        "Add",
        "Update",
        "Delete",
        "Deregister",
        "Terminate",
        "Release",
        "Detach",
        "Disassociate",
        "Revoke",
        "Replace",
        "Set",
        "Remove",
    ];
    match protocol {
        Protocol::S3 => !matches!(method, "GET" | "HEAD"),
        _ => VERBS.iter().any(|v| action.starts_with(v)),
    }
}

fn error_response(protocol: Protocol, throttle: bool) -> Response {
    let (status, content_type, body) = match (protocol, throttle) {
        (Protocol::Json, true) => (
            400,
            "application/x-amz-json-1.1",
            r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#.to_string(),
        ),
        (Protocol::Json, false) => (
            500,
            "application/x-amz-json-1.1",
            r#"{"__type":"InternalFailure","message":"We encountered an internal error."}"#
                .to_string(),
        ),
        (Protocol::Ec2, throttle) => {
            let (code, msg) = if throttle {
                ("RequestLimitExceeded", "Request limit exceeded.")
            } else {
                ("Unavailable", "The service is unavailable.")
            };
            (
                503,
                "text/xml",
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{msg}</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>"
                ),
            )
        }
        (Protocol::Query, throttle) => {
            let (status, code) = if throttle {
                (400, "Throttling")
            } else {
                (503, "ServiceUnavailable")
            };
            (
                status,
                "text/xml",
                format!(
                    "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>Rate exceeded</Message></Error><RequestId>fault-proxy</RequestId></ErrorResponse>"
                ),
            )
        }
        (Protocol::S3, throttle) => {
            let (status, code) = if throttle {
                (503, "SlowDown")
            } else {
                (500, "InternalError")
            };
            (
                status,
                "application/xml",
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
                ),
            )
        }
    };
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(status).expect("valid status");
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    r
}

/// moto's non-conforming GetBucketVersioning root element, renamed to S3's.
fn conform(body: axum::body::Bytes) -> axum::body::Bytes {
    const WRONG: &[u8] = b"<GetBucketVersioningResponse";
    if !body.windows(WRONG.len()).any(|w| w == WRONG) {
        return body;
    }
    let text = String::from_utf8_lossy(&body)
        .replace("<GetBucketVersioningResponse", "<VersioningConfiguration")
        .replace(
            "</GetBucketVersioningResponse>",
            "</VersioningConfiguration>",
        );
    axum::body::Bytes::from(text)
}

fn sigkill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

async fn forward(
    inner: &Inner,
    method: &axum::http::Method,
    uri: &str,
    headers: &HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let url = format!("{}{uri}", inner.upstream);
    let mut req = inner.client.request(method.clone(), &url).body(body);
    for (k, v) in headers {
        if !matches!(
            k.as_str(),
            "host" | "content-length" | "transfer-encoding" | "connection"
        ) {
            req = req.header(k, v);
        }
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status();
            let mut out_headers = HeaderMap::new();
            for (k, v) in r.headers() {
                if !matches!(
                    k.as_str(),
                    "content-length" | "transfer-encoding" | "connection"
                ) {
                    out_headers.insert(k.clone(), v.clone());
                }
            }
            let bytes = conform(r.bytes().await.unwrap_or_default());
            let mut resp = Response::new(Body::from(bytes));
            *resp.status_mut() = status;
            *resp.headers_mut() = out_headers;
            resp
        }
        Err(e) => {
            let mut r = Response::new(Body::from(format!("proxy: upstream failed: {e}")));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            r
        }
    }
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    // Held while the proxy is paused.
    let mut open = inner.open.subscribe();
    while !*open.borrow_and_update() {
        if open.changed().await.is_err() {
            break;
        }
    }
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let method = parts.method.as_str().to_string();
    let (protocol, action) = classify(&method, &parts.headers, &body, parts.uri.path());
    let n = inner.total.fetch_add(1, Ordering::SeqCst) + 1;
    *inner
        .actions
        .lock()
        .expect("actions mutex")
        .entry(action.clone())
        .or_insert(0) += 1;
    inner.calls.lock().expect("calls mutex").push(Call {
        action: action.clone(),
        method: method.clone(),
        uri: uri.clone(),
        body: if protocol == Protocol::S3 {
            String::new()
        } else {
            String::from_utf8_lossy(&body).into_owned()
        },
    });
    {
        let mut canned = inner.canned.lock().expect("canned mutex");
        if let Some(c) = canned
            .iter_mut()
            .find(|c| c.action == action && c.times > 0)
        {
            c.times -= 1;
            let mut r = Response::new(Body::from(c.body.clone()));
            *r.status_mut() = StatusCode::from_u16(c.status).expect("valid status");
            let content_type = if c.body.starts_with('<') {
                "text/xml;charset=UTF-8"
            } else {
                "application/x-amz-json-1.1"
            };
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static(content_type));
            return r;
        }
    }
    let mutating = is_mutating(&method, protocol, &action);
    let m = if mutating {
        inner.mutating.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        0
    };
    let kill = *inner.kill.lock().expect("kill mutex");
    if let Some(k) = kill.filter(|k| mutating && k.mutation == m) {
        *inner.kill.lock().expect("kill mutex") = None;
        *inner.killed.lock().expect("killed mutex") = Some(m);
        if k.point == KillPoint::BeforeForwarding {
            sigkill(k.pid);
            return error_response(protocol, false);
        }
        let resp = forward(&inner, &parts.method, &uri, &parts.headers, body).await;
        sigkill(k.pid);
        return resp;
    }
    if let Faults::EveryNth(every) = *inner.faults.lock().expect("faults mutex")
        && every > 0
        && n % every == 0
    {
        let f = inner.faulted.fetch_add(1, Ordering::SeqCst);
        return error_response(protocol, f % 2 == 0);
    }
    let t0 = std::time::Instant::now();
    let resp = forward(&inner, &parts.method, &uri, &parts.headers, body).await;
    *inner
        .upstream_time
        .lock()
        .expect("time mutex")
        .entry(action)
        .or_default() += t0.elapsed();
    resp
}

impl AwsProxy {
    /// A proxy on a free 127.0.0.1 port in front of `upstream` (e.g. moto's URL).
    pub fn start(upstream: &str) -> AwsProxy {
        let (open, _) = watch::channel(true);
        let inner = Arc::new(Inner {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("HTTP client"),
            total: AtomicU64::new(0),
            mutating: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
            faults: Mutex::new(Faults::None),
            kill: Mutex::new(None),
            killed: Mutex::new(None),
            actions: Mutex::new(BTreeMap::new()),
            calls: Mutex::new(Vec::new()),
            canned: Mutex::new(Vec::new()),
            upstream_time: Mutex::new(BTreeMap::new()),
            open,
        });
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy on 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let state = inner.clone();
        let thread = std::thread::Builder::new()
            .name("aws-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let app = axum::Router::new().fallback(handle).with_state(state);
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        })
                        .await;
                });
            })
            .expect("spawn the proxy thread");
        AwsProxy {
            url,
            inner,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// The proxy's URL, to pass as the AWS endpoint.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Set the fault pattern (counted over all calls since the last reset).
    pub fn set_faults(&self, f: Faults) {
        *self.inner.faults.lock().expect("faults mutex") = f;
    }

    /// Calls answered with an injected error so far.
    pub fn faulted(&self) -> u64 {
        self.inner.faulted.load(Ordering::SeqCst)
    }

    /// SIGKILL `pid` at its `mutation`-th changing call (counted from the last reset).
    pub fn kill_at(&self, pid: u32, mutation: u64, point: KillPoint) {
        *self.inner.killed.lock().expect("killed mutex") = None;
        *self.inner.kill.lock().expect("kill mutex") = Some(KillAt {
            pid: i32::try_from(pid).expect("pid fits"),
            mutation,
            point,
        });
    }

    /// The changing call at which the armed kill fired, if it did.
    pub fn killed_at(&self) -> Option<u64> {
        *self.inner.killed.lock().expect("killed mutex")
    }

    /// Disarm a kill that has not fired.
    pub fn disarm(&self) {
        *self.inner.kill.lock().expect("kill mutex") = None;
    }

    /// Hold every call until [`AwsProxy::resume`].
    pub fn pause(&self) {
        self.inner.open.send_replace(false);
    }

    /// Let calls through again.
    pub fn resume(&self) {
        self.inner.open.send_replace(true);
    }

    /// Calls seen since the last reset.
    pub fn total(&self) -> u64 {
        self.inner.total.load(Ordering::SeqCst)
    }

    /// Changing calls seen since the last reset.
    pub fn mutating(&self) -> u64 {
        self.inner.mutating.load(Ordering::SeqCst)
    }

    /// Calls per API action since the last reset.
    pub fn actions(&self) -> BTreeMap<String, u64> {
        self.inner.actions.lock().expect("actions mutex").clone()
    }

    /// Answer the next `times` calls of `action` with `status` and `body`
    /// (JSON, or XML when it starts with `<`) instead of forwarding them: what the emulator
    /// cannot produce (an SSM command that failed on its host, an invocation
    /// not visible yet). The calls are still logged.
    pub fn answer_next(&self, action: &str, times: u32, status: u16, body: &str) {
        self.inner
            .canned
            .lock()
            .expect("canned mutex")
            .push(Canned {
                action: action.to_string(),
                times,
                status,
                body: body.to_string(),
            });
    }

    /// Every call since the last reset, in the order they arrived.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.lock().expect("calls mutex").clone()
    }

    /// Time the emulator took to answer, per API action, since the last reset.
    pub fn upstream_time(&self) -> BTreeMap<String, Duration> {
        self.inner.upstream_time.lock().expect("time mutex").clone()
    }

    /// Zero the counters (faults and a pending kill stay as set).
    pub fn reset_counts(&self) {
        self.inner.total.store(0, Ordering::SeqCst);
        self.inner.mutating.store(0, Ordering::SeqCst);
        self.inner.faulted.store(0, Ordering::SeqCst);
        self.inner.actions.lock().expect("actions mutex").clear();
        self.inner.calls.lock().expect("calls mutex").clear();
        self.inner.upstream_time.lock().expect("time mutex").clear();
    }
}

impl Drop for AwsProxy {
    fn drop(&mut self) {
        self.resume();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moto_versioning_answers_get_the_documented_root() {
        let moto = axum::body::Bytes::from_static(
            b"<?xml version=\"1.0\"?>\n<GetBucketVersioningResponse xmlns=\"x\"><Status>Enabled</Status></GetBucketVersioningResponse>",
        );
        let fixed = conform(moto);
        assert!(fixed.starts_with(b"<?xml"));
        assert!(String::from_utf8_lossy(&fixed).contains("<VersioningConfiguration xmlns=\"x\"><Status>Enabled</Status></VersioningConfiguration>"));
        let other = axum::body::Bytes::from_static(b"<Tagging/>");
        assert_eq!(conform(other.clone()), other);
    }

    #[test]
    fn requests_are_classified_by_protocol() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-amz-target",
            HeaderValue::from_static("AmazonSSM.PutParameter"),
        );
        assert_eq!(
            classify("POST", &h, b"{}", "/"),
            (Protocol::Json, "PutParameter".into())
        );
        let ec2 = b"Action=RunInstances&Version=2016-11-15&ImageId=ami-1";
        assert_eq!(
            classify("POST", &HeaderMap::new(), ec2, "/"),
            (Protocol::Ec2, "RunInstances".into())
        );
        let iam = b"Action=CreateRole&Version=2010-05-08";
        assert_eq!(
            classify("POST", &HeaderMap::new(), iam, "/"),
            (Protocol::Query, "CreateRole".into())
        );
        let (p, a) = classify("PUT", &HeaderMap::new(), b"", "/bucket/key");
        assert_eq!(p, Protocol::S3);
        assert!(is_mutating("PUT", p, &a));
        assert!(!is_mutating("GET", Protocol::S3, "S3 GET Object"));
        assert!(is_mutating("POST", Protocol::Ec2, "RunInstances"));
        assert!(!is_mutating("POST", Protocol::Ec2, "DescribeInstances"));
    }
}
