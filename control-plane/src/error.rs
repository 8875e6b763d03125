//! The error every operation returns: an HTTP status, a stable code and a
//! message for people, rendered as `protocol::ApiError` JSON.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An API error: status, stable `code`, human `message`, and (for 5xx) the
/// underlying cause, which is logged but never sent to the client.
#[derive(Debug)]
pub struct Error {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code.
    pub code: Cow<'static, str>,
    /// Human-readable message; never holds secrets.
    pub message: String,
    /// Seconds after which a retry may succeed (`Retry-After`).
    pub retry_after: Option<u64>,
    source: Option<anyhow::Error>,
}

impl Error {
    /// An error with a status, code and message.
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Error {
            status,
            code: code.into(),
            message: message.into(),
            retry_after: None,
            source: None,
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 `not_found` naming what was looked for.
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    /// 409 with `code`.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 503 with `code`.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// 429 with `code`: a limit of the caller is reached; retry after `secs`.
    pub fn too_many(code: &'static str, message: impl Into<String>, secs: u64) -> Self {
        Error {
            retry_after: Some(secs),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }

    /// 502 with `code`: a runner failed or could not be reached.
    pub fn bad_gateway(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, code, message)
    }

    /// 500 `internal`: the cause is logged, the client sees a generic message.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Error {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: Cow::Borrowed("internal"),
            message: "internal error; see the control plane's log".into(),
            retry_after: None,
            source: Some(cause.into()),
        }
    }

    /// Attach a cause (logged for 5xx answers).
    pub fn with_source(mut self, cause: impl Into<anyhow::Error>) -> Self {
        self.source = Some(cause.into());
        self
    }

    /// The database error behind this one, if any.
    pub fn sqlx(&self) -> Option<&sqlx::Error> {
        self.source
            .as_ref()
            .and_then(|s| s.downcast_ref::<sqlx::Error>())
    }

    /// True when the database reported a unique-constraint violation.
    pub fn is_unique_violation(&self) -> bool {
        matches!(self.sqlx(), Some(sqlx::Error::Database(d)) if d.is_unique_violation())
    }

    /// The wire form.
    pub fn body(&self) -> protocol::ApiError {
        protocol::ApiError::new(self.code.clone(), self.message.clone())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {})", self.message, self.code, self.status)?;
        if let Some(s) = &self.source {
            write!(f, ": {s:#}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => Error::unavailable(
                "database_unavailable",
                "the database is unavailable; retry later",
            )
            .with_source(e),
            _ => Error::internal(e),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            match &self.source {
                Some(s) => {
                    tracing::error!(status = %self.status, code = %self.code, error = %format!("{s:#}"), "request failed")
                }
                None => {
                    tracing::warn!(status = %self.status, code = %self.code, message = %self.message, "request failed")
                }
            }
        }
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
