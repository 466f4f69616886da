//! The credential that authenticates a call to Google, resolved from `spec.source`. Every reference
//! resolves in the TokenRequest's own namespace.
//!
//! Credentials the operator mints itself (from credential files, or as its own identity) are kept
//! until their refresh point and shared by every TokenRequest that presents the same credential
//! material for the same scopes; identical mints in flight are made once.

use std::{path::PathBuf, sync::Arc};

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
use secrecy::{ExposeSecret, SecretString};

use crate::{
    crd::{SecretFormat, TokenRequest},
    credentials::{self, Content, CredentialFile, FileError},
    google::{GoogleClient, GoogleError, IssuedToken},
    refresh::{self, ErrorClass},
    render::{TokenRecord, stored_token},
    singleflight::{Key, SingleFlight},
    status::Reason,
    validation::{
        DEFAULT_RENEW_BEFORE_PERCENTAGE, Flow, Placement, Policy, RefreshPolicy, RenewBefore, Source, SubjectToken,
        validate,
    },
};

/// Secrets of this type hold a ServiceAccount's long-lived token; never a source.
const SERVICE_ACCOUNT_TOKEN_TYPE: &str = "kubernetes.io/service-account-token";

/// A caller credential, with its expiry when known.
#[derive(Clone)]
pub struct Credential {
    pub token: SecretString,
    pub expires_at: Option<Timestamp>,
    /// The key it is kept under, when the operator minted it from a credential file or its own
    /// identity.
    pub kept_as: Option<Key>,
}

impl Credential {
    fn given(token: SecretString, expires_at: Option<Timestamp>) -> Self {
        Self {
            token,
            expires_at,
            kept_as: None,
        }
    }
}

/// Credentials the operator minted, by key.
pub type KeptCredentials = SingleFlight<Credential, MintError>;

/// Why the operator could not mint a credential. One failure reaches everyone who waited for the
/// same mint, in whichever namespace, so it names nothing of any one caller's: each adds its own
/// `origin` (see `SourceError::Exchange`).
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("signing the JWT failed: {0}")]
    Sign(#[source] FileError),
    #[error(transparent)]
    Google(GoogleError),
}

impl MintError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Sign(_) => ErrorClass::Permanent,
            Self::Google(e) => e.class(),
        }
    }

    fn reason(&self) -> Reason {
        match self {
            Self::Sign(_) => Reason::InvalidSpec,
            Self::Google(e) => e.reason(),
        }
    }

    fn google(&self) -> Option<&GoogleError> {
        match self {
            Self::Google(e) => Some(e),
            Self::Sign(_) => None,
        }
    }
}

/// Where the operator's own Google identity (`source.ambient`) comes from.
#[derive(Clone, Debug, Default)]
pub enum Ambient {
    /// The GCE/GKE metadata server.
    #[default]
    MetadataServer,
    /// A `service_account` or `authorized_user` file given to the operator.
    File(PathBuf),
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
    #[error(
        "TokenRequest {name:?} holds a token of the {flow} flow, which is not a Google access token and \
         authenticates no call to Google"
    )]
    TokenRequestNotAccessToken { name: String, flow: &'static str },
    #[error("{origin}: {source}")]
    File {
        origin: String,
        #[source]
        source: FileError,
    },
    #[error(
        "Secret {name:?} holds a ServiceAccount's long-lived token, which is never a source; \
         use source.serviceAccountToken, which mints a short-lived token for one audience"
    )]
    ServiceAccountTokenSecret { name: String },
    #[error("{origin} holds an external_account file: spec.source.secret.subjectToken must name its subject token")]
    NoSubjectToken { origin: String },
    #[error("{origin} holds no external_account file: spec.source.secret.subjectToken is not used with it")]
    SubjectTokenUnused { origin: String },
    #[error("the operator's credentials file is unusable: {0}")]
    AmbientFile(String),
    #[error(
        "an ID token for the operator's own identity comes from the metadata server, and the operator runs \
         with a credentials file: name spec.flow.idToken.serviceAccount"
    )]
    NoAmbientIdToken,
    #[error("obtaining a token for {identity} ({origin}) failed: {source}")]
    Exchange {
        identity: String,
        origin: String,
        #[source]
        source: Arc<MintError>,
    },
}

