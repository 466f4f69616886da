//! An emulator of the Google endpoints that mint OAuth access tokens: STS, IAM Credentials
//! `generateAccessToken`, Developer Connect `fetchAccessToken`, Discovery Engine
//! `acquireAccessToken`, the OAuth token endpoint, `tokeninfo` and the metadata server.
//!
//! One HTTP server answers all of them under Google's own paths and wire formats, so a client
//! under test only swaps `https://sts.googleapis.com` (and the other hosts) for
//! [`GoogleEmulator::base_url`]. Tests configure identities, script faults and latency, and read
//! back every request and every token issued.

mod call;
mod connectors;
mod errors;
mod faults;
mod iam;
mod metadata;
mod oauth;
mod server;
mod state;
mod sts;
mod wire;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::{HeaderValue, StatusCode};
use jsonwebtoken::DecodingKey;
use k8s_openapi::jiff::SignedDuration;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use faults::Fault;
use state::{AuthorizedUser, ServiceAccountKey, Shared};

/// A running emulator. Dropping it shuts the server down.
pub struct GoogleEmulator {
    shared: Arc<Shared>,
    shutdown: Arc<Notify>,
}

/// The emulated APIs, for configuration and observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// Security Token Service `POST /v1/token`.
    Sts,
    /// IAM Credentials `POST /v1/projects/-/serviceAccounts/{account}:generateAccessToken`.
    GenerateAccessToken,
    /// Developer Connect `POST /v1/{accountConnector}/users:fetchAccessToken`.
    FetchAccessToken,
    /// Discovery Engine `POST /v1alpha/{dataConnector}:acquireAccessToken`.
    AcquireAccessToken,
    /// OAuth 2.0 token endpoint `POST /token` (JWT bearer and refresh-token grants).
    OAuthToken,
    /// `GET /tokeninfo?access_token=...`.
    TokenInfo,
    /// Metadata server `GET /computeMetadata/v1/instance/service-accounts/{default|email}/token`.
    Metadata,
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

/// What the emulator knows about a token it issued.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The IAM principal the token stands for: `serviceAccount:EMAIL`, `user:EMAIL` or
    /// `principal://iam.googleapis.com/.../subject/SUB`.
    pub principal: String,
    pub endpoint: Endpoint,
    pub expires_at: SystemTime,
    pub scopes: Vec<String>,
}

impl GoogleEmulator {
    /// Starts the emulator on a random port of 127.0.0.1, on the current tokio runtime.
    pub async fn start() -> std::io::Result<GoogleEmulator> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts the emulator on `addr`, on the current tokio runtime.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<GoogleEmulator> {
        let listener = TcpListener::bind(addr).await?;
        let mut local = listener.local_addr()?;
        // A wildcard bind (the demo listens for pods too) is still reached via loopback locally.
        if local.ip().is_unspecified() {
            local.set_ip(match local.ip() {
                IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        let shared = Arc::new(Shared::new(format!("http://{local}")));
        let shutdown = Arc::new(Notify::new());
        server::spawn(listener, Arc::clone(&shared), Arc::clone(&shutdown));
        Ok(GoogleEmulator { shared, shutdown })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// Sets the lifetime of tokens issued by `endpoint` (default 3600 s). For
    /// [`Endpoint::GenerateAccessToken`] it caps the lifetime the caller asks for.
    pub fn set_lifetime(&self, endpoint: Endpoint, lifetime: Duration) {
        self.shared.state().lifetimes.insert(endpoint, lifetime);
    }

    /// Registers an STS audience: the full resource name of a workload (or workforce) identity
    /// pool provider, `//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/V`.
    pub fn add_workload_identity_provider(&self, audience: &str) {
        self.shared.state().providers.insert(audience.to_owned());
    }

    /// Registers a service account that `generateAccessToken` can impersonate. `allowed_callers`
    /// are the principals holding the token-creator role on it; `"*"` admits any emulator token.
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

    /// Sets the metadata server's identity; its tokens are for `serviceAccount:EMAIL`.
    pub fn set_metadata_service_account(&self, email: &str) {
        self.shared.state().metadata_account = Some(email.to_owned());
    }

    /// Registers a Developer Connect account connector, `projects/P/locations/L/accountConnectors/C`.
    pub fn add_account_connector(&self, name: &str) {
        self.shared.state().account_connectors.insert(name.to_owned());
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
    /// Developer Connect), a [`Fault::Status`] code is not an HTTP status, or a
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
    /// answers with (`expireTime`, `expirationTime`, the `Date` header) read that clock; tokens
    /// still expire by the real one, after their lifetime.
    pub fn set_clock_offset(&self, offset: SignedDuration) {
        self.shared.state().clock_offset = offset;
    }

    /// Delays every `generateAccessToken` answer for service account `email` (faults included) by
    /// `latency`, or by the endpoint's latency if that is longer: one identity that hangs.
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

    /// Every access token issued so far, in issue order.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.state().issued.clone()
    }

    /// What the emulator knows about `token`, expired or not; `None` if it never issued it.
    pub fn token_info(&self, token: &str) -> Option<IssuedToken> {
        self.shared.state().tokens.get(token).cloned()
    }
}

impl Drop for GoogleEmulator {
    fn drop(&mut self) {
        // `notify_one` keeps a permit, so this works even before the server first polls.
        self.shutdown.notify_one();
    }
}
