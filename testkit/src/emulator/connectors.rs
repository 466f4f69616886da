//! The two APIs that hand out a third-party OAuth token stored for the calling user: Developer
//! Connect `users:fetchAccessToken` and Discovery Engine `dataConnector:acquireAccessToken`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::call::Call;
use super::errors::ApiError;
use super::faults::Shaping;
use super::state::State;
use super::{IssuedToken, wire};

pub(super) const DEVELOPER_CONNECT: &str = "developerconnect.googleapis.com";
const DISCOVERY_ENGINE: &str = "discoveryengine.googleapis.com";
/// The scopes the emulated third-party provider granted (a GitHub-like connector).
const PROVIDER_SCOPES: [&str; 2] = ["repo", "read:user"];

/// `POST /v1/{accountConnector}/users:fetchAccessToken`. The body must be empty; errors at the
/// provider come back inside a 200 as `exchangeError`.
pub(super) fn fetch_access_token(call: &Call, connector: &str) -> Result<Response, ApiError> {
    let (caller, _) = preflight(call, DEVELOPER_CONNECT, connector, &[], |s, name| {
        s.account_connectors.contains(name)
    })?;
    let expires_at = call.expiry();
    let token = call.mint(caller.principal, provider_scopes(), expires_at);
    let mut body = json!({
        "token": token,
        "expirationTime": wire::rfc3339(call.on_clock(expires_at)),
        "scopes": PROVIDER_SCOPES,
    });
    match &call.shaping {
        Some(Shaping::ExchangeError { code, description }) => {
            body["expirationTime"] = json!("");
            body["scopes"] = json!([]);
            body["exchangeError"] = json!({ "code": code, "description": description });
        }
        Some(Shaping::EmptyExpiration) => body["expirationTime"] = json!(""),
        Some(Shaping::EmptyToken) | None => {}
    }
    Ok(Json(body).into_response())
}

/// `POST /v1alpha/{dataConnector}:acquireAccessToken`, body `{scope?, action?}`. The answer
/// carries no expiry; the emulator still expires the token after the configured lifetime.
pub(super) fn acquire_access_token(call: &Call, data_connector: &str) -> Result<Response, ApiError> {
    let fields = ["scope", "action"];
    let (caller, request) = preflight(call, DISCOVERY_ENGINE, data_connector, &fields, |s, name| {
        s.data_connectors.contains(name)
    })?;
    let scopes = match wire::string_field(&request, "scope")? {
        Some(scope) => wire::scope_list(scope),
        None => provider_scopes(),
    };
    // `action` only steers incremental authorization at Google; here it just has to be a string.
    wire::string_field(&request, "action")?;
    let token = call.mint(caller.principal, scopes.clone(), call.expiry());
    Ok(Json(json!({ "accessToken": token, "refreshTokenInfo": { "scopes": scopes } })).into_response())
}

/// What these APIs (and Developer Connect's repository tokens) check first: an authenticated
/// caller, a well-formed body and a resource that `exists`.
pub(super) fn preflight(
    call: &Call,
    service: &str,
    name: &str,
    fields: &[&str],
    exists: fn(&State, &str) -> bool,
) -> Result<(IssuedToken, Map<String, Value>), ApiError> {
    let caller = call.caller(service)?;
    let request = wire::json_request(call.body, fields)?;
    if !exists(&call.shared.state(), name) {
        let error = ApiError::rpc(StatusCode::NOT_FOUND, format!("Resource '{name}' was not found"))
            .with_detail(json!({ "@type": "type.googleapis.com/google.rpc.ResourceInfo", "resourceName": name }));
        return Err(error);
    }
    Ok((caller, request))
}

fn provider_scopes() -> Vec<String> {
    PROVIDER_SCOPES.map(str::to_owned).to_vec()
}
