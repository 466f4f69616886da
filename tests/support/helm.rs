//! Helm from the tests: `tests/helm/helm.py` drives the Helm v4 Go library (helm-sdkpy, which
//! `scripts/test.sh` installs) to lint the chart, install it into the test control plane and
//! uninstall it. An install returns the manifest Helm rendered, which is what `helm template` prints
//! for the same values (the CRDs in the chart's `crds/` are installed, not rendered).

use std::path::Path;

use serde_json::Value;

pub const CHART_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/gcp-token-operator");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/helm/helm.py");

/// The interpreter with helm-sdkpy: `GCP_TOKEN_OPERATOR_PYTHON` (set by `scripts/test.sh`), else
/// `python3`.
fn python() -> String {
    std::env::var("GCP_TOKEN_OPERATOR_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

async fn helm(args: &[&str]) -> Result<Value, String> {
    let output = tokio::process::Command::new(python())
        .arg(SCRIPT)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("running {} {SCRIPT}: {e}", python()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let hint = if stderr.contains("No module named 'helm_sdkpy'") {
            "\n(helm-sdkpy is missing: run scripts/test.sh, which installs it, or set GCP_TOKEN_OPERATOR_PYTHON)"
        } else {
            ""
        };
        return Err(format!("helm {}: {stderr}{hint}", args[0]));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("helm {} printed no JSON ({e}): {stderr}", args[0]))
}

/// `helm lint` of the chart: `{"messages": [{"severity", "path"}], "errors": N}`, severities as
/// Helm's (1 info, 2 warning, 3 error).
pub async fn lint() -> Result<Value, String> {
    helm(&["lint", CHART_DIR]).await
}

/// `helm install RELEASE CHART --namespace NAMESPACE --create-namespace` with `values`, not waiting
/// for workloads (the control plane runs no pods). Returns the rendered manifest.
pub async fn install(kubeconfig: &Path, namespace: &str, release: &str, values: &Value) -> Result<String, String> {
    let kubeconfig = kubeconfig.to_str().expect("a UTF-8 path");
    let result = helm(&[
        "install",
        kubeconfig,
        namespace,
        release,
        CHART_DIR,
        &values.to_string(),
    ])
    .await?;
    Ok(result["manifest"]
        .as_str()
        .expect("install returns the manifest")
        .to_owned())
}

pub async fn uninstall(kubeconfig: &Path, namespace: &str, release: &str) -> Result<(), String> {
    let kubeconfig = kubeconfig.to_str().expect("a UTF-8 path");
    helm(&["uninstall", kubeconfig, namespace, release]).await.map(drop)
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
