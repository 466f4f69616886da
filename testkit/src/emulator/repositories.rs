//! Developer Connect repository tokens: `POST /v1/{gitRepositoryLink}:fetchReadToken` and
//! `:fetchReadWriteToken`, the tokens CI and GitOps systems clone (and push) with.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::call::Call;
use super::connectors::{DEVELOPER_CONNECT, preflight};
use super::errors::ApiError;
use super::faults::Shaping;
use super::state::TokenKind;
use super::wire;

/// The body must be empty. Readers of the link may fetch read tokens, writers both kinds.
pub(super) fn fetch_token(call: &Call, link: &str, write: bool) -> Result<Response, ApiError> {
    let (caller, _) = preflight(call, DEVELOPER_CONNECT, link, &[], |s, name| {
        s.git_repository_links.contains_key(name)
    })?;
    let git_username = {
        let state = call.shared.state();
        if !state.may_fetch(&caller.principal, link, write) {
            let permission = if write {
                "developerconnect.gitRepositoryLinks.fetchReadWriteToken"
            } else {
                "developerconnect.gitRepositoryLinks.fetchReadToken"
            };
            return Err(ApiError::permission_denied(permission, Some(link)));
        }
        // The link exists: `preflight` checked.
        let registered = state.git_repository_links.get(link);
        registered.map(|l| l.git_username.clone()).unwrap_or_default()
    };
    let expires_at = call.expiry();
    let kind = TokenKind::Repository {
        link: link.to_owned(),
        write,
    };
    let token = call.mint_kind(kind, caller.principal, Vec::new(), expires_at);
    let expiration = if matches!(call.shaping, Some(Shaping::EmptyExpiration)) {
        String::new()
    } else {
        wire::rfc3339(call.on_clock(expires_at))
    };
    Ok(Json(json!({ "token": token, "expirationTime": expiration, "gitUsername": git_username })).into_response())
}
