//! The Google API emulator answers like Google: paths, success bodies, error shapes, and the
//! scripted faults the operator's tests rely on.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gcp_token_operator_testkit::emulator::{Endpoint, Fault, GoogleEmulator};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use reqwest::{Client, RequestBuilder, Response};
use serde_json::{Value, json};

const PROVIDER: &str = "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/pool/providers/k8s";
const POOL_PRINCIPAL: &str =
    "principal://iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/pool";
const METADATA_SA: &str = "node@proj.iam.gserviceaccount.com";
const TARGET_SA: &str = "target@proj.iam.gserviceaccount.com";
const ACCOUNT_CONNECTOR: &str = "projects/proj/locations/us-central1/accountConnectors/github";
const DATA_CONNECTOR: &str = "projects/proj/locations/global/collections/jira/dataConnector";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// An emulator with one identity of each kind configured, and a client for it.
async fn setup() -> (GoogleEmulator, Client) {
    let emu = GoogleEmulator::start().await.expect("emulator starts");
    emu.add_workload_identity_provider(PROVIDER);
    emu.set_metadata_service_account(METADATA_SA);
    emu.add_service_account(TARGET_SA, &[&format!("serviceAccount:{METADATA_SA}")]);
    emu.add_account_connector(ACCOUNT_CONNECTOR);
    emu.add_data_connector(DATA_CONNECTOR);
    (emu, Client::new())
}

async fn send(request: RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("request completes");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A Kubernetes-style service account token; the emulator checks claims, not signatures.
fn oidc_token(aud: Value, sub: &str, exp: u64) -> String {
    let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let header = part(json!({"alg": "RS256", "kid": "k8s", "typ": "JWT"}));
    let claims =
        part(json!({"iss": "https://kubernetes.default.svc", "aud": aud, "sub": sub, "iat": now_secs(), "exp": exp}));
    format!("{header}.{claims}.c2lnbmF0dXJl")
}

fn https_provider() -> String {
    format!("https:{PROVIDER}")
}

fn sts_form(subject_token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("grant_type", TOKEN_EXCHANGE.into()),
        ("audience", PROVIDER.into()),
        ("scope", CLOUD_PLATFORM.into()),
        ("requested_token_type", ACCESS_TOKEN_TYPE.into()),
        ("subject_token", subject_token.into()),
        ("subject_token_type", JWT_TYPE.into()),
    ]
}

fn sts(emu: &GoogleEmulator, http: &Client, form: &[(&str, String)]) -> RequestBuilder {
    http.post(format!("{}/v1/token", emu.base_url())).form(form)
}

fn metadata(emu: &GoogleEmulator, http: &Client) -> RequestBuilder {
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/token",
        emu.base_url()
    );
    http.get(url).header("Metadata-Flavor", "Google")
}

async fn metadata_token(emu: &GoogleEmulator, http: &Client) -> String {
    let (status, body) = send(metadata(emu, http)).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

fn generate(emu: &GoogleEmulator, http: &Client, account: &str, bearer: Option<&str>, body: Value) -> RequestBuilder {
    iam_credentials(emu, http, "generateAccessToken", account, bearer, body)
}

fn generate_id(
    emu: &GoogleEmulator,
    http: &Client,
    account: &str,
    bearer: Option<&str>,
    body: Value,
) -> RequestBuilder {
    iam_credentials(emu, http, "generateIdToken", account, bearer, body)
}

fn iam_credentials(
    emu: &GoogleEmulator,
    http: &Client,
    method: &str,
    account: &str,
    bearer: Option<&str>,
    body: Value,
) -> RequestBuilder {
    let url = format!("{}/v1/projects/-/serviceAccounts/{account}:{method}", emu.base_url());
    let request = http.post(url).json(&body);
    match bearer {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

fn fetch(emu: &GoogleEmulator, http: &Client, connector: &str, token: &str) -> RequestBuilder {
    http.post(format!("{}/v1/{connector}/users:fetchAccessToken", emu.base_url()))
        .bearer_auth(token)
}

fn acquire(emu: &GoogleEmulator, http: &Client, connector: &str, token: &str) -> RequestBuilder {
    http.post(format!("{}/v1alpha/{connector}:acquireAccessToken", emu.base_url()))
        .bearer_auth(token)
}

fn assert_rpc_error(body: &Value, code: u16, status: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["status"], status, "{body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

fn assert_oauth_error(body: &Value, error: &str) {
    assert_eq!(body["error"], error, "{body}");
    assert!(body["error_description"].is_string(), "{body}");
}

fn assert_rfc3339(text: &str) {
    let bytes = text.as_bytes();
    assert_eq!(bytes.len(), 20, "{text}");
    assert!(text.ends_with('Z') && bytes[10] == b'T' && bytes[4] == b'-', "{text}");
}

/// Seconds from now until `t`, for lifetimes checked to the second.
fn secs_left(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::now()).unwrap().as_secs()
}

// ---- STS -------------------------------------------------------------------------------------

#[tokio::test]
async fn sts_exchanges_an_oidc_token_from_a_form_body() {
    let (emu, http) = setup().await;
    let subject = oidc_token(
        json!(https_provider()),
        "system:serviceaccount:ns:app",
        now_secs() + 600,
    );
    let (status, body) = send(sts(&emu, &http, &sts_form(&subject))).await;

    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    assert!(token.starts_with("ya29.emu."));
    assert_eq!(body["issued_token_type"], ACCESS_TOKEN_TYPE);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let info = emu.token_info(token).unwrap();
    assert_eq!(
        info.principal,
        format!("{POOL_PRINCIPAL}/subject/system:serviceaccount:ns:app")
    );
    assert_eq!(info.endpoint, Endpoint::Sts);
    assert_eq!(info.scopes, [CLOUD_PLATFORM]);
    assert_eq!(emu.issued_tokens(), [token]);
}

#[tokio::test]
async fn sts_accepts_json_with_camel_case_names() {
    let (emu, http) = setup().await;
    let subject = oidc_token(json!(["other", PROVIDER]), "repo:org/app", now_secs() + 600);
    let request = json!({
        "grantType": TOKEN_EXCHANGE,
        "audience": PROVIDER,
        "scope": CLOUD_PLATFORM,
        "requestedTokenType": ACCESS_TOKEN_TYPE,
        "subjectToken": subject,
        "subjectTokenType": "urn:ietf:params:oauth:token-type:id_token",
    });
    let (status, body) = send(http.post(format!("{}/v1/token", emu.base_url())).json(&request)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].is_string());
    assert!(body["expires_in"].is_u64());
}

#[tokio::test]
async fn sts_rejects_an_authorization_header() {
    let (emu, http) = setup().await;
    let subject = oidc_token(json!(https_provider()), "sub", now_secs() + 600);
    let (status, body) = send(sts(&emu, &http, &sts_form(&subject)).bearer_auth("ya29.anything")).await;
    assert_eq!(status, 400);
    assert_oauth_error(&body, "invalid_request");
    assert!(emu.issued_tokens().is_empty());
}

#[tokio::test]
async fn sts_rejects_malformed_and_unknown_audiences() {
    let (emu, http) = setup().await;
    let subject = oidc_token(json!(https_provider()), "sub", now_secs() + 600);

    let mut form = sts_form(&subject);
    form[1].1 = "projects/my-project/workloadIdentityPools/pool".into();
    let (status, body) = send(sts(&emu, &http, &form)).await;
    assert_eq!(status, 400);
    assert_oauth_error(&body, "invalid_request");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("Invalid value for \"audience\"")
    );

    form[1].1 = PROVIDER.replace("/k8s", "/unknown");
    let (status, body) = send(sts(&emu, &http, &form)).await;
    assert_eq!(status, 400);
    assert_oauth_error(&body, "invalid_target");
}

#[tokio::test]
async fn sts_rejects_subject_tokens_for_another_audience_or_expired() {
    let (emu, http) = setup().await;
    for subject in [
        oidc_token(json!("https://example.com"), "sub", now_secs() + 600),
        oidc_token(json!(https_provider()), "sub", now_secs() - 10),
        "not-a-jwt".to_owned(),
    ] {
        let (status, body) = send(sts(&emu, &http, &sts_form(&subject))).await;
        assert_eq!(status, 400, "{body}");
        assert_oauth_error(&body, "invalid_grant");
    }
}

#[tokio::test]
async fn sts_downscoping_an_access_token_reports_no_expiry() {
    let (emu, http) = setup().await;
    let source = metadata_token(&emu, &http).await;
    let options = json!({"accessBoundary": {"accessBoundaryRules": [{
        "availableResource": "//storage.googleapis.com/projects/_/buckets/b",
        "availablePermissions": ["inRole:roles/storage.objectViewer"],
    }]}});
    let form = [
        ("grant_type", TOKEN_EXCHANGE.to_owned()),
        ("requested_token_type", ACCESS_TOKEN_TYPE.to_owned()),
        ("subject_token", source.clone()),
        ("subject_token_type", ACCESS_TOKEN_TYPE.to_owned()),
        ("options", options.to_string()),
    ];
    let (status, body) = send(sts(&emu, &http, &form)).await;

    assert_eq!(status, 200, "{body}");
    assert!(body.get("expires_in").is_none(), "{body}");
    let downscoped = emu.token_info(body["access_token"].as_str().unwrap()).unwrap();
    let source = emu.token_info(&source).unwrap();
    assert_eq!(downscoped.principal, source.principal);
    assert_eq!(downscoped.expires_at, source.expires_at);
}

#[tokio::test]
async fn sts_rejects_options_that_are_not_role_based_boundaries() {
    let (emu, http) = setup().await;
    let subject = oidc_token(json!(https_provider()), "sub", now_secs() + 600);
    let mut form = sts_form(&subject);
    let options = json!({"accessBoundary": {"accessBoundaryRules": [{
        "availableResource": "//storage.googleapis.com/projects/_/buckets/b",
        "availablePermissions": ["storage.objects.get"],
    }]}});
    form.push(("options", options.to_string()));
    let (status, body) = send(sts(&emu, &http, &form)).await;
    assert_eq!(status, 400);
    assert_oauth_error(&body, "invalid_request");
    assert!(body["error_description"].as_str().unwrap().contains("options"));
}

// ---- IAM Credentials --------------------------------------------------------------------------

#[tokio::test]
async fn generate_access_token_impersonates_an_allowed_account() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    let request = json!({"scope": [CLOUD_PLATFORM], "lifetime": "600s"});
    let (status, body) = send(generate(&emu, &http, TARGET_SA, Some(&caller), request)).await;

    assert_eq!(status, 200, "{body}");
    assert_rfc3339(body["expireTime"].as_str().unwrap());
    let info = emu.token_info(body["accessToken"].as_str().unwrap()).unwrap();
    assert_eq!(info.principal, format!("serviceAccount:{TARGET_SA}"));
    assert_eq!(info.endpoint, Endpoint::GenerateAccessToken);
    assert!((595..=600).contains(&secs_left(info.expires_at)));
}

