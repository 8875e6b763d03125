//! The JSON error body every API answers with on failure.

use serde::{Deserialize, Serialize};

/// `{code, message}`: `code` is stable and machine-readable, `message` is for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable code, snake_case (`unauthorized`, `not_found`, `no_capacity`, …).
    pub code: String,
    /// Human-readable explanation, never containing secrets.
    pub message: String,
}

impl ApiError {
    /// An error with a code and message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ApiError {}
