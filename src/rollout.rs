//! Rolling restarts of the workloads that read the token only at start (`spec.rolloutRestartTargets`):
//! when to restart them, and the pod-template annotation that does it. Pure; the reconciler patches.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::{names, refresh};

/// Prefix of the pod-template annotation, one key per TokenRequest so that several TokenRequests
/// can restart one workload without overwriting each other's value.
const ANNOTATION_PREFIX: &str = "restart.gcptoken.dev/";

/// What to do about the targets now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The targets already run with this token, or nothing is to be restarted.
    Nothing,
    /// The targets were just named, or the first token just issued: workloads starting from now on
    /// read it, so only remember it.
    Remember,
    /// The token changed within the minimum interval: restart at this time.
    WaitUntil(Timestamp),
    /// The token changed: restart now.
    Restart,
}

/// `restarted_for`: the fingerprint the targets were last restarted for (or first saw);
/// `last_restart`: when they were last restarted.
pub fn next_step(
    restarted_for: Option<&str>,
    last_restart: Option<Timestamp>,
    current: &str,
    now: Timestamp,
    min_interval: Duration,
) -> Step {
    match restarted_for {
        None => Step::Remember,
        Some(fingerprint) if fingerprint == current => Step::Nothing,
        Some(_) => match last_restart.map(|t| refresh::later(t, min_interval)) {
            Some(earliest) if earliest > now => Step::WaitUntil(earliest),
            _ => Step::Restart,
        },
    }
}

/// The pod-template annotation key of the TokenRequest `name`.
pub fn annotation_key(name: &str) -> String {
    format!("{ANNOTATION_PREFIX}{}", names::fit_63(name))
}

/// The merge patch that restarts a workload for the token with `fingerprint`. Applying it again
/// changes nothing, so a retry after a partial failure restarts nothing twice.
pub fn restart_patch(token_request: &str, fingerprint: &str) -> serde_json::Value {
    serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {annotation_key(token_request): fingerprint}}}}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn restarts_follow_token_changes_at_most_once_per_interval() {
        let interval = Duration::from_secs(600);
        assert_eq!(next_step(None, None, "a", ts(0), interval), Step::Remember);
        assert_eq!(next_step(Some("a"), None, "a", ts(0), interval), Step::Nothing);
        assert_eq!(next_step(Some("a"), None, "b", ts(0), interval), Step::Restart);
        assert_eq!(
            next_step(Some("a"), Some(ts(0)), "b", ts(100), interval),
            Step::WaitUntil(ts(600))
        );
        assert_eq!(next_step(Some("a"), Some(ts(0)), "b", ts(600), interval), Step::Restart);
        assert_eq!(next_step(Some("b"), Some(ts(0)), "b", ts(100), interval), Step::Nothing);
        // An interval too long to add means "not yet", never "at once".
        assert_eq!(
            next_step(Some("a"), Some(ts(0)), "b", ts(1), Duration::MAX),
            Step::WaitUntil(Timestamp::MAX)
        );
    }

    #[test]
    fn annotation_keys_are_valid_and_distinct() {
        assert_eq!(annotation_key("registry"), "restart.gcptoken.dev/registry");
        let long_a = format!("{}a", "x".repeat(100));
        let long_b = format!("{}b", "x".repeat(100));
        for key in [annotation_key(&long_a), annotation_key(&long_b)] {
            let name = key.strip_prefix(ANNOTATION_PREFIX).unwrap();
            assert!(name.len() <= names::MAX_NAME_PART, "{name}");
            assert!(name.chars().next().unwrap().is_ascii_alphanumeric());
            assert!(name.chars().last().unwrap().is_ascii_alphanumeric());
        }
        assert_ne!(annotation_key(&long_a), annotation_key(&long_b));
        let patch = restart_patch("registry", "abc123");
        assert_eq!(
            patch["spec"]["template"]["metadata"]["annotations"]["restart.gcptoken.dev/registry"],
            "abc123"
        );
    }
}
