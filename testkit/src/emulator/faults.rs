//! Scripted faults: what each one does to an answer.

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Endpoint;
use super::errors::ApiError;

/// A failure to inject with [`super::GoogleEmulator::fail_next`].
#[derive(Clone, Debug)]
pub enum Fault {
    /// An error with this HTTP status in the endpoint's own error shape (OAuth style for STS and
    /// `/token`, plain text for the metadata server, `google.rpc.Status` elsewhere), with a
    /// `Retry-After` header (seconds) if given.
    Status { code: u16, retry_after: Option<u64> },
    /// `200 OK` whose body is not JSON.
    MalformedJson,
    /// The connection closes without any response.
    DropConnection,
    /// Developer Connect `fetchAccessToken` only: `200 OK` with `exchangeError` set and an empty token.
    ExchangeError { code: String, description: String },
    /// Developer Connect only (`fetchAccessToken`, `fetchReadToken`, `fetchReadWriteToken`):
    /// `200 OK` with a token but `expirationTime: ""`.
    EmptyExpiration,
    /// `200 OK` with an empty token (an empty body from the metadata server's `identity`); not at
    /// `tokeninfo`, `certs` and the metadata server's other values, which return no token.
    EmptyToken,
    /// `307 Temporary Redirect` to `location`, as a misconfigured proxy or an attacker on the
    /// path would answer: a client that follows it re-sends the request, body and all.
    Redirect { location: String },
    /// The endpoint's usual answer (a token is issued), followed by `padding` bytes of JSON
    /// whitespace, streamed without a `Content-Length`: still valid JSON, just huge.
    Padded { padding: usize },
}

/// What a fault does to the call it hits.
pub(super) enum Applied {
    /// Answer with this instead of running the handler.
    Respond(Response),
    /// Close the connection without answering.
    Drop,
    /// Run the handler, which alters its success body accordingly.
    Shape(Shaping),
    /// Run the handler, then append this many bytes of whitespace to its body.
    Pad(usize),
}

/// The faults that only alter an otherwise successful answer.
#[derive(Debug)]
pub(super) enum Shaping {
    EmptyToken,
    EmptyExpiration,
    ExchangeError { code: String, description: String },
}

impl Shaping {
    /// Whether the answer carries no token (so none is issued).
    pub(super) fn withholds_token(&self) -> bool {
        !matches!(self, Shaping::EmptyExpiration)
    }
}

/// `response` with `padding` bytes of whitespace after its body, streamed in chunks so that
/// neither side needs the whole body in memory at once.
pub(super) async fn pad(response: Response, padding: usize) -> Response {
    const CHUNK: usize = 64 * 1024;
    let (mut parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    let blanks = Bytes::from(vec![b' '; CHUNK]);
    let sizes = std::iter::repeat_n(CHUNK, padding / CHUNK).chain([padding % CHUNK].into_iter().filter(|n| *n > 0));
    let chunks = std::iter::once(body).chain(sizes.map(move |n| blanks.slice(..n)));
    let stream = futures::stream::iter(chunks.map(Ok::<_, std::convert::Infallible>));
    Response::from_parts(parts, Body::from_stream(stream))
}

impl Fault {
    pub(super) fn applies_to(&self, endpoint: Endpoint) -> bool {
        match self {
            Fault::Status { .. }
            | Fault::MalformedJson
            | Fault::DropConnection
            | Fault::Redirect { .. }
            | Fault::Padded { .. } => true,
            Fault::ExchangeError { .. } => endpoint == Endpoint::FetchAccessToken,
            Fault::EmptyExpiration => matches!(
                endpoint,
                Endpoint::FetchAccessToken | Endpoint::FetchReadToken | Endpoint::FetchReadWriteToken
            ),
            Fault::EmptyToken => !matches!(
                endpoint,
                Endpoint::TokenInfo | Endpoint::Certs | Endpoint::MetadataValue
            ),
        }
    }

    pub(super) fn apply(self, endpoint: Endpoint) -> Applied {
        match self {
            Fault::Status { code, retry_after } => {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut error = ApiError::injected(endpoint, status);
                if let Some(seconds) = retry_after {
                    error = error.with_header(header::RETRY_AFTER, HeaderValue::from(seconds));
                }
                Applied::Respond(error.into_response())
            }
            Fault::MalformedJson => {
                let body = "<html><body>Emulated malformed response</body></html>";
                Applied::Respond(([(header::CONTENT_TYPE, "application/json")], body).into_response())
            }
            Fault::DropConnection => Applied::Drop,
            Fault::Redirect { location } => {
                let response = match HeaderValue::try_from(location) {
                    Ok(location) => (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response(),
                    Err(_) => ApiError::injected(endpoint, StatusCode::INTERNAL_SERVER_ERROR).into_response(),
                };
                Applied::Respond(response)
            }
            Fault::Padded { padding } => Applied::Pad(padding),
            Fault::ExchangeError { code, description } => Applied::Shape(Shaping::ExchangeError { code, description }),
            Fault::EmptyExpiration => Applied::Shape(Shaping::EmptyExpiration),
            Fault::EmptyToken => Applied::Shape(Shaping::EmptyToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_faults_apply_only_where_the_body_has_the_field() {
        let empty_expiration = [
            Endpoint::FetchAccessToken,
            Endpoint::FetchReadToken,
            Endpoint::FetchReadWriteToken,
        ];
        for endpoint in empty_expiration {
            assert!(Fault::EmptyExpiration.applies_to(endpoint), "{endpoint:?}");
        }
        assert!(!Fault::EmptyExpiration.applies_to(Endpoint::GenerateIdToken));
        let exchange = Fault::ExchangeError {
            code: "invalid_grant".into(),
            description: String::new(),
        };
        assert!(!exchange.applies_to(Endpoint::FetchReadToken));
        for endpoint in [
            Endpoint::GenerateIdToken,
            Endpoint::MetadataIdentity,
            Endpoint::FetchReadWriteToken,
        ] {
            assert!(Fault::EmptyToken.applies_to(endpoint), "{endpoint:?}");
        }
        assert!(!Fault::EmptyToken.applies_to(Endpoint::Certs));
        assert!(!Fault::EmptyToken.applies_to(Endpoint::TokenInfo));
        assert!(!Fault::EmptyToken.applies_to(Endpoint::MetadataValue));
    }
}
