//! The Secret a TokenRequest owns: rendering it from a token, and reading a token back from it.
//! Pure functions; the controller decides when to write.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD};
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    jiff::Timestamp,
};
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::{
    crd::{SecretType, TokenRequest},
    validation::{EXPIRES_AT_KEY, SecretLayout, TOKEN_TYPE_KEY, ValidSpec, previous_token_key},
};

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "gcp-token-operator";
/// Label selector of the Secrets the operator watches.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=gcp-token-operator";
pub const TOKEN_REQUEST_LABEL: &str = "gcptoken.dev/token-request";
pub const EXPIRES_AT_ANNOTATION: &str = "gcptoken.dev/expires-at";
pub const ISSUED_AT_ANNOTATION: &str = "gcptoken.dev/issued-at";
pub const SPEC_HASH_ANNOTATION: &str = "gcptoken.dev/spec-hash";
pub const FINGERPRINT_ANNOTATION: &str = "gcptoken.dev/token-fingerprint";
pub const SCOPES_ANNOTATION: &str = "gcptoken.dev/scopes";
pub const PREVIOUS_EXPIRES_AT_ANNOTATION: &str = "gcptoken.dev/previous-expires-at";
const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";
const DOCKER_USERNAME: &str = "oauth2accesstoken";

/// A token and what is known about it.
#[derive(Clone, Debug)]
pub struct TokenRecord {
    pub token: SecretString,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub scopes: Vec<String>,
}

impl TokenRecord {
    pub fn fingerprint(&self) -> String {
        fingerprint(self.token.expose_secret())
    }
}

/// The token a refresh replaced: kept beside the new one until it expires, so a consumer that
/// reads the Secret while the update propagates still holds a token that works.
#[derive(Clone, Debug)]
pub struct PreviousToken {
    pub token: SecretString,
    pub expires_at: Timestamp,
}

impl From<&TokenRecord> for PreviousToken {
    fn from(record: &TokenRecord) -> Self {
        Self {
            token: record.token.clone(),
            expires_at: record.expires_at,
        }
    }
}

/// A token read back from a Secret, with the hash of the spec that produced it.
#[derive(Clone, Debug)]
pub struct StoredToken {
    pub record: TokenRecord,
    pub spec_hash: String,
    pub previous: Option<PreviousToken>,
}

/// First 12 hex characters of the token's SHA-256: tells tokens apart without revealing them.
pub fn fingerprint(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))[..12].to_string()
}

/// Label and annotation keys users may not set on the Secret.
pub fn is_reserved_metadata_key(key: &str) -> bool {
    key == MANAGED_BY_LABEL || key.starts_with("gcptoken.dev/")
}

/// The whole Secret as the operator wants it: server-side applied as is. `previous` is kept in
/// Opaque Secrets only (an image pull reads the Secret when it happens, so it has no use there).
pub fn desired_secret(
    tr: &TokenRequest,
    spec: &ValidSpec,
    record: &TokenRecord,
    previous: Option<&PreviousToken>,
) -> Secret {
    let previous = previous.filter(|_| spec.secret.type_ == SecretType::Opaque);
    let layout = &spec.secret;
    let mut labels = layout.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    labels.insert(TOKEN_REQUEST_LABEL.into(), tr.name_any());
    let mut annotations = layout.annotations.clone();
    annotations.insert(EXPIRES_AT_ANNOTATION.into(), rfc3339(record.expires_at));
    annotations.insert(ISSUED_AT_ANNOTATION.into(), rfc3339(record.issued_at));
    annotations.insert(SPEC_HASH_ANNOTATION.into(), spec.token_hash.clone());
    annotations.insert(FINGERPRINT_ANNOTATION.into(), record.fingerprint());
    if !record.scopes.is_empty() {
        annotations.insert(SCOPES_ANNOTATION.into(), record.scopes.join(" "));
    }
    let mut data = secret_data(layout, record);
    if let Some(previous) = previous {
        annotations.insert(PREVIOUS_EXPIRES_AT_ANNOTATION.into(), rfc3339(previous.expires_at));
        data.insert(
            previous_token_key(&layout.token_key),
            ByteString(previous.token.expose_secret().as_bytes().to_vec()),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(layout.name.clone()),
            namespace: tr.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: owner_reference(tr).map(|r| vec![r]),
            ..Default::default()
        },
        type_: Some(layout.type_.as_str().into()),
        data: Some(data),
        ..Default::default()
    }
}

