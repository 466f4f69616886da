//! The `helm` CLI, run as the README tells users to run it (`helm lint`, `helm template`,
//! `helm install`, `helm upgrade`, `helm uninstall`), built by the test substrate at a pinned
//! version. Values go in as a file on stdin (`--values -`), as a user's values file would.

use std::process::Stdio;

use gcp_token_operator_testkit::control_plane::ControlPlane;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

pub const CHART_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/gcp-token-operator");

/// Runs `helm ARGS`, with `values` on stdin when given; stdout on success, else an error quoting
/// the command and what Helm printed.
async fn helm(control_plane: &ControlPlane, args: &[&str], values: Option<&Value>) -> Result<String, String> {
    let mut command = control_plane.helm();
    command
        .args(args)
        .stdin(if values.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|e| format!("running helm: {e}"))?;
    if let Some(values) = values {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // JSON is YAML: the values file as Helm reads it.
        stdin
            .write_all(values.to_string().as_bytes())
            .await
            .map_err(|e| format!("writing helm's values: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting for helm: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!(
            "helm {} failed ({}): {}{stdout}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(stdout)
}

/// `helm lint --strict CHART`: what it printed (it fails on warnings as well as errors).
pub async fn lint(control_plane: &ControlPlane) -> Result<String, String> {
    helm(control_plane, &["lint", "--strict", CHART_DIR], None).await
}

/// `helm template RELEASE CHART --namespace NAMESPACE --values -`: the manifest.
pub async fn template(
    control_plane: &ControlPlane,
    namespace: &str,
    release: &str,
    values: &Value,
) -> Result<String, String> {
    helm(
        control_plane,
        &release_args("template", release, namespace, &[]),
        Some(values),
    )
    .await
}

/// `helm install RELEASE CHART --namespace NAMESPACE --create-namespace --values -`, not waiting
/// for workloads (no node runs pods). Returns the manifest Helm applied.
pub async fn install(
    control_plane: &ControlPlane,
    namespace: &str,
    release: &str,
    values: &Value,
) -> Result<String, String> {
    let args = release_args(
        "install",
        release,
        namespace,
        &["--create-namespace", "--output", "json"],
    );
    manifest(&helm(control_plane, &args, Some(values)).await?)
}

/// `helm upgrade RELEASE CHART --namespace NAMESPACE --values -`: the manifest Helm applied.
pub async fn upgrade(
    control_plane: &ControlPlane,
    namespace: &str,
    release: &str,
    values: &Value,
) -> Result<String, String> {
    let args = release_args("upgrade", release, namespace, &["--output", "json"]);
    manifest(&helm(control_plane, &args, Some(values)).await?)
}

/// `helm COMMAND RELEASE CHART --namespace NAMESPACE --values - EXTRA...`.
fn release_args<'a>(command: &'a str, release: &'a str, namespace: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![command, release, CHART_DIR, "--namespace", namespace, "--values", "-"];
    args.extend_from_slice(extra);
    args
}

/// `helm uninstall RELEASE --namespace NAMESPACE --wait`.
pub async fn uninstall(control_plane: &ControlPlane, namespace: &str, release: &str) -> Result<(), String> {
    helm(
        control_plane,
        &["uninstall", release, "--namespace", namespace, "--wait"],
        None,
    )
    .await
    .map(drop)
}

/// The manifest of the release that `--output json` printed.
fn manifest(release: &str) -> Result<String, String> {
    let release: Value =
        serde_json::from_str(release).map_err(|e| format!("helm printed no release JSON ({e}): {release}"))?;
    release["manifest"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("the release has no manifest: {release}"))
}

/// The objects of a rendered manifest.
pub fn objects(manifest: &str) -> Vec<Value> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(manifest).expect("Helm renders YAML");
    documents.into_iter().filter(|d| !d.is_null()).collect()
}

/// The one object of `kind` named `name`.
pub fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {:?}", names(objects)))
}

/// `Kind/name` (and `@namespace`) of each object, for messages and comparisons.
pub fn names(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| {
            let name = format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            );
            match o["metadata"]["namespace"].as_str() {
                Some(namespace) => format!("{name}@{namespace}"),
                None => name,
            }
        })
        .collect()
}