impl SourceError {
    /// Missing sources usually appear soon (created in the same apply), so they retry quickly.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::MintServiceAccountToken {
                source: kube::Error::Api(s),
                ..
            } if s.code < 500 && s.code != 429 => ErrorClass::Permanent,
            _ if self.is_spec_problem() => ErrorClass::Permanent,
            Self::Exchange { source, .. } => source.class(),
            _ => ErrorClass::Transient,
        }
    }

    /// The status condition reason: what the source holds is the spec's problem; what Google
    /// says of it is reported as Google's answer.
    pub fn reason(&self) -> Reason {
        match self {
            _ if self.is_spec_problem() => Reason::InvalidSpec,
            Self::Exchange { source, .. } => source.reason(),
            _ => Reason::SourceNotReady,
        }
    }

    /// The source exists but cannot serve as the spec says: only a change fixes it.
    fn is_spec_problem(&self) -> bool {
        matches!(
            self,
            Self::File { .. }
                | Self::ServiceAccountTokenSecret { .. }
                | Self::NoSubjectToken { .. }
                | Self::SubjectTokenUnused { .. }
                | Self::NoAmbientIdToken
                | Self::TokenRequestNotAccessToken { .. }
        )
    }

    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::Exchange { source, .. } => source.google()?.retry_after(),
            _ => None,
        }
    }

    pub fn throttled(&self) -> Option<std::time::Duration> {
        match self {
            Self::Exchange { source, .. } => source.google()?.throttled(),
            _ => None,
        }
    }
}

/// Where sources are looked up, and what the operator keeps of them.
pub struct Sources<'a> {
    pub client: &'a Client,
    pub namespace: &'a str,
    pub token_requests: &'a Store<TokenRequest>,
    pub managed_secrets: &'a Store<Secret>,
    pub policy: &'a Policy,
    pub google: &'a GoogleClient,
    pub kept: &'a KeptCredentials,
    pub ambient: &'a Ambient,
}

