//! What we ship, proven with a real Helm engine on the real control plane: the chart lints, rejects
//! wrong values, installs and uninstalls; `deploy/manifests/` is its default rendering; its RBAC is
//! the reviewed list and is enough for the operator binary, authenticated as the chart's
//! ServiceAccount and configured as the chart's Deployment configures it, to reconcile every
//! example; and the release build links no OpenSSL (the image itself: tests/image.rs).
//!
//! `UPDATE_MANIFESTS=1 cargo test --test chart` regenerates `deploy/manifests/` and the chart's
//! copy of the CRDs.

#[path = "support/helm.rs"]
mod helm;
mod support;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use gcp_token_operator::crd::TokenRequest;
use gcp_token_operator_testkit::{
    control_plane::{ControlPlane, apply_crds, mint_token, wait_for_deletion},
    examples,
};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{Event, Namespace, Secret, ServiceAccount},
        networking::v1::NetworkPolicy,
        rbac::v1::ClusterRole,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use support::{Env, WAIT};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/manifests/gcp-token-operator.yaml");
/// The release and namespace `deploy/manifests/` is rendered for.
const DEFAULT_RELEASE: &str = "gcp-token-operator";

/// Everything the operator may do, reviewed: a new permission is a visible change here.
const REVIEWED_RULES: &[(&str, &str, &[&str])] = &[
    ("gcptoken.dev", "tokenrequests", &["list", "watch"]),
    ("gcptoken.dev", "tokenrequests/status", &["patch"]),
    // Only for clusters enforcing blockOwnerDeletion (not this one): see the chart's _helpers.tpl.
    ("gcptoken.dev", "tokenrequests/finalizers", &["update"]),
    ("", "secrets", &["get", "list", "watch", "create", "patch", "delete"]),
    ("", "serviceaccounts/token", &["create"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    // `spec.rolloutRestartTargets` (on by default; `rolloutRestarts.enabled`).
    ("apps", "deployments", &["patch"]),
    ("apps", "statefulsets", &["patch"]),
    ("apps", "daemonsets", &["patch"]),
    // `spec.secret.attachToServiceAccounts` (the examples' installs enable
    // `serviceAccountAttachment.enabled`): the entries, and the finalizer that removes them.
    ("", "serviceaccounts", &["get", "patch"]),
    ("gcptoken.dev", "tokenrequests", &["patch"]),
];
/// The leader-election Role, in the release namespace only.
const REVIEWED_LEASE_RULES: &[(&str, &str, &[&str])] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "list", "watch", "create", "update"],
)];

fn update_requested() -> bool {
    std::env::var_os("UPDATE_MANIFESTS").is_some()
}

/// A rendered file must equal what is committed; `UPDATE_MANIFESTS=1` writes it instead.
fn assert_committed(path: &Path, rendered: &str) {
    if update_requested() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, rendered).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == rendered,
        "{} is stale: regenerate it with `UPDATE_MANIFESTS=1 cargo test --test chart`",
        path.display()
    );
}

#[tokio::test]
async fn chart_lints_without_warnings() {
    // `--strict` fails on warnings too; informational notes (such as "icon is recommended") may stay.
    let printed = helm::lint(ControlPlane::shared())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(printed.contains("1 chart(s) linted, 0 chart(s) failed"), "{printed}");
    assert!(
        !printed.contains("[WARNING]") && !printed.contains("[ERROR]"),
        "{printed}"
    );
}

#[test]
fn chart_crds_are_the_generated_crds() {
    let generated = Path::new(ROOT).join("crds");
    let chart = Path::new(helm::CHART_DIR).join("crds");
    let files = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    if update_requested() {
        for stale in files(&chart).difference(&files(&generated)) {
            std::fs::remove_file(chart.join(stale)).unwrap();
        }
    }
    assert_eq!(
        files(&chart),
        files(&generated),
        "the chart's crds/ holds other files than crds/"
    );
    assert!(!files(&generated).is_empty());
    for file in files(&generated) {
        assert_committed(
            &chart.join(&file),
            &std::fs::read_to_string(generated.join(&file)).unwrap(),
        );
    }
}

