//! The `TokenRequest` custom resource (`gcptoken.dev/v1alpha1`).
//!
//! One-of groups (`flow`, `source`) are structs of optional members rather than Rust enums so that an
//! object with zero or two members still deserializes: the operator then reports `InvalidSpec` in the
//! status instead of failing to read the object. The CRD schema carries CEL rules for the same
//! constraints on servers that enforce them (Kubernetes >= 1.25).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, transform::Transform};
use serde::{Deserialize, Serialize};

/// The size bounds of the schema. Every string, list and map has one, so that a TokenRequest stays
/// small (the operator caches all of them) and CEL cost estimates stay finite; the README's
/// TokenRequest reference gives the reason for each.
pub mod bound {
    /// A Kubernetes object name (DNS subdomain): Secrets, ServiceAccounts, TokenRequests, workloads.
    pub const OBJECT_NAME: u32 = 253;
    /// A Secret data key.
    pub const SECRET_KEY: u32 = 253;
    /// A label or annotation key: a DNS subdomain prefix, `/`, and a name of at most 63.
    pub const METADATA_KEY: u32 = 253 + 1 + 63;
    /// Kubernetes' limit for a label value.
    pub const LABEL_VALUE: u32 = 63;
    /// 32 such annotations with their keys stay under a third of the 256 KiB Kubernetes allows for
    /// all of an object's annotations.
    pub const ANNOTATION_VALUE: u32 = 2048;
    /// Labels, and annotations, per Secret.
    pub const METADATA_ENTRIES: u32 = 32;
    /// A workload or workforce identity pool provider's full resource name (about 165 at most).
    pub const STS_AUDIENCE: u32 = 256;
    /// A Kubernetes ServiceAccount token audience: a URL or URN.
    pub const TOKEN_AUDIENCE: u32 = 512;
    /// A Google Cloud project ID (6 to 30 characters).
    pub const PROJECT: u32 = 32;
    /// A Google service account email (RFC 5321's 254 for an address) or unique id.
    pub const SERVICE_ACCOUNT: u32 = 254;
    /// Hops of an IAM delegation chain (real ones have one or two).
    pub const DELEGATES: u32 = 10;
    /// Scopes a token asks for: a few are enough; Google's scope URLs are under 100 characters.
    pub const SCOPES: u32 = 32;
    pub const SCOPE: u32 = 256;
    /// Google's limit on access boundary rules.
    pub const ACCESS_BOUNDARY_RULES: u32 = 10;
    /// A Cloud Storage bucket's full resource name: a 44-character prefix and up to 222.
    pub const AVAILABLE_RESOURCE: u32 = 512;
    /// More than the predefined Cloud Storage roles (buckets are what a boundary names).
    pub const AVAILABLE_PERMISSIONS: u32 = 16;
    /// `inRole:` and a role name, custom roles included (about 120).
    pub const AVAILABLE_PERMISSION: u32 = 256;
    /// Google's limit on an availability condition.
    pub const CEL_EXPRESSION: u32 = 2048;
    /// Text for people, in a boundary whose whole size Google limits.
    pub const CONDITION_TITLE: u32 = 128;
    pub const CONDITION_DESCRIPTION: u32 = 512;
    /// A Google resource name of three IDs (each at most 128, as validation checks).
    pub const GOOGLE_RESOURCE: u32 = 512;
    /// A tool or action name (Discovery Engine).
    pub const ACTION: u32 = 256;
    /// Registry hosts of a dockerconfigjson Secret: every Artifact Registry location and gcr.io
    /// host fits.
    pub const REGISTRIES: u32 = 64;
    /// A host name and a port.
    pub const REGISTRY: u32 = 253 + 1 + 5;
    /// An ID token's audience: a service URL, or an IAP OAuth client id.
    pub const ID_TOKEN_AUDIENCE: u32 = 2048;
    /// A username sent with a token (`x-access-token`, `oauth2accesstoken`, ...).
    pub const USERNAME: u32 = 256;
    /// Hosts or URLs a credential file or Tekton annotations name.
    pub const CREDENTIAL_HOSTS: u32 = 16;
    /// A URL of a repository, a registry or a prefix of them.
    pub const URL: u32 = 512;
    /// ServiceAccounts one pull Secret is attached to: a namespace's build and runtime accounts.
    pub const ATTACHED_SERVICE_ACCOUNTS: u32 = 16;
    /// Attachments the status records: the wanted ones, and as many whose removal failed and is
    /// retried.
    pub const RECORDED_ATTACHMENTS: u32 = 2 * ATTACHED_SERVICE_ACCOUNTS;
    /// An Argo CD project or repository name.
    pub const ARGO_NAME: u32 = 253;
    /// An npm scope (`@team`).
    pub const NPM_SCOPE: u32 = 215;
    /// Keys a template renders, and the template of one: enough for a few configuration files,
    /// small enough that the largest spec stays within what `kubectl apply` can copy into its
    /// annotation (see the size bounds in the README).
    pub const TEMPLATE_ENTRIES: u32 = 4;
    pub const TEMPLATE: u32 = 4096;
    /// Annotations a template renders, and the template of one.
    pub const ANNOTATION_TEMPLATE_ENTRIES: u32 = 4;
    pub const ANNOTATION_TEMPLATE: u32 = 1024;
    /// Workloads restarted for one token: each restart is a patch.
    pub const ROLLOUT_RESTART_TARGETS: u32 = 20;
    /// A duration such as `1h30m`; see [`super::duration_pattern`].
    pub const DURATION: u32 = 32;
    /// Digits of each number in a duration.
    pub const DURATION_DIGITS: u32 = 5;
    /// An RFC 3339 time, as Kubernetes writes it (20 characters, to the second).
    pub const TIME: u32 = 32;
    /// The flow's name in the status.
    pub const FLOW: u32 = 32;
    /// A fingerprint: at most a whole SHA-256 in hex (the operator writes 12 characters).
    pub const FINGERPRINT: u32 = 64;
    /// Scopes in the status: those Google reports (Developer Connect, Discovery Engine) may be
    /// more than a spec names.
    pub const STATUS_SCOPES: u32 = 128;
    pub const STATUS_SCOPE: u32 = 512;
    /// Conditions in the status (the operator writes one, `Ready`).
    pub const CONDITIONS: u32 = 4;
    /// Kubernetes' own bounds for `metav1.Condition`.
    pub const CONDITION_TYPE: u32 = 316;
    pub const CONDITION_STATUS: u32 = 16;
    pub const CONDITION_REASON: u32 = 1024;
    pub const CONDITION_MESSAGE: u32 = 32768;
}