#[tokio::test]
async fn a_configured_lifetime_caps_the_requested_one() {
    let (emu, http) = setup().await;
    emu.set_lifetime(Endpoint::GenerateAccessToken, Duration::from_secs(60));
    let caller = metadata_token(&emu, &http).await;
    let request = json!({"scope": [CLOUD_PLATFORM], "lifetime": "3600s"});
    let (status, body) = send(generate(&emu, &http, TARGET_SA, Some(&caller), request)).await;
    assert_eq!(status, 200, "{body}");
    let info = emu.token_info(body["accessToken"].as_str().unwrap()).unwrap();
    assert!((55..=60).contains(&secs_left(info.expires_at)));
}

#[tokio::test]
async fn generate_access_token_requires_a_live_bearer_token() {
    let (emu, http) = setup().await;
    let request = json!({"scope": [CLOUD_PLATFORM]});
    let response = generate(&emu, &http, TARGET_SA, None, request.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    assert_rpc_error(&response.json().await.unwrap(), 401, "UNAUTHENTICATED");

    emu.set_lifetime(Endpoint::Metadata, Duration::ZERO);
    let expired = metadata_token(&emu, &http).await;
    let (status, body) = send(generate(&emu, &http, TARGET_SA, Some(&expired), request)).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["details"][0]["reason"], "ACCESS_TOKEN_EXPIRED");
}

#[tokio::test]
async fn generate_access_token_denies_unknown_or_unauthorized_accounts() {
    let (emu, http) = setup().await;
    emu.add_service_account(
        "locked@proj.iam.gserviceaccount.com",
        &["serviceAccount:someone@else.com"],
    );
    let caller = metadata_token(&emu, &http).await;
    for account in [
        "missing@proj.iam.gserviceaccount.com",
        "locked@proj.iam.gserviceaccount.com",
    ] {
        let request = json!({"scope": [CLOUD_PLATFORM]});
        let (status, body) = send(generate(&emu, &http, account, Some(&caller), request)).await;
        assert_eq!(status, 403);
        assert_eq!(
            body,
            json!({"error": {
                "code": 403,
                "message": "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).",
                "status": "PERMISSION_DENIED",
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "IAM_PERMISSION_DENIED",
                    "domain": "iam.googleapis.com",
                    "metadata": {"permission": "iam.serviceAccounts.getAccessToken"},
                }],
            }})
        );
    }
}

#[tokio::test]
async fn generate_access_token_follows_the_delegation_chain() {
    let (emu, http) = setup().await;
    let middle = "middle@proj.iam.gserviceaccount.com";
    emu.add_service_account(middle, &[&format!("serviceAccount:{METADATA_SA}")]);
    emu.add_service_account(
        "end@proj.iam.gserviceaccount.com",
        &[&format!("serviceAccount:{middle}")],
    );
    let caller = metadata_token(&emu, &http).await;
    let delegates = json!([format!("projects/-/serviceAccounts/{middle}")]);

    let request = json!({"scope": [CLOUD_PLATFORM], "delegates": delegates});
    let (status, body) = send(generate(
        &emu,
        &http,
        "end@proj.iam.gserviceaccount.com",
        Some(&caller),
        request,
    ))
    .await;
    assert_eq!(status, 200, "{body}");

    // Without the delegate, the caller has no grant on the end of the chain.
    let request = json!({"scope": [CLOUD_PLATFORM]});
    let (status, _) = send(generate(
        &emu,
        &http,
        "end@proj.iam.gserviceaccount.com",
        Some(&caller),
        request,
    ))
    .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn generate_access_token_rejects_malformed_requests() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    for request in [
        json!({"scope": [CLOUD_PLATFORM], "lifetime": "abc"}),
        json!({"scope": [CLOUD_PLATFORM], "lifetime": "43201s"}),
        json!({"scope": []}),
        json!({"scope": [CLOUD_PLATFORM], "unknown": true}),
        json!({"scope": [CLOUD_PLATFORM], "delegates": ["middle@proj.iam.gserviceaccount.com"]}),
    ] {
        let (status, body) = send(generate(&emu, &http, TARGET_SA, Some(&caller), request.clone())).await;
        assert_eq!(status, 400, "{request}");
        assert_rpc_error(&body, 400, "INVALID_ARGUMENT");
    }
    let url = format!(
        "{}/v1/projects/proj/serviceAccounts/{TARGET_SA}:generateAccessToken",
        emu.base_url()
    );
    let (status, body) = send(
        http.post(url)
            .bearer_auth(&caller)
            .json(&json!({"scope": [CLOUD_PLATFORM]})),
    )
    .await;
    assert_eq!(status, 400);
    assert_rpc_error(&body, 400, "INVALID_ARGUMENT");
}

