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
        message,
        observed_generation: generation,
        last_transition_time,
    }
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
