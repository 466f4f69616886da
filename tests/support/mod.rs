//! What the operator tests share: a namespace on the shared control plane, a Google emulator, and
//! the real operator binary running against both, with its log captured.

#![allow(dead_code)] // each test binary uses its own subset

pub mod sources;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use gcp_token_operator::crd::TokenRequest;
use gcp_token_operator_testkit::{
    control_plane::{ControlPlane, apply_crds, create_namespace, mint_token, wait_for},
    emulator::GoogleEmulator,
    operator::{OperatorOptions, OperatorProcess},
};
use k8s_openapi::api::core::v1::{Event, Secret, ServiceAccount};
use kube::{
    Api, Client, CustomResourceExt,
    api::{DeleteParams, ListParams, PostParams},
    config::{AuthInfo, Kubeconfig},
};
use serde_json::Value;

pub const AUDIENCE: &str =
    "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/pool/providers/k8s";
pub const WAIT: Duration = Duration::from_secs(60);

/// One test's world: its own namespace and emulator, and an operator watching that namespace.
pub struct Env<'a> {
    pub control_plane: &'a ControlPlane,
    pub client: Client,
    pub namespace: String,
    pub google: Arc<GoogleEmulator>,
    pub operator: Option<OperatorProcess>,
    /// The operator's kubeconfig when not the control plane's admin one.
    pub operator_kubeconfig: Option<PathBuf>,
    logs: Arc<tempfile::TempDir>,
    /// Operator runs so far, shared with `in_namespace` views.
    runs: Arc<AtomicUsize>,
}

impl Env<'static> {
    /// On the control plane shared by the test binary.
    pub async fn new(prefix: &str) -> Env<'static> {
        Env::on(ControlPlane::shared(), prefix).await
    }
}

impl<'a> Env<'a> {
    /// On a control plane of the test's own (e.g. one the test restarts).
    pub async fn on(control_plane: &'a ControlPlane, prefix: &str) -> Env<'a> {
        let client = control_plane.client().await;
        apply_crds(&client, &[TokenRequest::crd()])
            .await
            .expect("installing the CRD");
        let namespace = create_namespace(&client, prefix).await.expect("creating the namespace");
        let google = GoogleEmulator::start().await.expect("starting the Google emulator");
        google.add_workload_identity_provider(AUDIENCE);
        let logs = tempfile::tempdir().expect("a temp dir for logs");
        Env {
            control_plane,
            client,
            namespace,
            google: Arc::new(google),
            operator: None,
            operator_kubeconfig: None,
            logs: Arc::new(logs),
            runs: Arc::default(),
        }
    }

    /// The same world (control plane, emulator, operator log) seen from another namespace: the
    /// namespace-scoped helpers act there. The view holds no operator of its own.
    pub fn in_namespace(&self, namespace: &str) -> Env<'a> {
        Env {
            control_plane: self.control_plane,
            client: self.client.clone(),
            namespace: namespace.into(),
            google: self.google.clone(),
            operator: None,
            operator_kubeconfig: None,
            logs: self.logs.clone(),
            runs: self.runs.clone(),
        }
    }

    /// Starts the operator binary (again), watching this test's namespace only.
    pub fn start_operator(&mut self) {
        self.operator = Some(self.spawn_operator(&[]));
    }

    /// Starts one more operator process for this namespace with extra flags; its log joins
    /// `operator_log`.
    pub fn spawn_operator(&mut self, extra_args: &[&str]) -> OperatorProcess {
        let namespaces = [self.namespace.clone()];
        self.spawn_operator_watching(&namespaces, extra_args)
    }

