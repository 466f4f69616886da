//! Failures of calls to Google, and how each one is retried and reported.

use std::time::Duration;

use crate::{refresh::ErrorClass, status::Reason};

/// The Google APIs the operator calls; bounded, so usable as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    Sts,
    IamCredentials,
    DeveloperConnect,
    DiscoveryEngine,
    /// The OAuth token endpoint (service account keys, authorized users).
    OAuth2,
    /// The metadata server (the operator's own identity).
    Metadata,
}

impl Api {
    pub const ALL: [Api; 6] = [
        Self::Sts,
        Self::IamCredentials,
        Self::DeveloperConnect,
        Self::DiscoveryEngine,
        Self::OAuth2,
        Self::Metadata,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sts => "sts",
            Self::IamCredentials => "iamcredentials",
            Self::DeveloperConnect => "developerconnect",
            Self::DiscoveryEngine => "discoveryengine",
            Self::OAuth2 => "oauth2",
            Self::Metadata => "metadata",
        }
    }
}

impl std::str::FromStr for Api {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|api| api.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|a| a.as_str()).collect();
            format!("unknown Google endpoint {s:?}; one of {}", names.join(", "))
        })
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed call. Messages carry what Google said, never a token: request bodies and response
/// bodies are not quoted, only the error fields Google documents.
#[derive(Debug, thiserror::Error)]
pub enum GoogleError {
    #[error("{api}: request failed: {source}")]
    Transport {
        api: Api,
        #[source]
        source: reqwest::Error,
    },
    #[error("{api}: HTTP {status} {code}: {message}")]
    Rejected {
        api: Api,
        status: u16,
        code: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{api}: unreadable response (HTTP {status}): {detail}")]
    Malformed { api: Api, status: u16, detail: String },
    /// Never followed: a redirect would carry the request's credentials (a 307/308 re-sends the
    /// body, with subject tokens, client secrets or assertions) to where the answer points.
    /// `Location` is not quoted, as it may carry anything.
    #[error(
        "{api}: answered HTTP {status}, a redirect, which is not followed: credentials go only to the configured endpoint"
    )]
    Redirected { api: Api, status: u16 },
    /// The body was not read past `limit` bytes.
    #[error("{api}: response body over {limit} bytes (HTTP {status}), not read further")]
    Oversized { api: Api, status: u16, limit: usize },
    #[error("{api}: the provider refused the token exchange: {code}: {description}")]
    ExchangeError {
        api: Api,
        code: String,
        description: String,
    },
    #[error("{api}: the response held no token")]
    EmptyToken { api: Api },
    /// Not sent: the endpoint's rate limit or pushback holds it back for `retry_after`.
    #[error("{api}: held back by the rate limit for {retry_after:?}")]
    Throttled { api: Api, retry_after: Duration },
}

/// Why the Google client cannot be built from the operator's settings.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("building the HTTP client: {source}")]
    Http {
        #[source]
        source: reqwest::Error,
    },
    /// Not quoted: the setting may hold a password in its user info.
    #[error("the {api} endpoint must be an http or https URL with a host, and without user info, query or fragment")]
    Endpoint { api: Api },
}

/// OAuth error codes Google's libraries treat as retryable.
const TRANSIENT_OAUTH_CODES: [&str; 3] = ["server_error", "temporarily_unavailable", "internal_failure"];

impl GoogleError {
    pub fn class(&self) -> ErrorClass {
        match self {
            // An oversized body is an endpoint (or a proxy in front of it) misbehaving, like a
            // malformed one: it may pass.
            Self::Transport { .. } | Self::Malformed { .. } | Self::Oversized { .. } | Self::Throttled { .. } => {
                ErrorClass::Transient
            }
            // A redirect is the endpoint's configuration: it answers the same way next time.
            Self::Redirected { .. } => ErrorClass::Permanent,
            Self::Rejected { status, code, .. } => {
                if *status == 408 || *status == 429 || *status >= 500 || TRANSIENT_OAUTH_CODES.contains(&code.as_str())
                {
                    ErrorClass::Transient
                } else {
                    ErrorClass::Permanent
                }
            }
            Self::ExchangeError { .. } | Self::EmptyToken { .. } => ErrorClass::Permanent,
        }
    }

