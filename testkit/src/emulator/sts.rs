//! Security Token Service, `POST /v1/token` (RFC 8693 token exchange, Google flavour).

use std::collections::HashMap;
use std::time::SystemTime;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::call::Call;
use super::errors::ApiError;
use super::wire;

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
const INTERMEDIARY_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_boundary_intermediary_token";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
/// Valid subject token types the emulator cannot check, so it refuses them.
const UNVERIFIABLE: [&str; 3] = [
    "urn:ietf:params:oauth:token-type:saml2",
    "urn:ietf:params:aws:token-type:aws4_request",
    "urn:ietf:params:oauth:token-type:mtls",
];
const IAM_PREFIX: &str = "//iam.googleapis.com/";
const FORMATS_HINT: &str =
    "See https://cloud.google.com/iam/docs/reference/sts/rest/v1/TopLevel/token for the list of possible formats.";

pub(super) fn exchange(call: &Call) -> Result<Response, ApiError> {
    if call.headers.contains_key(header::AUTHORIZATION) {
        return Err(ApiError::invalid_request(
            "The Authorization header must not be set when calling the token exchange endpoint.",
        ));
    }
    let params = Params::parse(call)?;
    let grant_type = params.require("grant_type")?;
    if grant_type != TOKEN_EXCHANGE {
        return Err(ApiError::oauth(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            format!("Invalid value for \"grant_type\": {grant_type}"),
        ));
    }
    let requested_type = params.require("requested_token_type")?;
    if ![ACCESS_TOKEN, INTERMEDIARY_TOKEN].contains(&requested_type.as_str()) {
        return Err(invalid_value("requested_token_type"));
    }
    let subject_type = params.require("subject_token_type")?;
    let subject_token = params.require("subject_token")?;
    if let Some(options) = params.get("options")? {
        check_options(&options)?;
    }

    let grant = if subject_type == ACCESS_TOKEN {
        downscope(call, &subject_token, params.get("scope")?)?
    } else if [JWT, ID_TOKEN].contains(&subject_type.as_str()) {
        federate(call, &params, &subject_token)?
    } else if UNVERIFIABLE.contains(&subject_type.as_str()) {
        return Err(ApiError::invalid_request(format!(
            "The emulator cannot verify subject tokens of type {subject_type}."
        )));
    } else {
        return Err(invalid_value("subject_token_type"));
    };

    let token = call.mint(grant.principal, grant.scopes, grant.expires_at);
    let mut body = json!({
        "access_token": token,
        "issued_token_type": requested_type,
        "token_type": "Bearer",
    });
    if let Some(expires_in) = grant.expires_in {
        body["expires_in"] = json!(expires_in);
    }
    if requested_type == INTERMEDIARY_TOKEN {
        let key: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..)).take(32).collect();
        body["access_boundary_session_key"] = json!(base64::engine::general_purpose::STANDARD.encode(key));
    }
    Ok(Json(body).into_response())
}

struct Grant {
    principal: String,
    scopes: Vec<String>,
    expires_at: SystemTime,
    /// `None` when the token lives exactly as long as the subject token: Google then leaves
    /// `expires_in` out.
    expires_in: Option<u64>,
}

/// A Google access token exchanged for one with a Credential Access Boundary: same principal,
/// same expiry.
fn downscope(call: &Call, subject_token: &str, scope: Option<String>) -> Result<Grant, ApiError> {
    let subject = call.shared.state().live_token(subject_token).cloned();
    let subject = subject.ok_or_else(|| ApiError::invalid_grant("The access token is invalid or has expired."))?;
    Ok(Grant {
        principal: subject.principal,
        scopes: scope.map_or(subject.scopes, |s| wire::scope_list(&s)),
        expires_at: subject.expires_at,
        expires_in: None,
    })
}

