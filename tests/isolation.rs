//! Tenant isolation: one operator serving several namespaces (tenants) cannot be made to reach
//! across them, to write into Secrets it does not own, to lend its own identity where that is not
//! allowed, or to use its own ServiceAccount token. The operator runs as a ServiceAccount of its
//! own namespace with exactly the RBAC the README lists, granted only in the namespaces it serves.

mod support;

use std::path::PathBuf;

use gcp_token_operator::crd::TokenRequest;
use gcp_token_operator_testkit::{
    control_plane::{create_namespace, create_service_account},
    emulator::Endpoint,
};
use k8s_openapi::api::{
    core::v1::Secret,
    rbac::v1::{ClusterRole, RoleBinding},
};
use kube::{Api, CustomResourceExt, api::PostParams};
use serde_json::{Value, json};
use support::{sources::*, *};

const OPERATOR_ACCOUNT: &str = "gcp-token-operator";

/// Two tenant namespaces (the Env's, "a", and "b") and the operator's own namespace. Tenant a
/// may use the operator's own Google identity (`source.ambient`); b may not.
struct Tenants {
    env: Env<'static>,
    b: String,
    operator_namespace: String,
    _kubeconfig_dir: tempfile::TempDir,
}

impl Tenants {
    /// Starts the operator for both tenants and its own namespace.
    async fn start(prefix: &str) -> Tenants {
        let mut env = Env::new(&format!("{prefix}-a")).await;
        let b = create_namespace(&env.client, &format!("{prefix}-b")).await.unwrap();
        let operator_namespace = create_namespace(&env.client, &format!("{prefix}-op")).await.unwrap();
        let watched = [env.namespace.clone(), b.clone(), operator_namespace.clone()];
        let kubeconfig_dir = tempfile::tempdir().unwrap();
        let kubeconfig = operator_identity(&env, &operator_namespace, &watched, kubeconfig_dir.path()).await;
        env.operator_kubeconfig = Some(kubeconfig);
        let own = format!("{operator_namespace}/{OPERATOR_ACCOUNT}");
        let a = env.namespace.clone();
        let args = [
            "--namespace",
            b.as_str(),
            "--namespace",
            operator_namespace.as_str(),
            "--operator-service-account",
            own.as_str(),
            "--ambient-namespace",
            a.as_str(),
        ];
        env.operator = Some(env.spawn_operator(&args));
        Tenants {
            env,
            b,
            operator_namespace,
            _kubeconfig_dir: kubeconfig_dir,
        }
    }

    fn in_b(&self) -> Env<'_> {
        self.env.in_namespace(&self.b)
    }

    fn in_operator_namespace(&self) -> Env<'_> {
        self.env.in_namespace(&self.operator_namespace)
    }
}

/// Creates the operator's ServiceAccount in `namespace`, grants it the README's RBAC in
/// `watched` only, and writes a kubeconfig that authenticates as it.
async fn operator_identity(env: &Env<'_>, namespace: &str, watched: &[String], dir: &std::path::Path) -> PathBuf {
    create_service_account(&env.client, namespace, OPERATOR_ACCOUNT)
        .await
        .unwrap();
    let role_name = format!("gcp-token-operator-{namespace}");
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": role_name},
        "rules": [
            {"apiGroups": ["gcptoken.dev"], "resources": ["tokenrequests"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["gcptoken.dev"], "resources": ["tokenrequests/status"], "verbs": ["patch"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
            {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ],
    }))
    .unwrap();
    Api::<ClusterRole>::all(env.client.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    for watched in watched {
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "gcp-token-operator"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": namespace}],
        }))
        .unwrap();
        Api::<RoleBinding>::namespaced(env.client.clone(), watched)
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
    }
    let path = dir.join("kubeconfig");
    env.write_kubeconfig_as(namespace, OPERATOR_ACCOUNT, &path).await;
    path
}

/// An sts TokenRequest spec with a token of ServiceAccount `name` as the subject token.
fn wif_for(name: &str) -> Value {
    json!({"flow": {"sts": {"audience": AUDIENCE}}, "source": {"serviceAccountToken": {"serviceAccountName": name}}})
}

/// Every property name in the CRD's schema, at any depth.
fn property_names(schema: &Value, names: &mut Vec<String>) {
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in properties {
            names.push(name.clone());
            property_names(sub, names);
        }
    }
    if let Some(items) = schema.get("items") {
        property_names(items, names);
    }
}

