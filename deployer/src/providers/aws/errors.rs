//! AWS errors as provider errors: what may succeed later (throttling, 5xx,
//! eventual consistency) is retryable; what the operator must fix (missing
//! permissions, quotas, refused values) stops the apply with a message that
//! names the resource, the API call and what to do.

use std::fmt::Display;

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::engine::provider::{ErrorClass, ProviderError};

/// What kind of failure an AWS error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Request rate exceeded.
    Throttled,
    /// The service failed or timed out (5xx, network).
    Unavailable,
    /// Something the request depends on is not visible or settled yet.
    Eventual,
    /// The credentials are missing, invalid or expired.
    Credentials,
    /// The credentials lack a permission.
    Denied,
    /// An account limit or quota is exhausted.
    Quota,
    /// AWS refused a value.
    Invalid,
    /// The thing addressed does not exist.
    NotFound,
    /// Anything else.
    Other,
}

const THROTTLING: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "SlowDown",
    "ProvisionedThroughputExceededException",
    "EC2ThrottledException",
    "PriorRequestNotComplete",
    "BandwidthLimitExceeded",
];

const UNAVAILABLE: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "InternalServerException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "ServerException",
    "RequestTimeout",
    "RequestTimeoutException",
    "Unavailable",
];

const EVENTUAL: &[&str] = &[
    "DependencyViolation",
    "IncorrectState",
    "IncorrectInstanceState",
    "InvalidDBInstanceState",
    "InvalidDBInstanceStateFault",
    "InvalidDBSubnetGroupStateFault",
    "ResourceInUse",
    "ResourceInUseException",
    "OperationAborted",
    "ConcurrentModification",
    "ConcurrentModificationException",
    "ConditionalRequestConflict",
    "ClusterContainsServicesException",
    "ClusterContainsTasksException",
    "UpdateInProgressException",
    "InvalidIPAddress.InUse",
    "CertificateNotFound",
];

const CREDENTIALS: &[&str] = &[
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "ExpiredToken",
    "ExpiredTokenException",
    "AuthFailure",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "MissingAuthenticationToken",
];

const DENIED: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "UnauthorizedAccess",
    "OptInRequired",
    "Blocked",
];

/// Classify an error code, HTTP status and message.
pub fn classify(code: Option<&str>, status: Option<u16>, message: &str) -> Kind {
    let code = code.unwrap_or("");
    let m = message.to_ascii_lowercase();
    if THROTTLING.contains(&code) || status == Some(429) {
        return Kind::Throttled;
    }
    if CREDENTIALS.contains(&code) {
        return Kind::Credentials;
    }
    if DENIED.contains(&code) || code.ends_with("AccessDenied") {
        return Kind::Denied;
    }
    if UNAVAILABLE.contains(&code) || status.is_some_and(|s| s >= 500) {
        return Kind::Unavailable;
    }
    // IAM changes take seconds to reach EC2 and ECS.
    if m.contains("invalid iam instance profile")
        || m.contains("iaminstanceprofile")
        || m.contains("unable to assume")
        || m.contains("cannot be assumed")
    {
        return Kind::Eventual;
    }
    if EVENTUAL.contains(&code) {
        return Kind::Eventual;
    }
    if code.contains("LimitExceeded")
        || code.contains("QuotaExceeded")
        || code.starts_with("TooMany")
        || code == "InsufficientInstanceCapacity"
        || code == "AddressLimitExceeded"
    {
        return Kind::Quota;
    }
    if code.contains("NotFound")
        || code.starts_with("NoSuch")
        || code == "ResourceNotFoundException"
    {
        return Kind::NotFound;
    }
    if code.starts_with("Invalid")
        || code.starts_with("Validation")
        || code.starts_with("Malformed")
        || code == "InvalidParameterException"
        || code == "ClientException"
        || code == "UnsupportedOperation"
    {
        return Kind::Invalid;
    }
    Kind::Other
}

