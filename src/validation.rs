//! Turns a `TokenRequestSpec` into a `ValidSpec`: every constraint checked, every default applied.
//! Pure: no I/O, so an invalid spec is reported without calling Google or the apiserver.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde::Serialize;
use sha2::{Digest, Sha256};

mod secret;

use crate::{
    crd::{
        AccessBoundary, RefreshSpec, RepositoryAccess, SecretFormat, SecretSpec, ServiceAccountTokenSource, SourceSpec,
        SubjectTokenSource, SubjectTokenType, TokenRequestSpec, WorkloadKind,
    },
    formats::Format,
};

pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
pub const DEFAULT_RENEW_BEFORE_PERCENTAGE: u8 = 33;
const DEFAULT_LIFETIME_WHEN_UNKNOWN: Duration = Duration::from_secs(15 * 60);
const DEFAULT_IMPERSONATION_LIFETIME: Duration = Duration::from_secs(3600);
pub const MAX_IMPERSONATION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
const DEFAULT_SA_TOKEN_EXPIRATION: i64 = 3600;
const DEFAULT_ROLLOUT_RESTART_MIN_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Bounds of the durations a user sets. No Google access token lives longer than 12 h (IAM's
/// maximum lifetime), so renewing earlier or assuming longer means nothing; a token assumed to
/// live under a minute would be minted again at almost every reconcile; a day between restarts is
/// already longer than any token lasts.
const ONE_SECOND: Duration = Duration::from_secs(1);
const MIN_LIFETIME_WHEN_UNKNOWN: Duration = Duration::from_secs(60);
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);
const MAX_ROLLOUT_RESTART_MIN_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// How far past the longest lifetime asked for an expiry may lie before it is not believed: the
/// clock difference between Google and the operator that is tolerated.
const EXPIRY_SLACK: Duration = Duration::from_secs(5 * 60);
/// Developer Connect passes on a Git provider's own OAuth token, whose lifetime the provider sets
/// (GitHub's user tokens live 8 h); a day is beyond any of them.
const MAX_DEVELOPER_CONNECT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Google issues ID tokens for one hour.
const MAX_ID_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// A spec that passed validation, with defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    pub flow: Flow,
    pub source: Source,
    pub secret: SecretLayout,
    pub refresh: RefreshPolicy,
    pub rollout: RolloutPlan,
    /// ServiceAccounts of the namespace whose `imagePullSecrets` list the Secret.
    pub attach_to: Vec<String>,
    /// Hash of what determines the token (flow and source): a Secret written under another hash
    /// holds a token the current spec did not produce.
    pub token_hash: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Flow {
    Sts(StsParams),
    Impersonation(ImpersonationParams),
    DeveloperConnect {
        account_connector: String,
    },
    DiscoveryEngine {
        data_connector: String,
        scope: Option<String>,
        action: Option<String>,
    },
    IdToken(IdTokenParams),
    DeveloperConnectRepository {
        git_repository_link: String,
        access: RepositoryAccess,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IdTokenParams {
    pub audience: String,
    /// `None`: the metadata server's own identity (with `source.ambient` only).
    pub service_account: Option<String>,
    /// In the documented `projects/-/serviceAccounts/EMAIL` form.
    pub delegates: Vec<String>,
    pub include_email: bool,
    /// STS first, with the source as the subject token (no impersonation step: generateIdToken
    /// is the impersonation).
    pub federation: Option<StsParams>,
}

impl Flow {
    /// The name of the flow as users write it in the spec; bounded, so usable as a metric label.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sts(_) => "sts",
            Self::Impersonation(_) => "impersonation",
            Self::DeveloperConnect { .. } => "developerConnect",
            Self::DiscoveryEngine { .. } => "discoveryEngine",
            Self::IdToken(_) => "idToken",
            Self::DeveloperConnectRepository { .. } => "developerConnectRepository",
        }
    }

    /// The username that goes with this flow's tokens where a consumer needs one, if the flow
    /// decides it before the call: registries take Google access tokens as `oauth2accesstoken`.
    /// Developer Connect repository tokens come with their own; the others have none.
    pub fn default_username(&self) -> Option<&'static str> {
        match self {
            Self::Sts(_) | Self::Impersonation(_) => Some(crate::formats::OAUTH2_ACCESS_TOKEN_USER),
            _ => None,
        }
    }

    /// The subject token type, for flows whose first call is an STS exchange of the source.
    fn sts_subject_type(&self) -> Option<SubjectTokenType> {
        match self {
            Self::Sts(sts)
            | Self::IdToken(IdTokenParams {
                federation: Some(sts), ..
            }) => Some(sts.subject_token_type),
            _ => None,
        }
    }

    fn sts_audience(&self) -> Option<&str> {
        match self {
            Self::Sts(sts)
            | Self::IdToken(IdTokenParams {
                federation: Some(sts), ..
            }) => Some(&sts.audience),
            _ => None,
        }
    }

    /// The longest lifetime a token of this flow can really have: an answer that claims more is
    /// not believed (a wrong clock, or a wrong answer).
    pub fn max_lifetime(&self) -> Duration {
        let longest = match self {
            Self::Impersonation(p)
            | Self::Sts(StsParams {
                impersonation: Some(p), ..
            }) => p.lifetime,
            Self::Sts(_) | Self::DiscoveryEngine { .. } => MAX_TOKEN_LIFETIME,
            Self::DeveloperConnect { .. } | Self::DeveloperConnectRepository { .. } => MAX_DEVELOPER_CONNECT_LIFETIME,
            Self::IdToken(_) => MAX_ID_TOKEN_LIFETIME,
        };
        longest.saturating_add(EXPIRY_SLACK)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StsParams {
    pub audience: String,
    /// Scopes of the exchange (cloud-platform when impersonation follows).
    pub scopes: Vec<String>,
    pub subject_token_type: SubjectTokenType,
    /// The `options` request field: serialized JSON, as STS wants it.
    pub options: Option<String>,
    /// generateAccessToken with the federated token, in the same mint.
    // Left out of the hash when absent, so that specs written before it existed keep their hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub impersonation: Option<ImpersonationParams>,
}

impl StsParams {
    /// Followed by impersonation, STS is asked for cloud-platform as Google's libraries do; the
    /// impersonation carries the scopes of the final token.
    pub fn with_impersonation(mut self, impersonation: Option<ImpersonationParams>) -> Self {
        if impersonation.is_some() {
            self.scopes = vec![CLOUD_PLATFORM_SCOPE.to_string()];
        }
        self.impersonation = impersonation;
        self
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImpersonationParams {
    pub service_account: String,
    /// In the documented `projects/-/serviceAccounts/EMAIL` form.
    pub delegates: Vec<String>,
    pub scopes: Vec<String>,
    pub lifetime: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Source {
    ServiceAccountToken {
        service_account_name: String,
        audience: String,
        expiration_seconds: i64,
    },
    Secret {
        name: String,
        key: String,
        // Left out of the hash when `auto`, as before the field existed.
        #[serde(skip_serializing_if = "SecretFormat::is_auto")]
        format: SecretFormat,
        #[serde(skip_serializing_if = "Option::is_none")]
        subject_token: Option<SubjectToken>,
    },
    TokenRequest {
        name: String,
    },
    /// The operator's own Google identity.
    Ambient,
}

/// Where the subject token of an `external_account` file comes from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum SubjectToken {
    ServiceAccountToken {
        service_account_name: String,
        /// `None`: the file's audience.
        audience: Option<String>,
        expiration_seconds: i64,
    },
    Secret {
        name: String,
        key: String,
    },
}

/// Operator settings that decide what a TokenRequest may ask for.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Namespaces whose TokenRequests may use the operator's own Google identity (`source.ambient`).
    pub ambient_namespaces: BTreeSet<String>,
    /// The operator's own ServiceAccount, which is never a source.
    pub own_service_account: Option<ServiceAccountRef>,
    /// Whether `spec.secret.attachToServiceAccounts` may be used (the operator may patch
    /// ServiceAccounts).
    pub service_account_attachment: bool,
}

/// The setting that allows `spec.secret.attachToServiceAccounts`, as InvalidSpec messages name it.
pub const ATTACHMENT_SETTING: &str = "--service-account-attachment (Helm value serviceAccountAttachment.enabled)";

/// The setting that allows `source.ambient`, as InvalidSpec messages name it.
pub const AMBIENT_SETTING: &str = "--ambient-namespace (GCP_TOKEN_OPERATOR_AMBIENT_NAMESPACES)";

/// A ServiceAccount, written `NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for ServiceAccountRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((namespace, name)) if is_dns_subdomain(namespace) && is_dns_subdomain(name) => Ok(Self {
                namespace: namespace.into(),
                name: name.into(),
            }),
            _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
        }
    }
}

