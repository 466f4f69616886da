//! The context a handler answers one request with: the request itself, the emulator state, and
//! the helpers every API shares (bearer authentication, minting).

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::json;

use super::errors::ApiError;
use super::faults::Shaping;
use super::state::Shared;
use super::{Endpoint, IssuedToken};

pub(super) struct Call<'a> {
    pub(super) shared: &'a Shared,
    pub(super) endpoint: Endpoint,
    pub(super) headers: &'a HeaderMap,
    pub(super) query: &'a str,
    pub(super) body: &'a [u8],
    /// A scripted fault that alters the success body.
    pub(super) shaping: Option<Shaping>,
}

impl Call<'_> {
    pub(super) fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The caller of the Google REST API `service`: the token in `Authorization: Bearer`, which
    /// must be one this emulator issued and that has not expired. Fails like Google's front end.
    pub(super) fn caller(&self, service: &str) -> Result<IssuedToken, ApiError> {
        let token = self.header(header::AUTHORIZATION).and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        let (message, reason) = match token.map(|t| self.shared.state().tokens.get(t).cloned()) {
            Some(Some(info)) if info.expires_at > SystemTime::now() => return Ok(info),
            Some(Some(_)) => (INVALID_CREDENTIALS, "ACCESS_TOKEN_EXPIRED"),
            Some(None) => (INVALID_CREDENTIALS, "ACCESS_TOKEN_TYPE_UNSUPPORTED"),
            None => (MISSING_CREDENTIALS, "CREDENTIALS_MISSING"),
        };
        Err(ApiError::rpc(StatusCode::UNAUTHORIZED, message)
            .with_detail(json!({
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
                "metadata": { "service": service },
            }))
            .with_header(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"https://accounts.google.com/\""),
            ))
    }

    /// The lifetime of tokens this endpoint issues.
    pub(super) fn lifetime(&self) -> Duration {
        self.shared.state().lifetime(self.endpoint)
    }

    /// When a token issued now by this endpoint expires.
    pub(super) fn expiry(&self) -> SystemTime {
        SystemTime::now() + self.lifetime()
    }

    /// The real time `t` as the emulator's clock reads it: how absolute times are answered.
    pub(super) fn on_clock(&self, t: SystemTime) -> SystemTime {
        self.shared.state().on_clock(t)
    }

    /// Issues a token for `principal`, or returns an empty one (issuing nothing) when a scripted
    /// fault says the answer carries no token.
    pub(super) fn mint(&self, principal: String, scopes: Vec<String>, expires_at: SystemTime) -> String {
        if self.shaping.as_ref().is_some_and(Shaping::withholds_token) {
            return String::new();
        }
        let info = IssuedToken {
            principal,
            endpoint: self.endpoint,
            expires_at,
            scopes,
        };
        self.shared.state().issue(info)
    }
}

const MISSING_CREDENTIALS: &str = "Request is missing required authentication credential. Expected OAuth 2 access \
     token, login cookie or other valid authentication credential. See \
     https://developers.google.com/identity/sign-in/web/devconsole-project.";
const INVALID_CREDENTIALS: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, \
     login cookie or other valid authentication credential. See \
     https://developers.google.com/identity/sign-in/web/devconsole-project.";
