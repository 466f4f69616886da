//! The committed CRD YAML is what the Rust types generate, and the schema carries the constraints
//! the API server can enforce.

use gcp_token_operator::{crd::TokenRequest, crd_yaml};
use kube::CustomResourceExt;

const CRD_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/tokenrequests.gcptoken.dev.yaml");

#[test]
fn committed_crd_is_current() {
    let generated = crd_yaml();
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(CRD_PATH, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(CRD_PATH).unwrap_or_default();
    assert!(
        committed == generated,
        "{CRD_PATH} is stale: regenerate it with `UPDATE_CRDS=1 cargo test --test crd` \
         (or `cargo run -- crd > crds/tokenrequests.gcptoken.dev.yaml`)"
    );
}

#[test]
fn schema_carries_names_columns_and_rules() {
    let crd = serde_json::to_value(TokenRequest::crd()).unwrap();
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "gcptoken.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["shortNames"][0], "gtr");
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Flow", "Ready", "Expires", "Next Refresh", "Age"]);
    let props = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let flow_rule = props["flow"]["x-kubernetes-validations"][0]["rule"].as_str().unwrap();
    assert!(
        flow_rule.contains("has(self.sts)") && flow_rule.contains("size() == 1"),
        "{flow_rule}"
    );
    let source_rule = props["source"]["x-kubernetes-validations"][0]["rule"].as_str().unwrap();
    assert!(source_rule.contains("has(self.serviceAccountToken)"), "{source_rule}");
    let sts = &props["flow"]["properties"]["sts"]["properties"];
    let urns = sts["subjectTokenType"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v.is_string())
        .count();
    assert_eq!(urns, 6);
    assert!(sts["audience"]["pattern"].is_string());
    let sat = &props["source"]["properties"]["serviceAccountToken"]["properties"]["expirationSeconds"];
    assert_eq!(sat["minimum"].as_f64(), Some(600.0));
    let types = &props["secret"]["properties"]["type"]["enum"];
    assert_eq!(types, &serde_json::json!(["Opaque", "kubernetes.io/dockerconfigjson"]));
    // No `null` among the values: Kubernetes 1.20 rejects a CRD with a nullable enum.
    let formats = &props["source"]["properties"]["secret"]["properties"]["format"]["enum"];
    assert_eq!(
        formats,
        &serde_json::json!([
            "auto",
            "accessToken",
            "jwt",
            "serviceAccountKey",
            "authorizedUser",
            "externalAccount"
        ])
    );
    assert!(source_rule.contains("has(self.ambient)"), "{source_rule}");
}

#[test]
fn the_crd_subcommand_prints_the_committed_crd() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gcp-token-operator"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        std::fs::read_to_string(CRD_PATH).unwrap()
    );
}
