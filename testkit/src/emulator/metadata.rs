//! The metadata server's credentials of its own identity:
//! `GET /computeMetadata/v1/instance/service-accounts/{default|EMAIL}/token[?scopes=a,b]` and
//! `.../identity?audience=AUD[&format=standard|full][&licenses=TRUE|FALSE]`; and the values
//! Google's client libraries read beside them ([`Value`]).

use std::time::SystemTime;

use axum::Json;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, json};

use super::call::Call;
use super::errors::ApiError;
use super::wire;

/// The scope of a GCE/GKE default service account.
const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

pub(super) fn token(call: &Call, account: &str) -> Result<Response, ApiError> {
    let email = identity(call, account)?;
    let query = wire::form(call.query.as_bytes());
    let scopes = match query.get("scopes").filter(|s| !s.is_empty()) {
        Some(list) => list.split(',').map(str::to_owned).collect(),
        None => vec![DEFAULT_SCOPE.to_owned()],
    };
    let lifetime = call.lifetime();
    let token = call.mint(format!("serviceAccount:{email}"), scopes, SystemTime::now() + lifetime);
    Ok(Json(json!({
        "access_token": token,
        "expires_in": lifetime.as_secs(),
        "token_type": "Bearer",
    }))
    .into_response())
}

/// The body is the bare JWT, served as HTML like the real server does. `format=full` adds the
/// email claims; `licenses` only adds to the `google.compute_engine` claim, which the emulator
/// leaves out, so it is accepted and has no effect.
pub(super) fn identity_token(call: &Call, account: &str) -> Result<Response, ApiError> {
    let email = identity(call, account)?;
    let query = wire::form(call.query.as_bytes());
    let audience = query
        .get("audience")
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::plain(StatusCode::BAD_REQUEST, "non-empty audience parameter required"))?;
    let include_email = match query.get("format").map(String::as_str) {
        None | Some("standard") => false,
        Some("full") => true,
        Some(other) => {
            return Err(ApiError::plain(
                StatusCode::BAD_REQUEST,
                format!("invalid format {other:?}: must be \"standard\" or \"full\""),
            ));
        }
    };
    let token = call.mint_id_token(&email, audience, include_email)?;
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], token).into_response())
}

/// The metadata server's account, if the request is a metadata request for it.
fn identity(call: &Call, account: &str) -> Result<String, ApiError> {
    require_flavor(call)?;
    let email = call.shared.state().metadata_account.clone();
    email
        .filter(|email| account == "default" || account == email)
        .ok_or_else(|| ApiError::plain(StatusCode::NOT_FOUND, format!("Service account {account} not found.")))
}

/// Refuses a request that does not say it is a metadata request.
fn require_flavor(call: &Call) -> Result<(), ApiError> {
    // The header guards against SSRF: a request relayed by some other server will not carry it.
    if call.header(HeaderName::from_static("metadata-flavor")) != Some("Google") {
        return Err(ApiError::plain(
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header.",
        ));
    }
    Ok(())
}

/// Metadata values other than credentials, as Google's client libraries read them (Go's
/// `cloud.google.com/go/compute/metadata`, `golang.org/x/oauth2/google`, Python's
/// `google.auth.compute_engine`), under `/computeMetadata/v1/` unless said otherwise.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Value {
    /// `GET /`: what detection probes (Go's `OnGCE` without `GCE_METADATA_HOST`, Python's
    /// `ping`) check for the `Metadata-Flavor: Google` answer header.
    Root,
    /// `instance/service-accounts/{account}/email`.
    Email { account: String },
    /// `instance/service-accounts/{account}/scopes`, one per line.
    Scopes { account: String },
    /// `instance/service-accounts/{account}/`: its entries, or with `?recursive=true` the JSON
    /// object of aliases, email and scopes (Python's `get_service_account_info`).
    Account { account: String },
    /// `instance/service-accounts/`: the accounts, or with `?recursive=true` each one's object.
    Accounts,
    /// `project/project-id` (Go's `metadata.ProjectID`, read by `FindDefaultCredentials`).
    ProjectId,
    /// `project/numeric-project-id`.
    NumericProjectId,
    /// `universe/universe-domain`: `googleapis.com` outside sovereign clouds.
    UniverseDomain,
}

impl Value {
    pub(super) fn parse(path: &str) -> Option<Value> {
        if path == "/" {
            return Some(Value::Root);
        }
        let key = path.strip_prefix("/computeMetadata/v1/")?;
        let value = match key {
            "project/project-id" => Value::ProjectId,
            "project/numeric-project-id" => Value::NumericProjectId,
            "universe/universe-domain" => Value::UniverseDomain,
            "instance/service-accounts/" => Value::Accounts,
            _ => {
                let (account, entry) = key.strip_prefix("instance/service-accounts/")?.split_once('/')?;
                if account.is_empty() {
                    return None;
                }
                let account = account.to_owned();
                match entry {
                    "" => Value::Account { account },
                    "email" => Value::Email { account },
                    "scopes" => Value::Scopes { account },
                    _ => return None,
                }
            }
        };
        Some(value)
    }
}

/// The value's body, as the real server sends it: text as `application/text`, recursive
/// directories as JSON.
pub(super) fn value(call: &Call, value: &Value) -> Result<Response, ApiError> {
    // The real server answers its root without the header too: probes only look at the answer's.
    if *value != Value::Root {
        require_flavor(call)?;
    }
    let recursive = wire::form(call.query.as_bytes())
        .get("recursive")
        .is_some_and(|r| r.eq_ignore_ascii_case("true"));
    let response = match value {
        Value::Root => text("computeMetadata/\n".to_owned()),
        Value::Email { account } => text(identity(call, account)?),
        Value::Scopes { account } => {
            identity(call, account)?;
            text(format!("{DEFAULT_SCOPE}\n"))
        }
        Value::Account { account } if recursive => Json(account_info(&identity(call, account)?)).into_response(),
        Value::Account { account } => {
            identity(call, account)?;
            text("aliases\nemail\nidentity\nscopes\ntoken\n".to_owned())
        }
        Value::Accounts => {
            // An instance without a service account lists none.
            let email = call.shared.state().metadata_account.clone();
            if recursive {
                let entries = email
                    .iter()
                    .flat_map(|email| [("default", email), (email.as_str(), email)]);
                let accounts: Map<_, _> = entries
                    .map(|(name, email)| (name.to_owned(), account_info(email)))
                    .collect();
                Json(accounts).into_response()
            } else {
                text(email.map_or_else(String::new, |email| format!("default/\n{email}/\n")))
            }
        }
        Value::ProjectId | Value::NumericProjectId => {
            let project = call.shared.state().metadata_project.clone();
            let (id, number) = project.ok_or_else(|| {
                ApiError::plain(StatusCode::NOT_FOUND, "The requested URL was not found on this server.")
            })?;
            text(if *value == Value::ProjectId {
                id
            } else {
                number.to_string()
            })
        }
        Value::UniverseDomain => text("googleapis.com".to_owned()),
    };
    Ok(response)
}

fn account_info(email: &str) -> serde_json::Value {
    json!({ "aliases": ["default"], "email": email, "scopes": [DEFAULT_SCOPE] })
}

fn text(body: String) -> Response {
    let content_type = HeaderValue::from_static("application/text");
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}
