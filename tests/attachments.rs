//! `spec.secret.attachToServiceAccounts` on the real control plane: the operator's one
//! `imagePullSecrets` entry added to ServiceAccounts, admitted into Pods by the apiserver's
//! ServiceAccount admission plugin, moved when the list changes, restored after a hand edit,
//! removed before the TokenRequest goes; other entries never touched.

mod support;

use std::time::Duration;

use gcp_token_operator::crd::{ATTACHMENT_FINALIZER, REFRESH_REQUESTED_ANNOTATION, TokenRequest};
use gcp_token_operator_testkit::control_plane::wait_for_deletion;
use k8s_openapi::api::core::v1::{Event, Pod, ServiceAccount};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use support::*;

const SA_EMAIL: &str = "puller@proj.iam.gserviceaccount.com";

fn pull_secret(accounts: &[&str]) -> Value {
    let mut spec = impersonation_from_caller(SA_EMAIL);
    spec["secret"] = json!({
        "name": "pull",
        "type": "kubernetes.io/dockerconfigjson",
        "registries": ["europe-docker.pkg.dev"],
        "attachToServiceAccounts": accounts,
    });
    spec
}

fn accounts(env: &Env<'_>) -> Api<ServiceAccount> {
    Api::namespaced(env.client.clone(), &env.namespace)
}

/// The names in the ServiceAccount's `imagePullSecrets`; `None` when it has no list.
async fn listed(env: &Env<'_>, account: &str) -> Option<Vec<String>> {
    let account = accounts(env).get(account).await.expect("reading a ServiceAccount");
    account
        .image_pull_secrets
        .map(|list| list.into_iter().map(|r| r.name).collect())
}

async fn create_account(env: &Env<'_>, name: &str, pull_secrets: &[&str]) {
    let mut account = json!({"metadata": {"name": name}});
    if !pull_secrets.is_empty() {
        account["imagePullSecrets"] = pull_secrets.iter().map(|n| json!({"name": n})).collect();
    }
    accounts(env)
        .create(&PostParams::default(), &serde_json::from_value(account).unwrap())
        .await
        .expect("creating a ServiceAccount");
}

/// Waits until the status records exactly `accounts` (sorted) as attached.
async fn attached(env: &Env<'_>, accounts: &[&str]) -> TokenRequest {
    env.wait_tr("pull", &format!("attached to {accounts:?}"), |tr| {
        let recorded: Vec<&str> = tr
            .status
            .iter()
            .flat_map(|s| &s.attached_service_accounts)
            .map(|a| a.service_account.as_str())
            .collect();
        recorded == accounts
    })
    .await
}

/// The pull secrets the apiserver admits into a Pod that runs as `account` and names none.
async fn admitted_pull_secrets(env: &Env<'_>, pod: &str, account: &str) -> Vec<String> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": pod},
        "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "europe-docker.pkg.dev/p/r/app:1"}]},
    }))
    .unwrap();
    let created = Api::<Pod>::namespaced(env.client.clone(), &env.namespace)
        .create(&PostParams::default(), &pod)
        .await
        .expect("creating a Pod");
    created
        .spec
        .and_then(|s| s.image_pull_secrets)
        .into_iter()
        .flatten()
        .map(|r| r.name)
        .collect()
}

