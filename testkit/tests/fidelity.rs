//! Google's own Go client libraries judge the emulator: `testkit/fidelity` (a Go program using
//! `golang.org/x/oauth2/google`, `google.golang.org/api` and `cloud.google.com/go/compute/metadata`)
//! runs against it through the intercepting proxy, configured only as a real user would
//! configure it, and both what the libraries got and what the emulator saw are checked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gcp_token_operator_testkit::emulator::{Endpoint, GoogleEmulator};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

const PROVIDER: &str = "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/pool/providers/k8s";
const POOL: &str = "projects/123456/locations/global/workloadIdentityPools/pool";
const SUBJECT: &str = "system:serviceaccount:build:deployer";
const TARGET_SA: &str = "deployer@proj.iam.gserviceaccount.com";
const METADATA_SA: &str = "node@proj.iam.gserviceaccount.com";
const AUDIENCE: &str = "https://hello.example.com";
/// Not the emulator's default, so that the libraries' expiries show they read the answers.
const LIFETIME: Duration = Duration::from_secs(20 * 60);
/// What the Go program asks `impersonate.CredentialsTokenSource` for.
const IMPERSONATION_LIFETIME: Duration = Duration::from_secs(15 * 60);

fn module() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fidelity")
}

fn go() -> PathBuf {
    gcp_token_operator_testkit::go::toolchain()
        .expect("Go is required for the fidelity test: put `go` on PATH or install it in /usr/local/go")
}

/// `go SUBCOMMAND` in the module, with its checksums as committed and the local toolchain.
fn go_command(args: &[&str]) -> Command {
    let mut command = Command::new(go());
    command
        .current_dir(module())
        .args(args)
        .env("GOFLAGS", "-mod=readonly -buildvcs=false")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0");
    command
}

fn run_go(args: &[&str]) {
    let output = go_command(args).output().expect("running go");
    assert!(
        output.status.success(),
        "`go {}` in {} failed (are the modules in go.mod served by the module proxy?):\n{}{}",
        args.join(" "),
        module().display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The program, built once per test binary; Go's build cache makes later builds quick.
fn program() -> &'static Path {
    static PROGRAM: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_dir, binary) = PROGRAM.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("fidelity");
        run_go(&["build", "-o", binary.to_str().unwrap(), "."]);
        (dir, binary)
    });
    binary
}

#[test]
fn fidelity_program_passes_go_vet() {
    run_go(&["vet", "./..."]);
}

/// One line of the program's output.
#[derive(Debug, Deserialize)]
struct Check {
    check: String,
    token_sha256: Option<String>,
    expires_in_seconds: Option<u64>,
    #[serde(default)]
    values: HashMap<String, String>,
}

