//! The HTTP API: one route table that both the router and the OpenAPI
//! document are built from, the middleware stack (request ids, tracing,
//! panic guard, body limit) and JSON fallbacks for unknown paths and methods.

pub mod extract;
pub mod handlers;

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::handler::Handler;
use axum::http::{HeaderName, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use futures::FutureExt;
use tower::ServiceBuilder;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::error::Error;
use crate::openapi::{ApiSchema, SchemaFn, schema_of};
use crate::state::AppState;

/// Largest request body in general.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest healthcheck body (a runner reports every box it has).
pub const MAX_HEALTHCHECK_BYTES: usize = 16 * 1024 * 1024;
/// Header carrying the request id (kept from the client when well-formed).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Public,
    /// Any organization member (API key or OIDC user).
    Member,
    /// Members of the admin organization.
    Admin,
    /// Runners (runner token).
    Runner,
}

impl Access {
    /// Lowercase name (`x-boxlite-access` in the OpenAPI document).
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Public => "public",
            Access::Member => "member",
            Access::Admin => "admin",
            Access::Runner => "runner",
        }
    }
}

/// A path or query parameter.
#[derive(Clone, Debug)]
pub struct Param {
    /// Name.
    pub name: &'static str,
    /// In the path (else the query).
    pub in_path: bool,
    /// Required (path parameters always are).
    pub required: bool,
    /// What it means.
    pub description: &'static str,
    /// Its schema.
    pub schema: SchemaFn,
}

/// A documented response.
#[derive(Clone, Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// What it means.
    pub description: &'static str,
    /// JSON body schema.
    pub schema: Option<SchemaFn>,
}

/// Documentation of an operation.
#[derive(Clone, Debug, Default)]
pub struct Doc {
    /// Unique operation id.
    pub operation_id: &'static str,
    /// Tag (group).
    pub tag: &'static str,
    /// One line.
    pub summary: &'static str,
    /// More.
    pub description: &'static str,
    /// Parameters.
    pub params: Vec<Param>,
    /// JSON request body.
    pub request: Option<SchemaFn>,
    /// Responses (errors common to the access level are added).
    pub responses: Vec<Resp>,
}

/// One route: method, path, who may call it, its documentation and handler.
pub struct Route {
    /// Method.
    pub method: Method,
    /// Path (axum syntax, `{param}`; the same in OpenAPI).
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// Documentation.
    pub doc: Doc,
    /// Handler.
    pub handler: MethodRouter<AppState>,
    /// Largest request body accepted.
    pub body_limit: usize,
}

impl Route {
    /// A route for `method` `path` served by `handler`.
    pub fn new<H, T>(method: Method, path: &'static str, access: Access, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
        Route {
            method,
            path,
            access,
            doc: Doc::default(),
            handler: on(filter, handler),
            body_limit: MAX_BODY_BYTES,
        }
    }

    /// Operation id, tag and summary.
    pub fn op(mut self, id: &'static str, tag: &'static str, summary: &'static str) -> Self {
        self.doc.operation_id = id;
        self.doc.tag = tag;
        self.doc.summary = summary;
        self
    }

    /// Longer description.
    pub fn describe(mut self, text: &'static str) -> Self {
        self.doc.description = text;
        self
    }

    /// A path parameter.
    pub fn path_param<T: ApiSchema>(
        mut self,
        name: &'static str,
        description: &'static str,
    ) -> Self {
        self.doc.params.push(Param {
            name,
            in_path: true,
            required: true,
            description,
            schema: schema_of::<T>(),
        });
        self
    }

    /// A query parameter.
    pub fn query_param<T: ApiSchema>(
        mut self,
        name: &'static str,
        required: bool,
        description: &'static str,
    ) -> Self {
        self.doc.params.push(Param {
            name,
            in_path: false,
            required,
            description,
            schema: schema_of::<T>(),
        });
        self
    }

    /// JSON request body of type `T`.
    pub fn body<T: ApiSchema>(mut self) -> Self {
        self.doc.request = Some(schema_of::<T>());
        self
    }

    /// A response with a JSON body of type `T`.
    pub fn ok<T: ApiSchema>(mut self, status: u16, description: &'static str) -> Self {
        self.doc.responses.push(Resp {
            status,
            description,
            schema: Some(schema_of::<T>()),
        });
        self
    }

