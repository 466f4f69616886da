//! The HTTP side: one router for every API, routing by Google's paths, and the steps every
//! request goes through (record, wait the scripted latency, apply the scripted fault, answer).
//! The same router serves every listener: plain HTTP, HTTPS and the intercepting proxy.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::call::Call;
use super::errors::ApiError;
use super::faults::{self, Applied};
use super::state::Shared;
use super::{Endpoint, RecordedRequest, connectors, iam, id_tokens, metadata, oauth, repositories, sts, wire};

/// Large enough for STS `options`, which Google allows up to 4 MiB.
const MAX_BODY: usize = 8 << 20;

/// A client that opens a connection and never finishes its TLS handshake must not hold a task forever.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The emulated APIs as one service.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(dispatch).with_state(shared)
}

/// Serves `app` on every connection `listener` accepts, over TLS if `tls` is given, until
/// `shutdown` is cancelled; open connections then finish the request in flight.
pub(super) fn spawn(listener: TcpListener, app: Router, tls: Option<TlsAcceptor>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    // Usually out of file descriptors: back off instead of spinning, as axum does.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (app, tls, shutdown) = (app.clone(), tls.clone(), shutdown.clone());
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(stream, app, shutdown).await,
                    Some(tls) => {
                        // A failed handshake is the client's to report; the emulator has nothing to answer.
                        if let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                            serve_connection(stream, app, shutdown).await;
                        }
                    }
                }
            });
        }
    });
}

/// Serves HTTP/1.1 requests on one connection (plain, TLS, or tunnelled through the proxy) with
/// `app` until the client closes it or `shutdown` is cancelled.
pub(super) async fn serve_connection<S>(stream: S, app: Router, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = DroppableStream::new(stream);
    let app = app.layer(Extension(stream.handle()));
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
        // For the proxy's CONNECT tunnels; the emulator's own routes never upgrade.
        .with_upgrades();
    tokio::pin!(connection);
    // Errors are the client's (it hung up, or sent garbage): there is nobody to tell.
    tokio::select! {
        _ = connection.as_mut() => {}
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await.ok();
        }
    }
}

/// Google's resource paths, with the path parameters each API needs.
enum Route {
    Sts,
    GenerateAccessToken { project: String, account: String },
    GenerateIdToken { project: String, account: String },
    FetchAccessToken { connector: String },
    FetchRepositoryToken { link: String, write: bool },
    AcquireAccessToken { data_connector: String },
    OAuthToken,
    TokenInfo,
    Certs,
    Metadata { account: String },
    MetadataIdentity { account: String },
    MetadataValue(metadata::Value),
}

/// Google's path templates (from the APIs' HTTP rules) for the routes with path parameters.
const METADATA_TOKEN: &str = "/computeMetadata/v1/instance/service-accounts/*/token";
const METADATA_IDENTITY: &str = "/computeMetadata/v1/instance/service-accounts/*/identity";
const GENERATE_ACCESS_TOKEN: &str = "/v1/projects/*/serviceAccounts/*:generateAccessToken";
const GENERATE_ID_TOKEN: &str = "/v1/projects/*/serviceAccounts/*:generateIdToken";
const FETCH_ACCESS_TOKEN: &str = "/v1/projects/*/locations/*/accountConnectors/*/users:fetchAccessToken";
const FETCH_READ_TOKEN: &str = "/v1/projects/*/locations/*/connections/*/gitRepositoryLinks/*:fetchReadToken";
const FETCH_READ_WRITE_TOKEN: &str =
    "/v1/projects/*/locations/*/connections/*/gitRepositoryLinks/*:fetchReadWriteToken";
const ACQUIRE_ACCESS_TOKEN: &str = "/v1alpha/projects/*/locations/*/collections/*/dataConnector:acquireAccessToken";

impl Route {
    fn parse(method: &Method, path: &str) -> Option<Route> {
        let route = match *method {
            Method::POST if path == "/v1/token" => Route::Sts,
            Method::POST if path == "/token" => Route::OAuthToken,
            Method::GET if path == "/tokeninfo" => Route::TokenInfo,
            Method::GET if path == "/oauth2/v3/certs" => Route::Certs,
            Method::GET => captures(path, METADATA_TOKEN)
                .map(|[account]| Route::Metadata { account })
                .or_else(|| captures(path, METADATA_IDENTITY).map(|[account]| Route::MetadataIdentity { account }))
                .or_else(|| metadata::Value::parse(path).map(Route::MetadataValue))?,
            Method::POST => captures(path, GENERATE_ACCESS_TOKEN)
                .map(|[project, account]| Route::GenerateAccessToken { project, account })
                .or_else(|| {
                    captures(path, GENERATE_ID_TOKEN)
                        .map(|[project, account]| Route::GenerateIdToken { project, account })
                })
                .or_else(|| {
                    let [p, l, c] = captures(path, FETCH_ACCESS_TOKEN)?;
                    let connector = format!("projects/{p}/locations/{l}/accountConnectors/{c}");
                    Some(Route::FetchAccessToken { connector })
                })
                .or_else(|| {
                    let (write, [p, l, c, r]) = captures(path, FETCH_READ_TOKEN)
                        .map(|names| (false, names))
                        .or_else(|| captures(path, FETCH_READ_WRITE_TOKEN).map(|names| (true, names)))?;
                    let link = format!("projects/{p}/locations/{l}/connections/{c}/gitRepositoryLinks/{r}");
                    Some(Route::FetchRepositoryToken { link, write })
                })
                .or_else(|| {
                    let [p, l, c] = captures(path, ACQUIRE_ACCESS_TOKEN)?;
                    let data_connector = format!("projects/{p}/locations/{l}/collections/{c}/dataConnector");
                    Some(Route::AcquireAccessToken { data_connector })
                })?,
            _ => return None,
        };
        Some(route)
    }

