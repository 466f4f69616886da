//! `spec.secret`: its name, metadata and format.

use super::{
    Flow, Problems, SecretLayout, check_name, is_dns_subdomain, is_label_value, is_qualified_name, is_secret_key,
};
use crate::{
    crd::{FluxAuth, NpmRegistry, OutputFormat, SecretSpec, SecretType},
    formats::{
        ARGOCD_SECRET_TYPE_LABEL, ArgoCd, EXPIRES_AT_KEY, Format, TOKEN_TYPE_KEY, Templates, previous_token_key,
    },
    render::is_reserved_metadata_key,
    template,
};

const DEFAULT_TOKEN_KEY: &str = "token";
const AT: &str = "spec.secret.format";

pub(super) fn validate(spec: &SecretSpec, own_name: &str, flow: Option<&Flow>, p: &mut Problems) -> SecretLayout {
    let name = spec.name.clone().unwrap_or_else(|| own_name.to_string());
    check_name(&name, "spec.secret.name", p);
    let token_key = spec.token_key.clone().unwrap_or_else(|| DEFAULT_TOKEN_KEY.to_string());
    let format = match &spec.format {
        Some(format) => {
            p.check(spec.type_ == SecretType::Opaque, || {
                format!("spec.secret.type does not apply with {AT}: the format decides the Secret's type")
            });
            p.check(spec.registries.is_empty(), || {
                format!("spec.secret.registries does not apply with {AT}")
            });
            p.check(spec.token_key.is_none() || format.template.is_some(), || {
                format!("spec.secret.tokenKey does not apply with {AT} other than template")
            });
            validate_format(format, token_key, flow, p)
        }
        None => legacy_format(spec, token_key, p),
    };
    for key in spec.labels.keys().chain(spec.annotations.keys()) {
        p.check(!is_reserved_metadata_key(key), || {
            format!("spec.secret: the label or annotation {key:?} is reserved for the operator")
        });
        p.check(is_qualified_name(key), || {
            format!("spec.secret: {key:?} is not a valid label or annotation key")
        });
    }
    for (key, value) in &spec.labels {
        p.check(is_label_value(value), || {
            format!("spec.secret.labels[{key:?}]: {value:?} is not a valid label value")
        });
    }
    if let Format::ArgoCd(_) = &format {
        p.check(!spec.labels.contains_key(ARGOCD_SECRET_TYPE_LABEL), || {
            format!("spec.secret.labels: {ARGOCD_SECRET_TYPE_LABEL:?} is set by {AT}.argoCD.secretType")
        });
    }
    if let Format::Template(templates) = &format {
        for key in templates.annotations.keys() {
            p.check(!spec.annotations.contains_key(key), || {
                format!("{AT}.template.annotations[{key:?}] is also in spec.secret.annotations")
            });
        }
    }
    SecretLayout {
        name,
        format,
        labels: spec.labels.clone(),
        annotations: spec.annotations.clone(),
    }
}

/// `type` and its fields, as before formats existed.
fn legacy_format(spec: &SecretSpec, token_key: String, p: &mut Problems) -> Format {
    match spec.type_ {
        SecretType::Opaque => {
            p.check(spec.registries.is_empty(), || {
                "spec.secret.registries is only valid with type kubernetes.io/dockerconfigjson".into()
            });
            check_token_key(&token_key, p);
            Format::Opaque { token_key }
        }
        SecretType::DockerConfigJson => {
            p.check(spec.token_key.is_none(), || {
                "spec.secret.tokenKey is only valid with type Opaque".into()
            });
            p.check(!spec.registries.is_empty(), || {
                "spec.secret.registries must name at least one registry host for type kubernetes.io/dockerconfigjson"
                    .into()
            });
            for host in &spec.registries {
                p.check(is_host(host, true), || {
                    format!("spec.secret.registries: {host:?} is not a registry host (e.g. us-docker.pkg.dev)")
                });
            }
            Format::DockerConfigJson {
                registries: spec.registries.clone(),
            }
        }
    }
}

fn check_token_key(token_key: &str, p: &mut Problems) {
    // The previous token goes under the same key with a suffix, which must fit too.
    p.check(
        is_secret_key(token_key) && is_secret_key(&previous_token_key(token_key)),
        || format!("spec.secret.tokenKey {token_key:?} is not a valid Secret key"),
    );
    p.check(token_key != EXPIRES_AT_KEY && token_key != TOKEN_TYPE_KEY, || {
        format!("spec.secret.tokenKey must not be {EXPIRES_AT_KEY:?} or {TOKEN_TYPE_KEY:?}, which the operator writes")
    });
}

