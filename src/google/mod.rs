//! Calls to Google's token APIs, with the wire formats Google documents (see
//! shared reference `google-token-apis.md`).

mod error;

use std::{sync::Arc, time::Duration};

pub use error::{Api, GoogleError};
use k8s_openapi::jiff::Timestamp;
use reqwest::{RequestBuilder, StatusCode, header::HeaderMap};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::{
    metrics::Metrics,
    ratelimit::{EndpointLimits, GoogleLimits},
    validation::{Flow, ImpersonationParams, StsParams},
};

const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const GENERATE_ACCESS_TOKEN_PREFIX: &str = "/v1/projects/-/serviceAccounts/";
const GENERATE_ACCESS_TOKEN_SUFFIX: &str = ":generateAccessToken";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Base URLs of Google's APIs (scheme, host, optional port); the documented paths are appended.
/// Operator-level settings only: a tenant must never choose where credentials are sent.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub sts: Url,
    pub iam_credentials: Url,
    pub developer_connect: Url,
    /// `None`: Google's, with the `us`/`eu` multi-region hosts picked from the resource's location.
    pub discovery_engine: Option<Url>,
    pub oauth2: Url,
    pub metadata: Url,
}

impl Default for Endpoints {
    fn default() -> Self {
        let url = |s: &str| Url::parse(s).expect("valid default endpoint");
        Self {
            sts: url("https://sts.googleapis.com"),
            iam_credentials: url("https://iamcredentials.googleapis.com"),
            developer_connect: url("https://developerconnect.googleapis.com"),
            discovery_engine: None,
            oauth2: url("https://oauth2.googleapis.com"),
            metadata: url("http://metadata.google.internal"),
        }
    }
}

impl Endpoints {
    /// Every endpoint at one base URL: the Google emulator serves all paths on one port.
    pub fn all_at(base: &Url) -> Self {
        Self {
            sts: base.clone(),
            iam_credentials: base.clone(),
            developer_connect: base.clone(),
            discovery_engine: Some(base.clone()),
            oauth2: base.clone(),
            metadata: base.clone(),
        }
    }

    /// Where STS exchanges go; `external_account` files must name exactly this.
    pub fn sts_token_url(&self) -> String {
        join(&self.sts, "/v1/token")
    }

    /// Where JWT-bearer and refresh-token grants go, and the audience of service account JWTs.
    pub fn oauth_token_url(&self) -> String {
        join(&self.oauth2, "/token")
    }

    pub fn generate_access_token_url(&self, service_account: &str) -> String {
        join(
            &self.iam_credentials,
            &format!("{GENERATE_ACCESS_TOKEN_PREFIX}{service_account}{GENERATE_ACCESS_TOKEN_SUFFIX}"),
        )
    }

    /// The service account a generateAccessToken URL names, if the URL is one of this endpoint's.
    pub fn impersonated_service_account<'u>(&self, url: &'u str) -> Option<&'u str> {
        let prefix = join(&self.iam_credentials, GENERATE_ACCESS_TOKEN_PREFIX);
        let account = url.strip_prefix(&prefix)?.strip_suffix(GENERATE_ACCESS_TOKEN_SUFFIX)?;
        (!account.is_empty() && !account.contains('/')).then_some(account)
    }

    fn discovery_engine_for(&self, data_connector: &str) -> Url {
        if let Some(url) = &self.discovery_engine {
            return url.clone();
        }
        // Data connectors in the us and eu multi-regions are only served by the regional hosts.
        let location = data_connector.split('/').nth(3).unwrap_or("global");
        let host = match location {
            "us" | "eu" => format!("https://{location}-discoveryengine.googleapis.com"),
            _ => "https://discoveryengine.googleapis.com".to_string(),
        };
        Url::parse(&host).expect("valid host")
    }
}

/// A token Google issued.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub token: SecretString,
    /// `None` when the API did not say (STS with an access-token subject, Discovery Engine, and
    /// Developer Connect for some providers).
    pub expires_at: Option<Timestamp>,
    pub scopes: Vec<String>,
}