/// The code, HTTP status and message of an SDK error.
pub fn parts<E>(err: &SdkError<E, HttpResponse>) -> (Option<String>, Option<u16>, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    match err {
        SdkError::ServiceError(s) => {
            let e = s.err();
            let message = e
                .message()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            (e.code().map(str::to_string), status, message)
        }
        SdkError::TimeoutError(_) => (None, status, "the request timed out".into()),
        SdkError::DispatchFailure(d) => {
            let why = if d.is_io() {
                "could not connect"
            } else if d.is_timeout() {
                "timed out connecting"
            } else {
                "the request could not be sent"
            };
            (
                None,
                status,
                format!(
                    "{why}: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(err)
                ),
            )
        }
        other => (
            None,
            status,
            aws_smithy_types::error::display::DisplayErrorContext(other).to_string(),
        ),
    }
}

/// The kind of an SDK error.
pub fn kind_of<E>(err: &SdkError<E, HttpResponse>) -> Kind
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Kind::Unavailable
        }
        SdkError::ConstructionFailure(_) => Kind::Invalid,
        _ => {
            let (code, status, message) = parts(err);
            classify(code.as_deref(), status, &message)
        }
    }
}

/// A provider error for `what` (a resource id or "observing …") failing in `op`.
pub fn to_provider<E>(
    op: &str,
    what: impl Display,
    err: &SdkError<E, HttpResponse>,
) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let (code, _, message) = parts(err);
    let kind = kind_of(err);
    let text = match &code {
        Some(c) => format!("{what}: {c}: {message}"),
        None => format!("{what}: {message}"),
    };
    build(kind, op, text)
}

/// A provider error of a given kind, with the hint that kind calls for.
pub fn build(kind: Kind, op: &str, message: String) -> ProviderError {
    // "Not found" where something was expected (a delete or lookup that
    // tolerates absence asks with `or_missing`) is usually a resource created
    // a moment ago that this endpoint does not see yet.
    let class = match kind {
        Kind::Throttled | Kind::Unavailable | Kind::Eventual | Kind::NotFound => {
            ErrorClass::Retryable
        }
        _ => ErrorClass::Hard,
    };
    let hint = match kind {
        Kind::Credentials => Some(
            "check the AWS credentials boxctl runs with (AWS_PROFILE, AWS_ACCESS_KEY_ID, an SSO session) and that they have not expired"
                .to_string(),
        ),
        Kind::Denied => Some(format!(
            "the identity boxctl runs as (see `aws sts get-caller-identity`) needs permission for {op}: grant it, or run with a role that has it"
        )),
        Kind::Quota => Some(
            "an account quota is exhausted: request an increase in the Service Quotas console, or free capacity (unused Elastic IPs, instances, load balancers)"
                .to_string(),
        ),
        Kind::Invalid => Some(
            "AWS refused a value: check the stack.toml setting behind it; `boxctl graph --stage <stage>` shows every resolved property"
                .to_string(),
        ),
        Kind::NotFound => Some(
            "AWS does not see it (yet): resources just created take a moment to be visible everywhere; if this persists, run deploy again so boxctl observes the world afresh"
                .to_string(),
        ),
        Kind::Unavailable => Some(format!(
            "AWS did not answer; if this persists, check the network, the region and any endpoint override ({})",
            super::client::ENDPOINT_ENV
        )),
        _ => None,
    };
    ProviderError {
        class,
        operation: op.to_string(),
        message,
        hint,
    }
}

/// Replace every occurrence of a secret in an error with `[redacted]`.
pub fn redact(mut e: ProviderError, secret: &str) -> ProviderError {
    if !secret.is_empty() {
        e.message = e.message.replace(secret, "[redacted]");
        e.hint = e.hint.map(|h| h.replace(secret, "[redacted]"));
    }
    e
}

/// Turns SDK results into provider results.
pub trait AwsResult<T> {
    /// Any error becomes a provider error for `what` in `op`.
    fn or_fail(self, op: &str, what: impl Display) -> Result<T, ProviderError>;
    /// "Not found" becomes `None`; other errors become provider errors.
    fn or_missing(self, op: &str, what: impl Display) -> Result<Option<T>, ProviderError>;
}

