//! The apiserver goes away and comes back: the operator keeps running, re-establishes its watches,
//! catches up, and no token in a Secret expires because of it. On a control plane of its own,
//! since the test restarts its apiserver.

mod support;

use std::time::{Duration, Instant};

use gcp_token_operator_testkit::{control_plane::ControlPlane, emulator::Endpoint};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use support::*;

const SA_EMAIL: &str = "restart@proj.iam.gserviceaccount.com";

#[tokio::test]
async fn operator_survives_an_apiserver_restart() {
    let control_plane = ControlPlane::start().await.expect("a control plane of our own");
    let mut env = Env::on(&control_plane, "apiserver").await;
    // 60 s tokens refreshed 45 s before expiry: the refresh falls due during the outage below.
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(60)).await;
    env.start_operator();
    let spec = json!({
        "flow": {"impersonation": {"serviceAccount": SA_EMAIL, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}},
        "source": {"secret": {"name": "caller", "key": "token"}},
        "refresh": {"renewBefore": "45s"},
    });
    env.create("tok", spec).await;
    let issued = env.wait_ready("tok").await;
    let expires = issued.status.as_ref().unwrap().expiration_time.clone().unwrap().0;

    let outage = Instant::now();
    control_plane.stop_api_server().await.expect("stopping kube-apiserver");
    tokio::time::sleep(Duration::from_secs(10)).await;
    control_plane.start_api_server().await.expect("starting kube-apiserver");
    let down = outage.elapsed();
    eprintln!("apiserver down for {down:?}");
    let refresh_due = issued.status.as_ref().unwrap().next_refresh_time.clone().unwrap().0;
    assert!(
        refresh_due < Timestamp::now(),
        "the refresh fell due while the apiserver was away"
    );

    // A new client: the old one's connections died with the apiserver.
    env.client = control_plane.client().await;
    let before = fingerprint(&issued);
    let refreshed = env
        .wait_tr("tok", "a refresh after the apiserver came back", |t| {
            fingerprint(t) != before && ready_status(t) == Some("True")
        })
        .await;
    assert!(
        Timestamp::now() < expires,
        "the first token expired before it was replaced"
    );
    let secret = env.secret("tok").await;
    assert!(
        env.google.token_info(&secret_token(&secret)).is_some(),
        "the Secret holds the new token"
    );
    assert_eq!(
        fingerprint(&refreshed),
        Some(gcp_token_operator::render::fingerprint(&secret_token(&secret)))
    );
    let minted = env.google.calls(Endpoint::GenerateAccessToken);
    assert!(minted <= 3, "{minted} tokens minted for one issue and one refresh");
    let operator = env.operator.as_ref().unwrap();
    assert_eq!(
        operator.get("/healthz").await.unwrap().0,
        200,
        "the same operator process is still serving"
    );
    env.assert_no_token_leaked().await;
}
