//! Smoke tests of the control-plane harness: the Kubernetes features the operator's tests rely on
//! work, and no process or directory outlives its owner.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{StreamExt as _, TryStreamExt as _};
use gcp_token_operator_testkit::control_plane::{
    ControlPlane, apply_crds, create_namespace, create_service_account, mint_token, sweep_stale_dirs, wait_for,
    wait_for_deletion,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Admin client and a fresh namespace on the shared control plane.
async fn setup(prefix: &str) -> (Client, String) {
    let client = ControlPlane::shared().client().await;
    let namespace = create_namespace(&client, prefix).await.unwrap();
    (client, namespace)
}

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).unwrap()
}

fn no_diagnostics() -> String {
    String::new()
}

#[tokio::test]
async fn server_kubectl_and_helm_report_the_pinned_release() {
    let control_plane = ControlPlane::shared();
    let server = control_plane.client().await.apiserver_version().await.unwrap();
    // A version stamped at build time: an unstamped build reports v0.0.0-master, which Helm's
    // kubeVersion checks and kubectl's skew warning would misread.
    let minor: u32 = server.minor.parse().unwrap();
    assert_eq!(server.major, "1");
    assert!(minor >= 34, "{server:?}");
    assert_eq!(
        server.git_version,
        format!("v1.{minor}.{}", server.git_version.rsplit('.').next().unwrap())
    );
    assert_eq!(server.git_tree_state, "clean");

    let output = control_plane
        .kubectl()
        .args(["version", "--output", "json"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let versions: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(versions["serverVersion"]["gitVersion"], server.git_version);
    assert_eq!(versions["clientVersion"]["gitVersion"], server.git_version);

    // Helm sees the server's version as charts' `kubeVersion` constraints do.
    let output = control_plane
        .helm()
        .args(["version", "--short"])
        .output()
        .await
        .unwrap();
    let helm = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && helm.starts_with("v4."), "{helm}");
}

#[tokio::test]
async fn secrets_can_be_created_listed_and_watched() {
    let (client, namespace) = setup("secrets").await;
    let secrets = Api::<Secret>::namespaced(client, &namespace);
    let ours = "app=substrate";
    let before = secrets.list(&ListParams::default().labels(ours)).await.unwrap();
    assert!(before.items.is_empty());
    let from = before.metadata.resource_version.unwrap();

    let secret: Secret = from_json(json!({
        "metadata": {"name": "plain", "labels": {"app": "substrate"}},
        "stringData": {"key": "value"},
    }));
    secrets.create(&PostParams::default(), &secret).await.unwrap();

    let listed = secrets.list(&ListParams::default().labels(ours)).await.unwrap();
    let names: Vec<_> = listed
        .items
        .iter()
        .map(|secret| secret.metadata.name.as_deref().unwrap())
        .collect();
    assert_eq!(names, ["plain"]);
    assert_eq!(listed.items[0].data.as_ref().unwrap()["key"].0, b"value".to_vec());

    let mut events = secrets
        .watch(&WatchParams::default().labels(ours), &from)
        .await
        .unwrap()
        .boxed();
    let first = tokio::time::timeout(TIMEOUT, events.try_next()).await.unwrap().unwrap();
    match first {
        Some(WatchEvent::Added(secret)) => assert_eq!(secret.metadata.name.unwrap(), "plain"),
        other => panic!("expected the ADDED event, got {other:?}"),
    }
}

#[tokio::test]
async fn repeated_server_side_apply_is_a_no_op() {
    let (client, namespace) = setup("ssa").await;
    let secrets = Api::<Secret>::namespaced(client, &namespace);
    let desired = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "applied"},
        "stringData": {"token": "abc"},
    });
    let params = PatchParams::apply("substrate-test");
    let first = secrets
        .patch("applied", &params, &Patch::Apply(&desired))
        .await
        .unwrap();
    let second = secrets
        .patch("applied", &params, &Patch::Apply(&desired))
        .await
        .unwrap();
    assert_eq!(first.data.unwrap()["token"].0, b"abc".to_vec());
    assert_eq!(first.metadata.resource_version, second.metadata.resource_version);
}