#[derive(Clone)]
pub struct GoogleClient {
    http: reqwest::Client,
    endpoints: Endpoints,
    limits: Arc<EndpointLimits>,
    metrics: Arc<Metrics>,
}

impl GoogleClient {
    pub fn new(endpoints: Endpoints, limits: &GoogleLimits, metrics: Arc<Metrics>) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("gcp-token-operator/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            endpoints,
            limits: Arc::new(EndpointLimits::new(limits)),
            metrics,
        })
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The call `flow` makes with the caller credential.
    pub async fn mint(&self, flow: &Flow, caller: &SecretString) -> Result<IssuedToken, GoogleError> {
        match flow {
            Flow::Sts(p) => self.federate(p, caller).await,
            Flow::Impersonation(p) => self.generate_access_token(caller, p).await,
            Flow::DeveloperConnect { account_connector } => self.fetch_access_token(caller, account_connector).await,
            Flow::DiscoveryEngine {
                data_connector,
                scope,
                action,
            } => {
                self.acquire_access_token(caller, data_connector, scope.as_deref(), action.as_deref())
                    .await
            }
        }
    }

    /// STS exchange, followed by generateAccessToken with the federated token when `p` says so
    /// (Workload Identity Federation with service account impersonation).
    pub async fn federate(&self, p: &StsParams, subject_token: &SecretString) -> Result<IssuedToken, GoogleError> {
        let federated = self.sts_exchange(p, subject_token).await?;
        match &p.impersonation {
            None => Ok(federated),
            Some(impersonation) => self.generate_access_token(&federated.token, impersonation).await,
        }
    }

    /// STS token exchange, form-encoded as Google's auth libraries send it. No Authorization header.
    pub async fn sts_exchange(&self, p: &StsParams, subject_token: &SecretString) -> Result<IssuedToken, GoogleError> {
        let scope = p.scopes.join(" ");
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("audience", p.audience.as_str()),
            ("scope", scope.as_str()),
            ("requested_token_type", ACCESS_TOKEN_TYPE),
            ("subject_token", subject_token.expose_secret()),
            ("subject_token_type", p.subject_token_type.urn()),
        ];
        if let Some(options) = &p.options {
            form.push(("options", options.as_str()));
        }
        let request = self.http.post(self.endpoints.sts_token_url()).form(&form);
        let body: TokenResponse = self.call(Api::Sts, request).await?;
        body.issued(Api::Sts, &p.scopes)
    }

    /// OAuth JWT-bearer grant: a service account's signed assertion for an access token.
    pub async fn jwt_bearer(&self, assertion: &SecretString, scopes: &[String]) -> Result<IssuedToken, GoogleError> {
        let form = [
            ("grant_type", JWT_BEARER_GRANT),
            ("assertion", assertion.expose_secret()),
        ];
        self.oauth_token(&form, scopes).await
    }

    /// OAuth refresh-token grant: an authorized user's access token.
    pub async fn refresh_access_token(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        refresh_token: &SecretString,
        scopes: &[String],
    ) -> Result<IssuedToken, GoogleError> {
        let scope = scopes.join(" ");
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", client_id),
            ("client_secret", client_secret.expose_secret()),
            ("refresh_token", refresh_token.expose_secret()),
            ("scope", scope.as_str()),
        ];
        self.oauth_token(&form, scopes).await
    }

    /// A grant at the OAuth token endpoint.
    async fn oauth_token(&self, form: &[(&str, &str)], scopes: &[String]) -> Result<IssuedToken, GoogleError> {
        let request = self.http.post(self.endpoints.oauth_token_url()).form(form);
        let body: TokenResponse = self.call(Api::OAuth2, request).await?;
        body.issued(Api::OAuth2, scopes)
    }

    /// The metadata server's token for the default service account of where the operator runs.
    pub async fn metadata_token(&self, scopes: &[String]) -> Result<IssuedToken, GoogleError> {
        let mut url = Url::parse(&join(
            &self.endpoints.metadata,
            "/computeMetadata/v1/instance/service-accounts/default/token",
        ))
        .expect("a base URL with a path is a URL");
        url.query_pairs_mut().append_pair("scopes", &scopes.join(","));
        let request = self.http.get(url).header("Metadata-Flavor", "Google");
        let body: TokenResponse = self.call(Api::Metadata, request).await?;
        body.issued(Api::Metadata, scopes)
    }

    /// IAM Credentials generateAccessToken for a service account.
    pub async fn generate_access_token(
        &self,
        caller: &SecretString,
        p: &ImpersonationParams,
    ) -> Result<IssuedToken, GoogleError> {
        let url = self.endpoints.generate_access_token_url(&p.service_account);
        let mut body = serde_json::json!({
            "scope": p.scopes,
            "lifetime": format!("{}s", p.lifetime.as_secs()),
        });
        if !p.delegates.is_empty() {
            body["delegates"] = serde_json::json!(p.delegates);
        }
        let request = self.http.post(url).bearer_auth(caller.expose_secret()).json(&body);
        let body: GenerateAccessTokenResponse = self.call(Api::IamCredentials, request).await?;
        let expires_at = parse_time(Api::IamCredentials, &body.expire_time)?;
        issued(Api::IamCredentials, body.access_token, expires_at, p.scopes.clone())
    }

    /// Developer Connect fetchAccessToken: the calling user's token for a linked Git provider.
    pub async fn fetch_access_token(&self, caller: &SecretString, connector: &str) -> Result<IssuedToken, GoogleError> {
        let url = join(
            &self.endpoints.developer_connect,
            &format!("/v1/{connector}/users:fetchAccessToken"),
        );
        // The documented request body is empty.
        let request = self
            .http
            .post(url)
            .bearer_auth(caller.expose_secret())
            .header("content-length", "0");
        let body: FetchAccessTokenResponse = self.call(Api::DeveloperConnect, request).await?;
        if let Some(e) = body.exchange_error {
            return Err(GoogleError::ExchangeError {
                api: Api::DeveloperConnect,
                code: e.code,
                description: e.description,
            });
        }
        let expires_at = parse_time(Api::DeveloperConnect, &body.expiration_time)?;
        issued(Api::DeveloperConnect, body.token, expires_at, body.scopes)
    }

    /// Discovery Engine acquireAccessToken: the calling user's token for a data connector.
    pub async fn acquire_access_token(
        &self,
        caller: &SecretString,
        data_connector: &str,
        scope: Option<&str>,
        action: Option<&str>,
    ) -> Result<IssuedToken, GoogleError> {
        let base = self.endpoints.discovery_engine_for(data_connector);
        let url = join(&base, &format!("/v1alpha/{data_connector}:acquireAccessToken"));
        let mut body = serde_json::Map::new();
        if let Some(scope) = scope {
            body.insert("scope".into(), scope.into());
        }
        if let Some(action) = action {
            body.insert("action".into(), action.into());
        }
        let request = self.http.post(url).bearer_auth(caller.expose_secret()).json(&body);
        let body: AcquireAccessTokenResponse = self.call(Api::DiscoveryEngine, request).await?;
        let scopes = body.refresh_token_info.map(|i| i.scopes).unwrap_or_default();
        issued(Api::DiscoveryEngine, body.access_token, None, scopes)
    }

    /// Sends a request, records its latency, and decodes a 2xx body as `T` or an error body as
    /// Google's error shapes.
    async fn call<T: for<'de> Deserialize<'de>>(&self, api: Api, request: RequestBuilder) -> Result<T, GoogleError> {
        let waited = self.limits.acquire(api).await;
        self.metrics.observe_rate_limit(api, waited.as_ref().ok().copied());
        let Ok(_) = waited else {
            let retry_after = waited.map_or_else(|t| t.0, |_| Duration::ZERO);
            return Err(GoogleError::Throttled { api, retry_after });
        };
        let started = std::time::Instant::now();
        let result = request.send().await;
        let status_class = match &result {
            Ok(r) => status_class(r.status()),
            Err(_) => "error",
        };
        let response = result.map_err(|e| GoogleError::Transport {
            api,
            source: e.without_url(),
        });
        let outcome = match response {
            Ok(response) => {
                let status = response.status();
                let headers = response.headers().clone();
                match response.bytes().await {
                    Ok(body) if status.is_success() => {
                        serde_json::from_slice(&body).map_err(|e| GoogleError::Malformed {
                            api,
                            status: status.as_u16(),
                            detail: describe_json_error(&e),
                        })
                    }
                    Ok(body) => Err(rejection(api, status, &headers, &body)),
                    Err(e) => Err(GoogleError::Transport {
                        api,
                        source: e.without_url(),
                    }),
                }
            }
            Err(e) => Err(e),
        };
        self.metrics.observe_google_call(api, status_class, started.elapsed());
        if let Err(e) = &outcome
            && e.is_push_back()
        {
            self.limits.push_back(api, e.retry_after());
        }
        outcome
    }
}