impl Sources<'_> {
    /// The caller credential `source` stands for. `scopes` are those of a credential the operator
    /// mints itself (see `validation::caller_scopes`).
    pub async fn resolve(&self, source: &Source, scopes: &[String]) -> Result<Credential, Arc<SourceError>> {
        match source {
            Source::ServiceAccountToken {
                service_account_name,
                audience,
                expiration_seconds,
            } => Ok(mint_service_account_token(
                self.client,
                self.namespace,
                service_account_name,
                audience,
                *expiration_seconds,
            )
            .await?),
            Source::Secret {
                name,
                key,
                format,
                subject_token,
            } => self.secret(name, key, *format, subject_token.as_ref(), scopes).await,
            Source::TokenRequest { name } => Ok(self.token_request(name)?),
            Source::Ambient => self.ambient(scopes).await,
        }
    }

    /// Whether the operator's own identity can issue its own ID tokens: only the metadata server
    /// can.
    pub fn check_ambient_id_token(&self) -> Result<(), Arc<SourceError>> {
        match self.ambient {
            Ambient::MetadataServer => Ok(()),
            Ambient::File(_) => Err(Arc::new(SourceError::NoAmbientIdToken)),
        }
    }

    /// Forgets a kept credential that Google did not accept, so that the next attempt mints anew.
    pub fn forget(&self, credential: &Credential) {
        if let Some(key) = &credential.kept_as {
            self.kept.forget(key);
        }
    }

    async fn secret(
        &self,
        name: &str,
        key: &str,
        format: SecretFormat,
        subject_token: Option<&SubjectToken>,
        scopes: &[String],
    ) -> Result<Credential, Arc<SourceError>> {
        let value = read_secret_key(self.client, self.namespace, name, key).await?;
        let origin = format!("Secret {name:?} key {key:?}");
        let content = credentials::parse(value.expose_secret(), format, self.google.endpoints()).map_err(|source| {
            SourceError::File {
                origin: origin.clone(),
                source,
            }
        })?;
        let exchange = match (content, subject_token) {
            (Content::Token(token), None) => return Ok(Credential::given(token, None)),
            (Content::File(CredentialFile::ExternalAccount(file)), Some(subject)) => {
                let subject = self.subject(subject, &file.audience).await?;
                Exchange::Federation(file, subject)
            }
            (Content::File(CredentialFile::ExternalAccount(_)), None) => {
                return Err(SourceError::NoSubjectToken { origin }.into());
            }
            (Content::File(CredentialFile::ServiceAccountKey(key)), None) => Exchange::ServiceAccountKey(key),
            (Content::File(CredentialFile::AuthorizedUser(user)), None) => Exchange::AuthorizedUser(user),
            (_, Some(_)) => return Err(SourceError::SubjectTokenUnused { origin }.into()),
        };
        self.mint(exchange, value.expose_secret().as_bytes(), scopes, origin)
            .await
    }

    /// The subject token, read or minted now: the federated token is kept under its value, or
    /// under the identity of the ServiceAccount it was minted for (`file_audience`: the audience
    /// unless the spec names one).
    async fn subject(&self, subject: &SubjectToken, file_audience: &str) -> Result<Subject, SourceError> {
        Ok(match subject {
            SubjectToken::Secret { name, key } => {
                Subject::Given(read_secret_key(self.client, self.namespace, name, key).await?)
            }
            SubjectToken::ServiceAccountToken {
                service_account_name,
                audience,
                expiration_seconds,
            } => {
                let audience = audience.as_deref().unwrap_or(file_audience);
                let minted = mint_service_account_token(
                    self.client,
                    self.namespace,
                    service_account_name,
                    audience,
                    *expiration_seconds,
                )
                .await?;
                Subject::ServiceAccount {
                    uid: service_account_uid(minted.token.expose_secret()),
                    token: minted.token,
                    name: service_account_name.clone(),
                    audience: audience.to_string(),
                    expiration_seconds: *expiration_seconds,
                }
            }
        })
    }

    /// The operator's own identity: its credentials file, or the metadata server.
    async fn ambient(&self, scopes: &[String]) -> Result<Credential, Arc<SourceError>> {
        let Ambient::File(path) = self.ambient else {
            return self
                .mint(Exchange::MetadataServer, &[], scopes, "metadata server".into())
                .await;
        };
        let unusable = |problem: String| Arc::new(SourceError::AmbientFile(problem));
        let value = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| unusable(format!("reading it failed: {e}")))?;
        let exchange = match credentials::parse(&value, SecretFormat::Auto, self.google.endpoints()) {
            Ok(Content::File(CredentialFile::ServiceAccountKey(key))) => Exchange::ServiceAccountKey(key),
            Ok(Content::File(CredentialFile::AuthorizedUser(user))) => Exchange::AuthorizedUser(user),
            Ok(_) => return Err(unusable("it is not a service_account or authorized_user file".into())),
            Err(e) => return Err(unusable(e.to_string())),
        };
        let origin = "the operator's credentials file".to_string();
        self.mint(exchange, value.as_bytes(), scopes, origin).await
    }

    /// Mints a credential from `material` once for everyone who presents the same material for
    /// the same scopes, and keeps it until its refresh point.
    async fn mint(
        &self,
        exchange: Exchange,
        material: &[u8],
        scopes: &[String],
        origin: String,
    ) -> Result<Credential, Arc<SourceError>> {
        let key = exchange.key(self.namespace, scopes, material);
        let identity = exchange.identity();
        let google = self.google.clone();
        let scopes = scopes.to_vec();
        let call = async move {
            let issued = match exchange {
                Exchange::ServiceAccountKey(sa) => {
                    let audience = google.endpoints().oauth_token_url();
                    let now = Timestamp::now().as_second();
                    let assertion = sa
                        .sign_assertion(scopes.clone(), audience, now)
                        .await
                        .map_err(MintError::Sign)?;
                    google.jwt_bearer(&assertion, &scopes).await
                }
                Exchange::AuthorizedUser(user) => {
                    google
                        .refresh_access_token(&user.client_id, &user.client_secret, &user.refresh_token, &scopes)
                        .await
                }
                Exchange::Federation(file, subject) => google.federate(&file.exchange(scopes), subject.token()).await,
                Exchange::MetadataServer => google.metadata_token(&scopes).await,
            };
            let IssuedToken { token, expires_at, .. } = issued.map_err(MintError::Google)?;
            Ok(Credential {
                token,
                expires_at,
                kept_as: Some(key),
            })
        };
        kept_or_minted(self.kept, key, call, identity, origin).await
    }

    /// The token another TokenRequest currently holds: read from its Secret, and only if that
    /// Secret holds an unexpired token produced by that TokenRequest's current spec.
    fn token_request(&self, name: &str) -> Result<Credential, SourceError> {
        let stored = self.upstream_token(name)?;
        if stored.expires_at <= Timestamp::now() {
            return Err(SourceError::TokenRequestNotReady { name: name.into() });
        }
        Ok(Credential::given(stored.token, Some(stored.expires_at)))
    }

    /// The token record in the Secret of another TokenRequest, if its current spec produced it.
    fn upstream_token(&self, name: &str) -> Result<TokenRecord, SourceError> {
        let not_ready = || SourceError::TokenRequestNotReady { name: name.into() };
        let upstream = self
            .token_requests
            .get(&ObjectRef::new(name).within(self.namespace))
            .ok_or_else(|| SourceError::TokenRequestNotFound { name: name.into() })?;
        let at = Placement {
            namespace: self.namespace,
            name,
            policy: self.policy,
        };
        let spec = validate(&upstream.spec, &at).map_err(|_| not_ready())?;
        if matches!(spec.flow, Flow::IdToken(_) | Flow::DeveloperConnectRepository { .. }) {
            return Err(SourceError::TokenRequestNotAccessToken {
                name: name.into(),
                flow: spec.flow.name(),
            });
        }
        let secret = self
            .managed_secrets
            .get(&ObjectRef::new(&spec.secret.name).within(self.namespace))
            .ok_or_else(not_ready)?;
        let uid = upstream.metadata.uid.as_deref().unwrap_or_default();
        if !crate::render::is_controlled_by(&secret, uid) {
            return Err(not_ready());
        }
        stored_token(&secret, &spec.secret)
            .filter(|t| t.spec_hash == spec.token_hash)
            .map(|t| t.record)
            .ok_or_else(not_ready)
    }

    /// When the upstream TokenRequest of a `tokenRequest` source obtained the token its Secret
    /// holds. Read from the Secret, not the upstream's status: the Secret is written first, and
    /// its watch event is what wakes the dependents.
    pub fn upstream_issued_at(&self, source: &Source) -> Option<Timestamp> {
        let Source::TokenRequest { name } = source else {
            return None;
        };
        self.upstream_token(name).ok().map(|t| t.issued_at)
    }
}

