//! Google credential files and the operator's own identity as sources, one-object Workload
//! Identity Federation, and the credential cache, end to end: the real operator binary on the real
//! control plane, against the Google emulator (which verifies service account keys' RS256
//! signatures with their public halves).

mod support;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use gcp_token_operator_testkit::{
    control_plane::{create_service_account, mint_token},
    emulator::{Endpoint, RecordedRequest},
};
use serde_json::{Value, json};
use support::{sources::*, *};

const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const READ_ONLY: &str = "https://www.googleapis.com/auth/devstorage.read_only";
const TARGET: &str = "puller@proj.iam.gserviceaccount.com";

fn form(request: &RecordedRequest) -> HashMap<String, String> {
    url::form_urlencoded::parse(request.body.as_bytes())
        .into_owned()
        .collect()
}

fn requests_to(env: &Env<'_>, endpoint: Endpoint) -> Vec<RecordedRequest> {
    env.google
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Some(endpoint))
        .collect()
}

/// The claims of a JWT, read without checking it (the emulator checked its signature).
fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn service_account_key_files_sign_a_jwt_for_the_oauth_endpoint() {
    let mut env = Env::new("sakey").await;
    let key = KeyFile::new(&env.google, "keyed@proj.iam.gserviceaccount.com", "kid-1");
    env.google.add_account_connector(CONNECTOR);
    env.google
        .add_service_account(TARGET, &["serviceAccount:keyed@proj.iam.gserviceaccount.com"]);
    env.put_secret("google-key", "key.json", &key.json).await;
    env.start_operator();
    env.create(
        "git",
        git_from(json!({"secret": {"name": "google-key", "key": "key.json"}})),
    )
    .await;
    env.create(
        "registry",
        json!({
            "flow": {"impersonation": {"serviceAccount": TARGET, "scopes": [READ_ONLY]}},
            "source": {"secret": {"name": "google-key", "key": "key.json", "format": "serviceAccountKey"}},
        }),
    )
    .await;
    env.wait_ready("git").await;
    env.wait_ready("registry").await;

    assert_eq!(principal_in(&env, "git").await, format!("serviceAccount:{}", key.email));
    assert_eq!(principal_in(&env, "registry").await, format!("serviceAccount:{TARGET}"));
    // Both use the key for cloud-platform: one exchange, kept for the second.
    let exchanges = requests_to(&env, Endpoint::OAuthToken);
    assert_eq!(exchanges.len(), 1, "one JWT-bearer call for two TokenRequests");
    let form = form(&exchanges[0]);
    assert_eq!(form["grant_type"], "urn:ietf:params:oauth:grant-type:jwt-bearer");
    let assertion = &form["assertion"];
    let header = jsonwebtoken::decode_header(assertion).unwrap();
    assert_eq!(
        (header.alg, header.kid.as_deref()),
        (jsonwebtoken::Algorithm::RS256, Some("kid-1"))
    );
    let claims = claims(assertion);
    assert_eq!(claims["iss"], key.email.as_str());
    assert_eq!(claims["scope"], CLOUD_PLATFORM);
    // The operator's OAuth endpoint, not the file's token_uri.
    assert_eq!(claims["aud"], format!("{}/token", env.google.base_url()));
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 3600);

    let mut secrets = key.material();
    secrets.push(assertion);
    env.assert_nothing_leaked(&secrets).await;
}

#[tokio::test]
async fn authorized_user_files_use_the_refresh_token_grant() {
    let mut env = Env::new("user").await;
    let (client_secret, refresh_token) = ("GOCSPX-client-secret-5e1f", "1//refresh-token-9c2d");
    env.google.add_authorized_user(
        "client-1.apps.googleusercontent.com",
        client_secret,
        refresh_token,
        "dev@example.com",
    );
    env.google.add_account_connector(CONNECTOR);
    let file = authorized_user("client-1.apps.googleusercontent.com", client_secret, refresh_token);
    env.put_secret("adc", "application_default_credentials.json", &file)
        .await;
    env.start_operator();
    env.create(
        "git",
        git_from(json!({"secret": {"name": "adc", "key": "application_default_credentials.json"}})),
    )
    .await;
    env.wait_ready("git").await;
    assert_eq!(principal_in(&env, "git").await, "user:dev@example.com");
    let exchange = form(&requests_to(&env, Endpoint::OAuthToken)[0]);
    assert_eq!(exchange["grant_type"], "refresh_token");
    assert_eq!(exchange["client_id"], "client-1.apps.googleusercontent.com");
    assert_eq!(exchange["scope"], CLOUD_PLATFORM);
    env.assert_nothing_leaked(&[client_secret, refresh_token]).await;
}

