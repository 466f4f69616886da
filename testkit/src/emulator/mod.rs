//! An emulator of the Google endpoints that mint short-lived credentials: STS, IAM Credentials
//! `generateAccessToken` and `generateIdToken`, Developer Connect `fetchAccessToken`,
//! `fetchReadToken` and `fetchReadWriteToken`, Discovery Engine `acquireAccessToken`, the OAuth
//! token endpoint, `tokeninfo`, Google's ID token keys (`/oauth2/v3/certs`) and the metadata
//! server's `token` and `identity`.
//!
//! ID tokens are real RS256 JWTs, signed with a key each emulator generates at start and
//! publishes at [`GoogleEmulator::id_token_certs_url`]; every other token is opaque. Repository
//! tokens can be checked by a test's Git server with [`GoogleEmulator::git_credentials_valid`].
//!
//! One HTTP server answers all of them under Google's own paths and wire formats, so a client
//! under test only swaps `https://sts.googleapis.com` (and the other hosts) for
//! [`GoogleEmulator::base_url`]. Tests configure identities, script faults and latency, and read
//! back every request and every token issued. The same routes and state are also served over
//! HTTPS ([`GoogleEmulator::serve_https`]) and, for unmodified programs that cannot swap hosts,
//! behind an HTTP proxy that intercepts Google's hosts
//! ([`GoogleEmulator::start_intercepting_proxy`]).

mod call;
mod connectors;
mod errors;
mod faults;
mod iam;
mod id_tokens;
mod metadata;
mod oauth;
mod proxy;
mod repositories;
mod server;
mod state;
mod sts;
mod tls;
mod wire;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::{HeaderValue, StatusCode};
use jsonwebtoken::DecodingKey;
use k8s_openapi::jiff::SignedDuration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use faults::Fault;
use id_tokens::IdTokenSigner;
pub use proxy::InterceptingProxy;
use state::{AuthorizedUser, GitRepositoryLink, ServiceAccountKey, Shared};
pub use tls::{HttpsEndpoint, TrustedCa};

/// A running emulator. Dropping it shuts its servers down (HTTP, and any HTTPS listener or proxy).
pub struct GoogleEmulator {
    shared: Arc<Shared>,
    /// The address it listens on, port aside: its other listeners bind there too.
    ip: IpAddr,
    shutdown: CancellationToken,
}

/// The emulated APIs, for configuration and observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// Security Token Service `POST /v1/token`.
    Sts,
    /// IAM Credentials `POST /v1/projects/-/serviceAccounts/{account}:generateAccessToken`.
    GenerateAccessToken,
    /// IAM Credentials `POST /v1/projects/-/serviceAccounts/{account}:generateIdToken`.
    GenerateIdToken,
    /// Developer Connect `POST /v1/{accountConnector}/users:fetchAccessToken`.
    FetchAccessToken,
    /// Developer Connect `POST /v1/{gitRepositoryLink}:fetchReadToken`.
    FetchReadToken,
    /// Developer Connect `POST /v1/{gitRepositoryLink}:fetchReadWriteToken`.
    FetchReadWriteToken,
    /// Discovery Engine `POST /v1alpha/{dataConnector}:acquireAccessToken`.
    AcquireAccessToken,
    /// OAuth 2.0 token endpoint `POST /token` (JWT bearer and refresh-token grants).
    OAuthToken,
    /// `GET /tokeninfo?access_token=...`.
    TokenInfo,
    /// The keys Google signs ID tokens with, `GET /oauth2/v3/certs` (a JWK set).
    Certs,
    /// Metadata server `GET /computeMetadata/v1/instance/service-accounts/{default|email}/token`.
    Metadata,
    /// Metadata server `GET /computeMetadata/v1/instance/service-accounts/{default|email}/identity`.
    MetadataIdentity,
    /// The metadata server's other values that Google's client libraries read: the service
    /// account's `email`, `scopes` and directory (`?recursive=true`), `project/project-id`,
    /// `project/numeric-project-id`, `universe/universe-domain`, and `GET /` (detection probes).
    MetadataValue,
}

/// One request as the emulator received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path including the query string.
    pub path: String,
    /// Header names are lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// `None` for requests that matched no emulated API.
    pub endpoint: Option<Endpoint>,
    /// When the request arrived: pacing is observed from here.
    pub received_at: std::time::Instant,
}

/// What the emulator knows about a token it issued: an access token, an ID token (the JWT) or
/// a repository token.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The IAM principal the token stands for: `serviceAccount:EMAIL`, `user:EMAIL` or
    /// `principal://iam.googleapis.com/.../subject/SUB`. For a repository token, the caller who
    /// fetched it.
    pub principal: String,
    pub endpoint: Endpoint,
    /// By the real clock. For an ID token, the `exp` claim is this time by the emulator's clock.
    pub expires_at: SystemTime,
    /// Empty for ID and repository tokens.
    pub scopes: Vec<String>,
}

