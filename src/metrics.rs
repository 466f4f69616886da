//! Prometheus metrics. Label values are bounded: object names, flow and API names, outcome
//! reasons, HTTP status classes; never token data or free-form messages.

use std::{sync::atomic::AtomicU64, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::google::Api;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    flow: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GoogleCallLabels {
    endpoint: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    reason: &'static str,
}

type TimestampGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    token_expiry: Family<ObjectLabels, TimestampGauge>,
    next_refresh: Family<ObjectLabels, TimestampGauge>,
    failed_attempts: Family<ObjectLabels, Gauge>,
    leader: Gauge,
    refresh_attempts: Family<AttemptLabels, Counter>,
    google_latency: Family<GoogleCallLabels, Histogram>,
    rate_limit_wait: Family<EndpointLabels, Histogram>,
    throttled: Family<EndpointLabels, Counter>,
    namespace_throttled: Family<LimitLabels, Counter>,
    reconcile_duration: Histogram,
    reconcile_errors: Family<ErrorLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gcp_token_operator");
        let token_expiry = Family::<ObjectLabels, TimestampGauge>::default();
        registry.register(
            "token_expiration_timestamp_seconds",
            "Expiry of the token held in each TokenRequest's Secret (Unix seconds)",
            token_expiry.clone(),
        );
        let next_refresh = Family::<ObjectLabels, TimestampGauge>::default();
        registry.register(
            "next_refresh_timestamp_seconds",
            "When each TokenRequest's token is next refreshed or retried (Unix seconds)",
            next_refresh.clone(),
        );
        let failed_attempts = Family::<ObjectLabels, Gauge>::default();
        registry.register(
            "failed_attempts",
            "Consecutive failed attempts to obtain each TokenRequest's token (0 after a success)",
            failed_attempts.clone(),
        );
        // Always present, so that "no replica reconciles" is 0 everywhere rather than no series.
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica reconciles (holds the Lease, or leader election is off), else 0",
            leader.clone(),
        );
        let refresh_attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "refresh_attempts",
            "Token refresh attempts by flow and outcome",
            refresh_attempts.clone(),
        );
        let google_latency =
            Family::<GoogleCallLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "google_request_duration_seconds",
            "Latency of calls to Google by endpoint and HTTP status class",
            google_latency.clone(),
        );
        let rate_limit_wait =
            Family::<EndpointLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "google_rate_limit_wait_seconds",
            "Time calls to Google waited for the endpoint's rate limit or pushback",
            rate_limit_wait.clone(),
        );
        let throttled = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "google_throttled",
            "Calls to Google held back for later by the endpoint's rate limit or pushback",
            throttled.clone(),
        );
        // No namespace label: a storm of namespaces would be a storm of series.
        let namespace_throttled = Family::<LimitLabels, Counter>::default();
        registry.register(
            "namespace_throttled",
            "Mints held back for later by their namespace's fair share, by limit (rate, in_flight)",
            namespace_throttled.clone(),
        );
        let reconcile_duration = latency_histogram();
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciles",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that ended in a failure, by reason",
            reconcile_errors.clone(),
        );
        Self {
            registry,
            token_expiry,
            next_refresh,
            failed_attempts,
            leader,
            refresh_attempts,
            google_latency,
            rate_limit_wait,
            throttled,
            namespace_throttled,
            reconcile_duration,
            reconcile_errors,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// A call waited `waited` for its endpoint's limit, or (`None`) was held back for later.
    pub fn observe_rate_limit(&self, api: Api, waited: Option<Duration>) {
        let labels = EndpointLabels { endpoint: api.as_str() };
        match waited {
            Some(waited) => self
                .rate_limit_wait
                .get_or_create(&labels)
                .observe(waited.as_secs_f64()),
            None => {
                self.throttled.get_or_create(&labels).inc();
            }
        }
    }

    pub fn count_namespace_throttled(&self, limit: &'static str) {
        self.namespace_throttled.get_or_create(&LimitLabels { limit }).inc();
    }

    pub fn observe_google_call(&self, api: Api, status_class: &'static str, elapsed: Duration) {
        let labels = GoogleCallLabels {
            endpoint: api.as_str(),
            status_class,
        };
        self.google_latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn count_attempt(&self, flow: &'static str, outcome: &'static str) {
        self.refresh_attempts
            .get_or_create(&AttemptLabels { flow, outcome })
            .inc();
    }

    pub fn observe_reconcile(&self, elapsed: Duration) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
    }

    pub fn count_error(&self, reason: &'static str) {
        self.reconcile_errors.get_or_create(&ErrorLabels { reason }).inc();
    }

    pub fn set_schedule(&self, object: &ObjectLabels, expires_at: Option<i64>, next_refresh: i64) {
        match expires_at {
            Some(t) => {
                self.token_expiry.get_or_create(object).set(t as f64);
            }
            None => {
                self.token_expiry.remove(object);
            }
        }
        self.next_refresh.get_or_create(object).set(next_refresh as f64);
    }

    pub fn set_failed_attempts(&self, object: &ObjectLabels, attempts: u32) {
        self.failed_attempts.get_or_create(object).set(attempts.into());
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(leading.into());
    }

    /// Drops the series of a deleted TokenRequest so label cardinality follows the live objects.
    pub fn forget(&self, object: &ObjectLabels) {
        self.token_expiry.remove(object);
        self.next_refresh.remove(object);
        self.failed_attempts.remove(object);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_holds_the_documented_series() {
        let m = Metrics::default();
        let obj = ObjectLabels {
            namespace: "ns".into(),
            name: "tr".into(),
        };
        m.set_schedule(&obj, Some(1_800_000_000), 1_799_999_000);
        m.count_attempt("sts", "success");
        m.observe_google_call(Api::Sts, "2xx", Duration::from_millis(20));
        m.observe_reconcile(Duration::from_millis(3));
        m.count_error("PermissionDenied");
        m.count_namespace_throttled("in_flight");
        m.observe_rate_limit(Api::Sts, None);
        m.set_failed_attempts(&obj, 3);
        let text = m.encode();
        for needle in [
            r#"gcp_token_operator_token_expiration_timestamp_seconds{namespace="ns",name="tr"} 1800000000.0"#,
            r#"gcp_token_operator_next_refresh_timestamp_seconds{namespace="ns",name="tr"} 1799999000.0"#,
            r#"gcp_token_operator_refresh_attempts_total{flow="sts",outcome="success"} 1"#,
            r#"gcp_token_operator_google_request_duration_seconds_count{endpoint="sts",status_class="2xx"} 1"#,
            "gcp_token_operator_reconcile_duration_seconds_count 1",
            r#"gcp_token_operator_reconcile_errors_total{reason="PermissionDenied"} 1"#,
            r#"gcp_token_operator_namespace_throttled_total{limit="in_flight"} 1"#,
            r#"gcp_token_operator_google_throttled_total{endpoint="sts"} 1"#,
            r#"gcp_token_operator_failed_attempts{namespace="ns",name="tr"} 3"#,
            "gcp_token_operator_leader 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        m.forget(&obj);
        assert!(!m.encode().contains(r#"name="tr""#));
    }

    #[test]
    fn failed_attempts_follow_the_status_and_leader_follows_the_lease() {
        let m = Metrics::default();
        let obj = ObjectLabels {
            namespace: "ns".into(),
            name: "tr".into(),
        };
        let failed = r#"gcp_token_operator_failed_attempts{namespace="ns",name="tr"} "#;
        m.set_failed_attempts(&obj, 2);
        assert!(m.encode().contains(&format!("{failed}2\n")));
        m.set_failed_attempts(&obj, 0);
        assert!(m.encode().contains(&format!("{failed}0\n")));
        m.set_leader(true);
        assert!(m.encode().contains("gcp_token_operator_leader 1\n"));
        m.set_leader(false);
        assert!(m.encode().contains("gcp_token_operator_leader 0\n"));
    }
}
