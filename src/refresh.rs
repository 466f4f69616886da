//! When to refresh a token and how long to wait after a failure. Pure functions of time.

use std::time::Duration;

use k8s_openapi::jiff::{RoundMode, SignedDuration, Timestamp, TimestampRound, Unit};
use sha2::{Digest, Sha256};

use crate::validation::{RefreshPolicy, RenewBefore};

/// The shortest requeue: a delay is never zero or negative.
pub const MIN_DELAY: Duration = Duration::from_secs(1);
/// The longest requeue: a reconcile only recomputes, so waking early is harmless, while a far-off
/// time (an absurd answer, a saturated sum) must not overflow a timer.
pub const MAX_DELAY: Duration = Duration::from_secs(24 * 3600);
/// The longest Retry-After honoured: the longest backoff of any class.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30 * 60);
/// Upper bound of the per-object jitter; the actual bound is also limited to 5% of the lifetime.
const MAX_JITTER: Duration = Duration::from_secs(60);

/// How a failed attempt should be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// May succeed on its own soon: network errors, 408, 429, 5xx, a source that is not ready yet.
    Transient,
    /// Needs a change somewhere (permissions, a resource name): retried, but slowly.
    Permanent,
}

impl ErrorClass {
    fn backoff_base(self) -> Duration {
        match self {
            Self::Transient => Duration::from_secs(1),
            Self::Permanent => Duration::from_secs(30),
        }
    }

    fn backoff_cap(self) -> Duration {
        match self {
            Self::Transient => Duration::from_secs(5 * 60),
            Self::Permanent => Duration::from_secs(30 * 60),
        }
    }
}

/// When a token issued at `issued_at` and expiring at `expires_at` should be refreshed:
/// `expires_at - renewBefore - jitter`, never before `issued_at`. The jitter is deterministic per
/// `object_key` so that a restart computes the same point and objects created together spread out.
pub fn refresh_point(
    issued_at: Timestamp,
    expires_at: Timestamp,
    policy: &RefreshPolicy,
    object_key: &str,
) -> Timestamp {
    let lifetime = expires_at.duration_since(issued_at).max(SignedDuration::ZERO);
    let lifetime = Duration::try_from(lifetime).unwrap_or_default();
    let renew_before = match policy.renew_before {
        RenewBefore::Percentage(pct) => lifetime.mul_f64(f64::from(pct) / 100.0),
        RenewBefore::Absolute(d) => d,
    };
    let jitter_bound = (lifetime / 20).min(MAX_JITTER);
    let jitter = jitter_bound.mul_f64(unit_hash(object_key));
    // At least a tenth of the lifetime is used: a renewBefore longer than the tokens Google issues
    // would otherwise refresh every token the moment it arrives, over and over.
    let before = renew_before.saturating_add(jitter).min(lifetime.mul_f64(0.9));
    whole_second(expires_at.checked_sub(before).unwrap_or(issued_at).max(issued_at))
}

/// When a refresh that was already overdue when the operator started (`started_at`, e.g. after
/// downtime or a failover) happens: spread over `window` by a per-object offset so they are not
/// all fired together, yet never later than halfway from `started_at` to expiry. Any other
/// refresh point is returned as is.
pub fn catch_up_point(
    refresh_at: Timestamp,
    expires_at: Timestamp,
    started_at: Timestamp,
    window: Duration,
    object_key: &str,
) -> Timestamp {
    if refresh_at >= started_at {
        return refresh_at;
    }
    let remaining = Duration::try_from(expires_at.duration_since(started_at)).unwrap_or_default();
    let spread = window.min(remaining / 2);
    // Salted: the refresh jitter already uses the plain key, and the two should not correlate.
    let offset = spread.mul_f64(unit_hash(&format!("{object_key}#catch-up")));
    whole_second(started_at.checked_add(offset).unwrap_or(started_at)).max(refresh_at)
}

/// The expiry to assume when the API returned none. Saturates: an overflow must not read as
/// "expired at once" (validation bounds the lifetime anyway).
pub fn assumed_expiry(issued_at: Timestamp, policy: &RefreshPolicy) -> Timestamp {
    later(issued_at, policy.lifetime_when_unknown)
}

/// `at + delay`, saturating at the latest representable time.
pub fn later(at: Timestamp, delay: Duration) -> Timestamp {
    at.checked_add(delay).unwrap_or(Timestamp::MAX)
}

/// The delay until `at`, never below `MIN_DELAY` nor above `MAX_DELAY`.
pub fn delay_until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now))
        .unwrap_or_default()
        .clamp(MIN_DELAY, MAX_DELAY)
}