impl GoogleEmulator {
    /// Starts the emulator on a random port of 127.0.0.1, on the current tokio runtime.
    pub async fn start() -> std::io::Result<GoogleEmulator> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts the emulator on `addr`, on the current tokio runtime. Fails if it cannot listen
    /// there or cannot make its ID token signing key.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<GoogleEmulator> {
        // RSA key generation takes tens of milliseconds: off the async workers.
        let id_tokens = tokio::task::spawn_blocking(IdTokenSigner::generate)
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let ip = local.ip();
        let shared = Arc::new(Shared::new(format!("http://{}", reachable(local)), id_tokens));
        let shutdown = CancellationToken::new();
        server::spawn(listener, server::router(Arc::clone(&shared)), None, shutdown.clone());
        Ok(GoogleEmulator { shared, ip, shutdown })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// Where Google publishes the keys its ID tokens are signed with (`GET /oauth2/v3/certs`):
    /// verify the emulator's ID tokens against this JWK set.
    pub fn id_token_certs_url(&self) -> String {
        format!("{}/oauth2/v3/certs", self.shared.base_url)
    }

    /// Sets the lifetime of tokens issued by `endpoint` (default 3600 s). For
    /// [`Endpoint::GenerateAccessToken`] it caps the lifetime the caller asks for; for ID tokens
    /// it is `exp - iat`.
    pub fn set_lifetime(&self, endpoint: Endpoint, lifetime: Duration) {
        self.shared.state().lifetimes.insert(endpoint, lifetime);
    }

    /// Registers an STS audience: the full resource name of a workload (or workforce) identity
    /// pool provider, `//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/V`.
    pub fn add_workload_identity_provider(&self, audience: &str) {
        self.shared.state().providers.insert(audience.to_owned());
    }

    /// Registers a service account that `generateAccessToken` and `generateIdToken` can
    /// impersonate. `allowed_callers` are the principals holding the token-creator role on it;
    /// `"*"` admits any emulator access token.
    pub fn add_service_account(&self, email: &str, allowed_callers: &[&str]) {
        let callers = allowed_callers.iter().map(|c| (*c).to_owned()).collect();
        self.shared.state().service_accounts.insert(email.to_owned(), callers);
    }

    /// Registers the public half of a service account key, for JWT-bearer grants at `/token`.
    ///
    /// # Panics
    /// If `public_key_pem` is not an RSA public key in PEM form.
    pub fn add_service_account_key(&self, client_email: &str, private_key_id: &str, public_key_pem: &str) {
        let key = DecodingKey::from_rsa_pem(public_key_pem.as_bytes())
            .expect("add_service_account_key: public_key_pem must be an RSA public key in PEM form");
        let key = ServiceAccountKey {
            client_email: client_email.to_owned(),
            key,
        };
        self.shared.state().keys.insert(private_key_id.to_owned(), key);
    }

    /// Registers an `authorized_user` credential; refreshing it yields tokens for `user:USER`.
    pub fn add_authorized_user(&self, client_id: &str, client_secret: &str, refresh_token: &str, user: &str) {
        self.shared.state().users.push(AuthorizedUser {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            refresh_token: refresh_token.to_owned(),
            user: user.to_owned(),
        });
    }

    /// Sets the metadata server's identity; its access and ID tokens are for `serviceAccount:EMAIL`.
    pub fn set_metadata_service_account(&self, email: &str) {
        self.shared.state().metadata_account = Some(email.to_owned());
    }

    /// Sets the metadata server's project (`project/project-id` and `project/numeric-project-id`);
    /// until then it has none, and those values are not found.
    pub fn set_metadata_project(&self, project_id: &str, project_number: u64) {
        self.shared.state().metadata_project = Some((project_id.to_owned(), project_number));
    }

    /// Registers a Developer Connect account connector, `projects/P/locations/L/accountConnectors/C`.
    pub fn add_account_connector(&self, name: &str) {
        self.shared.state().account_connectors.insert(name.to_owned());
    }

    /// Registers a Developer Connect Git repository link,
    /// `projects/P/locations/L/connections/C/gitRepositoryLinks/R`, whose tokens go with
    /// `git_username`. `readers` may fetch read tokens, `writers` read and read-write ones; both
    /// list principals as [`GoogleEmulator::add_service_account`] does (`"*"`: any caller with an
    /// emulator access token). Registering a name again replaces the link.
    pub fn add_git_repository_link(&self, name: &str, git_username: &str, readers: &[&str], writers: &[&str]) {
        let principals = |list: &[&str]| list.iter().map(|p| (*p).to_owned()).collect();
        let link = GitRepositoryLink {
            git_username: git_username.to_owned(),
            readers: principals(readers),
            writers: principals(writers),
        };
        self.shared.state().git_repository_links.insert(name.to_owned(), link);
    }