    /// As `spawn_operator`, watching `namespaces` (empty: all, as one controller).
    pub fn spawn_operator_watching(&mut self, namespaces: &[String], extra_args: &[&str]) -> OperatorProcess {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let log_path = self.logs.path().join(format!("operator-{run}.log"));
        let args: Vec<&str> = ["--concurrency", "4"].iter().chain(extra_args).copied().collect();
        let options = OperatorOptions {
            binary: Path::new(env!("CARGO_BIN_EXE_gcp-token-operator")),
            kubeconfig: self
                .operator_kubeconfig
                .as_deref()
                .unwrap_or(self.control_plane.kubeconfig_path()),
            namespaces,
            google: &self.google.base_url(),
            log_path,
            // Debug lines too, so the leak check covers everything the operator can log.
            log_filter: "info,gcp_token_operator=debug",
            extra_args: &args,
        };
        OperatorProcess::spawn(options).expect("starting the operator binary")
    }

    /// Kills the operator at once (SIGKILL), as a crash or an eviction would.
    pub fn kill_operator(&mut self) {
        if let Some(mut operator) = self.operator.take() {
            operator.kill();
        }
    }

    /// Writes to `path` a kubeconfig for this control plane that authenticates as ServiceAccount
    /// `namespace/name` (with a two-hour token), so an operator run with it has exactly the
    /// permissions RBAC grants that account.
    pub async fn write_kubeconfig_as(&self, namespace: &str, name: &str, path: &Path) {
        let (token, _) = mint_token(&self.client, namespace, name, &[], 7200)
            .await
            .expect("a ServiceAccount token");
        let mut config = Kubeconfig::read_from(self.control_plane.kubeconfig_path()).expect("the admin kubeconfig");
        for user in &mut config.auth_infos {
            user.auth_info = Some(AuthInfo {
                token: Some(token.clone().into()),
                ..AuthInfo::default()
            });
        }
        // JSON is YAML.
        std::fs::write(path, serde_json::to_string(&config).unwrap()).expect("writing a kubeconfig");
    }

    /// Everything every operator run of this test logged.
    pub fn operator_log(&self) -> String {
        (1..=self.runs.load(Ordering::SeqCst))
            .map(|run| {
                std::fs::read_to_string(self.logs.path().join(format!("operator-{run}.log"))).unwrap_or_default()
            })
            .collect()
    }