/// Runs the program in `mode` with nothing in its environment but `env`: a user's settings.
fn run_program(mode: &str, args: &[String], env: Vec<(String, String)>) -> Vec<Check> {
    let home = tempfile::tempdir().unwrap();
    let output = Command::new(program())
        .arg(mode)
        .args(args)
        .env_clear()
        // No gcloud configuration of the machine's user can count.
        .env("HOME", home.path())
        .envs(env)
        .output()
        .expect("running the fidelity program");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the fidelity program failed ({}):\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// The emulator's tokens by SHA-256, as the program reports them.
fn issued_by_digest(emulator: &GoogleEmulator) -> HashMap<String, String> {
    let digest = |token: &String| format!("{:x}", Sha256::digest(token.as_bytes()));
    emulator.issued_tokens().into_iter().map(|t| (digest(&t), t)).collect()
}

/// Checks that `check` returned a token the emulator issued at `endpoint` for `principal`, and
/// that the library's expiry is the emulator's.
fn assert_issued(emulator: &GoogleEmulator, checks: &[Check], check: &str, endpoint: Endpoint, principal: &str) {
    let line = checks
        .iter()
        .find(|c| c.check == check)
        .unwrap_or_else(|| panic!("no {check} in {checks:?}"));
    let digest = line.token_sha256.as_deref().expect("a token digest");
    let token = issued_by_digest(emulator).remove(digest).unwrap_or_else(|| {
        panic!("{check}: the library returned a token the emulator did not issue");
    });
    let issued = emulator.token_info(&token).unwrap();
    assert_eq!(
        (issued.endpoint, issued.principal.as_str()),
        (endpoint, principal),
        "{check}"
    );
    let remaining = issued.expires_at.duration_since(SystemTime::now()).unwrap_or_default();
    let reported = Duration::from_secs(line.expires_in_seconds.expect("an expiry"));
    assert!(
        reported.abs_diff(remaining) < Duration::from_secs(30),
        "{check}: the library says {reported:?} left, the emulator {remaining:?}"
    );
}

/// Every request reached an emulated API under the Google host the library chose.
fn assert_routed_hosts(emulator: &GoogleEmulator) {
    for request in emulator.requests() {
        let host = request
            .headers
            .iter()
            .find(|(name, _)| name == "host")
            .map(|(_, v)| v.as_str());
        let expected = match request.endpoint {
            Some(Endpoint::Sts) => "sts.googleapis.com",
            Some(Endpoint::GenerateAccessToken | Endpoint::GenerateIdToken) => "iamcredentials.googleapis.com",
            Some(Endpoint::Certs) => "www.googleapis.com",
            // Go's metadata client calls GCE_METADATA_HOST itself, not through the proxy.
            Some(Endpoint::Metadata | Endpoint::MetadataIdentity | Endpoint::MetadataValue) => {
                &emulator.base_url()["http://".len()..]
            }
            other => panic!(
                "{} {}: not an API this test expects ({other:?})",
                request.method, request.path
            ),
        };
        assert_eq!(host, Some(expected), "{} {}", request.method, request.path);
    }
}

/// A Kubernetes-style service account token for the provider; the emulator checks its claims.
fn subject_token() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let part = |value: serde_json::Value| URL_SAFE_NO_PAD.encode(value.to_string());
    let header = part(json!({"alg": "RS256", "kid": "k8s", "typ": "JWT"}));
    let claims = part(json!({
        "iss": "https://kubernetes.default.svc", "aud": format!("https:{PROVIDER}"), "sub": SUBJECT,
        "iat": now, "exp": now + 3600,
    }));
    format!("{header}.{claims}.c2lnbmF0dXJl")
}

fn with_lifetimes(emulator: &GoogleEmulator) {
    for endpoint in [
        Endpoint::Sts,
        Endpoint::GenerateAccessToken,
        Endpoint::GenerateIdToken,
        Endpoint::Metadata,
        Endpoint::MetadataIdentity,
    ] {
        emulator.set_lifetime(endpoint, LIFETIME);
    }
}

fn lifetime_arg() -> String {
    format!("{}s", LIFETIME.as_secs())
}

