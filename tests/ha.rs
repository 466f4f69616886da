//! Leader election on the real control plane, several operator replicas on one namespace: only the
//! leader writes; when it is killed a standby takes over within the lease duration and no token
//! expires; a replica stopped with SIGTERM releases the lease so exactly one successor starts at
//! once; a leader whose renewals fail stops before its lease can lapse; and a standby does not
//! take a lease that is being renewed, however old its `renewTime` looks.

mod support;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gcp_token_operator_testkit::{control_plane::create_service_account, operator::OperatorProcess};
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        rbac::v1::{Role, RoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::*;

const SA_EMAIL: &str = "ha@proj.iam.gserviceaccount.com";
const LEASE_SECONDS: u64 = 6;
const LEASE: Duration = Duration::from_secs(LEASE_SECONDS);
const LEASE_NAME: &str = "gcp-token-operator";
const NAMES: [&str; 3] = ["a", "b", "c"];

/// The flags of a replica: a 6 s lease with a 2 s grace, so the leader gives up 4 s after its last
/// successful renewal.
fn lease_args(namespace: &str) -> Vec<String> {
    [
        "--leader-elect",
        "--lease-namespace",
        namespace,
        "--lease-duration",
        &format!("{LEASE_SECONDS}s"),
        "--lease-grace",
        "2s",
    ]
    .map(String::from)
    .to_vec()
}

fn spawn(env: &mut Env<'_>, args: &[String]) -> OperatorProcess {
    env.spawn_operator(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn leases(env: &Env<'_>) -> Api<Lease> {
    Api::namespaced(env.client.clone(), &env.namespace)
}

fn holder(lease: &Lease) -> &str {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or_default()
}

/// The lease holder's identity ends with `_PID`.
fn holds(lease: &Lease, operator: &OperatorProcess) -> bool {
    holder(lease).ends_with(&format!("_{}", operator.pid()))
}

/// Waits until one of `operators` holds the lease: which one, and when.
async fn wait_holder_among(env: &Env<'_>, operators: &[&OperatorProcess]) -> (usize, Instant) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(lease)) = leases(env).get_opt(LEASE_NAME).await
            && let Some(index) = operators.iter().position(|o| holds(&lease, o))
        {
            return (index, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "none of {:?} held the lease; log:\n{}",
            operators.iter().map(|o| o.pid()).collect::<Vec<_>>(),
            env.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_holder(env: &Env<'_>, operator: &OperatorProcess) -> Instant {
    wait_holder_among(env, &[operator]).await.1
}

/// How many times an operator's log says it took the lease.
fn terms(operator: &OperatorProcess) -> usize {
    operator
        .log()
        .lines()
        .filter(|l| l.contains("acquired the lease; leading"))
        .count()
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

/// Creates the TokenRequests `NAMES` and waits until each is Ready.
async fn create_all(env: &Env<'_>) {
    for name in NAMES {
        env.create(name, impersonation()).await;
    }
    for name in NAMES {
        env.wait_ready(name).await;
    }
}

fn impersonation() -> serde_json::Value {
    json!({
        "flow": {"impersonation": {"serviceAccount": SA_EMAIL, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}},
        "source": {"secret": {"name": "caller", "key": "token"}},
    })
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
    let lease_args = lease_args(&env.namespace);
    let mut first = spawn(&mut env, &lease_args);
    wait_holder(&env, &first).await;
    let mut second = spawn(&mut env, &lease_args);
    second.wait_ready(WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    create_all(&env).await;
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
        took_over <= LEASE + Duration::from_secs(3),
        "took over after {took_over:?} with a {LEASE_SECONDS}s lease"
    );
    eprintln!("takeover after SIGKILL of the leader: {took_over:?}");
    wait_all_refreshed(&env, &before).await;
    assert!(
        tokens_obtained(&second) >= NAMES.len(),
        "the new leader keeps the tokens fresh"
    );

    // SIGTERM releases the lease: a new replica leads well before the lease could have lapsed.
    let third = spawn(&mut env, &lease_args);
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

#[tokio::test]
async fn three_replicas_elect_one_leader_and_sigterm_hands_over_to_exactly_one() {
    let mut env = Env::new("ha-three").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(20)).await;
    let lease_args = lease_args(&env.namespace);
    // Started together, they race for a Lease that does not exist yet.
    let mut replicas: Vec<OperatorProcess> = (0..3).map(|_| spawn(&mut env, &lease_args)).collect();
    for replica in &replicas {
        replica.wait_ready(WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    }
    create_all(&env).await;
    let issued = fingerprints(&env).await;
    wait_all_refreshed(&env, &issued).await;
    let (leader, _) = wait_holder_among(&env, &replicas.iter().collect::<Vec<_>>()).await;
    let counts = |replicas: &[OperatorProcess]| {
        replicas
            .iter()
            .map(|r| (terms(r), tokens_obtained(r)))
            .collect::<Vec<_>>()
    };
    let at_start = counts(&replicas);
    eprintln!("fresh start, three replicas: (terms, tokens) per replica {at_start:?}");
    for (index, (terms, tokens)) in at_start.iter().copied().enumerate() {
        if index == leader {
            assert_eq!(terms, 1, "the holder took the lease once");
            assert!(
                tokens >= 2 * NAMES.len(),
                "the leader issued and refreshed: {at_start:?}"
            );
        } else {
            assert_eq!((terms, tokens), (0, 0), "a standby led or wrote: {at_start:?}");
        }
    }

    // SIGTERM: the leader releases the lease, and of the two standbys exactly one takes it.
    let mut stopped = replicas.remove(leader);
    let stopping = Instant::now();
    let status = stopped.terminate().unwrap();
    assert!(status.success(), "a SIGTERM'd operator exits cleanly: {status}");
    let (successor, took) = wait_holder_among(&env, &replicas.iter().collect::<Vec<_>>()).await;
    let handed_over = took - stopping;
    eprintln!("hand-over after SIGTERM with two standbys: {handed_over:?}");
    assert!(
        handed_over < Duration::from_secs(2),
        "handed over after {handed_over:?}"
    );
    let before = fingerprints(&env).await;
    wait_all_refreshed(&env, &before).await;
    let after = counts(&replicas);
    eprintln!("after the hand-over: (terms, tokens) per survivor {after:?}");
    for (index, (terms, tokens)) in after.iter().copied().enumerate() {
        if index == successor {
            assert_eq!(terms, 1, "the successor took the lease once");
            assert!(tokens >= NAMES.len(), "the successor keeps the tokens fresh: {after:?}");
        } else {
            assert_eq!((terms, tokens), (0, 0), "the other standby led or wrote: {after:?}");
        }
    }
    let lease = leases(&env).get(LEASE_NAME).await.unwrap();
    assert!(
        holds(&lease, &replicas[successor]),
        "the successor still holds the lease"
    );
    env.assert_no_token_leaked().await;
}

/// Runs the leader as a ServiceAccount of its own whose right to update Leases is then taken away,
/// while everything else it does still works.
#[tokio::test]
async fn a_leader_whose_renewals_fail_stops_before_its_lease_lapses() {
    let mut env = Env::new("ha-renew").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(20)).await;
    let namespace = env.namespace.clone();
    create_service_account(&env.client, &namespace, "leader").await.unwrap();
    let lease_verbs = |verbs: &[&str]| -> Role {
        serde_json::from_value(json!({
            "metadata": {"name": "lease"},
            "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": verbs}],
        }))
        .unwrap()
    };
    let roles: Api<Role> = Api::namespaced(env.client.clone(), &namespace);
    // Broad on purpose: this test is about the Lease; isolation.rs and chart.rs check the reviewed
    // rules.
    let operator: Role = serde_json::from_value(json!({
        "metadata": {"name": "operator"},
        "rules": [{"apiGroups": ["gcptoken.dev", "", "events.k8s.io"], "resources": ["*"], "verbs": ["*"]}],
    }))
    .unwrap();
    let lease_role = lease_verbs(&["get", "list", "watch", "create", "update"]);
    for role in [&operator, &lease_role] {
        roles.create(&PostParams::default(), role).await.unwrap();
        let name = role.metadata.name.as_deref().unwrap();
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": "leader", "namespace": namespace}],
        }))
        .unwrap();
        Api::<RoleBinding>::namespaced(env.client.clone(), &namespace)
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    env.write_kubeconfig_as(&namespace, "leader", &kubeconfig).await;

    let lease_args = lease_args(&namespace);
    env.operator_kubeconfig = Some(kubeconfig);
    let mut leader = spawn(&mut env, &lease_args);
    env.operator_kubeconfig = None;
    wait_holder(&env, &leader).await;
    let standby = spawn(&mut env, &lease_args);
    standby.wait_ready(WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    create_all(&env).await;

    // From now on, note when the Lease last changed, as seen from here; then deny its updates.
    let mut version = None;
    let mut changed = Instant::now();
    let mut denied = false;
    let deadline = Instant::now() + WAIT;
    let exited = loop {
        let lease = leases(&env).get(LEASE_NAME).await.unwrap();
        if lease.metadata.resource_version != version {
            version = lease.metadata.resource_version.clone();
            changed = Instant::now();
            assert!(
                holds(&lease, &leader),
                "the leader still holds the lease when it changes"
            );
        }
        if !denied {
            roles
                .replace(
                    "lease",
                    &PostParams::default(),
                    &lease_verbs(&["get", "list", "watch", "create"]),
                )
                .await
                .unwrap();
            denied = true;
        }
        if let Some(status) = leader.try_wait().unwrap() {
            assert!(
                !status.success(),
                "a leader that stepped down exits with an error: {status}"
            );
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the leader kept going; log:\n{}",
            leader.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stopped_after = exited - changed;
    eprintln!("the leader stopped {stopped_after:?} after its last renewal (lease {LEASE:?})");
    assert!(
        stopped_after < LEASE,
        "the leader stopped {stopped_after:?} after its last renewal, not before its {LEASE:?} lease lapsed"
    );
    assert!(
        leader
            .log()
            .contains("no renewal of the lease succeeded within the renew deadline; stopping at once"),
        "the leader says why it stopped; log:\n{}",
        leader.log()
    );

    // The standby takes over once the lease has lapsed, after the old leader stopped.
    let took = wait_holder(&env, &standby).await;
    eprintln!(
        "the standby took over {:?} after the leader's last renewal",
        took - changed
    );
    assert!(took > exited, "the standby took over before the old leader stopped");
    // The test sees the last renewal a moment after the standby does (both watch the Lease, and
    // on two busy cores either may lag), so the bound leaves two seconds for that.
    assert!(
        took - changed >= LEASE - Duration::from_secs(2),
        "the standby took over {:?} after the last renewal, before the lease lapsed",
        took - changed
    );
    let before = fingerprints(&env).await;
    wait_all_refreshed(&env, &before).await;
    assert!(
        tokens_obtained(&standby) >= NAMES.len(),
        "the new leader keeps the tokens fresh"
    );
    env.assert_no_token_leaked().await;
}

/// The test itself holds the Lease as "someone-else" and keeps renewing it with a renewTime an hour
/// in the past, as a holder whose clock is an hour behind (or a standby whose clock is an hour
/// ahead) would see it.
#[tokio::test]
async fn a_standby_does_not_steal_a_live_lease_whatever_its_renew_time() {
    let mut env = Env::new("ha-skew").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(20)).await;
    let an_hour_ago = || MicroTime(Timestamp::now() - SignedDuration::from_hours(1));
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": LEASE_NAME},
        "spec": {
            "holderIdentity": "someone-else",
            "acquireTime": an_hour_ago(),
            "renewTime": an_hour_ago(),
            "leaseDurationSeconds": LEASE_SECONDS,
        },
    }))
    .unwrap();
    leases(&env).create(&PostParams::default(), &lease).await.unwrap();
    let last_renewal = Arc::new(Mutex::new(Instant::now()));
    let renewer = tokio::spawn({
        let leases = leases(&env);
        let last_renewal = last_renewal.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let renew = json!({"spec": {"renewTime": an_hour_ago()}});
                leases
                    .patch(LEASE_NAME, &PatchParams::default(), &Patch::Merge(&renew))
                    .await
                    .expect("renewing the test's lease");
                *last_renewal.lock().unwrap() = Instant::now();
            }
        }
    });

    let lease_args = lease_args(&env.namespace);
    let operator = spawn(&mut env, &lease_args);
    operator.wait_ready(WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    env.create("a", impersonation()).await;
    tokio::time::sleep(3 * LEASE).await;
    let lease = leases(&env).get(LEASE_NAME).await.unwrap();
    assert_eq!(holder(&lease), "someone-else", "the standby took a live lease");
    assert_eq!(
        (terms(&operator), tokens_obtained(&operator)),
        (0, 0),
        "the standby led or wrote"
    );
    let tr = env.token_requests().get("a").await.unwrap();
    assert!(tr.status.is_none(), "a standby reconciled: {:?}", tr.status);

    // Once the renewals stop, the lease lapses and the operator takes it.
    renewer.abort();
    let _ = renewer.await;
    let last = *last_renewal.lock().unwrap();
    let took = wait_holder(&env, &operator).await - last;
    eprintln!("took a lapsed lease {took:?} after its last renewal (lease {LEASE:?})");
    assert!(
        took >= LEASE - Duration::from_millis(500),
        "took the lease {took:?} after its last renewal"
    );
    assert!(
        took <= LEASE + Duration::from_secs(3),
        "took the lease only after {took:?}"
    );
    env.wait_ready("a").await;
    assert_eq!(terms(&operator), 1);
    env.assert_no_token_leaked().await;
}
