//! Consumer formats, ID tokens and repository tokens end to end: the operator renders the Secret
//! on the real control plane, and the real consumers (git, curl, a JWT verifier as Cloud Run has)
//! use what it rendered against servers that accept only what the emulator issued.

mod support;

use std::{path::Path, process::Output, sync::Arc};

use gcp_token_operator_testkit::{
    emulator::{Endpoint, GoogleEmulator},
    git_server::{self, Access, GitServer},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use serde_json::{Value, json};
use support::*;

const LINK: &str = "projects/proj/locations/us-central1/connections/github/gitRepositoryLinks/demo";
const GIT_USERNAME: &str = "x-access-token";
const INVOKER: &str = "invoker@proj.iam.gserviceaccount.com";
const RUN_URL: &str = "https://hello-abc123-uc.a.run.app";

/// A Git server that admits exactly the repository tokens the emulator issued for [`LINK`].
fn git_server(google: &Arc<GoogleEmulator>) -> GitServer {
    let google = Arc::clone(google);
    GitServer::start(move |c| {
        if google.git_credentials_valid(LINK, &c.username, &c.password, true) {
            Access::ReadWrite
        } else if google.git_credentials_valid(LINK, &c.username, &c.password, false) {
            Access::Read
        } else {
            Access::Denied
        }
    })
    .expect("starting the Git server")
}

fn repository_spec(format: Value) -> Value {
    json!({
        "flow": {"developerConnectRepository": {"gitRepositoryLink": LINK}},
        "source": {"secret": {"name": "caller", "key": "token"}},
        "secret": {"format": format},
    })
}

fn data(secret: &Secret, key: &str) -> String {
    let value = &secret.data.as_ref().expect("Secret data")[key];
    String::from_utf8(value.0.clone()).expect("UTF-8")
}

/// `git` with no configuration but what the test gives it, and never a prompt.
fn git(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .envs(envs.iter().copied())
        .output()
        .expect("running git")
}

/// Clones `url` with the credential helper `helper` into a fresh directory; the README when it
/// worked.
fn clone_with(work: &Path, helper: &str, url: &str, envs: &[(&str, &str)]) -> Option<String> {
    let target = work.join(format!("clone-{}", fastrand::u32(..)));
    let helper = format!("credential.helper={helper}");
    let out = git(work, &["-c", &helper, "clone", url, target.to_str().unwrap()], envs);
    out.status
        .success()
        .then(|| std::fs::read_to_string(target.join("README")).unwrap())
}

/// Clones with the credential-store file `store`.
fn clone_with_store(work: &Path, store: &str, url: &str) -> Option<String> {
    let file = work.join(format!("store-{}", fastrand::u32(..)));
    std::fs::write(&file, store).unwrap();
    clone_with(work, &format!("store --file={}", file.display()), url, &[])
}

/// Clones with a username and password handed over by a credential helper, as Tekton's
/// credential initialisation does with a basic-auth Secret.
fn clone_with_basic(work: &Path, username: &str, password: &str, url: &str) -> bool {
    let helper = "!f() { echo username=$GIT_USER; echo password=$GIT_PASS; }; f";
    clone_with(work, helper, url, &[("GIT_USER", username), ("GIT_PASS", password)]).is_some()
}

/// `curl --netrc-file` against `url`; true when the server let it in.
fn curl_with_netrc(work: &Path, netrc: &str, url: &str) -> bool {
    let file = work.join(format!("netrc-{}", fastrand::u32(..)));
    std::fs::write(&file, netrc).unwrap();
    let out = std::process::Command::new("curl")
        .args(["--silent", "--fail", "--netrc-file", file.to_str().unwrap(), url])
        .output()
        .expect("running curl");
    out.status.success() && out.stdout == b"ok\n"
}

#[tokio::test]
async fn repository_tokens_clone_with_git_and_curl_until_revoked() {
    let mut env = Env::new("repo").await;
    env.google.add_git_repository_link(LINK, GIT_USERNAME, &["*"], &[]);
    let caller = env.caller_token().await;
    env.put_secret("caller", "token", &caller).await;
    let server = git_server(&env.google);
    let url = server.create_repository("demo").unwrap();
    env.start_operator();

    env.create(
        "store",
        repository_spec(json!({"gitCredentials": {"urls": [server.url()]}})),
    )
    .await;
    env.create(
        "tekton",
        repository_spec(json!({"basicAuth": {"tekton": {"git": [server.url()]}}})),
    )
    .await;
    env.create("netrc", repository_spec(json!({"netrc": {"hosts": [server.host()]}})))
        .await;
    for name in ["store", "tekton", "netrc"] {
        let tr = env.wait_ready(name).await;
        let status = tr.status.unwrap();
        assert_eq!(status.flow.as_deref(), Some("developerConnectRepository"));
        assert_eq!(status.username.as_deref(), Some(GIT_USERNAME), "{name}");
    }

    let work = tempfile::tempdir().unwrap();
    let store = data(&env.secret("store").await, ".git-credentials");
    let tekton = env.secret("tekton").await;
    let netrc = data(&env.secret("netrc").await, ".netrc");
    assert_eq!(tekton.type_.as_deref(), Some("kubernetes.io/basic-auth"));
    assert_eq!(
        tekton.metadata.annotations.as_ref().unwrap()["tekton.dev/git-0"],
        server.url()
    );
    let (user, password) = (data(&tekton, "username"), data(&tekton, "password"));
    assert_eq!(user, GIT_USERNAME);
    let check = format!("{}/check", server.url());

    assert_eq!(
        clone_with_store(work.path(), &store, &url).as_deref(),
        Some(git_server::README)
    );
    assert!(clone_with_basic(work.path(), &user, &password, &url));
    assert!(curl_with_netrc(work.path(), &netrc, &check));
    // A read token pushes nothing: the server checks the grant the emulator recorded.
    assert!(!env.google.git_credentials_valid(LINK, &user, &password, true));

    // Revoked at Google, the same credentials stop working everywhere.
    for token in env.google.issued_tokens() {
        if env
            .google
            .token_info(&token)
            .is_some_and(|i| i.endpoint == Endpoint::FetchReadToken)
        {
            env.google.revoke(&token);
        }
    }
    assert_eq!(clone_with_store(work.path(), &store, &url), None);
    assert!(!clone_with_basic(work.path(), &user, &password, &url));
    assert!(!curl_with_netrc(work.path(), &netrc, &check));
    let attempts = server.attempts();
    assert!(attempts.iter().any(|a| a.granted) && attempts.iter().any(|a| !a.granted));
    env.assert_nothing_leaked(&[&caller]).await;
}

/// Replaces the TokenRequest's `spec.secret.format` (a merge patch would merge two formats).
async fn set_format(env: &Env<'_>, format: Value) {
    let mut tr = env.token_requests().get("repo").await.unwrap();
    tr.spec.secret.format = serde_json::from_value(format).unwrap();
    env.token_requests()
        .replace("repo", &PostParams::default(), &tr)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_format_change_rerenders_the_held_token_without_minting() {
    let mut env = Env::new("reformat").await;
    env.google.add_git_repository_link(LINK, GIT_USERNAME, &["*"], &[]);
    let caller = env.caller_token().await;
    env.put_secret("caller", "token", &caller).await;
    env.start_operator();
    env.create("repo", repository_spec(json!({"basicAuth": {}}))).await;
    let first = env.wait_ready("repo").await;
    let held = first.status.unwrap().token_fingerprint.unwrap();
    let token = data(&env.secret("repo").await, "password");
    let minted = env.google.calls(Endpoint::FetchReadToken);
    assert_eq!(minted, 1);

    let formats = [
        (json!({"netrc": {"hosts": ["github.com"]}}), "Opaque", ".netrc"),
        (
            json!({"gitCredentials": {"urls": ["https://github.com/demo-org"]}}),
            "Opaque",
            ".git-credentials",
        ),
        (
            json!({"argoCD": {"secretType": "repoCreds", "url": "https://github.com/demo-org"}}),
            "Opaque",
            "url",
        ),
        (
            json!({"template": {"data": {"config.json": "{\"user\": {{ username | tojson }}, \"token\": {{ token | tojson }}}"}}}),
            "Opaque",
            "config.json",
        ),
        (json!({"basicAuth": {}}), "kubernetes.io/basic-auth", "password"),
        (json!(null), "Opaque", "expires_at"),
    ];
    for (format, type_, key) in formats {
        set_format(&env, format).await;
        let secret = env
            .wait_secret("repo", &format!("{key} in a {type_} Secret"), |s| {
                s.type_.as_deref() == Some(type_) && s.data.as_ref().is_some_and(|d| d.contains_key(key))
            })
            .await;
        let rendered = data(&secret, key);
        let holder = if key == "expires_at" {
            data(&secret, "token")
        } else {
            rendered
        };
        assert!(holder.contains(&token) || key == "url", "the held token is in {key}");
        let tr = env
            .wait_tr("repo", "the new generation observed", |tr| {
                tr.status.as_ref().and_then(|s| s.observed_generation) == tr.metadata.generation
                    && ready_status(tr) == Some("True")
            })
            .await;
        assert_eq!(fingerprint(&tr).as_deref(), Some(held.as_str()));
    }
    assert_eq!(
        env.google.calls(Endpoint::FetchReadToken),
        minted,
        "no format change minted"
    );

    // A template that cannot be rendered is InvalidSpec naming its key; the Secret is kept.
    set_format(&env, json!({"template": {"data": {"bad.txt": "{% set x = token %}"}}})).await;
    let tr = env.wait_reason("repo", "InvalidSpec").await;
    let message = &ready_condition(&tr).unwrap().message;
    assert!(
        message.contains("template.data[\"bad.txt\"]") && message.contains("`set`"),
        "{message}"
    );
    assert_eq!(data(&env.secret("repo").await, "token"), token);
    env.assert_nothing_leaked(&[&caller]).await;
}

/// The claims a receiving service checks.
#[derive(serde::Deserialize)]
struct IdClaims {
    aud: String,
    iss: String,
    exp: i64,
    sub: String,
    email: Option<String>,
    email_verified: Option<bool>,
}

/// Verifies `token` the way Cloud Run does: the signature against Google's published keys, the
/// audience, the issuer and the expiry.
async fn verify_id_token(google: &GoogleEmulator, token: &str, audience: &str) -> IdClaims {
    let keys: JwkSet = reqwest::get(google.id_token_certs_url())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(token).expect("a JWT header");
    let kid = header.kid.expect("a key id");
    let jwk = keys.find(&kid).expect("the signing key is published");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&["https://accounts.google.com"]);
    let key = DecodingKey::from_jwk(jwk).unwrap();
    jsonwebtoken::decode::<IdClaims>(token, &key, &validation)
        .expect("the ID token verifies")
        .claims
}

#[tokio::test]
async fn id_tokens_verify_as_cloud_run_and_iap_would() {
    let mut env = Env::new("idtoken").await;
    env.google.add_service_account(INVOKER, &["*"]);
    let caller = env.caller_token().await;
    env.put_secret("caller", "token", &caller).await;
    env.google
        .set_metadata_service_account("operator@proj.iam.gserviceaccount.com");
    let namespace = env.namespace.clone();
    env.operator = Some(env.spawn_operator(&["--ambient-namespace", &namespace]));

    let iap_client = "123456789-abc.apps.googleusercontent.com";
    env.create(
        "run",
        json!({"flow": {"idToken": {"audience": RUN_URL, "serviceAccount": INVOKER}},
               "source": {"secret": {"name": "caller", "key": "token"}}}),
    )
    .await;
    env.create(
        "iap",
        json!({"flow": {"idToken": {"audience": iap_client, "serviceAccount": INVOKER, "includeEmail": true}},
               "source": {"secret": {"name": "caller", "key": "token"}}}),
    )
    .await;
    env.create(
        "federated",
        json!({"flow": {"idToken": {"audience": RUN_URL, "serviceAccount": INVOKER,
                                    "federation": {"audience": AUDIENCE}}},
               "source": {"serviceAccountToken": {"serviceAccountName": "default"}}}),
    )
    .await;
    env.create(
        "own",
        json!({"flow": {"idToken": {"audience": RUN_URL, "includeEmail": true}}, "source": {"ambient": {}}}),
    )
    .await;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let cases = [
        ("run", RUN_URL, None),
        ("iap", iap_client, Some(INVOKER)),
        ("federated", RUN_URL, None),
        ("own", RUN_URL, Some("operator@proj.iam.gserviceaccount.com")),
    ];
    for (name, audience, email) in cases {
        let tr = env.wait_ready(name).await;
        let status = tr.status.unwrap();
        assert_eq!(status.flow.as_deref(), Some("idToken"));
        let token = secret_token(&env.secret(name).await);
        let claims = verify_id_token(&env.google, &token, audience).await;
        assert_eq!(claims.aud, audience);
        assert_eq!(claims.iss, "https://accounts.google.com");
        assert!(!claims.sub.is_empty());
        assert!(claims.exp > now, "{name}: exp is in the future");
        assert_eq!(claims.email.as_deref(), email, "{name}: email only when asked");
        assert_eq!(claims.email_verified, email.map(|_| true));
        // The expiry in the status is the token's own `exp`.
        let expires = status.expiration_time.unwrap().0.as_second();
        assert!(
            (claims.exp - 2..=claims.exp).contains(&expires),
            "{name}: {expires} vs {}",
            claims.exp
        );
    }
    assert_eq!(env.google.calls(Endpoint::MetadataIdentity), 1);
    assert_eq!(env.google.calls(Endpoint::GenerateIdToken), 3);

    // An ID token authenticates no call to Google: it is no source for another flow.
    env.create(
        "downstream",
        json!({"flow": {"impersonation": {"serviceAccount": INVOKER, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}},
               "source": {"tokenRequest": {"name": "run"}}}),
    )
    .await;
    let tr = env.wait_reason("downstream", "InvalidSpec").await;
    let message = &ready_condition(&tr).unwrap().message;
    assert!(
        message.contains("idToken flow, which is not a Google access token"),
        "{message}"
    );
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), 0);
    env.assert_nothing_leaked(&[&caller]).await;
}