    pub fn token_requests(&self) -> Api<TokenRequest> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub async fn create(&self, name: &str, spec: Value) -> TokenRequest {
        let tr: TokenRequest = serde_json::from_value(serde_json::json!({
            "apiVersion": "gcptoken.dev/v1alpha1",
            "kind": "TokenRequest",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("a TokenRequest");
        self.token_requests()
            .create(&PostParams::default(), &tr)
            .await
            .expect("creating a TokenRequest")
    }

    pub async fn delete(&self, name: &str) {
        self.token_requests()
            .delete(name, &DeleteParams::default())
            .await
            .expect("deleting a TokenRequest");
    }

    /// Waits until `predicate` holds for TokenRequest `name`; on timeout, fails with the object,
    /// its events and the operator log.
    pub async fn wait_tr(&self, name: &str, what: &str, predicate: impl Fn(&TokenRequest) -> bool) -> TokenRequest {
        let log = || self.operator_log();
        wait_for(&self.token_requests(), name, WAIT, what, predicate, &log)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn wait_ready(&self, name: &str) -> TokenRequest {
        self.wait_tr(name, "Ready=True", |tr| ready_status(tr) == Some("True"))
            .await
    }

    /// As `wait_ready`, for an operator this Env did not start: `log` is its log, for the failure.
    pub async fn wait_ready_logged(&self, name: &str, log: &dyn Fn() -> String) {
        wait_for(
            &self.token_requests(),
            name,
            WAIT,
            "Ready=True",
            |tr| ready_status(tr) == Some("True"),
            log,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    pub async fn wait_reason(&self, name: &str, reason: &str) -> TokenRequest {
        self.wait_tr(name, &format!("Ready reason {reason}"), |tr| {
            ready_reason(tr) == Some(reason)
        })
        .await
    }

    pub async fn wait_secret(&self, name: &str, what: &str, predicate: impl Fn(&Secret) -> bool) -> Secret {
        let log = || self.operator_log();
        wait_for(&self.secrets(), name, WAIT, what, predicate, &log)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn secret(&self, name: &str) -> Secret {
        self.secrets().get(name).await.expect("reading a Secret")
    }

    /// Stores `value` under `key` in a plain Secret of this namespace (a caller credential).
    pub async fn put_secret(&self, name: &str, key: &str, value: &str) {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name},
            "stringData": {key: value},
        }))
        .unwrap();
        self.secrets()
            .create(&PostParams::default(), &secret)
            .await
            .expect("creating a Secret");
    }

    pub async fn create_service_account(&self, name: &str) {
        let account: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<ServiceAccount>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &account)
            .await
            .expect("creating a ServiceAccount");
    }

    /// The world of an impersonation test: `service_account` exists and anyone may impersonate
    /// it, its tokens live `lifetime`, and Secret `caller` (key `token`) holds a caller token.
    pub async fn prepare_impersonation(&self, service_account: &str, lifetime: Duration) {
        self.google.add_service_account(service_account, &["*"]);
        self.google.set_lifetime(
            gcp_token_operator_testkit::emulator::Endpoint::GenerateAccessToken,
            lifetime,
        );
        let caller = self.caller_token().await;
        self.put_secret("caller", "token", &caller).await;
    }

    /// A valid access token issued by the emulator (from its metadata server), for callers.
    pub async fn caller_token(&self) -> String {
        self.google
            .set_metadata_service_account("caller@proj.iam.gserviceaccount.com");
        let url = format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token",
            self.google.base_url()
        );
        let body: Value = reqwest::Client::new()
            .get(url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .expect("metadata token")
            .json()
            .await
            .expect("metadata JSON");
        body["access_token"].as_str().expect("access_token").to_string()
    }

    /// No token the emulator ever issued appears in the operator's log, in an Event, or in a
    /// TokenRequest's status or spec. Called at the end of every test.
    pub async fn assert_no_token_leaked(&self) {
        self.assert_nothing_leaked(&[]).await;
    }

    /// As `assert_no_token_leaked`, for `secrets` too (private keys, refresh tokens, client
    /// secrets, subject tokens the test gave the operator), and in every namespace (a test may
    /// use several).
    pub async fn assert_nothing_leaked(&self, secrets: &[&str]) {
        let tokens = self.google.issued_tokens();
        assert!(
            !tokens.is_empty(),
            "the test issued no token, so the leak check would prove nothing"
        );
        let log = self.operator_log();
        assert!(!log.is_empty(), "the operator logged nothing");
        let events = Api::<Event>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .expect("listing events");
        let events = serde_json::to_string(&events).unwrap();
        let token_requests = Api::<TokenRequest>::all(self.client.clone());
        let objects = serde_json::to_string(&token_requests.list(&ListParams::default()).await.unwrap()).unwrap();
        for token in tokens.iter().map(String::as_str).chain(secrets.iter().copied()) {
            assert!(!log.contains(token), "a token appears in the operator log");
            assert!(!events.contains(token), "a token appears in an Event");
            assert!(!objects.contains(token), "a token appears in a TokenRequest");
        }
    }
}

/// Impersonation of `service_account` with the caller token that `prepare_impersonation` stores.
pub fn impersonation_from_caller(service_account: &str) -> Value {
    serde_json::json!({
        "flow": {"impersonation": {"serviceAccount": service_account,
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}},
        "source": {"secret": {"name": "caller", "key": "token"}},
    })
}

pub fn ready_condition(tr: &TokenRequest) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    tr.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")
}

pub fn ready_status(tr: &TokenRequest) -> Option<&str> {
    ready_condition(tr).map(|c| c.status.as_str())
}

pub fn ready_reason(tr: &TokenRequest) -> Option<&str> {
    ready_condition(tr).map(|c| c.reason.as_str())
}

pub fn fingerprint(tr: &TokenRequest) -> Option<String> {
    tr.status.as_ref()?.token_fingerprint.clone()
}

/// The token in an Opaque Secret written by the operator.
pub fn secret_token(secret: &Secret) -> String {
    let data = secret.data.as_ref().expect("Secret data");
    String::from_utf8(data["token"].0.clone()).expect("UTF-8 token")
}