fn owner_reference(tr: &TokenRequest) -> Option<OwnerReference> {
    tr.controller_owner_ref(&())
}

fn secret_data(layout: &SecretLayout, record: &TokenRecord) -> BTreeMap<String, ByteString> {
    let token = record.token.expose_secret();
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    match layout.type_ {
        SecretType::Opaque => BTreeMap::from([
            (layout.token_key.clone(), bytes(token)),
            (EXPIRES_AT_KEY.into(), bytes(&rfc3339(record.expires_at))),
            (TOKEN_TYPE_KEY.into(), bytes("Bearer")),
        ]),
        SecretType::DockerConfigJson => {
            let auth = STANDARD.encode(format!("{DOCKER_USERNAME}:{token}"));
            let auths: serde_json::Map<String, serde_json::Value> = layout
                .registries
                .iter()
                .map(|host| {
                    let entry = serde_json::json!({"username": DOCKER_USERNAME, "password": token, "auth": auth});
                    (host.clone(), entry)
                })
                .collect();
            let config = serde_json::json!({ "auths": auths }).to_string();
            BTreeMap::from([(DOCKER_CONFIG_KEY.into(), bytes(&config))])
        }
    }
}

fn rfc3339(ts: Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The token in `secret` as written by the operator for `layout`, if it is intact: present where
/// the layout puts it, and matching the fingerprint written beside it (so an edited token is not
/// trusted).
pub fn stored_token(secret: &Secret, layout: &SecretLayout) -> Option<StoredToken> {
    let annotations = secret.metadata.annotations.as_ref()?;
    let parse = |key: &str| annotations.get(key)?.parse::<Timestamp>().ok();
    let token = read_token(secret, layout)?;
    if annotations.get(FINGERPRINT_ANNOTATION)? != &fingerprint(token.expose_secret()) {
        return None;
    }
    let scopes = annotations
        .get(SCOPES_ANNOTATION)
        .map(|s| s.split(' ').map(String::from).collect())
        .unwrap_or_default();
    Some(StoredToken {
        record: TokenRecord {
            token,
            issued_at: parse(ISSUED_AT_ANNOTATION)?,
            expires_at: parse(EXPIRES_AT_ANNOTATION)?,
            scopes,
        },
        spec_hash: annotations.get(SPEC_HASH_ANNOTATION)?.clone(),
        previous: previous_token(secret, layout),
    })
}

fn previous_token(secret: &Secret, layout: &SecretLayout) -> Option<PreviousToken> {
    let expires_at = secret.annotations().get(PREVIOUS_EXPIRES_AT_ANNOTATION)?.parse().ok()?;
    let bytes = &secret.data.as_ref()?.get(&previous_token_key(&layout.token_key))?.0;
    let token = String::from_utf8(bytes.clone()).ok()?;
    Some(PreviousToken {
        token: SecretString::from(token),
        expires_at,
    })
}

fn read_token(secret: &Secret, layout: &SecretLayout) -> Option<SecretString> {
    let data = secret.data.as_ref()?;
    let token = match layout.type_ {
        SecretType::Opaque => String::from_utf8(data.get(&layout.token_key)?.0.clone()).ok()?,
        SecretType::DockerConfigJson => {
            let config: serde_json::Value = serde_json::from_slice(&data.get(DOCKER_CONFIG_KEY)?.0).ok()?;
            let auths = config.get("auths")?.as_object()?;
            let mut passwords = layout
                .registries
                .iter()
                .map(|h| auths.get(h)?.get("password")?.as_str());
            let first = passwords.next()??;
            // Every registry entry must hold the same token, else the Secret was edited.
            if !passwords.all(|p| p == Some(first)) {
                return None;
            }
            first.to_string()
        }
    };
    (!token.is_empty()).then(|| SecretString::from(token))
}

/// Whether `existing` already carries everything in `desired`, so applying it would change nothing.
/// Extra labels and annotations written by others are left alone, as server-side apply would.
pub fn secret_is_current(existing: &Secret, desired: &Secret) -> bool {
    let contains = |have: &Option<BTreeMap<String, String>>, want: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let owners_ok = desired.metadata.owner_references.iter().flatten().all(|want| {
        existing
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|have| have == want)
    });
    existing.type_ == desired.type_
        && existing.data == desired.data
        && contains(&existing.metadata.labels, &desired.metadata.labels)
        && contains(&existing.metadata.annotations, &desired.metadata.annotations)
        && owners_ok
}