/// Delay before retry number `attempt` (1 = first retry after the first failure): exponential
/// backoff with ±20% jitter (`random` in [0, 1)); while a still-valid token is held (`valid_until`),
/// short enough that several attempts fit before expiry; and never shorter than `Retry-After`.
pub fn retry_delay(
    attempt: u32,
    class: ErrorClass,
    retry_after: Option<Duration>,
    now: Timestamp,
    valid_until: Option<Timestamp>,
    random: f64,
) -> Duration {
    let exp = class
        .backoff_base()
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let random = if random.is_finite() {
        random.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let backoff = exp.min(class.backoff_cap()).mul_f64(0.8 + 0.4 * random);
    let mut delay = backoff;
    if let Some(until) = valid_until {
        let remaining = Duration::try_from(until.duration_since(now)).unwrap_or_default();
        if remaining > Duration::ZERO {
            delay = delay.min(remaining / 2);
        }
    }
    // The server's Retry-After wins even near expiry: calling earlier only earns another refusal.
    // It is capped at the longest backoff: an absurd value must not park the object for years.
    let retry_after = retry_after.unwrap_or_default().min(MAX_RETRY_AFTER);
    delay.max(retry_after).max(MIN_DELAY)
}

/// `at`, rounded down to a whole second. Every time the operator computes goes through this (or
/// `next_whole_second`): the apiserver stores times to the second, and a value with a fraction
/// would never compare equal to what was stored, so an unchanged status would be written again.
pub fn whole_second(at: Timestamp) -> Timestamp {
    Timestamp::from_second(at.as_second()).unwrap_or(at)
}

/// `at`, rounded up to a whole second: the status stores times to the second, and a retry time
/// rounded down would let a reconcile retry before the time it promised (e.g. before Retry-After).
pub fn next_whole_second(at: Timestamp) -> Timestamp {
    let rounding = TimestampRound::new().smallest(Unit::Second).mode(RoundMode::Ceil);
    at.round(rounding).unwrap_or(at)
}

/// A number in [0, 1) derived from `key`, stable across processes.
fn unit_hash(key: &str) -> f64 {
    let digest = Sha256::digest(key.as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (n >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn pct(p: u8) -> RefreshPolicy {
        RefreshPolicy {
            renew_before: RenewBefore::Percentage(p),
            lifetime_when_unknown: Duration::from_secs(900),
        }
    }

    #[test]
    fn overdue_refreshes_at_start_are_spread() {
        let window = Duration::from_secs(30);
        let started = ts(1000);
        // Not overdue at start: untouched.
        assert_eq!(catch_up_point(ts(1005), ts(2000), started, window, "ns/a"), ts(1005));
        let points: Vec<Timestamp> = (0..200)
            .map(|i| catch_up_point(ts(900), ts(2000), started, window, &format!("ns/tr-{i}")))
            .collect();
        assert!(points.iter().all(|p| *p >= started && *p <= ts(1030)));
        let distinct: std::collections::BTreeSet<_> = points.iter().collect();
        assert!(
            distinct.len() >= 25,
            "spread over the window's seconds: {}",
            distinct.len()
        );
        // Stable: a restart computes the same point.
        assert_eq!(points[7], catch_up_point(ts(900), ts(2000), started, window, "ns/tr-7"));
        // Close to expiry the spread shrinks to half the time left.
        for i in 0..50 {
            let p = catch_up_point(ts(900), ts(1010), started, window, &format!("ns/tr-{i}"));
            assert!(p >= started && p <= ts(1005), "{p}");
        }
        // Already expired: now.
        assert_eq!(catch_up_point(ts(900), ts(990), started, window, "ns/a"), started);
    }

    #[test]
    fn percentage_of_the_returned_lifetime() {
        // 1h token, 33% before expiry = 1188 s, jitter at most 5% of the lifetime capped at 60 s.
        let at = refresh_point(ts(0), ts(3600), &pct(33), "ns/a");
        let before = ts(3600).duration_since(at).as_secs();
        assert!(
            (1188..=1188 + 60).contains(&before),
            "refreshes {before}s before expiry"
        );
    }

    #[test]
    fn absolute_renew_before() {
        let policy = RefreshPolicy {
            renew_before: RenewBefore::Absolute(Duration::from_secs(600)),
            ..pct(33)
        };
        let at = refresh_point(ts(0), ts(3600), &policy, "ns/a");
        let before = ts(3600).duration_since(at).as_secs();
        assert!((600..=660).contains(&before), "{before}");
    }

    #[test]
    fn jitter_is_deterministic_and_spreads_objects() {
        let a1 = refresh_point(ts(0), ts(3600), &pct(33), "ns/a");
        let a2 = refresh_point(ts(0), ts(3600), &pct(33), "ns/a");
        assert_eq!(a1, a2);
        let points: std::collections::BTreeSet<_> = (0..50)
            .map(|i| refresh_point(ts(0), ts(3600), &pct(33), &format!("ns/tr-{i}")))
            .collect();
        // Whole seconds within a 60 s window: 50 objects share some, but spread over most of it.
        assert!(
            points.len() > 25,
            "only {} distinct refresh points for 50 objects",
            points.len()
        );
        let spread = points
            .last()
            .unwrap()
            .duration_since(*points.first().unwrap())
            .as_secs();
        assert!(spread >= 45, "refresh points spread over {spread}s only");
    }

    #[test]
    fn renew_before_longer_than_lifetime_still_uses_a_tenth_of_it() {
        let policy = RefreshPolicy {
            renew_before: RenewBefore::Absolute(Duration::from_secs(7200)),
            ..pct(33)
        };
        assert_eq!(refresh_point(ts(0), ts(3600), &policy, "k"), ts(360));
        // An expiry before the issue time (clock skew) cannot move the refresh point backwards.
        assert_eq!(refresh_point(ts(10), ts(0), &pct(33), "k"), ts(10));
    }

    #[test]
    fn short_tokens_keep_short_jitter() {
        let at = refresh_point(ts(0), ts(20), &pct(33), "k");
        let before = ts(20).duration_since(at).as_secs_f64();
        // 33% of 20 s, up to 1 s of jitter, and up to 1 s more from rounding down to a second.
        assert!((6.6..=8.6).contains(&before), "{before}");
    }

    #[test]
    fn refresh_points_are_whole_seconds() {
        let issued: Timestamp = "2026-01-01T00:00:00.7Z".parse().unwrap();
        let at = refresh_point(issued, ts(3600), &pct(33), "k");
        assert_eq!(at.subsec_nanosecond(), 0);
        assert_eq!(
            whole_second("2026-01-01T00:00:04.9Z".parse().unwrap()),
            "2026-01-01T00:00:04Z".parse().unwrap()
        );
    }

    #[test]
    fn absurd_durations_saturate_instead_of_panicking() {
        let policy = RefreshPolicy {
            renew_before: RenewBefore::Absolute(Duration::MAX),
            lifetime_when_unknown: Duration::MAX,
        };
        // The panic that took the operator down for every tenant: now a tenth of the lifetime.
        assert_eq!(refresh_point(ts(0), ts(3600), &policy, "k"), ts(360));
        assert_eq!(assumed_expiry(ts(0), &policy), Timestamp::MAX);
        // A Retry-After too large for any clock waits the longest backoff, never "now".
        let delay = retry_delay(1, ErrorClass::Transient, Some(Duration::MAX), ts(0), None, 0.5);
        assert_eq!(delay, MAX_RETRY_AFTER);
        assert!(later(ts(0), delay) >= ts(1800));
        assert_eq!(delay_until(ts(0), Timestamp::MAX), MAX_DELAY);
        assert_eq!(
            retry_delay(1, ErrorClass::Transient, None, ts(0), None, f64::NAN),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn retry_times_round_up() {
        let at: Timestamp = "2026-01-01T00:00:04.1Z".parse().unwrap();
        assert_eq!(next_whole_second(at), "2026-01-01T00:00:05Z".parse().unwrap());
        assert_eq!(next_whole_second(ts(4)), ts(4));
    }

    #[test]
    fn delay_is_never_zero() {
        assert_eq!(delay_until(ts(10), ts(0)), MIN_DELAY);
        assert_eq!(delay_until(ts(0), ts(0)), MIN_DELAY);
        assert_eq!(delay_until(ts(0), ts(30)), Duration::from_secs(30));
    }

    #[test]
    fn backoff_grows_and_caps() {
        let d = |attempt, class| retry_delay(attempt, class, None, ts(0), None, 0.5);
        assert_eq!(d(1, ErrorClass::Transient), Duration::from_secs(1));
        assert_eq!(d(4, ErrorClass::Transient), Duration::from_secs(8));
        assert_eq!(d(30, ErrorClass::Transient), Duration::from_secs(300));
        assert_eq!(d(1, ErrorClass::Permanent), Duration::from_secs(30));
        assert_eq!(d(30, ErrorClass::Permanent), Duration::from_secs(1800));
        let low = retry_delay(4, ErrorClass::Transient, None, ts(0), None, 0.0);
        let high = retry_delay(4, ErrorClass::Transient, None, ts(0), None, 0.999);
        assert!(low < high && low >= Duration::from_millis(6400) && high <= Duration::from_millis(9600));
    }

    #[test]
    fn retry_after_is_a_floor_and_expiry_a_ceiling() {
        let d = retry_delay(1, ErrorClass::Transient, Some(Duration::from_secs(7)), ts(0), None, 0.5);
        assert_eq!(d, Duration::from_secs(7));
        // A permanent error with a token valid for 40 more seconds retries within 20 s.
        let d = retry_delay(1, ErrorClass::Permanent, None, ts(0), Some(ts(40)), 0.5);
        assert_eq!(d, Duration::from_secs(20));
        let d = retry_delay(
            1,
            ErrorClass::Transient,
            Some(Duration::from_secs(7)),
            ts(0),
            Some(ts(4)),
            0.5,
        );
        assert_eq!(d, Duration::from_secs(7));
        // Already expired: the ceiling no longer applies, the floor still does.
        let d = retry_delay(1, ErrorClass::Transient, None, ts(50), Some(ts(40)), 0.0);
        assert_eq!(d, Duration::from_millis(800).max(MIN_DELAY));
    }
}