/// How a credential the operator mints is obtained.
enum Exchange {
    /// A service account key signs a JWT, exchanged at the OAuth token endpoint.
    ServiceAccountKey(credentials::ServiceAccountKey),
    /// An authorized user's refresh token, at the OAuth token endpoint.
    AuthorizedUser(credentials::AuthorizedUser),
    /// An external_account file: STS, then impersonation if the file says so.
    Federation(credentials::ExternalAccount, Subject),
    MetadataServer,
}

/// The subject token of an external_account file.
enum Subject {
    Given(SecretString),
    /// Minted for this exchange with the Kubernetes TokenRequest API.
    ServiceAccount {
        token: SecretString,
        name: String,
        /// From the token's claims: a ServiceAccount recreated under the same name is another.
        uid: Option<String>,
        audience: String,
        expiration_seconds: i64,
    },
}

impl Subject {
    fn token(&self) -> &SecretString {
        match self {
            Self::Given(token) | Self::ServiceAccount { token, .. } => token,
        }
    }
}

/// The ServiceAccount UID a Kubernetes-issued token names (`kubernetes.io.serviceaccount.uid`).
/// The apiserver just issued it, so its claims are read without checking the signature.
fn service_account_uid(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let uid = claims
        .get("kubernetes.io")?
        .get("serviceaccount")?
        .get("uid")?
        .as_str()?;
    (!uid.is_empty()).then(|| uid.to_string())
}