#[tokio::test]
async fn external_account_files_federate_with_the_token_request_s_subject_token() {
    let mut env = Env::new("external").await;
    env.google.add_account_connector(CONNECTOR);
    let pool = "principal://iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/pool";
    let subject = format!("{pool}/subject/system:serviceaccount:{}:default", env.namespace);
    env.google.add_service_account(TARGET, &[&subject]);
    // With impersonation, the subject token minted from a ServiceAccount of the namespace.
    let impersonating = external_account(
        &env.google,
        AUDIENCE,
        json!({
            "service_account_impersonation_url": impersonation_url(&env.google, TARGET),
            "service_account_impersonation": {"token_lifetime_seconds": 1200},
        }),
    );
    env.put_secret("wif-impersonating", "config.json", &impersonating).await;
    // Without, the subject token a JWT in a Secret.
    env.put_secret(
        "wif",
        "config.json",
        &external_account(&env.google, AUDIENCE, json!({})),
    )
    .await;
    let (jwt, _) = mint_token(&env.client, &env.namespace, "default", &[AUDIENCE], 3600)
        .await
        .unwrap();
    env.put_secret("oidc", "token", &jwt).await;
    env.start_operator();
    env.create(
        "impersonated",
        git_from(
            json!({"secret": {"name": "wif-impersonating", "key": "config.json", "format": "externalAccount",
                                    "subjectToken": {"serviceAccountToken": {"serviceAccountName": "default"}}}}),
        ),
    )
    .await;
    env.create(
        "federated",
        git_from(json!({"secret": {"name": "wif", "key": "config.json",
                                    "subjectToken": {"secret": {"name": "oidc", "key": "token"}}}})),
    )
    .await;
    env.wait_ready("impersonated").await;
    env.wait_ready("federated").await;
    assert_eq!(
        principal_in(&env, "impersonated").await,
        format!("serviceAccount:{TARGET}")
    );
    assert_eq!(principal_in(&env, "federated").await, subject);

    // STS is asked for cloud-platform (impersonation follows) and for the flow's scopes (none
    // follows); generateAccessToken gets the file's lifetime.
    let sts: Vec<HashMap<String, String>> = requests_to(&env, Endpoint::Sts).iter().map(form).collect();
    assert_eq!(sts.len(), 2);
    assert!(
        sts.iter()
            .all(|f| f["audience"] == AUDIENCE && f["scope"] == CLOUD_PLATFORM)
    );
    let iam = &requests_to(&env, Endpoint::GenerateAccessToken)[0];
    let body: Value = serde_json::from_str(&iam.body).unwrap();
    assert_eq!(body["lifetime"], "1200s");
    assert_eq!(body["scope"], json!([CLOUD_PLATFORM]));
    env.assert_nothing_leaked(&[&jwt]).await;
}