#[tokio::test]
async fn default_install_is_deploy_manifests_hardened_and_uninstalls() {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await;
    let manifest = helm::install(control_plane, DEFAULT_RELEASE, DEFAULT_RELEASE, &json!({}))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // deploy/manifests/ is what Helm applies, and what `helm template` prints without a cluster.
    assert_committed(Path::new(MANIFESTS), &manifest);
    let templated = helm::template(control_plane, DEFAULT_RELEASE, DEFAULT_RELEASE, &json!({}))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(helm::objects(&templated), helm::objects(&manifest));

    let objects = helm::objects(&manifest);
    let mut names = helm::names(&objects);
    names.sort();
    // No ServiceMonitor and no NetworkPolicy: both are opt-in.
    let expected = [
        "ClusterRole/gcp-token-operator",
        "ClusterRoleBinding/gcp-token-operator",
        "Deployment/gcp-token-operator@gcp-token-operator",
        "PodDisruptionBudget/gcp-token-operator@gcp-token-operator",
        "Role/gcp-token-operator-leader-election@gcp-token-operator",
        "RoleBinding/gcp-token-operator-leader-election@gcp-token-operator",
        "Service/gcp-token-operator-metrics@gcp-token-operator",
        "ServiceAccount/gcp-token-operator@gcp-token-operator",
    ];
    assert_eq!(names, expected);

    // Two replicas behind leader election, of which a drain evicts one at a time.
    let deployment = helm::object(&objects, "Deployment", DEFAULT_RELEASE);
    assert_eq!(deployment["spec"]["replicas"], 2);
    let env = container_env(&deployment["spec"]["template"]["spec"]["containers"][0]);
    let var = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    assert_eq!(var("GCP_TOKEN_OPERATOR_LEADER_ELECT"), Some("true"));
    let budget = helm::object(&objects, "PodDisruptionBudget", DEFAULT_RELEASE);
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    assert_eq!(
        budget["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    // The operator knows its own ServiceAccount (never a source); its Google identity is lent to
    // no namespace, and comes from the metadata server.
    assert_eq!(
        var("GCP_TOKEN_OPERATOR_SERVICE_ACCOUNT"),
        Some("gcp-token-operator/gcp-token-operator")
    );
    assert_eq!(var("GCP_TOKEN_OPERATOR_AMBIENT_NAMESPACES"), None);
    // Fairness between namespaces is on; the in-flight cap follows the concurrency.
    assert_eq!(var("GCP_TOKEN_OPERATOR_NAMESPACE_RATE_LIMIT"), Some("100"));
    assert_eq!(var("GCP_TOKEN_OPERATOR_NAMESPACE_MAX_IN_FLIGHT"), None);
    assert_eq!(var("GOOGLE_APPLICATION_CREDENTIALS"), None);
    assert!(deployment["spec"]["template"]["spec"]["volumes"].is_null());

    // The chart's crds/ went in with it (or was there already): the API serves TokenRequests.
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get("tokenrequests.gcptoken.dev")
        .await
        .expect("the CRD is installed");
    assert!(crd.spec.versions.iter().any(|v| v.name == "v1alpha1" && v.served));

    // The Deployment as the API server stored it.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), DEFAULT_RELEASE);
    let deployment = deployments
        .get(DEFAULT_RELEASE)
        .await
        .expect("the Deployment is installed");
    let pod = deployment.spec.clone().template.spec.unwrap();
    let pod_security = pod.security_context.unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(pod_security.run_as_user, Some(65532));
    assert_eq!(pod_security.seccomp_profile.unwrap().type_, "RuntimeDefault");
    assert_eq!(pod.service_account_name.as_deref(), Some(DEFAULT_RELEASE));
    let [container] = pod.containers.as_slice() else {
        panic!("one container expected")
    };
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.privileged, Some(false));
    assert_eq!(security.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
    let resources = container.resources.clone().unwrap();
    for bounds in [resources.requests.unwrap(), resources.limits.unwrap()] {
        assert!(
            bounds.contains_key("cpu") && bounds.contains_key("memory"),
            "{bounds:?}"
        );
    }
    let port = &container.ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.container_port), (Some("http"), 8080));
    let probe_path = |probe: Option<&k8s_openapi::api::core::v1::Probe>| {
        let get = probe.and_then(|p| p.http_get.clone()).expect("an HTTP probe");
        assert_eq!(serde_json::to_value(&get.port).unwrap(), "http");
        get.path
    };
    assert_eq!(
        probe_path(container.liveness_probe.as_ref()).as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        probe_path(container.readiness_probe.as_ref()).as_deref(),
        Some("/readyz")
    );

    // `helm upgrade` with new values changes the installed objects in place.
    let upgraded = helm::upgrade(
        control_plane,
        DEFAULT_RELEASE,
        DEFAULT_RELEASE,
        &json!({"replicaCount": 3}),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        helm::object(&helm::objects(&upgraded), "Deployment", DEFAULT_RELEASE)["spec"]["replicas"],
        3
    );
    let stored = deployments.get(DEFAULT_RELEASE).await.unwrap();
    assert_eq!(stored.spec.replicas, Some(3));
    assert_eq!(stored.metadata.uid, deployment.metadata.uid, "upgraded, not replaced");

    helm::uninstall(control_plane, DEFAULT_RELEASE, DEFAULT_RELEASE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(deployments.get_opt(DEFAULT_RELEASE).await.unwrap().is_none());
    let cluster_roles = Api::<ClusterRole>::all(client);
    assert!(cluster_roles.get_opt(DEFAULT_RELEASE).await.unwrap().is_none());
}

#[tokio::test]
async fn wrong_values_fail_the_install() {
    let control_plane = ControlPlane::shared();
    let cases = [
        (
            json!({"replicaCount": "two"}),
            "at '/replicaCount': got string, want integer",
        ),
        (json!({"logFormat": "xml"}), "at '/logFormat'"),
        (json!({"watchNamespaces": ["Not_A_Name"]}), "at '/watchNamespaces/0'"),
        (
            json!({"google": {"stsEndpoint": "sts.example.com"}}),
            "at '/google/stsEndpoint'",
        ),
        (json!({"metric": {}}), "additional properties 'metric' not allowed"),
        (
            json!({"replicaCount": 2, "leaderElection": {"enabled": false}}),
            "replicaCount > 1 needs leaderElection.enabled",
        ),
        // Two replicas by default: turning leader election off needs one replica.
        (
            json!({"leaderElection": {"enabled": false}}),
            "replicaCount > 1 needs leaderElection.enabled",
        ),
        // The Lease stores whole seconds.
        (
            json!({"leaderElection": {"leaseGrace": "1500ms"}}),
            "at '/leaderElection/leaseGrace'",
        ),
        (
            json!({"ambientNamespaces": ["team-a", "Team_B"]}),
            "at '/ambientNamespaces/1'",
        ),
        (
            json!({"ambientCredentials": {"secretName": "adc", "key": "../key.json"}}),
            "at '/ambientCredentials/key'",
        ),
        (
            json!({"ambientCredentials": {"file": "/adc.json"}}),
            "additional properties 'file' not allowed",
        ),
        (
            json!({"podDisruptionBudget": {"enabled": true, "minAvailable": 1, "maxUnavailable": 1}}),
            "not both",
        ),
        (
            json!({"metrics": {"service": {"enabled": false}, "serviceMonitor": {"enabled": true}}}),
            "needs metrics.service.enabled",
        ),
        (
            json!({"serviceAccount": {"create": false}}),
            "serviceAccount.name must name",
        ),
        (
            json!({"rateLimits": {"google": {"perEndpoint": {"storage": 5}}}}),
            "additional properties 'storage' not allowed",
        ),
        (
            json!({"rateLimits": {"google": {"perSecond": 0}}}),
            "at '/rateLimits/google/perSecond'",
        ),
        // A peer or a selector left empty would admit everyone.
        (
            json!({"metrics": {"networkPolicy": {"enabled": true, "from": [{}]}}}),
            "at '/metrics/networkPolicy/from/0'",
        ),
        (
            json!({"metrics": {"networkPolicy": {"enabled": true, "from": [{"namespaceSelector": {}}]}}}),
            "at '/metrics/networkPolicy/from/0/namespaceSelector'",
        ),
        (
            json!({"metrics": {"networkPolicy": {"enabled": true, "from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}}}),
            "additional properties 'ipBlock' not allowed",
        ),
        (
            json!({"rateLimits": {"perNamespace": {"maxInFlight": -1}}}),
            "at '/rateLimits/perNamespace/maxInFlight'",
        ),
        (
            json!({"google": {"caBundle": {"configMapName": "ca", "secretName": "ca"}}}),
            "configMapName or secretName, not both",
        ),
        (
            json!({"google": {"caBundle": {"configMapName": "ca", "key": "../ca.crt"}}}),
            "at '/google/caBundle/key'",
        ),
    ];
    for (values, expected) in cases {
        match helm::install(control_plane, "rejected", "rejected", &values).await {
            Ok(_) => panic!("installing with {values} succeeded"),
            Err(error) => assert!(error.contains(expected), "{values}: {error}"),
        }
    }
}

#[tokio::test]
async fn optional_objects_and_settings_render_and_install() {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await;
    // The Prometheus Operator's CRD, schemaless: the API server then stores whatever the chart renders.
    let service_monitors: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "names": {"kind": "ServiceMonitor", "plural": "servicemonitors"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object", "x-kubernetes-preserve-unknown-fields": true}}}],
        },
    }))
    .unwrap();
    apply_crds(&client, &[service_monitors]).await.unwrap();
    let digest = format!("sha256:{}", "ab".repeat(32));
    let values = json!({
        "image": {"repository": "registry.example/gcp-token-operator", "digest": digest},
        "replicaCount": 3,
        "concurrency": 4,
        "ambientNamespaces": ["team-a", "team-b"],
        "ambientCredentials": {"secretName": "operator-adc", "key": "adc.json"},
        "logFormat": "text",
        "google": {"stsEndpoint": "https://sts.private.example", "metadataEndpoint": "http://169.254.169.254",
            "caBundle": {"configMapName": "corporate-ca", "key": "bundle.pem"}},
        "commonLabels": {"team": "platform"},
        "commonAnnotations": {"owner": "platform@example.com"},
        "podLabels": {"tier": "control"},
        "podAnnotations": {"scrape": "yes"},
        "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "op@p.iam.gserviceaccount.com"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100,
            "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "gcp-token-operator"}}}}]}},
        "priorityClassName": "system-cluster-critical",
        "metrics": {
            "serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}},
            "networkPolicy": {"enabled": true, "from": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},
                {"podSelector": {"matchExpressions": [{"key": "debug", "operator": "Exists"}]}},
            ]},
        },
        "podDisruptionBudget": {"enabled": true, "minAvailable": 1},
        "rateLimits": {"google": {"perSecond": 40, "perEndpoint": {"sts": 10}, "burst": 5},
            "kubernetes": {"qps": 0, "burst": 50}, "perNamespace": {"mintsPerSecond": 0, "maxInFlight": 3}},
        "refreshSpread": "2m",
        "rolloutRestarts": {"enabled": false},
    });
    let manifest = helm::install(control_plane, "options", "options", &values)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let objects = helm::objects(&manifest);
    for object in &objects {
        let metadata = &object["metadata"];
        assert_eq!(metadata["labels"]["team"], "platform", "{}", metadata["name"]);
        assert_eq!(
            metadata["annotations"]["owner"], "platform@example.com",
            "{}",
            metadata["name"]
        );
    }
    let fullname = "options-gcp-token-operator";
    let service_account = helm::object(&objects, "ServiceAccount", fullname);
    assert_eq!(
        service_account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"],
        "op@p.iam.gserviceaccount.com"
    );

    let deployment = helm::object(&objects, "Deployment", fullname);
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["tier"], "control");
    assert_eq!(pod["metadata"]["annotations"]["scrape"], "yes");
    assert_eq!(pod["spec"]["nodeSelector"], values["nodeSelector"]);
    assert_eq!(pod["spec"]["tolerations"], values["tolerations"]);
    assert_eq!(pod["spec"]["affinity"], values["affinity"]);
    assert_eq!(pod["spec"]["priorityClassName"], "system-cluster-critical");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        format!("registry.example/gcp-token-operator@{digest}")
    );
    let env = container_env(container);
    for (name, value) in [
        ("GCP_TOKEN_OPERATOR_CONCURRENCY", "4"),
        ("GCP_TOKEN_OPERATOR_LOG_FORMAT", "text"),
        ("GCP_TOKEN_OPERATOR_STS_ENDPOINT", "https://sts.private.example"),
        ("GCP_TOKEN_OPERATOR_METADATA_ENDPOINT", "http://169.254.169.254"),
        ("GCP_TOKEN_OPERATOR_LEADER_ELECT", "true"),
        ("GCP_TOKEN_OPERATOR_LEASE_NAMESPACE", "options"),
        (
            "GCP_TOKEN_OPERATOR_SERVICE_ACCOUNT",
            "options/options-gcp-token-operator",
        ),
        ("GCP_TOKEN_OPERATOR_AMBIENT_NAMESPACES", "team-a,team-b"),
        ("GCP_TOKEN_OPERATOR_GOOGLE_RATE_LIMIT", "40,sts=10"),
        ("GCP_TOKEN_OPERATOR_GOOGLE_BURST", "5"),
        ("GCP_TOKEN_OPERATOR_KUBE_QPS", "0"),
        ("GCP_TOKEN_OPERATOR_KUBE_BURST", "50"),
        ("GCP_TOKEN_OPERATOR_REFRESH_SPREAD", "2m"),
        ("GCP_TOKEN_OPERATOR_NAMESPACE_RATE_LIMIT", "0"),
        ("GCP_TOKEN_OPERATOR_NAMESPACE_MAX_IN_FLIGHT", "3"),
        (
            "GOOGLE_APPLICATION_CREDENTIALS",
            "/var/run/secrets/gcp-token-operator/ambient/adc.json",
        ),
        ("SSL_CERT_FILE", "/etc/gcp-token-operator/ca/bundle.pem"),
    ] {
        assert_eq!(
            env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()),
            Some(value),
            "{name}"
        );
    }
    // The ambient credentials file and the CA bundle: that one key of the Secret and of the
    // ConfigMap, read-only where the variables say.
    assert_eq!(
        container["volumeMounts"],
        json!([
            {"name": "ambient-credentials", "mountPath": "/var/run/secrets/gcp-token-operator/ambient", "readOnly": true},
            {"name": "ca-bundle", "mountPath": "/etc/gcp-token-operator/ca", "readOnly": true},
        ])
    );
    assert_eq!(
        pod["spec"]["volumes"],
        json!([
            {"name": "ambient-credentials", "secret": {"secretName": "operator-adc",
                "items": [{"key": "adc.json", "path": "adc.json"}]}},
            {"name": "ca-bundle", "configMap": {"name": "corporate-ca",
                "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}},
        ])
    );
    // Endpoints left empty stay Google's: the operator's defaults apply.
    assert!(
        !env.iter()
            .any(|(n, _)| n == "GCP_TOKEN_OPERATOR_IAM_CREDENTIALS_ENDPOINT")
    );

    // Without rollout restarts the operator may not touch workloads.
    let role = helm::object(&objects, "ClusterRole", fullname);
    assert!(rules(role).iter().all(|(group, _, _)| group != "apps"));

    let budget = helm::object(&objects, "PodDisruptionBudget", fullname);
    assert_eq!(budget["apiVersion"], "policy/v1");
    assert_eq!(budget["spec"]["minAvailable"], 1);
    let monitor = helm::object(&objects, "ServiceMonitor", fullname);
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http");
    // The operator's pods admit the HTTP port only, from the peers given and no one else.
    let policy = helm::object(&objects, "NetworkPolicy", &format!("{fullname}-metrics"));
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{"ports": [{"port": "http", "protocol": "TCP"}], "from": values["metrics"]["networkPolicy"]["from"]}])
    );
    // Installed as rendered.
    for (group, version, kind, plural, name) in [
        (
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            fullname.to_owned(),
        ),
        (
            "monitoring.coreos.com",
            "v1",
            "ServiceMonitor",
            "servicemonitors",
            fullname.to_owned(),
        ),
        (
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
            "networkpolicies",
            format!("{fullname}-metrics"),
        ),
    ] {
        let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), "options", &resource);
        assert!(api.get_opt(&name).await.unwrap().is_some(), "{kind} not installed");
    }
    helm::uninstall(control_plane, "options", "options")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_network_policy_without_peers_admits_no_one() {
    let control_plane = ControlPlane::shared();
    let (release, name) = ("closed", "closed-gcp-token-operator-metrics");
    let values = json!({"metrics": {"networkPolicy": {"enabled": true}}});
    let manifest = helm::install(control_plane, release, release, &values)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let objects = helm::objects(&manifest);
    let rendered = &helm::object(&objects, "NetworkPolicy", name)["spec"];
    assert_eq!(rendered["policyTypes"], json!(["Ingress"]));
    assert_eq!(rendered["ingress"], json!([]));
    // As the API server stored it: ingress isolated, no rule admitting anything.
    let policies: Api<NetworkPolicy> = Api::namespaced(control_plane.client().await, release);
    let stored = policies.get(name).await.expect("the NetworkPolicy is installed");
    let spec = stored.spec.unwrap();
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
    assert!(spec.ingress.unwrap_or_default().is_empty());
    helm::uninstall(control_plane, release, release)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The plain `value`s of a rendered container's env.
fn container_env(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_owned(), e["value"].as_str()?.to_owned())))
        .collect()
}