#[test]
fn no_field_can_name_another_namespace() {
    let crd = serde_json::to_value(TokenRequest::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut names = Vec::new();
    property_names(spec, &mut names);
    assert!(
        names.contains(&"serviceAccountName".to_string()),
        "the walk sees nested fields"
    );
    let namespaced: Vec<&String> = names
        .iter()
        .filter(|n| n.to_lowercase().contains("namespace"))
        .collect();
    assert!(namespaced.is_empty(), "{namespaced:?}");
}

/// The same names in two namespaces: each TokenRequest reaches its own namespace's Secret,
/// ServiceAccount and TokenRequest, and nothing that exists only in the other.
#[tokio::test]
async fn same_names_in_two_namespaces_resolve_in_their_own() {
    let tenants = Tenants::start("names").await;
    let (a, b) = (&tenants.env, tenants.in_b());
    a.google.add_account_connector(CONNECTOR);
    let mut material = Vec::new();
    for (env, tenant) in [(a, "a"), (&b, "b")] {
        create_service_account(&env.client, &env.namespace, "builder")
            .await
            .unwrap();
        let key = KeyFile::new(
            &env.google,
            &format!("tenant-{tenant}@proj.iam.gserviceaccount.com"),
            tenant,
        );
        env.put_secret("google-key", "key.json", &key.json).await;
        material.extend(key.material().into_iter().map(String::from));
        env.create("wif", wif_for("builder")).await;
        env.create(
            "keyed",
            git_from(json!({"secret": {"name": "google-key", "key": "key.json"}})),
        )
        .await;
        env.create(
            "chained",
            json!({"flow": {"sts": {"audience": AUDIENCE, "subjectTokenType": "urn:ietf:params:oauth:token-type:access_token"}},
                   "source": {"tokenRequest": {"name": "wif"}}}),
        )
        .await;
    }
    // What exists only in b, named from a.
    create_service_account(&b.client, &b.namespace, "account-in-b")
        .await
        .unwrap();
    b.put_secret("secret-in-b", "token", "not-for-a").await;
    b.create("request-in-b", wif_for("builder")).await;
    a.create(
        "reach-secret",
        git_from(json!({"secret": {"name": "secret-in-b", "key": "token"}})),
    )
    .await;
    a.create("reach-account", wif_for("account-in-b")).await;
    a.create(
        "reach-request",
        git_from(json!({"tokenRequest": {"name": "request-in-b"}})),
    )
    .await;
    let slashed = format!("{}/google-key", b.namespace);
    a.create(
        "slashed",
        git_from(json!({"secret": {"name": slashed, "key": "key.json"}})),
    )
    .await;

    for (env, tenant) in [(a, "a"), (&b, "b")] {
        for name in ["wif", "keyed", "chained"] {
            env.wait_ready(name).await;
        }
        let subject = format!("/subject/system:serviceaccount:{}:builder", env.namespace);
        assert!(principal_in(env, "wif").await.ends_with(&subject), "{tenant}");
        assert!(principal_in(env, "chained").await.ends_with(&subject), "{tenant}");
        assert_eq!(
            principal_in(env, "keyed").await,
            format!("serviceAccount:tenant-{tenant}@proj.iam.gserviceaccount.com")
        );
    }
    b.wait_ready("request-in-b").await;
    for (name, missing) in [
        ("reach-secret", "Secret \"secret-in-b\" does not exist"),
        ("reach-account", "ServiceAccount \"account-in-b\" does not exist"),
        ("reach-request", "TokenRequest \"request-in-b\" does not exist"),
    ] {
        let tr = a.wait_reason(name, "SourceNotReady").await;
        let message = &ready_condition(&tr).unwrap().message;
        assert!(message.contains(missing), "{name}: {message}");
    }
    let slashed = a.wait_reason("slashed", "InvalidSpec").await;
    assert!(
        ready_condition(&slashed)
            .unwrap()
            .message
            .contains("is not a valid object name")
    );
    // The README's RBAC, granted in the served namespaces only, was enough for all of it.
    assert!(!a.operator_log().contains("forbidden"), "{}", a.operator_log());
    let material: Vec<&str> = material.iter().map(String::as_str).collect();
    a.assert_nothing_leaked(&material).await;
}

/// A Secret of the target name that the TokenRequest does not own (a user's, one dressed up with
/// the operator's labels, another TokenRequest's) is reported as a conflict and left exactly as it
/// was: the operator never writes into it.
#[tokio::test]
async fn secrets_the_operator_does_not_own_are_left_untouched() {
    let tenants = Tenants::start("conflict").await;
    let env = &tenants.env;
    let user_secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "taken", "labels": {"team": "a"}},
        "stringData": {"token": "the user's own data"},
    }))
    .unwrap();
    let forged: Secret = serde_json::from_value(json!({
        "metadata": {"name": "forged",
                     "labels": {"app.kubernetes.io/managed-by": "gcp-token-operator", "gcptoken.dev/token-request": "forged"},
                     "annotations": {"gcptoken.dev/expires-at": "2000-01-01T00:00:00Z"}},
        "stringData": {"token": "planted"},
    }))
    .unwrap();
    for secret in [&user_secret, &forged] {
        env.secrets().create(&PostParams::default(), secret).await.unwrap();
    }
    let sts = wif_for("default");
    env.create("victim", sts.clone()).await;
    env.wait_ready("victim").await;
    // Every write of the victim's first reconciles has landed.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let before = [
        env.secret("taken").await,
        env.secret("forged").await,
        env.secret("victim").await,
    ];
    let calls = env.google.requests().len();

    env.create("taken", sts.clone()).await;
    env.create("forged", sts.clone()).await;
    let mut thief = sts.clone();
    thief["secret"] = json!({"name": "victim"});
    env.create("thief", thief).await;
    for (name, secret) in [("taken", "taken"), ("forged", "forged"), ("thief", "victim")] {
        let tr = env.wait_reason(name, "SecretConflict").await;
        assert_eq!(ready_status(&tr), Some("False"));
        let message = &ready_condition(&tr).unwrap().message;
        assert!(
            message.contains(&format!("Secret {secret} exists and is not owned by this TokenRequest")),
            "{name}: {message}"
        );
    }
    // Give the operator time to do anything it would do.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    for secret in &before {
        let name = secret.metadata.name.as_deref().unwrap();
        let now = env.secret(name).await;
        assert_eq!(
            serde_json::to_value(&now).unwrap(),
            serde_json::to_value(secret).unwrap(),
            "Secret {name} is byte for byte as it was"
        );
    }
    let managers: Vec<String> = before[..2]
        .iter()
        .flat_map(|s| s.metadata.managed_fields.iter().flatten())
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(!managers.iter().any(|m| m == "gcp-token-operator"), "{managers:?}");
    assert_eq!(env.google.requests().len(), calls, "a conflict mints nothing");
    env.assert_no_token_leaked().await;
}