/// humantime's units from milliseconds to days: the value bounds validation enforces (1 s to
/// 24 h) need no others.
pub const DURATION_UNITS: &[&str] = &[
    "ms", "msec", "millis", "s", "sec", "secs", "second", "seconds", "m", "min", "mins", "minute", "minutes", "h",
    "hr", "hrs", "hour", "hours", "d", "day", "days",
];

/// What a duration field admits: whole numbers of at most [`bound::DURATION_DIGITS`] digits, each
/// with a unit, optionally space-separated (`90s`, `1h30m`, `15min`, `1h 30m`), all of which
/// humantime parses. Within [`bound::DURATION`] characters the largest value is about 1370 years
/// (`99999d` five times, then `9d`): no number or sum can overflow, nor leave the range of a
/// timestamp.
pub fn duration_pattern() -> String {
    format!(
        "^( ?[0-9]{{1,{}}} ?({}))+$",
        bound::DURATION_DIGITS,
        DURATION_UNITS.join("|")
    )
}

/// The CEL rule of a one-of group: exactly one of `fields` is set. Its message names the fields that
/// are set (names only, never values):
/// `exactly one of sts, impersonation must be set, but these are set: sts impersonation`.
///
/// The message is built by concatenating literals only: the apiserver's cost estimate of list
/// functions such as `filter` and `join` in a message exceeds the CRD's budget many times over.
pub fn one_of(fields: &[&str]) -> kube::core::Rule {
    let has: Vec<String> = fields.iter().map(|f| format!("has(self.{f})")).collect();
    let set_names: Vec<String> = fields
        .iter()
        .map(|f| format!("(has(self.{f}) ? ' {f}' : '')"))
        .collect();
    let all = fields.join(", ");
    kube::core::Rule::new(format!("[{}].filter(x, x).size() == 1", has.join(", "))).message(
        kube::core::Message::Expression(format!(
            "'exactly one of {all} must be set, but ' + \
             (!({}) ? 'none is' : 'these are set:' + {})",
            has.join(" || "),
            set_names.join(" + ")
        )),
    )
}

