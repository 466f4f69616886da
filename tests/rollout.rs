//! Rotation that reaches the workload: the previous token kept while an update propagates, and
//! rolling restarts of the workloads that read the token only at start, on the real control plane
//! (its controller-manager turns a restarted Deployment into a new ReplicaSet).

mod support;

use std::time::{Duration, Instant};

use gcp_token_operator::render::{PREVIOUS_EXPIRES_AT_ANNOTATION, fingerprint as token_fingerprint};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
        core::v1::Event,
    },
    jiff::Timestamp,
};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::*;

const SA_EMAIL: &str = "app@proj.iam.gserviceaccount.com";
const ANNOTATION: &str = "restart.gcptoken.dev/app-token";

fn previous_token(secret: &k8s_openapi::api::core::v1::Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get("token.previous")?;
    Some(String::from_utf8(bytes.0.clone()).unwrap())
}

#[tokio::test]
async fn the_previous_token_stays_until_it_expires() {
    let mut env = Env::new("previous").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(20)).await;
    env.start_operator();
    env.create("app-token", impersonation_from_caller(SA_EMAIL)).await;
    let first = env.wait_ready("app-token").await;
    let first_expiry = first.status.as_ref().unwrap().expiration_time.clone().unwrap().0;
    let first_token = secret_token(&env.secret("app-token").await);
    assert_eq!(
        previous_token(&env.secret("app-token").await),
        None,
        "nothing to keep yet"
    );

    let refreshed = env
        .wait_secret("app-token", "a refreshed token", |s| secret_token(s) != first_token)
        .await;
    assert_eq!(
        previous_token(&refreshed).as_deref(),
        Some(first_token.as_str()),
        "the replaced token is kept beside the new one"
    );
    assert_eq!(
        refreshed.metadata.annotations.as_ref().unwrap()[PREVIOUS_EXPIRES_AT_ANNOTATION],
        first_expiry.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    );
    assert!(Timestamp::now() < first_expiry, "the kept token was still valid");
    let second_token = secret_token(&refreshed);

    // Gone once it expired, before the next refresh.
    let dropped = env
        .wait_secret("app-token", "the expired previous token dropped", |s| {
            previous_token(s).is_none()
        })
        .await;
    assert!(Timestamp::now() >= first_expiry, "dropped only after it expired");
    assert_eq!(secret_token(&dropped), second_token, "the current token stays");
    assert!(
        !dropped
            .metadata
            .annotations
            .unwrap()
            .contains_key(PREVIOUS_EXPIRES_AT_ANNOTATION)
    );
    env.assert_no_token_leaked().await;
}

