//! The context a handler answers one request with: the request itself, the emulator state, and
//! the helpers every API shares (bearer authentication, minting).

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::json;

use super::errors::ApiError;
use super::faults::Shaping;
use super::id_tokens::IdTokenClaims;
use super::state::{Shared, Standing, TokenKind};
use super::{Endpoint, IssuedToken, wire};

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
        let (message, reason) = {
            let state = self.shared.state();
            // ID and repository tokens are not OAuth access tokens: Google does not know them as such.
            match token.map(|t| state.standing(t, |kind| *kind == TokenKind::Access)) {
                Some(Standing::Live(info)) => return Ok(info.clone()),
                Some(Standing::Dead) => (INVALID_CREDENTIALS, "ACCESS_TOKEN_EXPIRED"),
                Some(Standing::Unknown) => (INVALID_CREDENTIALS, "ACCESS_TOKEN_TYPE_UNSUPPORTED"),
                None => (MISSING_CREDENTIALS, "CREDENTIALS_MISSING"),
            }
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

    /// Issues an access token for `principal`, or returns an empty one (issuing nothing) when a
    /// scripted fault says the answer carries no token.
    pub(super) fn mint(&self, principal: String, scopes: Vec<String>, expires_at: SystemTime) -> String {
        self.mint_kind(TokenKind::Access, principal, scopes, expires_at)
    }

    /// [`Call::mint`] for a token of any opaque kind.
    pub(super) fn mint_kind(
        &self,
        kind: TokenKind,
        principal: String,
        scopes: Vec<String>,
        expires_at: SystemTime,
    ) -> String {
        if self.withholds_token() {
            return String::new();
        }
        let info = self.issued(principal, scopes, expires_at);
        self.shared.state().issue(info, kind)
    }

    /// Issues a signed ID token for the service account `email`, valid for this endpoint's
    /// lifetime; empty (issuing nothing) when a scripted fault says the answer carries no token.
    pub(super) fn mint_id_token(&self, email: &str, audience: &str, include_email: bool) -> Result<String, ApiError> {
        if self.withholds_token() {
            return Ok(String::new());
        }
        let lifetime = self.lifetime();
        let now = SystemTime::now();
        // `iat` and `exp` are absolute times, so they read the emulator's clock.
        let iat = wire::unix_secs(self.on_clock(now));
        let claims = IdTokenClaims::new(email, audience, include_email, iat, lifetime);
        let token = self
            .shared
            .id_tokens
            .sign(&claims)
            .map_err(|error| ApiError::internal(self.endpoint, format!("Signing the ID token failed: {error}")))?;
        let info = self.issued(format!("serviceAccount:{email}"), Vec::new(), now + lifetime);
        self.shared.state().record(token.clone(), info, TokenKind::Id);
        Ok(token)
    }

    fn withholds_token(&self) -> bool {
        self.shaping.as_ref().is_some_and(Shaping::withholds_token)
    }

    fn issued(&self, principal: String, scopes: Vec<String>, expires_at: SystemTime) -> IssuedToken {
        IssuedToken {
            principal,
            endpoint: self.endpoint,
            expires_at,
            scopes,
        }
    }
}

const MISSING_CREDENTIALS: &str = "Request is missing required authentication credential. Expected OAuth 2 access \
     token, login cookie or other valid authentication credential. See \
     https://developers.google.com/identity/sign-in/web/devconsole-project.";
const INVALID_CREDENTIALS: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, \
     login cookie or other valid authentication credential. See \
     https://developers.google.com/identity/sign-in/web/devconsole-project.";