// ---- Developer Connect and Discovery Engine ---------------------------------------------------

#[tokio::test]
async fn fetch_access_token_returns_the_user_token() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    let (status, body) = send(fetch(&emu, &http, ACCOUNT_CONNECTOR, &caller)).await;

    assert_eq!(status, 200, "{body}");
    assert!(body["token"].as_str().is_some_and(|t| !t.is_empty()));
    assert_rfc3339(body["expirationTime"].as_str().unwrap());
    assert!(
        body["scopes"]
            .as_array()
            .is_some_and(|s| !s.is_empty() && s.iter().all(Value::is_string))
    );
    assert!(body.get("exchangeError").is_none());
    let info = emu.token_info(body["token"].as_str().unwrap()).unwrap();
    assert_eq!(info.principal, format!("serviceAccount:{METADATA_SA}"));
}

#[tokio::test]
async fn fetch_access_token_requires_an_empty_body_and_a_known_connector() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    let (status, body) = send(fetch(&emu, &http, ACCOUNT_CONNECTOR, &caller).json(&json!({"foo": 1}))).await;
    assert_eq!(status, 400);
    assert_rpc_error(&body, 400, "INVALID_ARGUMENT");

    let (status, _) = send(fetch(&emu, &http, ACCOUNT_CONNECTOR, &caller).json(&json!({}))).await;
    assert_eq!(status, 200);

    let unknown = ACCOUNT_CONNECTOR.replace("github", "gitlab");
    let (status, body) = send(fetch(&emu, &http, &unknown, &caller)).await;
    assert_eq!(status, 404);
    assert_rpc_error(&body, 404, "NOT_FOUND");
}

#[tokio::test]
async fn fetch_access_token_exchange_errors_arrive_inside_a_200() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    let fault = Fault::ExchangeError {
        code: "invalid_grant".into(),
        description: "refresh token revoked".into(),
    };
    emu.fail_next(Endpoint::FetchAccessToken, 1, fault);
    emu.fail_next(Endpoint::FetchAccessToken, 1, Fault::EmptyExpiration);

    let (status, body) = send(fetch(&emu, &http, ACCOUNT_CONNECTOR, &caller)).await;
    assert_eq!(status, 200);
    assert_eq!(body["token"], "");
    assert_eq!(
        body["exchangeError"],
        json!({"code": "invalid_grant", "description": "refresh token revoked"})
    );

    let (status, body) = send(fetch(&emu, &http, ACCOUNT_CONNECTOR, &caller)).await;
    assert_eq!(status, 200);
    assert_eq!(body["expirationTime"], "");
    let token = body["token"].as_str().unwrap();
    assert!(emu.issued_tokens().iter().any(|t| t == token));
    // Only the metadata token and the one above were issued: the exchange error minted nothing.
    assert_eq!(emu.issued_tokens().len(), 2);
}

#[tokio::test]
async fn acquire_access_token_returns_a_token_without_expiry() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    let (status, body) = send(acquire(&emu, &http, DATA_CONNECTOR, &caller).json(&json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["accessToken"].as_str().is_some_and(|t| t.starts_with("ya29.emu.")));
    assert!(body["refreshTokenInfo"]["scopes"].is_array());
    assert_eq!(body.as_object().unwrap().len(), 2, "no expiry field: {body}");

    let request = json!({"scope": "https://www.googleapis.com/auth/drive.readonly", "action": "search"});
    let (status, body) = send(acquire(&emu, &http, DATA_CONNECTOR, &caller).json(&request)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["refreshTokenInfo"]["scopes"],
        json!(["https://www.googleapis.com/auth/drive.readonly"])
    );
    // The API reports no expiry, but the emulator still expires its tokens.
    let info = emu.token_info(body["accessToken"].as_str().unwrap()).unwrap();
    assert!(info.expires_at > SystemTime::now());
}

#[tokio::test]
async fn acquire_access_token_rejects_unknown_connectors_and_fields() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    let unknown = DATA_CONNECTOR.replace("jira", "confluence");
    let (status, body) = send(acquire(&emu, &http, &unknown, &caller)).await;
    assert_eq!(status, 404);
    assert_rpc_error(&body, 404, "NOT_FOUND");

    let (status, body) = send(acquire(&emu, &http, DATA_CONNECTOR, &caller).json(&json!({"scopes": ["x"]}))).await;
    assert_eq!(status, 400);
    assert_rpc_error(&body, 400, "INVALID_ARGUMENT");

    let (status, body) = send(http.post(format!(
        "{}/v1alpha/{DATA_CONNECTOR}:acquireAccessToken",
        emu.base_url()
    )))
    .await;
    assert_eq!(status, 401);
    assert_rpc_error(&body, 401, "UNAUTHENTICATED");
}

// ---- OAuth token endpoint and tokeninfo -------------------------------------------------------

struct ServiceAccountKey {
    email: &'static str,
    kid: &'static str,
    private_pem: String,
    public_pem: String,
}

fn service_account_key(email: &'static str, kid: &'static str) -> ServiceAccountKey {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key generation");
    ServiceAccountKey {
        email,
        kid,
        private_pem: key.serialize_pem(),
        public_pem: key.public_key_pem(),
    }
}

fn assertion(key: &ServiceAccountKey, aud: &str, scope: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.to_owned());
    let now = now_secs();
    let claims = json!({"iss": key.email, "aud": aud, "scope": scope, "iat": now, "exp": now + 3600});
    let signing_key = EncodingKey::from_rsa_pem(key.private_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &signing_key).unwrap()
}

fn oauth_token(emu: &GoogleEmulator, http: &Client, form: &[(&str, &str)]) -> RequestBuilder {
    http.post(format!("{}/token", emu.base_url())).form(form)
}

