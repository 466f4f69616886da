//! The `TokenRequest` custom resource (`gcptoken.dev/v1alpha1`).
//!
//! One-of groups (`flow`, `source`) are structs of optional members rather than Rust enums so that an
//! object with zero or two members still deserializes: the operator then reports `InvalidSpec` in the
//! status instead of failing to read the object. The CRD schema carries CEL rules for the same
//! constraints on servers that enforce them (Kubernetes >= 1.25).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What users apply: a Google access token to obtain, the credential that authenticates the
/// exchange, the Secret to write it into, and when to refresh it.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "gcptoken.dev",
    version = "v1alpha1",
    kind = "TokenRequest",
    namespaced,
    shortname = "gtr",
    status = "TokenRequestStatus",
    category = "gcptoken",
    printcolumn = r#"{"name":"Flow","type":"string","jsonPath":".status.flow"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    // Times, not `date` columns: kubectl shows a future date as `<invalid>`.
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.expirationTime"}"#,
    printcolumn = r#"{"name":"Next Refresh","type":"string","jsonPath":".status.nextRefreshTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequestSpec {
    /// The Google API that issues the token. Exactly one member must be set.
    pub flow: FlowSpec,
    /// The credential that authenticates the call to Google. Exactly one member must be set.
    pub source: SourceSpec,
    /// The Secret the operator owns and writes.
    #[serde(default)]
    pub secret: SecretSpec,
    /// When to refresh the token.
    #[serde(default)]
    pub refresh: RefreshSpec,
    /// Workloads of this namespace to restart (a rolling restart, as `kubectl rollout restart`)
    /// when the token in the Secret changes: for consumers that read it only at start, from an
    /// environment variable or a `subPath` mount, which never see an update otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub rollout_restart_targets: Vec<RolloutRestartTarget>,
    /// The least time between two restarts of the targets, e.g. `30m`. Default `10m`. A token
    /// change within it restarts them when it has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_restart_min_interval: Option<String>,
}

/// A workload restarted when the token changes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRestartTarget {
    pub kind: WorkloadKind,
    pub name: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.sts), has(self.impersonation), has(self.developerConnect), has(self.discoveryEngine)].filter(x, x).size() == 1"
).message("exactly one of sts, impersonation, developerConnect, discoveryEngine must be set"))]
pub struct FlowSpec {
    /// Security Token Service token exchange (RFC 8693), e.g. Workload Identity Federation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sts: Option<StsFlow>,
    /// IAM Credentials generateAccessToken: a token for a Google service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impersonation: Option<ImpersonationFlow>,
    /// Developer Connect fetchAccessToken: the calling user's token for a linked Git provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub developer_connect: Option<DeveloperConnectFlow>,
    /// Discovery Engine acquireAccessToken: the calling user's token for a data connector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery_engine: Option<DiscoveryEngineFlow>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StsFlow {
    /// The workload (or workforce) identity pool provider, e.g.
    /// `//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/POOL/providers/PROVIDER`.
    #[schemars(regex(pattern = r"^//iam\.googleapis\.com/"))]
    pub audience: String,
    /// OAuth scopes of the issued token. Default: cloud-platform.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// The type of the subject token. Default: `urn:ietf:params:oauth:token-type:jwt`.
    // Not an Option: a nullable enum puts `null` among the enum values, which Kubernetes 1.20
    // rejects in a CRD.
    #[serde(default)]
    pub subject_token_type: SubjectTokenType,
    /// A Credential Access Boundary that downscopes the issued token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_boundary: Option<AccessBoundary>,
    /// Project used for quota and billing of the exchange (`options.userProject`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub user_project: Option<String>,
    /// Then impersonate a Google service account with the federated token (IAM Credentials
    /// generateAccessToken), in the same TokenRequest. `scopes` are then the final token's scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_impersonation: Option<StsImpersonation>,
}

/// The impersonation step of Workload Identity Federation, as in an `external_account` file with
/// `service_account_impersonation_url`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StsImpersonation {
    /// Email or unique id of the Google service account to impersonate.
    #[schemars(length(min = 1))]
    pub service_account: String,
    /// Delegation chain, as service account emails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegates: Vec<String>,
    /// Requested lifetime, e.g. `1h` (default); at most `12h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<String>,
}

/// The subject token types STS documents.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SubjectTokenType {
    #[default]
    #[serde(rename = "urn:ietf:params:oauth:token-type:jwt")]
    Jwt,
    #[serde(rename = "urn:ietf:params:oauth:token-type:id_token")]
    IdToken,
    #[serde(rename = "urn:ietf:params:oauth:token-type:saml2")]
    Saml2,
    #[serde(rename = "urn:ietf:params:aws:token-type:aws4_request")]
    Aws4Request,
    #[serde(rename = "urn:ietf:params:oauth:token-type:access_token")]
    AccessToken,
    #[serde(rename = "urn:ietf:params:oauth:token-type:mtls")]
    Mtls,
}

