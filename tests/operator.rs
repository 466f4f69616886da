//! The operator binary end to end, on the real control plane and the Google emulator.

mod support;

use std::time::{Duration, Instant};

use base64::{Engine, engine::general_purpose::STANDARD};
use gcp_token_operator_testkit::{
    control_plane::{ControlPlane, mint_token, wait_for_deletion},
    emulator::{Endpoint, Fault},
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::*;

const SA_EMAIL: &str = "builder@proj.iam.gserviceaccount.com";
const CONNECTOR: &str = "projects/proj/locations/us-central1/accountConnectors/github";
const DATA_CONNECTOR: &str = "projects/proj/locations/global/collections/jira/dataConnector";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

fn sts_spec() -> serde_json::Value {
    json!({
        "flow": {"sts": {"audience": AUDIENCE}},
        "source": {"serviceAccountToken": {"serviceAccountName": "default"}},
    })
}

fn impersonation_spec(source: serde_json::Value) -> serde_json::Value {
    json!({
        "flow": {"impersonation": {"serviceAccount": SA_EMAIL, "scopes": [CLOUD_PLATFORM]}},
        "source": source,
    })
}

#[tokio::test]
async fn sts_with_service_account_token_fills_an_opaque_secret() {
    let mut env = Env::new("sts").await;
    env.start_operator();
    env.create("wif", sts_spec()).await;
    let tr = env.wait_ready("wif").await;

    let status = tr.status.clone().unwrap();
    assert_eq!(status.flow.as_deref(), Some("sts"));
    assert_eq!(status.secret_name.as_deref(), Some("wif"));
    assert_eq!(status.scopes, vec![CLOUD_PLATFORM]);
    assert_eq!(ready_reason(&tr), Some("Issued"));
    let secret = env.secret("wif").await;
    let token = secret_token(&secret);
    let info = env
        .google
        .token_info(&token)
        .expect("the Secret holds a token the emulator issued");
    assert_eq!(info.endpoint, Endpoint::Sts);
    assert!(
        info.principal
            .ends_with(&format!("/subject/system:serviceaccount:{}:default", env.namespace))
    );
    assert_eq!(
        fingerprint(&tr).unwrap(),
        gcp_token_operator::render::fingerprint(&token)
    );
    let data = secret.data.as_ref().unwrap();
    assert_eq!(data["token_type"].0, b"Bearer");
    let expires_at: k8s_openapi::jiff::Timestamp = String::from_utf8(data["expires_at"].0.clone())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(Some(expires_at), status.expiration_time.map(|t| t.0));
    let labels = secret.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "gcp-token-operator");
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("TokenRequest", "wif", Some(true))
    );

    // The exchange went out as Google's libraries send it: form-encoded, no Authorization header.
    let request = env
        .google
        .requests()
        .into_iter()
        .find(|r| r.endpoint == Some(Endpoint::Sts))
        .unwrap();
    assert!(
        request
            .headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("application/x-www-form-urlencoded"))
    );
    assert!(!request.headers.iter().any(|(k, _)| k == "authorization"));
    let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(request.body.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(form["grant_type"], "urn:ietf:params:oauth:grant-type:token-exchange");
    assert_eq!(form["subject_token_type"], "urn:ietf:params:oauth:token-type:jwt");
    assert_eq!(form["audience"], AUDIENCE);
    assert_eq!(form["scope"], CLOUD_PLATFORM);

    let operator = env.operator.as_ref().unwrap();
    assert_eq!(operator.get("/readyz").await.unwrap().0, 200);
    assert_eq!(operator.get("/healthz").await.unwrap().0, 200);
    let (code, metrics) = operator.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    for series in [
        "gcp_token_operator_token_expiration_timestamp_seconds{",
        "gcp_token_operator_refresh_attempts_total{flow=\"sts\",outcome=\"Success\"} 1",
        "gcp_token_operator_google_request_duration_seconds_count{endpoint=\"sts\",status_class=\"2xx\"} 1",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    env.assert_no_token_leaked().await;
}

/// STS → impersonation (as an imagePullSecret) → Developer Connect, created downstream-first so
/// the chain also shows SourceNotReady resolving by itself.
#[tokio::test]
async fn chain_sts_impersonation_developer_connect() {
    let mut env = Env::new("chain").await;
    env.google.add_service_account(SA_EMAIL, &["*"]);
    env.google.add_account_connector(CONNECTOR);
    env.start_operator();
    env.create(
        "git",
        json!({
            "flow": {"developerConnect": {"accountConnector": CONNECTOR}},
            "source": {"tokenRequest": {"name": "registry"}},
            "secret": {"tokenKey": "password", "labels": {"team": "build"}},
        }),
    )
    .await;
    let mut registry = impersonation_spec(json!({"tokenRequest": {"name": "wif"}}));
    registry["secret"] =
        json!({"type": "kubernetes.io/dockerconfigjson", "registries": ["us-docker.pkg.dev", "europe-docker.pkg.dev"]});
    env.create("registry", registry).await;
    env.wait_reason("git", "SourceNotReady").await;
    env.create("wif", sts_spec()).await;
    env.wait_ready("git").await;

    let docker = env.secret("registry").await;
    assert_eq!(docker.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    let config: serde_json::Value =
        serde_json::from_slice(&docker.data.as_ref().unwrap()[".dockerconfigjson"].0).unwrap();
    let iam_token = config["auths"]["us-docker.pkg.dev"]["password"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(config["auths"]["europe-docker.pkg.dev"]["password"], iam_token.as_str());
    assert_eq!(config["auths"]["us-docker.pkg.dev"]["username"], "oauth2accesstoken");
    assert_eq!(
        config["auths"]["us-docker.pkg.dev"]["auth"],
        STANDARD.encode(format!("oauth2accesstoken:{iam_token}"))
    );
    let iam = env.google.token_info(&iam_token).unwrap();
    assert_eq!(
        (iam.endpoint, iam.principal.as_str()),
        (
            Endpoint::GenerateAccessToken,
            "serviceAccount:builder@proj.iam.gserviceaccount.com"
        )
    );

    // Each hop authenticated with the token of the hop before it.
    let sts_token = secret_token(&env.secret("wif").await);
    let bearer = |endpoint| {
        env.google
            .requests()
            .into_iter()
            .filter(|r| r.endpoint == Some(endpoint))
            .find_map(|r| {
                r.headers
                    .into_iter()
                    .find(|(k, _)| k == "authorization")
                    .map(|(_, v)| v)
            })
    };
    assert_eq!(
        bearer(Endpoint::GenerateAccessToken),
        Some(format!("Bearer {sts_token}"))
    );
    assert_eq!(bearer(Endpoint::FetchAccessToken), Some(format!("Bearer {iam_token}")));
    let git = env.secret("git").await;
    let git_token = String::from_utf8(git.data.as_ref().unwrap()["password"].0.clone()).unwrap();
    assert_eq!(
        env.google.token_info(&git_token).unwrap().endpoint,
        Endpoint::FetchAccessToken
    );
    assert_eq!(git.metadata.labels.as_ref().unwrap()["team"], "build");
    env.assert_no_token_leaked().await;
}

/// The flow and source pairs the other tests do not cover, each to Ready with a token from the
/// right endpoint: sts from a JWT in a Secret and from another TokenRequest's access token (which
/// STS answers without expiry: the subject's expiry is inherited), Developer Connect from a
/// Secret, Discovery Engine from another TokenRequest.
#[tokio::test]
async fn every_other_flow_and_source_pair() {
    let mut env = Env::new("pairs").await;
    env.google.add_account_connector(CONNECTOR);
    env.google.add_data_connector(DATA_CONNECTOR);
    let (jwt, _) = mint_token(&env.client, &env.namespace, "default", &[AUDIENCE], 3600)
        .await
        .unwrap();
    env.put_secret("k8s-jwt", "jwt", &jwt).await;
    let caller = env.caller_token().await;
    env.put_secret("caller", "token", &caller).await;
    env.start_operator();
    let cases = [
        (
            "sts-secret",
            json!({"flow": {"sts": {"audience": AUDIENCE}}, "source": {"secret": {"name": "k8s-jwt", "key": "jwt"}}}),
            Endpoint::Sts,
        ),
        (
            "sts-downscoped",
            json!({
            "flow": {"sts": {"audience": AUDIENCE, "subjectTokenType": "urn:ietf:params:oauth:token-type:access_token",
                             "accessBoundary": {"accessBoundaryRules": [{"availableResource": "//storage.googleapis.com/projects/_/buckets/b",
                                                                          "availablePermissions": ["inRole:roles/storage.objectViewer"]}]}}},
            "source": {"tokenRequest": {"name": "sts-secret"}}}),
            Endpoint::Sts,
        ),
        (
            "git-secret",
            json!({"flow": {"developerConnect": {"accountConnector": CONNECTOR}}, "source": {"secret": {"name": "caller", "key": "token"}}}),
            Endpoint::FetchAccessToken,
        ),
        (
            "agent-chained",
            json!({"flow": {"discoveryEngine": {"dataConnector": DATA_CONNECTOR}}, "source": {"tokenRequest": {"name": "sts-secret"}}}),
            Endpoint::AcquireAccessToken,
        ),
    ];
    for (name, spec, _) in &cases {
        env.create(name, spec.clone()).await;
    }
    for (name, _, endpoint) in &cases {
        env.wait_ready(name).await;
        let token = secret_token(&env.secret(name).await);
        let info = env
            .google
            .token_info(&token)
            .unwrap_or_else(|| panic!("{name}: not an issued token"));
        assert_eq!(info.endpoint, *endpoint, "{name}");
    }
    let upstream = env.wait_ready("sts-secret").await.status.unwrap().expiration_time;
    let downscoped = env.wait_ready("sts-downscoped").await.status.unwrap().expiration_time;
    assert_eq!(
        downscoped, upstream,
        "no expires_in from STS: the subject token's expiry applies"
    );
    let request = env
        .google
        .requests()
        .into_iter()
        .rfind(|r| r.endpoint == Some(Endpoint::Sts))
        .unwrap();
    let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(request.body.as_bytes())
        .into_owned()
        .collect();
    let options: serde_json::Value = serde_json::from_str(&form["options"]).unwrap();
    assert_eq!(
        options["accessBoundary"]["accessBoundaryRules"][0]["availablePermissions"][0],
        "inRole:roles/storage.objectViewer"
    );
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn discovery_engine_with_a_secret_source_and_assumed_lifetime() {
    let mut env = Env::new("discovery").await;
    env.google.add_data_connector(DATA_CONNECTOR);
    let caller = env.caller_token().await;
    env.put_secret("caller", "token", &format!("{caller}\n")).await;
    env.start_operator();
    env.create(
        "agent",
        json!({
            "flow": {"discoveryEngine": {"dataConnector": DATA_CONNECTOR, "scope": "read", "action": "search"}},
            "source": {"secret": {"name": "caller", "key": "token"}},
            "refresh": {"lifetimeWhenUnknown": "10m"},
        }),
    )
    .await;
    let tr = env.wait_ready("agent").await;
    let status = tr.status.unwrap();
    let lifetime = status
        .expiration_time
        .unwrap()
        .0
        .duration_since(status.last_refresh_time.unwrap().0);
    assert_eq!(
        lifetime.as_secs(),
        600,
        "no expiry from the API: lifetimeWhenUnknown applies"
    );
    let request = env
        .google
        .requests()
        .into_iter()
        .find(|r| r.endpoint == Some(Endpoint::AcquireAccessToken))
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(body, json!({"scope": "read", "action": "search"}));
    assert!(
        request
            .headers
            .contains(&("authorization".into(), format!("Bearer {caller}"))),
        "trimmed caller token"
    );
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_again_and_again() {
    let mut env = Env::new("refresh").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(20)).await;
    env.start_operator();
    env.create(
        "short",
        impersonation_spec(json!({"secret": {"name": "caller", "key": "token"}})),
    )
    .await;
    let mut tr = env.wait_ready("short").await;
    let mut seen = vec![(
        fingerprint(&tr).unwrap(),
        tr.status.as_ref().unwrap().expiration_time.clone().unwrap().0,
    )];
    for _ in 0..3 {
        let previous = seen.last().unwrap().0.clone();
        tr = env
            .wait_tr("short", "a refreshed token", |t| {
                fingerprint(t).is_some_and(|f| f != previous)
            })
            .await;
        assert_eq!(ready_status(&tr), Some("True"));
        assert_eq!(ready_reason(&tr), Some("Refreshed"));
        let expiry = tr.status.as_ref().unwrap().expiration_time.clone().unwrap().0;
        assert!(expiry > seen.last().unwrap().1, "the expiry advances");
        seen.push((fingerprint(&tr).unwrap(), expiry));
        let in_secret = gcp_token_operator::render::fingerprint(&secret_token(&env.secret("short").await));
        assert_eq!(in_secret, fingerprint(&tr).unwrap(), "the Secret holds the new token");
    }
    // Refreshed well before expiry: each new token was minted while the previous one was valid.
    let minted = env.google.calls(Endpoint::GenerateAccessToken);
    assert!((4..=5).contains(&minted), "{minted} mints for 4 tokens");
    env.assert_no_token_leaked().await;
}

/// The resourceVersions of these TokenRequests and of their Secrets: any write changes one.
async fn resource_versions(env: &Env<'_>, names: &[&str]) -> Vec<Option<String>> {
    let mut versions = Vec::new();
    for name in names {
        versions.push(env.secret(name).await.metadata.resource_version);
        versions.push(env.token_requests().get(name).await.unwrap().metadata.resource_version);
    }
    versions
}

#[tokio::test]
async fn restart_with_valid_tokens_makes_no_call_and_no_write() {
    let mut env = Env::new("restart").await;
    env.google.add_service_account(SA_EMAIL, &["*"]);
    // The first run lists in pages, the restarted one streams (`auto` on this apiserver): both
    // fill the caches the reconciles rely on.
    env.operator = Some(env.spawn_operator(&["--initial-list", "paged"]));
    env.create("wif", sts_spec()).await;
    env.create("sa", impersonation_spec(json!({"tokenRequest": {"name": "wif"}})))
        .await;
    env.wait_ready("wif").await;
    env.wait_ready("sa").await;
    // Every write of the first run has landed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls_before = env.google.requests().len();
    let versions_before = resource_versions(&env, &["wif", "sa"]).await;
    assert!(!env.operator.as_ref().unwrap().log().contains("initial lists:"));

    env.kill_operator();
    env.start_operator();
    let operator = env.operator.as_ref().unwrap();
    operator.wait_ready(WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    let log = operator.log();
    assert!(log.contains("initial lists: streamed"), "{log}");
    // Give the restarted operator time to reconcile everything it has synced.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.google.requests().len(),
        calls_before,
        "no call to Google after the restart"
    );
    assert_eq!(
        resource_versions(&env, &["wif", "sa"]).await,
        versions_before,
        "no Secret or status write after the restart"
    );
    env.assert_no_token_leaked().await;
}

/// An apiserver without streaming lists (the `WatchList` feature off, as before Kubernetes 1.34 by
/// default): `--initial-list auto` finds out at start and lists in pages.
#[tokio::test]
async fn without_streaming_lists_the_watches_list_in_pages() {
    let control_plane = ControlPlane::start_with_api_server_flags(&[("feature-gates", "WatchList=false")])
        .await
        .expect("a control plane without WatchList");
    let mut env = Env::on(&control_plane, "paged").await;
    env.create("wif", sts_spec()).await;
    env.start_operator();
    env.wait_ready("wif").await;
    let log = env.operator_log();
    assert!(log.contains("initial lists: paged"), "{log}");
    // And the watches go on after the initial list: a second object is reconciled too.
    env.create("later", sts_spec()).await;
    env.wait_ready("later").await;
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn secret_deletion_and_tampering_are_repaired() {
    let mut env = Env::new("repair").await;
    env.start_operator();
    let mut spec = sts_spec();
    spec["secret"] = json!({"labels": {"team": "a"}});
    env.create("wif", spec).await;
    let tr = env.wait_ready("wif").await;
    let first = fingerprint(&tr).unwrap();

    // Label drift: put back without minting.
    let calls = env.google.calls(Endpoint::Sts);
    let patch = json!({"metadata": {"labels": {"team": null}}});
    env.secrets()
        .patch("wif", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    env.wait_secret("wif", "the label restored", |s| {
        s.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.get("team").is_some_and(|v| v == "a"))
    })
    .await;
    assert_eq!(
        env.google.calls(Endpoint::Sts),
        calls,
        "label drift is repaired without minting"
    );

    // Edited token: re-minted at once.
    let patch = json!({"stringData": {"token": "tampered"}});
    env.secrets()
        .patch("wif", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let second = env
        .wait_tr("wif", "a new token after tampering", |t| {
            fingerprint(t).is_some_and(|f| f != first)
        })
        .await;
    let restored = env.secret("wif").await;
    assert!(
        env.google.token_info(&secret_token(&restored)).is_some(),
        "the Secret holds an issued token again"
    );

    // Deleted Secret: re-minted at once.
    env.secrets().delete("wif", &Default::default()).await.unwrap();
    let second = fingerprint(&second).unwrap();
    env.wait_tr("wif", "a new token after deletion", |t| {
        fingerprint(t).is_some_and(|f| f != second)
    })
    .await;
    let recreated = env.secret("wif").await;
    assert!(env.google.token_info(&secret_token(&recreated)).is_some());
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn spec_change_mints_at_once_and_deletion_collects_the_secret() {
    let mut env = Env::new("spec").await;
    env.start_operator();
    env.create("wif", sts_spec()).await;
    let tr = env.wait_ready("wif").await;
    let hash = |s: &Secret| s.metadata.annotations.as_ref().unwrap()["gcptoken.dev/spec-hash"].clone();
    let first_hash = hash(&env.secret("wif").await);

    let storage = "https://www.googleapis.com/auth/devstorage.read_only";
    let patch = json!({"spec": {"flow": {"sts": {"scopes": [storage]}}}});
    env.token_requests()
        .patch("wif", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let first = fingerprint(&tr).unwrap();
    let changed = env
        .wait_tr("wif", "a token for the new scopes", |t| {
            fingerprint(t).is_some_and(|f| f != first)
        })
        .await;
    assert_eq!(changed.status.as_ref().unwrap().scopes, vec![storage]);
    assert_ne!(hash(&env.secret("wif").await), first_hash);
    assert_eq!(env.google.calls(Endpoint::Sts), 2);

    env.delete("wif").await;
    let log = || env.operator_log();
    wait_for_deletion(&env.secrets(), "wif", WAIT, &log)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn transient_failures_keep_the_token_and_recover() {
    let mut env = Env::new("transient").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(30)).await;
    env.start_operator();
    env.create(
        "sa",
        impersonation_spec(json!({"secret": {"name": "caller", "key": "token"}})),
    )
    .await;
    let tr = env.wait_ready("sa").await;
    let held = secret_token(&env.secret("sa").await);

    env.google.fail_next(
        Endpoint::GenerateAccessToken,
        2,
        Fault::Status {
            code: 503,
            retry_after: None,
        },
    );
    let failing = env.wait_reason("sa", "RefreshFailed").await;
    assert_eq!(
        ready_status(&failing),
        Some("True"),
        "a failed refresh keeps Ready while the token is valid"
    );
    let status = failing.status.as_ref().unwrap();
    assert!(status.failed_attempts >= Some(1));
    assert!(
        ready_condition(&failing).unwrap().message.contains("503"),
        "the message says what failed"
    );
    assert_eq!(
        secret_token(&env.secret("sa").await),
        held,
        "the working token stays in the Secret"
    );

    let recovered = env.wait_reason("sa", "Refreshed").await;
    assert_eq!(recovered.status.as_ref().unwrap().failed_attempts, None);
    assert_ne!(fingerprint(&recovered), fingerprint(&tr));
    assert_eq!(
        env.google.calls(Endpoint::GenerateAccessToken),
        4,
        "1 issue + 2 failures + 1 success"
    );

    // Garbage from Google, and a dropped connection, are transient too.
    env.google
        .fail_next(Endpoint::GenerateAccessToken, 1, Fault::MalformedJson);
    env.google
        .fail_next(Endpoint::GenerateAccessToken, 1, Fault::DropConnection);
    let before = fingerprint(&recovered);
    env.wait_tr("sa", "recovery after garbage", |t| {
        fingerprint(t) != before && ready_reason(t) == Some("Refreshed")
    })
    .await;
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), 7);
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let mut env = Env::new("retryafter").await;
    env.google.fail_next(
        Endpoint::Sts,
        1,
        Fault::Status {
            code: 429,
            retry_after: Some(4),
        },
    );
    env.start_operator();
    env.create("wif", sts_spec()).await;
    // The gap between the refused call and the retry, as the emulator sees them.
    let when_calls_reach = |n: usize| {
        let google = &env.google;
        async move {
            let deadline = Instant::now() + WAIT;
            while google.calls(Endpoint::Sts) < n {
                assert!(Instant::now() < deadline, "no call number {n}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Instant::now()
        }
    };
    let refused = when_calls_reach(1).await;
    let failed = env.wait_reason("wif", "UpstreamUnavailable").await;
    assert_eq!(ready_status(&failed), Some("False"));
    assert!(ready_condition(&failed).unwrap().message.contains("429"));
    let retried = when_calls_reach(2).await;
    let gap = retried - refused;
    assert!(
        gap >= Duration::from_millis(3900),
        "retried {gap:?} after a Retry-After of 4 s"
    );

    let ready = env.wait_ready("wif").await;
    assert_eq!(env.google.calls(Endpoint::Sts), 2, "one refused call, one retry");
    assert_eq!(ready_reason(&ready), Some("Issued"));
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn permanent_failures_are_reported_with_their_reason() {
    let mut env = Env::new("permanent").await;
    env.google.add_account_connector(CONNECTOR);
    let caller = env.caller_token().await;
    env.put_secret("caller", "token", &caller).await;
    env.start_operator();
    let source = json!({"secret": {"name": "caller", "key": "token"}});
    // The emulator knows no such service account: 403, as Google answers for "missing or denied".
    env.create("denied", impersonation_spec(source.clone())).await;
    env.create("missing", json!({"flow": {"developerConnect": {"accountConnector": "projects/p/locations/l/accountConnectors/none"}}, "source": source})).await;
    // Two: "missing" may reach the endpoint first and use one up (it still gets its 404).
    env.google.fail_next(
        Endpoint::FetchAccessToken,
        2,
        Fault::ExchangeError {
            code: "invalid_grant".into(),
            description: "user revoked access".into(),
        },
    );
    env.create(
        "revoked",
        json!({"flow": {"developerConnect": {"accountConnector": CONNECTOR}}, "source": source}),
    )
    .await;
    env.create("nosource", json!({"flow": {"developerConnect": {"accountConnector": CONNECTOR}}, "source": {"secret": {"name": "absent", "key": "token"}}})).await;
    env.google.add_data_connector(DATA_CONNECTOR);
    env.google.fail_next(Endpoint::AcquireAccessToken, 1, Fault::EmptyToken);
    env.create(
        "empty",
        json!({"flow": {"discoveryEngine": {"dataConnector": DATA_CONNECTOR}}, "source": source}),
    )
    .await;

    let denied = env.wait_reason("denied", "PermissionDenied").await;
    assert!(
        ready_condition(&denied)
            .unwrap()
            .message
            .contains("iam.serviceAccounts.getAccessToken"),
        "Google's text is shown"
    );
    env.wait_reason("missing", "NotFound").await;
    let empty = env.wait_reason("empty", "UpstreamRejected").await;
    assert!(ready_condition(&empty).unwrap().message.contains("held no token"));
    let revoked = env.wait_reason("revoked", "UpstreamRejected").await;
    assert!(
        ready_condition(&revoked)
            .unwrap()
            .message
            .contains("user revoked access")
    );
    let nosource = env.wait_reason("nosource", "SourceNotReady").await;
    assert!(ready_condition(&nosource).unwrap().message.contains("\"absent\""));
    for tr in [&denied, &revoked] {
        assert_eq!(ready_status(tr), Some("False"));
        assert_eq!(tr.status.as_ref().unwrap().failed_attempts, Some(1));
    }
    // Permanent errors back off for tens of seconds: no second attempt yet.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), 1);
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn invalid_specs_are_reported_without_calling_google() {
    let mut env = Env::new("invalid").await;
    env.start_operator();
    let invalid = [
        (
            "sa-token-for-iam",
            impersonation_spec(json!({"serviceAccountToken": {"serviceAccountName": "default"}})),
            "only valid as the subject token",
        ),
        (
            "bad-audience",
            json!({"flow": {"sts": {"audience": "//iam.googleapis.com/projects/abc"}}, "source": {"serviceAccountToken": {"serviceAccountName": "default"}}}),
            "identity pool provider",
        ),
        (
            "bad-lifetime",
            json!({"flow": {"impersonation": {"serviceAccount": SA_EMAIL, "scopes": [CLOUD_PLATFORM], "lifetime": "20h"}}, "source": {"tokenRequest": {"name": "x"}}}),
            "between 1s and 12h",
        ),
        (
            "self-source",
            impersonation_spec(json!({"tokenRequest": {"name": "self-source"}})),
            "must not name this TokenRequest",
        ),
    ];
    for (name, spec, _) in &invalid {
        env.create(name, spec.clone()).await;
    }
    for (name, _, message) in &invalid {
        let tr = env.wait_reason(name, "InvalidSpec").await;
        assert_eq!(ready_status(&tr), Some("False"));
        let text = &ready_condition(&tr).unwrap().message;
        assert!(text.contains(message), "{name}: {text}");
    }
    assert_eq!(env.google.requests().len(), 0, "nothing was sent to Google");
    // The operator is still running and still serves valid objects.
    env.create("valid", sts_spec()).await;
    env.wait_ready("valid").await;
    env.assert_no_token_leaked().await;
}
