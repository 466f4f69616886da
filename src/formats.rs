//! The shapes consumers read a token in: for each format, the Secret's type, keys, labels and
//! annotations, and where in them the operator finds the token again. Pure.
//!
//! The formats' sources: shared reference `consumer-formats.md` (Kubernetes' basic-auth type,
//! Tekton's `docs/auth.md`, Flux's `gitrepositories.md`, Argo CD's `declarative-setup.md`,
//! git's `git-credential-store`, netrc(5), Artifact Registry's npm authentication).

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::{
    crd::{ArgoCdRepositoryType, ArgoCdSecretType, FluxAuth, NpmRegistry},
    template::{self, TemplateError, Values},
};

/// Keys the operator writes next to the token in an Opaque Secret.
pub const EXPIRES_AT_KEY: &str = "expires_at";
pub const TOKEN_TYPE_KEY: &str = "token_type";
/// Where the token replaced at the last refresh is kept, beside the key of the current one.
pub const PREVIOUS_SUFFIX: &str = ".previous";
pub const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";
pub const GIT_CREDENTIALS_KEY: &str = ".git-credentials";
pub const NETRC_KEY: &str = ".netrc";
pub const NPMRC_KEY: &str = ".npmrc";
pub const BASIC_AUTH_TYPE: &str = "kubernetes.io/basic-auth";
pub const ARGOCD_SECRET_TYPE_LABEL: &str = "argocd.argoproj.io/secret-type";
/// The apiserver's limit on a Secret's data.
pub const MAX_SECRET_DATA: usize = 1024 * 1024;
/// The username registries take with a Google access token.
pub const OAUTH2_ACCESS_TOKEN_USER: &str = "oauth2accesstoken";

pub fn previous_token_key(token_key: &str) -> String {
    format!("{token_key}{PREVIOUS_SUFFIX}")
}

/// A validated Secret format.
#[derive(Clone, Debug, PartialEq)]
pub enum Format {
    Opaque {
        token_key: String,
    },
    DockerConfigJson {
        registries: Vec<String>,
    },
    /// `None` usernames come from the token (Developer Connect's `gitUsername`).
    BasicAuth {
        username: Option<String>,
        tekton_git: Vec<String>,
        tekton_docker: Vec<String>,
    },
    Flux {
        auth: FluxAuth,
        username: Option<String>,
    },
    ArgoCd(ArgoCd),
    GitCredentials {
        /// Scheme and authority, and the path if any, without a trailing `/`.
        urls: Vec<(String, String)>,
        username: Option<String>,
    },
    Netrc {
        hosts: Vec<String>,
        username: Option<String>,
    },
    Npmrc {
        registries: Vec<NpmRegistry>,
    },
    Template(Templates),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ArgoCd {
    pub secret_type: ArgoCdSecretType,
    pub url: String,
    pub repository_type: ArgoCdRepositoryType,
    pub enable_oci: bool,
    pub project: Option<String>,
    pub name: Option<String>,
    pub username: Option<String>,
}

/// Checked templates, by Secret key and by annotation key.
#[derive(Clone, Debug, PartialEq)]
pub struct Templates {
    pub token_key: String,
    /// The flow's username, if it decides one before the call.
    pub username: Option<String>,
    pub data: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// What a format makes of a token.
#[derive(Debug, Default, PartialEq)]
pub struct Rendered {
    pub type_: &'static str,
    pub data: BTreeMap<String, Vec<u8>>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// The token and what a format may show of it.
pub struct Token<'a> {
    pub token: &'a str,
    pub expires_at: &'a str,
    /// The username the flow returned with the token.
    pub username: Option<&'a str>,
    pub scopes: &'a [String],
    pub fingerprint: &'a str,
}

/// Why a token cannot be put in a format; never contains the token.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RenderError {
    #[error("no username goes with this token: the flow returned none; set the format's username")]
    NoUsername,
    #[error("the token or the username contains characters that {format} cannot hold")]
    Unrepresentable { format: &'static str },
    #[error("spec.secret.format.template.{field}[{key:?}]: {source}")]
    Template {
        field: &'static str,
        key: String,
        source: TemplateError,
    },
}

/// Where in a Secret the token is, recorded in an annotation so that it is found again after
/// the format changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Carrier {
    /// The whole value of a key.
    Key(String),
    DockerConfig,
    GitCredentials,
    Netrc,
    Npmrc,
}

impl Carrier {
    pub fn encode(&self) -> String {
        match self {
            Self::Key(key) => format!("key:{key}"),
            Self::DockerConfig => "dockerconfigjson".into(),
            Self::GitCredentials => "git-credentials".into(),
            Self::Netrc => "netrc".into(),
            Self::Npmrc => "npmrc".into(),
        }
    }

