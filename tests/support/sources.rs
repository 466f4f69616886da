//! For tests of sources: Google credential files (service account keys whose signatures the
//! emulator verifies, authorized users, external_account files that point at the emulator), and
//! finding out which identity a source stood for.

use gcp_token_operator_testkit::emulator::GoogleEmulator;
use serde_json::{Value, json};

use super::{Env, secret_token};

/// An account connector the tests register with the emulator.
pub const CONNECTOR: &str = "projects/proj/locations/us-central1/accountConnectors/github";

/// A Developer Connect TokenRequest spec. Developer Connect answers with a token for the calling
/// identity itself, so the principal of its token says which identity the source stood for.
pub fn git_from(source: Value) -> Value {
    json!({"flow": {"developerConnect": {"accountConnector": CONNECTOR}}, "source": source})
}

/// The principal of the token in the (Opaque) Secret `name`.
pub async fn principal_in(env: &Env<'_>, name: &str) -> String {
    let token = secret_token(&env.secret(name).await);
    env.google.token_info(&token).expect("an issued token").principal
}

/// A service account key file, its public half registered with the emulator.
pub struct KeyFile {
    pub email: String,
    /// The whole file, as `gcloud iam service-accounts keys create` writes it.
    pub json: String,
    private_pem: String,
}

impl KeyFile {
    pub fn new(google: &GoogleEmulator, email: &str, kid: &str) -> KeyFile {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key generation");
        google.add_service_account_key(email, kid, &key.public_key_pem());
        let private_pem = key.serialize_pem();
        let json = json!({
            "type": "service_account",
            "project_id": "proj",
            "private_key_id": kid,
            "private_key": private_pem,
            "client_email": email,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string();
        KeyFile {
            email: email.into(),
            json,
            private_pem,
        }
    }

    /// The lines of the private key: none may appear anywhere the operator writes (a logged key
    /// would show up line by line, its newlines escaped).
    pub fn material(&self) -> Vec<&str> {
        self.private_pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect()
    }
}

pub fn authorized_user(client_id: &str, client_secret: &str, refresh_token: &str) -> String {
    json!({
        "type": "authorized_user",
        "client_id": client_id,
        "client_secret": client_secret,
        "refresh_token": refresh_token,
        "quota_project_id": "proj",
    })
    .to_string()
}

/// An external_account file for `audience` whose endpoints are the emulator's, as the operator
/// under test is configured; `extra` adds or overrides fields.
pub fn external_account(google: &GoogleEmulator, audience: &str, extra: Value) -> String {
    let mut file = json!({
        "type": "external_account",
        "audience": audience,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": format!("{}/v1/token", google.base_url()),
        "universe_domain": "googleapis.com",
    });
    let fields = file.as_object_mut().expect("an object");
    fields.extend(extra.as_object().expect("extra fields as an object").clone());
    file.to_string()
}

/// The URL an external_account file names to impersonate `service_account` at the emulator.
pub fn impersonation_url(google: &GoogleEmulator, service_account: &str) -> String {
    format!(
        "{}/v1/projects/-/serviceAccounts/{service_account}:generateAccessToken",
        google.base_url()
    )
}
