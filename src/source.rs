//! The credential that authenticates a call to Google, resolved from `spec.source`. Every reference
//! resolves in the TokenRequest's own namespace.

use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest as KubeTokenRequest, TokenRequestSpec as KubeTokenRequestSpec},
        core::v1::{Secret, ServiceAccount},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::reflector::{ObjectRef, Store},
};
use secrecy::SecretString;

use crate::{
    crd::TokenRequest,
    refresh::ErrorClass,
    render::stored_token,
    validation::{Source, validate},
};

/// A caller credential, with its expiry when known.
pub struct Credential {
    pub token: SecretString,
    pub expires_at: Option<Timestamp>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("ServiceAccount {name:?} does not exist")]
    ServiceAccountNotFound { name: String },
    #[error("minting a token for ServiceAccount {name:?} failed: {source}")]
    MintServiceAccountToken {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the TokenRequest API returned no token for ServiceAccount {name:?}")]
    EmptyServiceAccountToken { name: String },
    #[error("Secret {name:?} does not exist")]
    SecretNotFound { name: String },
    #[error("reading Secret {name:?} failed: {source}")]
    ReadSecret {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {name:?} has no non-empty key {key:?}")]
    SecretKeyMissing { name: String, key: String },
    #[error("TokenRequest {name:?} does not exist")]
    TokenRequestNotFound { name: String },
    #[error("TokenRequest {name:?} holds no valid token yet")]
    TokenRequestNotReady { name: String },
}

impl SourceError {
    /// Missing sources usually appear soon (created in the same apply), so they retry quickly.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::MintServiceAccountToken {
                source: kube::Error::Api(s),
                ..
            } if s.code < 500 && s.code != 429 => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        }
    }
}

/// Where sources are looked up.
pub struct Sources<'a> {
    pub client: &'a Client,
    pub namespace: &'a str,
    pub token_requests: &'a Store<TokenRequest>,
    pub managed_secrets: &'a Store<Secret>,
}

impl Sources<'_> {
    pub async fn resolve(&self, source: &Source) -> Result<Credential, SourceError> {
        match source {
            Source::ServiceAccountToken {
                service_account_name,
                audience,
                expiration_seconds,
            } => {
                self.service_account_token(service_account_name, audience, *expiration_seconds)
                    .await
            }
            Source::Secret { name, key } => self.secret_key(name, key).await,
            Source::TokenRequest { name } => self.token_request(name),
        }
    }

    async fn service_account_token(
        &self,
        name: &str,
        audience: &str,
        expiration_seconds: i64,
    ) -> Result<Credential, SourceError> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), self.namespace);
        let request = KubeTokenRequest {
            spec: KubeTokenRequestSpec {
                audiences: vec![audience.to_string()],
                expiration_seconds: Some(expiration_seconds),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let response: KubeTokenRequest = api
            .create_subresource("token", name, &PostParams::default(), &request)
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.is_not_found() => SourceError::ServiceAccountNotFound { name: name.into() },
                e => SourceError::MintServiceAccountToken {
                    name: name.into(),
                    source: e,
                },
            })?;
        let status = response.status.filter(|s| !s.token.is_empty());
        let status = status.ok_or_else(|| SourceError::EmptyServiceAccountToken { name: name.into() })?;
        Ok(Credential {
            token: SecretString::from(status.token),
            expires_at: Some(status.expiration_timestamp.0),
        })
    }

    async fn secret_key(&self, name: &str, key: &str) -> Result<Credential, SourceError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), self.namespace);
        let secret = api
            .get_opt(name)
            .await
            .map_err(|e| SourceError::ReadSecret {
                name: name.into(),
                source: e,
            })?
            .ok_or_else(|| SourceError::SecretNotFound { name: name.into() })?;
        let missing = || SourceError::SecretKeyMissing {
            name: name.into(),
            key: key.into(),
        };
        let value = secret.data.as_ref().and_then(|d| d.get(key)).ok_or_else(missing)?;
        // Token files often end with a newline, which is not part of the token.
        let token = String::from_utf8(value.0.clone())
            .map_err(|_| missing())?
            .trim()
            .to_string();
        if token.is_empty() {
            return Err(missing());
        }
        Ok(Credential {
            token: SecretString::from(token),
            expires_at: None,
        })
    }

    /// The token another TokenRequest currently holds: read from its Secret, and only if that
    /// Secret holds an unexpired token produced by that TokenRequest's current spec.
    fn token_request(&self, name: &str) -> Result<Credential, SourceError> {
        let not_ready = || SourceError::TokenRequestNotReady { name: name.into() };
        let upstream = self
            .token_requests
            .get(&ObjectRef::new(name).within(self.namespace))
            .ok_or_else(|| SourceError::TokenRequestNotFound { name: name.into() })?;
        let spec = validate(&upstream.spec, name).map_err(|_| not_ready())?;
        let secret = self
            .managed_secrets
            .get(&ObjectRef::new(&spec.secret.name).within(self.namespace))
            .ok_or_else(not_ready)?;
        let uid = upstream.metadata.uid.as_deref().unwrap_or_default();
        if !crate::render::is_controlled_by(&secret, uid) {
            return Err(not_ready());
        }
        let stored = stored_token(&secret, &spec.secret)
            .filter(|t| t.spec_hash == spec.token_hash)
            .ok_or_else(not_ready)?;
        if stored.record.expires_at <= Timestamp::now() {
            return Err(not_ready());
        }
        Ok(Credential {
            token: stored.record.token,
            expires_at: Some(stored.record.expires_at),
        })
    }

    /// When the upstream TokenRequest of a `tokenRequest` source last obtained a token, if known.
    pub fn upstream_issued_at(&self, source: &Source) -> Option<Timestamp> {
        let Source::TokenRequest { name } = source else {
            return None;
        };
        let upstream = self.token_requests.get(&ObjectRef::new(name).within(self.namespace))?;
        upstream.status.as_ref()?.last_refresh_time.as_ref().map(|t| t.0)
    }
}