    pub fn decode(text: &str) -> Option<Self> {
        Some(match text {
            "dockerconfigjson" => Self::DockerConfig,
            "git-credentials" => Self::GitCredentials,
            "netrc" => Self::Netrc,
            "npmrc" => Self::Npmrc,
            _ => Self::Key(text.strip_prefix("key:")?.to_string()),
        })
    }

    /// The token in `data`, if every place this carrier puts it holds the same one.
    pub fn read(&self, data: &BTreeMap<String, Vec<u8>>) -> Option<String> {
        let text = |key: &str| std::str::from_utf8(data.get(key)?).ok();
        let tokens: Vec<String> = match self {
            Self::Key(key) => vec![text(key)?.to_string()],
            Self::DockerConfig => {
                let config: serde_json::Value = serde_json::from_str(text(DOCKER_CONFIG_KEY)?).ok()?;
                let auths = config.get("auths")?.as_object()?;
                auths
                    .values()
                    .map(|entry| entry.get("password")?.as_str().map(String::from))
                    .collect::<Option<_>>()?
            }
            Self::GitCredentials => text(GIT_CREDENTIALS_KEY)?
                .lines()
                .map(|line| {
                    let url = url::Url::parse(line).ok()?;
                    let password = percent_encoding::percent_decode_str(url.password()?);
                    password.decode_utf8().ok().map(|p| p.into_owned())
                })
                .collect::<Option<_>>()?,
            Self::Netrc => text(NETRC_KEY)?
                .lines()
                .map(|line| {
                    // `KEYWORD VALUE` pairs, so that a login named "password" is not taken for one.
                    let words: Vec<&str> = line.split_whitespace().collect();
                    let pair = words.chunks(2).find(|pair| pair[0] == "password")?;
                    pair.get(1).map(|token| token.to_string())
                })
                .collect::<Option<_>>()?,
            Self::Npmrc => text(NPMRC_KEY)?
                .lines()
                .filter_map(|line| line.rsplit_once(":_authToken=").map(|(_, token)| token.to_string()))
                .collect(),
        };
        let first = tokens.first()?;
        (!first.is_empty() && tokens.iter().all(|t| t == first)).then(|| first.clone())
    }
}

impl Format {
    /// The name users write in `spec.secret.format` (or the type, for the two without one).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Opaque { .. } => "Opaque",
            Self::DockerConfigJson { .. } => "kubernetes.io/dockerconfigjson",
            Self::BasicAuth { .. } => "basicAuth",
            Self::Flux { .. } => "flux",
            Self::ArgoCd(_) => "argoCD",
            Self::GitCredentials { .. } => "gitCredentials",
            Self::Netrc { .. } => "netrc",
            Self::Npmrc { .. } => "npmrc",
            Self::Template(_) => "template",
        }
    }

    pub fn carrier(&self) -> Carrier {
        match self {
            Self::Opaque { token_key } => Carrier::Key(token_key.clone()),
            Self::Template(t) => Carrier::Key(t.token_key.clone()),
            Self::DockerConfigJson { .. } => Carrier::DockerConfig,
            Self::Flux {
                auth: FluxAuth::Bearer, ..
            } => Carrier::Key("bearerToken".into()),
            Self::BasicAuth { .. } | Self::Flux { .. } | Self::ArgoCd(_) => Carrier::Key("password".into()),
            Self::GitCredentials { .. } => Carrier::GitCredentials,
            Self::Netrc { .. } => Carrier::Netrc,
            Self::Npmrc { .. } => Carrier::Npmrc,
        }
    }

    /// The key the previous token is kept under after a refresh: only where a consumer reads the
    /// token from one key of its own. Files hold one credential per host, image pulls and
    /// templates read the current token only.
    pub fn previous_key(&self) -> Option<String> {
        let one_key = matches!(
            self,
            Self::Opaque { .. } | Self::BasicAuth { .. } | Self::Flux { .. } | Self::ArgoCd(_)
        );
        match self.carrier() {
            Carrier::Key(key) if one_key => Some(previous_token_key(&key)),
            _ => None,
        }
    }

    /// Whether the format sends a username with the token, and the one it was given (explicitly,
    /// or the flow's default).
    pub fn username(&self) -> Option<Option<&str>> {
        match self {
            Self::BasicAuth { username, .. }
            | Self::Flux {
                auth: FluxAuth::Basic,
                username,
            }
            | Self::GitCredentials { username, .. }
            | Self::Netrc { username, .. }
            | Self::ArgoCd(ArgoCd { username, .. }) => Some(username.as_deref()),
            _ => None,
        }
    }

    /// The Secret's contents for `token`.
    pub fn render(&self, token: &Token<'_>) -> Result<Rendered, RenderError> {
        let secret = token.token;
        let user = || {
            self.username()
                .flatten()
                .or(token.username)
                .filter(|u| !u.is_empty())
                .ok_or(RenderError::NoUsername)
        };
        let mut out = Rendered {
            type_: "Opaque",
            ..Default::default()
        };
        let mut put = |key: &str, value: &str| out.data.insert(key.to_string(), value.as_bytes().to_vec());
        match self {
            Self::Opaque { token_key } => {
                put(token_key, secret);
                put(EXPIRES_AT_KEY, token.expires_at);
                put(TOKEN_TYPE_KEY, "Bearer");
            }
            Self::DockerConfigJson { registries } => {
                let auth = STANDARD.encode(format!("{OAUTH2_ACCESS_TOKEN_USER}:{secret}"));
                let entry = serde_json::json!({"username": OAUTH2_ACCESS_TOKEN_USER, "password": secret, "auth": auth});
                let auths: serde_json::Map<String, serde_json::Value> =
                    registries.iter().map(|host| (host.clone(), entry.clone())).collect();
                put(DOCKER_CONFIG_KEY, &serde_json::json!({ "auths": auths }).to_string());
                out.type_ = "kubernetes.io/dockerconfigjson";
            }
            Self::BasicAuth {
                tekton_git,
                tekton_docker,
                ..
            } => {
                put("username", user()?);
                put("password", secret);
                out.type_ = BASIC_AUTH_TYPE;
                for (kind, hosts) in [("git", tekton_git), ("docker", tekton_docker)] {
                    for (i, host) in hosts.iter().enumerate() {
                        out.annotations.insert(format!("tekton.dev/{kind}-{i}"), host.clone());
                    }
                }
            }
            Self::Flux {
                auth: FluxAuth::Bearer, ..
            } => {
                put("bearerToken", secret);
            }
            Self::Flux { .. } => {
                put("username", user()?);
                put("password", secret);
            }
            Self::ArgoCd(argo) => {
                let secret_type = match argo.secret_type {
                    ArgoCdSecretType::Repository => "repository",
                    ArgoCdSecretType::RepoCreds => "repo-creds",
                };
                out.labels.insert(ARGOCD_SECRET_TYPE_LABEL.into(), secret_type.into());
                let repository_type = match argo.repository_type {
                    ArgoCdRepositoryType::Git => "git",
                    ArgoCdRepositoryType::Helm => "helm",
                };
                put("type", repository_type);
                put("url", &argo.url);
                put("username", user()?);
                put("password", secret);
                if argo.enable_oci {
                    put("enableOCI", "true");
                }
                if let Some(project) = &argo.project {
                    put("project", project);
                }
                if let Some(name) = &argo.name {
                    put("name", name);
                }
            }
            Self::GitCredentials { urls, .. } => {
                let user = user()?;
                let lines: String = urls
                    .iter()
                    .map(|(origin, path)| {
                        let (scheme, authority) = origin.split_once("://").unwrap_or(("https", origin));
                        format!("{scheme}://{}:{}@{authority}{path}\n", userinfo(user), userinfo(secret))
                    })
                    .collect();
                put(GIT_CREDENTIALS_KEY, &lines);
            }
            Self::Netrc { hosts, .. } => {
                let user = user()?;
                if [user, secret]
                    .iter()
                    .any(|s| s.chars().any(|c| c.is_whitespace() || c.is_control()))
                {
                    return Err(RenderError::Unrepresentable { format: "netrc" });
                }
                let lines: String = hosts
                    .iter()
                    .map(|host| format!("machine {host} login {user} password {secret}\n"))
                    .collect();
                put(NETRC_KEY, &lines);
            }
            Self::Npmrc { registries } => {
                if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(RenderError::Unrepresentable { format: "npmrc" });
                }
                let mut lines = String::new();
                for registry in registries {
                    let url = &registry.url;
                    match &registry.scope {
                        Some(scope) => lines.push_str(&format!("{scope}:registry={url}\n")),
                        None => lines.push_str(&format!("registry={url}\n")),
                    }
                    let key = url.split_once(':').map_or(url.as_str(), |(_, rest)| rest);
                    lines.push_str(&format!("{key}:_authToken={secret}\n{key}:always-auth=true\n"));
                }
                put(NPMRC_KEY, &lines);
            }
            Self::Template(templates) => {
                put(&templates.token_key, secret);
                let mut values = Values {
                    token: Some(secret),
                    expires_at: token.expires_at,
                    username: templates.username.as_deref().or(token.username),
                    scopes: token.scopes,
                    fingerprint: token.fingerprint,
                };
                for (key, source) in &templates.data {
                    let value =
                        template::render(source, &values, MAX_SECRET_DATA).map_err(|source| RenderError::Template {
                            field: "data",
                            key: key.clone(),
                            source,
                        })?;
                    put(key, &value);
                }
                values.token = None;
                for (key, source) in &templates.annotations {
                    let limit = crate::crd::bound::ANNOTATION_VALUE as usize;
                    let value = template::render(source, &values, limit).map_err(|source| RenderError::Template {
                        field: "annotations",
                        key: key.clone(),
                        source,
                    })?;
                    out.annotations.insert(key.clone(), value);
                }
            }
        }
        // What cannot be read back would be minted again at every reconcile: refuse it instead.
        if self.carrier().read(&out.data).as_deref() != Some(secret) {
            return Err(RenderError::Unrepresentable { format: self.name() });
        }
        Ok(out)
    }
}

