//! What a source Secret key holds: a token, or one of the credential files Google hands out
//! (service account key, `authorized_user`, `external_account`), and the JWT a service account key
//! signs. Pure: the exchanges happen in `source`.
//!
//! Messages name fields and say what is wrong with them, never quote values: the files hold
//! private keys, client secrets and refresh tokens.

use std::time::Duration;

use aws_lc_rs::signature::RsaKeyPair;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    crd::{SecretFormat, SubjectTokenType},
    google::{Endpoints, describe_json_error},
    validation::{
        ImpersonationParams, MAX_IMPERSONATION_LIFETIME, StsParams, is_service_account, is_sts_audience, sts_options,
    },
};

/// A self-signed JWT lives at most an hour (Google refuses longer ones).
const ASSERTION_LIFETIME_SECS: i64 = 3600;
/// `service_account_impersonation.token_lifetime_seconds` bounds (AIP-4117).
const MIN_IMPERSONATION_SECS: u64 = 600;
const MAX_IMPERSONATION_SECS: u64 = MAX_IMPERSONATION_LIFETIME.as_secs();

/// What a Secret key holds.
pub enum Content {
    Token(SecretString),
    File(CredentialFile),
}

pub enum CredentialFile {
    ServiceAccountKey(ServiceAccountKey),
    AuthorizedUser(AuthorizedUser),
    ExternalAccount(ExternalAccount),
}

/// `"type": "service_account"`. No Debug: it holds a private key.
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key_id: String,
    private_key: EncodingKey,
}

/// `"type": "authorized_user"`.
pub struct AuthorizedUser {
    pub client_id: String,
    pub client_secret: SecretString,
    pub refresh_token: SecretString,
}

/// `"type": "external_account"`, without its `credential_source`: the subject token comes from
/// the TokenRequest.
#[derive(Debug)]
pub struct ExternalAccount {
    pub audience: String,
    pub subject_token_type: SubjectTokenType,
    /// `options` for STS (`workforce_pool_user_project`).
    pub options: Option<String>,
    /// From `service_account_impersonation_url`.
    pub impersonate: Option<String>,
    pub impersonation_lifetime: Duration,
}

impl ExternalAccount {
    /// The exchange the file describes, for a final token with `scopes`.
    pub fn exchange(&self, scopes: Vec<String>) -> StsParams {
        let impersonation = self.impersonate.as_ref().map(|service_account| ImpersonationParams {
            service_account: service_account.clone(),
            delegates: Vec::new(),
            scopes: scopes.clone(),
            lifetime: self.impersonation_lifetime,
        });
        StsParams {
            audience: self.audience.clone(),
            scopes,
            subject_token_type: self.subject_token_type,
            options: self.options.clone(),
            impersonation: None,
        }
        .with_impersonation(impersonation)
    }
}

/// Why a Secret key does not hold a usable credential.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    #[error("is not JSON ({0})")]
    NotJson(String),
    #[error("is not a JWT (three base64url parts separated by dots)")]
    NotAJwt,
    #[error("is JSON without a \"type\" field naming a Google credential file")]
    NoType,
    #[error("{file} file: field {field} {problem}")]
    Field {
        file: &'static str,
        field: String,
        problem: String,
    },
}

fn field_error(file: &'static str, field: &str, problem: impl Into<String>) -> FileError {
    FileError::Field {
        file,
        field: field.into(),
        problem: problem.into(),
    }
}

const SERVICE_ACCOUNT: &str = "service_account";
const AUTHORIZED_USER: &str = "authorized_user";
const EXTERNAL_ACCOUNT: &str = "external_account";