#[tokio::test]
async fn token_request_mints_a_token_with_the_requested_claims() {
    let (client, namespace) = setup("tokens").await;
    create_service_account(&client, &namespace, "minter").await.unwrap();
    let requested_at = k8s_openapi::jiff::Timestamp::now().as_second();
    let (token, expiration) = mint_token(&client, &namespace, "minter", &["gto-audience"], 3600)
        .await
        .unwrap();

    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], json!(["gto-audience"]));
    assert_eq!(claims["sub"], format!("system:serviceaccount:{namespace}:minter"));
    let exp = claims["exp"].as_i64().unwrap();
    assert_eq!(exp, expiration.0.as_second());
    let lifetime = exp - requested_at;
    assert!((3590..=3610).contains(&lifetime), "token lives {lifetime} s");
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_dependents() {
    let (client, namespace) = setup("gc").await;
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    let secrets = Api::<Secret>::namespaced(client, &namespace);
    let owner = config_maps
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "owner"}})),
        )
        .await
        .unwrap();
    let dependent: Secret = from_json(json!({
        "metadata": {
            "name": "dependent",
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": "owner",
                "uid": owner.metadata.uid.unwrap(),
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
    }));
    secrets.create(&PostParams::default(), &dependent).await.unwrap();

    config_maps.delete("owner", &DeleteParams::default()).await.unwrap();
    wait_for_deletion(&secrets, "dependent", TIMEOUT, &no_diagnostics)
        .await
        .unwrap();
}

#[tokio::test]
async fn rbac_governs_service_account_clients() {
    let (client, namespace) = setup("rbac").await;
    create_service_account(&client, &namespace, "reader").await.unwrap();
    let as_reader = ControlPlane::shared()
        .client_as_service_account(&namespace, "reader")
        .await
        .unwrap();
    let secrets = Api::<Secret>::namespaced(as_reader, &namespace);

    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }

    let role: Role = from_json(json!({
        "metadata": {"name": "secret-reader"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}],
    }));
    let binding: RoleBinding = from_json(json!({
        "metadata": {"name": "reader-reads-secrets"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secret-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    }));
    Api::<Role>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(client, &namespace)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    // The authorizer sees RBAC objects through an informer, so the grant takes a moment.
    let deadline = Instant::now() + TIMEOUT;
    while let Err(error) = secrets.list(&ListParams::default()).await {
        assert!(Instant::now() < deadline, "still failing after the grant: {error}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn crds_with_cel_rules_are_applied_established_and_enforced() {
    let client = ControlPlane::shared().client().await;
    let crd: CustomResourceDefinition = from_json(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.substrate.example.com"},
        "spec": {
            "group": "substrate.example.com",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "x-kubernetes-validations": [{"rule": "self.size > 0", "message": "size must be positive"}],
                        "properties": {"size": {"type": "integer"}},
                    }},
                }},
            }],
        },
    }));
    // Twice: applying is idempotent.
    for _ in 0..2 {
        apply_crds(&client, std::slice::from_ref(&crd)).await.unwrap();
    }
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let applied = wait_for(
        &crds,
        "widgets.substrate.example.com",
        TIMEOUT,
        "served version v1",
        |crd| crd.spec.versions.iter().any(|version| version.served),
        &no_diagnostics,
    )
    .await
    .unwrap();
    assert_eq!(applied.spec.names.kind, "Widget");
    let spec_schema = &applied.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap()
        .properties
        .as_ref()
        .unwrap()["spec"];
    assert_eq!(spec_schema.x_kubernetes_validations.as_ref().map(Vec::len), Some(1));

    // The apiserver evaluates the rule: a Widget breaking it is refused with the rule's message.
    let namespace = create_namespace(&client, "cel").await.unwrap();
    let resource = kube::api::ApiResource {
        group: "substrate.example.com".into(),
        version: "v1".into(),
        api_version: "substrate.example.com/v1".into(),
        kind: "Widget".into(),
        plural: "widgets".into(),
    };
    let widgets = Api::<kube::api::DynamicObject>::namespaced_with(client, &namespace, &resource);
    let widget = |name: &str, size: i64| -> kube::api::DynamicObject {
        from_json(json!({"apiVersion": "substrate.example.com/v1", "kind": "Widget",
                         "metadata": {"name": name}, "spec": {"size": size}}))
    };
    widgets.create(&PostParams::default(), &widget("big", 3)).await.unwrap();
    let refused = widgets
        .create(&PostParams::default(), &widget("empty", 0))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = refused else {
        panic!("{refused}")
    };
    assert_eq!(status.code, 422);
    assert!(
        status.message.contains("spec: Invalid value") && status.message.contains("size must be positive"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn wait_for_reports_the_object_and_diagnostics_on_timeout() {
    let (client, namespace) = setup("wait").await;
    let config_maps = Api::<ConfigMap>::namespaced(client, &namespace);
    config_maps
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "stuck"}, "data": {"phase": "pending"}})),
        )
        .await
        .unwrap();
    let error = wait_for(
        &config_maps,
        "stuck",
        Duration::from_millis(500),
        "phase done",
        |map| map.data.as_ref().is_some_and(|data| data["phase"] == "done"),
        &|| "operator log line".to_owned(),
    )
    .await
    .unwrap_err();
    for expected in ["phase done", "ConfigMap stuck", "phase: pending", "operator log line"] {
        assert!(error.contains(expected), "{expected:?} missing in:\n{error}");
    }
    assert!(!error.contains("managedFields"), "{error}");
}

