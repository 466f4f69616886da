//! Load the operator puts on Google: per-endpoint rate limits, pushback from one endpoint, the
//! refreshes found overdue after downtime (a restart storm), and a namespace's own mint rate, on
//! the real control plane.

mod support;

use std::time::{Duration, Instant};

use gcp_token_operator_testkit::emulator::{Endpoint, Fault};
use k8s_openapi::api::core::v1::Event;
use kube::{Api, api::ListParams};
use serde_json::json;
use support::*;

const SA_EMAIL: &str = "runner@proj.iam.gserviceaccount.com";

/// A Google service account per TokenRequest: identical calls would be made once for all.
fn service_account(n: usize) -> String {
    format!("runner-{n}@proj.iam.gserviceaccount.com")
}

fn sts_spec(n: usize) -> serde_json::Value {
    // One ServiceAccount per TokenRequest, so no two share a subject token (and a call).
    json!({
        "flow": {"sts": {"audience": AUDIENCE}},
        "source": {"serviceAccountToken": {"serviceAccountName": format!("sa-{n}")}},
    })
}

fn gaps(arrivals: &[Instant]) -> Vec<Duration> {
    arrivals.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test]
async fn each_google_endpoint_has_its_own_rate_and_pushback() {
    const EACH: usize = 6;
    let mut env = Env::new("ratelimit").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    for n in 0..EACH {
        env.google.add_service_account(&service_account(n), &["*"]);
        env.create_service_account(&format!("sa-{n}")).await;
    }
    // STS refuses its first call with 429 and Retry-After: 3.
    env.google.fail_next(
        Endpoint::Sts,
        1,
        Fault::Status {
            code: 429,
            retry_after: Some(3),
        },
    );
    env.operator = Some(env.spawn_operator(&["--google-rate-limit", "sts=2,iamcredentials=50", "--google-burst", "1"]));
    for n in 0..EACH {
        env.create(&format!("wif-{n}"), sts_spec(n)).await;
        env.create(&format!("sa-{n}"), impersonation_from_caller(&service_account(n)))
            .await;
    }
    for n in 0..EACH {
        env.wait_ready(&format!("wif-{n}")).await;
        env.wait_ready(&format!("sa-{n}")).await;
    }

    let sts = env.google.arrivals(Endpoint::Sts);
    assert_eq!(sts.len(), EACH + 1, "one refused call, then one per TokenRequest");
    let sts_gaps = gaps(&sts);
    // The 429 paused the whole endpoint, not only the TokenRequest it answered.
    assert!(
        sts_gaps[0] >= Duration::from_millis(2900),
        "next STS call {:?} after a Retry-After of 3 s",
        sts_gaps[0]
    );
    // Then 2 per second with no burst: about 500 ms apart.
    for gap in &sts_gaps[1..] {
        assert!(*gap >= Duration::from_millis(400), "STS calls {gap:?} apart at 2/s");
    }
    // IAM Credentials went on at its own pace while STS was paused.
    let iam = env.google.arrivals(Endpoint::GenerateAccessToken);
    assert_eq!(iam.len(), EACH);
    let iam_span = *iam.last().unwrap() - iam[0];
    assert!(iam_span < Duration::from_secs(2), "IAM calls took {iam_span:?}");
    assert!(
        iam.iter().any(|t| *t > sts[0] && *t < sts[1]),
        "some IAM call went out while STS was paused"
    );
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn refreshes_overdue_after_downtime_are_spread_not_fired_together() {
    const COUNT: usize = 10;
    let mut env = Env::new("storm").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(60)).await;
    env.start_operator();
    for n in 0..COUNT {
        env.google.add_service_account(&service_account(n), &["*"]);
        let mut spec = impersonation_from_caller(&service_account(n));
        // Refresh halfway: at about 30 s of a 60 s token (less up to 3 s of jitter).
        spec["refresh"] = json!({"renewBeforePercentage": 50});
        env.create(&format!("tr-{n}"), spec).await;
    }
    let mut before = Vec::new();
    for n in 0..COUNT {
        let tr = env.wait_ready(&format!("tr-{n}")).await;
        let status = tr.status.clone().unwrap();
        before.push((fingerprint(&tr).unwrap(), status.expiration_time.unwrap().0));
    }
    // The operator is down until every refresh is overdue, yet every token still valid.
    env.kill_operator();
    let latest_refresh = before.iter().map(|(_, e)| *e).max().unwrap() - Duration::from_secs(29);
    let wait = latest_refresh.duration_since(jiff_now());
    tokio::time::sleep(Duration::try_from(wait).unwrap_or_default()).await;
    let minted_before = env.google.calls(Endpoint::GenerateAccessToken);
    assert_eq!(minted_before, COUNT, "no refresh while the operator was down");

    let restarted = Instant::now();
    env.operator = Some(env.spawn_operator(&["--refresh-spread", "12s"]));
    for (n, (old, expiry)) in before.iter().enumerate() {
        let tr = env
            .wait_tr(&format!("tr-{n}"), "a refreshed token", |t| {
                fingerprint(t).is_some_and(|f| f != *old)
            })
            .await;
        assert_eq!(ready_reason(&tr), Some("Refreshed"));
        let refreshed_at = tr.status.unwrap().last_refresh_time.unwrap().0;
        assert!(refreshed_at < *expiry, "tr-{n} was refreshed before its token expired");
    }
    let refreshes: Vec<Instant> = env.google.arrivals(Endpoint::GenerateAccessToken)[COUNT..].to_vec();
    assert_eq!(refreshes.len(), COUNT, "one refresh each");
    let span = *refreshes.last().unwrap() - refreshes[0];
    assert!(span >= Duration::from_secs(5), "the refreshes took only {span:?}");
    assert!(
        *refreshes.last().unwrap() - restarted <= Duration::from_secs(16),
        "the last refresh came after the 12 s window"
    );
    let most_in_one_second = refreshes
        .iter()
        .map(|t| {
            refreshes
                .iter()
                .filter(|u| **u >= *t && **u - *t < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    // Without the spread all ten come within a second. The offsets are hashes of names with a
    // random namespace in them, so by chance up to about five can share one second.
    assert!(
        most_in_one_second <= 6,
        "{most_in_one_second} refreshes within one second"
    );
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn a_namespace_starts_no_more_mints_than_its_rate_and_reports_nothing_meanwhile() {
    const COUNT: usize = 10;
    let mut env = Env::new("ns-rate").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    for n in 0..COUNT {
        env.google.add_service_account(&service_account(n), &["*"]);
    }
    env.operator = Some(env.spawn_operator(&["--namespace-rate-limit", "2"]));
    for n in 0..COUNT {
        env.create(&format!("tr-{n}"), impersonation_from_caller(&service_account(n)))
            .await;
    }
    for n in 0..COUNT {
        env.wait_ready(&format!("tr-{n}")).await;
    }
    let calls = env.google.arrivals(Endpoint::GenerateAccessToken);
    assert_eq!(calls.len(), COUNT, "one call each: a refused mint calls nothing");
    // A burst of 2, then 2 per second: the other 8 take about 4 s.
    let span = *calls.last().unwrap() - calls[0];
    assert!(span >= Duration::from_millis(3500), "{COUNT} mints within {span:?}");
    let most_in_one_second = calls
        .iter()
        .map(|t| {
            calls
                .iter()
                .filter(|u| **u >= *t && **u - *t < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(most_in_one_second <= 4, "{most_in_one_second} mints within one second");
    // Held back, not failed: no Warning, one Issued Event each.
    let events = Api::<Event>::namespaced(env.client.clone(), &env.namespace)
        .list(&ListParams::default())
        .await
        .unwrap();
    let reasons: Vec<_> = events.items.iter().filter_map(|e| e.reason.as_deref()).collect();
    assert_eq!(reasons.iter().filter(|r| **r == "Issued").count(), COUNT, "{reasons:?}");
    assert!(
        events.items.iter().all(|e| e.type_.as_deref() == Some("Normal")),
        "{reasons:?}"
    );
    let (_, metrics) = env.operator.as_ref().unwrap().get("/metrics").await.unwrap();
    let held_back = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"gcp_token_operator_namespace_throttled_total{limit="rate"} "#))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(held_back >= 1.0, "no mint was held back by the namespace's rate");
    env.assert_no_token_leaked().await;
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