impl SubjectTokenType {
    pub fn urn(self) -> &'static str {
        match self {
            Self::Jwt => "urn:ietf:params:oauth:token-type:jwt",
            Self::IdToken => "urn:ietf:params:oauth:token-type:id_token",
            Self::Saml2 => "urn:ietf:params:oauth:token-type:saml2",
            Self::Aws4Request => "urn:ietf:params:aws:token-type:aws4_request",
            Self::AccessToken => "urn:ietf:params:oauth:token-type:access_token",
            Self::Mtls => "urn:ietf:params:oauth:token-type:mtls",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessBoundary {
    #[schemars(length(min = 1, max = 10))]
    pub access_boundary_rules: Vec<AccessBoundaryRule>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessBoundaryRule {
    /// Full resource name, e.g. `//storage.googleapis.com/projects/_/buckets/BUCKET`.
    pub available_resource: String,
    /// Role references, each `inRole:ROLE`.
    #[schemars(length(min = 1))]
    pub available_permissions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_condition: Option<AvailabilityCondition>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AvailabilityCondition {
    #[schemars(length(max = 2048))]
    pub expression: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImpersonationFlow {
    /// Email or unique id of the Google service account to impersonate.
    #[schemars(length(min = 1))]
    pub service_account: String,
    /// Delegation chain, as service account emails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegates: Vec<String>,
    /// OAuth scopes of the issued token; at least one.
    #[schemars(length(min = 1))]
    pub scopes: Vec<String>,
    /// Requested lifetime, e.g. `1h` (default); at most `12h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeveloperConnectFlow {
    /// `projects/P/locations/L/accountConnectors/C`.
    #[schemars(regex(pattern = r"^projects/[^/]+/locations/[^/]+/accountConnectors/[^/]+$"))]
    pub account_connector: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryEngineFlow {
    /// `projects/P/locations/L/collections/C/dataConnector`.
    #[schemars(regex(pattern = r"^projects/[^/]+/locations/[^/]+/collections/[^/]+/dataConnector$"))]
    pub data_connector: String,
    /// Overrides the connector's default scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The tool or action the token is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.serviceAccountToken), has(self.secret), has(self.tokenRequest), has(self.ambient)].filter(x, x).size() == 1"
).message("exactly one of serviceAccountToken, secret, tokenRequest, ambient must be set"))]
pub struct SourceSpec {
    /// A Kubernetes ServiceAccount token minted with the TokenRequest API; only as an STS subject token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_token: Option<ServiceAccountTokenSource>,
    /// A token stored in a Secret of the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretKeySource>,
    /// The access token currently held by another TokenRequest of the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_request: Option<TokenRequestSource>,
    /// The operator's own Google identity (the metadata server, or the credentials file given to
    /// the operator). Only in namespaces the operator's administrator allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ambient: Option<AmbientSource>,
}

/// No settings: which identity is the operator's choice, not the tenant's.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct AmbientSource {}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountTokenSource {
    pub service_account_name: String,
    /// Audience of the ServiceAccount token. Default: the STS audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Lifetime of the ServiceAccount token. Default 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 600, max = 172_799))]
    pub expiration_seconds: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySource {
    pub name: String,
    pub key: String,
    /// What the key holds. Default `auto`: a Google credential file when it is JSON with a `type`
    /// field, else a token.
    // Not an Option, for the reason given at `subjectTokenType`.
    #[serde(default, skip_serializing_if = "SecretFormat::is_auto")]
    pub format: SecretFormat,
    /// `externalAccount` files only: where the subject token exchanged at STS comes from. The
    /// file's own `credential_source` is never used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_token: Option<SubjectTokenSource>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SecretFormat {
    #[default]
    Auto,
    /// A Google access token.
    AccessToken,
    /// A JWT (e.g. an OIDC token), as the subject token of `sts`.
    Jwt,
    /// A service account key file (`"type": "service_account"`).
    ServiceAccountKey,
    /// An `authorized_user` file (client id, client secret, refresh token), as `gcloud auth
    /// application-default login` writes it.
    AuthorizedUser,
    /// An `external_account` file (Workload Identity Federation), as `gcloud iam
    /// workload-identity-pools create-cred-config` writes it.
    ExternalAccount,
}

impl SecretFormat {
    pub fn is_auto(&self) -> bool {
        *self == Self::Auto
    }
}

/// The subject token of an `externalAccount` file. Exactly one member must be set.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.serviceAccountToken), has(self.secret)].filter(x, x).size() == 1"
).message("exactly one of serviceAccountToken, secret must be set"))]
pub struct SubjectTokenSource {
    /// A ServiceAccount token of this namespace; its audience defaults to the file's `audience`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_token: Option<ServiceAccountTokenSource>,
    /// A token stored in a Secret of the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretKeyRef>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequestSource {
    pub name: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretSpec {
    /// Name of the Secret. Default: the TokenRequest's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `Opaque` (default) or `kubernetes.io/dockerconfigjson`.
    // Not an Option, for the reason given at `subjectTokenType`.
    #[serde(default, rename = "type")]
    pub type_: SecretType,
    /// dockerconfigjson only: one `auths` entry per registry host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registries: Vec<String>,
    /// Opaque only: the key holding the token. Default `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_key: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SecretType {
    #[default]
    Opaque,
    #[serde(rename = "kubernetes.io/dockerconfigjson")]
    DockerConfigJson,
}

impl SecretType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Opaque => "Opaque",
            Self::DockerConfigJson => "kubernetes.io/dockerconfigjson",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefreshSpec {
    /// Refresh when this share of the token's lifetime is left. Default 33.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 90))]
    pub renew_before_percentage: Option<u8>,
    /// Refresh this long before expiry, e.g. `10m`; overrides the percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_before: Option<String>,
    /// Lifetime assumed when the API returns no expiry. Default `15m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_when_unknown: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequestStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The flow in use (`sts`, `impersonation`, `developerConnect`, `discoveryEngine`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Expiry of the token in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// First 12 hex characters of the SHA-256 of the token: tells tokens apart without revealing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_fingerprint: Option<String>,
    /// Failed attempts since the last success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// Fingerprint of the token the rollout restart targets were last restarted for (or that was
    /// current when they were first named).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_restart_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rollout_restart_time: Option<Time>,
}

impl TokenRequest {
    /// Name of the Secret this TokenRequest writes.
    pub fn secret_name(&self) -> String {
        self.spec
            .secret
            .name
            .clone()
            .unwrap_or_else(|| kube::ResourceExt::name_any(self))
    }

    pub fn ready_condition(&self) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == crate::status::READY)
    }
}