    /// The status condition reason this failure is reported under.
    pub fn reason(&self) -> Reason {
        match self {
            _ if self.class() == ErrorClass::Transient => Reason::UpstreamUnavailable,
            Self::Rejected { status: 401 | 403, .. } => Reason::PermissionDenied,
            Self::Rejected { code, .. } if code == "invalid_grant" || code == "unauthorized_client" => {
                Reason::PermissionDenied
            }
            Self::Rejected { status: 404, .. } => Reason::NotFound,
            Self::Rejected { code, .. } if code == "invalid_target" => Reason::NotFound,
            _ => Reason::UpstreamRejected,
        }
    }

    /// Google did not accept the caller's credential: a kept copy of it must not be reused.
    pub fn is_unauthenticated(&self) -> bool {
        matches!(self, Self::Rejected { status: 401, .. })
    }

    /// The endpoint itself asked for fewer requests (429, or any answer naming a `Retry-After`).
    pub fn is_push_back(&self) -> bool {
        matches!(
            self,
            Self::Rejected { status: 429, .. }
                | Self::Rejected {
                    retry_after: Some(_),
                    ..
                }
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Rejected { retry_after, .. } => *retry_after,
            Self::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Never sent, held back by the operator's own limit: not a failure to report, only a wait.
    pub fn throttled(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(status: u16, code: &str) -> GoogleError {
        GoogleError::Rejected {
            api: Api::Sts,
            status,
            code: code.into(),
            message: "m".into(),
            retry_after: None,
        }
    }

    #[test]
    fn classification() {
        for (status, code, class, reason) in [
            (
                429,
                "RESOURCE_EXHAUSTED",
                ErrorClass::Transient,
                Reason::UpstreamUnavailable,
            ),
            (503, "UNAVAILABLE", ErrorClass::Transient, Reason::UpstreamUnavailable),
            (408, "", ErrorClass::Transient, Reason::UpstreamUnavailable),
            (
                400,
                "temporarily_unavailable",
                ErrorClass::Transient,
                Reason::UpstreamUnavailable,
            ),
            (
                403,
                "PERMISSION_DENIED",
                ErrorClass::Permanent,
                Reason::PermissionDenied,
            ),
            (401, "UNAUTHENTICATED", ErrorClass::Permanent, Reason::PermissionDenied),
            (400, "invalid_grant", ErrorClass::Permanent, Reason::PermissionDenied),
            (404, "NOT_FOUND", ErrorClass::Permanent, Reason::NotFound),
            (400, "invalid_target", ErrorClass::Permanent, Reason::NotFound),
            (400, "invalid_request", ErrorClass::Permanent, Reason::UpstreamRejected),
        ] {
            let e = rejected(status, code);
            assert_eq!((e.class(), e.reason()), (class, reason), "{status} {code}");
        }
        let e = GoogleError::ExchangeError {
            api: Api::DeveloperConnect,
            code: "invalid_grant".into(),
            description: "d".into(),
        };
        assert_eq!(
            (e.class(), e.reason()),
            (ErrorClass::Permanent, Reason::UpstreamRejected)
        );
        let e = GoogleError::EmptyToken {
            api: Api::DiscoveryEngine,
        };
        assert_eq!(e.class(), ErrorClass::Permanent);
        let e = GoogleError::Malformed {
            api: Api::Sts,
            status: 200,
            detail: "d".into(),
        };
        assert_eq!(e.class(), ErrorClass::Transient);
        let e = GoogleError::Redirected {
            api: Api::Sts,
            status: 307,
        };
        assert_eq!(
            (e.class(), e.reason()),
            (ErrorClass::Permanent, Reason::UpstreamRejected)
        );
        let e = GoogleError::Oversized {
            api: Api::Sts,
            status: 200,
            limit: 65536,
        };
        assert_eq!(
            (e.class(), e.reason()),
            (ErrorClass::Transient, Reason::UpstreamUnavailable)
        );
    }
}
