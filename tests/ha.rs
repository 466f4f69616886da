//! Two replicas with leader election on the real control plane: only the leader writes; when it is
//! killed the standby takes over within the lease duration and no token expires; a replica stopped
//! with SIGTERM releases the lease so its successor starts at once.

mod support;

use std::time::{Duration, Instant};

use gcp_token_operator::testkit::operator::OperatorProcess;
use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};
use kube::Api;
use serde_json::json;
use support::*;

const SA_EMAIL: &str = "ha@proj.iam.gserviceaccount.com";
const LEASE_SECONDS: u64 = 6;
const NAMES: [&str; 3] = ["a", "b", "c"];

/// The lease holder's identity ends with `_PID`.
fn holds(lease: &Lease, operator: &OperatorProcess) -> bool {
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or_default();
    holder.ends_with(&format!("_{}", operator.pid()))
}

async fn wait_holder(env: &Env<'_>, operator: &OperatorProcess) -> Instant {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(lease)) = leases.get_opt("gcp-token-operator").await
            && holds(&lease, operator)
        {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "pid {} never held the lease; log:\n{}",
            operator.pid(),
            env.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many tokens an operator's log says it obtained.
fn tokens_obtained(operator: &OperatorProcess) -> usize {
    operator
        .log()
        .lines()
        .filter(|l| l.contains("token issued") || l.contains("token refreshed"))
        .count()
}

/// Waits until every TokenRequest holds a token other than the one in `before`, checking all the
/// while that each Secret's token is unexpired.
async fn wait_all_refreshed(env: &Env<'_>, before: &[Option<String>]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut fresh = 0;
        for (name, old) in NAMES.iter().zip(before) {
            let tr = env.token_requests().get(name).await.unwrap();
            let expires = tr.status.as_ref().and_then(|s| s.expiration_time.clone()).unwrap().0;
            assert!(expires > Timestamp::now(), "the token of {name} expired");
            assert_eq!(ready_status(&tr), Some("True"), "{name} is not Ready");
            fresh += usize::from(fingerprint(&tr) != *old);
        }
        if fresh == NAMES.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not every token was refreshed; log:\n{}",
            env.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn fingerprints(env: &Env<'_>) -> Vec<Option<String>> {
    let mut all = Vec::new();
    for name in NAMES {
        all.push(fingerprint(&env.token_requests().get(name).await.unwrap()));
    }
    all
}

#[tokio::test]
async fn standby_takes_over_and_sigterm_hands_over_at_once() {
    let mut env = Env::new("ha").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(20)).await;
    let namespace = env.namespace.clone();
    let lease_seconds = format!("{LEASE_SECONDS}s");
    let lease_args = [
        "--leader-elect",
        "--lease-namespace",
        &namespace,
        "--lease-duration",
        &lease_seconds,
        "--lease-grace",
        "2s",
    ];

    let mut first = env.spawn_operator(&lease_args);
    wait_holder(&env, &first).await;
    let mut second = env.spawn_operator(&lease_args);
    second.wait_ready(WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    for name in NAMES {
        env.create(
            name,
            json!({
                "flow": {"impersonation": {"serviceAccount": SA_EMAIL, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}},
                "source": {"secret": {"name": "caller", "key": "token"}},
            }),
        )
        .await;
    }
    for name in NAMES {
        env.wait_ready(name).await;
    }
    let issued = fingerprints(&env).await;
    wait_all_refreshed(&env, &issued).await;
    assert!(
        tokens_obtained(&first) >= 2 * NAMES.len(),
        "the leader issued and refreshed"
    );
    assert_eq!(tokens_obtained(&second), 0, "the standby wrote nothing");

    // The leader dies without a word: the standby takes over once the lease lapses.
    let before = fingerprints(&env).await;
    let killed = Instant::now();
    first.kill();
    let took_over = wait_holder(&env, &second).await - killed;
    assert!(
        took_over <= Duration::from_secs(LEASE_SECONDS + 3),
        "took over after {took_over:?} with a {LEASE_SECONDS}s lease"
    );
    eprintln!("takeover after SIGKILL of the leader: {took_over:?}");
    wait_all_refreshed(&env, &before).await;
    assert!(
        tokens_obtained(&second) >= NAMES.len(),
        "the new leader keeps the tokens fresh"
    );

    // SIGTERM releases the lease: a new replica leads well before the lease could have lapsed.
    let third = env.spawn_operator(&lease_args);
    third.wait_ready(WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    let stopping = Instant::now();
    let status = second.terminate().unwrap();
    assert!(status.success(), "a SIGTERM'd operator exits cleanly: {status}");
    let handed_over = wait_holder(&env, &third).await - stopping;
    assert!(
        handed_over < Duration::from_secs(2),
        "handed over after {handed_over:?}"
    );
    eprintln!("hand-over after SIGTERM: {handed_over:?}");
    let before = fingerprints(&env).await;
    wait_all_refreshed(&env, &before).await;
    assert!(tokens_obtained(&third) >= NAMES.len());
    env.assert_no_token_leaked().await;
}