#[tokio::test(flavor = "multi_thread")]
async fn go_libraries_federate_impersonate_and_validate_id_tokens() {
    let emulator = GoogleEmulator::start().await.unwrap();
    with_lifetimes(&emulator);
    emulator.add_workload_identity_provider(PROVIDER);
    let federated = format!("principal://iam.googleapis.com/{POOL}/subject/{SUBJECT}");
    emulator.add_service_account(TARGET_SA, &[&federated]);
    let proxy = emulator.start_intercepting_proxy().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, subject_token()).unwrap();
    // As `gcloud iam workload-identity-pools create-cred-config` writes them.
    let mut config = json!({
        "universe_domain": "googleapis.com",
        "type": "external_account",
        "audience": PROVIDER,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "https://sts.googleapis.com/v1/token",
        "credential_source": { "file": token_file },
    });
    let plain_config = dir.path().join("credentials.json");
    std::fs::write(&plain_config, config.to_string()).unwrap();
    config["service_account_impersonation_url"] = json!(format!(
        "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{TARGET_SA}:generateAccessToken"
    ));
    let impersonated_config = dir.path().join("impersonated.json");
    std::fs::write(&impersonated_config, config.to_string()).unwrap();

    let with_credentials = |config: &Path| {
        let mut env = proxy.env();
        env.push(("GOOGLE_APPLICATION_CREDENTIALS".into(), config.to_string_lossy().into()));
        env
    };
    let args = [
        "-target",
        TARGET_SA,
        "-audience",
        AUDIENCE,
        "-lifetime",
        &lifetime_arg(),
    ]
    .map(str::to_owned);
    let federation_args = [
        args.as_slice(),
        &[
            "-impersonated-config".to_owned(),
            impersonated_config.to_string_lossy().into_owned(),
        ],
    ]
    .concat();
    let env = with_credentials(&plain_config);
    let mut checks = tokio::task::spawn_blocking(move || run_program("federation", &federation_args, env))
        .await
        .unwrap();
    let env = with_credentials(&impersonated_config);
    let id_token_checks = tokio::task::spawn_blocking(move || run_program("federated-id-token", &args, env))
        .await
        .unwrap();
    checks.extend(id_token_checks);

    let target = format!("serviceAccount:{TARGET_SA}");
    assert_issued(&emulator, &checks, "sts", Endpoint::Sts, &federated);
    assert_issued(
        &emulator,
        &checks,
        "sts-impersonation",
        Endpoint::GenerateAccessToken,
        &target,
    );
    assert_issued(
        &emulator,
        &checks,
        "impersonate",
        Endpoint::GenerateAccessToken,
        &target,
    );
    assert_issued(
        &emulator,
        &checks,
        "impersonate-id-token",
        Endpoint::GenerateIdToken,
        &target,
    );
    assert_issued(&emulator, &checks, "idtoken", Endpoint::GenerateIdToken, &target);
    let impersonated = checks.iter().find(|c| c.check == "impersonate").unwrap();
    let asked = IMPERSONATION_LIFETIME.as_secs();
    assert!(
        impersonated.expires_in_seconds.is_some_and(|s| s.abs_diff(asked) < 30),
        "{impersonated:?}"
    );
    assert_routed_hosts(&emulator);
    // Each credential object makes its own exchange (five: two configurations loaded, and the
    // base credentials of three impersonating sources); each process fetches the keys once.
    let calls = [
        Endpoint::Sts,
        Endpoint::GenerateAccessToken,
        Endpoint::GenerateIdToken,
        Endpoint::Certs,
        Endpoint::Metadata,
        Endpoint::MetadataValue,
    ]
    .map(|endpoint| emulator.calls(endpoint));
    assert_eq!(
        calls,
        [5, 2, 2, 2, 0, 0],
        "STS, IAM access and ID tokens, keys, metadata"
    );
    assert_eq!(emulator.requests().len(), 11, "no other request, no retry");
}

#[tokio::test(flavor = "multi_thread")]
async fn go_libraries_use_the_metadata_server() {
    let emulator = GoogleEmulator::start().await.unwrap();
    with_lifetimes(&emulator);
    emulator.set_metadata_service_account(METADATA_SA);
    emulator.set_metadata_project("proj", 123_456);
    let proxy = emulator.start_intercepting_proxy().await.unwrap();
    let mut env = proxy.env();
    env.push(("GCE_METADATA_HOST".into(), proxy.metadata_host()));
    let args = [
        "-email",
        METADATA_SA,
        "-project",
        "proj",
        "-audience",
        AUDIENCE,
        "-lifetime",
        &lifetime_arg(),
    ]
    .map(str::to_owned);
    let checks = tokio::task::spawn_blocking(move || run_program("metadata", &args, env))
        .await
        .unwrap();

    let metadata = checks
        .iter()
        .find(|c| c.check == "metadata")
        .expect("the metadata check");
    assert_eq!(metadata.values["email"], METADATA_SA);
    let node = format!("serviceAccount:{METADATA_SA}");
    assert_issued(&emulator, &checks, "compute", Endpoint::Metadata, &node);
    assert_issued(&emulator, &checks, "default-credentials", Endpoint::Metadata, &node);
    assert_issued(
        &emulator,
        &checks,
        "metadata-id-token",
        Endpoint::MetadataIdentity,
        &node,
    );
    assert_routed_hosts(&emulator);
    let paths: Vec<String> = emulator.requests().into_iter().map(|r| r.path).collect();
    let token = "/computeMetadata/v1/instance/service-accounts/default/token?scopes=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform";
    let expected = [
        "/computeMetadata/v1/instance/service-accounts/default/email",
        "/computeMetadata/v1/project/project-id",
        token,
        "/computeMetadata/v1/universe/universe-domain",
        token,
        "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https%3A%2F%2Fhello.example.com&format=full",
        // idtoken.Validate fetches Google's keys, through the proxy.
        "/oauth2/v3/certs",
    ];
    assert_eq!(paths, expected, "every request, in order, with no retry");
}