/// The scopes a source credential minted by the operator (from a credential file or the ambient
/// identity) is asked for, following Google's libraries: the scopes of the `sts` exchange when it
/// is the subject token (a Credential Access Boundary keeps them), else cloud-platform, which the
/// IAM Credentials, Developer Connect and Discovery Engine calls all accept.
pub fn caller_scopes(flow: &Flow) -> Vec<String> {
    match flow {
        Flow::Sts(sts) => sts.scopes.clone(),
        _ => vec![CLOUD_PLATFORM_SCOPE.to_string()],
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct SecretLayout {
    pub name: String,
    pub format: Format,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// The workloads restarted when the token changes, and how often at most.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutPlan {
    pub targets: Vec<(WorkloadKind, String)>,
    pub min_interval: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RenewBefore {
    Percentage(u8),
    Absolute(Duration),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RefreshPolicy {
    pub renew_before: RenewBefore,
    pub lifetime_when_unknown: Duration,
}

/// Every problem found in a spec, so a user fixes them in one round.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{}", .problems.join("; "))]
pub struct InvalidSpec {
    pub problems: Vec<String>,
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.0.push(problem());
        }
    }
}

/// Where a TokenRequest is and what the operator allows it: what validation depends on besides
/// the spec.
pub struct Placement<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub policy: &'a Policy,
}

/// Validates `spec` of the TokenRequest at `at`.
pub fn validate(spec: &TokenRequestSpec, at: &Placement<'_>) -> Result<ValidSpec, InvalidSpec> {
    let own_name = at.name;
    let mut p = Problems::default();
    let flow = validate_flow(spec, &mut p);
    let source = validate_source(&spec.source, flow.as_ref(), at, &mut p);
    let secret = secret::validate(&spec.secret, own_name, flow.as_ref(), &mut p);
    if let Some(Flow::IdToken(IdTokenParams {
        service_account: None, ..
    })) = &flow
    {
        p.check(matches!(source, Some(Source::Ambient) | None), || {
            "spec.flow.idToken.serviceAccount is required unless the source is ambient (the metadata server's own \
             identity)"
                .into()
        });
    }
    let refresh = validate_refresh(&spec.refresh, &mut p);
    let rollout = validate_rollout(spec, &mut p);
    let attach_to = validate_attachments(&spec.secret, &secret.format, at.policy, &mut p);
    match (flow, source) {
        (Some(flow), Some(source)) if p.0.is_empty() => {
            let token_hash = hash_of(&(&flow, &source));
            Ok(ValidSpec {
                flow,
                source,
                secret,
                refresh,
                rollout,
                attach_to,
                token_hash,
            })
        }
        _ => Err(InvalidSpec { problems: p.0 }),
    }
}

fn hash_of(value: &impl Serialize) -> String {
    let json = serde_json::to_vec(value).expect("spec types serialize");
    hex::encode(&Sha256::digest(json)[..8])
}

fn validate_flow(spec: &TokenRequestSpec, p: &mut Problems) -> Option<Flow> {
    let f = &spec.flow;
    let set = [
        f.sts.is_some(),
        f.impersonation.is_some(),
        f.developer_connect.is_some(),
        f.discovery_engine.is_some(),
        f.id_token.is_some(),
        f.developer_connect_repository.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        p.0.push(
            "spec.flow: exactly one of sts, impersonation, developerConnect, discoveryEngine, idToken, \
             developerConnectRepository must be set"
                .into(),
        );
        return None;
    }
    if let Some(id) = &f.id_token {
        return Some(validate_id_token(id, p));
    }
    if let Some(repo) = &f.developer_connect_repository {
        p.check(
            is_resource_name(
                &repo.git_repository_link,
                &["projects", "locations", "connections", "gitRepositoryLinks"],
                None,
            ),
            || {
                format!(
                    "spec.flow.developerConnectRepository.gitRepositoryLink {} is not \
                     projects/P/locations/L/connections/C/gitRepositoryLinks/R (each ID letters, digits, '-', '_' \
                     and '.', not . or ..)",
                    quote(&repo.git_repository_link)
                )
            },
        );
        return Some(Flow::DeveloperConnectRepository {
            git_repository_link: repo.git_repository_link.clone(),
            access: repo.access,
        });
    }
    if let Some(sts) = &f.sts {
        p.check(is_sts_audience(&sts.audience), || {
            format!(
                "spec.flow.sts.audience {:?} is not a workload or workforce identity pool provider \
                 (//iam.googleapis.com/projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER)",
                sts.audience
            )
        });
        validate_scopes(&sts.scopes, "spec.flow.sts.scopes", p);
        if let Some(project) = &sts.user_project {
            p.check(!project.is_empty() && project.len() <= 32, || {
                "spec.flow.sts.userProject must be 1 to 32 characters".into()
            });
        }
        if let Some(boundary) = &sts.access_boundary {
            validate_access_boundary(boundary, p);
        }
        let options = sts_options(sts.access_boundary.as_ref(), sts.user_project.as_deref());
        let scopes = if sts.scopes.is_empty() {
            vec![CLOUD_PLATFORM_SCOPE.to_string()]
        } else {
            sts.scopes.clone()
        };
        let impersonation = sts.service_account_impersonation.as_ref().map(|imp| {
            let target = Target {
                service_account: &imp.service_account,
                delegates: &imp.delegates,
                lifetime: imp.lifetime.as_deref(),
            };
            target.validate("spec.flow.sts.serviceAccountImpersonation", scopes.clone(), p)
        });
        let params = StsParams {
            audience: sts.audience.clone(),
            scopes,
            subject_token_type: sts.subject_token_type,
            options,
            impersonation: None,
        };
        return Some(Flow::Sts(params.with_impersonation(impersonation)));
    }
    if let Some(imp) = &f.impersonation {
        p.check(!imp.scopes.is_empty(), || {
            "spec.flow.impersonation.scopes must name at least one scope".into()
        });
        validate_scopes(&imp.scopes, "spec.flow.impersonation.scopes", p);
        let target = Target {
            service_account: &imp.service_account,
            delegates: &imp.delegates,
            lifetime: imp.lifetime.as_deref(),
        };
        return Some(Flow::Impersonation(target.validate(
            "spec.flow.impersonation",
            imp.scopes.clone(),
            p,
        )));
    }
    if let Some(dc) = &f.developer_connect {
        p.check(
            is_resource_name(
                &dc.account_connector,
                &["projects", "locations", "accountConnectors"],
                None,
            ),
            || {
                format!(
                    "spec.flow.developerConnect.accountConnector {} is not projects/P/locations/L/accountConnectors/C \
                     (each ID letters, digits, '-', '_' and '.', not . or ..)",
                    quote(&dc.account_connector)
                )
            },
        );
        return Some(Flow::DeveloperConnect {
            account_connector: dc.account_connector.clone(),
        });
    }
    let de = f.discovery_engine.as_ref()?;
    p.check(
        is_resource_name(
            &de.data_connector,
            &["projects", "locations", "collections"],
            Some("dataConnector"),
        ),
        || {
            format!(
                "spec.flow.discoveryEngine.dataConnector {} is not projects/P/locations/L/collections/C/dataConnector \
                 (each ID letters, digits, '-', '_' and '.', not . or ..)",
                quote(&de.data_connector)
            )
        },
    );
    Some(Flow::DiscoveryEngine {
        data_connector: de.data_connector.clone(),
        scope: de.scope.clone(),
        action: de.action.clone(),
    })
}

fn validate_id_token(id: &crate::crd::IdTokenFlow, p: &mut Problems) -> Flow {
    const AT: &str = "spec.flow.idToken";
    p.check(
        !id.audience.is_empty() && !id.audience.chars().any(char::is_control),
        || format!("{AT}.audience must be a non-empty URL or OAuth client id"),
    );
    let delegates = match &id.service_account {
        Some(account) => {
            let target = Target {
                service_account: account,
                delegates: &id.delegates,
                lifetime: None,
            };
            target.validate(AT, Vec::new(), p).delegates
        }
        None => {
            p.check(id.delegates.is_empty(), || {
                format!("{AT}.delegates needs {AT}.serviceAccount: the metadata server issues its own identity's token")
            });
            p.check(id.federation.is_none(), || {
                format!("{AT}.federation needs {AT}.serviceAccount: a federated identity calls generateIdToken for one")
            });
            Vec::new()
        }
    };
    let federation = id.federation.as_ref().map(|fed| {
        p.check(is_sts_audience(&fed.audience), || {
            format!(
                "{AT}.federation.audience {:?} is not a workload or workforce identity pool provider \
                 (//iam.googleapis.com/projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER)",
                fed.audience
            )
        });
        if let Some(project) = &fed.user_project {
            p.check(!project.is_empty() && project.len() <= 32, || {
                format!("{AT}.federation.userProject must be 1 to 32 characters")
            });
        }
        StsParams {
            audience: fed.audience.clone(),
            scopes: vec![CLOUD_PLATFORM_SCOPE.to_string()],
            subject_token_type: fed.subject_token_type,
            options: sts_options(None, fed.user_project.as_deref()),
            impersonation: None,
        }
    });
    Flow::IdToken(IdTokenParams {
        audience: id.audience.clone(),
        service_account: id.service_account.clone(),
        delegates,
        include_email: id.include_email,
        federation,
    })
}

fn validate_source(spec: &SourceSpec, flow: Option<&Flow>, at: &Placement<'_>, p: &mut Problems) -> Option<Source> {
    let set = [
        spec.service_account_token.is_some(),
        spec.secret.is_some(),
        spec.token_request.is_some(),
        spec.ambient.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        p.0.push("spec.source: exactly one of serviceAccountToken, secret, tokenRequest, ambient must be set".into());
        return None;
    }
    if let Some(sat) = &spec.service_account_token {
        let Some(sts_audience) = flow.and_then(Flow::sts_audience) else {
            p.0.push(
                "spec.source.serviceAccountToken is only valid as the subject token of the sts flow (or of \
                 idToken.federation)"
                    .into(),
            );
            return None;
        };
        let expiration_seconds = validate_service_account_token(sat, "spec.source.serviceAccountToken", at, p);
        return Some(Source::ServiceAccountToken {
            service_account_name: sat.service_account_name.clone(),
            audience: sat.audience.clone().unwrap_or_else(|| sts_audience.to_string()),
            expiration_seconds,
        });
    }
    if let Some(secret) = &spec.secret {
        check_name(&secret.name, "spec.source.secret.name", p);
        p.check(is_secret_key(&secret.key), || {
            format!("spec.source.secret.key {:?} is not a valid Secret key", secret.key)
        });
        let yields = match secret.format {
            SecretFormat::Auto => None,
            SecretFormat::Jwt => Some(Yields::Jwt),
            _ => Some(Yields::AccessToken),
        };
        if let Some(yields) = yields {
            check_fits_flow(yields, flow, "spec.source.secret.format", p);
        }
        let subject_token = match (&secret.subject_token, secret.format) {
            (Some(subject), SecretFormat::Auto | SecretFormat::ExternalAccount) => {
                validate_subject_token(subject, at, p)
            }
            (Some(_), _) => {
                p.0.push("spec.source.secret.subjectToken is only valid with format externalAccount (or auto)".into());
                None
            }
            (None, SecretFormat::ExternalAccount) => {
                p.0.push(
                    "spec.source.secret.subjectToken is required with format externalAccount: the operator never \
                     uses the file's credential_source"
                        .into(),
                );
                None
            }
            (None, _) => None,
        };
        return Some(Source::Secret {
            name: secret.name.clone(),
            key: secret.key.clone(),
            format: secret.format,
            subject_token,
        });
    }
    if spec.ambient.is_some() {
        p.check(at.policy.ambient_namespaces.contains(at.namespace), || {
            format!(
                "spec.source.ambient: the operator's own Google identity is not available in namespace {:?}; \
                 the operator's administrator allows it per namespace with {AMBIENT_SETTING}",
                at.namespace
            )
        });
        check_fits_flow(Yields::AccessToken, flow, "spec.source.ambient", p);
        return Some(Source::Ambient);
    }
    let tr = spec.token_request.as_ref()?;
    check_name(&tr.name, "spec.source.tokenRequest.name", p);
    p.check(tr.name != at.name, || {
        "spec.source.tokenRequest.name must not name this TokenRequest".into()
    });
    check_fits_flow(Yields::AccessToken, flow, "spec.source.tokenRequest", p);
    Some(Source::TokenRequest { name: tr.name.clone() })
}

/// What kind of token a source hands to the flow.
#[derive(Clone, Copy, PartialEq)]
enum Yields {
    AccessToken,
    Jwt,
}

/// A Google access token is an STS subject only as `access_token` (to apply an access boundary);
/// a JWT authenticates nothing but an STS exchange.
fn check_fits_flow(yields: Yields, flow: Option<&Flow>, at: &str, p: &mut Problems) {
    let Some(flow) = flow else { return };
    let sts_subject_type = flow.sts_subject_type();
    match yields {
        Yields::AccessToken => p.check(
            sts_subject_type.is_none_or(|t| t == SubjectTokenType::AccessToken),
            || {
                format!(
                    "{at}: a Google access token is an sts subject token only with subjectTokenType {}",
                    SubjectTokenType::AccessToken.urn()
                )
            },
        ),
        Yields::Jwt => p.check(
            sts_subject_type.is_some_and(|t| t != SubjectTokenType::AccessToken),
            || format!("{at}: a JWT is only valid as the subject token of the sts flow"),
        ),
    }
}

/// Checks a ServiceAccount token source and returns its lifetime.
fn validate_service_account_token(
    sat: &ServiceAccountTokenSource,
    at_field: &str,
    at: &Placement<'_>,
    p: &mut Problems,
) -> i64 {
    check_name(&sat.service_account_name, &format!("{at_field}.serviceAccountName"), p);
    let own = at.policy.own_service_account.as_ref();
    p.check(
        own.is_none_or(|own| own.namespace != at.namespace || own.name != sat.service_account_name),
        || {
            format!(
                "{at_field}.serviceAccountName: {:?} is the operator's own ServiceAccount, which is never a source",
                sat.service_account_name
            )
        },
    );
    let expiration_seconds = sat.expiration_seconds.unwrap_or(DEFAULT_SA_TOKEN_EXPIRATION);
    p.check((600..172_800).contains(&expiration_seconds), || {
        format!("{at_field}.expirationSeconds must be at least 600 and below 172800 (48h)")
    });
    expiration_seconds
}

fn validate_subject_token(spec: &SubjectTokenSource, at: &Placement<'_>, p: &mut Problems) -> Option<SubjectToken> {
    const AT: &str = "spec.source.secret.subjectToken";
    match (&spec.service_account_token, &spec.secret) {
        (Some(sat), None) => {
            let expiration_seconds = validate_service_account_token(sat, &format!("{AT}.serviceAccountToken"), at, p);
            Some(SubjectToken::ServiceAccountToken {
                service_account_name: sat.service_account_name.clone(),
                audience: sat.audience.clone(),
                expiration_seconds,
            })
        }
        (None, Some(secret)) => {
            check_name(&secret.name, &format!("{AT}.secret.name"), p);
            p.check(is_secret_key(&secret.key), || {
                format!("{AT}.secret.key {:?} is not a valid Secret key", secret.key)
            });
            Some(SubjectToken::Secret {
                name: secret.name.clone(),
                key: secret.key.clone(),
            })
        }
        _ => {
            p.0.push(format!("{AT}: exactly one of serviceAccountToken, secret must be set"));
            None
        }
    }
}

/// A service account to impersonate, as the impersonation flow, the sts flow's
/// `serviceAccountImpersonation` and external_account files name it.
struct Target<'a> {
    service_account: &'a str,
    /// Emails.
    delegates: &'a [String],
    /// As written, e.g. `1h`; `None`: one hour.
    lifetime: Option<&'a str>,
}

