//! The Secret a TokenRequest owns: rendering it from a token, and reading a token back from it.
//! Pure functions; the controller decides when to write.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    jiff::Timestamp,
};
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

pub use crate::formats::MAX_SECRET_DATA;
use crate::{
    crd::TokenRequest,
    formats::{Carrier, RenderError, Token},
    names,
    validation::{SecretLayout, ValidSpec},
};

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "gcp-token-operator";
/// Label selector of the Secrets the operator watches.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=gcp-token-operator";
/// The TokenRequest's name, or its head and a hash where the name is longer than a label value may
/// be; the annotation of the same key always holds the whole name.
pub const TOKEN_REQUEST_LABEL: &str = "gcptoken.dev/token-request";
pub const TOKEN_REQUEST_ANNOTATION: &str = "gcptoken.dev/token-request";
pub const EXPIRES_AT_ANNOTATION: &str = "gcptoken.dev/expires-at";
pub const ISSUED_AT_ANNOTATION: &str = "gcptoken.dev/issued-at";
pub const SPEC_HASH_ANNOTATION: &str = "gcptoken.dev/spec-hash";
pub const FINGERPRINT_ANNOTATION: &str = "gcptoken.dev/token-fingerprint";
pub const SCOPES_ANNOTATION: &str = "gcptoken.dev/scopes";
pub const PREVIOUS_EXPIRES_AT_ANNOTATION: &str = "gcptoken.dev/previous-expires-at";
/// Where in the data the token is (see [`Carrier`]): read back by the carrier that wrote it, a
/// token survives a change of format without a new mint.
pub const TOKEN_CARRIER_ANNOTATION: &str = "gcptoken.dev/token-carrier";
/// The username the flow returned with the token (not a secret: `x-access-token` and the like).
pub const USERNAME_ANNOTATION: &str = "gcptoken.dev/username";
/// The longest token accepted. Google's access tokens are a few hundred bytes to about 2 KiB;
/// anything far longer is not a token, and would make the Secret too large with a few registries.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// A token must outlive its arrival by this much to be worth storing: one that expires sooner
/// would be minted again at once, and again, at the cost of every tenant's budget.
pub const MIN_USEFUL_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a token Google issued is not stored.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Unusable {
    #[error("the token issued expires at {expires_at}, less than {}s from now (is the operator's clock right?)", MIN_USEFUL_LIFETIME.as_secs())]
    ExpiresTooSoon { expires_at: Timestamp },
    #[error("the token issued claims to expire at {expires_at}, later than this flow ever issues (at most {} ahead; is the operator's clock right?)", humantime::format_duration(*.longest))]
    ExpiresTooLate {
        expires_at: Timestamp,
        longest: std::time::Duration,
    },
    #[error("the token issued is {bytes} bytes long, more than the {MAX_TOKEN_BYTES} any Google token has")]
    TokenTooLarge { bytes: usize },
    #[error("the Secret would hold {bytes} bytes of data, more than the {MAX_SECRET_DATA} Kubernetes allows")]
    SecretTooLarge { bytes: usize },
    #[error("the token cannot be written as spec.secret.format {format}: {source}")]
    Format {
        format: &'static str,
        #[source]
        source: RenderError,
    },
}

/// Whether `record`, just issued, is a token worth storing at `now`: it must outlive
/// `MIN_USEFUL_LIFETIME`, expire no later than `longest` from now, and have a plausible size.
pub fn check_issued(record: &TokenRecord, now: Timestamp, longest: std::time::Duration) -> Result<(), Unusable> {
    let bytes = record.token.expose_secret().len();
    if bytes > MAX_TOKEN_BYTES {
        return Err(Unusable::TokenTooLarge { bytes });
    }
    let expires_at = record.expires_at;
    if expires_at <= crate::refresh::later(now, MIN_USEFUL_LIFETIME) {
        return Err(Unusable::ExpiresTooSoon { expires_at });
    }
    if expires_at > crate::refresh::later(now, longest) {
        return Err(Unusable::ExpiresTooLate { expires_at, longest });
    }
    Ok(())
}