    fn endpoint(&self) -> Endpoint {
        match self {
            Route::Sts => Endpoint::Sts,
            Route::GenerateAccessToken { .. } => Endpoint::GenerateAccessToken,
            Route::GenerateIdToken { .. } => Endpoint::GenerateIdToken,
            Route::FetchAccessToken { .. } => Endpoint::FetchAccessToken,
            Route::FetchRepositoryToken { write: false, .. } => Endpoint::FetchReadToken,
            Route::FetchRepositoryToken { write: true, .. } => Endpoint::FetchReadWriteToken,
            Route::AcquireAccessToken { .. } => Endpoint::AcquireAccessToken,
            Route::OAuthToken => Endpoint::OAuthToken,
            Route::TokenInfo => Endpoint::TokenInfo,
            Route::Certs => Endpoint::Certs,
            Route::Metadata { .. } => Endpoint::Metadata,
            Route::MetadataIdentity { .. } => Endpoint::MetadataIdentity,
            Route::MetadataValue(_) => Endpoint::MetadataValue,
        }
    }

    fn handle(&self, call: &Call) -> Result<Response, ApiError> {
        match self {
            Route::Sts => sts::exchange(call),
            Route::GenerateAccessToken { project, account } => iam::generate_access_token(call, project, account),
            Route::GenerateIdToken { project, account } => iam::generate_id_token(call, project, account),
            Route::FetchAccessToken { connector } => connectors::fetch_access_token(call, connector),
            Route::FetchRepositoryToken { link, write } => repositories::fetch_token(call, link, *write),
            Route::AcquireAccessToken { data_connector } => connectors::acquire_access_token(call, data_connector),
            Route::OAuthToken => oauth::token(call),
            Route::TokenInfo => oauth::token_info(call),
            Route::Certs => id_tokens::certs(call),
            Route::Metadata { account } => metadata::token(call, account),
            Route::MetadataIdentity { account } => metadata::identity_token(call, account),
            Route::MetadataValue(value) => metadata::value(call, value),
        }
    }
}

async fn dispatch(
    State(shared): State<Arc<Shared>>,
    Extension(connection): Extension<ConnectionHandle>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY).await;
    let route = Route::parse(&parts.method, parts.uri.path());
    let endpoint = route.as_ref().map(Route::endpoint);
    let recorded = record(&parts, body.as_deref().unwrap_or_default(), endpoint);
    let (latency, fault) = shared.state().admit(recorded);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let Some(route) = route else {
        let message = format!("The requested URL {} was not found on this server.", parts.uri.path());
        return ApiError::rpc(StatusCode::NOT_FOUND, message).into_response();
    };
    let endpoint = route.endpoint();
    let (shaping, padding) = match fault.map(|fault| fault.apply(endpoint)) {
        None => (None, 0),
        Some(Applied::Shape(shaping)) => (Some(shaping), 0),
        Some(Applied::Pad(padding)) => (None, padding),
        Some(Applied::Respond(response)) => return finish(&shared, endpoint, response),
        Some(Applied::Drop) => {
            connection.drop_connection();
            // Never reaches the client: writing it fails and hyper closes the connection.
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let Ok(body) = body else {
        let error = ApiError::invalid_argument("The request body could not be read.");
        return finish(&shared, endpoint, error.into_response());
    };
    let call = Call {
        shared: &shared,
        endpoint,
        headers: &parts.headers,
        query: parts.uri.query().unwrap_or_default(),
        body: &body,
        shaping,
    };
    let response = route.handle(&call).unwrap_or_else(IntoResponse::into_response);
    let response = if padding > 0 {
        faults::pad(response, padding).await
    } else {
        response
    };
    finish(&shared, endpoint, response)
}

/// Matches `path` against a template in the style of Google's HTTP rules, where `*` stands for
/// one non-empty path segment (possibly followed by a literal suffix such as `:method`), and
/// returns what the stars matched.
fn captures<const N: usize>(path: &str, template: &str) -> Option<[String; N]> {
    let mut segments = path.split('/');
    let mut captured = Vec::with_capacity(N);
    for expected in template.split('/') {
        let actual = segments.next()?;
        match expected.strip_prefix('*') {
            Some(suffix) => captured.push(actual.strip_suffix(suffix).filter(|s| !s.is_empty())?.to_owned()),
            None if expected == actual => {}
            None => return None,
        }
    }
    if segments.next().is_some() {
        return None;
    }
    captured.try_into().ok()
}

/// Headers every answer of an endpoint carries, errors and faults included.
fn finish(shared: &Shared, endpoint: Endpoint, mut response: Response) -> Response {
    // By the emulator's clock, which a test may set off the real one; hyper keeps a Date it finds.
    let date = wire::http_date(shared.state().now());
    if let Ok(date) = HeaderValue::try_from(date) {
        response.headers_mut().insert(header::DATE, date);
    }
    if matches!(
        endpoint,
        Endpoint::Metadata | Endpoint::MetadataIdentity | Endpoint::MetadataValue
    ) {
        // Clients check this to know they reached a real metadata server.
        let flavor = HeaderName::from_static("metadata-flavor");
        response
            .headers_mut()
            .insert(flavor, HeaderValue::from_static("Google"));
    }
    response
}

fn record(parts: &Parts, body: &[u8], endpoint: Option<Endpoint>) -> RecordedRequest {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    RecordedRequest {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.to_string()),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| (name.to_string(), text(value.as_bytes())))
            .collect(),
        body: text(body),
        endpoint,
        received_at: std::time::Instant::now(),
    }
}

