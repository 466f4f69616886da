//! The committed CRD YAML is what the Rust types generate, and the schema carries the constraints
//! the API server can enforce: among them a size bound on every string, list and map, which the
//! test control plane's API server is shown to apply.

use std::time::{Duration, Instant};

use gcp_token_operator::{
    crd::{TokenRequest, bound},
    crd_yaml,
};
use gcp_token_operator_testkit::control_plane::{ControlPlane, apply_crds, create_namespace, create_service_account};
use k8s_openapi::api::{
    core::v1::{ResourceQuota, Secret},
    rbac::v1::{Role, RoleBinding, Subject},
};
use kube::{
    Api, CustomResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

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
    // No `null` among the values: the default is spelled out instead.
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

/// The strings without `maxLength` (or an `enum`), lists without `maxItems` and maps without
/// `maxProperties` under `schema`, as paths; `visited` collects the paths walked.
fn unbounded(schema: &Value, path: &str, found: &mut Vec<String>, visited: &mut Vec<String>) {
    visited.push(path.to_owned());
    let has = |key: &str| schema.get(key).is_some();
    match schema["type"].as_str() {
        Some("string") if !has("maxLength") && !has("enum") => found.push(format!("{path}: string without maxLength")),
        Some("array") => {
            if !has("maxItems") {
                found.push(format!("{path}: list without maxItems"));
            }
            unbounded(&schema["items"], &format!("{path}[]"), found, visited);
        }
        Some("object") => {
            if schema["x-kubernetes-preserve-unknown-fields"] == true {
                found.push(format!("{path}: object of any fields"));
            }
            if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
                if !has("maxProperties") {
                    found.push(format!("{path}: map without maxProperties"));
                }
                unbounded(values, &format!("{path}{{}}"), found, visited);
            }
            for (name, property) in schema["properties"].as_object().into_iter().flatten() {
                unbounded(property, &format!("{path}.{name}"), found, visited);
            }
        }
        Some("string" | "integer" | "number" | "boolean") => {}
        other => found.push(format!("{path}: schema of type {other:?}")),
    }
}

fn unbounded_in(schema: &Value) -> (Vec<String>, Vec<String>) {
    let (mut found, mut visited) = (Vec::new(), Vec::new());
    unbounded(schema, "", &mut found, &mut visited);
    (found, visited)
}