#[tokio::test]
async fn jwt_bearer_grant_verifies_the_key_signature() {
    let (emu, http) = setup().await;
    let key = service_account_key("keyed@proj.iam.gserviceaccount.com", "kid-1");
    emu.add_service_account_key(key.email, key.kid, &key.public_pem);

    let jwt = assertion(&key, "https://oauth2.googleapis.com/token", CLOUD_PLATFORM);
    let (status, body) = send(oauth_token(
        &emu,
        &http,
        &[("grant_type", JWT_BEARER), ("assertion", &jwt)],
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], CLOUD_PLATFORM);
    let info = emu.token_info(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(info.principal, format!("serviceAccount:{}", key.email));

    // The emulator's own URL is an acceptable audience too.
    let jwt = assertion(&key, &format!("{}/token", emu.base_url()), CLOUD_PLATFORM);
    let (status, _) = send(oauth_token(
        &emu,
        &http,
        &[("grant_type", JWT_BEARER), ("assertion", &jwt)],
    ))
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn jwt_bearer_grant_rejects_a_signature_from_another_key() {
    let (emu, http) = setup().await;
    let registered = service_account_key("keyed@proj.iam.gserviceaccount.com", "kid-1");
    emu.add_service_account_key(registered.email, registered.kid, &registered.public_pem);
    let impostor = service_account_key(registered.email, registered.kid);

    let jwt = assertion(&impostor, "https://oauth2.googleapis.com/token", CLOUD_PLATFORM);
    let (status, body) = send(oauth_token(
        &emu,
        &http,
        &[("grant_type", JWT_BEARER), ("assertion", &jwt)],
    ))
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
    );

    let jwt = assertion(&registered, "https://oauth2.googleapis.com/token", "");
    let (status, body) = send(oauth_token(
        &emu,
        &http,
        &[("grant_type", JWT_BEARER), ("assertion", &jwt)],
    ))
    .await;
    assert_eq!(status, 400);
    assert_oauth_error(&body, "invalid_scope");
}

#[tokio::test]
async fn refresh_token_grant_checks_client_and_token() {
    let (emu, http) = setup().await;
    emu.add_authorized_user("client-1", "secret-1", "refresh-1", "dev@example.com");
    let form = |secret: &'static str, refresh: &'static str| {
        [
            ("grant_type", "refresh_token"),
            ("client_id", "client-1"),
            ("client_secret", secret),
            ("refresh_token", refresh),
        ]
    };

    let (status, body) = send(oauth_token(&emu, &http, &form("secret-1", "refresh-1"))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["expires_in"].is_u64() && body["scope"].is_string());
    let info = emu.token_info(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(info.principal, "user:dev@example.com");

    let (status, body) = send(oauth_token(&emu, &http, &form("wrong", "refresh-1"))).await;
    assert_eq!(status, 401);
    assert_oauth_error(&body, "invalid_client");

    let (status, body) = send(oauth_token(&emu, &http, &form("secret-1", "revoked"))).await;
    assert_eq!(status, 400);
    assert_oauth_error(&body, "invalid_grant");
}

#[tokio::test]
async fn tokeninfo_describes_live_tokens_only() {
    let (emu, http) = setup().await;
    let token = metadata_token(&emu, &http).await;
    let url = format!("{}/tokeninfo", emu.base_url());

    let (status, body) = send(http.get(format!("{url}?access_token={token}"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["email"], METADATA_SA);
    assert_eq!(body["scope"], CLOUD_PLATFORM);
    let expires_in: u64 = body["expires_in"].as_str().unwrap().parse().unwrap();
    assert!((3595..=3600).contains(&expires_in));
    let exp: u64 = body["exp"].as_str().unwrap().parse().unwrap();
    assert!(exp.abs_diff(now_secs() + 3600) <= 5);
    assert!(body["azp"].is_string());

    let (status, body) = send(http.get(format!("{url}?access_token=ya29.forged"))).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": "invalid_token", "error_description": "Invalid Value"})
    );
}

// ---- Metadata server --------------------------------------------------------------------------

#[tokio::test]
async fn metadata_server_issues_tokens_for_its_identity() {
    let (emu, http) = setup().await;
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/{METADATA_SA}/token",
        emu.base_url()
    );
    let response = http
        .get(format!("{url}?scopes=a,b"))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["metadata-flavor"], "Google");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let info = emu.token_info(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(info.scopes, ["a", "b"]);
    assert_eq!(info.principal, format!("serviceAccount:{METADATA_SA}"));
}

#[tokio::test]
async fn metadata_server_requires_the_flavor_header_and_an_identity() {
    let (emu, http) = setup().await;
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/token",
        emu.base_url()
    );
    assert_eq!(http.get(&url).send().await.unwrap().status(), 403);

    let bare = GoogleEmulator::start().await.unwrap();
    assert_eq!(metadata(&bare, &http).send().await.unwrap().status(), 404);
}

// ---- Faults, latency, observation -------------------------------------------------------------

#[tokio::test]
async fn a_scripted_503_fails_once_then_the_endpoint_recovers() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    emu.fail_next(
        Endpoint::GenerateAccessToken,
        1,
        Fault::Status {
            code: 503,
            retry_after: None,
        },
    );
    let request = json!({"scope": [CLOUD_PLATFORM]});

    let (status, body) = send(generate(&emu, &http, TARGET_SA, Some(&caller), request.clone())).await;
    assert_eq!(status, 503);
    assert_rpc_error(&body, 503, "UNAVAILABLE");
    let (status, body) = send(generate(&emu, &http, TARGET_SA, Some(&caller), request)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(emu.calls(Endpoint::GenerateAccessToken), 2);
}

#[tokio::test]
async fn status_faults_carry_retry_after_and_the_endpoint_error_shape() {
    let (emu, http) = setup().await;
    emu.fail_next(
        Endpoint::Sts,
        1,
        Fault::Status {
            code: 429,
            retry_after: Some(7),
        },
    );
    let subject = oidc_token(json!(https_provider()), "sub", now_secs() + 600);
    let response: Response = sts(&emu, &http, &sts_form(&subject)).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_oauth_error(&response.json().await.unwrap(), "temporarily_unavailable");
}

#[tokio::test]
async fn a_dropped_connection_is_a_transport_error() {
    let (emu, http) = setup().await;
    emu.fail_next(Endpoint::Metadata, 1, Fault::DropConnection);
    let error = metadata(&emu, &http).send().await.expect_err("connection dropped");
    assert!(error.is_request(), "{error}");
    assert_eq!(emu.calls(Endpoint::Metadata), 1);
    // Only that connection is gone; the server still answers.
    metadata_token(&emu, &http).await;
}

#[tokio::test]
async fn malformed_json_and_empty_token_faults_answer_200() {
    let (emu, http) = setup().await;
    emu.fail_next(Endpoint::Metadata, 1, Fault::MalformedJson);
    emu.fail_next(Endpoint::Metadata, 1, Fault::EmptyToken);

    let response = metadata(&emu, &http).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(serde_json::from_str::<Value>(&response.text().await.unwrap()).is_err());

    let (status, body) = send(metadata(&emu, &http)).await;
    assert_eq!(status, 200);
    assert_eq!(body["access_token"], "");
    assert!(emu.issued_tokens().is_empty());
}

#[tokio::test]
async fn a_redirect_fault_answers_307_with_the_location() {
    let (emu, _) = setup().await;
    let location = "http://127.0.0.1:9/v1/token";
    emu.fail_next(
        Endpoint::Sts,
        1,
        Fault::Redirect {
            location: location.into(),
        },
    );
    let http = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = sts(&emu, &http, &sts_form("t")).send().await.unwrap();
    assert_eq!(response.status(), 307);
    assert_eq!(response.headers()["location"], location);
    assert!(emu.issued_tokens().is_empty());
}

#[tokio::test]
async fn a_padded_fault_streams_a_huge_but_valid_body() {
    let (emu, http) = setup().await;
    let padding = 3 * 1024 * 1024 + 17;
    emu.fail_next(Endpoint::Metadata, 1, Fault::Padded { padding });
    let response = metadata(&emu, &http).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // Streamed: nothing tells the client the size up front.
    assert_eq!(response.content_length(), None);
    let body = response.bytes().await.unwrap();
    assert!(body.len() > padding, "{} bytes", body.len());
    let body: Value = serde_json::from_slice(&body).expect("still JSON");
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(emu.issued_tokens(), [token]);
}

#[tokio::test]
async fn a_clock_offset_moves_absolute_times_and_the_date_header_only() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    let offset = Duration::from_secs(7200);
    emu.set_clock_offset(k8s_openapi::jiff::SignedDuration::try_from(offset).unwrap());

    let response = generate(
        &emu,
        &http,
        TARGET_SA,
        Some(&caller),
        json!({"scope": [CLOUD_PLATFORM]}),
    )
    .send()
    .await
    .unwrap();
    let date = response.headers()["date"].to_str().unwrap().to_owned();
    let date = k8s_openapi::jiff::fmt::rfc2822::parse(&date).unwrap().timestamp();
    let body: Value = response.json().await.unwrap();
    let expire: k8s_openapi::jiff::Timestamp = body["expireTime"].as_str().unwrap().parse().unwrap();
    let now = k8s_openapi::jiff::Timestamp::now();
    // The server's clock reads 2 h ahead; its token still lives 1 h by that clock.
    let ahead = date.duration_since(now).as_secs();
    assert!((7199..=7201).contains(&ahead), "{ahead}");
    assert!((3599..=3601).contains(&expire.duration_since(date).as_secs()));
    // ... and by the real one: it expires after its lifetime, not its skewed time.
    let info = emu.token_info(body["accessToken"].as_str().unwrap()).unwrap();
    assert!((3598..=3600).contains(&secs_left(info.expires_at)));

    // Relative lifetimes (here the metadata server's expires_in) do not depend on the clock.
    let response = metadata(&emu, &http).send().await.unwrap();
    let body: Value = response.json().await.unwrap();
    assert!((3599..=3600).contains(&body["expires_in"].as_u64().unwrap()), "{body}");
}