/// An OIDC token from a workload identity pool provider exchanged for a federated token.
fn federate(call: &Call, params: &Params, subject_token: &str) -> Result<Grant, ApiError> {
    let audience = params.require("audience")?;
    let Some(pool) = pool_of_provider(&audience) else {
        return Err(ApiError::invalid_request(format!(
            "Invalid value for \"audience\". This value should be the full resource name of the Identity Provider. {FORMATS_HINT}"
        )));
    };
    if !call.shared.state().providers.contains(&audience) {
        return Err(ApiError::oauth(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            "The target service indicated by the \"audience\" parameters is invalid. This might either be because \
             the pool or provider is disabled or deleted or because it doesn't exist.",
        ));
    }
    let scope = params.require("scope")?;
    let subject = verify_oidc_token(subject_token, &audience)?;
    let lifetime = call.lifetime();
    Ok(Grant {
        principal: format!("principal://iam.googleapis.com/{pool}/subject/{subject}"),
        scopes: wire::scope_list(&scope),
        expires_at: SystemTime::now() + lifetime,
        expires_in: Some(lifetime.as_secs()),
    })
}

/// The pool part of a provider's full resource name
/// (`projects/N/locations/global/workloadIdentityPools/P`), if `audience` is one: a workload
/// identity pool provider (project *number*) or a workforce pool provider.
fn pool_of_provider(audience: &str) -> Option<&str> {
    let path = audience.strip_prefix(IAM_PREFIX)?;
    let (pool, _provider) = path.rsplit_once("/providers/")?;
    let segments: Vec<&str> = path.split('/').collect();
    let named = segments.iter().all(|s| !s.is_empty());
    let is_number = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let well_formed = match segments.as_slice() {
        [
            "projects",
            n,
            "locations",
            _,
            "workloadIdentityPools",
            _,
            "providers",
            _,
        ] => is_number(n),
        ["locations", _, "workforcePools", _, "providers", _] => true,
        _ => false,
    };
    (named && well_formed).then_some(pool)
}

/// Checks the claims of an OIDC subject token (the emulator trusts its signature) and returns
/// its subject. The token's `aud` must name the provider, with or without the `https:` prefix.
fn verify_oidc_token(token: &str, audience: &str) -> Result<String, ApiError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    #[derive(Deserialize)]
    struct Claims {
        aud: Option<Aud>,
        exp: Option<u64>,
        sub: Option<String>,
    }
    let claims: Claims = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|_| ApiError::invalid_grant("Unable to parse the ID Token."))?;

    let https_audience = format!("https:{audience}");
    let auds = match claims.aud {
        Some(Aud::One(aud)) => vec![aud],
        Some(Aud::Many(auds)) => auds,
        None => Vec::new(),
    };
    if !auds.iter().any(|aud| *aud == audience || *aud == https_audience) {
        return Err(ApiError::invalid_grant(format!(
            "The audience in ID Token [{}] does not match the expected audience {https_audience}.",
            auds.join(", ")
        )));
    }
    if claims.exp.is_none_or(|exp| exp <= wire::unix_secs(SystemTime::now())) {
        return Err(ApiError::invalid_grant("The ID Token has expired."));
    }
    claims
        .sub
        .filter(|sub| !sub.is_empty())
        .ok_or_else(|| ApiError::invalid_grant("The ID Token has no \"sub\" claim."))
}