/// Reads what a Secret key holds, as `format` says (or as detected, for `auto`). `endpoints` are
/// the operator's: an `external_account` file must name them.
pub fn parse(value: &str, format: SecretFormat, endpoints: &Endpoints) -> Result<Content, FileError> {
    let value = value.trim();
    let expected = match format {
        SecretFormat::AccessToken => return Ok(Content::Token(SecretString::from(value))),
        SecretFormat::Jwt if is_jwt(value) => return Ok(Content::Token(SecretString::from(value))),
        SecretFormat::Jwt => return Err(FileError::NotAJwt),
        // A token never starts with `{`; a broken file does.
        SecretFormat::Auto if !value.starts_with('{') => return Ok(Content::Token(SecretString::from(value))),
        SecretFormat::Auto => None,
        SecretFormat::ServiceAccountKey => Some(SERVICE_ACCOUNT),
        SecretFormat::AuthorizedUser => Some(AUTHORIZED_USER),
        SecretFormat::ExternalAccount => Some(EXTERNAL_ACCOUNT),
    };
    let json: Value = serde_json::from_str(value).map_err(|e| FileError::NotJson(describe_json_error(&e)))?;
    let Value::Object(object) = json else {
        return Err(FileError::NotJson("not an object".into()));
    };
    let type_ = object.get("type").and_then(Value::as_str).ok_or(FileError::NoType)?;
    if let Some(expected) = expected
        && type_ != expected
    {
        return Err(field_error(expected, "type", format!("is not {expected:?}")));
    }
    let file = match type_ {
        SERVICE_ACCOUNT => CredentialFile::ServiceAccountKey(service_account(&Fields::new(SERVICE_ACCOUNT, &object))?),
        AUTHORIZED_USER => CredentialFile::AuthorizedUser(authorized_user(&Fields::new(AUTHORIZED_USER, &object))?),
        EXTERNAL_ACCOUNT => {
            CredentialFile::ExternalAccount(external_account(&Fields::new(EXTERNAL_ACCOUNT, &object), endpoints)?)
        }
        _ => {
            return Err(FileError::Field {
                file: "credential",
                field: "type".into(),
                problem: format!(
                    "names a kind of file the operator does not read (it reads {SERVICE_ACCOUNT}, \
                     {AUTHORIZED_USER} and {EXTERNAL_ACCOUNT})"
                ),
            });
        }
    };
    Ok(Content::File(file))
}

/// The fields of one kind of file.
struct Fields<'a> {
    file: &'static str,
    object: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn new(file: &'static str, object: &'a Map<String, Value>) -> Self {
        Self { file, object }
    }

    fn error(&self, field: &str, problem: impl Into<String>) -> FileError {
        field_error(self.file, field, problem)
    }

    /// A field that must be a non-empty string.
    fn required(&self, field: &str) -> Result<&'a str, FileError> {
        self.optional(field)?
            .ok_or_else(|| self.error(field, "is missing or empty"))
    }

    fn optional(&self, field: &str) -> Result<Option<&'a str>, FileError> {
        match self.object.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.error(field, "is not a string")),
        }
    }
}

fn service_account(f: &Fields<'_>) -> Result<ServiceAccountKey, FileError> {
    let client_email = f.required("client_email")?;
    if !is_service_account(client_email) {
        return Err(f.error("client_email", "is not a service account email"));
    }
    let private_key_id = f.required("private_key_id")?;
    let private_key = EncodingKey::from_rsa_pem(f.required("private_key")?.as_bytes())
        .map_err(|_| f.error("private_key", NOT_AN_RSA_KEY))?;
    // Signing costs grow with the cube of the key size, and the tenant chooses it.
    let bits = RsaKeyPair::from_der(private_key.as_bytes())
        .map_err(|_| f.error("private_key", NOT_AN_RSA_KEY))?
        .public_modulus_len()
        .saturating_mul(8);
    if bits > MAX_RSA_BITS {
        return Err(f.error(
            "private_key",
            format!("is a {bits}-bit RSA key; at most {MAX_RSA_BITS} bits are accepted"),
        ));
    }
    // `token_uri` is not read: the JWT goes to the operator's OAuth endpoint, never to an address
    // a file names.
    Ok(ServiceAccountKey {
        client_email: client_email.into(),
        private_key_id: private_key_id.into(),
        private_key,
    })
}

const NOT_AN_RSA_KEY: &str = "is not a PEM-encoded RSA private key";
/// Google issues 2048-bit keys; 4096 is the most it accepts uploaded.
const MAX_RSA_BITS: usize = 4096;

fn authorized_user(f: &Fields<'_>) -> Result<AuthorizedUser, FileError> {
    Ok(AuthorizedUser {
        client_id: f.required("client_id")?.into(),
        client_secret: SecretString::from(f.required("client_secret")?),
        refresh_token: SecretString::from(f.required("refresh_token")?),
    })
}

