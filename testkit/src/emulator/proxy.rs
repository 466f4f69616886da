//! An HTTP proxy that hands Google's hosts to the emulator, so that unmodified programs using
//! Google's client libraries reach it through the standard `HTTPS_PROXY` and `SSL_CERT_FILE`
//! variables: see [`GoogleEmulator::start_intercepting_proxy`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, DropGuard};
use tower::ServiceExt;

use super::GoogleEmulator;
use super::server::{self, HANDSHAKE_TIMEOUT};
use super::tls::{TestCa, TrustedCa};

/// Where Google's client libraries find the metadata server over plain HTTP.
const METADATA_HOSTS: [&str; 2] = ["metadata.google.internal", "169.254.169.254"];

/// Hosts whose TLS the proxy terminates: Google's APIs and OAuth endpoints
/// (`sts.googleapis.com`, `iamcredentials.googleapis.com`, `oauth2.googleapis.com`,
/// `www.googleapis.com`, ...), and the metadata server's HTTPS endpoint.
fn intercepts_tls(host: &str) -> bool {
    host == "googleapis.com" || host.ends_with(".googleapis.com") || host == "metadata.google.internal"
}

/// The emulator behind an HTTP proxy; dropping it stops the proxy and removes the CA file.
pub struct InterceptingProxy {
    url: String,
    metadata_host: String,
    ca: TrustedCa,
    _stop: DropGuard,
}

/// What every proxy connection shares.
struct Interceptor {
    ca: TestCa,
    /// One leaf certificate per intercepted host name, made on first use.
    configs: Mutex<HashMap<String, Arc<ServerConfig>>>,
    emulator: Router,
    shutdown: CancellationToken,
}

impl InterceptingProxy {
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The CA of the intercepted hosts' certificates.
    pub fn ca(&self) -> &TrustedCa {
        &self.ca
    }

    /// `HOST:PORT` of the emulator for `GCE_METADATA_HOST`. Go's metadata client
    /// (`cloud.google.com/go/compute/metadata`) dials the metadata server itself, ignoring proxy
    /// variables, and reads this variable instead, as it does on GCE when set.
    pub fn metadata_host(&self) -> String {
        self.metadata_host.clone()
    }

    /// The environment of a program that should reach Google through this proxy: `HTTPS_PROXY`
    /// and `HTTP_PROXY` (and their lower-case forms), `SSL_CERT_FILE`, and `NO_PROXY` (and
    /// `no_proxy`) so that 127.0.0.1 and localhost (the test apiserver) are reached directly.
    /// Programs using Go's metadata client also need `GCE_METADATA_HOST`
    /// ([`InterceptingProxy::metadata_host`]).
    pub fn env(&self) -> Vec<(String, String)> {
        let ca_file = self.ca.file().to_string_lossy().into_owned();
        let direct = "127.0.0.1,localhost,::1".to_owned();
        [
            ("HTTPS_PROXY", self.url()),
            ("https_proxy", self.url()),
            ("HTTP_PROXY", self.url()),
            ("http_proxy", self.url()),
            ("NO_PROXY", direct.clone()),
            ("no_proxy", direct),
            ("SSL_CERT_FILE", ca_file),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }
}

impl GoogleEmulator {
    /// An HTTP proxy on this emulator's address (127.0.0.1 after [`GoogleEmulator::start`]) for
    /// unmodified programs using Google's client libraries: `CONNECT` to `*.googleapis.com` (and
    /// `metadata.google.internal`) on port 443 is answered with a leaf certificate for that host
    /// from the proxy's own test CA and served by this emulator; plain-HTTP absolute-form requests
    /// to `metadata.google.internal` or `169.254.169.254` are served by it too (the metadata
    /// server is HTTP). Any other host is refused with 403, never dialled. The proxy stops with
    /// the emulator, or when the returned handle is dropped.
    pub async fn start_intercepting_proxy(&self) -> io::Result<InterceptingProxy> {
        let ca = tokio::task::spawn_blocking(TestCa::generate)
            .await
            .map_err(io::Error::other)??;
        let listener = TcpListener::bind(SocketAddr::new(self.ip, 0)).await?;
        let port = listener.local_addr()?.port();
        let stop = self.shutdown.child_token();
        let trusted = ca.trusted()?;
        let interceptor = Arc::new(Interceptor {
            ca,
            configs: Mutex::default(),
            emulator: server::router(Arc::clone(&self.shared)),
            shutdown: stop.clone(),
        });
        let app = Router::new().fallback(forward).with_state(interceptor);
        server::spawn(listener, app, None, stop.clone());
        Ok(InterceptingProxy {
            url: format!("http://{}", super::reachable(SocketAddr::new(self.ip, port))),
            metadata_host: self.base_url().trim_start_matches("http://").to_owned(),
            ca: trusted,
            _stop: stop.drop_guard(),
        })
    }
}

/// One request to the proxy: a tunnel to open, or a plain-HTTP request to serve.
async fn forward(State(interceptor): State<Arc<Interceptor>>, request: Request) -> Response {
    if request.method() == Method::CONNECT {
        return tunnel(interceptor, request);
    }
    let to_metadata = request.uri().authority().is_some_and(|authority| {
        METADATA_HOSTS.contains(&authority.host()) && authority.port_u16().is_none_or(|port| port == 80)
    });
    if !to_metadata {
        return refuse(request.uri());
    }
    // The request keeps its connection's handle, so the emulator's faults can drop this connection.
    match interceptor.emulator.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Accepts `CONNECT host:443` to an intercepted host, then serves the emulator inside the tunnel
/// over TLS with a certificate for that host.
fn tunnel(interceptor: Arc<Interceptor>, mut request: Request) -> Response {
    let Some((host, 443)) = request
        .uri()
        .authority()
        .and_then(|authority| Some((authority.host().to_owned(), authority.port_u16()?)))
    else {
        return refuse(request.uri());
    };
    if !intercepts_tls(&host) {
        return refuse(request.uri());
    }
    // The certificate is for the host named in CONNECT, which is what the client checks (and
    // what it sends as SNI, when it sends one).
    let config = match interceptor.server_config(&host) {
        Ok(config) => config,
        Err(error) => return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(tunnel) = upgrade.await else { return };
        let handshake = TlsAcceptor::from(config).accept(TokioIo::new(tunnel));
        // A failed handshake is the client's to report.
        if let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            let emulator = interceptor.emulator.clone();
            server::serve_connection(stream, emulator, interceptor.shutdown.clone()).await;
        }
    });
    StatusCode::OK.into_response()
}

fn refuse(uri: &Uri) -> Response {
    let message = format!("the Google emulator's proxy does not go to {uri}\n");
    (StatusCode::FORBIDDEN, message).into_response()
}

impl Interceptor {
    fn server_config(&self, host: &str) -> io::Result<Arc<ServerConfig>> {
        let configs = || self.configs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(config) = configs().get(host) {
            return Ok(Arc::clone(config));
        }
        // Made outside the lock; two first connections to one host may both make one, and one wins.
        let config = self.ca.server_config(&[host.to_owned()])?;
        Ok(Arc::clone(configs().entry(host.to_owned()).or_insert(config)))
    }
}
