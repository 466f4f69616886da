//! `examples/` holds one TokenRequest per flow and per source kind, each reaching Ready when applied
//! with kubectl against the control plane, the Google emulator and the operator. (The local demo that
//! runs them is tested with the test kit: `testkit/tests/demo.rs`.)

mod support;

use std::collections::BTreeSet;

use gcp_token_operator::{crd::TokenRequest, render::fingerprint};
use gcp_token_operator_testkit::examples;
use kube::{CustomResourceExt, ResourceExt};
use serde_json::Value;
use support::{Env, fingerprint as status_fingerprint};

/// The single key of a one-of object such as `spec.flow`.
fn chosen(one_of: &impl serde::Serialize) -> String {
    let value = serde_json::to_value(one_of).unwrap();
    let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 1, "exactly one of {value}");
    keys[0].clone()
}

/// The property names of a one-of object in the CRD schema: every flow, every source kind.
fn schema_choices(field: &str) -> BTreeSet<String> {
    let crd = serde_json::to_value(TokenRequest::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    spec["properties"][field]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn every_flow_and_source_kind_has_an_example() {
    let examples = examples::token_requests();
    let pairs: BTreeSet<(String, String)> = examples
        .iter()
        .map(|tr| (chosen(&tr.spec.flow), chosen(&tr.spec.source)))
        .collect();
    let flows: BTreeSet<String> = pairs.iter().map(|(flow, _)| flow.clone()).collect();
    let sources: BTreeSet<String> = pairs.iter().map(|(_, source)| source.clone()).collect();
    assert_eq!(flows, schema_choices("flow"), "add an example for each flow");
    assert_eq!(sources, schema_choices("source"), "add an example for each source kind");
    for (flow, source) in [
        ("impersonation", "ambient"),
        ("sts", "serviceAccountToken"),
        ("impersonation", "tokenRequest"),
        ("impersonation", "secret"),
        ("developerConnect", "tokenRequest"),
        ("discoveryEngine", "secret"),
    ] {
        assert!(
            pairs.contains(&(flow.to_owned(), source.to_owned())),
            "no {flow} + {source} example"
        );
    }
    let image_pulls = examples.iter().filter(|tr| {
        let secret = serde_json::to_value(&tr.spec.secret).unwrap();
        secret["type"] == "kubernetes.io/dockerconfigjson"
    });
    assert_eq!(image_pulls.count(), 1, "one dockerconfigjson example");
    let names: BTreeSet<String> = examples.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names.len(), examples.len(), "example names are unique");
}

#[tokio::test]
async fn every_example_reaches_ready_when_applied_with_kubectl() {
    let mut env = Env::new("examples").await;
    examples::register(&env.google, &env.namespace);
    let namespace = env.namespace.clone();
    env.operator = Some(env.spawn_operator(&examples::operator_args(&namespace)));
    let applied = examples::apply(env.control_plane, &env.namespace)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for tr in examples::token_requests() {
        let name = tr.name_any();
        assert!(
            applied.contains(&format!("tokenrequest.gcptoken.dev/{name} created")),
            "{applied}"
        );
        let ready = env.wait_ready(&name).await;
        // The Secret holds the token whose fingerprint the status shows, in the layout asked for.
        let secret = env.secret(&tr.secret_name()).await;
        let data = secret.data.as_ref().expect("Secret data");
        let secret_spec = serde_json::to_value(&tr.spec.secret).unwrap();
        let token = if secret_spec["type"] == "kubernetes.io/dockerconfigjson" {
            assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
            let config: Value = serde_json::from_slice(&data[".dockerconfigjson"].0).unwrap();
            let auths = config["auths"].as_object().unwrap();
            let registries = secret_spec["registries"].as_array().unwrap();
            assert_eq!(auths.len(), registries.len(), "{config}");
            for registry in registries {
                assert!(auths.contains_key(registry.as_str().unwrap()), "{registry} missing");
            }
            let (_, auth) = auths.iter().next().unwrap();
            auth["password"].as_str().unwrap().to_owned()
        } else {
            let key = secret_spec["tokenKey"].as_str().unwrap_or("token");
            String::from_utf8(data[key].0.clone()).unwrap()
        };
        assert_eq!(Some(fingerprint(&token)), status_fingerprint(&ready), "{name}");
        for (label, value) in secret_spec["labels"].as_object().into_iter().flatten() {
            assert_eq!(
                secret.labels().get(label),
                value.as_str().map(str::to_owned).as_ref(),
                "{name}"
            );
        }
    }
    env.assert_no_token_leaked().await;
}