/// RFC 3986 userinfo: everything but unreserved characters is percent-encoded, `:` and `@`
/// included, as git's credential store expects.
const USERINFO: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

fn userinfo(s: &str) -> String {
    utf8_percent_encode(s, USERINFO).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "ya29.a/b@c:d";

    fn token() -> Token<'static> {
        Token {
            token: TOKEN,
            expires_at: "2026-01-01T01:00:00Z",
            username: None,
            scopes: &[],
            fingerprint: "0123456789ab",
        }
    }

    fn text(rendered: &Rendered, key: &str) -> String {
        String::from_utf8(rendered.data[key].clone()).unwrap()
    }

    /// Renders `format`, checks that the token is read back from what was rendered, and returns it.
    fn render(format: &Format, token: &Token<'_>) -> Rendered {
        let rendered = format.render(token).unwrap();
        assert_eq!(
            format.carrier().read(&rendered.data).as_deref(),
            Some(token.token),
            "{format:?}"
        );
        rendered
    }

    #[test]
    fn basic_auth_with_tekton_annotations() {
        let format = Format::BasicAuth {
            username: None,
            tekton_git: vec!["https://github.com".into(), "https://gitlab.com".into()],
            tekton_docker: vec!["https://us-docker.pkg.dev".into()],
        };
        let with_user = Token {
            username: Some("x-access-token"),
            ..token()
        };
        let rendered = render(&format, &with_user);
        assert_eq!(rendered.type_, "kubernetes.io/basic-auth");
        assert_eq!(rendered.data.keys().collect::<Vec<_>>(), ["password", "username"]);
        assert_eq!(text(&rendered, "username"), "x-access-token");
        assert_eq!(text(&rendered, "password"), TOKEN);
        let annotations: Vec<(&str, &str)> = rendered
            .annotations
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            annotations,
            [
                ("tekton.dev/docker-0", "https://us-docker.pkg.dev"),
                ("tekton.dev/git-0", "https://github.com"),
                ("tekton.dev/git-1", "https://gitlab.com"),
            ]
        );
        assert_eq!(format.previous_key().as_deref(), Some("password.previous"));
        // Without a username from the spec, the flow or the token, there is nothing to send.
        assert_eq!(format.render(&token()), Err(RenderError::NoUsername));
    }

    #[test]
    fn flux_basic_and_bearer() {
        let basic = Format::Flux {
            auth: FluxAuth::Basic,
            username: Some("oauth2accesstoken".into()),
        };
        let rendered = render(&basic, &token());
        assert_eq!(rendered.type_, "Opaque");
        assert_eq!(text(&rendered, "username"), "oauth2accesstoken");
        assert_eq!(text(&rendered, "password"), TOKEN);
        let bearer = Format::Flux {
            auth: FluxAuth::Bearer,
            username: None,
        };
        let rendered = render(&bearer, &token());
        assert_eq!(rendered.data.keys().collect::<Vec<_>>(), ["bearerToken"]);
        assert_eq!(bearer.previous_key().as_deref(), Some("bearerToken.previous"));
    }

    #[test]
    fn argo_cd_repository_credential_template() {
        let format = Format::ArgoCd(ArgoCd {
            secret_type: ArgoCdSecretType::RepoCreds,
            url: "https://github.com/demo-org".into(),
            repository_type: ArgoCdRepositoryType::Git,
            enable_oci: false,
            project: Some("team-a".into()),
            name: None,
            username: None,
        });
        let rendered = render(
            &format,
            &Token {
                username: Some("x-access-token"),
                ..token()
            },
        );
        assert_eq!(rendered.labels[ARGOCD_SECRET_TYPE_LABEL], "repo-creds");
        let data: Vec<(&str, String)> = rendered.data.keys().map(|k| (k.as_str(), text(&rendered, k))).collect();
        assert_eq!(
            data,
            [
                ("password", TOKEN.to_string()),
                ("project", "team-a".into()),
                ("type", "git".into()),
                ("url", "https://github.com/demo-org".into()),
                ("username", "x-access-token".into()),
            ]
        );
        let oci = Format::ArgoCd(ArgoCd {
            secret_type: ArgoCdSecretType::Repository,
            url: "us-docker.pkg.dev/demo-project/charts".into(),
            repository_type: ArgoCdRepositoryType::Helm,
            enable_oci: true,
            project: None,
            name: Some("charts".into()),
            username: Some("oauth2accesstoken".into()),
        });
        let rendered = render(&oci, &token());
        assert_eq!(rendered.labels[ARGOCD_SECRET_TYPE_LABEL], "repository");
        assert_eq!(text(&rendered, "type"), "helm");
        assert_eq!(text(&rendered, "enableOCI"), "true");
        assert_eq!(text(&rendered, "name"), "charts");
    }

    #[test]
    fn git_credential_store_lines_are_percent_encoded() {
        let format = Format::GitCredentials {
            urls: vec![
                ("https://github.com".into(), "/demo-org".into()),
                ("http://127.0.0.1:8080".into(), String::new()),
            ],
            username: Some("us:er@x".into()),
        };
        let rendered = render(&format, &token());
        assert_eq!(
            text(&rendered, GIT_CREDENTIALS_KEY),
            "https://us%3Aer%40x:ya29.a%2Fb%40c%3Ad@github.com/demo-org\n\
             http://us%3Aer%40x:ya29.a%2Fb%40c%3Ad@127.0.0.1:8080\n"
        );
        assert_eq!(format.previous_key(), None);
    }

    #[test]
    fn netrc_lines_and_what_netrc_cannot_hold() {
        let format = Format::Netrc {
            hosts: vec!["us-go.pkg.dev".into(), "127.0.0.1".into()],
            username: Some("oauth2accesstoken".into()),
        };
        let rendered = render(&format, &token());
        assert_eq!(
            text(&rendered, NETRC_KEY),
            format!(
                "machine us-go.pkg.dev login oauth2accesstoken password {TOKEN}\n\
                 machine 127.0.0.1 login oauth2accesstoken password {TOKEN}\n"
            )
        );
        let spaced = Token {
            token: "two words",
            ..token()
        };
        assert_eq!(
            format.render(&spaced),
            Err(RenderError::Unrepresentable { format: "netrc" })
        );
    }

    #[test]
    fn npmrc_for_artifact_registry() {
        let format = Format::Npmrc {
            registries: vec![
                NpmRegistry {
                    url: "https://us-npm.pkg.dev/demo-project/npm-repo/".into(),
                    scope: Some("@demo".into()),
                },
                NpmRegistry {
                    url: "https://europe-npm.pkg.dev/demo-project/all/".into(),
                    scope: None,
                },
            ],
        };
        let rendered = render(&format, &token());
        assert_eq!(
            text(&rendered, NPMRC_KEY),
            format!(
                "@demo:registry=https://us-npm.pkg.dev/demo-project/npm-repo/\n\
                 //us-npm.pkg.dev/demo-project/npm-repo/:_authToken={TOKEN}\n\
                 //us-npm.pkg.dev/demo-project/npm-repo/:always-auth=true\n\
                 registry=https://europe-npm.pkg.dev/demo-project/all/\n\
                 //europe-npm.pkg.dev/demo-project/all/:_authToken={TOKEN}\n\
                 //europe-npm.pkg.dev/demo-project/all/:always-auth=true\n"
            )
        );
    }

    #[test]
    fn templates_render_data_and_annotations_without_the_token() {
        let format = Format::Template(Templates {
            token_key: "token".into(),
            username: None,
            data: BTreeMap::from([(
                "config.json".into(),
                r#"{"token": {{ token | tojson }}, "expiry": "{{ expires_at }}", "basic": "{{ (username ~ ':' ~ token) | b64encode }}"}"#
                    .into(),
            )]),
            annotations: BTreeMap::from([("example.com/expires".into(), "{{ expires_at }} {{ fingerprint }}".into())]),
        });
        let rendered = render(
            &format,
            &Token {
                username: Some("u"),
                ..token()
            },
        );
        let basic = STANDARD.encode(format!("u:{TOKEN}"));
        assert_eq!(
            text(&rendered, "config.json"),
            format!(r#"{{"token": "{TOKEN}", "expiry": "2026-01-01T01:00:00Z", "basic": "{basic}"}}"#)
        );
        assert_eq!(text(&rendered, "token"), TOKEN);
        assert_eq!(
            rendered.annotations["example.com/expires"],
            "2026-01-01T01:00:00Z 0123456789ab"
        );
        assert_eq!(format.previous_key(), None);
    }

    #[test]
    fn carriers_round_trip_and_refuse_edits() {
        for carrier in [
            Carrier::Key("password".into()),
            Carrier::DockerConfig,
            Carrier::GitCredentials,
            Carrier::Netrc,
            Carrier::Npmrc,
        ] {
            assert_eq!(Carrier::decode(&carrier.encode()), Some(carrier));
        }
        assert_eq!(Carrier::decode("unknown"), None);
        // Two lines that disagree mean the file was edited: no token is trusted from it.
        let data = BTreeMap::from([(
            NETRC_KEY.to_string(),
            b"machine a login u password one\nmachine b login u password two\n".to_vec(),
        )]);
        assert_eq!(Carrier::Netrc.read(&data), None);
        assert_eq!(Carrier::GitCredentials.read(&data), None);
    }
}