impl Exchange {
    /// Who the minted credential stands for, in words safe to show.
    fn identity(&self) -> String {
        match self {
            Self::ServiceAccountKey(key) => {
                format!("service account {} (key {})", key.client_email, key.private_key_id)
            }
            Self::AuthorizedUser(user) => format!("the authorized user of OAuth client {}", user.client_id),
            Self::Federation(file, _) => format!("workload identity provider {}", file.audience),
            Self::MetadataServer => "the operator's own identity".into(),
        }
    }

    /// The key the minted credential is kept under: who it is for, the scopes, and all the
    /// material it is minted from. Only those who present the same material share it, so no
    /// tenant obtains a token it could not have minted itself. A ServiceAccount subject token is
    /// minted afresh each time, so its ServiceAccount (namespace, name and UID) stands in for it;
    /// without a UID, the token itself does (and nothing is shared).
    fn key(&self, namespace: &str, scopes: &[String], material: &[u8]) -> Key {
        let subject = match self {
            Self::Federation(_, Subject::Given(token)) => token.expose_secret().as_bytes().to_vec(),
            Self::Federation(
                _,
                Subject::ServiceAccount {
                    uid: Some(uid),
                    name,
                    audience,
                    expiration_seconds,
                    ..
                },
            ) => format!("{namespace}/{name} {uid} {audience:?} {expiration_seconds}").into_bytes(),
            Self::Federation(_, Subject::ServiceAccount { token, uid: None, .. }) => {
                token.expose_secret().as_bytes().to_vec()
            }
            _ => Vec::new(),
        };
        let identity = self.identity();
        Key::of(&[identity.as_bytes(), scopes.join(" ").as_bytes(), material, &subject])
    }
}

/// The credential kept under `key`, or minted by `call` once for everyone waiting for it. A failure
/// is told in the caller's own words (`identity`, `origin`), never in those of the caller whose
/// `call` was made.
async fn kept_or_minted(
    kept: &KeptCredentials,
    key: Key,
    call: impl Future<Output = Result<Credential, MintError>> + Send + 'static,
    identity: String,
    origin: String,
) -> Result<Credential, Arc<SourceError>> {
    kept.get_or_call(key, call, kept_until).await.map_err(|source| {
        Arc::new(SourceError::Exchange {
            identity,
            origin,
            source,
        })
    })
}

/// A kept credential is fresh until the point a TokenRequest would refresh it (with the default
/// policy); the rest of its lifetime is left for the tokens minted with it.
fn kept_until(credential: &Credential) -> Option<Timestamp> {
    const POLICY: RefreshPolicy = RefreshPolicy {
        renew_before: RenewBefore::Percentage(DEFAULT_RENEW_BEFORE_PERCENTAGE),
        lifetime_when_unknown: std::time::Duration::ZERO,
    };
    let expires_at = credential.expires_at?;
    Some(refresh::refresh_point(Timestamp::now(), expires_at, &POLICY, ""))
}