/// Pids of live processes whose command line mentions `dir`: the control plane's processes all name
/// files in their directory.
fn processes_using(dir: &Path) -> Vec<u32> {
    let dir = dir.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let pid = entry.ok()?.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline).contains(dir).then_some(pid)
        })
        .collect()
}

fn wait_until_no_processes_use(dir: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while !processes_using(dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes outlived their owner: {:?}",
            processes_using(dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn api_server_restarts_in_place_and_drop_cleans_up() {
    // Not the shared instance: the other tests use it meanwhile.
    let control_plane = ControlPlane::start().await.unwrap();
    let dir = control_plane.log_dir().to_owned();
    let client = control_plane.client().await;
    let config_maps = Api::<ConfigMap>::namespaced(client, "default");
    config_maps
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "survivor"}})),
        )
        .await
        .unwrap();

    control_plane.stop_api_server().await.unwrap();
    let namespaces = Api::<Namespace>::all(control_plane.client().await);
    assert!(namespaces.list(&ListParams::default()).await.is_err());

    control_plane.start_api_server().await.unwrap();
    let namespaces = Api::<Namespace>::all(control_plane.client().await);
    assert!(!namespaces.list(&ListParams::default()).await.unwrap().items.is_empty());
    // Same etcd, and a client from before the restart reconnects.
    config_maps.get("survivor").await.unwrap();

    assert_eq!(processes_using(&dir).len(), 3);
    drop(control_plane);
    assert_eq!(processes_using(&dir), Vec::<u32>::new());
    assert!(!dir.exists());
}

/// Starts the `dev-env` binary and returns it with its control plane's directory.
fn start_dev_env() -> (Child, PathBuf) {
    let mut dev_env = Command::new(env!("CARGO_BIN_EXE_dev-env"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(dev_env.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let kubeconfig = line
        .trim()
        .strip_prefix("export KUBECONFIG=")
        .unwrap_or_else(|| panic!("dev-env printed {line:?}"));
    let dir = Path::new(kubeconfig).parent().unwrap().to_owned();
    assert_eq!(processes_using(&dir).len(), 3);
    (dev_env, dir)
}

#[test]
fn dev_env_tears_down_on_sigterm() {
    let (mut dev_env, dir) = start_dev_env();
    let pid = libc::pid_t::try_from(dev_env.id()).unwrap();
    // SAFETY: plain syscall; `dev_env` is not reaped yet, so the pid is still its own.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(dev_env.wait().unwrap().success());
    assert_eq!(processes_using(&dir), Vec::<u32>::new());
    assert!(!dir.exists());
}

#[test]
fn killed_dev_env_leaves_no_processes_and_its_directory_is_swept() {
    let (mut dev_env, dir) = start_dev_env();
    // SIGKILL: no cleanup code runs, only the kernel's parent-death signal.
    dev_env.kill().unwrap();
    dev_env.wait().unwrap();
    wait_until_no_processes_use(&dir);
    sweep_stale_dirs();
    assert!(!dir.exists());
}