/// The README's main example: a ServiceAccount token, STS, then impersonation, into an
/// imagePullSecret, with one object.
#[tokio::test]
async fn one_object_workload_identity_federation_into_a_docker_config() {
    let mut env = Env::new("wif").await;
    create_service_account(&env.client, &env.namespace, "builder")
        .await
        .unwrap();
    let subject = format!(
        "principal://iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/pool/subject/system:serviceaccount:{}:builder",
        env.namespace
    );
    env.google.add_service_account(TARGET, &[&subject]);
    env.start_operator();
    env.create(
        "registry",
        json!({
            "flow": {"sts": {"audience": AUDIENCE, "scopes": [READ_ONLY],
                             "serviceAccountImpersonation": {"serviceAccount": TARGET, "lifetime": "30m"}}},
            "source": {"serviceAccountToken": {"serviceAccountName": "builder"}},
            "secret": {"type": "kubernetes.io/dockerconfigjson", "registries": ["us-docker.pkg.dev"]},
        }),
    )
    .await;
    let tr = env.wait_ready("registry").await;
    let status = tr.status.as_ref().unwrap();
    assert_eq!(status.flow.as_deref(), Some("sts"));
    assert_eq!(status.scopes, vec![READ_ONLY]);
    let lifetime = status
        .expiration_time
        .as_ref()
        .unwrap()
        .0
        .duration_since(status.last_refresh_time.as_ref().unwrap().0);
    assert_eq!(lifetime.as_secs(), 1800);
    let docker = env.secret("registry").await;
    let config: Value = serde_json::from_slice(&docker.data.as_ref().unwrap()[".dockerconfigjson"].0).unwrap();
    let token = config["auths"]["us-docker.pkg.dev"]["password"].as_str().unwrap();
    let info = env.google.token_info(token).unwrap();
    assert_eq!(
        (info.endpoint, info.principal.as_str()),
        (
            Endpoint::GenerateAccessToken,
            "serviceAccount:puller@proj.iam.gserviceaccount.com"
        )
    );
    assert_eq!(form(&requests_to(&env, Endpoint::Sts)[0])["scope"], CLOUD_PLATFORM);
    let iam: Value = serde_json::from_str(&requests_to(&env, Endpoint::GenerateAccessToken)[0].body).unwrap();
    assert_eq!(iam["scope"], json!([READ_ONLY]));
    env.assert_no_token_leaked().await;
}

#[tokio::test]
async fn malformed_files_are_invalid_specs_that_never_quote_them() {
    let mut env = Env::new("malformed").await;
    env.google.add_account_connector(CONNECTOR);
    // Would be secret material in a real file; must never be echoed.
    const MARK: &str = "SECRETMATERIAL";
    let key = |private_key: &str| {
        json!({"type": "service_account", "client_email": "k@proj.iam.gserviceaccount.com",
               "private_key_id": "kid", "private_key": private_key})
        .to_string()
    };
    let external = |extra: Value| external_account(&env.google, AUDIENCE, extra);
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "not-json",
            format!("{{\"type\": \"authorized_user\", \"refresh_token\": \"{MARK}\""),
            "auto",
            "is not JSON",
        ),
        (
            "no-private-key",
            key(""),
            "auto",
            "service_account file: field private_key is missing or empty",
        ),
        (
            "bad-pem",
            key(&format!(
                "-----BEGIN PRIVATE KEY-----\nMIIB{MARK}\n-----END PRIVATE KEY-----\n"
            )),
            "auto",
            "field private_key is not a PEM-encoded RSA private key",
        ),
        (
            "wrong-type",
            authorized_user("c", MARK, MARK),
            "serviceAccountKey",
            "field type is not \"service_account\"",
        ),
        (
            "file-source",
            external(json!({"credential_source": {"file": "/var/run/secrets/kubernetes.io/serviceaccount/token"}})),
            "auto",
            "field credential_source.file is not used",
        ),
        (
            "url-source",
            external(json!({"credential_source": {"url": "http://169.254.169.254/computeMetadata/v1/token"}})),
            "auto",
            "field credential_source.url is not used",
        ),
        (
            "exec-source",
            external(json!({"credential_source": {"executable": {"command": "/bin/cat /etc/shadow"}}})),
            "auto",
            "field credential_source.executable is not used",
        ),
        (
            "foreign-sts",
            external(json!({"token_url": "https://sts.attacker.example/v1/token"})),
            "auto",
            "field token_url must be this operator's STS endpoint",
        ),
        (
            "foreign-iam",
            external(json!({"service_account_impersonation_url":
                "https://iam.attacker.example/v1/projects/-/serviceAccounts/x@p.iam.gserviceaccount.com:generateAccessToken"})),
            "auto",
            "field service_account_impersonation_url must be this operator's IAM Credentials endpoint",
        ),
        (
            "no-subject",
            external(json!({})),
            "auto",
            "spec.source.secret.subjectToken must name its subject token",
        ),
    ];
    // The TokenRequests write Secrets of their own names; the files are in others.
    let file_of = |name: &str| format!("{name}-file");
    for (name, value, _, _) in &cases {
        env.put_secret(&file_of(name), "file", value).await;
    }
    env.start_operator();
    for (name, _, format, _) in &cases {
        let source = json!({"secret": {"name": file_of(name), "key": "file", "format": format}});
        env.create(name, git_from(source)).await;
    }
    for (name, _, _, expected) in &cases {
        let tr = env.wait_reason(name, "InvalidSpec").await;
        assert_eq!(ready_status(&tr), Some("False"));
        let message = &ready_condition(&tr).unwrap().message;
        assert!(message.contains(expected), "{name}: {message}");
        let origin = format!("Secret {:?} key \"file\"", file_of(name));
        assert!(message.contains(&origin), "{name}: {message}");
    }
    for endpoint in [Endpoint::OAuthToken, Endpoint::Sts, Endpoint::FetchAccessToken] {
        assert_eq!(env.google.calls(endpoint), 0, "nothing was sent to {endpoint:?}");
    }
    // The leak check wants an issued token to look for, besides the marker.
    env.caller_token().await;
    env.assert_nothing_leaked(&[MARK]).await;
}