/// A ServiceAccount token of `namespace`, minted with the Kubernetes TokenRequest API.
async fn mint_service_account_token(
    client: &Client,
    namespace: &str,
    name: &str,
    audience: &str,
    expiration_seconds: i64,
) -> Result<Credential, SourceError> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = KubeTokenRequest {
        spec: Some(KubeTokenRequestSpec {
            audiences: Some(vec![audience.to_string()]),
            expiration_seconds: Some(expiration_seconds),
            ..Default::default()
        }),
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
    let status = response.status.unwrap_or_default();
    let token = status.token.filter(|token| !token.is_empty());
    let token = token.ok_or_else(|| SourceError::EmptyServiceAccountToken { name: name.into() })?;
    Ok(Credential::given(
        SecretString::from(token),
        status.expiration_timestamp.map(|time| time.0),
    ))
}

/// The value under `key` of Secret `name` in `namespace`, trimmed.
async fn read_secret_key(client: &Client, namespace: &str, name: &str, key: &str) -> Result<SecretString, SourceError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(|e| SourceError::ReadSecret {
            name: name.into(),
            source: e,
        })?
        .ok_or_else(|| SourceError::SecretNotFound { name: name.into() })?;
    // A ServiceAccount's long-lived token (such as the operator's own) would reach Google, which
    // does not need it, and it never expires.
    if secret.type_.as_deref() == Some(SERVICE_ACCOUNT_TOKEN_TYPE) {
        return Err(SourceError::ServiceAccountTokenSecret { name: name.into() });
    }
    let missing = || SourceError::SecretKeyMissing {
        name: name.into(),
        key: key.into(),
    };
    let value = secret.data.as_ref().and_then(|d| d.get(key)).ok_or_else(missing)?;
    // Token files often end with a newline, which is not part of the token.
    let value = String::from_utf8(value.0.clone()).map_err(|_| missing())?;
    let value = value.trim();
    if value.is_empty() {
        return Err(missing());
    }
    Ok(SecretString::from(value))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{crd::SubjectTokenType, credentials::ExternalAccount};

    fn user() -> Exchange {
        Exchange::AuthorizedUser(credentials::AuthorizedUser {
            client_id: "client".into(),
            client_secret: SecretString::from("secret"),
            refresh_token: SecretString::from("refresh"),
        })
    }

    fn federation(subject: Subject) -> Exchange {
        let file = ExternalAccount {
            audience: "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k".into(),
            subject_token_type: SubjectTokenType::Jwt,
            options: None,
            impersonate: None,
            impersonation_lifetime: Duration::from_secs(3600),
        };
        Exchange::Federation(file, subject)
    }

    fn service_account(name: &str, uid: Option<&str>) -> Subject {
        Subject::ServiceAccount {
            token: SecretString::from(format!("token of {name} {}", fastrand::u64(..))),
            name: name.into(),
            uid: uid.map(String::from),
            audience: "aud".into(),
            expiration_seconds: 3600,
        }
    }

    #[test]
    fn kept_credentials_are_keyed_by_identity_scopes_and_material() {
        let scopes = |s: &str| vec![s.to_string()];
        let key = |e: &Exchange, ns: &str, s: &str, material: &[u8]| e.key(ns, &scopes(s), material);
        // The same file for the same scopes is one credential, whichever namespace presents it.
        assert_eq!(key(&user(), "a", "x", b"file"), key(&user(), "b", "x", b"file"));
        assert_ne!(key(&user(), "a", "x", b"file"), key(&user(), "a", "y", b"file"));
        // Same client id, other material (e.g. a rotated secret): another credential.
        assert_ne!(key(&user(), "a", "x", b"file"), key(&user(), "a", "x", b"file v2"));
        assert_ne!(
            key(&user(), "a", "x", b""),
            key(&Exchange::MetadataServer, "a", "x", b"")
        );
    }

    #[test]
    fn federated_credentials_are_keyed_by_their_subject() {
        let scopes = ["x".to_string()];
        let sa =
            |ns: &str, name: &str, uid: &str| federation(service_account(name, Some(uid))).key(ns, &scopes, b"file");
        // Two tokens of one ServiceAccount share the federated credential.
        assert_eq!(sa("a", "app", "uid-1"), sa("a", "app", "uid-1"));
        assert_ne!(
            sa("a", "app", "uid-1"),
            sa("b", "app", "uid-1"),
            "a ServiceAccount belongs to its namespace"
        );
        assert_ne!(sa("a", "app", "uid-1"), sa("a", "other", "uid-1"));
        // Deleted and created again under the same name: another ServiceAccount, another credential.
        assert_ne!(sa("a", "app", "uid-1"), sa("a", "app", "uid-2"));
        // Without a UID nothing is shared: the fresh token itself is the key.
        let anonymous = || federation(service_account("app", None)).key("a", &scopes, b"file");
        assert_ne!(anonymous(), anonymous());
        let given = |token: &str| federation(Subject::Given(SecretString::from(token))).key("a", &scopes, b"file");
        assert_eq!(given("jwt-1"), given("jwt-1"));
        assert_ne!(given("jwt-1"), given("jwt-2"));
    }

    #[test]
    fn the_service_account_uid_is_read_from_the_token_claims() {
        use base64::Engine;
        let jwt = |claims: serde_json::Value| {
            let part = |v: &serde_json::Value| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
            };
            format!("{}.{}.sig", part(&serde_json::json!({"alg": "RS256"})), part(&claims))
        };
        let claims =
            serde_json::json!({"kubernetes.io": {"namespace": "a", "serviceaccount": {"name": "app", "uid": "u-1"}}});
        assert_eq!(service_account_uid(&jwt(claims)).as_deref(), Some("u-1"));
        for bad in [
            jwt(serde_json::json!({"sub": "system:serviceaccount:a:app"})),
            jwt(serde_json::json!({"kubernetes.io": {"serviceaccount": {"uid": ""}}})),
            jwt(serde_json::json!({"kubernetes.io": {"serviceaccount": {"uid": 7}}})),
            "not a jwt".into(),
            "a.!!!.c".into(),
            String::new(),
        ] {
            assert_eq!(service_account_uid(&bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn a_shared_failure_names_each_callers_own_secret() {
        let kept = KeptCredentials::default();
        let key = Key::of(&[b"same file, two namespaces"]);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failing = || {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(MintError::Google(GoogleError::EmptyToken {
                    api: crate::google::Api::OAuth2,
                }))
            }
        };
        let attempt =
            |origin: &str| kept_or_minted(&kept, key, failing(), "service account x".into(), origin.to_string());
        let (a, b) = tokio::join!(
            attempt("Secret \"a-secret\" key \"a-key\""),
            attempt("Secret \"b-secret\" key \"b-key\"")
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "one call for both");
        let (a, b) = (a.err().unwrap().to_string(), b.err().unwrap().to_string());
        assert!(a.contains("a-secret") && !a.contains("b-secret"), "{a}");
        assert!(b.contains("b-secret") && !b.contains("a-secret"), "{b}");
        assert!(!b.contains("a-key"), "{b}");
    }

    #[test]
    fn kept_until_the_default_refresh_point() {
        let expires_at = Timestamp::now().checked_add(Duration::from_secs(3000)).unwrap();
        let until = kept_until(&Credential::given(SecretString::from("t"), Some(expires_at))).unwrap();
        let left = expires_at.duration_since(until).as_secs();
        // 33% of the lifetime, plus up to 60 s of jitter and 1 s of rounding.
        assert!((990..=1051).contains(&left), "kept until {left}s before expiry");
        assert_eq!(kept_until(&Credential::given(SecretString::from("t"), None)), None);
    }
}