fn open_api_schema() -> Value {
    let crd = serde_json::to_value(TokenRequest::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn every_string_list_and_map_of_the_schema_is_bounded() {
    let (found, visited) = unbounded_in(&open_api_schema());
    assert!(found.is_empty(), "unbounded in the CRD schema:\n{}", found.join("\n"));
    // The walk went down to the leaves, through lists and maps.
    for leaf in [
        ".spec.flow.sts.accessBoundary.accessBoundaryRules[].availabilityCondition.expression",
        ".spec.flow.sts.serviceAccountImpersonation.delegates[]",
        ".spec.source.secret.subjectToken.serviceAccountToken.audience",
        ".spec.secret.annotations{}",
        ".spec.rolloutRestartTargets[].kind",
        ".status.conditions[].message",
    ] {
        assert!(visited.iter().any(|p| p == leaf), "{leaf} not walked: {visited:?}");
    }
}

/// The most characters of JSON a value of `schema` can take, given its bounds: every field and every
/// member of a one-of group at once, so an upper bound.
fn largest_json(schema: &Value) -> u64 {
    let bound = |key: &str| schema[key].as_u64().unwrap_or_else(|| panic!("no {key} in {schema}"));
    match schema["type"].as_str() {
        Some("string") => match schema["enum"].as_array() {
            Some(values) => values.iter().filter_map(Value::as_str).map(str::len).max().unwrap_or(0) as u64 + 2,
            None => bound("maxLength") + 2,
        },
        Some("array") => 2 + bound("maxItems") * (largest_json(&schema["items"]) + 1),
        Some("object") => {
            let properties = schema["properties"].as_object().into_iter().flatten();
            let one_of = one_of_members(schema);
            let size = |(name, property): (&String, &Value)| name.len() as u64 + 4 + largest_json(property);
            // Of a one-of group, the CRD's rule admits one member: the largest counts.
            let (members, others): (Vec<_>, Vec<_>) = properties.partition(|(name, _)| one_of.contains(name));
            let fields: u64 =
                others.into_iter().map(size).sum::<u64>() + members.into_iter().map(size).max().unwrap_or(0);
            let entries = match schema.get("additionalProperties").filter(|v| v.is_object()) {
                Some(values) => bound("maxProperties") * (u64::from(bound::METADATA_KEY) + 4 + largest_json(values)),
                None => 0,
            };
            2 + fields + entries
        }
        // An int64 or a boolean.
        _ => 20,
    }
}

/// The members of the one-of group an object's CEL rule (`crd::one_of`) defines, if any.
fn one_of_members(schema: &Value) -> Vec<String> {
    let rules = schema["x-kubernetes-validations"].as_array().into_iter().flatten();
    let rule = rules
        .filter_map(|r| r["rule"].as_str())
        .find(|r| r.ends_with(".filter(x, x).size() == 1"));
    rule.map(|rule| {
        rule.split("has(self.")
            .skip(1)
            .filter_map(|rest| rest.split_once(')').map(|(name, _)| name.to_string()))
            .collect()
    })
    .unwrap_or_default()
}

#[test]
fn the_largest_spec_and_status_the_schema_admits_stay_under_224_kib() {
    let schema = open_api_schema();
    let spec = largest_json(&schema["properties"]["spec"]);
    let status = largest_json(&schema["properties"]["status"]);
    // About 217 and 199 KiB today, as the README says: a new field that grows them is a visible
    // change here.
    assert!(spec < 224 * 1024, "the largest spec is {spec} characters");
    assert!(status < 224 * 1024, "the largest status is {status} characters");
}

#[test]
fn the_bound_check_finds_what_is_unbounded() {
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["A", "B"]},
        "list": {"type": "array", "items": {"type": "string", "maxLength": 3}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "any": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        "untyped": {},
        "bounded": {"type": "array", "maxItems": 1, "items": {"type": "object", "maxProperties": 1,
            "additionalProperties": {"type": "string", "maxLength": 1}}},
    }});
    let (mut found, _) = unbounded_in(&schema);
    found.sort();
    assert_eq!(
        found,
        [
            ".any: object of any fields",
            ".list: list without maxItems",
            ".map: map without maxProperties",
            ".map{}: string without maxLength",
            ".name: string without maxLength",
            ".untyped: schema of type None",
        ]
    );
}

#[test]
fn durations_are_bounded_by_length_and_pattern() {
    let spec = &open_api_schema()["properties"]["spec"]["properties"];
    let flow = &spec["flow"]["properties"];
    let durations = [
        &spec["refresh"]["properties"]["renewBefore"],
        &spec["refresh"]["properties"]["lifetimeWhenUnknown"],
        &spec["rolloutRestartMinInterval"],
        &flow["impersonation"]["properties"]["lifetime"],
        &flow["sts"]["properties"]["serviceAccountImpersonation"]["properties"]["lifetime"],
    ];
    for duration in durations {
        assert_eq!(duration["maxLength"], bound::DURATION, "{duration}");
        assert_eq!(
            duration["pattern"],
            gcp_token_operator::crd::duration_pattern(),
            "{duration}"
        );
    }
    // Key lengths, which a structural schema cannot bound, in a CEL rule (for clusters with CEL).
    for map in ["labels", "annotations"] {
        let rule = &spec["secret"]["properties"][map]["x-kubernetes-validations"][0]["rule"];
        assert_eq!(rule, &format!("self.all(k, k.size() <= {})", bound::METADATA_KEY));
    }
}

/// A valid spec, to which each case adds one value.
fn base_spec() -> Value {
    json!({
        "flow": {"impersonation": {
            "serviceAccount": "target@project.iam.gserviceaccount.com",
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        }},
        "source": {"tokenRequest": {"name": "upstream"}},
    })
}

fn merged(mut base: Value, patch: &Value) -> Value {
    match (base.as_object_mut(), patch.as_object()) {
        (Some(fields), Some(patch)) => {
            for (key, value) in patch {
                let merged_value = merged(fields.remove(key).unwrap_or(Value::Null), value);
                fields.insert(key.clone(), merged_value);
            }
            base
        }
        _ => patch.clone(),
    }
}

