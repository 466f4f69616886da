//! The chart's opt-in ValidatingAdmissionPolicy (docs/admission-policy.md) on the real API server:
//! installed with two profiles, it denies what each profile's namespaces may not name (flow,
//! source, service account, delegate, audience, lifetime, lifetime syntax), with a message naming
//! the field and its value, and only there; a namespace both profiles select must satisfy both; an
//! update that breaks a profile is denied, the operator's status writes never are; the API server's
//! type check of the policy against the CRD finds nothing; and `helm uninstall` removes it.

#[path = "support/helm.rs"]
#[allow(dead_code)] // this test uses some of the helpers
mod helm;
mod support;

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use gcp_token_operator::{controller::FIELD_MANAGER, crd::TokenRequest};
use gcp_token_operator_testkit::control_plane::{ControlPlane, apply_crds, create_namespace};
use k8s_openapi::api::{
    admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
    core::v1::ConfigMap,
};
use kube::{
    Api, CustomResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use support::WAIT;

/// Used by no other test.
const RELEASE: &str = "admission-policy";
/// The chart's full name for that release.
const FULLNAME: &str = "admission-policy-gcp-token-operator";
const POLICY: &str = "admission-policy-gcp-token-operator-restrictions";
const BINDING_A: &str = "admission-policy-gcp-token-operator-team-a";
const BINDING_B: &str = "admission-policy-gcp-token-operator-restricted";
/// Namespace labels the profiles select, as a platform team would set them.
const TENANT: &str = "gcptoken.dev/tenant";
const TIER: &str = "gcptoken.dev/tier";

const POOL_A: &str = "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/team-a/providers/k8s";
const POOL_B: &str = "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/team-b/providers/k8s";
const SA_A: &str = "builder@team-a.iam.gserviceaccount.com";
const SA_A2: &str = "deployer@team-a.iam.gserviceaccount.com";
const SA_B: &str = "builder@team-b.iam.gserviceaccount.com";

// Sources, as YAML under `source:`.
const SA_TOKEN: &str = "serviceAccountToken: {serviceAccountName: builder}";
const SECRET: &str = "secret: {name: caller, key: token}";
const TOKEN_REQUEST: &str = "tokenRequest: {name: upstream}";
const AMBIENT: &str = "ambient: {}";

/// Profile `team-a` for namespaces labelled `tenant=team-a`, profile `restricted` for those
/// labelled `tier=restricted` (by an expression, the other form of selector).
fn values() -> Value {
    json!({"admissionPolicy": {"enabled": true, "profiles": [
        {
            "name": "team-a",
            "namespaceSelector": {"matchLabels": {TENANT: "team-a"}},
            "flows": ["sts", "impersonation", "idToken"],
            "sources": ["serviceAccountToken", "secret"],
            "serviceAccounts": [r".*@team-a\.iam\.gserviceaccount\.com"],
            "audiences": [r"//iam\.googleapis\.com/projects/123/locations/global/workloadIdentityPools/team-a/providers/.*"],
            "maxLifetime": "1h",
        },
        {
            "name": "restricted",
            "namespaceSelector": {"matchExpressions": [{"key": TIER, "operator": "In", "values": ["restricted"]}]},
            "flows": ["impersonation"],
            "maxLifetime": "30m",
        },
    ]}})
}

#[tokio::test]
async fn admission_policy_restricts_what_token_requests_name_per_namespace() {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await;
    apply_crds(&client, &[TokenRequest::crd()])
        .await
        .expect("installing the CRD");
    let files = tempfile::tempdir().expect("a temp dir");
    let kubectl = Kubectl {
        control_plane,
        dir: files.path().to_path_buf(),
    };
    let release_namespace = new_namespace(&client, "admission-ops").await;
    let team_a = new_namespace(&client, "admission-a").await;
    let restricted = new_namespace(&client, "admission-r").await;
    let both = new_namespace(&client, "admission-ar").await;
    let free = new_namespace(&client, "admission-free").await;
    let (team_a, restricted, both, free) = (team_a.as_str(), restricted.as_str(), both.as_str(), free.as_str());
    // As the platform team labels its tenants' namespaces.
    for (namespace, labels) in [
        (team_a, vec![format!("{TENANT}=team-a")]),
        (restricted, vec![format!("{TIER}=restricted")]),
        (both, vec![format!("{TENANT}=team-a"), format!("{TIER}=restricted")]),
    ] {
        let mut args = vec!["label", "namespace", namespace];
        args.extend(labels.iter().map(String::as_str));
        kubectl.run(&args).await.unwrap_or_else(|e| panic!("{e}"));
    }

    // Created before the policy, and against it: a flow team-a may not use.
    let legacy = developer_connect(AMBIENT);
    kubectl
        .apply(team_a, "legacy", &legacy)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let manifest = helm::install(control_plane, &release_namespace, RELEASE, &values())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let objects = helm::objects(&manifest);
    let policy = helm::object(&objects, "ValidatingAdmissionPolicy", POLICY);
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    assert_eq!(
        policy["spec"]["paramKind"],
        json!({"apiVersion": "v1", "kind": "ConfigMap"})
    );
    assert_eq!(
        policy["spec"]["matchConstraints"]["resourceRules"],
        json!([{"apiGroups": ["gcptoken.dev"], "apiVersions": ["v1alpha1"],
            "operations": ["CREATE", "UPDATE"], "resources": ["tokenrequests"]}])
    );
    // Each profile's restrictions, as strings in a ConfigMap of the release namespace.
    let params_a = helm::object(&objects, "ConfigMap", &format!("{FULLNAME}-policy-team-a"));
    assert_eq!(params_a["metadata"]["namespace"], release_namespace.as_str());
    assert_eq!(
        params_a["data"],
        json!({
            "flows": "sts,impersonation,idToken",
            "sources": "serviceAccountToken,secret",
            "serviceAccounts": r"^(?:(?:.*@team-a\.iam\.gserviceaccount\.com))$",
            "audiences": r"^(?:(?://iam\.googleapis\.com/projects/123/locations/global/workloadIdentityPools/team-a/providers/.*))$",
            "maxLifetime": "1h",
        })
    );
    let params_b = helm::object(&objects, "ConfigMap", &format!("{FULLNAME}-policy-restricted"));
    assert_eq!(
        params_b["data"],
        json!({"flows": "impersonation", "maxLifetime": "30m"})
    );
    let binding = helm::object(&objects, "ValidatingAdmissionPolicyBinding", BINDING_B);
    assert_eq!(binding["spec"]["policyName"], POLICY);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert_eq!(
        binding["spec"]["paramRef"],
        json!({"name": format!("{FULLNAME}-policy-restricted"), "namespace": release_namespace,
            "parameterNotFoundAction": "Deny"})
    );
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"],
        values()["admissionPolicy"]["profiles"][1]["namespaceSelector"]
    );

    // The API server takes a moment to load a new policy and its bindings.
    kubectl
        .wait_until_denied(&[
            (team_a, legacy.as_str(), BINDING_A),
            (restricted, legacy.as_str(), BINDING_B),
        ])
        .await;
    assert_policy_type_checks(&client).await;

    let cases: Vec<(&str, &str, String, Outcome)> = vec![
        // team-a: within every restriction.
        (
            team_a,
            "sts-within",
            sts(POOL_A, Some((SA_A, &[SA_A2], Some("30m"))), SA_TOKEN),
            Allowed,
        ),
        (
            team_a,
            "impersonation-at-limit",
            impersonation(SA_A, &[], Some("1h"), SECRET),
            Allowed,
        ),
        // Unset means Google's 1h: within team-a's limit.
        (
            team_a,
            "impersonation-default",
            impersonation(SA_A, &[], None, SECRET),
            Allowed,
        ),
        (
            team_a,
            "audience-within",
            sts(
                POOL_A,
                None,
                &format!("serviceAccountToken: {{serviceAccountName: builder, audience: '{POOL_A}'}}"),
            ),
            Allowed,
        ),
        (
            team_a,
            "id-token-within",
            id_token(SA_A, &[SA_A2], Some(POOL_A), SA_TOKEN),
            Allowed,
        ),
        // team-a: one case per restriction.
        (
            team_a,
            "id-token-service-account",
            id_token(SA_B, &[], None, SECRET),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.idToken.serviceAccount: service account \"{SA_B}\" is not allowed in namespace {team_a}"
                ),
            ),
        ),
        (
            team_a,
            "id-token-delegate",
            id_token(SA_A, &[SA_B], None, SECRET),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.idToken.delegates[0]: service account \"{SA_B}\" is not allowed in namespace {team_a}"
                ),
            ),
        ),
        (
            team_a,
            "id-token-federation",
            id_token(SA_A, &[], Some(POOL_B), SA_TOKEN),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.idToken.federation.audience: audience \"{POOL_B}\" is not allowed in namespace {team_a}"
                ),
            ),
        ),
        (
            team_a,
            "flow",
            developer_connect(SECRET),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow: flow developerConnect is not allowed in namespace {team_a} (allowed: sts, impersonation, idToken)"
                ),
            ),
        ),
        (
            team_a,
            "source",
            impersonation(SA_A, &[], None, TOKEN_REQUEST),
            Denied(
                BINDING_A,
                format!(
                    "spec.source: source tokenRequest is not allowed in namespace {team_a} (allowed: serviceAccountToken, secret)"
                ),
            ),
        ),
        (
            team_a,
            "service-account",
            impersonation(SA_B, &[], None, SECRET),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.impersonation.serviceAccount: service account \"{SA_B}\" is not allowed in namespace {team_a} (allowed: names matching ^(?:(?:.*@team-a\\.iam\\.gserviceaccount\\.com))$)"
                ),
            ),
        ),
        // The whole name must match, not a part of it.
        (
            team_a,
            "service-account-suffix",
            impersonation(&format!("{SA_A}.evil.example"), &[], None, SECRET),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.impersonation.serviceAccount: service account \"{SA_A}.evil.example\" is not allowed"
                ),
            ),
        ),
        (
            team_a,
            "sts-service-account",
            sts(POOL_A, Some((SA_B, &[], None)), SA_TOKEN),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.sts.serviceAccountImpersonation.serviceAccount: service account \"{SA_B}\" is not allowed in namespace {team_a}"
                ),
            ),
        ),
        (
            team_a,
            "delegate",
            impersonation(SA_A, &[SA_A2, SA_B], None, SECRET),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.impersonation.delegates[1]: service account \"{SA_B}\" is not allowed in namespace {team_a}"
                ),
            ),
        ),
        (
            team_a,
            "sts-delegate",
            sts(POOL_A, Some((SA_A, &[SA_B], None)), SA_TOKEN),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.sts.serviceAccountImpersonation.delegates[0]: service account \"{SA_B}\" is not allowed in namespace {team_a}"
                ),
            ),
        ),
        (
            team_a,
            "audience",
            sts(POOL_B, None, SA_TOKEN),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.sts.audience: audience \"{POOL_B}\" is not allowed in namespace {team_a} (allowed: audiences matching ^(?:(?://iam\\.googleapis\\.com/projects/123/locations/global/workloadIdentityPools/team-a/providers/.*))$)"
                ),
            ),
        ),
        (
            team_a,
            "token-audience",
            sts(
                POOL_A,
                None,
                "serviceAccountToken: {serviceAccountName: builder, audience: vault}",
            ),
            Denied(
                BINDING_A,
                format!(
                    "spec.source.serviceAccountToken.audience: audience \"vault\" is not allowed in namespace {team_a}"
                ),
            ),
        ),
        (
            team_a,
            "subject-token-audience",
            impersonation(
                SA_A,
                &[],
                None,
                "secret:\n  name: wif\n  key: credentials.json\n  format: externalAccount\n  subjectToken:\n    serviceAccountToken: {serviceAccountName: builder, audience: vault}",
            ),
            Denied(
                BINDING_A,
                format!(
                    "spec.source.secret.subjectToken.serviceAccountToken.audience: audience \"vault\" is not allowed in namespace {team_a}"
                ),
            ),
        ),
        (
            team_a,
            "lifetime",
            impersonation(SA_A, &[], Some("2h"), SECRET),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.impersonation.lifetime: lifetime \"2h\" exceeds the maximum 1h allowed in namespace {team_a}"
                ),
            ),
        ),
        (
            team_a,
            "sts-lifetime",
            sts(POOL_A, Some((SA_A, &[], Some("1h1s"))), SA_TOKEN),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.sts.serviceAccountImpersonation.lifetime: lifetime \"1h1s\" exceeds the maximum 1h allowed in namespace {team_a}"
                ),
            ),
        ),
        // The CRD takes humantime ("1h 30m", "45min"); under a limit, only Go syntax, never a
        // policy error.
        (
            team_a,
            "lifetime-syntax",
            impersonation(SA_A, &[], Some("1h 30m"), SECRET),
            Denied(
                BINDING_A,
                format!(
                    "spec.flow.impersonation.lifetime: lifetime \"1h 30m\" cannot be checked against the maximum 1h of namespace {team_a}; write it as e.g. 1h30m"
                ),
            ),
        ),
        (
            team_a,
            "lifetime-syntax-short",
            sts(POOL_A, Some((SA_A, &[], Some("45min"))), SA_TOKEN),
            Denied(
                BINDING_A,
                "spec.flow.sts.serviceAccountImpersonation.lifetime: lifetime \"45min\" cannot be checked".into(),
            ),
        ),
        // restricted: any account, any source, impersonation only, at most 30m.
        (
            restricted,
            "within",
            impersonation(SA_B, &[], Some("15m"), AMBIENT),
            Allowed,
        ),
        (
            restricted,
            "flow",
            sts(POOL_A, None, SA_TOKEN),
            Denied(
                BINDING_B,
                format!("spec.flow: flow sts is not allowed in namespace {restricted} (allowed: impersonation)"),
            ),
        ),
        (
            restricted,
            "lifetime-default",
            impersonation(SA_B, &[], None, AMBIENT),
            Denied(
                BINDING_B,
                format!(
                    "spec.flow.impersonation.lifetime: unset, Google's default of 1h exceeds the maximum 30m allowed in namespace {restricted}"
                ),
            ),
        ),
        // Selected by both profiles: each one's restrictions apply.
        (
            both,
            "within-both",
            impersonation(SA_A, &[], Some("20m"), SECRET),
            Allowed,
        ),
        (
            both,
            "team-a-allows",
            sts(POOL_A, None, SA_TOKEN),
            Denied(
                BINDING_B,
                format!("spec.flow: flow sts is not allowed in namespace {both} (allowed: impersonation)"),
            ),
        ),
        (
            both,
            "restricted-allows",
            impersonation(SA_B, &[], Some("20m"), AMBIENT),
            Denied(
                BINDING_A,
                format!("spec.source: source ambient is not allowed in namespace {both}"),
            ),
        ),
        (
            both,
            "lifetime",
            impersonation(SA_A, &[], Some("45m"), SECRET),
            Denied(
                BINDING_B,
                format!(
                    "spec.flow.impersonation.lifetime: lifetime \"45m\" exceeds the maximum 30m allowed in namespace {both}"
                ),
            ),
        ),
        // A namespace no profile selects: anything the CRD takes.
        (free, "anything", developer_connect(AMBIENT), Allowed),
        (
            free,
            "long",
            impersonation(SA_B, &[SA_A], Some("2days"), TOKEN_REQUEST),
            Allowed,
        ),
    ];
    let mut failures = Vec::new();
    for (namespace, name, spec, outcome) in &cases {
        let result = kubectl.apply(namespace, name, spec).await;
        if let Err(failure) = outcome.check(result) {
            failures.push(format!("{namespace}/{name}: {failure}\n{spec}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // An update that breaks the policy is denied, and the object stays as it was.
    let raised = impersonation(SA_A, &[], Some("3h"), SECRET);
    Denied(
        BINDING_A,
        format!(
            "spec.flow.impersonation.lifetime: lifetime \"3h\" exceeds the maximum 1h allowed in namespace {team_a}"
        ),
    )
    .check(kubectl.apply(team_a, "impersonation-at-limit", &raised).await)
    .unwrap_or_else(|e| panic!("updating: {e}"));
    let stored = kubectl
        .run(&[
            "get",
            "tokenrequest",
            "impersonation-at-limit",
            "-n",
            team_a,
            "-o",
            "jsonpath={.spec.flow.impersonation.lifetime}",
        ])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored, "1h");

    // The TokenRequest created before the policy: the operator's status writes (server-side apply
    // of tokenrequests/status, as the chart's ServiceAccount) go through; so do changes that leave
    // the spec alone; a change of its spec must satisfy the policy.
    let operator = control_plane
        .client_as_service_account(&release_namespace, FULLNAME)
        .await
        .expect("a client as the chart's ServiceAccount");
    let status = json!({
        "apiVersion": "gcptoken.dev/v1alpha1",
        "kind": "TokenRequest",
        "status": {"flow": "developerConnect", "failedAttempts": 1},
    });
    Api::<TokenRequest>::namespaced(operator, team_a)
        .patch_status(
            "legacy",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await
        .expect("the operator's status write is not subject to the policy");
    let written = kubectl
        .run(&[
            "get",
            "tokenrequest",
            "legacy",
            "-n",
            team_a,
            "-o",
            "jsonpath={.status.flow}",
        ])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(written, "developerConnect");
    kubectl
        .run(&["label", "tokenrequest", "legacy", "-n", team_a, "reviewed=true"])
        .await
        .unwrap_or_else(|e| panic!("labelling a TokenRequest that predates the policy: {e}"));
    Denied(
        BINDING_A,
        format!("spec.flow: flow developerConnect is not allowed in namespace {team_a}"),
    )
    .check(kubectl.apply(team_a, "legacy", &developer_connect(SECRET)).await)
    .unwrap_or_else(|e| panic!("changing the spec of a TokenRequest that predates the policy: {e}"));

    // Uninstalled, the policy, its bindings and its ConfigMaps are gone, and nothing is denied.
    helm::uninstall(control_plane, &release_namespace, RELEASE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let policies = Api::<ValidatingAdmissionPolicy>::all(client.clone());
    assert!(
        policies.get_opt(POLICY).await.unwrap().is_none(),
        "the policy outlived the release"
    );
    let ours = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
    let bindings = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .list(&ours)
        .await
        .unwrap();
    assert!(bindings.items.is_empty(), "bindings outlived the release");
    let params = Api::<ConfigMap>::namespaced(client.clone(), &release_namespace)
        .list(&ours)
        .await
        .unwrap();
    assert!(params.items.is_empty(), "policy ConfigMaps outlived the release");
    kubectl
        .wait_until_allowed(team_a, "flow", &developer_connect(SECRET))
        .await;
}

#[tokio::test]
async fn wrong_admission_policy_values_fail_the_install() {
    let control_plane = ControlPlane::shared();
    let profile = |extra: Value| {
        let mut profile = json!({"name": "team-a", "namespaceSelector": {"matchLabels": {TENANT: "team-a"}}});
        profile
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"admissionPolicy": {"enabled": true, "profiles": [profile]}})
    };
    let cases = [
        (
            json!({"admissionPolicy": {"enabled": true}}),
            "admissionPolicy.enabled needs at least one entry in admissionPolicy.profiles",
        ),
        (
            profile(json!({"name": "Team_A"})),
            "at '/admissionPolicy/profiles/0/name'",
        ),
        (
            profile(json!({"flows": ["oauth"]})),
            "at '/admissionPolicy/profiles/0/flows/0'",
        ),
        (
            profile(json!({"sources": ["file"]})),
            "at '/admissionPolicy/profiles/0/sources/0'",
        ),
        (
            profile(json!({"maxLifetime": "1h 30m"})),
            "at '/admissionPolicy/profiles/0/maxLifetime'",
        ),
        (
            profile(json!({"maxLifetime": "2days"})),
            "at '/admissionPolicy/profiles/0/maxLifetime'",
        ),
        (
            profile(json!({"lifetime": "1h"})),
            "additional properties 'lifetime' not allowed",
        ),
        (
            profile(json!({"serviceAccounts": ["(.*@team-a"]})),
            r#"admissionPolicy.profiles[team-a].serviceAccounts: "(.*@team-a" is not an RE2 regular expression"#,
        ),
        // It would close the group it is wrapped in, and be matched unanchored.
        (
            profile(json!({"audiences": [".*)|(.*"]})),
            r#"admissionPolicy.profiles[team-a].audiences: ".*)|(.*" is not an RE2 regular expression"#,
        ),
        (
            json!({"admissionPolicy": {"enabled": true, "profiles": [
                {"name": "team-a", "namespaceSelector": {}},
                {"name": "team-a", "namespaceSelector": {}},
            ]}}),
            r#"admissionPolicy.profiles: the name "team-a" is used more than once"#,
        ),
        (
            json!({"admissionPolicy": {"enabled": true, "profiles": [{"name": "team-a"}]}}),
            "missing property 'namespaceSelector'",
        ),
    ];
    for (values, expected) in cases {
        match helm::install(control_plane, "rejected-admission", "rejected-admission", &values).await {
            Ok(_) => panic!("installing with {values} succeeded"),
            Err(error) => assert!(error.contains(expected), "{values}: {error}"),
        }
    }
    // Rendered without a cluster, Helm cannot know whether one serves ValidatingAdmissionPolicy;
    // the chart says so and how to tell it.
    let error = helm::template(control_plane, "rendered", "rendered", &profile(json!({})))
        .await
        .expect_err("rendering without the API version");
    assert!(
        error.contains("admissionPolicy.enabled needs ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1")
            && error.contains("--api-versions admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"),
        "{error}"
    );
}

enum Outcome {
    Allowed,
    /// Denied by the binding named, with a message containing this.
    Denied(&'static str, String),
}
use Outcome::{Allowed, Denied};

impl Outcome {
    fn check(&self, result: Result<String, String>) -> Result<(), String> {
        match (self, result) {
            (Allowed, Ok(_)) => Ok(()),
            (Allowed, Err(error)) => Err(format!("denied: {error}")),
            (Denied(..), Ok(printed)) => Err(format!("allowed: {printed}")),
            (Denied(binding, message), Err(error)) => {
                let expected = format!(
                    "is forbidden: ValidatingAdmissionPolicy '{POLICY}' with binding '{binding}' denied request: "
                );
                match error.find(&expected) {
                    Some(at) if error[at + expected.len()..].starts_with(message.as_str()) => Ok(()),
                    _ => Err(format!("expected a denial saying {expected}{message}\ngot: {error}")),
                }
            }
        }
    }
}

/// `kubectl`, run as a user runs it, on files written to `dir`.
struct Kubectl<'a> {
    control_plane: &'a ControlPlane,
    dir: PathBuf,
}

impl Kubectl<'_> {
    /// `kubectl ARGS`: stdout on success, else stderr.
    async fn run(&self, args: &[&str]) -> Result<String, String> {
        let output = self
            .control_plane
            .kubectl()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("running kubectl: {e}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        match output.status.success() {
            true => Ok(stdout),
            false => Err(format!(
                "kubectl {} failed ({}): {stderr}{stdout}",
                args.join(" "),
                output.status
            )),
        }
    }

    /// Writes TokenRequest `namespace/name` with `spec` (YAML) to a file and runs `kubectl apply -f
    /// FILE` (and `extra` flags).
    async fn apply_with(&self, namespace: &str, name: &str, spec: &str, extra: &[&str]) -> Result<String, String> {
        let file = self.dir.join(format!("{namespace}-{name}.yaml"));
        std::fs::write(&file, token_request(namespace, name, spec)).expect("writing a manifest");
        let file = file.to_str().expect("a UTF-8 path");
        let mut args = vec!["apply", "-f", file];
        args.extend(extra);
        self.run(&args).await
    }

    async fn apply(&self, namespace: &str, name: &str, spec: &str) -> Result<String, String> {
        self.apply_with(namespace, name, spec, &[]).await
    }

    /// Until each `(namespace, spec, binding)` is denied by `binding` (a server-side dry run, so
    /// nothing is created): the policy and those bindings are in force.
    async fn wait_until_denied(&self, probes: &[(&str, &str, &str)]) {
        let deadline = Instant::now() + WAIT;
        for (namespace, spec, binding) in probes {
            let expected = format!("with binding '{binding}' denied request");
            loop {
                let result = self.apply_with(namespace, "probe", spec, &["--dry-run=server"]).await;
                match result {
                    Err(error) if error.contains(&expected) => break,
                    result if Instant::now() > deadline => {
                        panic!("binding {binding} not in force in {namespace} after {WAIT:?}: {result:?}")
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
    }

    /// Until `spec` is allowed in `namespace` (a server-side dry run).
    async fn wait_until_allowed(&self, namespace: &str, name: &str, spec: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.apply_with(namespace, name, spec, &["--dry-run=server"]).await {
                Ok(_) => return,
                Err(error) if Instant::now() > deadline => panic!("still denied after {WAIT:?}: {error}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

async fn new_namespace(client: &kube::Client, prefix: &str) -> String {
    create_namespace(client, prefix).await.expect("creating a namespace")
}

/// kube-controller-manager's `validatingadmissionpolicy-status-controller` type-checks a policy
/// against the schemas of what it matches (the CRD) and of its params (ConfigMap), and writes the
/// result to its status.
async fn assert_policy_type_checks(client: &kube::Client) {
    let policies = Api::<ValidatingAdmissionPolicy>::all(client.clone());
    let deadline = Instant::now() + WAIT;
    let checked = loop {
        let policy = policies.get(POLICY).await.expect("reading the policy");
        let status = policy.status.clone().unwrap_or_default();
        if status.observed_generation.is_some() && status.observed_generation == policy.metadata.generation {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the policy was not type-checked within {WAIT:?}: {:?}",
            policy.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let warnings = checked
        .type_checking
        .expect("the type check ran")
        .expression_warnings
        .unwrap_or_default();
    assert!(warnings.is_empty(), "the policy's type check warns: {warnings:#?}");
}

fn token_request(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: gcptoken.dev/v1alpha1\nkind: TokenRequest\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{}",
        indent(spec, 2)
    )
}

fn indent(text: &str, by: usize) -> String {
    text.lines().map(|line| format!("{:by$}{line}\n", "")).collect()
}

/// `spec` YAML: impersonation of `service_account` through `delegates`, from `source`.
fn impersonation(service_account: &str, delegates: &[&str], lifetime: Option<&str>, source: &str) -> String {
    let mut spec = format!(
        "flow:\n  impersonation:\n    serviceAccount: {service_account}\n    scopes: [https://www.googleapis.com/auth/cloud-platform]\n"
    );
    if !delegates.is_empty() {
        spec += &format!("    delegates: [{}]\n", delegates.join(", "));
    }
    if let Some(lifetime) = lifetime {
        spec += &format!("    lifetime: \"{lifetime}\"\n");
    }
    spec + "source:\n" + &indent(source, 2)
}

/// `spec` YAML: an STS exchange at `audience`, then optionally impersonation of (service account,
/// delegates, lifetime), from `source`.
fn sts(audience: &str, then: Option<(&str, &[&str], Option<&str>)>, source: &str) -> String {
    let mut spec = format!("flow:\n  sts:\n    audience: '{audience}'\n");
    if let Some((service_account, delegates, lifetime)) = then {
        spec += &format!("    serviceAccountImpersonation:\n      serviceAccount: {service_account}\n");
        if !delegates.is_empty() {
            spec += &format!("      delegates: [{}]\n", delegates.join(", "));
        }
        if let Some(lifetime) = lifetime {
            spec += &format!("      lifetime: \"{lifetime}\"\n");
        }
    }
    spec + "source:\n" + &indent(source, 2)
}

/// `spec` YAML: an ID token for `service_account` through `delegates`, after STS at `federation`
/// if given, from `source`.
fn id_token(service_account: &str, delegates: &[&str], federation: Option<&str>, source: &str) -> String {
    let mut spec =
        format!("flow:\n  idToken:\n    audience: https://hello.a.run.app\n    serviceAccount: {service_account}\n");
    if !delegates.is_empty() {
        spec += &format!("    delegates: [{}]\n", delegates.join(", "));
    }
    if let Some(audience) = federation {
        spec += &format!("    federation: {{audience: '{audience}'}}\n");
    }
    spec + "source:\n" + &indent(source, 2)
}

fn developer_connect(source: &str) -> String {
    "flow:\n  developerConnect:\n    accountConnector: projects/p/locations/global/accountConnectors/github\nsource:\n"
        .to_owned()
        + &indent(source, 2)
}