/// A rule as (API group, resource, sorted verbs).
type Rule = (String, String, Vec<String>);

/// A rendered array of strings.
fn strings(value: &Value) -> Vec<String> {
    let items = value.as_array().unwrap().iter();
    items.map(|s| s.as_str().unwrap().to_owned()).collect()
}

/// The rules of a rendered Role or ClusterRole, one per group and resource, sorted.
fn rules(role: &Value) -> Vec<Rule> {
    let mut rules = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        let mut verbs = strings(&rule["verbs"]);
        verbs.sort();
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                rules.push((group.clone(), resource, verbs.clone()));
            }
        }
    }
    rules.sort();
    rules
}

fn reviewed(list: &[(&str, &str, &[&str])]) -> Vec<Rule> {
    let mut rules: Vec<_> = list
        .iter()
        .map(|(group, resource, verbs)| {
            let mut verbs: Vec<String> = verbs.iter().map(|v| (*v).to_owned()).collect();
            verbs.sort();
            ((*group).to_owned(), (*resource).to_owned(), verbs)
        })
        .collect();
    rules.sort();
    rules
}

/// A cluster-wide operator would also reconcile the other RBAC test's TokenRequests.
static ONE_OPERATOR_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn cluster_rbac_is_the_reviewed_list_and_enough_for_every_flow() {
    let _alone = ONE_OPERATOR_AT_A_TIME.lock().await;
    let env = Env::new("rbac-cluster").await;
    let release = "rbac-cluster";
    let objects = install_for_examples(&env, release, json!({})).await;
    let fullname = format!("{release}-gcp-token-operator");
    assert_eq!(
        rules(helm::object(&objects, "ClusterRole", &fullname)),
        reviewed(REVIEWED_RULES)
    );
    let lease_role = helm::object(&objects, "Role", &format!("{fullname}-leader-election"));
    assert_eq!(rules(lease_role), reviewed(REVIEWED_LEASE_RULES));
    let roles = objects.iter().filter(|o| o["kind"] == "Role").count();
    assert_eq!(roles, 1, "only the leader-election Role: {:?}", helm::names(&objects));

    let operator = ChartOperator::start(&env, release, &objects).await;
    reconcile_every_example(&env, &operator).await;
    finish(&env, release).await;
}