/// Bounds a string map: its number of entries and the length of its values in the schema, the
/// length of its keys in a CEL rule (structural schemas cannot bound keys otherwise).
struct BoundedMap {
    entries: u32,
    key: u32,
    value: u32,
}

impl Transform for BoundedMap {
    fn transform(&mut self, schema: &mut Schema) {
        schema.insert("maxProperties".into(), self.entries.into());
        if let Some(values) = schema
            .get_mut("additionalProperties")
            .and_then(|v| <&mut Schema>::try_from(v).ok())
        {
            values.insert("maxLength".into(), self.value.into());
        }
        let rule = serde_json::json!([{
            "rule": format!("self.all(k, k.size() <= {})", self.key),
            "message": format!("keys must be at most {} characters", self.key),
        }]);
        schema.insert("x-kubernetes-validations".into(), rule);
    }
}

/// Bounds the fields of `metav1.Condition` as Kubernetes does (its schema from k8s-openapi has none).
fn bounded_conditions(schema: &mut Schema) {
    let Some(properties) = schema
        .get_mut("items")
        .and_then(|items| items.get_mut("properties"))
        .and_then(|p| p.as_object_mut())
    else {
        return;
    };
    for (field, max) in [
        ("type", bound::CONDITION_TYPE),
        ("status", bound::CONDITION_STATUS),
        ("reason", bound::CONDITION_REASON),
        ("message", bound::CONDITION_MESSAGE),
        ("lastTransitionTime", bound::TIME),
    ] {
        if let Some(property) = properties.get_mut(field).and_then(|p| p.as_object_mut()) {
            property.insert("maxLength".into(), max.into());
        }
    }
}

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
    // Times, not `date` columns: a `date` cell is the age of the time, and the apiserver (up to
    // 1.37 at least: apimachinery's HumanDuration) renders every future time as `<invalid>`.
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
    #[schemars(length(max = bound::ROLLOUT_RESTART_TARGETS))]
    pub rollout_restart_targets: Vec<RolloutRestartTarget>,
    /// The least time between two restarts of the targets, e.g. `30m`. Default `10m`. A token
    /// change within it restarts them when it has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::DURATION), regex(pattern = duration_pattern()))]
    pub rollout_restart_min_interval: Option<String>,
}