#[tokio::test]
async fn latency_delays_the_answer() {
    let (emu, http) = setup().await;
    emu.set_latency(Endpoint::Metadata, Duration::from_millis(300));
    let started = Instant::now();
    metadata_token(&emu, &http).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_service_account_latency_delays_only_that_account() {
    let (emu, http) = setup().await;
    let other = "other@proj.iam.gserviceaccount.com";
    emu.add_service_account(other, &["*"]);
    emu.set_service_account_latency(TARGET_SA, Duration::from_millis(500));
    let caller = metadata_token(&emu, &http).await;
    let request = json!({"scope": [CLOUD_PLATFORM]});
    let started = Instant::now();
    let (status, _) = send(generate(&emu, &http, other, Some(&caller), request.clone())).await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let (status, _) = send(generate(&emu, &http, TARGET_SA, Some(&caller), request)).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(500));
    // The account's ID tokens hang as long.
    let started = Instant::now();
    id_token(&emu, &http, TARGET_SA, &caller, json!({"audience": "a"})).await;
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[tokio::test]
async fn every_request_is_recorded_and_unknown_paths_get_a_google_404() {
    let (emu, http) = setup().await;
    let token = metadata_token(&emu, &http).await;
    let (status, body) = send(http.post(format!("{}/v2/nothing?x=1", emu.base_url())).body("payload")).await;
    assert_eq!(status, 404);
    assert_rpc_error(&body, 404, "NOT_FOUND");

    let requests = emu.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].endpoint, Some(Endpoint::Metadata));
    assert_eq!(requests[0].method, "GET");
    assert!(
        requests[0]
            .headers
            .iter()
            .any(|(k, v)| k == "metadata-flavor" && v == "Google")
    );
    assert_eq!(requests[1].endpoint, None);
    assert_eq!(requests[1].path, "/v2/nothing?x=1");
    assert_eq!(requests[1].body, "payload");
    assert_eq!(emu.issued_tokens(), [token]);
}

#[test]
fn the_emulator_can_be_shared_across_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GoogleEmulator>();
}

#[tokio::test]
async fn dropping_the_emulator_stops_the_server() {
    let emu = GoogleEmulator::start().await.unwrap();
    let addr = emu.base_url().trim_start_matches("http://").to_owned();
    drop(emu);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting connections");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- ID tokens --------------------------------------------------------------------------------

const GOOGLE_ISSUER: &str = "https://accounts.google.com";
const RUN_AUDIENCE: &str = "https://app-abc123-uc.a.run.app";

/// The emulator's JWK set, fetched as a verifier would.
async fn certs(emu: &GoogleEmulator, http: &Client) -> JwkSet {
    let response = http.get(emu.id_token_certs_url()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.expect("a JWK set")
}

/// The claims of `jwt` once its RS256 signature, issuer, audience and expiry check out against
/// the emulator's published keys.
async fn verified_claims(emu: &GoogleEmulator, http: &Client, jwt: &str, audience: &str) -> Value {
    let header = jsonwebtoken::decode_header(jwt).expect("a JWT");
    assert_eq!(header.alg, Algorithm::RS256);
    let keys = certs(emu, http).await;
    let jwk = keys.find(&header.kid.expect("a kid")).expect("kid listed in the JWKS");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[GOOGLE_ISSUER]);
    let key = DecodingKey::from_jwk(jwk).unwrap();
    jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .expect("signed by the emulator's key")
        .claims
}

/// An ID token for `account`, asked for by `caller` with `request`.
async fn id_token(emu: &GoogleEmulator, http: &Client, account: &str, caller: &str, request: Value) -> String {
    let (status, body) = send(generate_id(emu, http, account, Some(caller), request)).await;
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

fn claim_names(claims: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = claims.as_object().unwrap().keys().map(String::as_str).collect();
    names.sort_unstable();
    names
}

fn lifetime_claim(claims: &Value) -> u64 {
    claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap()
}

fn identity(emu: &GoogleEmulator, http: &Client, account: &str, query: &str) -> RequestBuilder {
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/{account}/identity{query}",
        emu.base_url()
    );
    http.get(url).header("Metadata-Flavor", "Google")
}

#[tokio::test]
async fn generate_id_token_answers_a_jwt_signed_with_the_published_key() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    let request = json!({"audience": RUN_AUDIENCE});
    let (status, body) = send(generate_id(&emu, &http, TARGET_SA, Some(&caller), request)).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body.as_object().unwrap().len(),
        1,
        "only the token, no expiry field: {body}"
    );
    let jwt = body["token"].as_str().unwrap();
    let claims = verified_claims(&emu, &http, jwt, RUN_AUDIENCE).await;
    assert_eq!(claim_names(&claims), ["aud", "azp", "exp", "iat", "iss", "sub"]);
    assert_eq!(claims["aud"], RUN_AUDIENCE);
    let sub = claims["sub"].as_str().unwrap();
    assert!(sub.len() == 21 && sub.bytes().all(|b| b.is_ascii_digit()), "{sub}");
    assert_eq!(claims["azp"], sub);
    assert_eq!(lifetime_claim(&claims), 3600);
    assert!(claims["iat"].as_u64().unwrap().abs_diff(now_secs()) <= 5);

    let info = emu.token_info(jwt).unwrap();
    assert_eq!(info.principal, format!("serviceAccount:{TARGET_SA}"));
    assert_eq!(info.endpoint, Endpoint::GenerateIdToken);
    assert!(info.scopes.is_empty());
    assert!((3595..=3600).contains(&secs_left(info.expires_at)));
    assert_eq!(emu.issued_tokens(), [caller.as_str(), jwt]);

    // The unique ID is the account's, whoever asks and for whatever audience.
    let other = id_token(&emu, &http, TARGET_SA, &caller, json!({"audience": "other"})).await;
    let other = verified_claims(&emu, &http, &other, "other").await;
    assert_eq!(other["sub"], sub);
}