/// The `options` parameter: a JSON object serialized into a string.
fn check_options(options: &str) -> Result<(), ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Options {
        access_boundary: Option<AccessBoundary>,
        user_project: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct AccessBoundary {
        access_boundary_rules: Vec<Rule>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Rule {
        available_resource: String,
        available_permissions: Vec<String>,
        availability_condition: Option<Condition>,
    }
    #[derive(Deserialize)]
    struct Condition {
        expression: String,
    }

    let invalid = |problem: String| ApiError::invalid_request(format!("Invalid value for \"options\": {problem}"));
    let options: Options = serde_json::from_str(options).map_err(|e| invalid(e.to_string()))?;
    if options.user_project.is_some_and(|p| p.is_empty() || p.len() > 32) {
        return Err(invalid(
            "\"userProject\" must be a project ID or number of at most 32 characters.".into(),
        ));
    }
    let Some(boundary) = options.access_boundary else {
        return Ok(());
    };
    let rules = boundary.access_boundary_rules;
    if rules.is_empty() || rules.len() > 10 {
        return Err(invalid("an access boundary must have between 1 and 10 rules.".into()));
    }
    for rule in rules {
        if rule.available_resource.is_empty() {
            return Err(invalid("\"availableResource\" must not be empty.".into()));
        }
        if rule.available_permissions.is_empty() || !rule.available_permissions.iter().all(|p| p.starts_with("inRole:"))
        {
            return Err(invalid(
                "\"availablePermissions\" must list roles, each as \"inRole:ROLE\".".into(),
            ));
        }
        if rule
            .availability_condition
            .is_some_and(|c| c.expression.is_empty() || c.expression.len() > 2048)
        {
            return Err(invalid(
                "\"availabilityCondition.expression\" must have 1 to 2048 characters.".into(),
            ));
        }
    }
    Ok(())
}

fn invalid_value(field: &str) -> ApiError {
    ApiError::invalid_request(format!("Invalid value for \"{field}\". {FORMATS_HINT}"))
}

/// The request fields, from either encoding Google accepts: form with snake_case names (what
/// Google's auth libraries send) or JSON with lowerCamelCase names (the REST reference).
enum Params {
    Form(HashMap<String, String>),
    Json(Map<String, Value>),
}

impl Params {
    fn parse(call: &Call) -> Result<Self, ApiError> {
        let is_json = call
            .header(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.starts_with("application/json"));
        if !is_json {
            return Ok(Params::Form(wire::form(call.body)));
        }
        match serde_json::from_slice(call.body) {
            Ok(Value::Object(object)) => Ok(Params::Json(object)),
            _ => Err(ApiError::invalid_request("Invalid JSON payload received.")),
        }
    }

    /// A field by its snake_case name; empty counts as absent, as in proto3. JSON may use either
    /// spelling, since proto3 JSON parsers accept both.
    fn get(&self, name: &str) -> Result<Option<String>, ApiError> {
        let value = match self {
            Params::Form(fields) => fields.get(name).cloned(),
            Params::Json(object) => match object.get(&camel_case(name)).or_else(|| object.get(name)) {
                None | Some(Value::Null) => None,
                Some(Value::String(value)) => Some(value.clone()),
                Some(_) => {
                    return Err(ApiError::invalid_request(format!(
                        "Invalid value for \"{name}\": expected a string."
                    )));
                }
            },
        };
        Ok(value.filter(|v| !v.is_empty()))
    }

    fn require(&self, name: &str) -> Result<String, ApiError> {
        self.get(name)?
            .ok_or_else(|| ApiError::invalid_request(format!("Missing required parameter: \"{name}\".")))
    }
}

fn camel_case(snake: &str) -> String {
    let mut parts = snake.split('_');
    let first = parts.next().unwrap_or_default().to_owned();
    parts.fold(first, |mut camel, part| {
        let mut chars = part.chars();
        camel.extend(chars.next().map(|c| c.to_ascii_uppercase()));
        camel.push_str(chars.as_str());
        camel
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_provider_names() {
        let wif = "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/prov";
        assert_eq!(
            pool_of_provider(wif),
            Some("projects/123/locations/global/workloadIdentityPools/pool")
        );
        let wfp = "//iam.googleapis.com/locations/global/workforcePools/pool/providers/prov";
        assert_eq!(pool_of_provider(wfp), Some("locations/global/workforcePools/pool"));
        for bad in [
            "https://iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/prov",
            "//iam.googleapis.com/projects/my-project/locations/global/workloadIdentityPools/pool/providers/prov",
            "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool",
            "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools//providers/prov",
        ] {
            assert_eq!(pool_of_provider(bad), None, "{bad}");
        }
    }

    #[test]
    fn converts_field_names_to_camel_case() {
        assert_eq!(camel_case("subject_token_type"), "subjectTokenType");
        assert_eq!(camel_case("audience"), "audience");
    }

    #[test]
    fn checks_access_boundaries() {
        let rule = |perm: &str| {
            json!({"accessBoundary": {"accessBoundaryRules": [{
                "availableResource": "//storage.googleapis.com/projects/_/buckets/b",
                "availablePermissions": [perm],
            }]}})
            .to_string()
        };
        assert!(check_options(&rule("inRole:roles/storage.objectViewer")).is_ok());
        assert!(check_options(&rule("storage.objects.get")).is_err());
        assert!(check_options(r#"{"userProject":"p"}"#).is_ok());
        assert!(check_options(r#"{"bogus":1}"#).is_err());
        assert!(check_options("not json").is_err());
    }
}