    /// A response without a body.
    pub fn status(mut self, status: u16, description: &'static str) -> Self {
        self.doc.responses.push(Resp {
            status,
            description,
            schema: None,
        });
        self
    }

    /// An error response (`ApiError` body).
    pub fn err(self, status: u16, description: &'static str) -> Self {
        self.status(status, description)
    }

    /// Allow bodies up to `bytes` on this route.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }
}

/// Every route of the API.
pub fn routes() -> Vec<Route> {
    handlers::routes()
}

/// The router for `state`, with `routes` and the middleware stack.
pub fn router(state: AppState, routes: Vec<Route>) -> Router {
    let mut r = Router::new();
    for route in routes {
        let limit = route.body_limit;
        let handler = route
            .handler
            .layer(DefaultBodyLimit::max(limit))
            .layer(middleware::from_fn(move |req: Request, next: Next| {
                refuse_oversized(limit, req, next)
            }));
        r = r.route(route.path, handler);
    }
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    r.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn(sanitize_request_id))
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|req: &Request| {
                            let id = req
                                .extensions()
                                .get::<RequestId>()
                                .and_then(|id| id.header_value().to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            tracing::info_span!(
                                "request",
                                method = %req.method(),
                                path = %req.uri().path(),
                                request_id = %id,
                                org = tracing::field::Empty,
                                runner = tracing::field::Empty,
                            )
                        })
                        .on_request(())
                        .on_response(())
                        // 5xx answers are logged where they are made (with their cause).
                        .on_failure(()),
                )
                .layer(PropagateRequestIdLayer::new(request_id))
                .layer(middleware::from_fn(log_request))
                .layer(middleware::from_fn(catch_panic)),
        )
        .with_state(state)
}

/// One line per request (in its span: method, path, request id, caller):
/// status and latency. Successful health checks and runner healthchecks,
/// which arrive every few seconds, are logged at debug level.
async fn log_request(req: Request, next: Next) -> Response {
    let quiet = matches!(req.uri().path(), "/api/health" | "/api/runners/healthcheck");
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let latency_ms = (started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
    if quiet && resp.status().is_success() {
        tracing::debug!(status, latency_ms, "request");
    } else {
        tracing::info!(status, latency_ms, "request");
    }
    resp
}

/// Drop a client-sent request id that is too long or has odd characters
/// (it goes into logs), so a fresh one is generated.
/// Most bytes of a refused body read and discarded before answering 413.
const DRAIN_LIMIT: u64 = 8 * 1024 * 1024;

/// Answer 413 to a body declared larger than `limit` without handing it to
/// the handler. A body up to [`DRAIN_LIMIT`] is read and discarded first:
/// closing a connection with unread data resets it, and the client would see
/// a broken connection instead of the answer.
async fn refuse_oversized(limit: usize, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(len) = declared.filter(|len| *len > limit as u64) else {
        return next.run(req).await;
    };
    let refused = Error::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "request body is too large",
    );
    if len <= DRAIN_LIMIT {
        let body = req.into_body();
        let _ = axum::body::to_bytes(body, DRAIN_LIMIT as usize).await;
        return refused.into_response();
    }
    let mut resp = refused.into_response();
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

async fn sanitize_request_id(mut req: Request, next: Next) -> Response {
    let bad = req.headers().get(REQUEST_ID_HEADER).is_some_and(|v| {
        v.len() > 128
            || !v
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    });
    if bad {
        req.headers_mut().remove(REQUEST_ID_HEADER);
    }
    next.run(req).await
}

/// Turn a panicking handler into a 500 JSON answer instead of a dropped connection.
async fn catch_panic(req: Request, next: Next) -> Response {
    match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(r) => r,
        Err(p) => {
            let msg = panic_message(&p);
            Error::internal(anyhow::anyhow!("handler panicked: {msg}")).into_response()
        }
    }
}

fn panic_message(p: &Box<dyn Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

async fn not_found() -> Error {
    Error::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see GET /api/openapi.json",
    )
}

async fn method_not_allowed() -> Error {
    Error::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

/// How long in-flight requests get to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