#[tokio::test]
async fn generate_id_token_adds_the_email_on_request_and_follows_the_lifetime() {
    let (emu, http) = setup().await;
    emu.set_lifetime(Endpoint::GenerateIdToken, Duration::from_secs(600));
    let caller = metadata_token(&emu, &http).await;
    let request = json!({"audience": RUN_AUDIENCE, "includeEmail": true});
    let (status, body) = send(generate_id(&emu, &http, TARGET_SA, Some(&caller), request)).await;

    assert_eq!(status, 200, "{body}");
    let jwt = body["token"].as_str().unwrap();
    let claims = verified_claims(&emu, &http, jwt, RUN_AUDIENCE).await;
    assert_eq!(
        claim_names(&claims),
        ["aud", "azp", "email", "email_verified", "exp", "iat", "iss", "sub"]
    );
    assert_eq!(claims["email"], TARGET_SA);
    assert_eq!(claims["email_verified"], true);
    assert_eq!(lifetime_claim(&claims), 600);
    assert!((595..=600).contains(&secs_left(emu.token_info(jwt).unwrap().expires_at)));

    let request = json!({"audience": RUN_AUDIENCE, "includeEmail": false});
    let jwt = id_token(&emu, &http, TARGET_SA, &caller, request).await;
    let claims = verified_claims(&emu, &http, &jwt, RUN_AUDIENCE).await;
    assert!(
        claims.get("email").is_none() && claims.get("email_verified").is_none(),
        "{claims}"
    );
}

#[tokio::test]
async fn generate_id_token_needs_the_grant_along_the_delegation_chain() {
    let (emu, http) = setup().await;
    let middle = "middle@proj.iam.gserviceaccount.com";
    let end = "end@proj.iam.gserviceaccount.com";
    emu.add_service_account(middle, &[&format!("serviceAccount:{METADATA_SA}")]);
    emu.add_service_account(end, &[&format!("serviceAccount:{middle}")]);
    let caller = metadata_token(&emu, &http).await;

    let request = json!({"audience": RUN_AUDIENCE, "delegates": [format!("projects/-/serviceAccounts/{middle}")]});
    let (status, body) = send(generate_id(&emu, &http, end, Some(&caller), request)).await;
    assert_eq!(status, 200, "{body}");
    let claims = verified_claims(&emu, &http, body["token"].as_str().unwrap(), RUN_AUDIENCE).await;
    assert_eq!(
        emu.token_info(body["token"].as_str().unwrap()).unwrap().principal,
        format!("serviceAccount:{end}")
    );
    assert!(claims["sub"].is_string());

    for account in [end, "missing@proj.iam.gserviceaccount.com"] {
        let request = json!({"audience": RUN_AUDIENCE});
        let (status, body) = send(generate_id(&emu, &http, account, Some(&caller), request)).await;
        assert_eq!(status, 403, "{account}");
        assert_eq!(
            body,
            json!({"error": {
                "code": 403,
                "message": "Permission 'iam.serviceAccounts.getOpenIdToken' denied on resource (or it may not exist).",
                "status": "PERMISSION_DENIED",
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "IAM_PERMISSION_DENIED",
                    "domain": "iam.googleapis.com",
                    "metadata": {"permission": "iam.serviceAccounts.getOpenIdToken"},
                }],
            }})
        );
    }
    assert_eq!(emu.issued_tokens().len(), 2, "the caller's token and one ID token");
}

#[tokio::test]
async fn generate_id_token_rejects_malformed_requests() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    for request in [
        json!({}),
        json!({"audience": ""}),
        json!({"audience": RUN_AUDIENCE, "scope": [CLOUD_PLATFORM]}),
        json!({"audience": RUN_AUDIENCE, "includeEmail": "yes"}),
        json!({"audience": RUN_AUDIENCE, "delegates": ["middle@proj.iam.gserviceaccount.com"]}),
    ] {
        let (status, body) = send(generate_id(&emu, &http, TARGET_SA, Some(&caller), request.clone())).await;
        assert_eq!(status, 400, "{request}");
        assert_rpc_error(&body, 400, "INVALID_ARGUMENT");
    }
    let url = format!(
        "{}/v1/projects/proj/serviceAccounts/{TARGET_SA}:generateIdToken",
        emu.base_url()
    );
    let (status, body) = send(http.post(url).bearer_auth(&caller).json(&json!({"audience": "a"}))).await;
    assert_eq!(status, 400);
    assert_rpc_error(&body, 400, "INVALID_ARGUMENT");

    let (status, body) = send(generate_id(&emu, &http, TARGET_SA, None, json!({"audience": "a"}))).await;
    assert_eq!(status, 401);
    assert_rpc_error(&body, 401, "UNAUTHENTICATED");
    assert_eq!(emu.issued_tokens(), [caller]);
}

#[tokio::test]
async fn an_id_token_is_no_bearer_credential_for_google_apis() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    let jwt = id_token(&emu, &http, TARGET_SA, &caller, json!({"audience": "a"})).await;

    let request = json!({"scope": [CLOUD_PLATFORM]});
    let (status, body) = send(generate(&emu, &http, TARGET_SA, Some(&jwt), request)).await;
    assert_eq!(status, 401);
    assert_rpc_error(&body, 401, "UNAUTHENTICATED");
    assert_eq!(body["error"]["details"][0]["reason"], "ACCESS_TOKEN_TYPE_UNSUPPORTED");

    let (status, _) = send(http.get(format!("{}/tokeninfo?access_token={jwt}", emu.base_url()))).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_certs_endpoint_publishes_one_rsa_key_as_google_does() {
    let (emu, http) = setup().await;
    assert_eq!(emu.id_token_certs_url(), format!("{}/oauth2/v3/certs", emu.base_url()));
    let (status, body) = send(http.get(emu.id_token_certs_url())).await;
    assert_eq!(status, 200, "{body}");
    let keys = body["keys"].as_array().unwrap();
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    assert_eq!(keys.len(), 1, "{body}");
    assert_eq!(claim_names(&keys[0]), ["alg", "e", "kid", "kty", "n", "use"]);
    assert_eq!(keys[0]["kty"], "RSA");
    assert_eq!(keys[0]["alg"], "RS256");
    assert_eq!(keys[0]["use"], "sig");
    assert_eq!(keys[0]["e"], "AQAB");
    let n = keys[0]["n"].as_str().unwrap();
    assert_eq!(
        URL_SAFE_NO_PAD.decode(n).unwrap().len(),
        256,
        "a 2048-bit modulus, base64url unpadded"
    );
    assert!(keys[0]["kid"].as_str().is_some_and(|kid| !kid.is_empty()));
    assert_eq!(emu.calls(Endpoint::Certs), 1);

    // Each emulator has a key of its own.
    let other = GoogleEmulator::start().await.unwrap();
    assert_ne!(
        certs(&other, &http).await.keys[0].common.key_id,
        keys[0]["kid"].as_str().map(str::to_owned)
    );
}

#[tokio::test]
async fn id_token_times_read_the_emulator_clock() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    emu.set_clock_offset(k8s_openapi::jiff::SignedDuration::from_secs(7200));
    let jwt = id_token(&emu, &http, TARGET_SA, &caller, json!({"audience": "a"})).await;

    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&jwt).unwrap();
    let ahead = claims["iat"].as_u64().unwrap() - now_secs();
    assert!((7195..=7200).contains(&ahead), "{ahead}");
    assert_eq!(lifetime_claim(&claims), 3600);
    // It still expires after its lifetime by the real clock.
    assert!((3595..=3600).contains(&secs_left(emu.token_info(&jwt).unwrap().expires_at)));
}

