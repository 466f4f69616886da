//! The world the manifests in `examples/` expect: what the Google emulator must know (the
//! workload identity provider, the operator's own identity, the service accounts the examples
//! impersonate and who may, the connectors), what the operator must be told (`operator_args`), and
//! `kubectl apply` of the examples into a namespace.
//!
//! Shared by the tests (`tests/examples.rs`, `tests/chart.rs`) and the local demo
//! (`src/bin/dev-env.rs`), so the demo runs exactly what the tests prove.

use std::path::PathBuf;

use gcp_token_operator::crd::TokenRequest;

use crate::control_plane::ControlPlane;
use crate::emulator::GoogleEmulator;

/// The directory of example manifests.
pub const EXAMPLES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

/// The STS audience of `examples/sts-serviceaccounttoken.yaml`.
pub const AUDIENCE: &str =
    "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/pool/providers/k8s";
/// The Google service accounts the impersonation examples name (impersonated with the federated
/// token of `wif`).
const SERVICE_ACCOUNTS: [&str; 4] = [
    DEPLOYER,
    "puller@demo-project.iam.gserviceaccount.com",
    "reader@demo-project.iam.gserviceaccount.com",
    "artifact-reader@demo-project.iam.gserviceaccount.com",
];
/// The service account the `deployer` TokenRequest holds tokens of, which calls Developer Connect
/// and generateIdToken in the examples that name `deployer` as their source.
const DEPLOYER: &str = "deployer@demo-project.iam.gserviceaccount.com";
/// The service account the Cloud Run ID token examples get ID tokens for.
const INVOKER: &str = "invoker@demo-project.iam.gserviceaccount.com";
/// The Git repository link of `developerconnect-repository-*.yaml` and `git-credentials.yaml`.
const GIT_REPOSITORY_LINK: &str =
    "projects/demo-project/locations/us-central1/connections/github/gitRepositoryLinks/demo-org-app";
/// The `gitUsername` Developer Connect returns with the link's tokens (GitHub's).
pub const GIT_USERNAME: &str = "x-access-token";
const ACCOUNT_CONNECTOR: &str = "projects/demo-project/locations/us-central1/accountConnectors/github";
const DATA_CONNECTOR: &str = "projects/demo-project/locations/global/collections/jira/dataConnector";
/// The Kubernetes ServiceAccount whose federated identity the impersonation examples use.
const FEDERATED_SERVICE_ACCOUNT: &str = "builder";
/// The operator's own Google identity (the metadata server's), which `examples/ambient.yaml` uses.
const OPERATOR_IDENTITY: &str = "gcp-token-operator@demo-project.iam.gserviceaccount.com";
/// The Google service account `examples/ambient.yaml` impersonates with the operator's identity.
const AMBIENT_TARGET: &str = "auditor@demo-project.iam.gserviceaccount.com";

/// Registers with `google` everything the examples reference, as Google would know it once the
/// pool, the IAM bindings and the connectors are set up, for the examples applied in `namespace`.
pub fn register(google: &GoogleEmulator, namespace: &str) {
    google.add_workload_identity_provider(AUDIENCE);
    // The federated principal of the ServiceAccount, holding the token-creator role.
    let pool = AUDIENCE
        .strip_prefix("//iam.googleapis.com/")
        .and_then(|path| path.split_once("/providers/"))
        .map(|(pool, _)| pool)
        .expect("AUDIENCE is a provider name");
    let principal = format!(
        "principal://iam.googleapis.com/{pool}/subject/system:serviceaccount:{namespace}:{FEDERATED_SERVICE_ACCOUNT}"
    );
    for email in SERVICE_ACCOUNTS {
        google.add_service_account(email, &[&principal]);
    }
    google.set_metadata_service_account(OPERATOR_IDENTITY);
    google.add_service_account(AMBIENT_TARGET, &[&format!("serviceAccount:{OPERATOR_IDENTITY}")]);
    google.add_account_connector(ACCOUNT_CONNECTOR);
    google.add_data_connector(DATA_CONNECTOR);
    // generateIdToken for the invoker: by `deployer` (idtoken-cloudrun.yaml), and by the
    // federated principal in one object (idtoken-federation.yaml). The IAP example's ID token is
    // the metadata server's, for the operator's own identity.
    let deployer = format!("serviceAccount:{DEPLOYER}");
    google.add_service_account(INVOKER, &[&deployer, &principal]);
    // Read tokens of the repository link, fetched with the token `deployer` holds.
    google.add_git_repository_link(GIT_REPOSITORY_LINK, GIT_USERNAME, &[&deployer], &[]);
}

/// The operator flags the examples need in `namespace` besides the Google endpoints: the ambient
/// example may use the operator's own identity there, and the attached pull Secret may patch the
/// `default` ServiceAccount.
pub fn operator_args(namespace: &str) -> [&str; 3] {
    ["--ambient-namespace", namespace, "--service-account-attachment"]
}

/// The example manifests, in name order.
pub fn files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(EXAMPLES_DIR)
        .expect("reading examples/")
        .map(|entry| entry.expect("an entry of examples/").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every TokenRequest in the examples, as the Rust types read it.
pub fn token_requests() -> Vec<TokenRequest> {
    files()
        .iter()
        .flat_map(|path| {
            let text = std::fs::read_to_string(path).expect("reading an example");
            let documents: Vec<serde_json::Value> =
                serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
            documents
        })
        .filter(|document| document["kind"] == "TokenRequest")
        .map(|document| serde_json::from_value(document).expect("an example TokenRequest matches the CRD types"))
        .collect()
}

/// `kubectl apply` of every example into `namespace`, as a user types it; stdout on success, else
/// an error that quotes kubectl.
pub async fn apply(control_plane: &ControlPlane, namespace: &str) -> Result<String, String> {
    let output = control_plane
        .kubectl()
        .args(["apply", "--namespace", namespace, "--filename", EXAMPLES_DIR])
        .output()
        .await
        .map_err(|e| format!("running kubectl: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "kubectl apply failed ({}):\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
