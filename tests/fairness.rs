//! Fairness between namespaces, on the real control plane: one operator for all namespaces (one
//! controller, one set of reconcile slots), a namespace whose TokenRequests storm, and a bystander
//! namespace's new TokenRequest.
//!
//! One test only: its operators watch every namespace of this binary's control plane.

mod support;

use std::time::{Duration, Instant};

use gcp_token_operator_testkit::{control_plane::create_namespace, emulator::Endpoint};
use kube::api::{DeleteParams, ListParams};
use serde_json::json;
use support::*;

const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
/// TokenRequests of the storming namespace, created at once.
const STORM: usize = 200;
/// How long Google takes to answer for each of the storm's identities: below the operator's HTTP
/// timeout (30 s), so every storm mint holds its slot that long.
const HANG: Duration = Duration::from_secs(25);
/// The bystander must be Ready within this, storm or not.
const FAIR_WITHIN: Duration = Duration::from_secs(5);
const BYSTANDER: &str = "bystander@proj.iam.gserviceaccount.com";

fn storm_account(n: usize) -> String {
    format!("storm-{n}@proj.iam.gserviceaccount.com")
}

fn impersonation(service_account: &str) -> serde_json::Value {
    json!({
        "flow": {"impersonation": {"serviceAccount": service_account, "scopes": [CLOUD_PLATFORM]}},
        "source": {"secret": {"name": "caller", "key": "token"}},
    })
}

/// `storm` creates STORM TokenRequests whose Google calls hang, waits until the operator is busy
/// with them, then creates one TokenRequest in `bystander`: how long until it is Ready, if it is
/// within `limit`.
async fn bystander_under_storm(storm: &Env<'_>, bystander: &Env<'_>, limit: Duration) -> Option<Duration> {
    let hung_before = hung_calls(storm);
    for n in 0..STORM {
        storm
            .create(&format!("storm-{n}"), impersonation(&storm_account(n)))
            .await;
    }
    // The operator is busy with the storm: its first mints hang at Google.
    let busy = Instant::now();
    while hung_calls(storm) == hung_before {
        assert!(busy.elapsed() < WAIT, "no storm mint reached Google");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let created = Instant::now();
    bystander.create("bystander", impersonation(BYSTANDER)).await;
    loop {
        let tr = bystander.token_requests().get("bystander").await.unwrap();
        if ready_status(&tr) == Some("True") {
            return Some(created.elapsed());
        }
        if created.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hung_calls(env: &Env<'_>) -> usize {
    env.google
        .requests()
        .iter()
        .filter(|r| r.endpoint == Some(Endpoint::GenerateAccessToken) && r.path.contains("/storm-"))
        .count()
}

/// The most storm calls Google held at once: each is answered HANG after it arrived.
fn most_in_flight(env: &Env<'_>) -> usize {
    let arrivals: Vec<Instant> = env
        .google
        .requests()
        .iter()
        .filter(|r| r.endpoint == Some(Endpoint::GenerateAccessToken) && r.path.contains("/storm-"))
        .map(|r| r.received_at)
        .collect();
    let open_at = |t: Instant| arrivals.iter().filter(|a| **a <= t && t < **a + HANG).count();
    arrivals.iter().map(|t| open_at(*t)).max().unwrap_or(0)
}

async fn metric(env: &Env<'_>, name: &str) -> f64 {
    let (_, body) = env.operator.as_ref().unwrap().get("/metrics").await.unwrap();
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_storming_namespace_does_not_delay_another() {
    let mut env = Env::new("fair-storm").await;
    env.prepare_impersonation(BYSTANDER, Duration::from_secs(3600)).await;
    for n in 0..STORM {
        env.google.add_service_account(&storm_account(n), &["*"]);
        env.google.set_service_account_latency(&storm_account(n), HANG);
    }
    let caller = env.caller_token().await;
    let b = create_namespace(&env.client, "fair-bystander").await.unwrap();
    let bystander = env.in_namespace(&b);
    bystander.put_secret("caller", "token", &caller).await;

    // Fairness on (the defaults): with 4 slots, a namespace minting alone has at most 2 mints in
    // flight, so the bystander finds a slot, and the storm's refused mints leave the queue at once.
    env.operator = Some(env.spawn_operator_watching(&[], &[]));
    let fair = bystander_under_storm(&env, &bystander, Duration::from_secs(30)).await;
    let fair = fair.expect("the bystander was not Ready within 30 s with fairness on");
    println!("bystander Ready {fair:?} after creation, fairness on, {STORM} TokenRequests storming");
    assert!(fair < FAIR_WITHIN, "the bystander took {fair:?}");
    let most_at_once = most_in_flight(&env);
    assert!(
        most_at_once <= 2,
        "{most_at_once} storm mints in flight at once: more than half the slots"
    );
    let held_back = metric(
        &env,
        r#"gcp_token_operator_namespace_throttled_total{limit="in_flight"}"#,
    )
    .await;
    assert!(held_back >= 1.0, "no mint was held back for fairness");
    let tr = env.token_requests().get("storm-0").await.unwrap();
    let with_status = env
        .token_requests()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|t| t.status.is_some())
        .count();
    assert!(
        with_status <= 2,
        "{with_status} storm TokenRequests have a status: a refused mint writes nothing (storm-0: {:?})",
        tr.status
    );
    env.kill_operator();
    env.token_requests()
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();
    bystander.delete("bystander").await;

    // The same storm with fairness off: the storm's mints take every slot, and the bystander
    // waits behind them.
    let off = ["--namespace-rate-limit", "0", "--namespace-max-in-flight", "0"];
    env.operator = Some(env.spawn_operator_watching(&[], &off));
    let unfair = bystander_under_storm(&env, &bystander, Duration::from_secs(15)).await;
    match unfair {
        Some(took) => panic!("with fairness off the bystander was Ready after {took:?}: the storm did not storm"),
        None => println!("bystander not Ready after 15 s with fairness off"),
    }
    env.kill_operator();
    env.assert_no_token_leaked().await;
}
