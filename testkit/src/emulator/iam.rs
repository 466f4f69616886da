//! IAM Credentials, `POST /v1/projects/-/serviceAccounts/{account}:generateAccessToken`.

use std::time::{Duration, SystemTime};

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::call::Call;
use super::errors::ApiError;
use super::state::DEFAULT_LIFETIME;
use super::wire;

const SERVICE: &str = "iamcredentials.googleapis.com";
/// 12 h, the ceiling even with the lifetime-extension org policy.
const MAX_LIFETIME: Duration = Duration::from_secs(43_200);
const DELEGATE_PREFIX: &str = "projects/-/serviceAccounts/";

pub(super) fn generate_access_token(call: &Call, project: &str, account: &str) -> Result<Response, ApiError> {
    let caller = call.caller(SERVICE)?;
    if project != "-" {
        return Err(ApiError::invalid_argument(format!(
            "Invalid resource name projects/{project}/serviceAccounts/{account}: the project must be the wildcard \"-\"."
        )));
    }
    let request = wire::json_request(call.body, &["scope", "lifetime", "delegates"])?;
    let scopes = wire::string_list_field(&request, "scope")?;
    if scopes.is_empty() {
        return Err(ApiError::invalid_argument("Scope required."));
    }
    let requested = match wire::string_field(&request, "lifetime")? {
        None => DEFAULT_LIFETIME,
        Some(text) => wire::parse_duration(text).ok_or_else(|| {
            ApiError::invalid_payload(format!(
                "Invalid value at 'lifetime' (type.googleapis.com/google.protobuf.Duration), \"{text}\""
            ))
        })?,
    };
    if requested.is_zero() || requested > MAX_LIFETIME {
        return Err(ApiError::invalid_argument(format!(
            "The lifetime must be positive and at most {}s.",
            MAX_LIFETIME.as_secs()
        )));
    }
    let mut delegates = Vec::new();
    for delegate in wire::string_list_field(&request, "delegates")? {
        let email = delegate.strip_prefix(DELEGATE_PREFIX).ok_or_else(|| {
            ApiError::invalid_argument(format!(
                "Delegate {delegate} must have the form {DELEGATE_PREFIX}EMAIL."
            ))
        })?;
        delegates.push(email.to_owned());
    }

    // Every hop of the chain caller → delegates… → target needs the token-creator grant on the next.
    let lifetime = {
        let state = call.shared.state();
        let mut principal = caller.principal;
        for target in delegates.iter().map(String::as_str).chain([account]) {
            if !state.may_impersonate(&principal, target) {
                return Err(permission_denied());
            }
            principal = format!("serviceAccount:{target}");
        }
        // A lifetime set by the test caps what the client asked for.
        state
            .lifetimes
            .get(&call.endpoint)
            .map_or(requested, |cap| requested.min(*cap))
    };
    let expires_at = SystemTime::now() + lifetime;
    let token = call.mint(format!("serviceAccount:{account}"), scopes, expires_at);
    Ok(Json(json!({ "accessToken": token, "expireTime": wire::rfc3339(call.on_clock(expires_at)) })).into_response())
}

/// Google's answer both when the caller lacks the permission and when the account does not exist.
fn permission_denied() -> ApiError {
    const PERMISSION: &str = "iam.serviceAccounts.getAccessToken";
    ApiError::rpc(
        StatusCode::FORBIDDEN,
        format!("Permission '{PERMISSION}' denied on resource (or it may not exist)."),
    )
    .with_detail(json!({
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "IAM_PERMISSION_DENIED",
        "domain": "iam.googleapis.com",
        "metadata": { "permission": PERMISSION },
    }))
}
