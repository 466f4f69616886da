//! Calls to Google's token APIs, with the wire formats Google documents (see
//! shared reference `google-token-apis.md`).

mod error;

use std::{sync::Arc, time::Duration};

pub use error::{Api, ClientError, GoogleError};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use reqwest::{RequestBuilder, Response, StatusCode, header::HeaderMap};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::{
    crd::RepositoryAccess,
    metrics::Metrics,
    ratelimit::{EndpointLimits, GoogleLimits},
    validation::{Flow, IdTokenParams, ImpersonationParams, StsParams},
};

const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// `projects/-/serviceAccounts/ACCOUNT`: Google requires the `-` wildcard for the project.
const SERVICE_ACCOUNTS: [&str; 4] = ["v1", "projects", "-", "serviceAccounts"];
const GENERATE_ACCESS_TOKEN_SUFFIX: &str = ":generateAccessToken";
const METADATA_TOKEN: [&str; 6] = [
    "computeMetadata",
    "v1",
    "instance",
    "service-accounts",
    "default",
    "token",
];
const METADATA_IDENTITY: [&str; 6] = [
    "computeMetadata",
    "v1",
    "instance",
    "service-accounts",
    "default",
    "identity",
];
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an answer the operator reads. The largest documented answer is STS's, with a token
/// of up to 12 KiB; error bodies with details are a few KiB. 64 KiB leaves room for that to grow
/// while bounding what a misbehaving endpoint (or a proxy's error page) costs per concurrent call.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

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
            // An address, not `metadata.google.internal`: a name with few dots goes through the
            // pod's DNS search path first, where a tenant's Service may answer it. Google's own
            // libraries use this address for the same reason.
            metadata: url("http://169.254.169.254"),
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

    /// Refuses a base URL that Google's paths cannot be appended to, or that carries more than
    /// where to send (user info, a query, a fragment).
    pub fn check(&self) -> Result<(), ClientError> {
        let bases = [
            (Api::Sts, Some(&self.sts)),
            (Api::IamCredentials, Some(&self.iam_credentials)),
            (Api::DeveloperConnect, Some(&self.developer_connect)),
            (Api::DiscoveryEngine, self.discovery_engine.as_ref()),
            (Api::OAuth2, Some(&self.oauth2)),
            (Api::Metadata, Some(&self.metadata)),
        ];
        let is_base = |url: &Url| {
            matches!(url.scheme(), "http" | "https")
                && url.host().is_some()
                && url.username().is_empty()
                && url.password().is_none()
                && url.query().is_none()
                && url.fragment().is_none()
        };
        match bases.into_iter().find(|(_, url)| url.is_some_and(|url| !is_base(url))) {
            Some((api, _)) => Err(ClientError::Endpoint { api }),
            None => Ok(()),
        }
    }

    /// Where STS exchanges go; `external_account` files must name exactly this.
    pub fn sts_token_url(&self) -> String {
        at(&self.sts, ["v1", "token"]).into()
    }

    /// Where JWT-bearer and refresh-token grants go, and the audience of service account JWTs.
    pub fn oauth_token_url(&self) -> String {
        at(&self.oauth2, ["token"]).into()
    }

    /// generateAccessToken for `service_account`, which is one path segment whatever it holds.
    pub fn generate_access_token_url(&self, service_account: &str) -> Url {
        let last = format!("{service_account}{GENERATE_ACCESS_TOKEN_SUFFIX}");
        at(
            &self.iam_credentials,
            SERVICE_ACCOUNTS.into_iter().chain([last.as_str()]),
        )
    }

    /// The service account a generateAccessToken URL names, if the URL is, to the letter, the one
    /// this endpoint builds for it: nothing in it (an escape, a `..`, a query, a fragment) is
    /// lost or reinterpreted when the operator calls its own URL instead.
    pub fn impersonated_service_account(&self, url: &str) -> Option<String> {
        let parsed = Url::parse(url).ok()?;
        let account = parsed
            .path_segments()?
            .next_back()?
            .strip_suffix(GENERATE_ACCESS_TOKEN_SUFFIX)?;
        (!account.is_empty() && self.generate_access_token_url(account).as_str() == url).then(|| account.to_string())
    }

    /// Developer Connect fetchAccessToken for an account connector resource name.
    pub fn fetch_access_token_url(&self, account_connector: &str) -> Url {
        resource_url(
            &self.developer_connect,
            "v1",
            account_connector,
            "/users:fetchAccessToken",
        )
    }

    /// Discovery Engine acquireAccessToken for a data connector resource name.
    pub fn acquire_access_token_url(&self, data_connector: &str) -> Url {
        let base = self.discovery_engine_for(data_connector);
        resource_url(&base, "v1alpha", data_connector, ":acquireAccessToken")
    }

    /// generateIdToken for `service_account`, one path segment as for generateAccessToken.
    pub fn generate_id_token_url(&self, service_account: &str) -> Url {
        let last = format!("{service_account}:generateIdToken");
        at(
            &self.iam_credentials,
            SERVICE_ACCOUNTS.into_iter().chain([last.as_str()]),
        )
    }

    fn metadata_token_url(&self, scopes: &[String]) -> Url {
        let mut url = at(&self.metadata, METADATA_TOKEN);
        url.query_pairs_mut().append_pair("scopes", &scopes.join(","));
        url
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
    /// The username to present with the token (Developer Connect's `gitUsername`).
    pub username: Option<String>,
}

