//! IAM Credentials, `POST /v1/projects/-/serviceAccounts/{account}:generateAccessToken` and
//! `...:generateIdToken`.

use std::time::{Duration, SystemTime};

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::call::Call;
use super::errors::ApiError;
use super::state::DEFAULT_LIFETIME;
use super::wire;

const SERVICE: &str = "iamcredentials.googleapis.com";
/// 12 h, the ceiling even with the lifetime-extension org policy.
const MAX_LIFETIME: Duration = Duration::from_secs(43_200);
const DELEGATE_PREFIX: &str = "projects/-/serviceAccounts/";

pub(super) fn generate_access_token(call: &Call, project: &str, account: &str) -> Result<Response, ApiError> {
    let request = Impersonation::parse(call, project, account, &["scope", "lifetime", "delegates"])?;
    let scopes = wire::string_list_field(&request.body, "scope")?;
    if scopes.is_empty() {
        return Err(ApiError::invalid_argument("Scope required."));
    }
    let requested = match wire::string_field(&request.body, "lifetime")? {
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
    request.authorize(call, "iam.serviceAccounts.getAccessToken")?;
    // A lifetime set by the test caps what the client asked for.
    let cap = call.shared.state().lifetimes.get(&call.endpoint).copied();
    let expires_at = SystemTime::now() + cap.map_or(requested, |cap| requested.min(cap));
    let token = call.mint(format!("serviceAccount:{account}"), scopes, expires_at);
    Ok(Json(json!({ "accessToken": token, "expireTime": wire::rfc3339(call.on_clock(expires_at)) })).into_response())
}

/// The answer is the bare JWT: its expiry is the `exp` claim, with no field of its own.
pub(super) fn generate_id_token(call: &Call, project: &str, account: &str) -> Result<Response, ApiError> {
    let request = Impersonation::parse(call, project, account, &["audience", "delegates", "includeEmail"])?;
    let audience = wire::string_field(&request.body, "audience")?
        .filter(|audience| !audience.is_empty())
        .ok_or_else(|| ApiError::invalid_argument("Audience required."))?;
    let include_email = wire::bool_field(&request.body, "includeEmail")?;
    request.authorize(call, "iam.serviceAccounts.getOpenIdToken")?;
    let token = call.mint_id_token(account, audience, include_email)?;
    Ok(Json(json!({ "token": token })).into_response())
}

/// What both methods check before their own fields: an authenticated caller, the wildcard
/// project, a body of known fields and well-formed delegates.
struct Impersonation<'a> {
    caller: String,
    account: &'a str,
    delegates: Vec<String>,
    body: Map<String, Value>,
}

impl<'a> Impersonation<'a> {
    fn parse(call: &Call, project: &str, account: &'a str, fields: &[&str]) -> Result<Self, ApiError> {
        let caller = call.caller(SERVICE)?;
        if project != "-" {
            return Err(ApiError::invalid_argument(format!(
                "Invalid resource name projects/{project}/serviceAccounts/{account}: the project must be the wildcard \"-\"."
            )));
        }
        let body = wire::json_request(call.body, fields)?;
        let mut delegates = Vec::new();
        for delegate in wire::string_list_field(&body, "delegates")? {
            let email = delegate.strip_prefix(DELEGATE_PREFIX).ok_or_else(|| {
                ApiError::invalid_argument(format!(
                    "Delegate {delegate} must have the form {DELEGATE_PREFIX}EMAIL."
                ))
            })?;
            delegates.push(email.to_owned());
        }
        Ok(Self {
            caller: caller.principal,
            account,
            delegates,
            body,
        })
    }

    /// Every hop of the chain caller → delegates… → target needs the token-creator grant on the
    /// next; a missing hop is denied as `permission`, as is an account that does not exist.
    fn authorize(&self, call: &Call, permission: &str) -> Result<(), ApiError> {
        let state = call.shared.state();
        let mut principal = self.caller.clone();
        for target in self.delegates.iter().map(String::as_str).chain([self.account]) {
            if !state.may_impersonate(&principal, target) {
                return Err(ApiError::permission_denied(permission, None));
            }
            principal = format!("serviceAccount:{target}");
        }
        Ok(())
    }
}