/// A token and what is known about it.
#[derive(Clone, Debug)]
pub struct TokenRecord {
    pub token: SecretString,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub scopes: Vec<String>,
    /// The username the flow returned with the token (Developer Connect's `gitUsername`).
    pub username: Option<String>,
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

/// The whole Secret as the operator wants it: server-side applied as is. `previous` is kept
/// only where the format has a key for it ([`Format::previous_key`]). Never larger than a Secret
/// may be.
pub fn desired_secret(
    tr: &TokenRequest,
    spec: &ValidSpec,
    record: &TokenRecord,
    previous: Option<&PreviousToken>,
) -> Result<Secret, Unusable> {
    let layout = &spec.secret;
    let format = &layout.format;
    let expires_at = rfc3339(record.expires_at);
    let fingerprint = record.fingerprint();
    let token = Token {
        token: record.token.expose_secret(),
        expires_at: &expires_at,
        username: record.username.as_deref(),
        scopes: &record.scopes,
        fingerprint: &fingerprint,
    };
    let rendered = format.render(&token).map_err(|source| Unusable::Format {
        format: format.name(),
        source,
    })?;
    let mut labels = layout.labels.clone();
    labels.extend(rendered.labels);
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    let name = tr.name_any();
    labels.insert(TOKEN_REQUEST_LABEL.into(), names::fit_63(&name).into_owned());
    let mut annotations = layout.annotations.clone();
    annotations.extend(rendered.annotations);
    annotations.insert(TOKEN_REQUEST_ANNOTATION.into(), name);
    annotations.insert(EXPIRES_AT_ANNOTATION.into(), expires_at);
    annotations.insert(ISSUED_AT_ANNOTATION.into(), rfc3339(record.issued_at));
    annotations.insert(SPEC_HASH_ANNOTATION.into(), spec.token_hash.clone());
    annotations.insert(FINGERPRINT_ANNOTATION.into(), fingerprint);
    annotations.insert(TOKEN_CARRIER_ANNOTATION.into(), format.carrier().encode());
    if !record.scopes.is_empty() {
        annotations.insert(SCOPES_ANNOTATION.into(), record.scopes.join(" "));
    }
    if let Some(username) = &record.username {
        annotations.insert(USERNAME_ANNOTATION.into(), username.clone());
    }
    let mut data: BTreeMap<String, ByteString> = rendered.data.into_iter().map(|(k, v)| (k, ByteString(v))).collect();
    if let Some((previous, key)) = previous.zip(format.previous_key()) {
        annotations.insert(PREVIOUS_EXPIRES_AT_ANNOTATION.into(), rfc3339(previous.expires_at));
        data.insert(key, ByteString(previous.token.expose_secret().as_bytes().to_vec()));
    }
    let bytes = data.iter().map(|(k, v)| k.len() + v.0.len()).sum();
    if bytes > MAX_SECRET_DATA {
        return Err(Unusable::SecretTooLarge { bytes });
    }
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(layout.name.clone()),
            namespace: tr.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: owner_reference(tr).map(|r| vec![r]),
            ..Default::default()
        },
        type_: Some(rendered.type_.into()),
        data: Some(data),
        ..Default::default()
    })
}

/// The name of the TokenRequest that controls `secret`, from its controller ownerReference.
pub fn controller_name(secret: &Secret) -> Option<&str> {
    secret
        .owner_references()
        .iter()
        .find(|r| r.controller == Some(true) && r.kind == "TokenRequest" && r.api_version.starts_with("gcptoken.dev/"))
        .map(|r| r.name.as_str())
}

fn owner_reference(tr: &TokenRequest) -> Option<OwnerReference> {
    tr.controller_owner_ref(&())
}

