//! `examples/` holds one TokenRequest per flow, per source kind and per Secret format, each
//! reaching Ready when applied with kubectl against the control plane, the Google emulator and the
//! operator, with the Secret in the shape its consumer reads. (The local demo that runs them is
//! tested with the test kit: `testkit/tests/demo.rs`.)

mod support;

use std::collections::BTreeSet;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use gcp_token_operator::{crd::TokenRequest, render::fingerprint};
use gcp_token_operator_testkit::examples;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{Api, CustomResourceExt, ResourceExt};
use serde_json::Value;
use support::{Env, fingerprint as status_fingerprint};

/// The username registries take with a Google access token.
const OAUTH2_ACCESS_TOKEN: &str = "oauth2accesstoken";

/// The single key of a one-of object such as `spec.flow`.
fn chosen(one_of: &impl serde::Serialize) -> String {
    let value = serde_json::to_value(one_of).unwrap();
    let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 1, "exactly one of {value}");
    keys[0].clone()
}

/// The property names of the object at `path` under `spec` in the CRD schema: every flow, every
/// source kind, every Secret format.
fn schema_choices(path: &[&str]) -> BTreeSet<String> {
    let crd = serde_json::to_value(TokenRequest::crd()).unwrap();
    let mut schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    for field in path {
        schema = &schema["properties"][field];
    }
    schema["properties"].as_object().unwrap().keys().cloned().collect()
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
    assert_eq!(flows, schema_choices(&["flow"]), "add an example for each flow");
    assert_eq!(
        sources,
        schema_choices(&["source"]),
        "add an example for each source kind"
    );
    for (flow, source) in [
        ("impersonation", "ambient"),
        ("sts", "serviceAccountToken"),
        ("impersonation", "tokenRequest"),
        ("impersonation", "secret"),
        ("developerConnect", "tokenRequest"),
        ("discoveryEngine", "secret"),
        ("developerConnectRepository", "tokenRequest"),
        ("idToken", "tokenRequest"),
        ("idToken", "serviceAccountToken"),
        ("idToken", "ambient"),
    ] {
        assert!(
            pairs.contains(&(flow.to_owned(), source.to_owned())),
            "no {flow} + {source} example"
        );
    }
    let image_pulls: Vec<_> = examples
        .iter()
        .filter(|tr| {
            let secret = serde_json::to_value(&tr.spec.secret).unwrap();
            secret["type"] == "kubernetes.io/dockerconfigjson"
        })
        .collect();
    assert!(
        image_pulls
            .iter()
            .any(|tr| tr.spec.secret.attach_to_service_accounts.is_empty()),
        "a dockerconfigjson example that Pods name in imagePullSecrets"
    );
    assert!(
        image_pulls
            .iter()
            .any(|tr| !tr.spec.secret.attach_to_service_accounts.is_empty()),
        "a dockerconfigjson example attached to ServiceAccounts"
    );
    let formats: BTreeSet<String> = examples
        .iter()
        .filter_map(|tr| tr.spec.secret.format.as_ref().map(chosen))
        .collect();
    assert_eq!(
        formats,
        schema_choices(&["secret", "format"]),
        "add an example for each Secret format"
    );
    let id_tokens: Vec<Value> = examples
        .iter()
        .filter_map(|tr| tr.spec.flow.id_token.as_ref())
        .map(|id| serde_json::to_value(id).unwrap())
        .collect();
    assert!(
        id_tokens.iter().any(|id| id["federation"].is_object()),
        "an ID token through federation"
    );
    assert!(
        id_tokens
            .iter()
            .any(|id| id["includeEmail"] == true && id["serviceAccount"].is_null()),
        "an ID token with email claims from the metadata server (IAP)"
    );
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
        // The Secret holds the token whose fingerprint the status shows, where its consumer reads
        // it, in the layout asked for.
        let secret = env.secret(&tr.secret_name()).await;
        let repository = tr.spec.flow.developer_connect_repository.is_some();
        let status_username = ready.status.as_ref().and_then(|s| s.username.as_deref());
        let flow_username = if repository {
            assert_eq!(status_username, Some(examples::GIT_USERNAME), "{name}");
            Some(examples::GIT_USERNAME)
        } else {
            assert_eq!(status_username, None, "{name}");
            (tr.spec.flow.sts.is_some() || tr.spec.flow.impersonation.is_some()).then_some(OAUTH2_ACCESS_TOKEN)
        };
        let token = consumer_token(&name, &tr, &secret, flow_username);
        assert_eq!(Some(fingerprint(&token)), status_fingerprint(&ready), "{name}");
        if let Some(id) = &tr.spec.flow.id_token {
            let claims = jwt_claims(&token);
            assert_eq!(claims["aud"], id.audience.as_str(), "{name}: {claims}");
            assert_eq!(claims["email"].is_string(), id.include_email, "{name}: {claims}");
        }
        let secret_spec = serde_json::to_value(&tr.spec.secret).unwrap();
        for (label, value) in secret_spec["labels"].as_object().into_iter().flatten() {
            assert_eq!(
                secret.labels().get(label),
                value.as_str().map(str::to_owned).as_ref(),
                "{name}"
            );
        }
    }
    // Tekton finds the basic-auth Secret through the ServiceAccount the example creates.
    let tekton: ServiceAccount = Api::namespaced(env.client.clone(), &env.namespace)
        .get("tekton-build")
        .await
        .expect("the Tekton ServiceAccount of developerconnect-repository-tekton.yaml");
    let listed: Vec<&str> = tekton
        .secrets
        .iter()
        .flatten()
        .filter_map(|s| s.name.as_deref())
        .collect();
    assert_eq!(listed, ["app-repo-tekton"]);
    env.assert_no_token_leaked().await;
}