/// What `kubectl gtr status pull` prints.
async fn plugin_status(env: &Env<'_>) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-gtr"))
        .args(["status", "pull", "-n", &env.namespace, "--kubeconfig"])
        .arg(env.control_plane.kubeconfig_path())
        .output()
        .await
        .expect("running kubectl-gtr");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn pods_of_attached_service_accounts_pull_with_the_secret_and_it_is_detached_when_no_longer_wanted() {
    let mut env = Env::new("attach").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    create_account(&env, "builder", &["theirs"]).await;
    create_account(&env, "runner", &[]).await;
    env.operator = Some(env.spawn_operator(&["--service-account-attachment"]));
    env.create("pull", pull_secret(&["runner", "builder"])).await;

    let tr = attached(&env, &["builder", "runner"]).await;
    assert_eq!(ready_reason(&tr), Some("Issued"));
    assert!(
        tr.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == ATTACHMENT_FINALIZER)
    );
    assert_eq!(
        listed(&env, "builder").await,
        Some(vec!["theirs".into(), "pull".into()])
    );
    assert_eq!(listed(&env, "runner").await, Some(vec!["pull".into()]));
    // What the issue asks for: a Pod created with the ServiceAccount pulls with the Secret.
    assert_eq!(
        admitted_pull_secrets(&env, "build", "builder").await,
        ["theirs", "pull"]
    );
    assert_eq!(admitted_pull_secrets(&env, "run", "runner").await, ["pull"]);

    // Someone adds an entry of their own to `runner` meanwhile; `builder` leaves the list.
    let add_theirs = json!([{"op": "add", "path": "/imagePullSecrets/-", "value": {"name": "extra"}}]);
    accounts(&env)
        .patch(
            "runner",
            &PatchParams::default(),
            &Patch::<()>::Json(serde_json::from_value(add_theirs).unwrap()),
        )
        .await
        .unwrap();
    let change = json!({"spec": {"secret": {"attachToServiceAccounts": ["runner"]}}});
    env.token_requests()
        .patch("pull", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap();
    attached(&env, &["runner"]).await;
    assert_eq!(listed(&env, "builder").await, Some(vec!["theirs".into()]));
    assert_eq!(listed(&env, "runner").await, Some(vec!["pull".into(), "extra".into()]));

    // Deleting the TokenRequest removes its entry first (the finalizer), then it goes.
    env.delete("pull").await;
    let log = || env.operator_log();
    wait_for_deletion(&env.token_requests(), "pull", WAIT, &log)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(listed(&env, "runner").await, Some(vec!["extra".into()]));
    assert_eq!(listed(&env, "builder").await, Some(vec!["theirs".into()]));
    // A single mint for all of it: attaching never costs a token.
    assert_eq!(
        env.google
            .calls(gcp_token_operator_testkit::emulator::Endpoint::GenerateAccessToken),
        1
    );
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn a_missing_account_is_reported_and_attached_once_it_exists_and_a_removed_entry_comes_back() {
    let mut env = Env::new("attach-later").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    create_account(&env, "runner", &[]).await;
    env.operator = Some(env.spawn_operator(&["--service-account-attachment"]));
    env.create("pull", pull_secret(&["runner", "later"])).await;

    // The token is issued all the same; the missing ServiceAccount is a Warning, and not recorded.
    let tr = attached(&env, &["runner"]).await;
    assert_eq!(ready_status(&tr), Some("True"));
    let events = Api::<Event>::namespaced(env.client.clone(), &env.namespace);
    let warned = |events: &[Event]| {
        events.iter().any(|e| {
            e.reason.as_deref() == Some("AttachFailed")
                && e.message
                    .as_deref()
                    .is_some_and(|m| m.contains("\"later\"") && m.contains("does not exist"))
        })
    };
    let mut seen = false;
    for _ in 0..60 {
        if warned(&events.list(&ListParams::default()).await.unwrap().items) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(seen, "no AttachFailed Event for the missing ServiceAccount");
    let status = plugin_status(&env).await;
    assert!(status.contains("Attached to:      runner\n"), "{status}");
    assert!(
        status.contains("Not yet:        later (see the AttachFailed Events)"),
        "{status}"
    );

    // It is created: the next try (within a minute) attaches it.
    create_account(&env, "later", &[]).await;
    attached(&env, &["later", "runner"]).await;
    assert_eq!(listed(&env, "later").await, Some(vec!["pull".into()]));
    let status = plugin_status(&env).await;
    assert!(
        status.contains("Attached to:      later, runner\n") && !status.contains("Not yet"),
        "{status}"
    );

    // An entry removed by hand comes back with the next token (here asked for at once).
    let remove = json!([{"op": "remove", "path": "/imagePullSecrets"}]);
    accounts(&env)
        .patch(
            "runner",
            &PatchParams::default(),
            &Patch::<()>::Json(serde_json::from_value(remove).unwrap()),
        )
        .await
        .unwrap();
    let request = json!({"metadata": {"annotations": {REFRESH_REQUESTED_ANNOTATION: "1"}}});
    env.token_requests()
        .patch("pull", &PatchParams::default(), &Patch::Merge(&request))
        .await
        .unwrap();
    env.wait_tr("pull", "the refresh request handled", |tr| {
        tr.status
            .as_ref()
            .and_then(|s| s.last_handled_refresh_request.as_deref())
            == Some("1")
    })
    .await;
    assert_eq!(listed(&env, "runner").await, Some(vec!["pull".into()]));
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn without_the_setting_naming_service_accounts_is_invalid_and_touches_nothing() {
    let mut env = Env::new("attach-off").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    create_account(&env, "runner", &["theirs"]).await;
    env.start_operator();
    env.create("pull", pull_secret(&["runner"])).await;
    let tr = env.wait_reason("pull", "InvalidSpec").await;
    let message = &ready_condition(&tr).unwrap().message;
    assert!(message.contains("serviceAccountAttachment.enabled"), "{message}");
    assert_eq!(tr.metadata.finalizers, None);
    assert_eq!(listed(&env, "runner").await, Some(vec!["theirs".into()]));
    // A TokenRequest without the field is not held by a finalizer, and goes at once.
    env.delete("pull").await;
    let log = || env.operator_log();
    wait_for_deletion(&env.token_requests(), "pull", Duration::from_secs(10), &log)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}