fn token_request(name: &str, spec: Value) -> TokenRequest {
    serde_json::from_value(json!({
        "apiVersion": "gcptoken.dev/v1alpha1",
        "kind": "TokenRequest",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

fn strings(count: u32, length: u32) -> Vec<String> {
    (0..count)
        .map(|i| format!("{i:0>width$}", width = length as usize))
        .collect()
}

fn entries(count: u32, value_length: u32) -> Value {
    (0..count)
        .map(|i| (format!("example.com/key-{i}"), json!("v".repeat(value_length as usize))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[tokio::test]
async fn the_api_server_refuses_oversized_values_and_accepts_values_at_the_bounds() {
    let client = ControlPlane::shared().client().await;
    apply_crds(&client, &[TokenRequest::crd()]).await.unwrap();
    let namespace = create_namespace(&client, "bounds").await.unwrap();
    let api: Api<TokenRequest> = Api::namespaced(client, &namespace);
    // Server-side dry runs: admitted or refused as a create would be, nothing stored.
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let long = |n: u32| "a".repeat(n as usize);
    let refused = [
        (
            json!({"flow": {"impersonation": {"scopes": strings(64, 8)}}}),
            ("spec.flow.impersonation.scopes", "must have at most 32 items"),
        ),
        (
            json!({"flow": {"impersonation": {"scopes": [long(bound::SCOPE + 1)]}}}),
            ("spec.flow.impersonation.scopes[0]", "may not be more than 256 bytes"),
        ),
        (
            json!({"flow": {"impersonation": {"delegates": strings(bound::DELEGATES + 1, 20)}}}),
            ("spec.flow.impersonation.delegates", "must have at most 10 items"),
        ),
        (
            json!({"flow": {"impersonation": {"serviceAccount": format!("{}@p.iam.gserviceaccount.com", long(240))}}}),
            (
                "spec.flow.impersonation.serviceAccount",
                "may not be more than 254 bytes",
            ),
        ),
        (
            json!({"secret": {"name": long(300)}}),
            ("spec.secret.name", "may not be more than 253 bytes"),
        ),
        (
            json!({"source": {"tokenRequest": {"name": long(300)}}}),
            ("spec.source.tokenRequest.name", "may not be more than 253 bytes"),
        ),
        (
            json!({"secret": {"labels": entries(bound::METADATA_ENTRIES + 1, 1)}}),
            ("spec.secret.labels", "must have at most 32"),
        ),
        (
            json!({"secret": {"labels": entries(1, bound::LABEL_VALUE + 1)}}),
            ("spec.secret.labels.example.com/key-0", "may not be more than 63 bytes"),
        ),
        (
            json!({"secret": {"annotations": entries(1, bound::ANNOTATION_VALUE + 1)}}),
            (
                "spec.secret.annotations.example.com/key-0",
                "may not be more than 2048 bytes",
            ),
        ),
        (
            json!({"secret": {"type": "kubernetes.io/dockerconfigjson", "registries": strings(bound::REGISTRIES + 1, 4)}}),
            ("spec.secret.registries", "must have at most 64 items"),
        ),
        (
            json!({"rolloutRestartTargets": (0..21).map(|i| json!({"kind": "Deployment", "name": format!("d{i}")})).collect::<Vec<_>>()}),
            ("spec.rolloutRestartTargets", "must have at most 20 items"),
        ),
        // The review's overflowing duration, more digits than a duration may have, units beyond
        // days, and more than 32 characters.
        (
            json!({"refresh": {"renewBefore": "18446744073709551615s"}}),
            ("spec.refresh.renewBefore", "should match"),
        ),
        (
            json!({"refresh": {"lifetimeWhenUnknown": "100000h"}}),
            ("spec.refresh.lifetimeWhenUnknown", "should match"),
        ),
        (
            json!({"flow": {"impersonation": {"lifetime": "1y"}}}),
            ("spec.flow.impersonation.lifetime", "should match"),
        ),
        (
            json!({"rolloutRestartMinInterval": "1h".repeat(17)}),
            ("spec.rolloutRestartMinInterval", "may not be more than 32 bytes"),
        ),
        (
            json!({"secret": {"format": {"template": {"data": entries(bound::TEMPLATE_ENTRIES + 1, 1)}}}}),
            ("spec.secret.format.template.data", "must have at most 4"),
        ),
        (
            json!({"secret": {"format": {"template": {"data": {"a": long(bound::TEMPLATE + 1)}}}}}),
            ("spec.secret.format.template.data.a", "may not be more than 4096 bytes"),
        ),
        (
            json!({"secret": {"format": {"template": {"annotations": {"a": long(bound::ANNOTATION_TEMPLATE + 1)}}}}}),
            (
                "spec.secret.format.template.annotations.a",
                "may not be more than 1024 bytes",
            ),
        ),
        (
            json!({"secret": {"format": {"gitCredentials": {"urls": strings(bound::CREDENTIAL_HOSTS + 1, 8)}}}}),
            ("spec.secret.format.gitCredentials.urls", "must have at most 16 items"),
        ),
        (
            json!({"flow": {"idToken": {"audience": long(bound::ID_TOKEN_AUDIENCE + 1)}}}),
            ("spec.flow.idToken.audience", "may not be more than 2048 bytes"),
        ),
    ];
    for (i, (patch, (path, expected))) in refused.iter().enumerate() {
        let object = token_request(&format!("refused-{i}"), merged(base_spec(), patch));
        match api.create(&dry_run, &object).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{patch}: {status:?}");
                let message = &status.message;
                assert!(
                    message.contains(&format!("{path}: ")) && message.contains(expected),
                    "{patch}: {message}"
                );
            }
            other => panic!("{patch} was not refused: {other:?}"),
        }
    }

    // At every bound at once: still one object the API server stores.
    let at_the_bounds = json!({
        "flow": {"impersonation": {
            "serviceAccount": format!("{}@p.iam.gserviceaccount.com", long(bound::SERVICE_ACCOUNT - 26)),
            "delegates": strings(bound::DELEGATES, bound::SERVICE_ACCOUNT),
            "scopes": strings(bound::SCOPES, bound::SCOPE),
            "lifetime": "99999s99999s99999s99999s99999s",
        }},
        "secret": {
            "name": long(bound::OBJECT_NAME),
            "labels": entries(bound::METADATA_ENTRIES, bound::LABEL_VALUE),
            "annotations": entries(bound::METADATA_ENTRIES, bound::ANNOTATION_VALUE),
            "tokenKey": long(bound::SECRET_KEY),
        },
        "refresh": {"renewBefore": "1h 30m", "lifetimeWhenUnknown": "15min"},
        "rolloutRestartTargets": (0..bound::ROLLOUT_RESTART_TARGETS)
            .map(|i| json!({"kind": "StatefulSet", "name": format!("{i:a>253}")}))
            .collect::<Vec<_>>(),
        "rolloutRestartMinInterval": "1d",
    });
    let object = token_request("at-the-bounds", merged(base_spec(), &at_the_bounds));
    api.create(&dry_run, &object)
        .await
        .unwrap_or_else(|e| panic!("the largest valid object was refused: {e}"));
    // The largest format: a template at its bounds.
    let template = json!({"secret": {"format": {"template": {
        "data": entries(bound::TEMPLATE_ENTRIES, bound::TEMPLATE),
        "annotations": entries(bound::ANNOTATION_TEMPLATE_ENTRIES, bound::ANNOTATION_TEMPLATE),
    }}}});
    let object = token_request("template-at-the-bounds", merged(base_spec(), &template));
    api.create(&dry_run, &object)
        .await
        .unwrap_or_else(|e| panic!("the largest template was refused: {e}"));
    // The durations of the README and the examples.
    for (i, duration) in [
        "90s", "10m", "1h", "1h30m", "15min", "1h 30m", "1500ms", "2 hours", "45s",
    ]
    .iter()
    .enumerate()
    {
        let spec = merged(base_spec(), &json!({"refresh": {"renewBefore": duration}}));
        api.create(&dry_run, &token_request(&format!("duration-{i}"), spec))
            .await
            .unwrap_or_else(|e| panic!("{duration} was refused: {e}"));
    }

    // The status, which the operator writes, is bounded too.
    api.create(&PostParams::default(), &token_request("status", base_spec()))
        .await
        .unwrap();
    let condition = |message: String| {
        json!({"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": message,
            "lastTransitionTime": "2026-12-01T10:00:00Z"})
    };
    let patch_status = |status: Value| {
        let api = api.clone();
        async move {
            let params = PatchParams {
                dry_run: true,
                ..PatchParams::default()
            };
            api.patch_status("status", &params, &Patch::Merge(json!({"status": status})))
                .await
        }
    };
    patch_status(json!({"conditions": [condition(long(bound::CONDITION_MESSAGE))]}))
        .await
        .unwrap_or_else(|e| panic!("a message at the bound was refused: {e}"));
    match patch_status(json!({"conditions": [condition(long(bound::CONDITION_MESSAGE + 1))]})).await {
        Err(kube::Error::Api(status)) => assert!(
            status.message.contains("status.conditions[0].message")
                && status.message.contains("may not be more than 32768 bytes"),
            "{}",
            status.message.replace(&long(100), "...")
        ),
        Ok(_) => panic!("an oversized status message was accepted"),
        Err(other) => panic!("{other}"),
    }
}

/// The object of `kind` among the README's YAML examples, moved to `namespace`.
fn readme_example<K: DeserializeOwned>(kind: &str, namespace: &str) -> K {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let marker = format!("\nkind: {kind}\n");
    let mut found = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .filter(|block| format!("\n{block}").contains(&marker))
        .flat_map(|block| serde_saphyr::from_multiple::<Value>(block).unwrap())
        .filter(|object| object["kind"] == kind);
    let mut object = found.next().unwrap_or_else(|| panic!("no {kind} in the README"));
    assert!(found.next().is_none(), "two {kind}s in the README");
    object["metadata"]["namespace"] = json!(namespace);
    serde_json::from_value(object).unwrap()
}

#[tokio::test]
async fn the_readmes_tenant_role_and_quota_do_what_it_says() {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await;
    apply_crds(&client, &[TokenRequest::crd()]).await.unwrap();
    let namespace = create_namespace(&client, "tenant").await.unwrap();

    let quota: ResourceQuota = readme_example("ResourceQuota", &namespace);
    let limit: usize = quota.spec.as_ref().unwrap().hard.as_ref().unwrap()["count/tokenrequests.gcptoken.dev"]
        .0
        .parse()
        .unwrap();
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &namespace);
    let name = quotas
        .create(&PostParams::default(), &quota)
        .await
        .unwrap()
        .metadata
        .name
        .unwrap();
    // Admission enforces a quota once its status holds the usage, which kube-controller-manager's
    // quota controller computes; the test control plane does not run that controller, so the test
    // writes what it would for an empty namespace.
    let resource = "count/tokenrequests.gcptoken.dev";
    let usage = json!({"status": {"hard": {resource: limit.to_string()}, "used": {resource: "0"}}});
    quotas
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&usage))
        .await
        .unwrap();

    // The Role, bound to a ServiceAccount rather than the example's group.
    create_service_account(&client, &namespace, "deployer").await.unwrap();
    let role: Role = readme_example("Role", &namespace);
    Api::<Role>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let mut binding: RoleBinding = readme_example("RoleBinding", &namespace);
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    binding.subjects = Some(vec![Subject {
        kind: "ServiceAccount".into(),
        name: "deployer".into(),
        namespace: Some(namespace.clone()),
        ..Subject::default()
    }]);
    Api::<RoleBinding>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let tenant = control_plane
        .client_as_service_account(&namespace, "deployer")
        .await
        .unwrap();
    let token_requests: Api<TokenRequest> = Api::namespaced(tenant.clone(), &namespace);
    // The authorizer sees a new binding a moment later.
    let started = Instant::now();
    while let Err(error) = token_requests
        .create(&PostParams::default(), &token_request("by-the-tenant", base_spec()))
        .await
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the tenant cannot create: {error}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match Api::<Secret>::namespaced(tenant, &namespace)
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("the tenant's Role reads Secrets: {:?}", other.map(|l| l.items.len())),
    }

    for i in 1..limit {
        token_requests
            .create(&PostParams::default(), &token_request(&format!("tr-{i}"), base_spec()))
            .await
            .unwrap_or_else(|e| panic!("TokenRequest {} of {limit}: {e}", i + 1));
    }
    match token_requests
        .create(&PostParams::default(), &token_request("one-too-many", base_spec()))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(status.message.contains("exceeded quota"), "{}", status.message);
        }
        other => panic!("TokenRequest {} of {limit} was not refused: {other:?}", limit + 1),
    }
}