/// The claims of a JWT (not verified: the emulator signed it).
fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON claims")
}

/// The token in `secret` as the consumer of the TokenRequest's format reads it, found from the
/// format's documented layout (not from the operator's own bookkeeping), checking that layout on
/// the way: the Secret's type, keys, labels and annotations, and the username sent with the
/// token (the format's, else `flow_username`).
fn consumer_token(name: &str, tr: &TokenRequest, secret: &Secret, flow_username: Option<&str>) -> String {
    let data = secret.data.as_ref().expect("Secret data");
    let text = |key: &str| -> String {
        let value = data
            .get(key)
            .unwrap_or_else(|| panic!("{name}: no key {key:?} in the Secret"));
        String::from_utf8(value.0.clone()).unwrap()
    };
    let type_ = secret.type_.as_deref();
    let secret_spec = serde_json::to_value(&tr.spec.secret).unwrap();
    let Some(format) = secret_spec.get("format") else {
        if secret_spec["type"] == "kubernetes.io/dockerconfigjson" {
            assert_eq!(type_, Some("kubernetes.io/dockerconfigjson"));
            let config: Value = serde_json::from_str(&text(".dockerconfigjson")).unwrap();
            let auths = config["auths"].as_object().unwrap();
            let registries = secret_spec["registries"].as_array().unwrap();
            assert_eq!(auths.len(), registries.len(), "{config}");
            for registry in registries {
                assert!(auths.contains_key(registry.as_str().unwrap()), "{registry} missing");
            }
            let (_, auth) = auths.iter().next().unwrap();
            return auth["password"].as_str().unwrap().to_owned();
        }
        assert_eq!(type_, Some("Opaque"), "{name}");
        return text(secret_spec["tokenKey"].as_str().unwrap_or("token"));
    };
    let kind = chosen(format);
    let options = &format[&kind];
    let username = options["username"].as_str().or(flow_username);
    let expect_username = || username.unwrap_or_else(|| panic!("{name}: no username goes with this token"));
    match kind.as_str() {
        "basicAuth" => {
            assert_eq!(type_, Some("kubernetes.io/basic-auth"), "{name}");
            assert_eq!(text("username"), expect_username(), "{name}");
            for (kind, hosts) in [
                ("git", &options["tekton"]["git"]),
                ("docker", &options["tekton"]["docker"]),
            ] {
                for (i, host) in hosts.as_array().into_iter().flatten().enumerate() {
                    let annotation = secret.annotations().get(&format!("tekton.dev/{kind}-{i}"));
                    assert_eq!(annotation.map(String::as_str), host.as_str(), "{name}");
                }
            }
            text("password")
        }
        "flux" => {
            assert_eq!(type_, Some("Opaque"), "{name}");
            if options["auth"] == "bearer" {
                return text("bearerToken");
            }
            assert_eq!(text("username"), expect_username(), "{name}");
            text("password")
        }
        "argoCD" => {
            assert_eq!(type_, Some("Opaque"), "{name}");
            let secret_type = match options["secretType"].as_str() {
                Some("repoCreds") => "repo-creds",
                _ => "repository",
            };
            let label = secret.labels().get("argocd.argoproj.io/secret-type");
            assert_eq!(label.map(String::as_str), Some(secret_type), "{name}");
            assert_eq!(text("type"), options["type"].as_str().unwrap_or("git"), "{name}");
            assert_eq!(text("url"), options["url"].as_str().unwrap(), "{name}");
            assert_eq!(text("username"), expect_username(), "{name}");
            text("password")
        }
        "gitCredentials" => {
            assert_eq!(type_, Some("Opaque"), "{name}");
            let file = text(".git-credentials");
            let urls = options["urls"].as_array().unwrap();
            let lines: Vec<&str> = file.lines().collect();
            assert_eq!(lines.len(), urls.len(), "{name}: one line per URL");
            let tokens: BTreeSet<String> = lines
                .iter()
                .zip(urls)
                .map(|(line, want)| {
                    let line = url::Url::parse(line).expect("a URL per line");
                    let want = url::Url::parse(want.as_str().unwrap()).unwrap();
                    assert_eq!(line.origin(), want.origin(), "{name}");
                    let decode = |s: &str| {
                        percent_encoding::percent_decode_str(s)
                            .decode_utf8()
                            .unwrap()
                            .into_owned()
                    };
                    assert_eq!(decode(line.username()), expect_username(), "{name}");
                    decode(line.password().expect("a password"))
                })
                .collect();
            assert_eq!(tokens.len(), 1, "{name}: one token in every line");
            tokens.into_iter().next().unwrap()
        }
        "netrc" => {
            assert_eq!(type_, Some("Opaque"), "{name}");
            let file = text(".netrc");
            let token = file.split_whitespace().last().unwrap().to_owned();
            let expected: String = options["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|host| {
                    format!(
                        "machine {} login {} password {token}\n",
                        host.as_str().unwrap(),
                        expect_username()
                    )
                })
                .collect();
            assert_eq!(file, expected, "{name}");
            token
        }
        "npmrc" => {
            assert_eq!(type_, Some("Opaque"), "{name}");
            let file = text(".npmrc");
            let (_, rest) = file.split_once(":_authToken=").expect("an _authToken line");
            let token = rest.lines().next().unwrap().to_owned();
            let mut expected = String::new();
            for registry in options["registries"].as_array().unwrap() {
                let url = registry["url"].as_str().unwrap();
                match registry["scope"].as_str() {
                    Some(scope) => expected += &format!("{scope}:registry={url}\n"),
                    None => expected += &format!("registry={url}\n"),
                }
                let key = url.strip_prefix("https:").unwrap();
                expected += &format!("{key}:_authToken={token}\n{key}:always-auth=true\n");
            }
            assert_eq!(file, expected, "{name}");
            token
        }
        "template" => {
            assert_eq!(type_, Some("Opaque"), "{name}");
            let token = text(secret_spec["tokenKey"].as_str().unwrap_or("token"));
            for key in options["data"].as_object().unwrap().keys() {
                let rendered = text(key);
                if key.ends_with(".json") {
                    let config: Value =
                        serde_json::from_str(&rendered).unwrap_or_else(|e| panic!("{name}: {key}: {e}"));
                    assert_eq!(config["access_token"], token.as_str(), "{name}: {key}");
                }
            }
            for key in options["annotations"].as_object().into_iter().flatten().map(|(k, _)| k) {
                let annotation = secret
                    .annotations()
                    .get(key)
                    .unwrap_or_else(|| panic!("{name}: no annotation {key}"));
                assert!(!annotation.contains(&token), "{name}: the token in annotation {key}");
            }
            token
        }
        other => panic!("{name}: format {other} is not checked here"),
    }
}
