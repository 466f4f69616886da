//! Credentials go only where they must: the operator binary, on the real control plane and the
//! Google emulator, follows no redirect, reads no huge answer, keeps tenant strings out of URL
//! structure, and reads absolute expiry times on Google's clock.

mod support;

use std::time::Duration;

use gcp_token_operator::google::MAX_RESPONSE_BODY;
use gcp_token_operator_testkit::emulator::{Endpoint, Fault, GoogleEmulator};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use support::*;

const SA_EMAIL: &str = "builder@proj.iam.gserviceaccount.com";
const CONNECTOR: &str = "projects/proj/locations/us-central1/accountConnectors/github";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const HOUR: Duration = Duration::from_secs(3600);

fn sts_spec() -> serde_json::Value {
    json!({
        "flow": {"sts": {"audience": AUDIENCE}},
        "source": {"serviceAccountToken": {"serviceAccountName": "default"}},
    })
}

fn message(tr: &gcp_token_operator::crd::TokenRequest) -> String {
    ready_condition(tr).map(|c| c.message.clone()).unwrap_or_default()
}

/// Seconds from now until the TokenRequest's reported expiry (negative once past).
fn secs_to_expiry(tr: &gcp_token_operator::crd::TokenRequest) -> i64 {
    let expiry = tr
        .status
        .as_ref()
        .and_then(|s| s.expiration_time.clone())
        .expect("an expiry");
    expiry.0.duration_since(Timestamp::now()).as_secs()
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_the_subject_token_goes_nowhere_else() {
    let mut env = Env::new("redirect").await;
    let elsewhere = GoogleEmulator::start().await.expect("a second listener");
    let location = format!("{}/v1/token", elsewhere.base_url());
    env.google.fail_next(Endpoint::Sts, 1, Fault::Redirect { location });
    env.start_operator();
    env.create("wif", sts_spec()).await;

    let failed = env.wait_reason("wif", "UpstreamRejected").await;
    assert_eq!(ready_status(&failed), Some("False"));
    let text = message(&failed);
    assert!(text.contains("307") && text.contains("redirect"), "{text}");
    assert!(
        !text.contains(&elsewhere.base_url()),
        "the Location is not quoted: {text}"
    );
    assert_eq!(env.google.calls(Endpoint::Sts), 1);
    assert!(elsewhere.requests().is_empty(), "the redirect was followed");

    // A redirect is permanent for the backoff (30 s); once the endpoint answers, the mint works.
    let ready = env.wait_ready("wif").await;
    assert_eq!(ready_reason(&ready), Some("Issued"));
    assert_eq!(env.google.calls(Endpoint::Sts), 2);
    assert!(elsewhere.requests().is_empty(), "the retry went elsewhere");
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn a_huge_answer_is_refused_without_being_read() {
    const PADDED_ANSWERS: usize = 3;
    let padding = 64 << 20;
    let mut env = Env::new("huge").await;
    // Valid JSON, only huge: read whole, it would even be accepted.
    env.google
        .fail_next(Endpoint::Sts, PADDED_ANSWERS, Fault::Padded { padding });
    env.start_operator();
    let operator = env.operator.as_ref().unwrap();
    operator.wait_ready(WAIT).await.unwrap();
    let before = operator.peak_rss_kib().expect("VmHWM");
    env.create("wif", sts_spec()).await;

    let failed = env.wait_reason("wif", "UpstreamUnavailable").await;
    let text = message(&failed);
    assert!(text.contains(&format!("over {MAX_RESPONSE_BODY} bytes")), "{text}");
    // Transient: retried after 1 s, 2 s, 4 s, until the endpoint answers normally again.
    let ready = env.wait_ready("wif").await;
    assert_eq!(ready_reason(&ready), Some("Issued"));
    assert_eq!(env.google.calls(Endpoint::Sts), PADDED_ANSWERS + 1);
    let operator = env.operator.as_ref().unwrap();
    let after = operator.peak_rss_kib().expect("VmHWM");
    let grown_kib = after.saturating_sub(before);
    eprintln!("operator peak RSS {before} KiB before, {after} KiB after {PADDED_ANSWERS} answers of 64 MiB");
    assert!(
        grown_kib < 16 * 1024,
        "peak RSS grew by {grown_kib} KiB for answers of {padding} bytes"
    );
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn names_that_would_leave_their_url_segment_are_invalid_specs() {
    let mut env = Env::new("urlnames").await;
    env.put_secret("caller", "token", "ya29.not-sent").await;
    env.start_operator();
    let source = json!({"secret": {"name": "caller", "key": "token"}});
    let impersonate = |account: &str| json!({"flow": {"impersonation": {"serviceAccount": account, "scopes": [CLOUD_PLATFORM]}}, "source": source});
    let invalid = [
        (
            "query",
            impersonate("x@y.z?alt=json"),
            "spec.flow.impersonation.serviceAccount",
        ),
        (
            "fragment",
            impersonate("x@y.z#"),
            "spec.flow.impersonation.serviceAccount",
        ),
        (
            "backslash",
            impersonate(r"x@y.z\..\..\anything"),
            "spec.flow.impersonation.serviceAccount",
        ),
        (
            "escaped",
            impersonate("x%40y.z"),
            "spec.flow.impersonation.serviceAccount",
        ),
        (
            "delegate",
            json!({"flow": {"impersonation": {"serviceAccount": SA_EMAIL, "scopes": [CLOUD_PLATFORM],
                                              "delegates": ["d@p.iam.gserviceaccount.com/../x"]}}, "source": source}),
            "spec.flow.impersonation.delegates",
        ),
        (
            "dotdot",
            json!({"flow": {"developerConnect": {"accountConnector": "projects/p/locations/l/accountConnectors/.."}}, "source": source}),
            "spec.flow.developerConnect.accountConnector",
        ),
        (
            "dot",
            json!({"flow": {"discoveryEngine": {"dataConnector": "projects/p/locations/./collections/c/dataConnector"}}, "source": source}),
            "spec.flow.discoveryEngine.dataConnector",
        ),
    ];
    for (name, spec, _) in &invalid {
        env.create(name, spec.clone()).await;
    }
    for (name, _, field) in &invalid {
        let tr = env.wait_reason(name, "InvalidSpec").await;
        assert_eq!(ready_status(&tr), Some("False"));
        let text = message(&tr);
        assert!(text.contains(field), "{name}: {text}");
    }
    assert_eq!(env.google.requests().len(), 0, "nothing was sent to Google");
}

#[tokio::test]
async fn iam_expiry_is_read_on_googles_clock_when_the_operators_runs_ahead() {
    let mut env = Env::new("skewiam").await;
    env.prepare_impersonation(SA_EMAIL, HOUR).await;
    // Google's clock 2 h behind the operator's: its expireTime is an hour before the operator's now.
    env.google.set_clock_offset(SignedDuration::from_hours(-2));
    env.start_operator();
    env.create(
        "sa",
        json!({"flow": {"impersonation": {"serviceAccount": SA_EMAIL, "scopes": [CLOUD_PLATFORM]}},
               "source": {"secret": {"name": "caller", "key": "token"}}}),
    )
    .await;

    let ready = env.wait_ready("sa").await;
    let left = secs_to_expiry(&ready);
    assert!(
        (3590..=3601).contains(&left),
        "the token expires in {left} s, not in about an hour"
    );
    // And it is not re-minted as if expired.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), 1);
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn developer_connect_expiry_is_read_on_googles_clock_when_the_operators_runs_behind() {
    let mut env = Env::new("skewdc").await;
    env.google.add_account_connector(CONNECTOR);
    let caller = env.caller_token().await;
    env.put_secret("caller", "token", &caller).await;
    // Google's clock 2 h ahead: its expirationTime reads 3 h from the operator's now.
    env.google.set_clock_offset(SignedDuration::from_hours(2));
    env.start_operator();
    env.create(
        "git",
        json!({"flow": {"developerConnect": {"accountConnector": CONNECTOR}},
               "source": {"secret": {"name": "caller", "key": "token"}}}),
    )
    .await;

    let ready = env.wait_ready("git").await;
    let left = secs_to_expiry(&ready);
    assert!(
        (3590..=3601).contains(&left),
        "the token expires in {left} s, not in about an hour"
    );
    env.assert_no_token_leaked().await;
}