#[tokio::test]
async fn id_token_faults_withhold_the_token_or_fail_in_the_endpoint_shape() {
    let (emu, http) = setup().await;
    let caller = metadata_token(&emu, &http).await;
    emu.fail_next(Endpoint::GenerateIdToken, 1, Fault::EmptyToken);
    emu.fail_next(
        Endpoint::GenerateIdToken,
        1,
        Fault::Status {
            code: 503,
            retry_after: None,
        },
    );
    let request = json!({"audience": "a"});
    let (status, body) = send(generate_id(&emu, &http, TARGET_SA, Some(&caller), request.clone())).await;
    assert_eq!((status, body), (200, json!({"token": ""})));
    let (status, body) = send(generate_id(&emu, &http, TARGET_SA, Some(&caller), request)).await;
    assert_eq!(status, 503);
    assert_rpc_error(&body, 503, "UNAVAILABLE");

    emu.fail_next(Endpoint::MetadataIdentity, 1, Fault::EmptyToken);
    let response = identity(&emu, &http, "default", "?audience=a").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "");
    assert_eq!(emu.issued_tokens(), [caller]);
}

// ---- Metadata server identity -----------------------------------------------------------------

#[tokio::test]
async fn metadata_identity_answers_the_bare_jwt() {
    let (emu, http) = setup().await;
    let response = identity(&emu, &http, "default", &format!("?audience={RUN_AUDIENCE}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["metadata-flavor"], "Google");
    assert_eq!(response.headers()["content-type"], "text/html; charset=utf-8");
    let jwt = response.text().await.unwrap();
    let claims = verified_claims(&emu, &http, &jwt, RUN_AUDIENCE).await;
    assert_eq!(claim_names(&claims), ["aud", "azp", "exp", "iat", "iss", "sub"]);
    assert_eq!(lifetime_claim(&claims), 3600);
    let info = emu.token_info(&jwt).unwrap();
    assert_eq!(info.principal, format!("serviceAccount:{METADATA_SA}"));
    assert_eq!(info.endpoint, Endpoint::MetadataIdentity);
    assert_eq!(emu.issued_tokens(), [jwt.as_str()]);

    // `sub` is the account's unique ID, as `tokeninfo` reports it for the account's access tokens.
    let access = metadata_token(&emu, &http).await;
    let (_, info) = send(http.get(format!("{}/tokeninfo?access_token={access}", emu.base_url()))).await;
    assert_eq!(claims["sub"], info["sub"]);
}

#[tokio::test]
async fn metadata_identity_full_format_carries_the_email() {
    let (emu, http) = setup().await;
    emu.set_lifetime(Endpoint::MetadataIdentity, Duration::from_secs(900));
    for query in ["?audience=aud&format=full", "?audience=aud&format=full&licenses=TRUE"] {
        let response = identity(&emu, &http, METADATA_SA, query).send().await.unwrap();
        assert_eq!(response.status(), 200, "{query}");
        let claims = verified_claims(&emu, &http, &response.text().await.unwrap(), "aud").await;
        assert_eq!(claims["email"], METADATA_SA);
        assert_eq!(claims["email_verified"], true);
        assert_eq!(lifetime_claim(&claims), 900);
    }
    let response = identity(&emu, &http, "default", "?audience=aud&format=standard")
        .send()
        .await
        .unwrap();
    let claims = verified_claims(&emu, &http, &response.text().await.unwrap(), "aud").await;
    assert!(claims.get("email").is_none(), "{claims}");
}

#[tokio::test]
async fn metadata_identity_requires_flavor_audience_and_identity() {
    let (emu, http) = setup().await;
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/identity?audience=a",
        emu.base_url()
    );
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["metadata-flavor"], "Google");

    for query in ["", "?audience=", "?format=full"] {
        let response = identity(&emu, &http, "default", query).send().await.unwrap();
        assert_eq!(response.status(), 400, "{query}");
        assert_eq!(response.text().await.unwrap(), "non-empty audience parameter required");
    }
    let response = identity(&emu, &http, "default", "?audience=a&format=compact")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    let response = identity(&emu, &http, "other@proj.iam.gserviceaccount.com", "?audience=a")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let bare = GoogleEmulator::start().await.unwrap();
    assert_eq!(
        identity(&bare, &http, "default", "?audience=a")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert!(emu.issued_tokens().is_empty());
    assert_eq!(emu.calls(Endpoint::MetadataIdentity), 6);
}

// ---- Developer Connect repository tokens ------------------------------------------------------

const LINK: &str = "projects/proj/locations/us-central1/connections/github/gitRepositoryLinks/app";
const OTHER_LINK: &str = "projects/proj/locations/us-central1/connections/github/gitRepositoryLinks/lib";
const GIT_USER: &str = "x-access-token";
const READER: &str = "reader@proj.iam.gserviceaccount.com";

/// [`setup`] with two links: on [`LINK`] the metadata account may write and [`READER`] may
/// only read; [`OTHER_LINK`] anyone may read.
async fn setup_repositories() -> (GoogleEmulator, Client) {
    let (emu, http) = setup().await;
    let writer = format!("serviceAccount:{METADATA_SA}");
    emu.add_git_repository_link(LINK, GIT_USER, &[&format!("serviceAccount:{READER}")], &[&writer]);
    emu.add_git_repository_link(OTHER_LINK, GIT_USER, &["*"], &[]);
    emu.add_service_account(READER, &["*"]);
    (emu, http)
}

fn fetch_repo(emu: &GoogleEmulator, http: &Client, link: &str, write: bool, token: &str) -> RequestBuilder {
    let method = if write { "fetchReadWriteToken" } else { "fetchReadToken" };
    http.post(format!("{}/v1/{link}:{method}", emu.base_url()))
        .bearer_auth(token)
}

/// An access token for `account`, which the metadata server's account impersonates.
async fn impersonated_token(emu: &GoogleEmulator, http: &Client, account: &str) -> String {
    let caller = metadata_token(emu, http).await;
    let request = json!({"scope": [CLOUD_PLATFORM]});
    let (status, body) = send(generate(emu, http, account, Some(&caller), request)).await;
    assert_eq!(status, 200, "{body}");
    body["accessToken"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn fetch_read_token_answers_token_expiry_and_git_username() {
    let (emu, http) = setup_repositories().await;
    let caller = metadata_token(&emu, &http).await;
    let (status, body) = send(fetch_repo(&emu, &http, LINK, false, &caller)).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(claim_names(&body), ["expirationTime", "gitUsername", "token"]);
    assert_eq!(body["gitUsername"], GIT_USER);
    assert_rfc3339(body["expirationTime"].as_str().unwrap());
    let token = body["token"].as_str().unwrap();
    let info = emu.token_info(token).unwrap();
    assert_eq!(info.principal, format!("serviceAccount:{METADATA_SA}"));
    assert_eq!(info.endpoint, Endpoint::FetchReadToken);
    assert!(info.scopes.is_empty());
    assert!((3595..=3600).contains(&secs_left(info.expires_at)));
    assert!(emu.issued_tokens().iter().any(|t| t == token));

    assert!(emu.git_credentials_valid(LINK, GIT_USER, token, false));
    assert!(
        !emu.git_credentials_valid(LINK, GIT_USER, token, true),
        "a read token cannot push"
    );
    assert!(
        !emu.git_credentials_valid(LINK, "oauth2", token, false),
        "wrong username"
    );
    assert!(
        !emu.git_credentials_valid(OTHER_LINK, GIT_USER, token, false),
        "another link"
    );
    assert!(!emu.git_credentials_valid(
        "projects/p/locations/l/connections/c/gitRepositoryLinks/x",
        GIT_USER,
        token,
        false
    ));
    assert!(
        !emu.git_credentials_valid(LINK, GIT_USER, &caller, false),
        "an access token is no repository token"
    );
    assert!(!emu.git_credentials_valid(LINK, GIT_USER, "forged", false));
}

#[tokio::test]
async fn writers_fetch_both_kinds_and_readers_only_read_tokens() {
    let (emu, http) = setup_repositories().await;
    let writer = metadata_token(&emu, &http).await;
    let (status, body) = send(fetch_repo(&emu, &http, LINK, true, &writer)).await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap();
    assert_eq!(emu.token_info(token).unwrap().endpoint, Endpoint::FetchReadWriteToken);
    assert!(emu.git_credentials_valid(LINK, GIT_USER, token, true));
    assert!(
        emu.git_credentials_valid(LINK, GIT_USER, token, false),
        "write implies read"
    );

    let reader = impersonated_token(&emu, &http, READER).await;
    let (status, _) = send(fetch_repo(&emu, &http, LINK, false, &reader)).await;
    assert_eq!(status, 200);
    let (status, body) = send(fetch_repo(&emu, &http, LINK, true, &reader)).await;
    assert_eq!(status, 403);
    let permission = "developerconnect.gitRepositoryLinks.fetchReadWriteToken";
    assert_eq!(
        body,
        json!({"error": {
            "code": 403,
            "message": format!("Permission '{permission}' denied on resource '{LINK}' (or it may not exist)."),
            "status": "PERMISSION_DENIED",
            "details": [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "IAM_PERMISSION_DENIED",
                "domain": "iam.googleapis.com",
                "metadata": {"permission": permission, "resource": LINK},
            }],
        }})
    );

    // "*" admits any caller; a link without writers grants no write token to anyone.
    let (status, _) = send(fetch_repo(&emu, &http, OTHER_LINK, false, &reader)).await;
    assert_eq!(status, 200);
    let (status, _) = send(fetch_repo(&emu, &http, OTHER_LINK, true, &writer)).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn a_caller_without_a_grant_is_denied_the_read_token() {
    let (emu, http) = setup_repositories().await;
    let stranger = "stranger@proj.iam.gserviceaccount.com";
    emu.add_service_account(stranger, &["*"]);
    let token = impersonated_token(&emu, &http, stranger).await;
    let (status, body) = send(fetch_repo(&emu, &http, LINK, false, &token)).await;
    assert_eq!(status, 403);
    assert_rpc_error(&body, 403, "PERMISSION_DENIED");
    assert_eq!(
        body["error"]["details"][0]["metadata"]["permission"],
        "developerconnect.gitRepositoryLinks.fetchReadToken"
    );
}

#[tokio::test]
async fn repository_tokens_need_a_known_link_an_empty_body_and_an_access_token() {
    let (emu, http) = setup_repositories().await;
    let caller = metadata_token(&emu, &http).await;
    let unknown = LINK.replace("/app", "/missing");
    let (status, body) = send(fetch_repo(&emu, &http, &unknown, false, &caller)).await;
    assert_eq!(status, 404);
    assert_rpc_error(&body, 404, "NOT_FOUND");
    assert_eq!(
        body["error"]["details"],
        json!([{"@type": "type.googleapis.com/google.rpc.ResourceInfo", "resourceName": unknown}])
    );

    let (status, body) = send(fetch_repo(&emu, &http, LINK, true, &caller).json(&json!({"scope": "x"}))).await;
    assert_eq!(status, 400);
    assert_rpc_error(&body, 400, "INVALID_ARGUMENT");
    let (status, body) = send(fetch_repo(&emu, &http, LINK, true, &caller).json(&json!({}))).await;
    assert_eq!(status, 200, "{body}");

    // A repository token is a Git credential, not a Google one.
    let repo_token = body["token"].as_str().unwrap();
    let (status, body) = send(fetch_repo(&emu, &http, LINK, false, repo_token)).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["details"][0]["reason"], "ACCESS_TOKEN_TYPE_UNSUPPORTED");
    let (status, _) = send(http.post(format!("{}/v1/{LINK}:fetchReadToken", emu.base_url()))).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn repository_token_faults_apply() {
    let (emu, http) = setup_repositories().await;
    let caller = metadata_token(&emu, &http).await;
    emu.fail_next(Endpoint::FetchReadToken, 1, Fault::EmptyExpiration);
    emu.fail_next(Endpoint::FetchReadToken, 1, Fault::EmptyToken);
    emu.fail_next(
        Endpoint::FetchReadWriteToken,
        1,
        Fault::Status {
            code: 429,
            retry_after: Some(3),
        },
    );

    let (status, body) = send(fetch_repo(&emu, &http, LINK, false, &caller)).await;
    assert_eq!(status, 200);
    assert_eq!(body["expirationTime"], "");
    let token = body["token"].as_str().unwrap();
    assert!(emu.git_credentials_valid(LINK, GIT_USER, token, false));

    let (status, body) = send(fetch_repo(&emu, &http, LINK, false, &caller)).await;
    assert_eq!(status, 200);
    assert_eq!(body["token"], "");
    assert_eq!(
        emu.issued_tokens().len(),
        2,
        "the caller's token and the first repository token"
    );

    let response = fetch_repo(&emu, &http, LINK, true, &caller).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "3");
    assert_rpc_error(&response.json().await.unwrap(), 429, "RESOURCE_EXHAUSTED");
}

#[tokio::test]
async fn repository_tokens_expire_by_the_real_clock() {
    let (emu, http) = setup_repositories().await;
    let caller = metadata_token(&emu, &http).await;
    // The emulator's clock runs 2 h late: the answer says so, the token lives on regardless.
    emu.set_clock_offset(k8s_openapi::jiff::SignedDuration::from_secs(-7200));
    let (_, body) = send(fetch_repo(&emu, &http, LINK, false, &caller)).await;
    let expiration: k8s_openapi::jiff::Timestamp = body["expirationTime"].as_str().unwrap().parse().unwrap();
    let behind = k8s_openapi::jiff::Timestamp::now().duration_since(expiration).as_secs();
    assert!((3595..=3601).contains(&behind), "{behind}");
    assert!(emu.git_credentials_valid(LINK, GIT_USER, body["token"].as_str().unwrap(), false));

    emu.set_lifetime(Endpoint::FetchReadWriteToken, Duration::from_millis(300));
    let (_, body) = send(fetch_repo(&emu, &http, LINK, true, &caller)).await;
    let short = body["token"].as_str().unwrap();
    assert!(emu.git_credentials_valid(LINK, GIT_USER, short, true));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!emu.git_credentials_valid(LINK, GIT_USER, short, true), "expired");
}

// ---- Revocation -------------------------------------------------------------------------------

#[tokio::test]
async fn revoked_tokens_are_refused_but_still_known() {
    let (emu, http) = setup_repositories().await;
    let caller = metadata_token(&emu, &http).await;
    let (_, body) = send(fetch_repo(&emu, &http, LINK, true, &caller)).await;
    let repo_token = body["token"].as_str().unwrap().to_owned();
    let jwt = id_token(&emu, &http, TARGET_SA, &caller, json!({"audience": "a"})).await;

    for token in [&caller, &repo_token, &jwt] {
        emu.revoke(token);
        assert!(emu.token_info(token).is_some(), "revoked tokens stay in the registry");
    }
    emu.revoke("never-issued");

    assert!(!emu.git_credentials_valid(LINK, GIT_USER, &repo_token, false));
    let (status, body) = send(generate(
        &emu,
        &http,
        TARGET_SA,
        Some(&caller),
        json!({"scope": [CLOUD_PLATFORM]}),
    ))
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["details"][0]["reason"], "ACCESS_TOKEN_EXPIRED");
    let (status, _) = send(http.get(format!("{}/tokeninfo?access_token={caller}", emu.base_url()))).await;
    assert_eq!(status, 400);
    assert_eq!(emu.issued_tokens(), [caller, repo_token, jwt]);
}
