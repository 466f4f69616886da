//! The OAuth 2.0 endpoints of `oauth2.googleapis.com`: `POST /token` for service account keys
//! (JWT bearer grant) and authorized users (refresh-token grant), and `GET /tokeninfo`.

use std::collections::HashMap;
use std::time::SystemTime;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::json;

use super::call::Call;
use super::errors::ApiError;
use super::wire;

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// What an authorized user's refresh yields when the request names no scope.
const DEFAULT_USER_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Clock skew Google tolerates on `iat`.
const SKEW_SECS: u64 = 60;

pub(super) fn token(call: &Call) -> Result<Response, ApiError> {
    let params = wire::form(call.body);
    let param = |name: &str| params.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let (principal, scopes) = match param("grant_type") {
        Some(JWT_BEARER) => jwt_bearer(call, param("assertion"))?,
        Some("refresh_token") => refresh(call, &params)?,
        Some(other) => {
            return Err(ApiError::oauth(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("Invalid grant_type: {other}"),
            ));
        }
        None => return Err(ApiError::invalid_request("Missing required parameter: grant_type")),
    };
    let lifetime = call.lifetime();
    let scope = scopes.join(" ");
    let token = call.mint(principal, scopes, SystemTime::now() + lifetime);
    Ok(Json(json!({
        "access_token": token,
        "expires_in": lifetime.as_secs(),
        "token_type": "Bearer",
        "scope": scope,
    }))
    .into_response())
}

/// A service account's self-signed JWT (RS256, `kid` = key ID) exchanged for a token for the
/// account, or for the user in `sub` under domain-wide delegation.
fn jwt_bearer(call: &Call, assertion: Option<&str>) -> Result<(String, Vec<String>), ApiError> {
    #[derive(Default, Deserialize)]
    #[serde(default)]
    struct Claims {
        iss: String,
        aud: String,
        scope: String,
        iat: u64,
        exp: u64,
        sub: Option<String>,
    }
    let assertion = assertion.ok_or_else(|| ApiError::invalid_request("Missing required parameter: assertion"))?;
    let bad_signature = || ApiError::invalid_grant("Invalid JWT Signature.");
    let kid = jsonwebtoken::decode_header(assertion)
        .ok()
        .and_then(|h| h.kid)
        .ok_or_else(bad_signature)?;
    let claims = {
        let state = call.shared.state();
        let key = state.keys.get(&kid).ok_or_else(bad_signature)?;
        // Only the signature is checked here; the claims get Google's own error messages below.
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<Claims>(assertion, &key.key, &validation).map_err(|_| bad_signature())?;
        if claims.claims.iss != key.client_email {
            return Err(bad_signature());
        }
        claims.claims
    };

    // The emulator also answers to its own URL, as seen by the client (over HTTP or HTTPS) or configured.
    let host = call.header(header::HOST);
    let own_uris = [
        Some(format!("{}/token", call.shared.base_url)),
        host.map(|host| format!("http://{host}/token")),
        host.map(|host| format!("https://{host}/token")),
    ];
    if claims.aud != GOOGLE_TOKEN_URI && !own_uris.contains(&Some(claims.aud.clone())) {
        return Err(ApiError::invalid_grant(format!(
            "Invalid JWT: Failed audience check. The right audience is {GOOGLE_TOKEN_URI}"
        )));
    }
    let now = wire::unix_secs(SystemTime::now());
    if claims.iat > now + SKEW_SECS || claims.exp <= now || claims.exp <= claims.iat || claims.exp - claims.iat > 3600 {
        return Err(ApiError::invalid_grant(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. \
             Check your iat and exp values in the JWT claim.",
        ));
    }
    let scopes = wire::scope_list(&claims.scope);
    if scopes.is_empty() {
        return Err(ApiError::oauth(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.",
        ));
    }
    let principal = match claims.sub {
        Some(user) if !user.is_empty() => format!("user:{user}"),
        _ => format!("serviceAccount:{}", claims.iss),
    };
    Ok((principal, scopes))
}

/// An `authorized_user` refresh: client first (401), then the refresh token (400).
fn refresh(call: &Call, params: &HashMap<String, String>) -> Result<(String, Vec<String>), ApiError> {
    let param = |name: &str| params.get(name).map_or("", String::as_str);
    let state = call.shared.state();
    let same_client = || state.users.iter().filter(|u| u.client_id == param("client_id"));
    if same_client().next().is_none() {
        return Err(ApiError::oauth(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "The OAuth client was not found.",
        ));
    }
    let mut same_secret = same_client()
        .filter(|u| u.client_secret == param("client_secret"))
        .peekable();
    if same_secret.peek().is_none() {
        return Err(ApiError::oauth(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Unauthorized",
        ));
    }
    let user = same_secret
        .find(|u| u.refresh_token == param("refresh_token"))
        .ok_or_else(|| ApiError::invalid_grant("Token has been expired or revoked."))?;
    let scope = Some(param("scope"))
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_USER_SCOPE);
    Ok((format!("user:{}", user.user), wire::scope_list(scope)))
}

/// `GET /tokeninfo?access_token=...`: what Google knows about a live token. Values are strings,
/// as in Google's answer.
pub(super) fn token_info(call: &Call) -> Result<Response, ApiError> {
    let invalid = || ApiError::oauth(StatusCode::BAD_REQUEST, "invalid_token", "Invalid Value");
    let query = wire::form(call.query.as_bytes());
    let token = query.get("access_token").ok_or_else(invalid)?;
    let info = call.shared.state().live_token(token).cloned().ok_or_else(invalid)?;
    let id = wire::numeric_id(&info.principal);
    let mut body = json!({
        "azp": id,
        "aud": id,
        "sub": id,
        "scope": info.scopes.join(" "),
        "exp": wire::unix_secs(info.expires_at).to_string(),
        "expires_in": wire::secs_until(info.expires_at).to_string(),
        "access_type": "online",
    });
    let email = info
        .principal
        .strip_prefix("serviceAccount:")
        .or_else(|| info.principal.strip_prefix("user:"));
    if let Some(email) = email {
        body["email"] = json!(email);
        body["email_verified"] = json!("true");
    }
    Ok(Json(body).into_response())
}
