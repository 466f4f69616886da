//! What the operator shares across TokenRequests and namespaces (credentials it minted, calls in
//! flight) leaks nothing across them: a shared failure is reported in each namespace's own terms,
//! and a ServiceAccount created again under an old name does not inherit the old one's token.

mod support;

use std::time::Duration;

use gcp_token_operator_testkit::{
    control_plane::create_namespace,
    emulator::{Endpoint, Fault},
};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{Api, api::DeleteParams};
use serde_json::json;
use support::{sources::*, *};

fn message(tr: &gcp_token_operator::crd::TokenRequest) -> String {
    ready_condition(tr).map(|c| c.message.clone()).unwrap_or_default()
}

#[tokio::test]
async fn a_failure_shared_by_two_namespaces_names_only_each_ones_own_secret() {
    let mut env = Env::new("shared-fail-a").await;
    let b = create_namespace(&env.client, "shared-fail-b").await.unwrap();
    let in_b = env.in_namespace(&b);
    env.google.add_account_connector(CONNECTOR);
    let key = KeyFile::new(&env.google, "shared@proj.iam.gserviceaccount.com", "kid-shared");
    // The same key file in both namespaces, under names of each one's own.
    env.put_secret("a-only-key", "a-only.json", &key.json).await;
    in_b.put_secret("b-only-key", "b-only.json", &key.json).await;
    // The one exchange both wait for takes a second, then fails.
    env.google.set_latency(Endpoint::OAuthToken, Duration::from_secs(1));
    env.google.fail_next(
        Endpoint::OAuthToken,
        1,
        Fault::Status {
            code: 400,
            retry_after: None,
        },
    );
    env.operator = Some(env.spawn_operator(&["--namespace", b.as_str()]));
    let (_, _) = tokio::join!(
        env.create(
            "git",
            git_from(json!({"secret": {"name": "a-only-key", "key": "a-only.json"}}))
        ),
        in_b.create(
            "git",
            git_from(json!({"secret": {"name": "b-only-key", "key": "b-only.json"}}))
        ),
    );
    let failed = |tr: &gcp_token_operator::crd::TokenRequest| ready_status(tr) == Some("False");
    let in_a = env.wait_tr("git", "Ready=False", failed).await;
    let in_b_tr = in_b.wait_tr("git", "Ready=False", failed).await;
    assert_eq!(
        env.google.calls(Endpoint::OAuthToken),
        1,
        "both TokenRequests waited for one exchange, so its failure was shared"
    );
    let (a, b_message) = (message(&in_a), message(&in_b_tr));
    assert!(a.contains("a-only-key") && a.contains("a-only.json"), "{a}");
    assert!(!a.contains("b-only"), "namespace a's status names b's Secret: {a}");
    assert!(
        b_message.contains("b-only-key") && b_message.contains("b-only.json"),
        "{b_message}"
    );
    assert!(
        !b_message.contains("a-only"),
        "namespace b's status names a's Secret: {b_message}"
    );
    let log = env.operator_log();
    for line in log
        .lines()
        .filter(|l| l.contains(&b) && l.contains("obtaining a token failed"))
    {
        assert!(!line.contains("a-only"), "the log line for b names a's Secret: {line}");
    }
    // Once the fault is spent the key works: the leak check then covers a token issued with it.
    env.create(
        "git-again",
        git_from(json!({"secret": {"name": "a-only-key", "key": "a-only.json"}})),
    )
    .await;
    env.wait_ready("git-again").await;
    env.assert_nothing_leaked(&key.material()).await;
}

#[tokio::test]
async fn a_service_account_created_again_does_not_inherit_the_old_ones_federated_token() {
    let mut env = Env::new("sa-uid").await;
    env.google.add_account_connector(CONNECTOR);
    env.put_secret(
        "wif",
        "config.json",
        &external_account(&env.google, AUDIENCE, json!({})),
    )
    .await;
    env.create_service_account("app").await;
    env.start_operator();
    let spec = || {
        git_from(json!({"secret": {"name": "wif", "key": "config.json",
                                    "subjectToken": {"serviceAccountToken": {"serviceAccountName": "app"}}}}))
    };
    env.create("first", spec()).await;
    env.wait_ready("first").await;
    // Another TokenRequest for the same ServiceAccount shares the federated token: no STS call.
    env.create("second", spec()).await;
    env.wait_ready("second").await;
    assert_eq!(
        env.google.calls(Endpoint::Sts),
        1,
        "the federated token is kept and shared"
    );

    // The ServiceAccount goes and comes back under the same name: another identity (another UID).
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.namespace);
    accounts.delete("app", &DeleteParams::default()).await.unwrap();
    while accounts.get_opt("app").await.unwrap().is_some() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.create_service_account("app").await;
    env.create("third", spec()).await;
    env.wait_ready("third").await;
    assert_eq!(
        env.google.calls(Endpoint::Sts),
        2,
        "the new ServiceAccount's token was exchanged anew, not taken from the old one"
    );
    env.assert_no_token_leaked().await;
}
