//! Scripted faults: what each one does to an answer.

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
    /// Developer Connect only: `200 OK` with `exchangeError` set and an empty token.
    ExchangeError { code: String, description: String },
    /// Developer Connect only: `200 OK` with a token but `expirationTime: ""`.
    EmptyExpiration,
    /// `200 OK` with an empty token field (not at `tokeninfo`, which returns no token).
    EmptyToken,
}

/// What a fault does to the call it hits.
pub(super) enum Applied {
    /// Answer with this instead of running the handler.
    Respond(Response),
    /// Close the connection without answering.
    Drop,
    /// Run the handler, which alters its success body accordingly.
    Shape(Shaping),
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

impl Fault {
    pub(super) fn applies_to(&self, endpoint: Endpoint) -> bool {
        match self {
            Fault::Status { .. } | Fault::MalformedJson | Fault::DropConnection => true,
            Fault::ExchangeError { .. } | Fault::EmptyExpiration => endpoint == Endpoint::FetchAccessToken,
            Fault::EmptyToken => endpoint != Endpoint::TokenInfo,
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
            Fault::ExchangeError { code, description } => Applied::Shape(Shaping::ExchangeError { code, description }),
            Fault::EmptyExpiration => Applied::Shape(Shaping::EmptyExpiration),
            Fault::EmptyToken => Applied::Shape(Shaping::EmptyToken),
        }
    }
}
