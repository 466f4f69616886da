//! The metadata server's credentials of its own identity:
//! `GET /computeMetadata/v1/instance/service-accounts/{default|EMAIL}/token[?scopes=a,b]` and
//! `.../identity?audience=AUD[&format=standard|full][&licenses=TRUE|FALSE]`.

use std::time::SystemTime;

use axum::Json;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::call::Call;
use super::errors::ApiError;
use super::wire;

/// The scope of a GCE/GKE default service account.
const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

pub(super) fn token(call: &Call, account: &str) -> Result<Response, ApiError> {
    let email = identity(call, account)?;
    let query = wire::form(call.query.as_bytes());
    let scopes = match query.get("scopes").filter(|s| !s.is_empty()) {
        Some(list) => list.split(',').map(str::to_owned).collect(),
        None => vec![DEFAULT_SCOPE.to_owned()],
    };
    let lifetime = call.lifetime();
    let token = call.mint(format!("serviceAccount:{email}"), scopes, SystemTime::now() + lifetime);
    Ok(Json(json!({
        "access_token": token,
        "expires_in": lifetime.as_secs(),
        "token_type": "Bearer",
    }))
    .into_response())
}

/// The body is the bare JWT, served as HTML like the real server does. `format=full` adds the
/// email claims; `licenses` only adds to the `google.compute_engine` claim, which the emulator
/// leaves out, so it is accepted and has no effect.
pub(super) fn identity_token(call: &Call, account: &str) -> Result<Response, ApiError> {
    let email = identity(call, account)?;
    let query = wire::form(call.query.as_bytes());
    let audience = query
        .get("audience")
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::plain(StatusCode::BAD_REQUEST, "non-empty audience parameter required"))?;
    let include_email = match query.get("format").map(String::as_str) {
        None | Some("standard") => false,
        Some("full") => true,
        Some(other) => {
            return Err(ApiError::plain(
                StatusCode::BAD_REQUEST,
                format!("invalid format {other:?}: must be \"standard\" or \"full\""),
            ));
        }
    };
    let token = call.mint_id_token(&email, audience, include_email)?;
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], token).into_response())
}

/// The metadata server's account, if the request is a metadata request for it.
fn identity(call: &Call, account: &str) -> Result<String, ApiError> {
    // The header guards against SSRF: a request relayed by some other server will not carry it.
    if call.header(HeaderName::from_static("metadata-flavor")) != Some("Google") {
        return Err(ApiError::plain(
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header.",
        ));
    }
    let email = call.shared.state().metadata_account.clone();
    email
        .filter(|email| account == "default" || account == email)
        .ok_or_else(|| ApiError::plain(StatusCode::NOT_FOUND, format!("Service account {account} not found.")))
}