/// Whether `secret` is controlled by the TokenRequest with this uid.
pub fn is_controlled_by(secret: &Secret, uid: &str) -> bool {
    secret
        .owner_references()
        .iter()
        .any(|r| r.controller == Some(true) && r.uid == uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crd::{SecretSpec, TokenRequestSpec},
        validation::{Placement, Policy, validate},
    };

    fn token_request(secret: SecretSpec) -> TokenRequest {
        let spec: TokenRequestSpec = serde_json::from_value(serde_json::json!({
            "flow": {"developerConnect": {"accountConnector": "projects/p/locations/l/accountConnectors/c"}},
            "source": {"secret": {"name": "caller", "key": "token"}},
        }))
        .unwrap();
        let mut tr = TokenRequest::new("tr", TokenRequestSpec { secret, ..spec });
        tr.metadata.namespace = Some("ns".into());
        tr.metadata.uid = Some("uid-1".into());
        tr
    }

    fn record(token: &str) -> TokenRecord {
        TokenRecord {
            token: SecretString::from(token.to_string()),
            issued_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            expires_at: "2026-01-01T01:00:00Z".parse().unwrap(),
            scopes: vec!["s1".into(), "s2".into()],
        }
    }

    fn render(secret: SecretSpec, token: &str) -> (Secret, ValidSpec) {
        let tr = token_request(secret);
        let at = Placement {
            namespace: "ns",
            name: "tr",
            policy: &Policy::default(),
        };
        let spec = validate(&tr.spec, &at).unwrap();
        (desired_secret(&tr, &spec, &record(token), None), spec)
    }

    #[test]
    fn opaque_secret() {
        let mut layout = SecretSpec::default();
        layout.labels.insert("team".into(), "a".into());
        let (secret, spec) = render(layout, "ya29.tok");
        let data = secret.data.as_ref().unwrap();
        assert_eq!(data["token"].0, b"ya29.tok");
        assert_eq!(data["expires_at"].0, b"2026-01-01T01:00:00Z");
        assert_eq!(data["token_type"].0, b"Bearer");
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
        assert_eq!(labels["team"], "a");
        let annotations = secret.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[SPEC_HASH_ANNOTATION], spec.token_hash);
        assert_eq!(annotations[FINGERPRINT_ANNOTATION], fingerprint("ya29.tok"));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("uid-1", Some(true)));

        let stored = stored_token(&secret, &spec.secret).unwrap();
        assert_eq!(stored.record.token.expose_secret(), "ya29.tok");
        assert_eq!(stored.record.expires_at, record("").expires_at);
        assert_eq!(stored.record.scopes, vec!["s1", "s2"]);
        assert_eq!(stored.spec_hash, spec.token_hash);
    }

    #[test]
    fn the_previous_token_is_kept_beside_the_new_one() {
        let tr = token_request(SecretSpec::default());
        let at = Placement {
            namespace: "ns",
            name: "tr",
            policy: &Policy::default(),
        };
        let spec = validate(&tr.spec, &at).unwrap();
        let previous = PreviousToken::from(&record("ya29.old"));
        let secret = desired_secret(&tr, &spec, &record("ya29.new"), Some(&previous));
        let data = secret.data.as_ref().unwrap();
        assert_eq!(data["token"].0, b"ya29.new");
        assert_eq!(data["token.previous"].0, b"ya29.old");
        assert_eq!(
            secret.annotations()[PREVIOUS_EXPIRES_AT_ANNOTATION],
            "2026-01-01T01:00:00Z"
        );
        let stored = stored_token(&secret, &spec.secret).unwrap();
        assert_eq!(stored.record.token.expose_secret(), "ya29.new");
        let kept = stored.previous.unwrap();
        assert_eq!(kept.token.expose_secret(), "ya29.old");
        assert_eq!(kept.expires_at, previous.expires_at);
        // Without a previous token the key and the annotation are gone (server-side apply drops them).
        let without = desired_secret(&tr, &spec, &record("ya29.new"), None);
        assert!(!without.data.as_ref().unwrap().contains_key("token.previous"));
        assert!(!without.annotations().contains_key(PREVIOUS_EXPIRES_AT_ANNOTATION));
        assert!(!secret_is_current(&secret, &without));

        // Image pull Secrets carry the current token only.
        let docker = token_request(SecretSpec {
            type_: SecretType::DockerConfigJson,
            registries: vec!["gcr.io".into()],
            ..Default::default()
        });
        let spec = validate(&docker.spec, &at).unwrap();
        let secret = desired_secret(&docker, &spec, &record("ya29.new"), Some(&previous));
        assert_eq!(secret.data.as_ref().unwrap().len(), 1);
        assert!(!secret.annotations().contains_key(PREVIOUS_EXPIRES_AT_ANNOTATION));
    }

    #[test]
    fn dockerconfigjson_secret() {
        let layout = SecretSpec {
            type_: SecretType::DockerConfigJson,
            registries: vec!["us-docker.pkg.dev".into(), "europe-docker.pkg.dev".into()],
            ..Default::default()
        };
        let (secret, spec) = render(layout, "ya29.tok");
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
        let config: serde_json::Value =
            serde_json::from_slice(&secret.data.as_ref().unwrap()[".dockerconfigjson"].0).unwrap();
        for host in ["us-docker.pkg.dev", "europe-docker.pkg.dev"] {
            let entry = &config["auths"][host];
            assert_eq!(entry["username"], "oauth2accesstoken");
            assert_eq!(entry["password"], "ya29.tok");
            assert_eq!(entry["auth"], STANDARD.encode("oauth2accesstoken:ya29.tok"));
        }
        assert_eq!(
            stored_token(&secret, &spec.secret)
                .unwrap()
                .record
                .token
                .expose_secret(),
            "ya29.tok"
        );
    }

    #[test]
    fn edited_or_removed_token_is_not_trusted() {
        let (mut secret, spec) = render(SecretSpec::default(), "ya29.tok");
        secret
            .data
            .as_mut()
            .unwrap()
            .insert("token".into(), ByteString(b"changed".to_vec()));
        assert!(stored_token(&secret, &spec.secret).is_none());
        secret.data.as_mut().unwrap().remove("token");
        assert!(stored_token(&secret, &spec.secret).is_none());
    }

    #[test]
    fn current_secret_detection() {
        let (desired, _) = render(SecretSpec::default(), "ya29.tok");
        let mut existing = desired.clone();
        existing
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("added-by-someone".into(), "x".into());
        assert!(secret_is_current(&existing, &desired));
        existing.metadata.labels.as_mut().unwrap().remove(MANAGED_BY_LABEL);
        assert!(!secret_is_current(&existing, &desired));
        let (other_token, _) = render(SecretSpec::default(), "ya29.other");
        assert!(!secret_is_current(&other_token, &desired));
        assert!(is_controlled_by(&desired, "uid-1"));
        assert!(!is_controlled_by(&desired, "uid-2"));
    }
}