fn join(base: &Url, path: &str) -> String {
    format!("{}{}", base.as_str().trim_end_matches('/'), path)
}

fn after(secs: i64) -> Timestamp {
    let now = Timestamp::now();
    now.checked_add(Duration::from_secs(secs.unsigned_abs())).unwrap_or(now)
}

fn issued(
    api: Api,
    token: String,
    expires_at: Option<Timestamp>,
    scopes: Vec<String>,
) -> Result<IssuedToken, GoogleError> {
    if token.is_empty() {
        return Err(GoogleError::EmptyToken { api });
    }
    Ok(IssuedToken {
        token: SecretString::from(token),
        expires_at,
        scopes,
    })
}

/// An RFC 3339 timestamp; empty means "not known".
fn parse_time(api: Api, text: &str) -> Result<Option<Timestamp>, GoogleError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<Timestamp>().map(Some).map_err(|_| GoogleError::Malformed {
        api,
        status: 200,
        detail: "expiry is not an RFC 3339 timestamp".into(),
    })
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// Names what was wrong with a body without quoting it: serde's messages can echo values.
pub fn describe_json_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "not JSON",
        serde_json::error::Category::Data => "JSON without the documented fields",
        serde_json::error::Category::Io => "truncated",
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

/// Decodes Google's two error shapes: OAuth `{error, error_description}` (STS, OAuth) and
/// google.rpc.Status `{error: {code, message, status}}` (the others).
fn rejection(api: Api, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> GoogleError {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ErrorBody {
        OAuth {
            error: String,
            error_description: Option<String>,
        },
        Rpc {
            error: RpcStatus,
        },
    }
    #[derive(Deserialize)]
    struct RpcStatus {
        message: Option<String>,
        status: Option<String>,
    }
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody::OAuth {
            error,
            error_description,
        }) => (error, error_description.unwrap_or_default()),
        Ok(ErrorBody::Rpc { error }) => (error.status.unwrap_or_default(), error.message.unwrap_or_default()),
        Err(_) => (String::new(), status.canonical_reason().unwrap_or("error").to_string()),
    };
    GoogleError::Rejected {
        api,
        status: status.as_u16(),
        code,
        message,
        retry_after: retry_after(headers),
    }
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = k8s_openapi::jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    Duration::try_from(at.duration_since(Timestamp::now())).ok()
}

