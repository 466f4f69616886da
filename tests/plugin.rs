//! `kubectl gtr`, the plugin binary, run through the real kubectl (so its plugin discovery on the
//! PATH is what finds it) against the real control plane, the operator and the Google emulator.

mod support;

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use gcp_token_operator_testkit::emulator::{Endpoint, Fault};
use serde_json::json;
use support::*;

const SA_EMAIL: &str = "builder@proj.iam.gserviceaccount.com";
const DOWNSTREAM_SA: &str = "deployer@proj.iam.gserviceaccount.com";

/// A directory holding only `kubectl-gtr`, for the PATH kubectl searches.
fn plugin_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kubectl-gtr"), dir.path().join("kubectl-gtr"))
        .expect("linking the plugin");
    dir
}

struct Kubectl<'a> {
    env: &'a Env<'a>,
    path: String,
    /// Every output so far, for the check that no token appears in any.
    seen: std::cell::RefCell<String>,
}

impl<'a> Kubectl<'a> {
    fn new(env: &'a Env<'a>, dir: &Path) -> Self {
        let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
        Kubectl {
            env,
            path,
            seen: Default::default(),
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        let output = self
            .env
            .control_plane
            .kubectl()
            .args(args)
            .env("PATH", &self.path)
            .env("TZ", "UTC")
            .output()
            .await
            .expect("running kubectl");
        let mut seen = self.seen.borrow_mut();
        seen.push_str(&String::from_utf8_lossy(&output.stdout));
        seen.push_str(&String::from_utf8_lossy(&output.stderr));
        output
    }

    /// `kubectl ARGS`, which must succeed; its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert!(
            output.status.success(),
            "kubectl {args:?} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn list_status_and_refresh_through_kubectls_plugin_discovery() {
    let mut env = Env::new("plugin").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    env.google.add_service_account(DOWNSTREAM_SA, &["*"]);
    env.start_operator();
    let ns = env.namespace.clone();
    env.create("tok", impersonation_from_caller(SA_EMAIL)).await;
    // A chain: `down` is minted with the token `up` holds.
    env.create("up", impersonation_from_caller(SA_EMAIL)).await;
    env.create(
        "down",
        json!({
            "flow": {"impersonation": {"serviceAccount": DOWNSTREAM_SA,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}},
            "source": {"tokenRequest": {"name": "up"}},
        }),
    )
    .await;
    // A source that names a TokenRequest that does not exist.
    env.create(
        "orphan",
        json!({
            "flow": {"impersonation": {"serviceAccount": DOWNSTREAM_SA,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}},
            "source": {"tokenRequest": {"name": "missing-upstream"}},
        }),
    )
    .await;
    let tok = env.wait_ready("tok").await;
    env.wait_ready("up").await;
    env.wait_ready("down").await;
    // A refusal from Google: a failing TokenRequest.
    env.google.fail_next(
        Endpoint::GenerateAccessToken,
        1,
        Fault::Status {
            code: 403,
            retry_after: None,
        },
    );
    env.create("broken", impersonation_from_caller(SA_EMAIL)).await;
    env.wait_reason("broken", "PermissionDenied").await;

    let dir = plugin_dir();
    let kubectl = Kubectl::new(&env, dir.path());

    // kubectl's own discovery finds the binary on the PATH.
    let plugins = kubectl.ok(&["plugin", "list"]).await;
    assert!(plugins.contains("kubectl-gtr"), "{plugins}");
    let help = kubectl.ok(&["gtr", "--help"]).await;
    assert!(help.contains("kubectl gtr refresh"), "{help}");

    // list: one line per TokenRequest, within 100 columns.
    let list = kubectl.ok(&["gtr", "list", "-n", &ns]).await;
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 6, "{list}");
    for header in ["NAME", "FLOW", "READY", "EXPIRES", "NEXT REFRESH", "FAILURES"] {
        assert!(lines[0].contains(header), "{list}");
    }
    assert!(!lines[0].contains("NAMESPACE"), "{list}");
    for line in &lines {
        assert!(line.chars().count() <= 100, "{line:?}");
    }
    let row = |name: &str| {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row {name} in\n{list}"))
            .to_string()
    };
    let tok_row = row("tok");
    assert!(tok_row.contains("impersonation"), "{tok_row}");
    assert!(tok_row.contains("True (Issued)"), "{tok_row}");
    assert!(tok_row.contains("in 5"), "expires in about an hour (59m…): {tok_row}");
    assert!(tok_row.trim_end().ends_with(" 0"), "{tok_row}");
    let broken_row = row("broken");
    assert!(broken_row.contains("False (PermissionDenied)"), "{broken_row}");
    assert!(broken_row.trim_end().ends_with(" 1"), "{broken_row}");
    let all = kubectl.ok(&["gtr", "list", "-A"]).await;
    assert!(all.starts_with("NAMESPACE"), "{all}");
    assert!(all.lines().any(|l| l.starts_with(&ns) && l.contains(" tok ")), "{all}");

