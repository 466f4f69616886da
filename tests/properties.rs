//! Property tests over the pure core: whatever a tenant writes into a TokenRequest or a Secret,
//! and whatever Google answers, validation, refresh and backoff math, rendering and the Secret
//! cache neither panic nor break their invariants. Bounded case counts keep CI fast
//! (256 each; `PROPTEST_CASES` raises them).

use std::time::Duration;

use gcp_token_operator::{
    crd::{TokenRequest, TokenRequestSpec},
    names,
    refresh::{self, ErrorClass, MAX_DELAY, MAX_RETRY_AFTER, MIN_DELAY},
    render::{self, MAX_CACHED_SECRET, MAX_SECRET_DATA, TokenRecord},
    status,
    validation::{Placement, Policy, RefreshPolicy, RenewBefore, validate},
};
use k8s_openapi::{ByteString, api::core::v1::Secret, jiff::Timestamp};
use kube::ResourceExt;
use proptest::prelude::*;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

/// Strings as a tenant writes them: empty, ordinary, absurd (control characters, non-ASCII,
/// path characters), numbers too large for any integer, and long ones up to 64 KiB.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9.-]{1,80}",
        "\\PC{0,40}",
        "[0-9]{15,30}(s|m|h|d|ms|days|y)",
        "[./?#%\\\\ @:a-z]{0,40}",
        (1usize..65_536, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n)),
    ]
}

/// Mostly `good`, sometimes hostile: so that specs get past the first problem and reach the
/// later checks, and some are valid.
fn or_hostile(good: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![8 => Just(good.to_string()), 1 => hostile_string()]
}

fn duration_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[1-9][0-9]?(m|h)",
        1 => "[1-9][0-9]{0,2}(s|m|h)",
        1 => "[0-9]{1,25}(ns|us|ms|s|m|min|h|d|days|w|y)",
        1 => Just("18446744073709551615s".to_string()),
        1 => Just("10000000000y".to_string()),
        1 => hostile_string(),
    ]
}

fn maybe<T: std::fmt::Debug + Clone>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    prop::option::weighted(0.25, s)
}