async fn create<K>(env: &Env<'_>, object: serde_json::Value)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let object: K = serde_json::from_value(object).unwrap();
    Api::namespaced(env.client.clone(), &env.namespace)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

async fn create_workloads(env: &Env<'_>) {
    let labels = json!({"app": "web"});
    let template = json!({
        "metadata": {"labels": labels},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    });
    let spec = json!({"selector": {"matchLabels": labels}, "template": template});
    create::<Deployment>(env, json!({"metadata": {"name": "web"}, "spec": spec})).await;
    let mut stateful = spec.clone();
    stateful["serviceName"] = json!("db");
    create::<StatefulSet>(env, json!({"metadata": {"name": "db"}, "spec": stateful})).await;
    create::<DaemonSet>(env, json!({"metadata": {"name": "agent"}, "spec": spec})).await;
}

fn template_annotation(annotations: Option<&std::collections::BTreeMap<String, String>>) -> Option<String> {
    annotations?.get(ANNOTATION).cloned()
}

async fn deployment_annotation(env: &Env<'_>) -> Option<String> {
    let deployment: Deployment = Api::namespaced(env.client.clone(), &env.namespace)
        .get("web")
        .await
        .unwrap();
    let template = deployment.spec.template;
    template_annotation(template.metadata.as_ref().and_then(|m| m.annotations.as_ref()))
}

#[tokio::test]
async fn rollout_restarts_follow_token_changes_at_most_once_per_interval() {
    let mut env = Env::new("rollout").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(20)).await;
    create_workloads(&env).await;
    env.start_operator();
    let mut spec = impersonation_from_caller(SA_EMAIL);
    spec["rolloutRestartTargets"] = json!([
        {"kind": "Deployment", "name": "web"},
        {"kind": "StatefulSet", "name": "db"},
        {"kind": "DaemonSet", "name": "agent"},
        {"kind": "Deployment", "name": "gone"},
    ]);
    spec["rolloutRestartMinInterval"] = json!("25s");
    env.create("app-token", spec).await;
    env.wait_ready("app-token").await;

    // Watch the Deployment's pod template and the tokens for 55 s: about four refreshes.
    let started = Instant::now();
    let mut fingerprints = Vec::new();
    let mut changes: Vec<(Instant, String)> = Vec::new();
    while started.elapsed() < Duration::from_secs(55) {
        let tr = env.token_requests().get("app-token").await.unwrap();
        if let Some(f) = fingerprint(&tr)
            && fingerprints.last() != Some(&f)
        {
            fingerprints.push(f);
        }
        if let Some(annotation) = deployment_annotation(&env).await
            && changes.last().map(|(_, a)| a) != Some(&annotation)
        {
            changes.push((Instant::now(), annotation));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(fingerprints.len() >= 4, "{} tokens in 55 s", fingerprints.len());
    assert!(
        changes.len() >= 2,
        "restarted {} times for {} tokens",
        changes.len(),
        fingerprints.len()
    );
    assert!(
        changes.len() < fingerprints.len() - 1,
        "the minimum interval held back some restarts: {} restarts for {} refreshes",
        changes.len(),
        fingerprints.len() - 1
    );
    assert_ne!(
        changes[0].1, fingerprints[0],
        "the first token, issued before any workload read it, restarts nothing"
    );
    for (_, value) in &changes {
        assert!(
            fingerprints.contains(value),
            "the annotation names a token the Secret held"
        );
    }
    for pair in changes.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(gap >= Duration::from_secs(23), "restarts {gap:?} apart, minimum 25 s");
    }

    // Each restart is a real rollout: the controller-manager made a ReplicaSet per template.
    let replica_sets: Api<ReplicaSet> = Api::namespaced(env.client.clone(), &env.namespace);
    let want = changes.len() + 1;
    let deadline = Instant::now() + WAIT;
    while replica_sets.list(&ListParams::default()).await.unwrap().items.len() < want {
        assert!(Instant::now() < deadline, "no ReplicaSet per restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The other kinds were restarted for the same token.
    let last = changes.last().unwrap().1.clone();
    let stateful_set: StatefulSet = Api::namespaced(env.client.clone(), &env.namespace)
        .get("db")
        .await
        .unwrap();
    let daemon_set: DaemonSet = Api::namespaced(env.client.clone(), &env.namespace)
        .get("agent")
        .await
        .unwrap();
    for annotations in [
        stateful_set.spec.template.metadata.and_then(|m| m.annotations),
        daemon_set.spec.template.metadata.and_then(|m| m.annotations),
    ] {
        assert_eq!(template_annotation(annotations.as_ref()), Some(last.clone()));
    }
    // The missing target is reported, and the token is unaffected.
    let events = Api::<Event>::namespaced(env.client.clone(), &env.namespace)
        .list(&ListParams::default())
        .await
        .unwrap();
    let reasons: Vec<_> = events.items.iter().filter_map(|e| e.reason.clone()).collect();
    assert!(reasons.iter().any(|r| r == "RolloutRestarted"), "{reasons:?}");
    let skipped = events
        .items
        .iter()
        .find(|e| e.reason.as_deref() == Some("RolloutRestartSkipped"))
        .expect("the missing Deployment is reported");
    assert!(skipped.message.as_deref().unwrap().contains("Deployment gone"));
    let tr = env.token_requests().get("app-token").await.unwrap();
    assert_eq!(ready_status(&tr), Some("True"));
    let in_secret = token_fingerprint(&secret_token(&env.secret("app-token").await));
    assert_eq!(Some(in_secret), fingerprint(&tr));
    env.assert_no_token_leaked().await;
}