    // status of a healthy TokenRequest at the end of a chain.
    let status = kubectl.ok(&["gtr", "status", "down", "-n", &ns]).await;
    for expected in [
        "Name:             down",
        "Flow:             impersonation",
        "Ready:            True (Issued)",
        "If refreshes keep failing, the token expires at ",
        "Source chain:",
        "  <- up   True (Issued)   source: secret (Secret caller, key token)",
        "Events:",
    ] {
        assert!(status.contains(expected), "no {expected:?} in\n{status}");
    }
    let fingerprint_line = format!(
        "Fingerprint:      {}",
        fingerprint(&env.wait_ready("down").await).unwrap()
    );
    assert!(status.contains(&fingerprint_line), "{status}");
    // Times are local (TZ=UTC here) and relative.
    assert!(status.contains("+00:00 (in 5"), "{status}");
    let orphan = kubectl.ok(&["gtr", "status", "orphan", "-n", &ns]).await;
    assert!(orphan.contains("  <- missing-upstream   not found"), "{orphan}");

    // status of a failing one: the reason, the attempts, the Warning Event (published just after
    // the status, so looked for a few times).
    let deadline = Instant::now() + Duration::from_secs(20);
    let broken = loop {
        let broken = kubectl.ok(&["gtr", "status", "broken", "-n", &ns]).await;
        if broken.contains("Warning") || Instant::now() > deadline {
            break broken;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for expected in [
        "Ready:            False (PermissionDenied)",
        "Failed attempts:  1",
        "Last failure:     20",
        "Fingerprint:      -",
        "Warning",
        "PermissionDenied",
    ] {
        assert!(broken.contains(expected), "no {expected:?} in\n{broken}");
    }
    assert!(!broken.contains("Source chain:"), "{broken}");

    // refresh --wait: one more mint, a new fingerprint, reported as changed.
    let old = fingerprint(&tok).unwrap();
    let mints = env.google.calls(Endpoint::GenerateAccessToken);
    let refreshed = kubectl.ok(&["gtr", "refresh", "tok", "-n", &ns, "--wait"]).await;
    let new = fingerprint(&env.token_requests().get("tok").await.unwrap()).unwrap();
    assert_ne!(new, old);
    assert!(
        refreshed.contains(&format!("tok: refreshed, fingerprint {new} (changed, was {old})")),
        "{refreshed}"
    );
    assert!(
        refreshed.contains("tok: refresh requested (gcptoken.dev/refresh-requested-at=20"),
        "{refreshed}"
    );
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), mints + 1);
    let handled = env.token_requests().get("tok").await.unwrap();
    let value = handled.status.unwrap().last_handled_refresh_request.unwrap();
    assert!(refreshed.contains(&value), "{refreshed} does not name {value}");