impl<T, E> AwsResult<T> for Result<T, SdkError<E, HttpResponse>>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    fn or_fail(self, op: &str, what: impl Display) -> Result<T, ProviderError> {
        self.map_err(|e| to_provider(op, what, &e))
    }

    fn or_missing(self, op: &str, what: impl Display) -> Result<Option<T>, ProviderError> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(e) if kind_of(&e) == Kind::NotFound || is_http_404(&e) => Ok(None),
            Err(e) => Err(to_provider(op, what, &e)),
        }
    }
}

fn is_http_404<E>(err: &SdkError<E, HttpResponse>) -> bool {
    matches!(err, SdkError::ServiceError(_))
        && err.raw_response().map(|r| r.status().as_u16()) == Some(404)
}

/// The error code of an SDK error, when it has one.
pub fn code_of<E>(err: &SdkError<E, HttpResponse>) -> Option<String>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    parts(err).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_server_errors_are_retried() {
        for code in [
            "Throttling",
            "RequestLimitExceeded",
            "SlowDown",
            "ThrottlingException",
        ] {
            assert_eq!(
                classify(Some(code), Some(400), "slow down"),
                Kind::Throttled,
                "{code}"
            );
        }
        assert_eq!(classify(None, Some(503), ""), Kind::Unavailable);
        assert_eq!(
            classify(Some("InternalError"), Some(500), ""),
            Kind::Unavailable
        );
        assert_eq!(
            classify(Some("DependencyViolation"), Some(400), ""),
            Kind::Eventual
        );
        assert_eq!(
            classify(
                Some("InvalidParameterValue"),
                Some(400),
                "Value (boxlite-prod-runner) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name"
            ),
            Kind::Eventual
        );
        assert!(build(Kind::Throttled, "RunInstances", "x".into()).is_retryable());
        assert!(build(Kind::Eventual, "DeleteSubnet", "x".into()).is_retryable());
    }

    #[test]
    fn operator_errors_stop_with_a_hint() {
        assert_eq!(
            classify(Some("UnauthorizedOperation"), Some(403), ""),
            Kind::Denied
        );
        assert_eq!(
            classify(Some("AccessDeniedException"), Some(400), ""),
            Kind::Denied
        );
        assert_eq!(
            classify(Some("ExpiredToken"), Some(400), ""),
            Kind::Credentials
        );
        assert_eq!(
            classify(Some("VcpuLimitExceeded"), Some(400), ""),
            Kind::Quota
        );
        assert_eq!(
            classify(Some("AddressLimitExceeded"), Some(400), ""),
            Kind::Quota
        );
        assert_eq!(
            classify(Some("TooManyLoadBalancers"), Some(400), ""),
            Kind::Quota
        );
        assert_eq!(
            classify(Some("InvalidAMIID.Malformed"), Some(400), ""),
            Kind::Invalid
        );
        assert_eq!(
            classify(Some("ValidationError"), Some(400), ""),
            Kind::Invalid
        );
        assert_eq!(
            classify(Some("InvalidVpcID.NotFound"), Some(400), ""),
            Kind::NotFound
        );
        assert_eq!(
            classify(Some("NoSuchBucket"), Some(404), ""),
            Kind::NotFound
        );
        let e = build(
            Kind::Denied,
            "RunInstances",
            "runner/runner-1: UnauthorizedOperation: no".into(),
        );
        assert!(!e.is_retryable());
        assert!(e.hint.as_deref().unwrap().contains("RunInstances"));
        assert!(e.to_string().contains("runner/runner-1"));
        let q = build(
            Kind::Quota,
            "AllocateAddress",
            "eip/nat-a: AddressLimitExceeded".into(),
        );
        assert!(q.hint.unwrap().contains("quota"));
    }

    #[test]
    fn secrets_are_redacted_from_errors() {
        let e = ProviderError::hard(
            "PutParameter",
            "1 validation error: Value 'bxr_s3cr3t' at 'value' failed",
        );
        let e = redact(e, "bxr_s3cr3t");
        assert!(!e.message.contains("s3cr3t"));
        assert!(e.message.contains("[redacted]"));
    }
}