/// A workload restarted when the token changes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRestartTarget {
    pub kind: WorkloadKind,
    #[schemars(length(max = bound::OBJECT_NAME))]
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
#[x_kube(validation = one_of(&[
    "sts",
    "impersonation",
    "developerConnect",
    "discoveryEngine",
    "idToken",
    "developerConnectRepository",
]))]
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
    /// IAM Credentials generateIdToken (or, for the operator's own identity, the metadata
    /// server): an OpenID Connect ID token for Cloud Run, IAP or Cloud Functions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<IdTokenFlow>,
    /// Developer Connect fetchReadToken / fetchReadWriteToken: a token for one linked Git
    /// repository, with the username to clone with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub developer_connect_repository: Option<DeveloperConnectRepositoryFlow>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdTokenFlow {
    /// Who receives the token: the service's URL (Cloud Run, Cloud Functions) or the OAuth client
    /// id of an IAP-protected resource.
    #[schemars(length(min = 1, max = bound::ID_TOKEN_AUDIENCE))]
    pub audience: String,
    /// Email or unique id of the service account the token is for. Omitted only with
    /// `source.ambient`: then the metadata server issues it for the operator's own identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::SERVICE_ACCOUNT))]
    pub service_account: Option<String>,
    /// Delegation chain, as service account emails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bound::DELEGATES), inner(length(max = bound::SERVICE_ACCOUNT)))]
    pub delegates: Vec<String>,
    /// Add the `email` and `email_verified` claims (IAP requires them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_email: bool,
    /// Workload Identity Federation first, in the same TokenRequest: the source (a Kubernetes
    /// ServiceAccount token, or a JWT in a Secret) is exchanged at STS, and the federated token
    /// calls generateIdToken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<IdTokenFederation>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdTokenFederation {
    /// The workload identity pool provider, as `sts.audience`.
    #[schemars(length(max = bound::STS_AUDIENCE), regex(pattern = r"^//iam\.googleapis\.com/"))]
    pub audience: String,
    /// As `sts.subjectTokenType`. Default: `urn:ietf:params:oauth:token-type:jwt`.
    #[serde(default)]
    pub subject_token_type: SubjectTokenType,
    /// As `sts.userProject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::PROJECT))]
    pub user_project: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeveloperConnectRepositoryFlow {
    /// `projects/P/locations/L/connections/C/gitRepositoryLinks/R`.
    #[schemars(
        length(max = bound::GOOGLE_RESOURCE),
        regex(pattern = r"^projects/[^/]+/locations/[^/]+/connections/[^/]+/gitRepositoryLinks/[^/]+$")
    )]
    pub git_repository_link: String,
    /// `read` (default: fetchReadToken, for clones and fetches) or `readWrite`
    /// (fetchReadWriteToken, for pushes too).
    #[serde(default)]
    pub access: RepositoryAccess,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RepositoryAccess {
    #[default]
    Read,
    ReadWrite,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StsFlow {
    /// The workload (or workforce) identity pool provider, e.g.
    /// `//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/POOL/providers/PROVIDER`.
    #[schemars(length(max = bound::STS_AUDIENCE), regex(pattern = r"^//iam\.googleapis\.com/"))]
    pub audience: String,
    /// OAuth scopes of the issued token. Default: cloud-platform.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bound::SCOPES), inner(length(max = bound::SCOPE)))]
    pub scopes: Vec<String>,
    /// The type of the subject token. Default: `urn:ietf:params:oauth:token-type:jwt`.
    // Not an Option: the schema states the default, and no `null` joins the enum's values.
    #[serde(default)]
    pub subject_token_type: SubjectTokenType,
    /// A Credential Access Boundary that downscopes the issued token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_boundary: Option<AccessBoundary>,
    /// Project used for quota and billing of the exchange (`options.userProject`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::PROJECT))]
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
    #[schemars(length(min = 1, max = bound::SERVICE_ACCOUNT))]
    pub service_account: String,
    /// Delegation chain, as service account emails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bound::DELEGATES), inner(length(max = bound::SERVICE_ACCOUNT)))]
    pub delegates: Vec<String>,
    /// Requested lifetime, e.g. `1h` (default); at most `12h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::DURATION), regex(pattern = duration_pattern()))]
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
    #[schemars(length(min = 1, max = bound::ACCESS_BOUNDARY_RULES))]
    pub access_boundary_rules: Vec<AccessBoundaryRule>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessBoundaryRule {
    /// Full resource name, e.g. `//storage.googleapis.com/projects/_/buckets/BUCKET`.
    #[schemars(length(max = bound::AVAILABLE_RESOURCE))]
    pub available_resource: String,
    /// Role references, each `inRole:ROLE`.
    #[schemars(
        length(min = 1, max = bound::AVAILABLE_PERMISSIONS),
        inner(length(max = bound::AVAILABLE_PERMISSION))
    )]
    pub available_permissions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_condition: Option<AvailabilityCondition>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AvailabilityCondition {
    #[schemars(length(max = bound::CEL_EXPRESSION))]
    pub expression: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::CONDITION_TITLE))]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::CONDITION_DESCRIPTION))]
    pub description: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImpersonationFlow {
    /// Email or unique id of the Google service account to impersonate.
    #[schemars(length(min = 1, max = bound::SERVICE_ACCOUNT))]
    pub service_account: String,
    /// Delegation chain, as service account emails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bound::DELEGATES), inner(length(max = bound::SERVICE_ACCOUNT)))]
    pub delegates: Vec<String>,
    /// OAuth scopes of the issued token; at least one.
    #[schemars(length(min = 1, max = bound::SCOPES), inner(length(max = bound::SCOPE)))]
    pub scopes: Vec<String>,
    /// Requested lifetime, e.g. `1h` (default); at most `12h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::DURATION), regex(pattern = duration_pattern()))]
    pub lifetime: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeveloperConnectFlow {
    /// `projects/P/locations/L/accountConnectors/C`.
    #[schemars(
        length(max = bound::GOOGLE_RESOURCE),
        regex(pattern = r"^projects/[^/]+/locations/[^/]+/accountConnectors/[^/]+$")
    )]
    pub account_connector: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryEngineFlow {
    /// `projects/P/locations/L/collections/C/dataConnector`.
    #[schemars(
        length(max = bound::GOOGLE_RESOURCE),
        regex(pattern = r"^projects/[^/]+/locations/[^/]+/collections/[^/]+/dataConnector$")
    )]
    pub data_connector: String,
    /// Overrides the connector's default scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::SCOPE))]
    pub scope: Option<String>,
    /// The tool or action the token is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::ACTION))]
    pub action: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = one_of(&["serviceAccountToken", "secret", "tokenRequest", "ambient"]))]
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
    #[schemars(length(max = bound::OBJECT_NAME))]
    pub service_account_name: String,
    /// Audience of the ServiceAccount token. Default: the STS audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::TOKEN_AUDIENCE))]
    pub audience: Option<String>,
    /// Lifetime of the ServiceAccount token. Default 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 600, max = 172_799))]
    pub expiration_seconds: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySource {
    #[schemars(length(max = bound::OBJECT_NAME))]
    pub name: String,
    #[schemars(length(max = bound::SECRET_KEY))]
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
#[x_kube(validation = one_of(&["serviceAccountToken", "secret"]))]
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
    #[schemars(length(max = bound::OBJECT_NAME))]
    pub name: String,
    #[schemars(length(max = bound::SECRET_KEY))]
    pub key: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequestSource {
    #[schemars(length(max = bound::OBJECT_NAME))]
    pub name: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretSpec {
    /// Name of the Secret. Default: the TokenRequest's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::OBJECT_NAME))]
    pub name: Option<String>,
    /// `Opaque` (default) or `kubernetes.io/dockerconfigjson`. With `format`, the format decides.
    // Not an Option, for the reason given at `subjectTokenType`.
    #[serde(default, rename = "type")]
    pub type_: SecretType,
    /// dockerconfigjson only: one `auths` entry per registry host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bound::REGISTRIES), inner(length(max = bound::REGISTRY)))]
    pub registries: Vec<String>,
    /// Opaque and `format.template`: the key holding the token. Default `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::SECRET_KEY))]
    pub token_key: Option<String>,
    /// The shape a consumer reads (Git, Tekton, Flux, Argo CD, netrc, npm, or a template); it
    /// fixes the Secret's type and keys. Without it, `type` decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<OutputFormat>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = BoundedMap { entries: bound::METADATA_ENTRIES, key: bound::METADATA_KEY, value: bound::LABEL_VALUE })]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = BoundedMap { entries: bound::METADATA_ENTRIES, key: bound::METADATA_KEY, value: bound::ANNOTATION_VALUE })]
    pub annotations: BTreeMap<String, String>,
    /// dockerconfigjson only: ServiceAccounts of this namespace whose `imagePullSecrets` list this
    /// Secret, so that every Pod running as them pulls with it. The operator adds its own entry
    /// and removes it when the list changes or the TokenRequest is deleted; other entries stay.
    /// The operator's administrator must allow it (Helm value `serviceAccountAttachment.enabled`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bound::ATTACHED_SERVICE_ACCOUNTS), inner(length(max = bound::OBJECT_NAME)))]
    pub attach_to_service_accounts: Vec<String>,
}

/// A consumer's Secret format. Exactly one member must be set. Each takes a `username` where its
/// consumer needs one; it defaults from the flow (the `gitUsername` Developer Connect returns,
/// `oauth2accesstoken` for Google access tokens).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = one_of(&["basicAuth", "flux", "argoCD", "gitCredentials", "netrc", "npmrc", "template"]))]
pub struct OutputFormat {
    /// `kubernetes.io/basic-auth` (`username`, `password`), optionally annotated for Tekton.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuthFormat>,
    /// A Flux `GitRepository` `secretRef`: `username`/`password`, or `bearerToken`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flux: Option<FluxFormat>,
    /// An Argo CD repository or repository credential template Secret (the TokenRequest must be
    /// in Argo CD's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "argoCD")]
    pub argo_cd: Option<ArgoCdFormat>,
    /// A git credential-store file under the key `.git-credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_credentials: Option<GitCredentialsFormat>,
    /// A `.netrc` file under the key `.netrc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netrc: Option<NetrcFormat>,
    /// An `.npmrc` file for Artifact Registry npm repositories under the key `.npmrc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub npmrc: Option<NpmrcFormat>,
    /// Keys and annotations rendered from templates (minijinja), for any other consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateFormat>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuthFormat {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::USERNAME))]
    pub username: Option<String>,
    /// Tekton annotations (`tekton.dev/git-N`, `tekton.dev/docker-N`) for these hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tekton: Option<TektonHosts>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TektonHosts {
    /// Git hosts, as URLs (`https://github.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bound::CREDENTIAL_HOSTS), inner(length(max = bound::URL)))]
    pub git: Vec<String>,
    /// Registries, as URLs (`https://us-docker.pkg.dev`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bound::CREDENTIAL_HOSTS), inner(length(max = bound::URL)))]
    pub docker: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FluxFormat {
    /// `basic` (default: `username` and `password`) or `bearer` (`bearerToken`).
    #[serde(default)]
    pub auth: FluxAuth,
    /// `basic` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::USERNAME))]
    pub username: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FluxAuth {
    #[default]
    Basic,
    Bearer,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArgoCdFormat {
    /// `repository` (default: one repository, `url` its URL) or `repoCreds` (a credential
    /// template for every repository under the URL prefix `url`).
    #[serde(default)]
    pub secret_type: ArgoCdSecretType,
    #[schemars(length(min = 1, max = bound::URL))]
    pub url: String,
    /// `git` (default) or `helm`.
    #[serde(default, rename = "type")]
    pub repository_type: ArgoCdRepositoryType,
    /// Helm charts in an OCI registry (`enableOCI: "true"`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not", rename = "enableOCI")]
    pub enable_oci: bool,
    /// The Argo CD project the repository is scoped to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::ARGO_NAME))]
    pub project: Option<String>,
    /// The repository's display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::ARGO_NAME))]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::USERNAME))]
    pub username: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ArgoCdSecretType {
    #[default]
    Repository,
    RepoCreds,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ArgoCdRepositoryType {
    #[default]
    Git,
    Helm,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitCredentialsFormat {
    /// `https://HOST[:PORT][/PATH]` (or `http://`) for each line; git uses the first that
    /// matches the URL it fetches.
    #[schemars(length(min = 1, max = bound::CREDENTIAL_HOSTS), inner(length(max = bound::URL)))]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::USERNAME))]
    pub username: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetrcFormat {
    /// Host names, one `machine` line each (netrc matches host names, not ports or paths).
    #[schemars(length(min = 1, max = bound::CREDENTIAL_HOSTS), inner(length(max = bound::REGISTRY)))]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::USERNAME))]
    pub username: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NpmrcFormat {
    #[schemars(length(min = 1, max = bound::CREDENTIAL_HOSTS))]
    pub registries: Vec<NpmRegistry>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NpmRegistry {
    /// The repository's URL, `https://LOCATION-npm.pkg.dev/PROJECT/REPOSITORY/`.
    #[schemars(length(min = 1, max = bound::URL))]
    pub url: String,
    /// Packages of this scope (`@team`) come from the repository; without it, every package
    /// does (`registry=`), which at most one registry may claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::NPM_SCOPE))]
    pub scope: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateFormat {
    /// Secret key to template. Templates see `token`, `expires_at`, `username`, `scopes` and
    /// `fingerprint`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = BoundedMap { entries: bound::TEMPLATE_ENTRIES, key: bound::SECRET_KEY, value: bound::TEMPLATE })]
    pub data: BTreeMap<String, String>,
    /// Annotation key to template. These templates do not see `token`: annotations are shown by
    /// `kubectl describe` and copied by tools that treat metadata as not secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = BoundedMap { entries: bound::ANNOTATION_TEMPLATE_ENTRIES, key: bound::METADATA_KEY, value: bound::ANNOTATION_TEMPLATE })]
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
    #[schemars(length(max = bound::DURATION), regex(pattern = duration_pattern()))]
    pub renew_before: Option<String>,
    /// Lifetime assumed when the API returns no expiry. Default `15m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::DURATION), regex(pattern = duration_pattern()))]
    pub lifetime_when_unknown: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequestStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bound::CONDITIONS), transform = bounded_conditions)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The flow in use (`sts`, `impersonation`, `developerConnect`, `discoveryEngine`, `idToken`,
    /// `developerConnectRepository`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::FLOW))]
    pub flow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::OBJECT_NAME))]
    pub secret_name: Option<String>,
    /// Expiry of the token in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::TIME))]
    pub expiration_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::TIME))]
    pub last_refresh_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::TIME))]
    pub next_refresh_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bound::STATUS_SCOPES), inner(length(max = bound::STATUS_SCOPE)))]
    pub scopes: Vec<String>,
    /// The username that goes with the token, as the flow returned it (Developer Connect's
    /// `gitUsername`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::USERNAME))]
    pub username: Option<String>,
    /// First 12 hex characters of the SHA-256 of the token: tells tokens apart without revealing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::FINGERPRINT))]
    pub token_fingerprint: Option<String>,
    /// Failed attempts since the last success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::TIME))]
    pub last_failure_time: Option<Time>,
    /// Fingerprint of the token the rollout restart targets were last restarted for (or that was
    /// current when they were first named).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::FINGERPRINT))]
    pub rollout_restart_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::TIME))]
    pub last_rollout_restart_time: Option<Time>,
    /// The last value of the `gcptoken.dev/refresh-requested-at` annotation the operator handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bound::ANNOTATION_VALUE))]
    pub last_handled_refresh_request: Option<String>,
    /// The ServiceAccounts whose `imagePullSecrets` hold an entry the operator put there (or
    /// found there), removed again when no longer wanted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bound::RECORDED_ATTACHMENTS))]
    pub attached_service_accounts: Vec<ServiceAccountAttachment>,
}

