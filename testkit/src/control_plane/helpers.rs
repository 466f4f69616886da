//! Helpers for tests against a control plane: namespaces, ServiceAccounts and their tokens, waiting
//! for objects with useful diagnostics, and CRDs.

use std::fmt::Debug;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Event, Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{Condition as _, conditions};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Field manager of the objects the test kit applies.
const FIELD_MANAGER: &str = "gcp-token-operator-testkit";

/// Creates a namespace named `PREFIX-<random>` and returns its name. Also makes sure its `default`
/// ServiceAccount exists, so tests need not wait for kube-controller-manager to create it.
pub async fn create_namespace(client: &Client, prefix: &str) -> anyhow::Result<String> {
    let name = format!("{prefix}-{:08x}", fastrand::u32(..));
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    match create_service_account(client, &name, "default").await {
        // kube-controller-manager was faster.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        result => {
            result.with_context(|| format!("creating ServiceAccount {name}/default"))?;
        }
    }
    Ok(name)
}

pub async fn create_service_account(client: &Client, namespace: &str, name: &str) -> kube::Result<ServiceAccount> {
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &account)
        .await
}

/// Mints a token for ServiceAccount `namespace/name` through the TokenRequest API and returns it
/// with its expiry. No `audiences` means the apiserver's own audience.
pub async fn mint_token(
    client: &Client,
    namespace: &str,
    name: &str,
    audiences: &[&str],
    expiration_seconds: i64,
) -> anyhow::Result<(String, Time)> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(audiences.iter().map(|&audience| audience.to_owned()).collect()),
            expiration_seconds: Some(expiration_seconds),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let response = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?;
    let status = response.status.context("the TokenRequest response has no status")?;
    let token = status.token.context("the TokenRequest response has no token")?;
    let expiry = status
        .expiration_timestamp
        .context("the TokenRequest response has no expiry")?;
    Ok((token, expiry))
}

/// Watches object `name` until `predicate` holds for it and returns it. On timeout the error says
/// what was awaited (`description`) and shows the object as YAML, the namespace's events about it,
/// and `diagnostics()` (for instance the operator's log).
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    description: &str,
    predicate: impl Fn(&K) -> bool,
    diagnostics: &dyn Fn() -> String,
) -> Result<K, String>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    let found = wait_until(
        api,
        name,
        timeout,
        description,
        |object: Option<&K>| object.is_some_and(&predicate),
        diagnostics,
    )
    .await?;
    Ok(found.expect("the condition only holds for an existing object"))
}

/// Watches object `name` until it no longer exists; errors like [`wait_for`].
pub async fn wait_for_deletion<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    diagnostics: &dyn Fn() -> String,
) -> Result<(), String>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    wait_until(
        api,
        name,
        timeout,
        "deletion",
        |object: Option<&K>| object.is_none(),
        diagnostics,
    )
    .await
    .map(drop)
}

async fn wait_until<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    description: &str,
    condition: impl Fn(Option<&K>) -> bool,
    diagnostics: &dyn Fn() -> String,
) -> Result<Option<K>, String>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    // Watch errors (say, while kube-apiserver restarts) are retried with backoff; the last one is
    // reported if time runs out.
    let mut last_error = None;
    let watch = async {
        let mut updates = std::pin::pin!(watcher::watch_object(api.clone(), name).default_backoff());
        while let Some(update) = updates.next().await {
            match update {
                Ok(object) if condition(object.as_ref()) => return Some(object),
                Ok(_) => {}
                Err(error) => last_error = Some(error.to_string()),
            }
        }
        None
    };
    if let Ok(Some(object)) = tokio::time::timeout(timeout, watch).await {
        return Ok(object);
    }
    let mut report = format!(
        "timed out after {timeout:?} waiting for {description} of {} {name}\n",
        K::kind(&K::DynamicType::default()),
    );
    if let Some(error) = last_error {
        report += &format!("last watch error: {error}\n");
    }
    report += &format!("--- object ---\n{}", object_yaml(api, name).await);
    if let Some(namespace) = api.namespace() {
        let client = api.clone().into_client();
        report += &format!("--- events ---\n{}", events(client, namespace, name).await);
    }
    report += &format!("--- diagnostics ---\n{}", diagnostics());
    Err(report)
}

async fn object_yaml<K>(api: &Api<K>, name: &str) -> String
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let object = match api.get_opt(name).await {
        Ok(Some(object)) => object,
        Ok(None) => return "(not found)\n".to_owned(),
        Err(error) => return format!("(cannot get it: {error})\n"),
    };
    let mut value = serde_json::to_value(object).expect("API objects serialize to JSON");
    if let Some(metadata) = value.get_mut("metadata").and_then(serde_json::Value::as_object_mut) {
        metadata.remove("managedFields");
    }
    serde_saphyr::to_string(&value).unwrap_or_else(|error| format!("(cannot render: {error})\n"))
}

async fn events(client: Client, namespace: &str, name: &str) -> String {
    let about = ListParams::default().fields(&format!("involvedObject.name={name}"));
    match Api::<Event>::namespaced(client, namespace).list(&about).await {
        Ok(list) if list.items.is_empty() => "(none)\n".to_owned(),
        Ok(list) => list
            .items
            .iter()
            .map(|event| {
                format!(
                    "{} {}: {} (x{})\n",
                    event.type_.as_deref().unwrap_or("?"),
                    event.reason.as_deref().unwrap_or("?"),
                    event.message.as_deref().unwrap_or(""),
                    event.count.unwrap_or(1),
                )
            })
            .collect(),
        Err(error) => format!("(cannot list them: {error})\n"),
    }
}

/// Server-side applies `crds` as they are, CEL rules included (the apiserver compiles them and
/// checks their cost), and waits until each is Established.
pub async fn apply_crds(client: &Client, crds: &[CustomResourceDefinition]) -> anyhow::Result<()> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in crds {
        let name = crd.metadata.name.as_deref().context("a CRD has no name")?;
        api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(crd))
            .await
            .with_context(|| format!("applying CRD {name}"))?;
    }
    for crd in crds {
        let name = crd.metadata.name.as_deref().unwrap_or_default();
        let established = conditions::is_crd_established();
        wait_for(
            &api,
            name,
            Duration::from_secs(30),
            "Established",
            |crd| established.matches_object(Some(crd)),
            &String::new,
        )
        .await
        .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}