fn validate_format(format: &OutputFormat, token_key: String, flow: Option<&Flow>, p: &mut Problems) -> Format {
    let set = [
        format.basic_auth.is_some(),
        format.flux.is_some(),
        format.argo_cd.is_some(),
        format.git_credentials.is_some(),
        format.netrc.is_some(),
        format.npmrc.is_some(),
        format.template.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        p.0.push(format!(
            "{AT}: exactly one of basicAuth, flux, argoCD, gitCredentials, netrc, npmrc, template must be set"
        ));
        return Format::Opaque { token_key };
    }
    // The username: as given, else the flow's; Developer Connect repository tokens bring their own.
    let mut username = |given: &Option<String>, at: &str| -> Option<String> {
        if let Some(user) = given {
            p.check(
                !user.is_empty() && !user.chars().any(|c| c.is_whitespace() || c.is_control()),
                || format!("{AT}.{at}.username must be non-empty, without whitespace or control characters"),
            );
            return Some(user.clone());
        }
        let flow = flow?;
        let returned = matches!(flow, Flow::DeveloperConnectRepository { .. });
        let default = flow.default_username();
        p.check(returned || default.is_some(), || {
            format!(
                "{AT}.{at}.username is required: the {} flow does not say which username goes with its token \
                 (GitHub: x-access-token, GitLab: oauth2, Bitbucket: x-token-auth)",
                flow.name()
            )
        });
        default.map(String::from)
    };
    if let Some(basic) = &format.basic_auth {
        let username = username(&basic.username, "basicAuth");
        let tekton = basic.tekton.clone().unwrap_or_default();
        for url in tekton.git.iter().chain(&tekton.docker) {
            p.check(origin(url).is_some_and(|(_, path)| path.is_empty()), || {
                format!("{AT}.basicAuth.tekton: {url:?} is not a URL of a host (https://HOST[:PORT])")
            });
        }
        return Format::BasicAuth {
            username,
            tekton_git: tekton.git,
            tekton_docker: tekton.docker,
        };
    }
    if let Some(flux) = &format.flux {
        let username = match flux.auth {
            FluxAuth::Basic => username(&flux.username, "flux"),
            FluxAuth::Bearer => {
                p.check(flux.username.is_none(), || {
                    format!("{AT}.flux.username does not apply with auth bearer")
                });
                None
            }
        };
        return Format::Flux {
            auth: flux.auth,
            username,
        };
    }
    if let Some(argo) = &format.argo_cd {
        let username = username(&argo.username, "argoCD");
        p.check(is_url_or_oci(&argo.url), || {
            format!(
                "{AT}.argoCD.url {:?} is not a repository URL (https://..., ssh-less; or HOST/PATH for OCI)",
                argo.url
            )
        });
        for (field, value) in [("project", &argo.project), ("name", &argo.name)] {
            if let Some(value) = value {
                p.check(!value.is_empty() && !value.chars().any(char::is_control), || {
                    format!("{AT}.argoCD.{field} must be non-empty, without control characters")
                });
            }
        }
        return Format::ArgoCd(ArgoCd {
            secret_type: argo.secret_type,
            url: argo.url.clone(),
            repository_type: argo.repository_type,
            enable_oci: argo.enable_oci,
            project: argo.project.clone(),
            name: argo.name.clone(),
            username,
        });
    }
    if let Some(git) = &format.git_credentials {
        let username = username(&git.username, "gitCredentials");
        let urls = git
            .urls
            .iter()
            .filter_map(|url| {
                let parsed = origin(url);
                p.check(parsed.is_some(), || {
                    format!(
                        "{AT}.gitCredentials.urls: {url:?} is not an http(s) URL without credentials, query or fragment"
                    )
                });
                parsed
            })
            .collect();
        p.check(!git.urls.is_empty(), || {
            format!("{AT}.gitCredentials.urls must name a URL")
        });
        return Format::GitCredentials { urls, username };
    }
    if let Some(netrc) = &format.netrc {
        let username = username(&netrc.username, "netrc");
        p.check(!netrc.hosts.is_empty(), || format!("{AT}.netrc.hosts must name a host"));
        for host in &netrc.hosts {
            p.check(is_host(host, false), || {
                format!("{AT}.netrc.hosts: {host:?} is not a host name (netrc matches names, without port or path)")
            });
        }
        return Format::Netrc {
            hosts: netrc.hosts.clone(),
            username,
        };
    }
    if let Some(npm) = &format.npmrc {
        return Format::Npmrc {
            registries: validate_npm(&npm.registries, p),
        };
    }
    let Some(t) = &format.template else {
        unreachable!("one member is set")
    };
    check_token_key(&token_key, p);
    p.check(!t.data.is_empty(), || {
        format!("{AT}.template.data must template at least one key")
    });
    let username = flow.and_then(Flow::default_username).map(String::from);
    // What `username` will be when rendering: the flow's, one returned with the token, or none.
    let trial_username = match flow {
        Some(Flow::DeveloperConnectRepository { .. }) => Some("x-access-token"),
        _ => username.as_deref(),
    };
    for (field, templates, with_token) in [("data", &t.data, true), ("annotations", &t.annotations, false)] {
        for (key, source) in templates {
            let valid_key = if with_token {
                is_secret_key(key) && *key != token_key
            } else {
                is_qualified_name(key) && !is_reserved_metadata_key(key)
            };
            p.check(valid_key, || {
                if with_token {
                    format!(
                        "{AT}.template.data: {key:?} is not a valid Secret key, or is the token's own key \
                         (tokenKey {token_key:?})"
                    )
                } else {
                    format!("{AT}.template.annotations: {key:?} is not a valid annotation key, or is reserved")
                }
            });
            let checked = template::check(source, with_token).and_then(|()| trial(source, with_token, trial_username));
            if let Err(e) = checked {
                p.0.push(format!("{AT}.template.{field}[{key:?}]: {e}"));
            }
        }
    }
    Format::Template(Templates {
        token_key,
        username,
        data: t.data.clone(),
        annotations: t.annotations.clone(),
    })
}