/// The operator's own Google identity only in the namespaces its administrator lists.
#[tokio::test]
async fn ambient_identity_only_where_allowed() {
    let tenants = Tenants::start("ambient").await;
    let (a, b) = (&tenants.env, tenants.in_b());
    a.google
        .set_metadata_service_account("operator@proj.iam.gserviceaccount.com");
    a.google.add_account_connector(CONNECTOR);
    a.create("git", git_from(json!({"ambient": {}}))).await;
    b.create("git", git_from(json!({"ambient": {}}))).await;
    a.wait_ready("git").await;
    assert_eq!(
        principal_in(a, "git").await,
        "serviceAccount:operator@proj.iam.gserviceaccount.com"
    );
    let refused = b.wait_reason("git", "InvalidSpec").await;
    let message = &ready_condition(&refused).unwrap().message;
    assert!(
        message.contains("--ambient-namespace") && message.contains(&b.namespace),
        "{message}"
    );
    assert_eq!(a.google.calls(Endpoint::Metadata), 1, "only the allowed namespace's");
    assert_eq!(a.google.calls(Endpoint::FetchAccessToken), 1);
    a.assert_no_token_leaked().await;
}

/// Neither directly, nor through its long-lived token Secret, nor through an external_account
/// file pointing at its mounted token, is the operator's own ServiceAccount token a source.
#[tokio::test]
async fn the_operator_s_own_service_account_token_is_never_a_source() {
    let tenants = Tenants::start("own").await;
    let (tenant, own) = (&tenants.env, tenants.in_operator_namespace());
    tenant.google.add_account_connector(CONNECTOR);
    // A long-lived token Secret of the operator's ServiceAccount, which Kubernetes still fills in
    // for anyone allowed to create Secrets in its namespace.
    let token_secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "operator-token", "annotations": {"kubernetes.io/service-account.name": OPERATOR_ACCOUNT}},
        "type": "kubernetes.io/service-account-token",
    }))
    .unwrap();
    own.secrets()
        .create(&PostParams::default(), &token_secret)
        .await
        .unwrap();
    // Kubernetes fills it in.
    own.wait_secret("operator-token", "a token", |s| {
        s.data.as_ref().is_some_and(|d| d.contains_key("token"))
    })
    .await;
    own.create("direct", wif_for(OPERATOR_ACCOUNT)).await;
    own.create(
        "legacy",
        json!({"flow": {"sts": {"audience": AUDIENCE}}, "source": {"secret": {"name": "operator-token", "key": "token"}}}),
    )
    .await;
    let mounted = external_account(
        &tenant.google,
        AUDIENCE,
        json!({"credential_source": {"file": "/var/run/secrets/kubernetes.io/serviceaccount/token"}}),
    );
    tenant.put_secret("wif", "config.json", &mounted).await;
    tenant
        .create(
            "mounted",
            git_from(json!({"secret": {"name": "wif", "key": "config.json",
                                       "subjectToken": {"serviceAccountToken": {"serviceAccountName": "default"}}}})),
        )
        .await;
    for (env, name, expected) in [
        (
            &own,
            "direct",
            "is the operator's own ServiceAccount, which is never a source",
        ),
        (
            &own,
            "legacy",
            "holds a ServiceAccount's long-lived token, which is never a source",
        ),
        (tenant, "mounted", "field credential_source.file is not used"),
    ] {
        let tr = env.wait_reason(name, "InvalidSpec").await;
        let message = &ready_condition(&tr).unwrap().message;
        assert!(message.contains(expected), "{name}: {message}");
    }
    assert_eq!(tenant.google.requests().len(), 0, "nothing reached Google");
    // The leak check needs an issued token to look for, besides the operator's own token.
    tenant.caller_token().await;
    let legacy = own.secret("operator-token").await;
    let legacy = String::from_utf8(legacy.data.unwrap()["token"].0.clone()).unwrap();
    tenant.assert_nothing_leaked(&[&legacy]).await;
}
