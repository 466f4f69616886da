//! The TokenRequest status: the Ready condition and its reasons. Pure functions.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::crd::TokenRequestStatus;

pub const READY: &str = "Ready";

/// Why Ready has the status it has. Also the Kubernetes Event reason and a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A token was issued where none was held.
    Issued,
    /// A held token was replaced by a fresh one.
    Refreshed,
    /// Refreshing failed but the held token is still valid.
    RefreshFailed,
    /// The held token expired and no fresh one could be obtained.
    Expired,
    InvalidSpec,
    /// The referenced Secret, ServiceAccount or TokenRequest is missing or not ready.
    SourceNotReady,
    PermissionDenied,
    NotFound,
    /// Google did not answer, or answered with a retryable error.
    UpstreamUnavailable,
    /// Google refused the request for another reason (bad argument, provider-side exchange error).
    UpstreamRejected,
    /// A Secret of the target name exists and is not owned by this TokenRequest.
    SecretConflict,
    /// Writing to the Kubernetes API failed.
    ApiError,
    /// Google answered with a token that cannot be used: expired or about to, claiming an
    /// implausibly long life, or too large for a Secret.
    UnusableToken,
    /// The operator met a bug while handling this TokenRequest; it is backed off, the others go on.
    InternalError,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "Issued",
            Self::Refreshed => "Refreshed",
            Self::RefreshFailed => "RefreshFailed",
            Self::Expired => "Expired",
            Self::InvalidSpec => "InvalidSpec",
            Self::SourceNotReady => "SourceNotReady",
            Self::PermissionDenied => "PermissionDenied",
            Self::NotFound => "NotFound",
            Self::UpstreamUnavailable => "UpstreamUnavailable",
            Self::UpstreamRejected => "UpstreamRejected",
            Self::SecretConflict => "SecretConflict",
            Self::ApiError => "ApiError",
            Self::UnusableToken => "UnusableToken",
            Self::InternalError => "InternalError",
        }
    }
}

/// The Ready condition, keeping `lastTransitionTime` from `previous` while the status is unchanged
/// so that re-computing an unchanged status yields an identical object (and no write).
pub fn ready_condition(
    previous: Option<&Condition>,
    ready: bool,
    reason: Reason,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: READY.into(),
        status: status.into(),
        reason: reason.as_str().into(),
        message: bounded(message),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The longest status message or Event note, in bytes: the apiserver refuses an Event whose note
/// exceeds 1 KiB, and a message that long is past reading anyway.
pub const MAX_MESSAGE: usize = 1000;

/// `text` cut to `MAX_MESSAGE` bytes on a character boundary, with an ellipsis when cut.
pub fn bounded(mut text: String) -> String {
    const ELLIPSIS: &str = "…";
    if text.len() <= MAX_MESSAGE {
        return text;
    }
    let mut end = MAX_MESSAGE - ELLIPSIS.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(ELLIPSIS);
    text
}

/// Whether writing `desired` over `current` would change anything.
pub fn status_changed(current: Option<&TokenRequestStatus>, desired: &TokenRequestStatus) -> bool {
    current != Some(desired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let first = ready_condition(None, true, Reason::Issued, "m".into(), Some(1), t0);
        assert_eq!(first.last_transition_time, Time(t0));
        let same = ready_condition(Some(&first), true, Reason::Refreshed, "m2".into(), Some(1), t1);
        assert_eq!(same.last_transition_time, Time(t0));
        assert_eq!(same.reason, "Refreshed");
        let flipped = ready_condition(Some(&same), false, Reason::Expired, "m3".into(), Some(1), t1);
        assert_eq!(flipped.last_transition_time, Time(t1));
        assert_eq!(flipped.status, "False");
    }

    #[test]
    fn messages_are_bounded_on_character_boundaries() {
        assert_eq!(bounded("short".into()), "short");
        let exact = "x".repeat(MAX_MESSAGE);
        assert_eq!(bounded(exact.clone()), exact);
        for text in ["é".repeat(2000), format!("a{}", "€".repeat(700)), "x".repeat(1 << 20)] {
            let cut = bounded(text);
            assert!(cut.len() <= MAX_MESSAGE, "{}", cut.len());
            assert!(cut.ends_with('…'));
        }
        let condition = ready_condition(
            None,
            false,
            Reason::InvalidSpec,
            "m".repeat(5000),
            None,
            Timestamp::UNIX_EPOCH,
        );
        assert!(condition.message.len() <= MAX_MESSAGE);
    }

    #[test]
    fn unchanged_status_is_detected() {
        let s = TokenRequestStatus {
            flow: Some("sts".into()),
            ..Default::default()
        };
        assert!(!status_changed(Some(&s.clone()), &s));
        assert!(status_changed(None, &s));
        let other = TokenRequestStatus {
            flow: Some("impersonation".into()),
            ..Default::default()
        };
        assert!(status_changed(Some(&s), &other));
    }
}