    // refresh of a failing one: its reason, and a non-zero exit.
    env.google.fail_next(
        Endpoint::GenerateAccessToken,
        1,
        Fault::Status {
            code: 403,
            retry_after: None,
        },
    );
    let failed = kubectl.run(&["gtr", "refresh", "broken", "-n", &ns, "--wait"]).await;
    assert!(!failed.status.success());
    let stdout = text(&failed.stdout);
    assert!(stdout.contains("broken: refresh failed: PermissionDenied"), "{stdout}");
    assert!(stdout.contains("(failed attempts: 2)"), "{stdout}");

    // A name that does not exist: a clear error, a non-zero exit.
    let missing = kubectl.run(&["gtr", "status", "nope", "-n", &ns]).await;
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("nope"), "{}", text(&missing.stderr));

    // No token the emulator issued in anything the plugin printed.
    let seen = kubectl.seen.borrow().clone();
    for token in env.google.issued_tokens() {
        assert!(!seen.contains(&token), "a token appears in the plugin's output");
    }
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn refresh_by_selector_waits_for_each_and_a_reader_without_patch_is_told_why() {
    let mut env = Env::new("pluginrbac").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    env.start_operator();
    let ns = env.namespace.clone();
    // One service account each: identical calls in flight would be made once for all of them.
    for name in ["a", "b", "c"] {
        let account = format!("{name}@proj.iam.gserviceaccount.com");
        env.google.add_service_account(&account, &["*"]);
        env.create(name, impersonation_from_caller(&account)).await;
    }
    for name in ["a", "b", "c"] {
        env.wait_ready(name).await;
    }
    let dir = plugin_dir();
    let kubectl = Kubectl::new(&env, dir.path());
    kubectl
        .ok(&["label", "tokenrequest", "a", "b", "-n", &ns, "team=payments"])
        .await;

    let mints = env.google.calls(Endpoint::GenerateAccessToken);
    let out = kubectl
        .ok(&[
            "gtr",
            "refresh",
            "-l",
            "team=payments",
            "-n",
            &ns,
            "--wait",
            "--timeout",
            "45s",
        ])
        .await;
    assert!(out.contains("a: refreshed, fingerprint "), "{out}");
    assert!(out.contains("b: refreshed, fingerprint "), "{out}");
    assert!(!out.contains("c: "), "{out}");
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), mints + 2);

    // A user who may read TokenRequests but not patch them.
    env.create_service_account("viewer").await;
    kubectl
        .ok(&[
            "create",
            "role",
            "tr-viewer",
            "-n",
            &ns,
            "--verb=get,list,watch",
            "--resource=tokenrequests.gcptoken.dev",
        ])
        .await;
    kubectl
        .ok(&[
            "create",
            "rolebinding",
            "tr-viewer",
            "-n",
            &ns,
            "--role=tr-viewer",
            &format!("--serviceaccount={ns}:viewer"),
        ])
        .await;
    let kubeconfig_dir = tempfile::tempdir().unwrap();
    let kubeconfig: PathBuf = kubeconfig_dir.path().join("viewer.yaml");
    env.write_kubeconfig_as(&ns, "viewer", &kubeconfig).await;
    let kubeconfig = kubeconfig.to_str().unwrap();

    let list = kubectl
        .ok(&["gtr", "list", "-n", &ns, "--kubeconfig", kubeconfig])
        .await;
    assert_eq!(list.lines().count(), 4, "{list}");
    let denied = kubectl
        .run(&["gtr", "refresh", "a", "-n", &ns, "--kubeconfig", kubeconfig])
        .await;
    assert!(!denied.status.success());
    let stderr = text(&denied.stderr);
    assert!(
        stderr.contains(&format!("patching TokenRequest {ns}/a: forbidden")),
        "{stderr}"
    );
    assert!(stderr.contains("cannot patch resource \"tokenrequests\""), "{stderr}");
    assert!(stderr.contains("kubectl auth can-i"), "{stderr}");
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), mints + 2);

    let seen = kubectl.seen.borrow().clone();
    for token in env.google.issued_tokens() {
        assert!(!seen.contains(&token), "a token appears in the plugin's output");
    }
    env.assert_no_token_leaked().await;
}