/// Fewer calls to Google: 50 TokenRequests with one key Secret make one JWT-bearer call. The
/// exchange is slowed down so that the first reconciles wait for the same call in flight
/// (single-flight); the later ones find its result kept.
#[tokio::test]
async fn fifty_token_requests_share_one_jwt_bearer_call() {
    let mut env = Env::new("fifty").await;
    let key = KeyFile::new(&env.google, "shared@proj.iam.gserviceaccount.com", "kid-50");
    env.google.add_account_connector(CONNECTOR);
    env.google.set_latency(Endpoint::OAuthToken, Duration::from_millis(500));
    // Identical flow calls in flight are shared too.
    env.google
        .set_latency(Endpoint::FetchAccessToken, Duration::from_millis(1000));
    env.put_secret("google-key", "key.json", &key.json).await;
    env.start_operator();
    env.operator
        .as_ref()
        .unwrap()
        .wait_ready(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let names: Vec<String> = (0..50).map(|i| format!("git-{i:02}")).collect();
    for name in &names {
        env.create(
            name,
            git_from(json!({"secret": {"name": "google-key", "key": "key.json"}})),
        )
        .await;
    }
    for name in &names {
        env.wait_ready(name).await;
    }
    let elapsed = started.elapsed();
    let jwt_bearer = env.google.calls(Endpoint::OAuthToken);
    let fetches = env.google.calls(Endpoint::FetchAccessToken);
    eprintln!(
        "50 TokenRequests Ready in {elapsed:?}: {jwt_bearer} JWT-bearer call(s), {fetches} fetchAccessToken call(s)"
    );
    assert_eq!(jwt_bearer, 1, "one JWT-bearer call for 50 TokenRequests");
    assert!(fetches < 50, "identical fetches in flight are made once: {fetches}");
    let mut secrets = key.material();
    let assertion = form(&requests_to(&env, Endpoint::OAuthToken)[0])["assertion"].clone();
    secrets.push(&assertion);
    env.assert_nothing_leaked(&secrets).await;
}

/// `source.ambient` from a credentials file given to the operator (Application Default
/// Credentials), in a namespace the operator allows.
#[tokio::test]
async fn ambient_identity_from_the_operator_s_credentials_file() {
    let mut env = Env::new("adc").await;
    let key = KeyFile::new(&env.google, "operator@proj.iam.gserviceaccount.com", "kid-op");
    env.google.add_account_connector(CONNECTOR);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key.json");
    std::fs::write(&path, &key.json).unwrap();
    let namespace = env.namespace.clone();
    let args = [
        "--ambient-namespace",
        namespace.as_str(),
        "--ambient-credentials-file",
        path.to_str().unwrap(),
    ];
    env.operator = Some(env.spawn_operator(&args));
    env.create("git", git_from(json!({"ambient": {}}))).await;
    env.wait_ready("git").await;
    assert_eq!(principal_in(&env, "git").await, format!("serviceAccount:{}", key.email));
    assert_eq!(
        env.google.calls(Endpoint::Metadata),
        0,
        "the file, not the metadata server"
    );
    env.assert_nothing_leaked(&key.material()).await;
}