#[derive(Clone)]
pub struct GoogleClient {
    http: reqwest::Client,
    endpoints: Endpoints,
    limits: Arc<EndpointLimits>,
    metrics: Arc<Metrics>,
}

impl GoogleClient {
    pub fn new(endpoints: Endpoints, limits: &GoogleLimits, metrics: Arc<Metrics>) -> Result<Self, ClientError> {
        endpoints.check()?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // A redirect would carry the request, with its credentials, to wherever the answer
            // points; a 3xx is a failure instead (`GoogleError::Redirected`).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("gcp-token-operator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ClientError::Http { source })?;
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
            Flow::IdToken(p) => {
                let federated;
                let caller = match &p.federation {
                    Some(sts) => {
                        federated = self.sts_exchange(sts, caller).await?.token;
                        &federated
                    }
                    None => caller,
                };
                self.generate_id_token(caller, p).await
            }
            Flow::DeveloperConnectRepository {
                git_repository_link,
                access,
            } => self.fetch_repository_token(caller, git_repository_link, *access).await,
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
        let (body, clocks): (TokenResponse, _) = self.call(Api::Sts, request).await?;
        body.issued(Api::Sts, &p.scopes, clocks)
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
        let (body, clocks): (TokenResponse, _) = self.call(Api::OAuth2, request).await?;
        body.issued(Api::OAuth2, scopes, clocks)
    }

    /// The metadata server's token for the default service account of where the operator runs.
    pub async fn metadata_token(&self, scopes: &[String]) -> Result<IssuedToken, GoogleError> {
        let url = self.endpoints.metadata_token_url(scopes);
        let request = self.http.get(url).header("Metadata-Flavor", "Google");
        let (body, clocks): (TokenResponse, _) = self.call(Api::Metadata, request).await?;
        body.issued(Api::Metadata, scopes, clocks)
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
        let (body, clocks): (GenerateAccessTokenResponse, _) = self.call(Api::IamCredentials, request).await?;
        let expires_at =
            parse_time(Api::IamCredentials, &body.expire_time)?.map(|t| clocks.local_at_most(t, p.lifetime));
        issued(Api::IamCredentials, body.access_token, expires_at, p.scopes.clone())
    }

    /// Developer Connect fetchAccessToken: the calling user's token for a linked Git provider.
    pub async fn fetch_access_token(&self, caller: &SecretString, connector: &str) -> Result<IssuedToken, GoogleError> {
        let url = self.endpoints.fetch_access_token_url(connector);
        // The documented request body is empty.
        let request = self
            .http
            .post(url)
            .bearer_auth(caller.expose_secret())
            .header("content-length", "0");
        let (body, clocks): (FetchAccessTokenResponse, _) = self.call(Api::DeveloperConnect, request).await?;
        if let Some(e) = body.exchange_error {
            return Err(GoogleError::ExchangeError {
                api: Api::DeveloperConnect,
                code: e.code,
                description: e.description,
            });
        }
        let expires_at = parse_time(Api::DeveloperConnect, &body.expiration_time)?.map(|t| clocks.local(t));
        issued(Api::DeveloperConnect, body.token, expires_at, body.scopes)
    }

    /// IAM Credentials generateIdToken for the service account `p` names (validation makes sure
    /// there is one when this is called).
    pub async fn generate_id_token(
        &self,
        caller: &SecretString,
        p: &IdTokenParams,
    ) -> Result<IssuedToken, GoogleError> {
        let account = p.service_account.as_deref().unwrap_or_default();
        let url = self.endpoints.generate_id_token_url(account);
        let mut body = serde_json::json!({ "audience": p.audience, "includeEmail": p.include_email });
        if !p.delegates.is_empty() {
            body["delegates"] = serde_json::json!(p.delegates);
        }
        let request = self.http.post(url).bearer_auth(caller.expose_secret()).json(&body);
        let (body, clocks): (GenerateIdTokenResponse, _) = self.call(Api::IamCredentials, request).await?;
        id_token(Api::IamCredentials, body.token, clocks)
    }

    /// The metadata server's ID token for the identity of where the operator runs.
    pub async fn metadata_id_token(&self, audience: &str, include_email: bool) -> Result<IssuedToken, GoogleError> {
        let mut url = at(&self.endpoints.metadata, METADATA_IDENTITY);
        url.query_pairs_mut()
            .append_pair("audience", audience)
            .append_pair("format", if include_email { "full" } else { "standard" });
        let request = self.http.get(url).header("Metadata-Flavor", "Google");
        let (body, clocks) = self.call_raw(Api::Metadata, request).await?;
        let token = String::from_utf8(body).map_err(|_| GoogleError::Malformed {
            api: Api::Metadata,
            status: 200,
            detail: "the ID token is not UTF-8".into(),
        })?;
        id_token(Api::Metadata, token.trim().to_string(), clocks)
    }