#[tokio::test]
async fn repository_and_id_token_failures_are_classified_and_an_unknown_expiry_is_assumed() {
    let mut env = Env::new("repofail").await;
    let other = "projects/proj/locations/us-central1/connections/github/gitRepositoryLinks/private";
    env.google.add_git_repository_link(LINK, GIT_USERNAME, &["*"], &[]);
    env.google
        .add_git_repository_link(other, GIT_USERNAME, &["user:someone@example.com"], &[]);
    env.google.add_service_account(INVOKER, &["*"]);
    let caller = env.caller_token().await;
    env.put_secret("caller", "token", &caller).await;
    env.google.fail_next(
        Endpoint::FetchReadToken,
        1,
        gcp_token_operator_testkit::emulator::Fault::EmptyExpiration,
    );
    env.google.fail_next(
        Endpoint::GenerateIdToken,
        1,
        gcp_token_operator_testkit::emulator::Fault::Status {
            code: 503,
            retry_after: None,
        },
    );
    env.start_operator();

    let mut unknown = repository_spec(json!({"basicAuth": {}}));
    unknown["refresh"] = json!({"lifetimeWhenUnknown": "20m"});
    env.create("unknown-expiry", unknown).await;
    // No expiry from Google: the token is taken to live lifetimeWhenUnknown. (Alone, so that the
    // scripted answer is this TokenRequest's.)
    let tr = env.wait_ready("unknown-expiry").await;
    let status = tr.status.unwrap();
    let lifetime = status.expiration_time.unwrap().0.as_second() - status.last_refresh_time.unwrap().0.as_second();
    assert_eq!(lifetime, 20 * 60);

    let mut denied = repository_spec(json!({"basicAuth": {}}));
    denied["flow"]["developerConnectRepository"]["gitRepositoryLink"] = json!(other);
    env.create("denied", denied).await;
    let mut missing = repository_spec(json!({"basicAuth": {}}));
    missing["flow"]["developerConnectRepository"]["gitRepositoryLink"] =
        json!("projects/proj/locations/us-central1/connections/github/gitRepositoryLinks/gone");
    env.create("missing", missing).await;
    env.create(
        "id",
        json!({"flow": {"idToken": {"audience": RUN_URL, "serviceAccount": INVOKER}},
               "source": {"secret": {"name": "caller", "key": "token"}}}),
    )
    .await;

    let tr = env.wait_reason("denied", "PermissionDenied").await;
    let message = &ready_condition(&tr).unwrap().message;
    assert!(
        message.contains("developerconnect.gitRepositoryLinks.fetchReadToken"),
        "{message}"
    );
    env.wait_reason("missing", "NotFound").await;
    // A 503 is retried soon, and the ID token then issued.
    env.wait_ready("id").await;
    assert_eq!(env.google.calls(Endpoint::GenerateIdToken), 2);
    env.assert_nothing_leaked(&[&caller]).await;
}