/// A connection that fails every write once dropped, so hyper closes it without answering: how
/// the emulator drops a connection (see [`Fault::DropConnection`](super::Fault::DropConnection)).
struct DroppableStream<S> {
    inner: S,
    dropped: Arc<AtomicBool>,
}

/// Handed to the handler (as a request extension) to drop its own connection.
#[derive(Clone)]
struct ConnectionHandle(Arc<AtomicBool>);

impl ConnectionHandle {
    fn drop_connection(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl<S> DroppableStream<S> {
    fn new(inner: S) -> Self {
        DroppableStream {
            inner,
            dropped: Arc::default(),
        }
    }

    fn handle(&self) -> ConnectionHandle {
        ConnectionHandle(Arc::clone(&self.dropped))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DroppableStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DroppableStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.dropped.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_match_whole_segments_and_suffixes() {
        let iam = "/v1/projects/-/serviceAccounts/sa@p.iam.gserviceaccount.com:generateAccessToken";
        assert_eq!(
            captures(iam, GENERATE_ACCESS_TOKEN),
            Some(["-".to_owned(), "sa@p.iam.gserviceaccount.com".to_owned()])
        );
        for miss in [
            "/v1/projects/-/serviceAccounts/:generateAccessToken",
            "/v1/projects/-/serviceAccounts/sa:signJwt",
            "/v1/projects/-/serviceAccounts/sa:generateAccessToken/extra",
            "/v1/projects/-/serviceAccounts",
        ] {
            assert_eq!(captures::<2>(miss, GENERATE_ACCESS_TOKEN), None, "{miss}");
        }
    }

    #[test]
    fn routes_need_the_right_method() {
        let fetch = "/v1/projects/p/locations/l/accountConnectors/c/users:fetchAccessToken";
        let Some(Route::FetchAccessToken { connector }) = Route::parse(&Method::POST, fetch) else {
            panic!("not routed");
        };
        assert_eq!(connector, "projects/p/locations/l/accountConnectors/c");
        assert!(Route::parse(&Method::GET, fetch).is_none());
        assert!(Route::parse(&Method::GET, "/v1/token").is_none());
        assert!(Route::parse(&Method::POST, "/oauth2/v3/certs").is_none());
    }

    #[test]
    fn repository_token_routes_name_the_link_and_the_access() {
        let link = "projects/p/locations/l/connections/c/gitRepositoryLinks/r";
        for (method, write) in [("fetchReadToken", false), ("fetchReadWriteToken", true)] {
            let path = format!("/v1/{link}:{method}");
            let Some(Route::FetchRepositoryToken {
                link: routed,
                write: routed_write,
            }) = Route::parse(&Method::POST, &path)
            else {
                panic!("{path} not routed");
            };
            assert_eq!((routed.as_str(), routed_write), (link, write));
        }
        let other_method = format!("/v1/{link}:fetchGitRefs");
        assert!(Route::parse(&Method::POST, &other_method).is_none());
        let identity = "/computeMetadata/v1/instance/service-accounts/default/identity";
        assert!(matches!(
            Route::parse(&Method::GET, identity),
            Some(Route::MetadataIdentity { account }) if account == "default"
        ));
    }
}