/// Renders a template with values of the real shapes, so that what fails for any token (an
/// undefined name, a filter on the wrong type, too much output) is reported now.
fn trial(source: &str, with_token: bool, username: Option<&str>) -> Result<(), template::TemplateError> {
    let token = "x".repeat(crate::render::MAX_TOKEN_BYTES);
    let scopes = [super::CLOUD_PLATFORM_SCOPE.to_string()];
    let values = template::Values {
        token: with_token.then_some(token.as_str()),
        expires_at: "2026-01-01T00:00:00Z",
        username,
        scopes: &scopes,
        fingerprint: "0123456789ab",
    };
    let limit = if with_token {
        crate::formats::MAX_SECRET_DATA
    } else {
        crate::crd::bound::ANNOTATION_VALUE as usize
    };
    template::render(source, &values, limit).map(|_| ())
}

fn validate_npm(registries: &[NpmRegistry], p: &mut Problems) -> Vec<NpmRegistry> {
    p.check(!registries.is_empty(), || {
        format!("{AT}.npmrc.registries must name a registry")
    });
    p.check(registries.iter().filter(|r| r.scope.is_none()).count() <= 1, || {
        format!("{AT}.npmrc.registries: at most one registry may be without a scope (the default registry)")
    });
    registries
        .iter()
        .map(|r| {
            let ok = origin(&r.url).is_some();
            p.check(ok, || {
                format!(
                    "{AT}.npmrc.registries: {:?} is not an http(s) URL without credentials, query or fragment",
                    r.url
                )
            });
            if let Some(scope) = &r.scope {
                let name = scope.strip_prefix('@').unwrap_or_default();
                p.check(
                    !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._~".contains(c)),
                    || format!("{AT}.npmrc.registries: scope {scope:?} is not an npm scope (@name)"),
                );
            }
            // npm keys credentials by the URL with its trailing slash.
            let url = if r.url.ends_with('/') {
                r.url.clone()
            } else {
                format!("{}/", r.url)
            };
            NpmRegistry {
                url,
                scope: r.scope.clone(),
            }
        })
        .collect()
}

/// `scheme://host[:port]` and the path (without a trailing `/`) of an http(s) URL that carries
/// no credentials, query or fragment.
fn origin(text: &str) -> Option<(String, String)> {
    let url = url::Url::parse(text).ok()?;
    let plain = matches!(url.scheme(), "https" | "http")
        && url.host_str().is_some()
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none()
        && !text.chars().any(|c| c.is_whitespace() || c.is_control());
    if !plain {
        return None;
    }
    let origin = url.origin().ascii_serialization();
    Some((origin, url.path().trim_end_matches('/').to_string()))
}

/// An Argo CD repository URL: http(s), or an OCI reference (`HOST/PATH`), which Argo CD takes
/// without a scheme.
fn is_url_or_oci(text: &str) -> bool {
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    origin(text).is_some()
        || text
            .strip_prefix("oci://")
            .unwrap_or(text)
            .split_once('/')
            .is_some_and(|(host, path)| is_host(host, true) && !path.is_empty())
}

/// A host name (or IP address), with a port where `port` allows one.
fn is_host(host: &str, port: bool) -> bool {
    let (name, port_text) = match host.rsplit_once(':') {
        Some((name, p)) if port => (name, p),
        _ => (host, "1"),
    };
    port_text.parse::<u16>().is_ok()
        && (is_dns_subdomain(&name.to_ascii_lowercase()) || name.parse::<std::net::IpAddr>().is_ok())
}
