//! The error shapes Google answers with. STS and the OAuth token endpoint speak RFC 6749
//! (`{"error","error_description"}`); the REST APIs speak `google.rpc.Status`; the metadata server
//! answers in plain text. Handlers build an [`ApiError`] and never format a body themselves.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Endpoint;

#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    body: Body,
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Debug)]
enum Body {
    OAuth { error: &'static str, description: String },
    Rpc { message: String, details: Vec<Value> },
    Plain(String),
}

impl ApiError {
    /// An RFC 6749 §5.2 error, as STS and `oauth2.googleapis.com/token` send them.
    pub(super) fn oauth(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self::new(
            status,
            Body::OAuth {
                error,
                description: description.into(),
            },
        )
    }

    /// The usual `400 invalid_request`.
    pub(super) fn invalid_request(description: impl Into<String>) -> Self {
        Self::oauth(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// `400 invalid_grant`: the credential presented is not acceptable.
    pub(super) fn invalid_grant(description: impl Into<String>) -> Self {
        Self::oauth(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    /// A `google.rpc.Status` error; the canonical status name follows from the HTTP status.
    pub(super) fn rpc(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(
            status,
            Body::Rpc {
                message: message.into(),
                details: Vec::new(),
            },
        )
    }

    /// `400 INVALID_ARGUMENT`.
    pub(super) fn invalid_argument(message: impl Into<String>) -> Self {
        Self::rpc(StatusCode::BAD_REQUEST, message)
    }

    /// What proto3 JSON parsing at Google's front end says about a body it cannot map onto the
    /// request message: the message is repeated as a `BadRequest` field violation.
    pub(super) fn invalid_payload(message: impl Into<String>) -> Self {
        let message = message.into();
        let violation = json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{ "description": message }],
        });
        Self::invalid_argument(message).with_detail(violation)
    }

    /// A metadata-server error: plain text, like the real one.
    pub(super) fn plain(status: StatusCode, text: impl Into<String>) -> Self {
        Self::new(status, Body::Plain(text.into()))
    }

    /// The error a scripted [`super::Fault::Status`] produces, shaped like the endpoint's own errors.
    pub(super) fn injected(endpoint: Endpoint, status: StatusCode) -> Self {
        let description = format!("{} (fault injected by the emulator)", canonical_status(status));
        Self::shaped(endpoint, status, description)
    }

    /// A failure inside the emulator itself, shaped like the endpoint's own errors.
    pub(super) fn internal(endpoint: Endpoint, message: impl Into<String>) -> Self {
        Self::shaped(endpoint, StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// `403 PERMISSION_DENIED` as IAM phrases it, both when the caller lacks `permission` and when
    /// the resource does not exist. IAM Credentials names no resource; other APIs name theirs.
    pub(super) fn permission_denied(permission: &str, resource: Option<&str>) -> Self {
        let (message, metadata) = match resource {
            None => (
                format!("Permission '{permission}' denied on resource (or it may not exist)."),
                json!({ "permission": permission }),
            ),
            Some(resource) => (
                format!("Permission '{permission}' denied on resource '{resource}' (or it may not exist)."),
                json!({ "permission": permission, "resource": resource }),
            ),
        };
        Self::rpc(StatusCode::FORBIDDEN, message).with_detail(json!({
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "IAM_PERMISSION_DENIED",
            "domain": "iam.googleapis.com",
            "metadata": metadata,
        }))
    }

    fn shaped(endpoint: Endpoint, status: StatusCode, message: impl Into<String>) -> Self {
        match endpoint {
            Endpoint::Sts | Endpoint::OAuthToken => Self::oauth(status, oauth_code(status), message),
            Endpoint::Metadata | Endpoint::MetadataIdentity | Endpoint::MetadataValue => Self::plain(status, message),
            Endpoint::GenerateAccessToken
            | Endpoint::GenerateIdToken
            | Endpoint::FetchAccessToken
            | Endpoint::FetchReadToken
            | Endpoint::FetchReadWriteToken
            | Endpoint::AcquireAccessToken
            | Endpoint::TokenInfo
            | Endpoint::Certs => Self::rpc(status, message),
        }
    }

    /// Adds a `google.rpc` detail object (ignored by the other shapes, which have no details).
    pub(super) fn with_detail(mut self, detail: Value) -> Self {
        if let Body::Rpc { details, .. } = &mut self.body {
            details.push(detail);
        }
        self
    }

    pub(super) fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    fn new(status: StatusCode, body: Body) -> Self {
        Self {
            status,
            body,
            headers: Vec::new(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = match self.body {
            Body::OAuth { error, description } => {
                axum::Json(json!({ "error": error, "error_description": description })).into_response()
            }
            Body::Rpc { message, details } => {
                let mut error = json!({
                    "code": self.status.as_u16(),
                    "message": message,
                    "status": canonical_status(self.status),
                });
                // Google leaves `details` out rather than sending an empty list.
                if !details.is_empty() {
                    error["details"] = Value::Array(details);
                }
                axum::Json(json!({ "error": error })).into_response()
            }
            Body::Plain(text) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        };
        *response.status_mut() = self.status;
        response.headers_mut().extend(self.headers);
        response
    }
}

/// The `google.rpc.Code` name Google pairs with an HTTP status (google/rpc/code.proto). Where
/// several codes share a status, the one Google uses most for it wins.
fn canonical_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "OK",
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        500..=599 => "INTERNAL",
        _ => "UNKNOWN",
    }
}

/// The RFC 6749 error code that goes with a status, for injected OAuth-style faults. The
/// transient ones use the codes Google's auth libraries treat as retryable.
fn oauth_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "invalid_client",
        403 => "access_denied",
        429 | 503 => "temporarily_unavailable",
        500..=599 => "server_error",
        _ => "invalid_request",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(error: ApiError) -> (StatusCode, Value) {
        let response = error.into_response();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn rpc_errors_carry_the_canonical_status_name() {
        let (status, body) = body_json(ApiError::rpc(StatusCode::TOO_MANY_REQUESTS, "slow down")).await;
        assert_eq!(status, 429);
        assert_eq!(
            body,
            json!({"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"}})
        );
    }

    #[tokio::test]
    async fn injected_faults_follow_the_endpoint_shape() {
        let (_, sts) = body_json(ApiError::injected(Endpoint::Sts, StatusCode::SERVICE_UNAVAILABLE)).await;
        assert_eq!(sts["error"], "temporarily_unavailable");
        let (_, iam) = body_json(ApiError::injected(
            Endpoint::GenerateAccessToken,
            StatusCode::SERVICE_UNAVAILABLE,
        ))
        .await;
        assert_eq!(iam["error"]["status"], "UNAVAILABLE");
    }
}