#[tokio::test]
async fn namespaced_rbac_is_enough_for_every_flow_and_confines_the_operator() {
    let _alone = ONE_OPERATOR_AT_A_TIME.lock().await;
    let env = Env::new("rbac-ns").await;
    let release = "rbac-namespaced";
    let objects = install_for_examples(&env, release, json!({"watchNamespaces": [env.namespace]})).await;
    let fullname = format!("{release}-gcp-token-operator");
    assert!(
        !objects
            .iter()
            .any(|o| o["kind"] == "ClusterRole" || o["kind"] == "ClusterRoleBinding"),
        "{:?}",
        helm::names(&objects)
    );
    let role = objects
        .iter()
        .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == fullname.as_str())
        .expect("a Role for the watched namespace");
    assert_eq!(role["metadata"]["namespace"], env.namespace.as_str());
    assert_eq!(rules(role), reviewed(REVIEWED_RULES));
    // The operator is told to watch the namespaces it has Roles in.
    let deployment = helm::object(&objects, "Deployment", &fullname);
    let env_vars = container_env(&deployment["spec"]["template"]["spec"]["containers"][0]);
    assert!(env_vars.contains(&("GCP_TOKEN_OPERATOR_NAMESPACES".to_owned(), env.namespace.clone())));

    let operator = ChartOperator::start(&env, release, &objects).await;
    reconcile_every_example(&env, &operator).await;
    // Nothing beyond the watched namespace.
    let confined = env
        .control_plane
        .client_as_service_account(release, &fullname)
        .await
        .unwrap();
    let forbidden = |result: kube::Result<_>| matches!(result, Err(kube::Error::Api(s)) if s.code == 403);
    let other_secrets: Api<Secret> = Api::namespaced(confined.clone(), "default");
    assert!(forbidden(other_secrets.list(&ListParams::default()).await.map(drop)));
    let all_token_requests: Api<TokenRequest> = Api::all(confined);
    assert!(forbidden(
        all_token_requests.list(&ListParams::default()).await.map(drop)
    ));
    finish(&env, release).await;
}