impl Target<'_> {
    fn validate(&self, at: &str, scopes: Vec<String>, p: &mut Problems) -> ImpersonationParams {
        p.check(is_service_account(self.service_account), || {
            format!(
                "{at}.serviceAccount {} is neither a service account email ({SERVICE_ACCOUNT_SHAPE}) nor a numeric \
                 unique id",
                quote(self.service_account)
            )
        });
        for d in self.delegates {
            p.check(is_service_account(d), || {
                format!(
                    "{at}.delegates: {} is neither a service account email ({SERVICE_ACCOUNT_SHAPE}) nor a numeric \
                     unique id",
                    quote(d)
                )
            });
        }
        let lifetime = match self.lifetime {
            None => DEFAULT_IMPERSONATION_LIFETIME,
            Some(text) => parse_duration(
                text,
                &format!("{at}.lifetime"),
                (ONE_SECOND, MAX_IMPERSONATION_LIFETIME),
                p,
            )
            .unwrap_or_default(),
        };
        ImpersonationParams {
            service_account: self.service_account.to_string(),
            delegates: self
                .delegates
                .iter()
                .map(|d| format!("projects/-/serviceAccounts/{d}"))
                .collect(),
            scopes,
            lifetime,
        }
    }
}

fn validate_refresh(spec: &RefreshSpec, p: &mut Problems) -> RefreshPolicy {
    let renew_before = match (spec.renew_before_percentage, &spec.renew_before) {
        (Some(_), Some(_)) => {
            p.0.push("spec.refresh: set renewBeforePercentage or renewBefore, not both".into());
            RenewBefore::Percentage(DEFAULT_RENEW_BEFORE_PERCENTAGE)
        }
        (_, Some(text)) => {
            let d = parse_duration(text, "spec.refresh.renewBefore", (ONE_SECOND, MAX_TOKEN_LIFETIME), p)
                .unwrap_or_default();
            RenewBefore::Absolute(d)
        }
        (Some(pct), None) => {
            p.check((1..=90).contains(&pct), || {
                "spec.refresh.renewBeforePercentage must be between 1 and 90".into()
            });
            RenewBefore::Percentage(pct)
        }
        (None, None) => RenewBefore::Percentage(DEFAULT_RENEW_BEFORE_PERCENTAGE),
    };
    let lifetime_when_unknown = match &spec.lifetime_when_unknown {
        Some(text) => {
            let bounds = (MIN_LIFETIME_WHEN_UNKNOWN, MAX_TOKEN_LIFETIME);
            parse_duration(text, "spec.refresh.lifetimeWhenUnknown", bounds, p).unwrap_or(DEFAULT_LIFETIME_WHEN_UNKNOWN)
        }
        None => DEFAULT_LIFETIME_WHEN_UNKNOWN,
    };
    RefreshPolicy {
        renew_before,
        lifetime_when_unknown,
    }
}