/// The CRD's CEL rules, evaluated by the apiserver: `kubectl apply` of a TokenRequest that breaks a
/// one-of group fails with the rule's message, naming the fields that are set, and stores nothing.
#[tokio::test]
async fn kubectl_apply_is_refused_by_the_crd_s_rules_with_their_messages() {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await;
    apply_crds(&client, &[TokenRequest::crd()]).await.unwrap();
    let namespace = create_namespace(&client, "cel").await.unwrap();
    let impersonation = json!({"serviceAccount": "target@project.iam.gserviceaccount.com",
                               "scopes": ["https://www.googleapis.com/auth/cloud-platform"]});
    let sts =
        json!({"audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k"});
    let token_source = json!({"serviceAccountToken": {"serviceAccountName": "default"}});
    let cases = [
        (
            "two-flows",
            json!({"flow": {"sts": sts, "impersonation": impersonation}, "source": token_source}),
            "spec.flow: Invalid value",
            "exactly one of sts, impersonation, developerConnect, discoveryEngine, idToken, developerConnectRepository \
             must be set, but these are set: sts impersonation",
        ),
        (
            "no-flow",
            json!({"flow": {}, "source": token_source}),
            "spec.flow: Invalid value",
            "exactly one of sts, impersonation, developerConnect, discoveryEngine, idToken, developerConnectRepository \
             must be set, but none is",
        ),
        (
            "two-formats",
            json!({"flow": {"impersonation": impersonation}, "source": token_source,
                   "secret": {"format": {"netrc": {"hosts": ["h"]}, "template": {"data": {"a": "b"}}}}}),
            "spec.secret.format: Invalid value",
            "exactly one of basicAuth, flux, argoCD, gitCredentials, netrc, npmrc, template must be set, but these \
             are set: netrc template",
        ),
        (
            "two-sources",
            json!({"flow": {"impersonation": impersonation},
                   "source": {"tokenRequest": {"name": "upstream"}, "ambient": {}}}),
            "spec.source: Invalid value",
            "exactly one of serviceAccountToken, secret, tokenRequest, ambient must be set, but these are set: tokenRequest ambient",
        ),
        (
            "two-subject-tokens",
            json!({"flow": {"sts": sts}, "source": {"secret": {"name": "wif", "key": "credentials.json", "subjectToken": {
                "serviceAccountToken": {"serviceAccountName": "default"}, "secret": {"name": "jwt", "key": "token"}}}}}),
            "spec.source.secret.subjectToken: Invalid value",
            "exactly one of serviceAccountToken, secret must be set, but these are set: serviceAccountToken secret",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    // `kubectl apply -f FILE` of a TokenRequest with `spec`, as a user types it.
    let apply = async |name: &str, spec: &Value| {
        let file = dir.path().join(format!("{name}.yaml"));
        let manifest = json!({"apiVersion": "gcptoken.dev/v1alpha1", "kind": "TokenRequest",
                              "metadata": {"name": name}, "spec": spec});
        std::fs::write(&file, serde_saphyr::to_string(&manifest).unwrap()).unwrap();
        control_plane
            .kubectl()
            .args(["apply", "--namespace", &namespace, "--filename"])
            .arg(&file)
            .output()
            .await
            .unwrap()
    };
    for (name, spec, path, message) in &cases {
        let output = apply(name, spec).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name} was admitted");
        assert!(stderr.contains(path) && stderr.contains(message), "{name}: {stderr}");
    }
    let api: Api<TokenRequest> = Api::namespaced(client, &namespace);
    assert!(api.list(&ListParams::default()).await.unwrap().items.is_empty());

    // The same manifest with one flow and one source goes in.
    let output = apply("valid", &json!({"flow": {"sts": sts}, "source": token_source})).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(api.get_opt("valid").await.unwrap().is_some());
}
