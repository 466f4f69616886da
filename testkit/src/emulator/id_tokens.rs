//! Google-signed ID tokens: the emulator's signing key, the claims Google puts in a service
//! account's ID token, and the key set published at `GET /oauth2/v3/certs`.

use std::time::Duration;

use axum::Json;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::call::Call;
use super::errors::ApiError;
use super::wire;

/// The `iss` of every ID token Google issues for a service account.
const ISSUER: &str = "https://accounts.google.com";

/// Why the emulator could not make its signing key.
#[derive(Debug, thiserror::Error)]
pub(super) enum KeyError {
    #[error("generating the ID token signing key: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("loading the ID token signing key: {0}")]
    Load(#[from] jsonwebtoken::errors::Error),
}

/// The RSA-2048 key ID tokens are signed with, made afresh for each emulator.
pub(super) struct IdTokenSigner {
    key: EncodingKey,
    kid: String,
    /// The public half, as the JWKS lists it.
    jwk: Jwk,
}

impl IdTokenSigner {
    pub(super) fn generate() -> Result<Self, KeyError> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?;
        let key = EncodingKey::from_rsa_pem(pair.serialize_pem().as_bytes())?;
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256)?;
        // Google's key IDs are 40 hex digits; derived from the key, so they differ between emulators.
        let digest = Sha256::digest(pair.public_key_pem());
        let kid: String = digest[..20].iter().map(|byte| format!("{byte:02x}")).collect();
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(Self { key, kid, jwk })
    }

    /// A compact RS256 JWT of `claims`, its header naming the key.
    pub(super) fn sign(&self, claims: &IdTokenClaims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key)
    }
}

/// The claims of a service account's ID token, in Google's names.
#[derive(Serialize)]
pub(super) struct IdTokenClaims<'a> {
    iss: &'static str,
    aud: &'a str,
    azp: String,
    sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email_verified: Option<bool>,
    iat: u64,
    exp: u64,
}

impl<'a> IdTokenClaims<'a> {
    /// Issued at `iat` (Unix seconds, by the emulator's clock) for `lifetime`. Both `azp` and
    /// `sub` are the account's numeric unique ID, as in Google's tokens.
    pub(super) fn new(email: &'a str, audience: &'a str, include_email: bool, iat: u64, lifetime: Duration) -> Self {
        let id = wire::numeric_id(&format!("serviceAccount:{email}"));
        Self {
            iss: ISSUER,
            aud: audience,
            azp: id.clone(),
            sub: id,
            email: include_email.then_some(email),
            email_verified: include_email.then_some(true),
            iat,
            exp: iat + lifetime.as_secs(),
        }
    }
}

/// `GET /oauth2/v3/certs`: the keys ID tokens are signed with, as a JWK set.
pub(super) fn certs(call: &Call) -> Result<Response, ApiError> {
    let keys = JwkSet {
        keys: vec![call.shared.id_tokens.jwk.clone()],
    };
    Ok(Json(keys).into_response())
}