/// Installs the chart as release `release` in namespace `release`, with the Google endpoints
/// pointing at the test's emulator and `source.ambient` allowed in the examples' namespace (the
/// chart's way of passing `examples::operator_args`), and returns the rendered objects.
async fn install_for_examples(env: &Env<'_>, release: &str, mut values: Value) -> Vec<Value> {
    values["ambientNamespaces"] = json!([env.namespace]);
    values["serviceAccountAttachment"] = json!({"enabled": true});
    let google = env.google.base_url();
    values["google"] = json!({
        "stsEndpoint": google, "iamCredentialsEndpoint": google, "developerConnectEndpoint": google,
        "discoveryEngineEndpoint": google, "oauth2Endpoint": google, "metadataEndpoint": google,
    });
    let manifest = helm::install(env.control_plane, release, release, &values)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    helm::objects(&manifest)
}

async fn finish(env: &Env<'_>, release: &str) {
    helm::uninstall(env.control_plane, release, release)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // So that no later operator finds these TokenRequests.
    Api::<Namespace>::all(env.client.clone())
        .delete(&env.namespace, &DeleteParams::default())
        .await
        .unwrap();
}

/// The operator binary run the way the chart's Deployment runs it: its args and environment
/// (the pod name from the downward API stood in for), authenticated as the chart's ServiceAccount
/// with a token from the TokenRequest API, so every call it makes goes through the chart's RBAC.
struct ChartOperator {
    child: Child,
    log_path: PathBuf,
    pod_name: String,
    lease: (String, String),
    _dir: tempfile::TempDir,
}