/// An `imagePullSecrets` entry naming `secret` in the ServiceAccount `serviceAccount`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountAttachment {
    #[schemars(length(max = bound::OBJECT_NAME))]
    pub service_account: String,
    #[schemars(length(max = bound::OBJECT_NAME))]
    pub secret: String,
}

/// Held by a TokenRequest while ServiceAccounts list its Secret: deleting it first removes
/// those entries, which its Secret's ownerReference alone would leave dangling.
pub const ATTACHMENT_FINALIZER: &str = "gcptoken.dev/service-account-attachments";

/// Set to any new value to have the token refreshed at once (as Flux's
/// `reconcile.fluxcd.io/requestedAt`); the value handled is kept in
/// `status.lastHandledRefreshRequest`, so applying the same value again does nothing.
pub const REFRESH_REQUESTED_ANNOTATION: &str = "gcptoken.dev/refresh-requested-at";

impl TokenRequest {
    /// The refresh request not yet handled, if any: the annotation's value when it differs from
    /// the one the status records.
    pub fn pending_refresh_request(&self) -> Option<&str> {
        let requested = self.metadata.annotations.as_ref()?.get(REFRESH_REQUESTED_ANNOTATION)?;
        let handled = self
            .status
            .as_ref()
            .and_then(|s| s.last_handled_refresh_request.as_deref());
        (handled != Some(requested.as_str())).then_some(requested.as_str())
    }

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    use super::*;

