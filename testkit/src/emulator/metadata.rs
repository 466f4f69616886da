//! The metadata server's token endpoint,
//! `GET /computeMetadata/v1/instance/service-accounts/{default|EMAIL}/token[?scopes=a,b]`.

use std::time::SystemTime;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::call::Call;
use super::errors::ApiError;
use super::wire;

/// The scope of a GCE/GKE default service account.
const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

pub(super) fn token(call: &Call, account: &str) -> Result<Response, ApiError> {
    // The header guards against SSRF: a request relayed by some other server will not carry it.
    if call.header(axum::http::HeaderName::from_static("metadata-flavor")) != Some("Google") {
        return Err(ApiError::plain(
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header.",
        ));
    }
    let email = call.shared.state().metadata_account.clone();
    let Some(email) = email.filter(|email| account == "default" || account == email) else {
        return Err(ApiError::plain(
            StatusCode::NOT_FOUND,
            format!("Service account {account} not found."),
        ));
    };
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