/// The OAuth-style answer of STS, the OAuth token endpoint and the metadata server.
#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    access_token: String,
    #[serde(default, deserialize_with = "number_or_string")]
    expires_in: Option<i64>,
    /// Granted scopes, space-separated (the OAuth token endpoint).
    #[serde(default)]
    scope: Option<String>,
}

impl TokenResponse {
    fn issued(self, api: Api, requested: &[String]) -> Result<IssuedToken, GoogleError> {
        let expires_at = match self.expires_in {
            Some(secs) if secs > 0 => Some(after(secs)),
            _ => None,
        };
        let scopes = match self.scope {
            Some(granted) if !granted.trim().is_empty() => granted.split_whitespace().map(String::from).collect(),
            _ => requested.to_vec(),
        };
        issued(api, self.access_token, expires_at, scopes)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateAccessTokenResponse {
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    expire_time: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FetchAccessTokenResponse {
    #[serde(default)]
    token: String,
    #[serde(default)]
    expiration_time: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    exchange_error: Option<ExchangeError>,
}

#[derive(Deserialize)]
struct ExchangeError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AcquireAccessTokenResponse {
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    refresh_token_info: Option<RefreshTokenInfo>,
}

#[derive(Deserialize)]
struct RefreshTokenInfo {
    #[serde(default)]
    scopes: Vec<String>,
}

/// `expires_in` arrives as a number, and from some servers as a string.
fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(i64),
        Str(String),
    }
    Ok(match Option::<NumOrStr>::deserialize(d)? {
        Some(NumOrStr::Num(n)) => Some(n),
        Some(NumOrStr::Str(s)) => s.parse().ok(),
        None => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_engine_picks_the_multi_region_host() {
        let e = Endpoints::default();
        let host = |dc: &str| e.discovery_engine_for(dc).host_str().unwrap().to_string();
        assert_eq!(
            host("projects/p/locations/us/collections/c/dataConnector"),
            "us-discoveryengine.googleapis.com"
        );
        assert_eq!(
            host("projects/p/locations/eu/collections/c/dataConnector"),
            "eu-discoveryengine.googleapis.com"
        );
        assert_eq!(
            host("projects/p/locations/global/collections/c/dataConnector"),
            "discoveryengine.googleapis.com"
        );
        let explicit = Endpoints::all_at(&Url::parse("http://127.0.0.1:9").unwrap());
        assert_eq!(
            explicit
                .discovery_engine_for("projects/p/locations/us/collections/c/dataConnector")
                .port(),
            Some(9)
        );
    }

    #[test]
    fn error_bodies() {
        let h = HeaderMap::new();
        let oauth = rejection(
            Api::Sts,
            StatusCode::BAD_REQUEST,
            &h,
            br#"{"error":"invalid_target","error_description":"gone"}"#,
        );
        assert!(
            matches!(oauth, GoogleError::Rejected { ref code, ref message, .. } if code == "invalid_target" && message == "gone")
        );
        let rpc = rejection(
            Api::IamCredentials,
            StatusCode::FORBIDDEN,
            &h,
            br#"{"error":{"code":403,"message":"Permission denied","status":"PERMISSION_DENIED"}}"#,
        );
        assert_eq!(
            rpc.to_string(),
            "iamcredentials: HTTP 403 PERMISSION_DENIED: Permission denied"
        );
        let mut h = HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        let html = rejection(Api::Sts, StatusCode::TOO_MANY_REQUESTS, &h, b"<html>");
        assert_eq!(html.retry_after(), Some(Duration::from_secs(7)));
        assert!(html.to_string().contains("Too Many Requests"));
    }

    #[test]
    fn malformed_body_is_described_without_quoting_it() {
        let e = serde_json::from_slice::<TokenResponse>(br#"{"access_token": 12, "secret": "ya29.leak"}"#)
            .err()
            .expect("must fail");
        assert_eq!(
            describe_json_error(&e),
            "JSON without the documented fields (line 1, column 19)"
        );
        let e = serde_json::from_slice::<TokenResponse>(b"ya29.leak")
            .err()
            .expect("must fail");
        assert_eq!(describe_json_error(&e), "not JSON (line 1, column 1)");
    }

    #[test]
    fn expires_in_as_string() {
        let r: TokenResponse = serde_json::from_str(r#"{"access_token":"t","expires_in":"3599"}"#).unwrap();
        assert_eq!(r.expires_in, Some(3599));
        let r: TokenResponse = serde_json::from_str(r#"{"access_token":"t"}"#).unwrap();
        assert_eq!(r.expires_in, None);
    }
}