fn external_account(f: &Fields<'_>, endpoints: &Endpoints) -> Result<ExternalAccount, FileError> {
    refuse_credential_source(f)?;
    let audience = f.required("audience")?;
    if !is_sts_audience(audience) {
        return Err(f.error(
            "audience",
            "is not a workload or workforce identity pool provider (//iam.googleapis.com/...)",
        ));
    }
    let subject_token_type = serde_json::from_value(Value::String(f.required("subject_token_type")?.into()))
        .map_err(|_| f.error("subject_token_type", "is not a subject token type STS documents"))?;
    let sts_url = endpoints.sts_token_url();
    if trim_slash(f.required("token_url")?) != trim_slash(&sts_url) {
        return Err(f.error("token_url", format!("must be this operator's STS endpoint, {sts_url}")));
    }
    if f.optional("client_id")?.is_some() || f.optional("client_secret")?.is_some() {
        return Err(f.error(
            "client_id",
            "is set: client authentication to STS (workforce pools) is not supported",
        ));
    }
    let user_project = f.optional("workforce_pool_user_project")?;
    let workforce = audience.starts_with("//iam.googleapis.com/locations/");
    if let Some(project) = user_project
        && (!workforce || project.len() > 32)
    {
        return Err(f.error(
            "workforce_pool_user_project",
            "is only valid for a workforce pool audience, with at most 32 characters",
        ));
    }
    let impersonate = match f.optional("service_account_impersonation_url")? {
        None => None,
        Some(url) => Some(
            endpoints
                .impersonated_service_account(url)
                .filter(|account| is_service_account(account))
                .ok_or_else(|| {
                    f.error(
                        "service_account_impersonation_url",
                        format!(
                            "must be this operator's IAM Credentials endpoint, {}, for a service account email \
                             or unique id",
                            endpoints.generate_access_token_url("SERVICE_ACCOUNT_EMAIL")
                        ),
                    )
                })?,
        ),
    };
    Ok(ExternalAccount {
        audience: audience.into(),
        subject_token_type,
        options: sts_options(None, user_project),
        impersonate,
        impersonation_lifetime: impersonation_lifetime(f)?,
    })
}

/// Every kind of `credential_source` makes the operator act in its own environment on a tenant's
/// behalf (read its files, call URLs such as cloud metadata servers, run programs), so none is
/// used; the subject token comes from the TokenRequest instead.
fn refuse_credential_source(f: &Fields<'_>) -> Result<(), FileError> {
    let Some(source) = f.object.get("credential_source") else {
        return Ok(());
    };
    let named = match source {
        Value::Null => return Ok(()),
        Value::Object(o) if o.is_empty() => return Ok(()),
        Value::Object(o) => ["file", "url", "executable", "environment_id", "certificate"]
            .into_iter()
            .find(|k| o.contains_key(*k))
            .map_or_else(|| "credential_source".to_string(), |k| format!("credential_source.{k}")),
        _ => "credential_source".to_string(),
    };
    Err(f.error(
        &named,
        "is not used by the operator, which never reads its own files, calls URLs or runs programs for a \
         TokenRequest: remove credential_source and set spec.source.secret.subjectToken",
    ))
}

fn impersonation_lifetime(f: &Fields<'_>) -> Result<Duration, FileError> {
    const FIELD: &str = "service_account_impersonation.token_lifetime_seconds";
    let seconds = f
        .object
        .get("service_account_impersonation")
        .and_then(|i| i.get("token_lifetime_seconds"));
    match seconds {
        None | Some(Value::Null) => Ok(Duration::from_secs(3600)),
        Some(v) => v
            .as_u64()
            .filter(|s| (MIN_IMPERSONATION_SECS..=MAX_IMPERSONATION_SECS).contains(s))
            .map(Duration::from_secs)
            .ok_or_else(|| {
                f.error(
                    FIELD,
                    format!("must be a number from {MIN_IMPERSONATION_SECS} to {MAX_IMPERSONATION_SECS}"),
                )
            }),
    }
}

impl ServiceAccountKey {
    /// `assertion` on a blocking thread: an RSA signature takes milliseconds, which would stall
    /// every other reconcile on the same async worker.
    pub async fn sign_assertion(
        self,
        scopes: Vec<String>,
        audience: String,
        now: i64,
    ) -> Result<SecretString, FileError> {
        tokio::task::spawn_blocking(move || self.assertion(&scopes, &audience, now))
            .await
            .unwrap_or_else(|_| {
                Err(field_error(
                    SERVICE_ACCOUNT,
                    "private_key",
                    "could not be used: signing failed",
                ))
            })
    }