fn validate_rollout(spec: &TokenRequestSpec, p: &mut Problems) -> RolloutPlan {
    let mut targets = Vec::new();
    for (i, target) in spec.rollout_restart_targets.iter().enumerate() {
        check_name(&target.name, &format!("spec.rolloutRestartTargets[{i}].name"), p);
        let entry = (target.kind, target.name.clone());
        p.check(!targets.contains(&entry), || {
            format!(
                "spec.rolloutRestartTargets[{i}]: {} {:?} is named twice",
                target.kind.as_str(),
                target.name
            )
        });
        targets.push(entry);
    }
    let min_interval = spec
        .rollout_restart_min_interval
        .as_deref()
        .and_then(|text| {
            let bounds = (ONE_SECOND, MAX_ROLLOUT_RESTART_MIN_INTERVAL);
            parse_duration(text, "spec.rolloutRestartMinInterval", bounds, p)
        })
        .unwrap_or(DEFAULT_ROLLOUT_RESTART_MIN_INTERVAL);
    RolloutPlan { targets, min_interval }
}

fn validate_attachments(spec: &SecretSpec, format: &Format, policy: &Policy, p: &mut Problems) -> Vec<String> {
    let names = &spec.attach_to_service_accounts;
    if names.is_empty() {
        return Vec::new();
    }
    const AT: &str = "spec.secret.attachToServiceAccounts";
    p.check(policy.service_account_attachment, || {
        format!(
            "{AT}: this operator does not patch ServiceAccounts; its administrator enables it with {ATTACHMENT_SETTING}"
        )
    });
    // Only a registry credential means anything in `imagePullSecrets`.
    p.check(matches!(format, Format::DockerConfigJson { .. }), || {
        format!("{AT} needs spec.secret.type kubernetes.io/dockerconfigjson (and no spec.secret.format)")
    });
    let mut accounts: Vec<String> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        check_name(name, &format!("{AT}[{i}]"), p);
        p.check(!accounts.contains(name), || {
            format!("{AT}[{i}]: {name:?} is named twice")
        });
        accounts.push(name.clone());
    }
    accounts
}

fn validate_access_boundary(boundary: &AccessBoundary, p: &mut Problems) {
    let rules = &boundary.access_boundary_rules;
    p.check((1..=10).contains(&rules.len()), || {
        "spec.flow.sts.accessBoundary.accessBoundaryRules must hold 1 to 10 rules".into()
    });
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("spec.flow.sts.accessBoundary.accessBoundaryRules[{i}]");
        p.check(rule.available_resource.starts_with("//"), || {
            format!("{at}.availableResource must be a full resource name starting with //")
        });
        p.check(!rule.available_permissions.is_empty(), || {
            format!("{at}.availablePermissions must not be empty")
        });
        for perm in &rule.available_permissions {
            p.check(perm.starts_with("inRole:") && perm.len() > "inRole:".len(), || {
                format!("{at}.availablePermissions: {perm:?} must have the form inRole:ROLE")
            });
        }
        if let Some(cond) = &rule.availability_condition {
            p.check(!cond.expression.is_empty() && cond.expression.len() <= 2048, || {
                format!("{at}.availabilityCondition.expression must be 1 to 2048 characters")
            });
        }
    }
}

/// The STS `options` field: a JSON string, sent only when there is something in it.
pub fn sts_options(boundary: Option<&AccessBoundary>, user_project: Option<&str>) -> Option<String> {
    if boundary.is_none() && user_project.is_none() {
        return None;
    }
    let mut options = serde_json::Map::new();
    if let Some(b) = boundary {
        options.insert("accessBoundary".into(), serde_json::to_value(b).expect("serializable"));
    }
    if let Some(project) = user_project {
        options.insert("userProject".into(), project.into());
    }
    Some(serde_json::Value::Object(options).to_string())
}

fn validate_scopes(scopes: &[String], at: &str, p: &mut Problems) {
    for s in scopes {
        p.check(!s.is_empty() && !s.contains(char::is_whitespace), || {
            format!("{at}: {s:?} is not a single OAuth scope")
        });
    }
}

/// A duration within `(min, max)`, both inclusive.
fn parse_duration(text: &str, at: &str, (min, max): (Duration, Duration), p: &mut Problems) -> Option<Duration> {
    match humantime::parse_duration(text) {
        Ok(d) if (min..=max).contains(&d) => Some(d),
        Ok(_) => {
            let (min, max) = (humantime::format_duration(min), humantime::format_duration(max));
            p.0.push(format!("{at} must be between {min} and {max}"));
            None
        }
        Err(_) => {
            p.0.push(format!(
                "{at}: {} is not a duration such as 90s, 10m or 1h",
                quote(text)
            ));
            None
        }
    }
}

fn check_name(name: &str, at: &str, p: &mut Problems) {
    p.check(is_dns_subdomain(name), || {
        format!("{at}: {name:?} is not a valid object name (lowercase letters, digits, '-' and '.', at most 253)")
    });
}

pub fn is_sts_audience(audience: &str) -> bool {
    let Some(rest) = audience.strip_prefix("//iam.googleapis.com/") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let filled = |i: usize| parts.get(i).is_some_and(|s| !s.is_empty());
    match parts.as_slice() {
        [
            "projects",
            number,
            "locations",
            _,
            "workloadIdentityPools",
            _,
            "providers",
            _,
        ] => !number.is_empty() && number.chars().all(|c| c.is_ascii_digit()) && (3..8).all(filled),
        ["locations", _, "workforcePools", _, "providers", _] => (1..6).all(filled),
        _ => false,
    }
}

const SERVICE_ACCOUNT_SHAPE: &str = "lowercase letters, digits and '-', an @, then a domain of such labels";

/// A service account as IAM names it: a numeric unique id, or an email of the shape Google gives
/// service accounts (`NAME@PROJECT.iam.gserviceaccount.com`, the service agents' too). Nothing
/// else, so that in a URL it needs no escaping and cannot add a path segment, a query or a fragment.
pub fn is_service_account(account: &str) -> bool {
    let is_id = !account.is_empty() && account.len() <= 32 && account.bytes().all(|c| c.is_ascii_digit());
    let is_part = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    };
    // 64 and 254: the limits of an email's local part and of the whole address (RFC 5321).
    let is_email = account.len() <= 254
        && account.split_once('@').is_some_and(|(local, domain)| {
            local.len() <= 64 && is_part(local) && domain.contains('.') && domain.split('.').all(is_part)
        });
    is_id || is_email
}

/// `collections/ID/.../last` with the given collection names, each ID non-empty and without `/`.
fn is_resource_name(name: &str, collections: &[&str], singleton: Option<&str>) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    let expected = collections.len() * 2 + usize::from(singleton.is_some());
    if parts.len() != expected {
        return false;
    }
    let pairs_ok = collections
        .iter()
        .enumerate()
        .all(|(i, c)| parts[2 * i] == *c && is_resource_id(parts[2 * i + 1]));
    pairs_ok && singleton.is_none_or(|s| parts[expected - 1] == s)
}

/// One ID of a resource name: it becomes one URL path segment, so `.` and `..` (which a URL
/// resolves) are refused, and so is anything that would need escaping.
fn is_resource_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `value` quoted for a message, cut to a bounded prefix: a tenant's string can be as long as the
/// object allows, and control characters are shown escaped.
fn quote(value: &str) -> String {
    const MAX_BYTES: usize = 120;
    let mut quoted = String::from('"');
    for c in value.chars() {
        let escaped = c.escape_debug().to_string();
        if quoted.len() + escaped.len() > MAX_BYTES {
            quoted.push_str("\"…");
            return quoted;
        }
        quoted.push_str(&escaped);
    }
    quoted.push('"');
    quoted
}

pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_secret_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

fn is_label_value(value: &str) -> bool {
    value.is_empty() || (value.len() <= 63 && is_qualified_name_part(value))
}

fn is_qualified_name(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && name.len() <= 63 && is_qualified_name_part(name),
        None => key.len() <= 63 && is_qualified_name_part(key),
    }
}