    /// Registers a Discovery Engine data connector, `projects/P/locations/L/collections/C/dataConnector`.
    pub fn add_data_connector(&self, name: &str) {
        self.shared.state().data_connectors.insert(name.to_owned());
    }

    /// Makes the next `times` calls to `endpoint` fail with `fault`, after any faults already
    /// queued for it.
    ///
    /// # Panics
    /// If the fault cannot happen at that endpoint (e.g. [`Fault::ExchangeError`] anywhere but
    /// Developer Connect's `fetchAccessToken`), a [`Fault::Status`] code is not an HTTP status, or a
    /// [`Fault::Redirect`] location cannot be a header value.
    pub fn fail_next(&self, endpoint: Endpoint, times: usize, fault: Fault) {
        assert!(
            fault.applies_to(endpoint),
            "fail_next: {fault:?} cannot happen at {endpoint:?}"
        );
        if let Fault::Status { code, .. } = fault {
            assert!(
                StatusCode::from_u16(code).is_ok(),
                "fail_next: {code} is not an HTTP status"
            );
        }
        if let Fault::Redirect { location } = &fault {
            assert!(
                HeaderValue::try_from(location.as_str()).is_ok(),
                "fail_next: {location:?} cannot be a Location header"
            );
        }
        let mut state = self.shared.state();
        state
            .faults
            .entry(endpoint)
            .or_default()
            .extend(std::iter::repeat_n(fault, times));
    }

    /// Sets the emulator's clock `offset` off the real one (positive: ahead). The absolute times it
    /// answers with (`expireTime`, `expirationTime`, ID tokens' `iat` and `exp`, the `Date`
    /// header) read that clock; tokens still expire by the real one, after their lifetime.
    pub fn set_clock_offset(&self, offset: SignedDuration) {
        self.shared.state().clock_offset = offset;
    }

    /// Delays every `generateAccessToken` and `generateIdToken` answer for service account `email`
    /// (faults included) by `latency`, or by the endpoint's latency if that is longer: one
    /// identity that hangs.
    pub fn set_service_account_latency(&self, email: &str, latency: Duration) {
        self.shared.state().account_latencies.insert(email.to_owned(), latency);
    }

    /// Delays every answer from `endpoint` (faults included) by `latency`.
    pub fn set_latency(&self, endpoint: Endpoint, latency: Duration) {
        self.shared.state().latencies.insert(endpoint, latency);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.state().requests.clone()
    }

    /// When each request to `endpoint` arrived, in order.
    pub fn arrivals(&self, endpoint: Endpoint) -> Vec<std::time::Instant> {
        let state = self.shared.state();
        let to_endpoint = state.requests.iter().filter(|r| r.endpoint == Some(endpoint));
        to_endpoint.map(|r| r.received_at).collect()
    }

    /// How many requests reached `endpoint`, whatever the answer.
    pub fn calls(&self, endpoint: Endpoint) -> usize {
        let state = self.shared.state();
        state.requests.iter().filter(|r| r.endpoint == Some(endpoint)).count()
    }

    /// Every token issued so far (access, ID and repository tokens), in issue order. ID tokens
    /// are deterministic: the same one minted twice within a second is listed twice.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.state().issued.clone()
    }

    /// What the emulator knows about `token`, expired, revoked or not; `None` if it never issued it.
    pub fn token_info(&self, token: &str) -> Option<IssuedToken> {
        self.shared.state().token_info(token).cloned()
    }

    /// Revokes a token the emulator issued, of any kind: Google APIs then refuse it as an expired
    /// credential, and [`GoogleEmulator::git_credentials_valid`] is false for it. Unknown tokens
    /// are ignored.
    pub fn revoke(&self, token: &str) {
        self.shared.state().revoke(token);
    }

    /// What a Git server in a test should answer to HTTP basic credentials for `link`: true iff
    /// `password` is a repository token the emulator issued for that link, neither expired (by the
    /// real clock) nor revoked, `username` is the link's Git username, and, if `write`, the token
    /// came from `fetchReadWriteToken`.
    pub fn git_credentials_valid(&self, link: &str, username: &str, password: &str, write: bool) -> bool {
        self.shared
            .state()
            .git_credentials_valid(link, username, password, write)
    }
}

/// Where a local client reaches a listener bound to `addr`: a wildcard bind (the demo listens for
/// pods too) is still reached via loopback.
fn reachable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

impl Drop for GoogleEmulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