fn rfc3339(ts: Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The token in `secret` as the operator wrote it, if it is intact: present where the
/// annotated carrier (or, for Secrets written before there was one, the current layout) puts it,
/// and matching the fingerprint written beside it (so an edited token is not trusted).
pub fn stored_token(secret: &Secret, layout: &SecretLayout) -> Option<StoredToken> {
    let annotations = secret.metadata.annotations.as_ref()?;
    let parse = |key: &str| annotations.get(key)?.parse::<Timestamp>().ok();
    let carrier = match annotations.get(TOKEN_CARRIER_ANNOTATION) {
        Some(text) => Carrier::decode(text)?,
        None => layout.format.carrier(),
    };
    let data: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    let token = carrier.read(&data)?;
    if annotations.get(FINGERPRINT_ANNOTATION)? != &fingerprint(&token) {
        return None;
    }
    let scopes = annotations
        .get(SCOPES_ANNOTATION)
        .map(|s| s.split(' ').map(String::from).collect())
        .unwrap_or_default();
    Some(StoredToken {
        record: TokenRecord {
            token: SecretString::from(token),
            issued_at: parse(ISSUED_AT_ANNOTATION)?,
            expires_at: parse(EXPIRES_AT_ANNOTATION)?,
            scopes,
            username: annotations.get(USERNAME_ANNOTATION).cloned(),
        },
        spec_hash: annotations.get(SPEC_HASH_ANNOTATION)?.clone(),
        previous: previous_token(secret, &carrier),
    })
}

/// The previous token, beside the key the carrier holds the current one in.
fn previous_token(secret: &Secret, carrier: &Carrier) -> Option<PreviousToken> {
    let Carrier::Key(key) = carrier else {
        return None;
    };
    let expires_at = secret.annotations().get(PREVIOUS_EXPIRES_AT_ANNOTATION)?.parse().ok()?;
    let bytes = &secret.data.as_ref()?.get(&crate::formats::previous_token_key(key))?.0;
    let token = String::from_utf8(bytes.clone()).ok()?;
    Some(PreviousToken {
        token: SecretString::from(token),
        expires_at,
    })
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

/// The most of a TokenRequest's Secret (data and annotations, in bytes) that the cache keeps.
/// The operator never writes more than a few KiB unless a Secret names many registries; anything
/// beyond is someone's addition and is read live when needed instead of being held.
pub const MAX_CACHED_SECRET: usize = 64 * 1024;

/// What the Secret cache holds of `secret`, so that what tenants write cannot fill the operator's
/// memory: a Secret no TokenRequest controls (anyone can set the watched label) keeps only its
/// identity, ownership and the watched label; one that a TokenRequest controls keeps everything
/// unless it is larger than `MAX_CACHED_SECRET`, in which case it keeps only its identity and
/// ownership ([`is_trimmed`]) and is read live when needed.
pub fn trim_for_cache(secret: &mut Secret) {
    secret.metadata.managed_fields = None;
    secret.string_data = None;
    let owned = controller_name(secret).is_some();
    let size = |s: &Secret| {
        let data: usize = s.data.iter().flatten().map(|(k, v)| k.len() + v.0.len()).sum();
        let annotations: usize = s.annotations().iter().map(|(k, v)| k.len() + v.len()).sum();
        let labels: usize = s.labels().iter().map(|(k, v)| k.len() + v.len()).sum();
        data + annotations + labels
    };
    if owned && size(secret) <= MAX_CACHED_SECRET {
        return;
    }
    secret.data = None;
    secret.metadata.annotations = None;
    let managed = secret.labels().get(MANAGED_BY_LABEL).cloned();
    secret.metadata.labels = managed.map(|v| BTreeMap::from([(MANAGED_BY_LABEL.to_string(), v)]));
}

/// Whether the cached copy of a TokenRequest's Secret was trimmed by [`trim_for_cache`]. Every
/// Secret the operator writes has data; one without may also just have been emptied, which a live
/// read tells as well.
pub fn is_trimmed(secret: &Secret) -> bool {
    secret.data.is_none()
}

/// Whether `existing` cannot become `desired` by an update: a Secret's type never changes, and an
/// immutable Secret's data does not either.
pub fn needs_replacing(existing: &Secret, desired: &Secret) -> bool {
    existing.type_.as_deref().unwrap_or("Opaque") != desired.type_.as_deref().unwrap_or("Opaque")
        || (existing.immutable == Some(true) && existing.data != desired.data)
}

/// What a Secret is created with before its first apply: the fields every apply sets too
/// (name, type, owner, the watched label, and the data a typed Secret must have, which is all
/// of its data), and nothing that a later apply might need to remove.
pub fn skeleton(desired: &Secret) -> Secret {
    let managed = desired.labels().get(MANAGED_BY_LABEL).cloned();
    let typed = desired.type_.as_deref().is_some_and(|t| t != "Opaque");
    Secret {
        metadata: ObjectMeta {
            name: desired.metadata.name.clone(),
            namespace: desired.metadata.namespace.clone(),
            labels: managed.map(|v| BTreeMap::from([(MANAGED_BY_LABEL.to_string(), v)])),
            owner_references: desired.metadata.owner_references.clone(),
            ..Default::default()
        },
        type_: desired.type_.clone(),
        data: desired.data.clone().filter(|_| typed),
        ..Default::default()
    }
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
    use base64::{Engine, engine::general_purpose::STANDARD};

    use super::*;
    use crate::{
        crd::{SecretSpec, SecretType, TokenRequestSpec},
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
            username: None,
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
        (desired_secret(&tr, &spec, &record(token), None).unwrap(), spec)
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
        let secret = desired_secret(&tr, &spec, &record("ya29.new"), Some(&previous)).unwrap();
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
        let without = desired_secret(&tr, &spec, &record("ya29.new"), None).unwrap();
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
        let secret = desired_secret(&docker, &spec, &record("ya29.new"), Some(&previous)).unwrap();
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