impl ChartOperator {
    async fn start(env: &Env<'_>, release: &str, objects: &[Value]) -> ChartOperator {
        let deployment = helm::object(objects, "Deployment", &format!("{release}-gcp-token-operator"));
        let pod = &deployment["spec"]["template"]["spec"];
        let service_account = pod["serviceAccountName"].as_str().unwrap();
        let (token, _) = mint_token(&env.client, release, service_account, &[], 3600)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            token_kubeconfig(env.control_plane.kubeconfig_path(), &token),
        )
        .unwrap();

        let container = &pod["containers"][0];
        let mut vars = container_env(container);
        let pod_name = format!("{release}-operator-0");
        vars.push(("POD_NAME".to_owned(), pod_name.clone()));
        vars.retain(|(name, _)| name != "GCP_TOKEN_OPERATOR_HTTP_ADDR");
        let http_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        vars.push(("GCP_TOKEN_OPERATOR_HTTP_ADDR".to_owned(), http_addr.to_string()));
        let var = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap();
        let lease = (
            var("GCP_TOKEN_OPERATOR_LEASE_NAMESPACE"),
            var("GCP_TOKEN_OPERATOR_LEASE_NAME"),
        );
        let args = strings(&container["args"]);

        let log_path = dir.path().join("operator.log");
        let log = std::fs::File::create(&log_path).unwrap();
        // Only what the pod would have: its environment, not the test's.
        let child = Command::new(env!("CARGO_BIN_EXE_gcp-token-operator"))
            .args(args)
            .env_clear()
            .envs(vars)
            .env("KUBECONFIG", &kubeconfig)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the operator");
        ChartOperator {
            child,
            log_path,
            pod_name,
            lease,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for ChartOperator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The admin kubeconfig with its user's credentials replaced by `token`.
fn token_kubeconfig(admin: &Path, token: &str) -> String {
    let mut config: Value = serde_saphyr::from_str(&std::fs::read_to_string(admin).unwrap()).unwrap();
    for user in config["users"].as_array_mut().unwrap() {
        user["user"] = json!({"token": token});
    }
    config.to_string()
}

/// Applies the examples and waits for each to be Ready; then renames one Secret (the operator
/// deletes the old one), and checks the Events and the Lease the operator wrote, and that the API
/// server denied it nothing.
async fn reconcile_every_example(env: &Env<'_>, operator: &ChartOperator) {
    examples::register(&env.google, &env.namespace);
    examples::apply(env.control_plane, &env.namespace)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log = || operator.log();
    let examples = examples::token_requests();
    for example in &examples {
        env.wait_ready_logged(&example.name_any(), &log).await;
    }

    // A Secret no other example reads, renamed: the old one must go (the `delete` verb).
    let sources: BTreeSet<String> = examples
        .iter()
        .flat_map(|tr| {
            let source = &tr.spec.source;
            let secret = source.secret.as_ref().map(|s| s.name.clone());
            let upstream = source.token_request.as_ref().map(|t| t.name.clone());
            secret.into_iter().chain(upstream)
        })
        .collect();
    let leaf = examples
        .iter()
        .find(|tr| !sources.contains(&tr.name_any()) && !sources.contains(&tr.secret_name()))
        .expect("an example no other example reads");
    let (old, new) = (leaf.secret_name(), format!("{}-renamed", leaf.secret_name()));
    let rename = json!({"spec": {"secret": {"name": new}}});
    env.token_requests()
        .patch(&leaf.name_any(), &PatchParams::default(), &Patch::Merge(&rename))
        .await
        .unwrap();
    env.wait_secret(&new, "the renamed Secret", |_| true).await;
    wait_for_deletion(&env.secrets(), &old, WAIT, &log)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Events about every example (events.k8s.io, read back through core/v1).
    let events = Api::<Event>::namespaced(env.client.clone(), &env.namespace)
        .list(&ListParams::default())
        .await
        .unwrap();
    for example in &examples {
        let name = example.name_any();
        assert!(
            events
                .items
                .iter()
                .any(|e| e.involved_object.name.as_deref() == Some(name.as_str())),
            "no Event about {name}"
        );
    }
    // The attached example's entries are on its ServiceAccounts (get and patch on them), and go
    // with its TokenRequest (patch on TokenRequests, for the finalizer).
    let attached = examples
        .iter()
        .find(|tr| !tr.spec.secret.attach_to_service_accounts.is_empty())
        .expect("an example attaching its Secret to ServiceAccounts")
        .name_any();
    let entries = env
        .wait_tr(&attached, "its ServiceAccount attachments", |tr| {
            tr.status
                .as_ref()
                .is_some_and(|s| !s.attached_service_accounts.is_empty())
        })
        .await
        .status
        .unwrap()
        .attached_service_accounts;
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.namespace);
    let pull_secrets = |account: ServiceAccount| -> Vec<String> {
        account
            .image_pull_secrets
            .into_iter()
            .flatten()
            .map(|r| r.name)
            .collect()
    };
    for entry in &entries {
        let listed = pull_secrets(accounts.get(&entry.service_account).await.unwrap());
        assert!(listed.contains(&entry.secret), "{entry:?} not in {listed:?}");
    }
    env.delete(&attached).await;
    wait_for_deletion(&env.token_requests(), &attached, WAIT, &log)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for entry in &entries {
        let listed = pull_secrets(accounts.get(&entry.service_account).await.unwrap());
        assert!(!listed.contains(&entry.secret), "{entry:?} still in {listed:?}");
    }

    // This replica leads, on the Lease the chart gives it rights to.
    let (lease_namespace, lease_name) = &operator.lease;
    let lease = Api::<Lease>::namespaced(env.client.clone(), lease_namespace)
        .get(lease_name)
        .await
        .expect("the operator created its Lease");
    let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert!(holder.starts_with(&operator.pod_name), "Lease held by {holder:?}");

    let log = operator.log();
    assert!(
        !log.contains("forbidden"),
        "the API server denied the operator something:\n{log}"
    );
    for token in env.google.issued_tokens() {
        assert!(!log.contains(&token), "a token appears in the operator log");
    }
}

/// The operator's own dependency tree (what `cargo install` and the image build): TLS by rustls,
/// no OpenSSL, and no test code (the test kit is a dev-dependency only).
#[test]
fn release_build_pulls_in_no_openssl_and_no_test_code() {
    let output = Command::new(env!("CARGO"))
        .current_dir(ROOT)
        .args([
            "tree",
            "--locked",
            "--offline",
            "--package",
            "gcp-token-operator",
            "--edges",
            "normal",
        ])
        .args(["--prefix", "none", "--format", "{p}"])
        .output()
        .expect("running cargo tree");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let packages: BTreeSet<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect();
    for tls in ["rustls", "aws-lc-rs"] {
        assert!(
            packages.contains(tls),
            "{tls} missing: the tree is not what this test expects"
        );
    }
    for openssl in ["openssl", "openssl-sys", "native-tls"] {
        assert!(!packages.contains(openssl), "the release build depends on {openssl}");
    }
    for test_code in ["gcp-token-operator-testkit", "rcgen", "tempfile", "proptest"] {
        assert!(
            !packages.contains(test_code),
            "the release build depends on {test_code}"
        );
    }
}