fn is_qualified_name_part(s: &str) -> bool {
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    edge_ok(s.chars().next())
        && edge_ok(s.chars().last())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crd::{FlowSpec, ImpersonationFlow, SecretKeySource, SecretType, ServiceAccountTokenSource, StsFlow},
        formats::EXPIRES_AT_KEY,
    };

    const AUDIENCE: &str =
        "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/prov";

    fn sts_spec() -> TokenRequestSpec {
        TokenRequestSpec {
            flow: FlowSpec {
                sts: Some(StsFlow {
                    audience: AUDIENCE.into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            source: SourceSpec {
                service_account_token: Some(ServiceAccountTokenSource {
                    service_account_name: "app".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            secret: Default::default(),
            refresh: Default::default(),
            rollout_restart_targets: Vec::new(),
            rollout_restart_min_interval: None,
        }
    }

    fn check(spec: &TokenRequestSpec) -> Result<ValidSpec, InvalidSpec> {
        check_with(spec, &Policy::default())
    }

    fn check_with(spec: &TokenRequestSpec, policy: &Policy) -> Result<ValidSpec, InvalidSpec> {
        validate(
            spec,
            &Placement {
                namespace: "ns",
                name: "tr",
                policy,
            },
        )
    }

    fn problems(spec: &TokenRequestSpec) -> Vec<String> {
        check(spec).expect_err("spec should be invalid").problems
    }

    fn one_problem(value: serde_json::Value) -> String {
        let problems = problems(&from_json(value));
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems.into_iter().next().unwrap()
    }

    const CALLER: &str = r#"{"secret": {"name": "caller", "key": "token"}}"#;

    fn caller() -> serde_json::Value {
        serde_json::from_str(CALLER).unwrap()
    }

    #[test]
    fn id_token_flows() {
        let run = "https://hello-abc-uc.a.run.app";
        let v = check(&from_json(serde_json::json!({
            "flow": {"idToken": {"audience": run, "serviceAccount": "inv@p.iam.gserviceaccount.com",
                                 "delegates": ["d@p.iam.gserviceaccount.com"], "includeEmail": true}},
            "source": caller(),
        })))
        .unwrap();
        let Flow::IdToken(p) = &v.flow else {
            panic!("idToken expected")
        };
        assert_eq!(p.delegates, ["projects/-/serviceAccounts/d@p.iam.gserviceaccount.com"]);
        assert!(p.include_email && p.federation.is_none());
        assert_eq!(v.flow.name(), "idToken");
        assert_eq!(v.flow.max_lifetime(), Duration::from_secs(3600 + 300));
        assert_eq!(v.flow.default_username(), None);

        // The federated route: a ServiceAccount token is the STS subject, in one object.
        let v = check(&from_json(serde_json::json!({
            "flow": {"idToken": {"audience": run, "serviceAccount": "inv@p.iam.gserviceaccount.com",
                                 "federation": {"audience": AUDIENCE}}},
            "source": {"serviceAccountToken": {"serviceAccountName": "app"}},
        })))
        .unwrap();
        let Source::ServiceAccountToken { audience, .. } = &v.source else {
            panic!()
        };
        assert_eq!(audience, AUDIENCE);

        // Without a service account, only the metadata server's own identity issues one.
        let message = one_problem(serde_json::json!({"flow": {"idToken": {"audience": run}}, "source": caller()}));
        assert!(
            message.contains("serviceAccount is required unless the source is ambient"),
            "{message}"
        );
        let message = one_problem(serde_json::json!({
            "flow": {"idToken": {"audience": run, "serviceAccount": "inv@p.iam.gserviceaccount.com"}},
            "source": {"serviceAccountToken": {"serviceAccountName": "app"}},
        }));
        assert!(message.contains("idToken.federation"), "{message}");
        let message = one_problem(serde_json::json!({
            "flow": {"idToken": {"audience": run, "serviceAccount": "a/../b"}}, "source": caller(),
        }));
        assert!(message.starts_with("spec.flow.idToken.serviceAccount"), "{message}");
        let message = one_problem(serde_json::json!({
            "flow": {"idToken": {"audience": "a\nb", "serviceAccount": "inv@p.iam.gserviceaccount.com"}}, "source": caller(),
        }));
        assert!(message.starts_with("spec.flow.idToken.audience"), "{message}");
    }

    #[test]
    fn repository_flows_and_the_usernames_formats_need() {
        let link = "projects/p/locations/l/connections/c/gitRepositoryLinks/r";
        let repo = |format: serde_json::Value| {
            serde_json::json!({"flow": {"developerConnectRepository": {"gitRepositoryLink": link, "access": "readWrite"}},
                               "source": caller(), "secret": {"format": format}})
        };
        let v = check(&from_json(repo(serde_json::json!({"basicAuth": {}})))).unwrap();
        assert_eq!(
            v.flow,
            Flow::DeveloperConnectRepository {
                git_repository_link: link.into(),
                access: RepositoryAccess::ReadWrite
            }
        );
        // The username comes with the token.
        assert_eq!(v.secret.format.username(), Some(None));
        let bad = serde_json::json!({"flow": {"developerConnectRepository": {"gitRepositoryLink": "projects/p/locations/l/connections/c/gitRepositoryLinks/.."}}, "source": caller()});
        assert!(one_problem(bad).contains("gitRepositoryLink"));

        // Access tokens go to registries as oauth2accesstoken; a provider's user token has no username.
        let impersonation =
            serde_json::json!({"impersonation": {"serviceAccount": "a@p.iam.gserviceaccount.com", "scopes": ["s"]}});
        let v = check(&from_json(
            serde_json::json!({"flow": impersonation, "source": caller(),
            "secret": {"format": {"netrc": {"hosts": ["us-go.pkg.dev"]}}}}),
        ))
        .unwrap();
        assert_eq!(v.secret.format.username(), Some(Some("oauth2accesstoken")));
        let message = one_problem(serde_json::json!({
            "flow": {"developerConnect": {"accountConnector": "projects/p/locations/l/accountConnectors/c"}},
            "source": caller(), "secret": {"format": {"gitCredentials": {"urls": ["https://github.com"]}}},
        }));
        assert!(
            message.contains("gitCredentials.username is required") && message.contains("x-access-token"),
            "{message}"
        );
    }

    #[test]
    fn formats_refuse_what_their_consumers_cannot_take() {
        let with = |secret: serde_json::Value| {
            serde_json::json!({"flow": {"impersonation": {"serviceAccount": "a@p.iam.gserviceaccount.com", "scopes": ["s"]}},
                               "source": caller(), "secret": secret})
        };
        let cases = [
            (
                serde_json::json!({"type": "kubernetes.io/dockerconfigjson", "format": {"basicAuth": {}}}),
                "spec.secret.type does not apply",
            ),
            (
                serde_json::json!({"tokenKey": "t", "format": {"netrc": {"hosts": ["h"]}}}),
                "spec.secret.tokenKey does not apply",
            ),
            (
                serde_json::json!({"format": {"gitCredentials": {"urls": ["https://u:p@github.com"]}}}),
                "without credentials",
            ),
            (
                serde_json::json!({"format": {"gitCredentials": {"urls": ["ssh://github.com"]}}}),
                "http(s) URL",
            ),
            (
                serde_json::json!({"format": {"netrc": {"hosts": ["github.com:443"]}}}),
                "without port or path",
            ),
            (
                serde_json::json!({"format": {"basicAuth": {"tekton": {"git": ["https://github.com/org"]}}}}),
                "URL of a host",
            ),
            (
                serde_json::json!({"format": {"basicAuth": {"username": "two words"}}}),
                "without whitespace",
            ),
            (
                serde_json::json!({"format": {"flux": {"auth": "bearer", "username": "u"}}}),
                "does not apply with auth bearer",
            ),
            (
                serde_json::json!({"format": {"npmrc": {"registries": [{"url": "https://a.pkg.dev/p/r"}, {"url": "https://b.pkg.dev/p/r"}]}}}),
                "at most one registry may be without a scope",
            ),
            (
                serde_json::json!({"format": {"npmrc": {"registries": [{"url": "https://a.pkg.dev/p/r", "scope": "demo"}]}}}),
                "not an npm scope",
            ),
            (
                serde_json::json!({"labels": {"argocd.argoproj.io/secret-type": "cluster"},
                                "format": {"argoCD": {"url": "https://github.com/org"}}}),
                "is set by",
            ),
            (
                serde_json::json!({"format": {"template": {"data": {"token": "{{ token }}"}}}}),
                "the token's own key",
            ),
            (
                serde_json::json!({"format": {"template": {"data": {"a": "{{ token"}}}}),
                r#"template.data["a"]: syntax error"#,
            ),
            (
                serde_json::json!({"format": {"template": {"data": {"a": "{{ nope }}"}}}}),
                r#"template.data["a"]: the variable "nope""#,
            ),
            (
                serde_json::json!({"format": {"template": {"data": {"a": "x"}, "annotations": {"e.com/a": "{{ token }}"}}}}),
                r#"template.annotations["e.com/a"]: the variable "token""#,
            ),
            (
                serde_json::json!({"format": {"template": {"data": {"a": "x"}, "annotations": {"gcptoken.dev/x": "y"}}}}),
                "reserved",
            ),
            (
                serde_json::json!({"annotations": {"e.com/a": "1"}, "format": {"template": {"data": {"a": "x"}, "annotations": {"e.com/a": "y"}}}}),
                "also in spec.secret.annotations",
            ),
            (
                serde_json::json!({"format": {"template": {"data": {"a": "{% for a in 'abcdefghij' %}{% for b in 'abcdefghij' %}{% for c in 'abcdefghij' %}{% for d in 'abcdefghij' %}{{ token }}{% endfor %}{% endfor %}{% endfor %}{% endfor %}"}}}}),
                r#"template.data["a"]"#,
            ),
        ];
        for (secret, expected) in cases {
            let message = one_problem(with(secret.clone()));
            assert!(message.contains(expected), "{secret}: {message}");
        }
    }

    #[test]
    fn sts_defaults() {
        let v = check(&sts_spec()).unwrap();
        let Flow::Sts(sts) = &v.flow else {
            panic!("sts expected")
        };
        assert_eq!(sts.scopes, vec![CLOUD_PLATFORM_SCOPE]);
        assert_eq!(sts.subject_token_type, SubjectTokenType::Jwt);
        assert_eq!(sts.options, None);
        assert_eq!(
            v.source,
            Source::ServiceAccountToken {
                service_account_name: "app".into(),
                audience: AUDIENCE.into(),
                expiration_seconds: 3600
            }
        );
        assert_eq!(v.secret.name, "tr");
        assert_eq!(
            v.secret.format,
            Format::Opaque {
                token_key: "token".into()
            }
        );
        assert_eq!(v.refresh.renew_before, RenewBefore::Percentage(33));
        assert_eq!(v.refresh.lifetime_when_unknown, Duration::from_secs(900));
    }

    #[test]
    fn two_flows_and_no_source_are_both_reported() {
        let mut spec = sts_spec();
        spec.flow.developer_connect = Some(crate::crd::DeveloperConnectFlow {
            account_connector: "projects/p/locations/l/accountConnectors/c".into(),
        });
        spec.source = SourceSpec::default();
        let p = problems(&spec);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("exactly one of sts"));
        assert!(p[1].contains("exactly one of serviceAccountToken"));
    }

    #[test]
    fn service_account_token_only_feeds_sts() {
        let mut spec = sts_spec();
        spec.flow = FlowSpec {
            impersonation: Some(ImpersonationFlow {
                service_account: "sa@p.iam.gserviceaccount.com".into(),
                scopes: vec![CLOUD_PLATFORM_SCOPE.into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(problems(&spec)[0].contains("only valid as the subject token of the sts flow"));
    }

    #[test]
    fn audience_and_names_are_checked() {
        let mut spec = sts_spec();
        spec.flow.sts.as_mut().unwrap().audience = "//iam.googleapis.com/projects/abc/locations/global".into();
        spec.source.service_account_token.as_mut().unwrap().service_account_name = "Not_Valid".into();
        spec.source.service_account_token.as_mut().unwrap().expiration_seconds = Some(60);
        let p = problems(&spec);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p.iter().any(|m| m.contains("audience")));
        assert!(p.iter().any(|m| m.contains("serviceAccountName")));
        assert!(p.iter().any(|m| m.contains("expirationSeconds")));
    }

    #[test]
    fn workforce_audience_is_accepted() {
        let mut spec = sts_spec();
        spec.flow.sts.as_mut().unwrap().audience =
            "//iam.googleapis.com/locations/global/workforcePools/wf/providers/p".into();
        assert!(check(&spec).is_ok());
    }

    #[test]
    fn impersonation_lifetime_and_delegates() {
        let mut spec = sts_spec();
        spec.source = SourceSpec {
            secret: Some(SecretKeySource {
                name: "caller".into(),
                key: "token".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        spec.flow = FlowSpec {
            impersonation: Some(ImpersonationFlow {
                service_account: "sa@p.iam.gserviceaccount.com".into(),
                delegates: vec!["d@p.iam.gserviceaccount.com".into()],
                scopes: vec![CLOUD_PLATFORM_SCOPE.into()],
                lifetime: Some("30m".into()),
            }),
            ..Default::default()
        };
        let v = check(&spec).unwrap();
        let Flow::Impersonation(imp) = v.flow else { panic!() };
        assert_eq!(imp.lifetime, Duration::from_secs(1800));
        assert_eq!(
            imp.delegates,
            vec!["projects/-/serviceAccounts/d@p.iam.gserviceaccount.com"]
        );

        spec.flow.impersonation.as_mut().unwrap().lifetime = Some("13h".into());
        assert!(problems(&spec)[0].contains("between 1s and 12h"));
        spec.flow.impersonation.as_mut().unwrap().lifetime = Some("soon".into());
        assert!(problems(&spec)[0].contains("is not a duration"));
        spec.flow.impersonation.as_mut().unwrap().lifetime = None;
        spec.flow.impersonation.as_mut().unwrap().scopes.clear();
        assert!(problems(&spec)[0].contains("at least one scope"));
    }

    #[test]
    fn resource_names() {
        let connectors = ["projects", "locations", "accountConnectors"];
        assert!(is_resource_name(
            "projects/p/locations/us-central1/accountConnectors/c",
            &connectors,
            None
        ));
        assert!(!is_resource_name(
            "projects/p/locations/l/accountConnectors/",
            &connectors,
            None
        ));
        assert!(!is_resource_name(
            "projects/p/locations/l/accountConnectors/c/x",
            &connectors,
            None
        ));
        let data = ["projects", "locations", "collections"];
        assert!(is_resource_name(
            "projects/p/locations/global/collections/c/dataConnector",
            &data,
            Some("dataConnector")
        ));
        assert!(!is_resource_name(
            "projects/p/locations/global/collections/c/other",
            &data,
            Some("dataConnector")
        ));
    }

    #[test]
    fn names_cannot_reach_beyond_their_url_segment() {
        for account in [
            "sa@p.iam.gserviceaccount.com",
            "service-1@gcp-sa-x.iam.gserviceaccount.com",
            "1234567890",
        ] {
            assert!(is_service_account(account), "{account}");
        }
        for account in [
            "x@y.z#",
            r"x@y.z\..\a",
            r"x@y.z\..\..\..\..\..\anything#",
            "x@y.z?alt=json&x=",
            "x@y.z/../a",
            "x%40y.z",
            "x@y.z%2F..",
            "x @y.z",
            "x@y.z\n",
            "x@y..z",
            "x@.z",
            "x@y.z.",
            "Sa@p.iam.gserviceaccount.com",
            "sä@p.com",
            "x@y",
            "@y.z",
            "x@y.z:signJwt",
            ".",
            "..",
            "",
        ] {
            assert!(!is_service_account(account), "{account:?}");
        }
        assert!(!is_service_account(&format!("{}@p.com", "a".repeat(65))));
        assert!(!is_service_account(&format!("a@{}.com", "p".repeat(250))));

        let connectors = ["projects", "locations", "accountConnectors"];
        for name in [
            "projects/p/locations/l/accountConnectors/..",
            "projects/p/locations/l/accountConnectors/.",
            "projects/../locations/l/accountConnectors/c",
            "projects/p/locations/l/accountConnectors/c%2F..",
            "projects/p/locations/l/accountConnectors/c?x=1",
            "projects/p/locations/l/accountConnectors/c#",
            r"projects/p/locations/l/accountConnectors/c\..",
            "projects/p/locations/l/accountConnectors/c d",
            "projects/p/locations/l/accountConnectors/c\t",
            "projects/p/locations/l/accountConnectors/cé",
        ] {
            assert!(!is_resource_name(name, &connectors, None), "{name:?}");
        }
        assert!(is_resource_name(
            "projects/p/locations/l/accountConnectors/.hidden..c",
            &connectors,
            None
        ));

        let spec = from_json(serde_json::json!({
            "flow": {"developerConnect": {"accountConnector": "projects/p/locations/l/accountConnectors/.."}},
            "source": {"secret": {"name": "caller", "key": "token"}},
        }));
        let p = problems(&spec);
        assert!(
            p.iter()
                .any(|m| m.starts_with("spec.flow.developerConnect.accountConnector")),
            "{p:?}"
        );
    }

    #[test]
    fn messages_quote_only_a_bounded_prefix() {
        let long = format!("x@y.z?{}", "\u{7}".repeat(10_000));
        let mut spec = sts_spec();
        spec.flow = FlowSpec {
            impersonation: Some(ImpersonationFlow {
                service_account: long.clone(),
                scopes: vec![CLOUD_PLATFORM_SCOPE.into()],
                delegates: vec![long],
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = problems(&spec);
        let named: Vec<_> = p.iter().filter(|m| m.contains("x@y.z?")).collect();
        assert_eq!(named.len(), 2, "{p:?}");
        for message in named {
            assert!(message.len() < 300, "{} bytes: {message}", message.len());
            assert!(message.contains(r#""x@y.z?\u{7}"#), "{message}");
            assert!(message.contains("\"…"), "{message}");
        }
        assert_eq!(quote("a\"b"), r#""a\"b""#);
    }

    #[test]
    fn secret_layout_rules() {
        let mut spec = sts_spec();
        spec.secret.type_ = SecretType::DockerConfigJson;
        assert!(problems(&spec)[0].contains("at least one registry"));
        spec.secret.registries = vec!["us-docker.pkg.dev".into(), "localhost:5000".into()];
        assert!(check(&spec).is_ok());
        spec.secret.token_key = Some("tok".into());
        assert!(problems(&spec)[0].contains("only valid with type Opaque"));

        let mut spec = sts_spec();
        spec.secret.token_key = Some(EXPIRES_AT_KEY.into());
        spec.secret
            .labels
            .insert("app.kubernetes.io/managed-by".into(), "me".into());
        spec.secret.annotations.insert("bad key!".into(), "x".into());
        let p = problems(&spec);
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn refresh_rules() {
        let mut spec = sts_spec();
        spec.refresh.renew_before = Some("10m".into());
        let v = check(&spec).unwrap();
        assert_eq!(v.refresh.renew_before, RenewBefore::Absolute(Duration::from_secs(600)));
        spec.refresh.renew_before_percentage = Some(20);
        assert!(problems(&spec)[0].contains("not both"));
        spec.refresh.renew_before = None;
        spec.refresh.renew_before_percentage = Some(95);
        assert!(problems(&spec)[0].contains("between 1 and 90"));
        spec.refresh.renew_before_percentage = None;
        // Every duration has an upper bound: the value that overflowed, and others far out.
        for (before, unknown) in [
            ("18446744073709551615s", "1h"),
            ("13h", "1h"),
            ("1h", "10000000000y"),
            ("1h", "1s"),
        ] {
            spec.refresh.renew_before = Some(before.into());
            spec.refresh.lifetime_when_unknown = Some(unknown.into());
            let p = problems(&spec);
            assert_eq!(p.len(), 1, "{before} {unknown}: {p:?}");
        }
        spec.refresh.renew_before = Some("12h".into());
        spec.refresh.lifetime_when_unknown = Some("1m".into());
        assert!(check(&spec).is_ok());
        spec.rollout_restart_min_interval = Some("25h".into());
        assert!(problems(&spec)[0].contains("spec.rolloutRestartMinInterval must be between 1s and 1day"));
    }

    #[test]
    fn options_carry_access_boundary_and_user_project() {
        let mut spec = sts_spec();
        let sts = spec.flow.sts.as_mut().unwrap();
        sts.user_project = Some("proj".into());
        sts.access_boundary = Some(AccessBoundary {
            access_boundary_rules: vec![crate::crd::AccessBoundaryRule {
                available_resource: "//storage.googleapis.com/projects/_/buckets/b".into(),
                available_permissions: vec!["inRole:roles/storage.objectViewer".into()],
                availability_condition: None,
            }],
        });
        let v = check(&spec).unwrap();
        let Flow::Sts(sts) = v.flow else { panic!() };
        let options: serde_json::Value = serde_json::from_str(sts.options.as_deref().unwrap()).unwrap();
        assert_eq!(options["userProject"], "proj");
        assert_eq!(
            options["accessBoundary"]["accessBoundaryRules"][0]["availablePermissions"][0],
            "inRole:roles/storage.objectViewer"
        );

        spec.flow
            .sts
            .as_mut()
            .unwrap()
            .access_boundary
            .as_mut()
            .unwrap()
            .access_boundary_rules[0]
            .available_permissions = vec!["roles/storage.objectViewer".into()];
        assert!(problems(&spec)[0].contains("inRole:ROLE"));
    }

    #[test]
    fn token_hash_follows_flow_and_source_only() {
        let a = check(&sts_spec()).unwrap();
        let mut spec = sts_spec();
        spec.secret.labels.insert("team".into(), "a".into());
        let b = check(&spec).unwrap();
        assert_eq!(a.token_hash, b.token_hash);
        spec.flow.sts.as_mut().unwrap().scopes = vec!["https://www.googleapis.com/auth/devstorage.read_only".into()];
        let c = check(&spec).unwrap();
        assert_ne!(a.token_hash, c.token_hash);
    }

    #[test]
    fn rollout_restart_targets() {
        let mut spec = sts_spec();
        assert_eq!(check(&spec).unwrap().rollout.min_interval, Duration::from_secs(600));
        let plain = check(&spec).unwrap().token_hash;
        spec.rollout_restart_targets = serde_json::from_value(serde_json::json!([
            {"kind": "Deployment", "name": "web"},
            {"kind": "StatefulSet", "name": "web"},
        ]))
        .unwrap();
        spec.rollout_restart_min_interval = Some("30m".into());
        let v = check(&spec).unwrap();
        assert_eq!(v.rollout.min_interval, Duration::from_secs(1800));
        assert_eq!(
            v.rollout.targets,
            vec![
                (WorkloadKind::Deployment, "web".to_string()),
                (WorkloadKind::StatefulSet, "web".to_string())
            ]
        );
        assert_eq!(v.token_hash, plain, "targets do not change the token");
        spec.rollout_restart_targets
            .push(spec.rollout_restart_targets[0].clone());
        spec.rollout_restart_targets[1].name = "Not_A_Name".into();
        spec.rollout_restart_min_interval = Some("soon".into());
        let problems = check(&spec).unwrap_err().problems;
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("spec.rolloutRestartTargets[1].name"));
        assert!(problems[1].contains("Deployment \"web\" is named twice"));
        assert!(problems[2].contains("spec.rolloutRestartMinInterval"));
    }

    #[test]
    fn token_keys_leave_room_for_the_previous_token() {
        let mut spec = sts_spec();
        spec.secret.token_key = Some("k".repeat(253));
        assert!(check(&spec).is_err());
        spec.secret.token_key = Some("k".repeat(244));
        assert!(check(&spec).is_ok());
        spec.secret.token_key = Some(".".into());
        assert!(check(&spec).is_err());
    }

    fn from_json(value: serde_json::Value) -> TokenRequestSpec {
        serde_json::from_value(value).unwrap()
    }

    fn problems_with(spec: &TokenRequestSpec, policy: &Policy) -> Vec<String> {
        check_with(spec, policy).expect_err("spec should be invalid").problems
    }

    #[test]
    fn sts_with_impersonation_asks_sts_for_cloud_platform() {
        let storage = "https://www.googleapis.com/auth/devstorage.read_only";
        let spec = from_json(serde_json::json!({
            "flow": {"sts": {"audience": AUDIENCE, "scopes": [storage],
                             "serviceAccountImpersonation": {"serviceAccount": "sa@p.iam.gserviceaccount.com",
                                                             "delegates": ["d@p.iam.gserviceaccount.com"], "lifetime": "30m"}}},
            "source": {"serviceAccountToken": {"serviceAccountName": "app"}},
        }));
        let Flow::Sts(sts) = check(&spec).unwrap().flow else {
            panic!("sts expected")
        };
        assert_eq!(sts.scopes, vec![CLOUD_PLATFORM_SCOPE]);
        let imp = sts.impersonation.unwrap();
        assert_eq!(imp.scopes, [storage]);
        assert_eq!(imp.lifetime, Duration::from_secs(1800));
        assert_eq!(
            imp.delegates,
            vec!["projects/-/serviceAccounts/d@p.iam.gserviceaccount.com"]
        );

        let spec = from_json(serde_json::json!({
            "flow": {"sts": {"audience": AUDIENCE, "serviceAccountImpersonation": {"serviceAccount": "nobody", "lifetime": "13h"}}},
            "source": {"serviceAccountToken": {"serviceAccountName": "app"}},
        }));
        let p = problems(&spec);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("spec.flow.sts.serviceAccountImpersonation.serviceAccount"));
        assert_eq!(
            p[1],
            "spec.flow.sts.serviceAccountImpersonation.lifetime must be between 1s and 12h"
        );
    }

    #[test]
    fn hashes_of_specs_without_the_new_fields_do_not_change() {
        // Secrets written before formats, subject tokens and impersonation existed keep their
        // spec hash, so an upgrade mints nothing.
        let spec = from_json(serde_json::json!({
            "flow": {"sts": {"audience": AUDIENCE}},
            "source": {"secret": {"name": "jwt", "key": "token"}},
        }));
        let v = check(&spec).unwrap();
        // The hash is over these exact bytes.
        assert_eq!(
            serde_json::to_string(&(&v.flow, &v.source)).unwrap(),
            format!(
                r#"[{{"Sts":{{"audience":"{AUDIENCE}","scopes":["{CLOUD_PLATFORM_SCOPE}"],"subject_token_type":"urn:ietf:params:oauth:token-type:jwt","options":null}}}},{{"Secret":{{"name":"jwt","key":"token"}}}}]"#
            )
        );
    }

    #[test]
    fn secret_formats_must_fit_the_flow() {
        let dc =
            serde_json::json!({"developerConnect": {"accountConnector": "projects/p/locations/l/accountConnectors/c"}});
        let jwt_for_dc = from_json(
            serde_json::json!({"flow": dc, "source": {"secret": {"name": "s", "key": "k", "format": "jwt"}}}),
        );
        assert!(problems(&jwt_for_dc)[0].contains("a JWT is only valid as the subject token of the sts flow"));
        let key_for_sts = from_json(serde_json::json!({
            "flow": {"sts": {"audience": AUDIENCE}},
            "source": {"secret": {"name": "s", "key": "k", "format": "serviceAccountKey"}},
        }));
        assert!(problems(&key_for_sts)[0].contains("urn:ietf:params:oauth:token-type:access_token"));
        let chained_to_jwt_sts = from_json(serde_json::json!({
            "flow": {"sts": {"audience": AUDIENCE}}, "source": {"tokenRequest": {"name": "up"}},
        }));
        assert!(problems(&chained_to_jwt_sts)[0].starts_with("spec.source.tokenRequest"));
        for format in ["auto", "accessToken", "serviceAccountKey", "authorizedUser"] {
            let spec = from_json(
                serde_json::json!({"flow": dc, "source": {"secret": {"name": "s", "key": "k", "format": format}}}),
            );
            let v = check(&spec).unwrap();
            assert!(
                matches!(
                    v.source,
                    Source::Secret {
                        subject_token: None,
                        ..
                    }
                ),
                "{format}"
            );
        }
    }

    #[test]
    fn subject_tokens_go_with_external_account_files_only() {
        let dc =
            serde_json::json!({"developerConnect": {"accountConnector": "projects/p/locations/l/accountConnectors/c"}});
        let source =
            |secret: serde_json::Value| from_json(serde_json::json!({"flow": dc, "source": {"secret": secret}}));
        let missing = source(serde_json::json!({"name": "wif", "key": "config", "format": "externalAccount"}));
        assert!(problems(&missing)[0].contains("subjectToken is required"));
        let unused = source(
            serde_json::json!({"name": "wif", "key": "config", "format": "accessToken",
                                                "subjectToken": {"secret": {"name": "jwt", "key": "token"}}}),
        );
        assert!(problems(&unused)[0].contains("only valid with format externalAccount"));
        let both = source(serde_json::json!({"name": "wif", "key": "config",
                                              "subjectToken": {"secret": {"name": "jwt", "key": "token"},
                                                               "serviceAccountToken": {"serviceAccountName": "app"}}}));
        assert!(problems(&both)[0].contains("exactly one of serviceAccountToken, secret"));
        let short = source(
            serde_json::json!({"name": "wif", "key": "config", "format": "externalAccount",
                                               "subjectToken": {"serviceAccountToken": {"serviceAccountName": "app", "expirationSeconds": 60}}}),
        );
        assert!(
            problems(&short)[0].starts_with("spec.source.secret.subjectToken.serviceAccountToken.expirationSeconds")
        );
        let good = source(serde_json::json!({"name": "wif", "key": "config",
                                              "subjectToken": {"serviceAccountToken": {"serviceAccountName": "app"}}}));
        let Source::Secret { subject_token, .. } = check(&good).unwrap().source else {
            panic!()
        };
        assert_eq!(
            subject_token,
            Some(SubjectToken::ServiceAccountToken {
                service_account_name: "app".into(),
                audience: None,
                expiration_seconds: 3600
            })
        );
    }

    #[test]
    fn attachment_needs_the_setting_a_pull_secret_and_distinct_names() {
        let spec = |secret: serde_json::Value| {
            from_json(serde_json::json!({
                "flow": {"impersonation": {"serviceAccount": "sa@p.iam.gserviceaccount.com", "scopes": [CLOUD_PLATFORM_SCOPE]}},
                "source": {"secret": {"name": "key", "key": "key.json"}},
                "secret": secret,
            }))
        };
        let enabled = Policy {
            service_account_attachment: true,
            ..Default::default()
        };
        let pull = spec(
            serde_json::json!({"type": "kubernetes.io/dockerconfigjson", "registries": ["europe-docker.pkg.dev"],
                                           "attachToServiceAccounts": ["default", "builder"]}),
        );
        assert_eq!(check_with(&pull, &enabled).unwrap().attach_to, ["default", "builder"]);
        let p = problems(&pull);
        assert!(p.len() == 1 && p[0].contains(ATTACHMENT_SETTING), "{p:?}");

        let opaque = spec(serde_json::json!({"attachToServiceAccounts": ["default"]}));
        let p = problems_with(&opaque, &enabled);
        assert!(p.len() == 1 && p[0].contains("kubernetes.io/dockerconfigjson"), "{p:?}");
        let formatted = spec(serde_json::json!({"format": {"netrc": {"hosts": ["h.example"]}},
                                                "attachToServiceAccounts": ["default"]}));
        assert!(
            problems_with(&formatted, &enabled)
                .iter()
                .any(|p| p.contains("attachToServiceAccounts"))
        );

        let twice = spec(
            serde_json::json!({"type": "kubernetes.io/dockerconfigjson", "registries": ["europe-docker.pkg.dev"],
                                            "attachToServiceAccounts": ["a", "Not_A_Name", "a"]}),
        );
        let p = problems_with(&twice, &enabled);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("spec.secret.attachToServiceAccounts[1]: \"Not_A_Name\" is not a valid object name"));
        assert!(p[1].ends_with("[2]: \"a\" is named twice"));
        assert!(
            check_with(&spec(serde_json::json!({})), &Policy::default())
                .unwrap()
                .attach_to
                .is_empty()
        );
    }

    #[test]
    fn ambient_only_in_allowed_namespaces() {
        let spec = from_json(serde_json::json!({
            "flow": {"impersonation": {"serviceAccount": "sa@p.iam.gserviceaccount.com", "scopes": [CLOUD_PLATFORM_SCOPE]}},
            "source": {"ambient": {}},
        }));
        let p = problems(&spec);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("\"ns\"") && p[0].contains(AMBIENT_SETTING), "{}", p[0]);
        let allowed = Policy {
            ambient_namespaces: BTreeSet::from(["ns".to_string()]),
            ..Default::default()
        };
        assert_eq!(check_with(&spec, &allowed).unwrap().source, Source::Ambient);
        let other = Policy {
            ambient_namespaces: BTreeSet::from(["other".to_string()]),
            ..Default::default()
        };
        assert_eq!(problems_with(&spec, &other).len(), 1);
    }

    #[test]
    fn the_operator_service_account_is_never_a_source() {
        let own = Policy {
            own_service_account: Some("ns/operator".parse().unwrap()),
            ..Default::default()
        };
        let direct = from_json(serde_json::json!({
            "flow": {"sts": {"audience": AUDIENCE}},
            "source": {"serviceAccountToken": {"serviceAccountName": "operator"}},
        }));
        assert!(problems_with(&direct, &own)[0].contains("the operator's own ServiceAccount"));
        let subject = from_json(serde_json::json!({
            "flow": {"developerConnect": {"accountConnector": "projects/p/locations/l/accountConnectors/c"}},
            "source": {"secret": {"name": "wif", "key": "config",
                                  "subjectToken": {"serviceAccountToken": {"serviceAccountName": "operator"}}}},
        }));
        assert!(problems_with(&subject, &own)[0].starts_with("spec.source.secret.subjectToken.serviceAccountToken"));
        // A ServiceAccount of the same name elsewhere is someone else's.
        let elsewhere = Policy {
            own_service_account: Some("ops/operator".parse().unwrap()),
            ..Default::default()
        };
        assert!(check_with(&direct, &elsewhere).is_ok());
        assert!("no-slash".parse::<ServiceAccountRef>().is_err());
        assert!("ns/Bad_Name".parse::<ServiceAccountRef>().is_err());
    }

    #[test]
    fn caller_scopes_follow_the_flow() {
        let storage = "https://www.googleapis.com/auth/devstorage.read_only".to_string();
        let downscope = from_json(serde_json::json!({
            "flow": {"sts": {"audience": AUDIENCE, "scopes": [storage],
                             "subjectTokenType": "urn:ietf:params:oauth:token-type:access_token"}},
            "source": {"ambient": {}},
        }));
        let allowed = Policy {
            ambient_namespaces: BTreeSet::from(["ns".to_string()]),
            ..Default::default()
        };
        let v = check_with(&downscope, &allowed).unwrap();
        assert_eq!(caller_scopes(&v.flow), vec![storage]);
        let v = check(&sts_spec()).unwrap();
        let dc = Flow::DeveloperConnect {
            account_connector: "projects/p/locations/l/accountConnectors/c".into(),
        };
        assert_eq!(caller_scopes(&dc), vec![CLOUD_PLATFORM_SCOPE]);
        assert_eq!(caller_scopes(&v.flow), vec![CLOUD_PLATFORM_SCOPE]);
    }
}