    /// Developer Connect fetchReadToken or fetchReadWriteToken for a Git repository link.
    pub async fn fetch_repository_token(
        &self,
        caller: &SecretString,
        link: &str,
        access: RepositoryAccess,
    ) -> Result<IssuedToken, GoogleError> {
        let method = match access {
            RepositoryAccess::Read => ":fetchReadToken",
            RepositoryAccess::ReadWrite => ":fetchReadWriteToken",
        };
        let url = resource_url(&self.endpoints.developer_connect, "v1", link, method);
        // The documented request body is empty.
        let request = self
            .http
            .post(url)
            .bearer_auth(caller.expose_secret())
            .header("content-length", "0");
        let (body, clocks): (FetchRepositoryTokenResponse, _) = self.call(Api::DeveloperConnect, request).await?;
        let expires_at = parse_time(Api::DeveloperConnect, &body.expiration_time)?.map(|t| clocks.local(t));
        let mut issued = issued(Api::DeveloperConnect, body.token, expires_at, Vec::new())?;
        let plausible = body.git_username.len() <= crate::crd::bound::USERNAME as usize
            && !body.git_username.chars().any(|c| c.is_whitespace() || c.is_control());
        if !plausible {
            return Err(GoogleError::Malformed {
                api: Api::DeveloperConnect,
                status: 200,
                detail: "gitUsername is too long or holds whitespace or control characters".into(),
            });
        }
        issued.username = Some(body.git_username).filter(|u| !u.is_empty());
        Ok(issued)
    }

    /// Discovery Engine acquireAccessToken: the calling user's token for a data connector.
    pub async fn acquire_access_token(
        &self,
        caller: &SecretString,
        data_connector: &str,
        scope: Option<&str>,
        action: Option<&str>,
    ) -> Result<IssuedToken, GoogleError> {
        let url = self.endpoints.acquire_access_token_url(data_connector);
        let mut body = serde_json::Map::new();
        if let Some(scope) = scope {
            body.insert("scope".into(), scope.into());
        }
        if let Some(action) = action {
            body.insert("action".into(), action.into());
        }
        let request = self.http.post(url).bearer_auth(caller.expose_secret()).json(&body);
        let (body, _): (AcquireAccessTokenResponse, _) = self.call(Api::DiscoveryEngine, request).await?;
        let scopes = body.refresh_token_info.map(|i| i.scopes).unwrap_or_default();
        issued(Api::DiscoveryEngine, body.access_token, None, scopes)
    }

