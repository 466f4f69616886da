//! Refresh on demand: the `gcptoken.dev/refresh-requested-at` annotation, handled once per
//! distinct value, on the real control plane with the operator binary and the Google emulator.

mod support;

use std::time::{Duration, Instant};

use gcp_token_operator::crd::REFRESH_REQUESTED_ANNOTATION;
use gcp_token_operator_testkit::emulator::{Endpoint, Fault};
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::*;

const SA_EMAIL: &str = "builder@proj.iam.gserviceaccount.com";

/// Sets the annotation to `value` (and a label, so that even an unchanged value is a write the
/// operator sees), as `kubectl annotate --overwrite` or a GitOps re-apply would.
async fn request(env: &Env<'_>, value: &str, touch: &str) {
    let patch = json!({"metadata": {
        "annotations": {REFRESH_REQUESTED_ANNOTATION: value},
        "labels": {"touched": touch},
    }});
    env.token_requests()
        .patch("tok", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn handled(env: &Env<'_>, value: &str) -> gcp_token_operator::crd::TokenRequest {
    env.wait_tr("tok", &format!("refresh request {value} handled"), |tr| {
        tr.status
            .as_ref()
            .and_then(|s| s.last_handled_refresh_request.as_deref())
            == Some(value)
    })
    .await
}

/// The operator running, and TokenRequest `tok` whose first mint Google refuses for good (403):
/// its retry is a permanent failure's backoff away.
async fn start_refused(env: &mut Env<'_>) {
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    env.google.fail_next(
        Endpoint::GenerateAccessToken,
        1,
        Fault::Status {
            code: 403,
            retry_after: None,
        },
    );
    env.start_operator();
    env.create("tok", impersonation_from_caller(SA_EMAIL)).await;
}

#[tokio::test]
async fn each_distinct_request_mints_once_and_a_repeated_one_nothing() {
    let mut env = Env::new("refreshreq").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    env.start_operator();
    env.create("tok", impersonation_from_caller(SA_EMAIL)).await;
    let first = env.wait_ready("tok").await;
    let mut fingerprints = vec![fingerprint(&first).unwrap()];
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), 1);

    // A new value: a new token at once, though the held one is good for an hour.
    request(&env, "2026-12-01T10:00:00Z", "1").await;
    let tr = handled(&env, "2026-12-01T10:00:00Z").await;
    assert_eq!(ready_reason(&tr), Some("Refreshed"));
    fingerprints.push(fingerprint(&tr).unwrap());
    assert_ne!(fingerprints[0], fingerprints[1]);
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), 2);

    // The same value applied again (a GitOps tool re-syncing): nothing.
    request(&env, "2026-12-01T10:00:00Z", "2").await;
    env.wait_tr("tok", "the re-apply seen", |tr| {
        tr.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("touched"))
            .map(String::as_str)
            == Some("2")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), 2);

    // Another value soon after: minted, but not before the per-object floor since the last mint.
    let last_mint = *env.google.arrivals(Endpoint::GenerateAccessToken).last().unwrap();
    request(&env, "again", "3").await;
    let tr = handled(&env, "again").await;
    let arrivals = env.google.arrivals(Endpoint::GenerateAccessToken);
    assert_eq!(arrivals.len(), 3);
    let gap = arrivals[2].duration_since(last_mint);
    assert!(gap >= Duration::from_secs(9), "minted {gap:?} after the previous mint");
    fingerprints.push(fingerprint(&tr).unwrap());
    assert_ne!(fingerprints[1], fingerprints[2]);
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn a_request_skips_the_backoff_of_failed_attempts_once() {
    let mut env = Env::new("refreshbackoff").await;
    start_refused(&mut env).await;
    let failed = env.wait_reason("tok", "PermissionDenied").await;
    let next = failed.status.as_ref().unwrap().next_refresh_time.clone().unwrap().0;
    let waits = next.duration_since(k8s_openapi::jiff::Timestamp::now());
    assert!(waits.as_secs() >= 10, "the backoff is {waits:?}");

    // The grant was fixed: asking for a refresh does not wait for the backoff (nor the floor,
    // once it has passed since the failure).
    let asked = Instant::now();
    request(&env, "fixed-iam", "1").await;
    let tr = handled(&env, "fixed-iam").await;
    assert_eq!(ready_status(&tr), Some("True"), "{:?}", ready_condition(&tr));
    assert!(
        k8s_openapi::jiff::Timestamp::now() < next,
        "handled {:?} after asking, not before the backoff's retry at {next}",
        asked.elapsed()
    );
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), 2);
    env.assert_no_token_leaked().await;
}

/// A replica that starts while a TokenRequest backs off exports its failed attempts and next
/// attempt at once (what the chart's alerts read), not only after the next attempt.
#[tokio::test]
async fn a_restarted_operator_exports_the_backoff_it_finds() {
    let mut env = Env::new("backoffmetrics").await;
    start_refused(&mut env).await;
    env.wait_reason("tok", "PermissionDenied").await;
    env.kill_operator();
    env.start_operator();
    let series = format!(
        "gcp_token_operator_failed_attempts{{namespace=\"{}\",name=\"tok\"}} 1",
        env.namespace
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Not listening yet is not an answer.
        let body = match env.operator.as_ref().unwrap().get("/metrics").await {
            Ok((_, body)) => body,
            Err(e) => format!("/metrics: {e}"),
        };
        if body.contains(&series) && body.contains("gcp_token_operator_next_refresh_timestamp_seconds{") {
            break;
        }
        assert!(Instant::now() < deadline, "no {series} after the restart:\n{body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Found in the backoff, not after another attempt.
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), 1);
    env.assert_no_token_leaked().await;
}