/// A TokenRequest spec as JSON, with every field drawn from hostile values.
fn spec_json() -> impl Strategy<Value = Value> {
    let flow = prop_oneof![
        (or_hostile("//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k"),
            prop::collection::vec(or_hostile("https://www.googleapis.com/auth/cloud-platform"), 0..4), maybe(duration_text()))
            .prop_map(|(audience, scopes, lifetime)| json!({"sts": {"audience": audience, "scopes": scopes,
                "serviceAccountImpersonation": {"serviceAccount": "a@b.iam.gserviceaccount.com", "lifetime": lifetime}}})),
        (or_hostile("sa@proj.iam.gserviceaccount.com"),
            prop::collection::vec(or_hostile("d@proj.iam.gserviceaccount.com"), 0..4), maybe(duration_text()))
            .prop_map(|(account, delegates, lifetime)| json!({"impersonation": {"serviceAccount": account,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"], "delegates": delegates, "lifetime": lifetime}})),
        or_hostile("projects/p/locations/l/accountConnectors/c").prop_map(|c| json!({"developerConnect": {"accountConnector": c}})),
        or_hostile("projects/p/locations/global/collections/c/dataConnector").prop_map(|c| json!({"discoveryEngine": {"dataConnector": c}})),
    ];
    let source = prop_oneof![
        (or_hostile("caller"), or_hostile("token"))
            .prop_map(|(name, key)| json!({"secret": {"name": name, "key": key}})),
        (or_hostile("default"), prop_oneof![Just(3600i64), any::<i64>()])
            .prop_map(|(name, e)| json!({"serviceAccountToken": {"serviceAccountName": name, "expirationSeconds": e}})),
        or_hostile("upstream").prop_map(|name| json!({"tokenRequest": {"name": name}})),
    ];
    let refresh = (maybe(any::<u8>()), maybe(duration_text()), maybe(duration_text()))
        .prop_filter("mostly one of the two", |(p, b, _)| p.is_none() || b.is_none()).prop_map(|(pct, before, unknown)| {
        json!({"renewBeforePercentage": pct, "renewBefore": before, "lifetimeWhenUnknown": unknown})
    });
    let secret = (
        maybe(or_hostile("out")),
        any::<bool>(),
        prop::collection::vec(or_hostile("gcr.io"), 1..4),
        maybe(or_hostile("token")),
        prop::collection::btree_map(or_hostile("team"), or_hostile("a"), 0..3),
    )
        .prop_map(|(name, docker, registries, key, labels)| match docker {
            true => json!({"name": name, "type": "kubernetes.io/dockerconfigjson", "registries": registries,
                "labels": labels, "annotations": labels}),
            false => json!({"name": name, "tokenKey": key, "labels": labels, "annotations": labels}),
        });
    (flow, source, refresh, secret, maybe(duration_text())).prop_map(|(flow, source, refresh, secret, interval)| {
        json!({"flow": flow, "source": source, "refresh": refresh, "secret": secret,
            "rolloutRestartTargets": [{"kind": "Deployment", "name": "app"}], "rolloutRestartMinInterval": interval})
    })
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        (Timestamp::MIN.as_second()..=Timestamp::MAX.as_second()).prop_map(|s| Timestamp::from_second(s).unwrap()),
        (1_700_000_000i64..1_900_000_000).prop_map(|s| Timestamp::from_second(s).unwrap()),
        Just(Timestamp::MAX),
        Just(Timestamp::MIN),
    ]
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0u64..100_000).prop_map(Duration::from_secs),
        any::<u64>().prop_map(Duration::from_secs),
        Just(Duration::MAX),
        Just(Duration::ZERO),
    ]
}

fn policy() -> impl Strategy<Value = RefreshPolicy> {
    (
        prop_oneof![
            any::<u8>().prop_map(RenewBefore::Percentage),
            duration().prop_map(RenewBefore::Absolute)
        ],
        duration(),
    )
        .prop_map(|(renew_before, lifetime_when_unknown)| RefreshPolicy {
            renew_before,
            lifetime_when_unknown,
        })
}

/// `spec.secret.format` as a tenant might write it: each member, with hostile values mixed in.
fn format_json() -> impl Strategy<Value = Value> {
    let urls = || prop::collection::vec(or_hostile("https://github.com/demo-org"), 0..4);
    let username = || maybe(or_hostile("x-access-token"));
    let template = prop_oneof![
        Just("{{ token }}".to_string()),
        Just(
            "{\"t\": {{ token | tojson }}, \"u\": {{ username | tojson }}, \"s\": {{ scopes | join(' ') | tojson }}}"
                .to_string()
        ),
        Just("{% for s in scopes %}{{ s | upper }}{% endfor %}{{ expires_at }}".to_string()),
        "[{}%# a-z|'()~.]{0,60}",
        hostile_string(),
    ];
    prop_oneof![
        (username(), urls(), urls()).prop_map(|(u, git, docker)| json!({"basicAuth": {"username": u, "tekton": {"git": git, "docker": docker}}})),
        (username(), any::<bool>()).prop_map(|(u, bearer)| if bearer {
            json!({"flux": {"auth": "bearer"}})
        } else {
            json!({"flux": {"username": u}})
        }),
        (or_hostile("https://github.com/demo-org"), maybe(hostile_string()), username())
            .prop_map(|(url, project, u)| json!({"argoCD": {"secretType": "repoCreds", "url": url, "project": project, "username": u}})),
        (urls(), username()).prop_map(|(urls, u)| json!({"gitCredentials": {"urls": urls, "username": u}})),
        (prop::collection::vec(or_hostile("us-go.pkg.dev"), 0..4), username())
            .prop_map(|(hosts, u)| json!({"netrc": {"hosts": hosts, "username": u}})),
        (or_hostile("https://us-npm.pkg.dev/p/r/"), maybe(or_hostile("@demo")))
            .prop_map(|(url, scope)| json!({"npmrc": {"registries": [{"url": url, "scope": scope}]}})),
        (or_hostile("config.json"), template.clone(), template)
            .prop_map(|(key, data, annotation)| json!({"template": {"data": {key: data}, "annotations": {"example.com/a": annotation}}})),
    ]
}

fn token_request(spec: TokenRequestSpec) -> TokenRequest {
    let mut tr = TokenRequest::new("tr", spec);
    tr.metadata.namespace = Some("ns".into());
    tr.metadata.uid = Some("uid-1".into());
    tr
}

// proptest's default: 256 cases, or `PROPTEST_CASES`.
proptest! {
    /// Any spec is either valid, with every duration inside its documented bounds, or
    /// InvalidSpec with a message of bounded size; validation never panics.
    #[test]
    fn validation_never_panics_and_keeps_its_bounds(value in spec_json()) {
        let spec: TokenRequestSpec = serde_json::from_value(value).expect("every generated spec deserializes");
        let at = Placement { namespace: "ns", name: "tr", policy: &Policy::default() };
        match validate(&spec, &at) {
            Ok(valid) => {
                if let RenewBefore::Absolute(d) = valid.refresh.renew_before {
                    prop_assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(12 * 3600));
                }
                let unknown = valid.refresh.lifetime_when_unknown;
                prop_assert!(unknown >= Duration::from_secs(60) && unknown <= Duration::from_secs(12 * 3600));
                prop_assert!(valid.rollout.min_interval <= Duration::from_secs(24 * 3600));
                prop_assert!(valid.flow.max_lifetime() <= Duration::from_secs(25 * 3600));
            }
            Err(invalid) => {
                prop_assert!(!invalid.problems.is_empty());
                let message = status::bounded(invalid.to_string());
                prop_assert!(message.len() <= status::MAX_MESSAGE);
            }
        }
    }

    /// A refresh point lies between issue and expiry, whatever the policy and the times.
    #[test]
    fn a_refresh_point_is_never_after_the_expiry(
        issued in timestamp(), expires in timestamp(), policy in policy(), key in "\\PC{0,20}",
        started in timestamp(), window in duration(),
    ) {
        let at = refresh::refresh_point(issued, expires, &policy, &key);
        if expires >= issued {
            prop_assert!(at <= expires, "{at} after {expires}");
            prop_assert!(at >= refresh::whole_second(issued));
        }
        let caught_up = refresh::catch_up_point(at, expires, started, window, &key);
        prop_assert!(caught_up >= at);
        let _ = refresh::assumed_expiry(issued, &policy);
    }

    /// A backoff is never zero nor beyond its cap, whatever the attempt count, Retry-After,
    /// remaining validity or random draw (including NaN).
    #[test]
    fn a_backoff_is_positive_and_bounded(
        attempt in any::<u32>(), permanent in any::<bool>(), retry_after in maybe(duration()),
        now in timestamp(), valid_until in maybe(timestamp()), random in any::<f64>(),
    ) {
        let class = if permanent { ErrorClass::Permanent } else { ErrorClass::Transient };
        let delay = refresh::retry_delay(attempt, class, retry_after, now, valid_until, random);
        prop_assert!(delay >= MIN_DELAY);
        prop_assert!(delay <= MAX_RETRY_AFTER.max(Duration::from_secs(36 * 60)), "{delay:?}");
        let next = refresh::next_whole_second(refresh::later(now, delay));
        prop_assert!(next >= now);
        let wait = refresh::delay_until(now, next);
        prop_assert!((MIN_DELAY..=MAX_DELAY).contains(&wait));
    }

    /// Whatever Google answers (any token, any expiry), the operator stores it only if it is
    /// usable, and a rendered Secret never exceeds what Kubernetes allows.
    #[test]
    fn issued_tokens_are_judged_and_secrets_stay_under_the_limit(
        token_len in prop_oneof![0usize..64, 0usize..40_000], expires in timestamp(), now in timestamp(),
        longest in duration(), registries in 0usize..65, docker in any::<bool>(),
    ) {
        let record = TokenRecord {
            username: None,
            token: SecretString::from("t".repeat(token_len)),
            issued_at: now,
            expires_at: expires,
            scopes: vec![],
        };
        let judged = render::check_issued(&record, now, longest);
        if judged.is_ok() {
            prop_assert!(token_len <= render::MAX_TOKEN_BYTES);
            prop_assert!(expires > now);
        }
        let registries: Vec<String> = (0..registries).map(|i| format!("r{i}.pkg.dev")).collect();
        let spec: TokenRequestSpec = serde_json::from_value(json!({
            "flow": {"impersonation": {"serviceAccount": "a@b.iam.gserviceaccount.com", "scopes": ["s"]}},
            "source": {"secret": {"name": "caller", "key": "token"}},
            "secret": if docker {
                json!({"type": "kubernetes.io/dockerconfigjson", "registries": registries})
            } else {
                json!({})
            },
        })).unwrap();
        let tr = token_request(spec);
        let at = Placement { namespace: "ns", name: "tr", policy: &Policy::default() };
        let Ok(valid) = validate(&tr.spec, &at) else { return Ok(()) };
        if let Ok(secret) = render::desired_secret(&tr, &valid, &record, None) {
            let bytes: usize = secret.data.iter().flatten().map(|(k, v)| k.len() + v.0.len()).sum();
            prop_assert!(bytes <= MAX_SECRET_DATA);
            prop_assert!(secret.labels()[render::TOKEN_REQUEST_LABEL].len() <= 63);
        }
    }

    /// Anything in a Secret (a tenant's, or one of the operator's edited): reading a token back
    /// never panics, and the cache keeps at most a bounded amount of it.
    #[test]
    fn any_secret_reads_back_safely_and_is_cached_bounded(
        data in prop::collection::btree_map(hostile_string(), prop::collection::vec(any::<u8>(), 0..2048), 0..6),
        blob in 0usize..300_000,
        annotations in prop::collection::btree_map(hostile_string(), hostile_string(), 0..4),
        owned in any::<bool>(), docker in any::<bool>(),
    ) {
        let mut secret: Secret = serde_json::from_value(json!({"metadata": {"name": "tr", "namespace": "ns"}})).unwrap();
        let mut data: std::collections::BTreeMap<String, ByteString> =
            data.into_iter().map(|(k, v)| (k, ByteString(v))).collect();
        data.insert("blob".into(), ByteString(vec![b'x'; blob]));
        secret.data = Some(data);
        secret.metadata.annotations = Some(annotations);
        let spec: TokenRequestSpec = serde_json::from_value(json!({
            "flow": {"impersonation": {"serviceAccount": "a@b.iam.gserviceaccount.com", "scopes": ["s"]}},
            "source": {"secret": {"name": "caller", "key": "token"}},
            "secret": if docker { json!({"type": "kubernetes.io/dockerconfigjson", "registries": ["gcr.io"]}) } else { json!({}) },
        })).unwrap();
        let tr = token_request(spec);
        if owned {
            secret.metadata.owner_references = Some(vec![kube::Resource::controller_owner_ref(&tr, &()).unwrap()]);
        }
        let at = Placement { namespace: "ns", name: "tr", policy: &Policy::default() };
        let valid = validate(&tr.spec, &at).unwrap();
        let _ = render::stored_token(&secret, &valid.secret);
        render::trim_for_cache(&mut secret);
        let kept: usize = secret.data.iter().flatten().map(|(k, v)| k.len() + v.0.len()).sum::<usize>()
            + secret.metadata.annotations.iter().flatten().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        prop_assert!(kept <= MAX_CACHED_SECRET, "{kept}");
        if !owned {
            prop_assert!(secret.data.is_none() && secret.metadata.annotations.is_none());
        }
    }

    /// Any format a tenant writes is valid or InvalidSpec; a valid one renders any token Google
    /// could return into a Secret under the limit from which the same token is read back (one
    /// that could not be read back would be minted again at every reconcile), or refuses it.
    #[test]
    fn any_format_renders_a_token_it_reads_back_or_refuses_it(
        format in format_json(), flow in prop_oneof![Just("impersonation"), Just("repository"), Just("developerConnect")],
        token in prop_oneof![4 => "[A-Za-z0-9._-]{1,300}", 1 => "\\PC{1,64}", 1 => hostile_string()],
        username in maybe(hostile_string()),
    ) {
        let flow = match flow {
            "impersonation" => json!({"impersonation": {"serviceAccount": "a@b.iam.gserviceaccount.com", "scopes": ["s"]}}),
            "repository" => json!({"developerConnectRepository": {"gitRepositoryLink": "projects/p/locations/l/connections/c/gitRepositoryLinks/r"}}),
            _ => json!({"developerConnect": {"accountConnector": "projects/p/locations/l/accountConnectors/c"}}),
        };
        let Ok(spec) = serde_json::from_value::<TokenRequestSpec>(json!({
            "flow": flow, "source": {"secret": {"name": "caller", "key": "token"}}, "secret": {"format": format},
        })) else { return Ok(()) };
        let tr = token_request(spec);
        let at = Placement { namespace: "ns", name: "tr", policy: &Policy::default() };
        let Ok(valid) = validate(&tr.spec, &at) else { return Ok(()) };
        let now = Timestamp::now();
        let record = TokenRecord {
            token: SecretString::from(token.clone()),
            issued_at: now,
            expires_at: refresh::later(now, Duration::from_secs(3600)),
            scopes: vec!["s".into()],
            username,
        };
        if render::check_issued(&record, now, Duration::from_secs(7200)).is_err() {
            return Ok(());
        }
        if let Ok(secret) = render::desired_secret(&tr, &valid, &record, None) {
            let bytes: usize = secret.data.iter().flatten().map(|(k, v)| k.len() + v.0.len()).sum();
            prop_assert!(bytes <= MAX_SECRET_DATA);
            let stored = render::stored_token(&secret, &valid.secret).expect("the token is read back");
            prop_assert_eq!(stored.record.token.expose_secret(), token.as_str());
        }
    }

    /// Names fitted into labels stay valid label values and tell names apart.
    #[test]
    fn fitted_names_are_label_values(name in "[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", other in "[a-z0-9]{1,253}") {
        let fitted = names::fit_63(&name);
        prop_assert!(fitted.len() <= 63);
        prop_assert!(fitted.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
        prop_assert!(fitted.starts_with(|c: char| c.is_ascii_alphanumeric()));
        prop_assert!(fitted.ends_with(|c: char| c.is_ascii_alphanumeric()));
        if name != other {
            prop_assert_ne!(fitted, names::fit_63(&other));
        }
    }

    /// Messages and notes never exceed the bound, for any text.
    #[test]
    fn messages_are_bounded(text in prop_oneof!["\\PC{0,2000}", (0usize..2_000_000).prop_map(|n| "é".repeat(n / 2))]) {
        prop_assert!(status::bounded(text).len() <= status::MAX_MESSAGE);
    }
}