    /// Sends a request, records its latency, and decodes a 2xx body as `T` or an error body as
    /// Google's error shapes. Also returns the clocks of the exchange, to read expiry times with.
    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        api: Api,
        request: RequestBuilder,
    ) -> Result<(T, Clocks), GoogleError> {
        let (body, clocks) = self.call_raw(api, request).await?;
        let value = serde_json::from_slice(&body).map_err(|e| GoogleError::Malformed {
            api,
            status: 200,
            detail: describe_json_error(&e),
        })?;
        Ok((value, clocks))
    }

    /// As [`GoogleClient::call`], with the 2xx body as it is.
    async fn call_raw(&self, api: Api, request: RequestBuilder) -> Result<(Vec<u8>, Clocks), GoogleError> {
        let waited = self.limits.acquire(api).await;
        self.metrics.observe_rate_limit(api, waited.as_ref().ok().copied());
        let Ok(_) = waited else {
            let retry_after = waited.map_or_else(|t| t.0, |_| Duration::ZERO);
            return Err(GoogleError::Throttled { api, retry_after });
        };
        let sent = Timestamp::now();
        let started = std::time::Instant::now();
        let result = request.send().await;
        let status_class = match &result {
            Ok(r) => status_class(r.status()),
            Err(_) => "error",
        };
        let outcome = match result {
            Ok(response) => decode(api, response)
                .await
                .map(|(body, server)| (body, Clocks { sent, server })),
            Err(e) => Err(GoogleError::Transport {
                api,
                source: e.without_url(),
            }),
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

/// A 2xx answer's body, and the server's `Date`.
async fn decode(api: Api, response: Response) -> Result<(Vec<u8>, Option<Timestamp>), GoogleError> {
    let status = response.status();
    if status.is_redirection() {
        return Err(GoogleError::Redirected {
            api,
            status: status.as_u16(),
        });
    }
    let headers = response.headers().clone();
    let body = read_capped(api, response).await?;
    if !status.is_success() {
        return Err(rejection(api, status, &headers, &body));
    }
    let date = headers
        .get(reqwest::header::DATE)
        .and_then(|v| http_date(v.to_str().ok()?));
    Ok((body, date))
}

/// The body, chunk by chunk, up to [`MAX_RESPONSE_BODY`]: past that the rest is left unread (the
/// connection is dropped with the response).
async fn read_capped(api: Api, mut response: Response) -> Result<Vec<u8>, GoogleError> {
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| GoogleError::Transport {
        api,
        source: e.without_url(),
    })? {
        if body.len().saturating_add(chunk.len()) > MAX_RESPONSE_BODY {
            return Err(GoogleError::Oversized {
                api,
                status,
                limit: MAX_RESPONSE_BODY,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `base` with `segments` appended to its path, each percent-encoded as a single segment (`/`,
/// `%`, `?`, `#` and `\` included), so that none can add a level, a query or a fragment. `url`
/// drops `.` and `..` segments; validation refuses them before they get here.
fn at<'s>(base: &Url, segments: impl IntoIterator<Item = &'s str>) -> Url {
    let mut url = base.clone();
    // Only a base without a path (`mailto:`-like) has no segments: `Endpoints::check` refuses
    // those, and reqwest would refuse the unchanged URL too.
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// `/{version}/{name}{method}` under `base`. A resource name keeps its `/` structure: each of its
/// segments is encoded on its own.
fn resource_url(base: &Url, version: &str, name: &str, method: &str) -> Url {
    let path = format!("{name}{method}");
    at(base, std::iter::once(version).chain(path.split('/')))
}

/// The times around one exchange, to turn the absolute expiry times some APIs answer with into
/// local ones.
///
/// An absolute time is only as good as the agreement of the two clocks: with the operator's clock
/// behind Google's by X, a token would be refreshed X too late, and with it ahead by more than the
/// lifetime, every token would look expired. So the lifetime is read on the server's own clock
/// (`expiry - Date`) and counted from when the request was sent locally, which is no later than
/// when the server stamped its answer: the local expiry is then skew-free, and early rather than
/// late (by the latency; at most a second late from the `Date` header's resolution). Without a
/// `Date` header the expiry is taken as it is.
#[derive(Clone, Copy, Debug)]
struct Clocks {
    /// When the request was sent, by the local clock.
    sent: Timestamp,
    /// The answer's `Date` header: when it was made, by the server's clock.
    server: Option<Timestamp>,
}

impl Clocks {
    /// The local time at which `expiry`, on the server's clock, comes. Saturates; whether the
    /// result is plausible is for the caller to judge.
    fn local(self, expiry: Timestamp) -> Timestamp {
        match self.server {
            Some(server) => self.after(expiry.duration_since(server)),
            None => expiry,
        }
    }

    /// As [`Clocks::local`], but never later than `lifetime` after the request: IAM issues tokens
    /// for at most the lifetime asked for, whatever the clocks say.
    fn local_at_most(self, expiry: Timestamp, lifetime: Duration) -> Timestamp {
        let longest = self.after(SignedDuration::try_from(lifetime).unwrap_or(SignedDuration::MAX));
        self.local(expiry).min(longest)
    }

    /// `lifetime` after the request was sent (`expires_in`, which needs no clock agreement).
    /// Saturates: a negative or absurd lifetime gives a time far in the past or the future, for
    /// the caller to refuse.
    fn after(self, lifetime: SignedDuration) -> Timestamp {
        let bound = if lifetime.is_negative() {
            Timestamp::MIN
        } else {
            Timestamp::MAX
        };
        self.sent.checked_add(lifetime).unwrap_or(bound)
    }
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
        username: None,
    })
}

/// An ID token, with its expiry read from its `exp` claim (nothing else in it is used, so its
/// signature is the receiver's to check). The claim is an absolute time on Google's clock.
fn id_token(api: Api, token: String, clocks: Clocks) -> Result<IssuedToken, GoogleError> {
    #[derive(Deserialize)]
    struct Claims {
        exp: i64,
    }
    if token.is_empty() {
        return Err(GoogleError::EmptyToken { api });
    }
    let malformed = |detail: &str| GoogleError::Malformed {
        api,
        status: 200,
        detail: detail.into(),
    };
    let claims: Claims = jsonwebtoken::dangerous::insecure_decode_claims(&token)
        .map_err(|_| malformed("the ID token is not a JWT with a numeric exp claim"))?;
    let exp = Timestamp::from_second(claims.exp).map_err(|_| malformed("the ID token's exp claim is out of range"))?;
    issued(api, token, Some(clocks.local(exp)), Vec::new())
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
    Duration::try_from(http_date(value)?.duration_since(Timestamp::now())).ok()
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(value: &str) -> Option<Timestamp> {
    let zoned = k8s_openapi::jiff::fmt::rfc2822::parse(value.trim()).ok()?;
    Some(zoned.timestamp())
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
    fn issued(self, api: Api, requested: &[String], clocks: Clocks) -> Result<IssuedToken, GoogleError> {
        let expires_at = self
            .expires_in
            .map(|secs| clocks.after(SignedDuration::from_secs(secs)));
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
struct GenerateIdTokenResponse {
    #[serde(default)]
    token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FetchRepositoryTokenResponse {
    #[serde(default)]
    token: String,
    #[serde(default)]
    expiration_time: String,
    #[serde(default)]
    git_username: String,
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
    use base64::Engine;
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::{
        crd::TokenRequestSpec,
        validation::{Placement, Policy, validate},
    };

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn absolute_expiry_is_read_on_the_server_clock() {
        // The server's clock is 2 h ahead: its token of 1 h expires 1 h after the request, locally.
        let ahead = Clocks {
            sent: ts(10_000),
            server: Some(ts(17_200)),
        };
        assert_eq!(ahead.local(ts(20_800)), ts(13_600));
        // 2 h behind: the token is not taken as expired an hour ago.
        let behind = Clocks {
            sent: ts(10_000),
            server: Some(ts(2_800)),
        };
        assert_eq!(behind.local(ts(6_400)), ts(13_600));
        // Without a Date header, the expiry is taken as it is; IAM's is still capped by the
        // lifetime asked for.
        let undated = Clocks {
            sent: ts(10_000),
            server: None,
        };
        assert_eq!(undated.local(ts(6_400)), ts(6_400));
        assert_eq!(undated.local_at_most(ts(30_000), Duration::from_secs(3600)), ts(13_600));
        assert_eq!(ahead.local_at_most(ts(20_800), Duration::from_secs(1800)), ts(11_800));
        assert_eq!(behind.local_at_most(ts(6_400), Duration::from_secs(7200)), ts(13_600));
        assert_eq!(ahead.local_at_most(ts(20_800), Duration::MAX), ts(13_600));
        // Absurd clocks saturate instead of overflowing.
        let early = Clocks {
            sent: ts(10_000),
            server: Some(Timestamp::MIN),
        };
        assert_eq!(early.local(Timestamp::MAX), Timestamp::MAX);
        let late = Clocks {
            sent: ts(10_000),
            server: Some(Timestamp::MAX),
        };
        assert_eq!(late.local(Timestamp::MIN), Timestamp::MIN);
    }

    #[test]
    fn expires_in_saturates_and_is_passed_on_as_it_is() {
        let clocks = Clocks {
            sent: ts(10_000),
            server: Some(ts(99_999)),
        };
        let expiry = |body: &str| {
            let response: TokenResponse = serde_json::from_str(body).unwrap();
            response.issued(Api::Sts, &[], clocks).unwrap().expires_at
        };
        assert_eq!(expiry(r#"{"access_token":"t","expires_in":3599}"#), Some(ts(13_599)));
        // Relative: the server's clock does not matter. Plausibility is the caller's to judge.
        assert_eq!(expiry(r#"{"access_token":"t","expires_in":0}"#), Some(ts(10_000)));
        assert_eq!(expiry(r#"{"access_token":"t","expires_in":-5}"#), Some(ts(9_995)));
        assert_eq!(
            expiry(r#"{"access_token":"t","expires_in":9223372036854775807}"#),
            Some(Timestamp::MAX)
        );
        assert_eq!(
            expiry(r#"{"access_token":"t","expires_in":"-9223372036854775808"}"#),
            Some(Timestamp::MIN)
        );
        assert_eq!(expiry(r#"{"access_token":"t"}"#), None);
    }

    #[test]
    fn http_dates() {
        assert_eq!(http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(ts(784_111_777)));
        assert_eq!(http_date("yesterday"), None);
    }

    #[test]
    fn endpoints_must_be_plain_http_bases() {
        assert!(Endpoints::default().check().is_ok());
        assert!(
            Endpoints::all_at(&Url::parse("http://127.0.0.1:9/prefix/").unwrap())
                .check()
                .is_ok()
        );
        for bad in [
            "mailto:ops@example.com",
            "file:///etc/passwd",
            "https://user:password@proxy.corp/",
            "https://proxy.corp/?x=1",
            "https://proxy.corp/#x",
        ] {
            let endpoints = Endpoints {
                oauth2: Url::parse(bad).unwrap(),
                ..Endpoints::default()
            };
            let e = endpoints.check().expect_err(bad);
            assert!(matches!(e, ClientError::Endpoint { api: Api::OAuth2 }), "{bad}");
            assert!(!e.to_string().contains("password"), "{e}");
        }
        let endpoints = Endpoints {
            discovery_engine: Some(Url::parse("data:text/plain,x").unwrap()),
            ..Endpoints::default()
        };
        assert!(matches!(
            endpoints.check(),
            Err(ClientError::Endpoint {
                api: Api::DiscoveryEngine
            })
        ));
    }

    #[test]
    fn the_metadata_server_is_an_address() {
        // Never a name the pod's DNS search path could answer (review finding L-12).
        assert_eq!(
            Endpoints::default().metadata.host(),
            Some(url::Host::Ipv4([169, 254, 169, 254].into()))
        );
    }

    #[test]
    fn impersonation_urls_are_read_only_when_exactly_the_operators_own() {
        let e = Endpoints::all_at(&Url::parse("https://proxy.corp/iam/").unwrap());
        let url =
            "https://proxy.corp/iam/v1/projects/-/serviceAccounts/sa@p.iam.gserviceaccount.com:generateAccessToken";
        assert_eq!(
            e.impersonated_service_account(url).as_deref(),
            Some("sa@p.iam.gserviceaccount.com")
        );
        assert_eq!(
            e.generate_access_token_url("sa@p.iam.gserviceaccount.com").as_str(),
            url
        );
        for other in [
            "https://proxy.corp/v1/projects/-/serviceAccounts/sa@p.iam.gserviceaccount.com:generateAccessToken",
            "https://proxy.corp/iam/v1/projects/p/serviceAccounts/sa@p.iam.gserviceaccount.com:generateAccessToken",
            "https://proxy.corp/iam/v1/projects/-/serviceAccounts/sa@p.iam.gserviceaccount.com:generateAccessToken?x",
            "https://proxy.corp/iam/v1/projects/-/serviceAccounts/sa@p.iam.gserviceaccount.com:generateAccessToken#",
            "https://proxy.corp/iam/v1/projects/-/serviceAccounts/a/../sa@p.iam.gserviceaccount.com:generateAccessToken",
            r"https://proxy.corp/iam/v1/projects/-/serviceAccounts/a\..\sa@p.iam.gserviceaccount.com:generateAccessToken",
            "https://proxy.corp/iam/v1/projects/-/serviceAccounts/sa%40p.iam.gserviceaccount.com:generateAccessToken",
            "https://proxy.corp/iam/v1/projects/-/serviceAccounts/:generateAccessToken",
            "http://proxy.corp/iam/v1/projects/-/serviceAccounts/sa@p.iam.gserviceaccount.com:generateAccessToken",
            "not a url",
        ] {
            assert_eq!(e.impersonated_service_account(other), None, "{other}");
        }
    }

    #[test]
    fn review_strings_stay_inside_their_segment() {
        // The strings of review finding L-3, even unvalidated, cannot leave their segment.
        let e = Endpoints::default();
        for account in [r"x@y.z\..\..\..\..\..\anything#", "x@y.z?alt=json&x=", "x@y.z/../../a"] {
            let url = e.generate_access_token_url(account);
            assert_eq!(url.host_str(), Some("iamcredentials.googleapis.com"));
            assert_eq!((url.query(), url.fragment()), (None, None), "{url}");
            assert_eq!(url.path_segments().unwrap().count(), 5, "{url}");
        }
        let base = Endpoints::all_at(&Url::parse("https://proxy.corp/discovery").unwrap());
        let url = base.acquire_access_token_url("../../../../../../admin/x");
        assert!(url.path().starts_with("/discovery/v1alpha/"), "{url}");
    }

    /// A spec's flow as validation leaves it, or `None` when the spec is refused.
    fn validated(flow: serde_json::Value) -> Option<Flow> {
        let spec = json!({"flow": flow, "source": {"secret": {"name": "caller", "key": "token"}}});
        let spec: TokenRequestSpec = serde_json::from_value(spec).ok()?;
        let policy = Policy::default();
        let at = Placement {
            namespace: "ns",
            name: "tr",
            policy: &policy,
        };
        validate(&spec, &at).ok().map(|valid| valid.flow)
    }

    #[test]
    fn the_properties_below_see_valid_specs() {
        // Otherwise they would hold for want of a case.
        let impersonation =
            json!({"impersonation": {"serviceAccount": "sa@p.iam.gserviceaccount.com", "scopes": ["s"]}});
        assert!(matches!(validated(impersonation), Some(Flow::Impersonation(_))));
        let name = "projects/p/locations/l/accountConnectors/c";
        assert!(matches!(
            validated(json!({"developerConnect": {"accountConnector": name}})),
            Some(Flow::DeveloperConnect { .. })
        ));
        let name = "projects/p/locations/us/collections/c/dataConnector";
        assert!(matches!(
            validated(json!({"discoveryEngine": {"dataConnector": name}})),
            Some(Flow::DiscoveryEngine { .. })
        ));
        assert!(validated(json!({"impersonation": {"serviceAccount": "x@y.z#", "scopes": ["s"]}})).is_none());
    }

    /// `url` goes to `base`'s origin, with `base`'s path then exactly `segments`, and nothing after.
    fn confined(url: &Url, base: &Url, segments: &[&str]) -> Result<(), TestCaseError> {
        prop_assert_eq!(url.origin(), base.origin());
        prop_assert_eq!(url.query(), None);
        prop_assert_eq!(url.fragment(), None);
        let expected: Vec<&str> = base
            .path_segments()
            .unwrap()
            .filter(|s| !s.is_empty())
            .chain(segments.iter().copied())
            .collect();
        prop_assert_eq!(url.path_segments().unwrap().collect::<Vec<_>>(), expected);
        // What is sent reads back as what was built.
        prop_assert_eq!(&Url::parse(url.as_str()).unwrap(), url);
        Ok(())
    }

    /// Characters that URLs treat specially, or that could pass for others.
    const SPECIAL: [char; 19] = [
        '.', '/', '\\', '?', '#', '%', '&', '=', ':', ';', '@', ' ', '\t', '\n', '\0', 'A', 'é', '\u{202e}', '\u{ff0f}',
    ];

    /// Strings heavy in what URLs treat specially.
    fn hostile() -> impl Strategy<Value = String> {
        let chars: Vec<char> = SPECIAL.iter().copied().chain(['a', 'z', '0', '9', '-', '_']).collect();
        prop_oneof![
            prop::collection::vec(prop::sample::select(chars), 0..16).prop_map(String::from_iter),
            any::<String>(),
        ]
    }

    /// A string of `valid`, with one special character put in somewhere.
    fn spoiled(valid: &'static str) -> impl Strategy<Value = String> {
        (
            valid,
            prop::sample::select(SPECIAL.to_vec()),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(mut s, c, at)| {
                s.insert(at.index(s.len() + 1), c);
                s
            })
    }

    /// A resource ID: mostly valid ones, so that the properties below are not only about
    /// refusals, and often one of those a URL would reinterpret.
    fn resource_id() -> impl Strategy<Value = String> {
        let tricky = vec![".", "..", "%2e%2e", ".%2E", ""];
        prop_oneof![
            3 => "[a-zA-Z0-9_.-]{1,12}",
            1 => prop::sample::select(tricky).prop_map(String::from),
            1 => spoiled("[a-zA-Z0-9_.-]{0,12}"),
            1 => hostile(),
        ]
    }

    fn bases() -> impl Strategy<Value = Url> {
        prop::sample::select(vec![
            "https://example.test",
            "http://127.0.0.1:9/",
            "https://proxy.corp/prefix/google",
        ])
        .prop_map(|base| Url::parse(base).unwrap())
    }

    /// Bodies as an upstream may send them: JSON of Google's shapes with absurd values, and junk.
    fn answer_body() -> impl Strategy<Value = Vec<u8>> {
        let number = prop_oneof![
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            "\\PC{0,30}".prop_map(|s| json!(s))
        ];
        prop_oneof![
            (number.clone(), "\\PC{0,40}", "\\PC{0,40}").prop_map(|(expires_in, token, scope)| {
                json!({"access_token": token, "expires_in": expires_in, "scope": scope, "token_type": "Bearer"})
                    .to_string()
                    .into_bytes()
            }),
            (number, "\\PC{0,40}", "\\PC{0,2000}").prop_map(|(code, status, message)| {
                json!({"error": {"code": code, "status": status, "message": message}})
                    .to_string()
                    .into_bytes()
            }),
            ("\\PC{0,40}", "\\PC{0,2000}").prop_map(|(error, description)| {
                json!({"error": error, "error_description": description})
                    .to_string()
                    .into_bytes()
            }),
            prop::collection::vec(any::<u8>(), 0..4096),
        ]
    }

    proptest! {
        /// Any answer, at any status, decodes to a token or a classified error; none panics, and
        /// a failure always has a class and a reason.
        #[test]
        fn any_answer_is_decoded_or_classified(
            status in 100u16..600, body in answer_body(), retry_after in "\\PC{0,20}",
            sent in any::<i64>(), date in prop::option::of(any::<i64>()),
        ) {
            let status = StatusCode::from_u16(status).unwrap();
            let mut headers = HeaderMap::new();
            if let Ok(value) = reqwest::header::HeaderValue::from_str(&retry_after) {
                headers.insert(reqwest::header::RETRY_AFTER, value);
            }
            let error = rejection(Api::Sts, status, &headers, &body);
            let _ = (error.class(), error.reason(), error.retry_after(), error.to_string());
            let clock = |s: i64| Timestamp::from_second(s.clamp(Timestamp::MIN.as_second(), Timestamp::MAX.as_second())).unwrap();
            let clocks = Clocks { sent: clock(sent), server: date.map(clock) };
            if let Ok(answer) = serde_json::from_slice::<TokenResponse>(&body) {
                match answer.issued(Api::Sts, &["s".to_string()], clocks) {
                    Ok(issued) => prop_assert!(!issued.scopes.is_empty()),
                    Err(e) => { let _ = (e.class(), e.reason()); }
                }
            }
        }

        #[test]
        fn a_valid_service_account_is_one_segment(
            account in prop_oneof![
                "[a-z0-9-]{1,10}@[a-z0-9-]{1,10}(\\.[a-z0-9-]{1,10}){1,3}",
                "[0-9]{1,21}",
                hostile(),
                spoiled("[a-z0-9-]{1,10}@[a-z0-9-]{1,10}\\.[a-z]{1,5}"),
            ],
            base in bases(),
        ) {
            let flow = json!({"impersonation": {"serviceAccount": account, "scopes": ["s"]}});
            if let Some(Flow::Impersonation(p)) = validated(flow) {
                let url = Endpoints::all_at(&base).generate_access_token_url(&p.service_account);
                let last = format!("{account}:generateAccessToken");
                confined(&url, &base, &["v1", "projects", "-", "serviceAccounts", &last])?;
            }
        }

        #[test]
        fn a_valid_account_connector_keeps_its_structure(
            ids in [resource_id(), resource_id(), resource_id()],
            base in bases(),
        ) {
            let [p, l, c] = &ids;
            let name = format!("projects/{p}/locations/{l}/accountConnectors/{c}");
            if let Some(Flow::DeveloperConnect { account_connector }) = validated(json!({"developerConnect": {"accountConnector": name}})) {
                let url = Endpoints::all_at(&base).fetch_access_token_url(&account_connector);
                let segments = ["v1", "projects", p, "locations", l, "accountConnectors", c, "users:fetchAccessToken"];
                confined(&url, &base, &segments)?;
            }
        }

        #[test]
        fn a_valid_data_connector_keeps_its_structure(
            ids in [resource_id(), resource_id(), resource_id()],
            base in bases(),
        ) {
            let [p, l, c] = &ids;
            let name = format!("projects/{p}/locations/{l}/collections/{c}/dataConnector");
            let flow = json!({"discoveryEngine": {"dataConnector": name}});
            if let Some(Flow::DiscoveryEngine { data_connector, .. }) = validated(flow) {
                let segments = ["v1alpha", "projects", p, "locations", l, "collections", c, "dataConnector:acquireAccessToken"];
                let url = Endpoints::all_at(&base).acquire_access_token_url(&data_connector);
                confined(&url, &base, &segments)?;
                // Google's own hosts: the location picks one of three, never one it names.
                let url = Endpoints::default().acquire_access_token_url(&data_connector);
                let host = match l.as_str() {
                    "us" => "https://us-discoveryengine.googleapis.com",
                    "eu" => "https://eu-discoveryengine.googleapis.com",
                    _ => "https://discoveryengine.googleapis.com",
                };
                confined(&url, &Url::parse(host).unwrap(), &segments)?;
            }
        }

        #[test]
        fn a_valid_repository_link_keeps_its_structure(
            ids in [resource_id(), resource_id(), resource_id(), resource_id()],
            base in bases(),
        ) {
            let [p, l, c, r] = &ids;
            let name = format!("projects/{p}/locations/{l}/connections/{c}/gitRepositoryLinks/{r}");
            let flow = json!({"developerConnectRepository": {"gitRepositoryLink": name}});
            if let Some(Flow::DeveloperConnectRepository { git_repository_link, .. }) = validated(flow) {
                let url = resource_url(&Endpoints::all_at(&base).developer_connect, "v1", &git_repository_link, ":fetchReadToken");
                let last = format!("{r}:fetchReadToken");
                let segments = ["v1", "projects", p, "locations", l, "connections", c, "gitRepositoryLinks", &last];
                confined(&url, &base, &segments)?;
            }
        }

        #[test]
        fn an_id_token_service_account_is_one_segment(account in prop_oneof![hostile(), "[a-z]{1,8}@p\\.iam\\.gserviceaccount\\.com"], base in bases()) {
            let flow = json!({"idToken": {"audience": "https://a.run.app", "serviceAccount": account}});
            if let Some(Flow::IdToken(p)) = validated(flow) {
                let account = p.service_account.unwrap();
                let url = Endpoints::all_at(&base).generate_id_token_url(&account);
                let last = format!("{account}:generateIdToken");
                confined(&url, &base, &["v1", "projects", "-", "serviceAccounts", &last])?;
            }
        }

        /// Whatever an ID token endpoint answers, the expiry is the `exp` claim or the answer is
        /// a classified error; nothing panics.
        #[test]
        fn any_id_token_is_read_or_refused(claims in answer_body(), exp in any::<i64>(), header in "\\PC{0,40}") {
            let clocks = Clocks { sent: ts(1_000), server: Some(ts(1_000)) };
            let part = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            for payload in [claims, json!({"exp": exp}).to_string().into_bytes()] {
                let token = format!("{}.{}.sig", part(header.as_bytes()), part(&payload));
                match id_token(Api::IamCredentials, token, clocks) {
                    Ok(issued) => prop_assert!(issued.expires_at.is_some()),
                    Err(e) => { let _ = (e.class(), e.reason(), e.to_string()); }
                }
            }
        }

        /// Whole names of any shape: whatever passes validation has the documented structure.
        #[test]
        fn any_name_that_passes_has_the_documented_structure(name in hostile(), base in bases()) {
            let endpoints = Endpoints::all_at(&base);
            if let Some(Flow::DeveloperConnect { account_connector }) = validated(json!({"developerConnect": {"accountConnector": name}})) {
                let url = endpoints.fetch_access_token_url(&account_connector);
                let parts: Vec<&str> = account_connector.split('/').collect();
                prop_assert_eq!(parts.len(), 6);
                let mut segments = vec!["v1"];
                segments.extend(&parts);
                segments.push("users:fetchAccessToken");
                confined(&url, &base, &segments)?;
            }
            if let Some(Flow::Impersonation(p)) = validated(json!({"impersonation": {"serviceAccount": name, "scopes": ["s"]}})) {
                let url = endpoints.generate_access_token_url(&p.service_account);
                confined(&url, &base, &["v1", "projects", "-", "serviceAccounts", &format!("{name}:generateAccessToken")])?;
            }
        }

        #[test]
        fn metadata_scopes_stay_in_the_query(scopes in prop::collection::vec(hostile(), 0..4), base in bases()) {
            let url = Endpoints::all_at(&base).metadata_token_url(&scopes);
            let path = ["computeMetadata", "v1", "instance", "service-accounts", "default", "token"];
            let mut bare = url.clone();
            bare.set_query(None);
            confined(&bare, &base, &path)?;
            let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
            prop_assert_eq!(pairs, vec![("scopes".to_string(), scopes.join(","))]);
            prop_assert_eq!(url.fragment(), None);
        }
    }

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
    fn an_id_token_expires_at_its_exp_claim_on_googles_clock() {
        let part = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let jwt = |claims: serde_json::Value| format!("{}.{}.c2ln", part(json!({"alg": "RS256"})), part(claims));
        // Google's clock is 100 s ahead: the lifetime (exp - Date) counts from when the call was sent.
        let clocks = Clocks {
            sent: ts(1_000),
            server: Some(ts(1_100)),
        };
        let issued = id_token(Api::IamCredentials, jwt(json!({"exp": 4_700, "aud": "x"})), clocks).unwrap();
        assert_eq!(issued.expires_at, Some(ts(4_600)));
        assert!(issued.scopes.is_empty());
        for bad in [
            "not a jwt".to_string(),
            jwt(json!({"aud": "x"})),
            jwt(json!({"exp": "soon"})),
            jwt(json!({"exp": i64::MAX})),
        ] {
            let error = id_token(Api::IamCredentials, bad, clocks).unwrap_err();
            assert!(matches!(error, GoogleError::Malformed { .. }), "{error}");
        }
        assert!(matches!(
            id_token(Api::Metadata, String::new(), clocks),
            Err(GoogleError::EmptyToken { .. })
        ));
    }

    #[test]
    fn expires_in_as_string() {
        let r: TokenResponse = serde_json::from_str(r#"{"access_token":"t","expires_in":"3599"}"#).unwrap();
        assert_eq!(r.expires_in, Some(3599));
        let r: TokenResponse = serde_json::from_str(r#"{"access_token":"t"}"#).unwrap();
        assert_eq!(r.expires_in, None);
    }
}