    /// The self-signed JWT the jwt-bearer grant exchanges: RS256, `kid` = private_key_id, issued
    /// at `now` (Unix seconds) and valid for an hour, for `audience` (the OAuth token URL).
    pub fn assertion(&self, scopes: &[String], audience: &str, now: i64) -> Result<SecretString, FileError> {
        #[derive(Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            scope: String,
            aud: &'a str,
            iat: i64,
            exp: i64,
        }
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.private_key_id.clone());
        let claims = Claims {
            iss: &self.client_email,
            scope: scopes.join(" "),
            aud: audience,
            iat: now,
            exp: now + ASSERTION_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.private_key)
            .map(SecretString::from)
            .map_err(|_| field_error(SERVICE_ACCOUNT, "private_key", NOT_AN_RSA_KEY))
    }
}

fn is_jwt(value: &str) -> bool {
    let parts: Vec<&str> = value.split('.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

fn trim_slash(url: &str) -> &str {
    url.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    const AUDIENCE: &str =
        "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/prov";
    const SA: &str = "sa@proj.iam.gserviceaccount.com";

    fn endpoints() -> Endpoints {
        Endpoints::default()
    }

    fn parse_file(value: &Value, format: SecretFormat) -> Result<CredentialFile, FileError> {
        match parse(&value.to_string(), format, &endpoints())? {
            Content::File(f) => Ok(f),
            Content::Token(_) => panic!("a file expected"),
        }
    }

    fn field_of(e: FileError) -> String {
        match e {
            FileError::Field { field, .. } => field,
            other => panic!("a field error expected, got {other}"),
        }
    }

    fn external(extra: Value) -> Value {
        let mut file = serde_json::json!({
            "type": "external_account",
            "audience": AUDIENCE,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": "https://sts.googleapis.com/v1/token",
        });
        file.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        file
    }

    #[test]
    fn auto_tells_tokens_from_files() {
        let Ok(Content::Token(t)) = parse(" ya29.token\n", SecretFormat::Auto, &endpoints()) else {
            panic!("a token expected")
        };
        assert_eq!(t.expose_secret(), "ya29.token");
        let user = serde_json::json!({"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"});
        let CredentialFile::AuthorizedUser(u) = parse_file(&user, SecretFormat::Auto).unwrap() else {
            panic!("authorized_user expected")
        };
        assert_eq!((u.client_id.as_str(), u.refresh_token.expose_secret()), ("c", "r"));
        // A broken file is not taken for a token.
        assert!(matches!(
            parse("{\"type\": ", SecretFormat::Auto, &endpoints()),
            Err(FileError::NotJson(_))
        ));
        assert_eq!(
            parse("{\"a\": 1}", SecretFormat::Auto, &endpoints()).err(),
            Some(FileError::NoType)
        );
        let other = serde_json::json!({"type": "impersonated_service_account"});
        assert_eq!(field_of(parse_file(&other, SecretFormat::Auto).err().unwrap()), "type");
    }

    #[test]
    fn explicit_formats_check_the_type_and_jwt_shape() {
        let user = serde_json::json!({"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"});
        let e = parse_file(&user, SecretFormat::ServiceAccountKey).err().unwrap();
        assert_eq!(
            e.to_string(),
            "service_account file: field type is not \"service_account\""
        );
        assert!(parse("a.b.c", SecretFormat::Jwt, &endpoints()).is_ok());
        assert_eq!(
            parse("not a jwt", SecretFormat::Jwt, &endpoints()).err(),
            Some(FileError::NotAJwt)
        );
        // accessToken takes the value as it is, even if it looks like JSON.
        assert!(matches!(
            parse("{x", SecretFormat::AccessToken, &endpoints()),
            Ok(Content::Token(_))
        ));
    }

    #[test]
    fn errors_name_the_field_and_never_the_value() {
        let secret = "s3cr3t-refresh-token";
        let user = serde_json::json!({"type": "authorized_user", "client_id": "c", "client_secret": 7, "refresh_token": secret});
        let e = parse_file(&user, SecretFormat::Auto).err().unwrap();
        assert_eq!(
            e.to_string(),
            "authorized_user file: field client_secret is not a string"
        );
        let bad_pem = serde_json::json!({"type": "service_account", "client_email": SA, "private_key_id": "k",
                                         "private_key": format!("-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n")});
        let e = parse_file(&bad_pem, SecretFormat::Auto).err().unwrap();
        assert!(!e.to_string().contains(secret), "{e}");
        assert_eq!(
            e.to_string(),
            "service_account file: field private_key is not a PEM-encoded RSA private key"
        );
        let broken = format!("{{\"type\": \"authorized_user\", \"refresh_token\": \"{secret}\" ");
        let e = parse(&broken, SecretFormat::Auto, &endpoints()).err().unwrap();
        assert!(!e.to_string().contains(secret), "{e}");
        let missing = serde_json::json!({"type": "service_account", "private_key_id": "k"});
        assert_eq!(
            field_of(parse_file(&missing, SecretFormat::Auto).err().unwrap()),
            "client_email"
        );
    }

    #[test]
    fn external_account_exchange_follows_the_file() {
        let url =
            format!("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{SA}:generateAccessToken");
        let file = external(serde_json::json!({
            "service_account_impersonation_url": url,
            "service_account_impersonation": {"token_lifetime_seconds": 1200},
        }));
        let CredentialFile::ExternalAccount(ext) = parse_file(&file, SecretFormat::ExternalAccount).unwrap() else {
            panic!("external_account expected")
        };
        let scopes = vec!["https://www.googleapis.com/auth/devstorage.read_only".to_string()];
        let p = ext.exchange(scopes.clone());
        assert_eq!(p.audience, AUDIENCE);
        assert_eq!(p.scopes, vec![crate::validation::CLOUD_PLATFORM_SCOPE]);
        let imp = p.impersonation.as_ref().unwrap();
        assert_eq!(
            (imp.service_account.as_str(), &imp.scopes, imp.lifetime),
            (SA, &scopes, Duration::from_secs(1200))
        );

        // Without impersonation, STS itself is asked for the scopes.
        let CredentialFile::ExternalAccount(ext) =
            parse_file(&external(serde_json::json!({})), SecretFormat::Auto).unwrap()
        else {
            panic!()
        };
        let p = ext.exchange(scopes.clone());
        assert_eq!((p.scopes, p.impersonation), (scopes, None));
    }

    #[test]
    fn external_account_refuses_credential_sources_and_foreign_endpoints() {
        for (source, field) in [
            (
                serde_json::json!({"file": "/var/run/secrets/kubernetes.io/serviceaccount/token"}),
                "credential_source.file",
            ),
            (
                serde_json::json!({"url": "http://169.254.169.254/metadata", "headers": {}}),
                "credential_source.url",
            ),
            (
                serde_json::json!({"executable": {"command": "/bin/sh -c id"}}),
                "credential_source.executable",
            ),
            (
                serde_json::json!({"environment_id": "aws1"}),
                "credential_source.environment_id",
            ),
            (serde_json::json!("x"), "credential_source"),
        ] {
            let file = external(serde_json::json!({ "credential_source": source }));
            let e = parse_file(&file, SecretFormat::Auto).err().unwrap();
            assert!(e.to_string().contains("subjectToken"), "{e}");
            assert_eq!(field_of(e), field);
        }
        let file = external(serde_json::json!({"token_url": "https://sts.example.com/v1/token"}));
        let e = parse_file(&file, SecretFormat::Auto).err().unwrap();
        assert!(!e.to_string().contains("example.com"), "{e}");
        assert_eq!(field_of(e), "token_url");
        for url in [
            format!("https://iam.example.com/v1/projects/-/serviceAccounts/{SA}:generateAccessToken"),
            "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/not an account:generateAccessToken"
                .to_string(),
            format!("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{SA}:signJwt"),
            // Escapes, dot segments, queries and fragments: the URL must be the operator's own, to the letter.
            format!("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{SA}:generateAccessToken#"),
            format!("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{SA}?alt=json:generateAccessToken"),
            format!(r"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/x\..\{SA}:generateAccessToken"),
            format!("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/x/../{SA}:generateAccessToken"),
            "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/x%40p.iam.gserviceaccount.com:generateAccessToken"
                .to_string(),
            "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/X@P.COM:generateAccessToken".to_string(),
        ] {
            let file = external(serde_json::json!({ "service_account_impersonation_url": url }));
            let e = parse_file(&file, SecretFormat::Auto).err().unwrap();
            assert_eq!(field_of(e), "service_account_impersonation_url", "{url}");
        }
        let file = external(serde_json::json!({"service_account_impersonation": {"token_lifetime_seconds": 60}}));
        assert_eq!(
            field_of(parse_file(&file, SecretFormat::Auto).err().unwrap()),
            "service_account_impersonation.token_lifetime_seconds"
        );
        let file = external(serde_json::json!({"workforce_pool_user_project": "p"}));
        assert_eq!(
            field_of(parse_file(&file, SecretFormat::Auto).err().unwrap()),
            "workforce_pool_user_project"
        );
        let file = external(serde_json::json!({"client_id": "c", "client_secret": "s"}));
        assert_eq!(
            field_of(parse_file(&file, SecretFormat::Auto).err().unwrap()),
            "client_id"
        );
        let file = external(serde_json::json!({"subject_token_type": "urn:example"}));
        assert_eq!(
            field_of(parse_file(&file, SecretFormat::Auto).err().unwrap()),
            "subject_token_type"
        );
    }

    #[test]
    fn workforce_user_project_goes_to_options() {
        let file = external(serde_json::json!({
            "audience": "//iam.googleapis.com/locations/global/workforcePools/wf/providers/p",
            "workforce_pool_user_project": "billing-project",
        }));
        let CredentialFile::ExternalAccount(ext) = parse_file(&file, SecretFormat::Auto).unwrap() else {
            panic!()
        };
        assert_eq!(ext.options.as_deref(), Some(r#"{"userProject":"billing-project"}"#));
    }

    #[test]
    fn keys_over_4096_bits_are_refused_by_field_never_by_value() {
        use aws_lc_rs::{
            encoding::AsDer,
            rsa::{KeyPair, KeySize},
        };
        use base64::Engine;

        let pem = |size| {
            let der = KeyPair::generate(size).unwrap().as_der().unwrap();
            let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
            let lines: Vec<&str> = body
                .as_bytes()
                .chunks(64)
                .map(|l| std::str::from_utf8(l).unwrap())
                .collect();
            (
                body.clone(),
                format!(
                    "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                    lines.join("\n")
                ),
            )
        };
        let file = |key: &str| serde_json::json!({"type": "service_account", "client_email": SA, "private_key_id": "k", "private_key": key});
        let (body, big) = pem(KeySize::Rsa8192);
        let e = parse_file(&file(&big), SecretFormat::Auto).err().unwrap();
        assert_eq!(
            e.to_string(),
            "service_account file: field private_key is a 8192-bit RSA key; at most 4096 bits are accepted"
        );
        assert!(!e.to_string().contains(&body[..40]));
        let (_, largest) = pem(KeySize::Rsa4096);
        assert!(parse_file(&file(&largest), SecretFormat::Auto).is_ok());
    }

    #[tokio::test]
    async fn assertion_is_signed_with_the_key_and_names_it() {
        use jsonwebtoken::{DecodingKey, Validation};

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let file = serde_json::json!({"type": "service_account", "client_email": SA, "private_key_id": "kid-1",
                                      "private_key": key.serialize_pem(), "token_uri": "https://elsewhere.example/token"});
        let CredentialFile::ServiceAccountKey(sa) = parse_file(&file, SecretFormat::ServiceAccountKey).unwrap() else {
            panic!()
        };
        let scopes = vec!["a".to_string(), "b".to_string()];
        let jwt = sa
            .sign_assertion(scopes, "https://oauth2.googleapis.com/token".into(), 1_800_000_000)
            .await
            .unwrap();
        let header = jsonwebtoken::decode_header(jwt.expose_secret()).unwrap();
        assert_eq!((header.alg, header.kid.as_deref()), (Algorithm::RS256, Some("kid-1")));
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.set_audience(&["https://oauth2.googleapis.com/token"]);
        let public = DecodingKey::from_rsa_pem(key.public_key_pem().as_bytes()).unwrap();
        let claims = jsonwebtoken::decode::<Value>(jwt.expose_secret(), &public, &validation)
            .unwrap()
            .claims;
        assert_eq!(
            claims,
            serde_json::json!({"iss": SA, "scope": "a b", "aud": "https://oauth2.googleapis.com/token",
                               "iat": 1_800_000_000, "exp": 1_800_003_600})
        );
    }
}