    /// Milliseconds in one of humantime's units, written out independently of `DURATION_UNITS`.
    fn millis_of(unit: &str) -> u64 {
        match unit {
            "ms" | "msec" | "millis" => 1,
            "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
            "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3_600_000,
            "d" | "day" | "days" => 86_400_000,
            other => panic!("{other:?} is not a unit this test knows"),
        }
    }

    /// A random string of the pattern's grammar, at most `bound::DURATION` long, and its value.
    fn random_duration(rng: &mut fastrand::Rng) -> (String, u64) {
        let (mut text, mut millis) = (String::new(), 0);
        loop {
            let space = |rng: &mut fastrand::Rng| if rng.bool() { " " } else { "" };
            let digits = rng.u32(1..=bound::DURATION_DIGITS);
            let number = rng.u64(..10u64.pow(digits));
            let unit = DURATION_UNITS[rng.usize(..DURATION_UNITS.len())];
            let part = format!(
                "{}{number:0>width$}{}{unit}",
                space(rng),
                space(rng),
                width = digits as usize
            );
            if text.len() + part.len() > bound::DURATION as usize {
                return (text, millis);
            }
            text.push_str(&part);
            millis += number * millis_of(unit);
        }
    }

    #[test]
    fn every_duration_the_pattern_admits_parses_to_its_value() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let (text, millis) = random_duration(&mut rng);
            if text.is_empty() {
                continue;
            }
            assert_eq!(
                humantime::parse_duration(&text),
                Ok(Duration::from_millis(millis)),
                "{text:?}"
            );
        }
        for example in ["90s", "10m", "1h", "1h30m", "15min", "1h 30m"] {
            assert!(humantime::parse_duration(example).is_ok(), "{example}");
        }
    }

    #[test]
    fn a_refresh_request_is_pending_until_its_value_is_handled() {
        let spec: TokenRequestSpec = serde_json::from_value(serde_json::json!({
            "flow": {"developerConnect": {"accountConnector": "projects/p/locations/l/accountConnectors/c"}},
            "source": {"ambient": {}},
        }))
        .unwrap();
        let mut tr = TokenRequest::new("tr", spec);
        assert_eq!(tr.pending_refresh_request(), None);
        tr.metadata.annotations = Some(BTreeMap::from([(REFRESH_REQUESTED_ANNOTATION.into(), "1".into())]));
        assert_eq!(tr.pending_refresh_request(), Some("1"));
        tr.status = Some(TokenRequestStatus {
            last_handled_refresh_request: Some("1".into()),
            ..Default::default()
        });
        assert_eq!(tr.pending_refresh_request(), None);
        tr.metadata.annotations = Some(BTreeMap::from([(REFRESH_REQUESTED_ANNOTATION.into(), "2".into())]));
        assert_eq!(tr.pending_refresh_request(), Some("2"));
    }

    #[test]
    fn the_largest_duration_fits_a_timestamp() {
        // Five numbers of the most digits in the largest unit, and a last one in what is left.
        let largest = format!("{}9d", "99999d".repeat(5));
        assert_eq!(largest.len(), bound::DURATION as usize);
        let value = humantime::parse_duration(&largest).unwrap();
        assert_eq!(value, Duration::from_secs((5 * 99_999 + 9) * 86_400));
        let signed = SignedDuration::try_from(value).unwrap();
        assert!(Timestamp::now().checked_add(signed).is_ok(), "{largest}");
    }
}
