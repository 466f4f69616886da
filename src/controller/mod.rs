//! Wiring: watches, caches, the controller loop and its shared context.

mod dependents;
mod initial_list;
mod own_writes;
mod reconcile;

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, future};
use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        Controller, PredicateConfig, WatchStreamExt,
        controller::{self, Action},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tracing::{info, warn};

use self::{dependents::Dependents, own_writes::OwnWrites};
pub use self::{
    initial_list::InitialList,
    reconcile::{Error, reconcile},
};
use crate::{
    crd::TokenRequest,
    events::{EventRecorder, Reporter},
    fairness::{Fairness, FairnessLimits},
    google::{GoogleClient, GoogleError, IssuedToken},
    metrics::{Metrics, ObjectLabels},
    refresh,
    render::{self, MANAGED_SELECTOR},
    singleflight::SingleFlight,
    source::{Ambient, KeptCredentials},
    validation::Policy,
};

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// Secrets per list page: at most this many whole Secrets are in memory at once while listing
/// (before trimming). Smaller pages cost a relist time: at 10,000 Secrets, 10 a page took 75 s
/// where 500 took 5 s on the benchmark machine.
const SECRET_PAGE_SIZE: u32 = 50;

/// The one field manager for every write the operator makes.
pub const FIELD_MANAGER: &str = "gcp-token-operator";

/// What the reconciler needs; one per watched namespace (or one for all namespaces).
pub struct Context {
    pub client: Client,
    pub google: GoogleClient,
    pub events: EventRecorder,
    pub metrics: Arc<Metrics>,
    pub token_requests: Store<TokenRequest>,
    pub secrets: Store<Secret>,
    /// Secret writes of this controller whose watch events are not to trigger a reconcile.
    pub secret_writes: OwnWrites,
    /// Status and finalizer writes of this controller not yet in the TokenRequest cache.
    pub token_request_writes: OwnWrites,
    pub policy: Arc<Policy>,
    pub ambient: Ambient,
    pub exchanges: Exchanges,
    /// When this controller started (or this replica took over): refreshes overdue then are spread.
    pub started_at: Timestamp,
    pub refresh_spread: Duration,
}

/// Calls to Google shared across TokenRequests (and namespaces): one per operator.
#[derive(Clone, Default)]
pub struct Exchanges {
    /// Credentials the operator minted from credential files or its own identity.
    pub kept: KeptCredentials,
    /// Flow calls in flight.
    pub flows: SingleFlight<IssuedToken, GoogleError>,
    /// Admission of mints per namespace, in front of these calls and the writes that follow.
    pub fairness: Fairness,
}

pub struct Settings {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    pub concurrency: u16,
    /// The window over which refreshes overdue at start are spread.
    pub refresh_spread: Duration,
    /// Reported as the Events' reporting instance (the pod name in a cluster).
    pub instance: String,
    pub policy: Policy,
    pub ambient: Ambient,
    pub fairness: FairnessLimits,
    pub initial_list: InitialList,
}

/// Fails early, with a hint, when the CRD is not installed.
pub async fn check_crd(client: &Client, namespaces: &[String]) -> Result<(), kube::Error> {
    let api: Api<TokenRequest> = match namespaces.first() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    api.list_metadata(&ListParams::default().limit(1)).await.map(|_| ())
}

/// Runs one controller per watched namespace until a shutdown signal. `ready` turns true once
/// every cache has synced.
pub async fn run(
    client: Client,
    google: GoogleClient,
    metrics: Arc<Metrics>,
    settings: Settings,
    ready: Arc<AtomicBool>,
) {
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let sync = Arc::new(SyncTracker {
        pending: AtomicUsize::new(2 * scopes.len()),
        ready,
    });
    let exchanges = Exchanges {
        fairness: Fairness::new(settings.fairness),
        ..Exchanges::default()
    };
    let streams = settings.initial_list.streams(&client, scopes[0].as_deref()).await;
    let controllers = scopes.iter().map(|namespace| {
        controller_for(
            &client,
            &google,
            &metrics,
            &settings,
            &exchanges,
            WatchScope {
                namespace: namespace.as_deref(),
                streams,
            },
            &sync,
        )
    });
    future::join_all(controllers).await;
}

/// Counts the watches whose initial list has not completed; `ready` turns true when none is left.
/// (Watching the streams themselves: `Store::wait_until_ready` was seen to miss wake-ups when
/// several tasks waited at once.)
struct SyncTracker {
    pending: AtomicUsize,
    ready: Arc<AtomicBool>,
}

impl SyncTracker {
    /// A callback for one watch stream, counting only its first initial list.
    fn watch<K>(self: &Arc<Self>) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + use<K> {
        let tracker = self.clone();
        let mut done = false;
        move |event| {
            if !done && matches!(event, Ok(watcher::Event::InitDone)) {
                done = true;
                if tracker.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                    tracker.ready.store(true, Ordering::Release);
                    info!("caches synced");
                }
            }
        }
    }
}

fn api_in<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// What one controller watches, and how its watches list.
struct WatchScope<'a> {
    /// `None`: every namespace.
    namespace: Option<&'a str>,
    /// Streaming initial lists (see [`InitialList`]).
    streams: bool,
}

fn controller_for(
    client: &Client,
    google: &GoogleClient,
    metrics: &Arc<Metrics>,
    settings: &Settings,
    exchanges: &Exchanges,
    WatchScope { namespace, streams }: WatchScope<'_>,
    sync: &Arc<SyncTracker>,
) -> impl Future<Output = ()> + use<> {
    let listed = |config: watcher::Config| {
        if streams {
            config.streaming_lists()
        } else {
            config.any_semantic()
        }
    };
    // managedFields is dropped from the caches: it is often larger than the rest of the object.
    let (tr_reader, tr_writer) = reflector::store();
    let token_request_writes = OwnWrites::default();
    let seen = token_request_writes.clone();
    let dependents = Dependents::default();
    let index = dependents.clone();
    let token_requests = watcher(
        api_in::<TokenRequest>(client, namespace),
        listed(watcher::Config::default()),
    )
    .default_backoff()
    .inspect(sync.watch())
    .inspect(move |event| {
        if let Ok(event) = event {
            index.observe(event);
        }
    })
    .modify(|tr| {
        tr.managed_fields_mut().clear();
        // `kubectl apply` keeps the whole object again in this annotation; the reconciler never reads it.
        tr.annotations_mut().remove(LAST_APPLIED);
    })
    .reflect(tr_writer)
    // After the cache has it: a write seen here is one a reconcile no longer waits for.
    .inspect(move |event| {
        if let Ok(watcher::Event::Apply(tr) | watcher::Event::InitApply(tr)) = event {
            seen.is_own(&tr.metadata);
        }
    })
    .applied_objects()
    // The operator's own status writes come back as changes too; each reconcile schedules its
    // own next one, so only what a user changes triggers one.
    .predicate_filter(user_changes, PredicateConfig::default());
    // Only Secrets with the operator's label are watched, never every Secret of the cluster; as
    // anyone can set that label, the cache keeps of each only what it needs (`trim_for_cache`).
    // Small pages (where lists are paged) bound what one list response holds before trimming: a
    // Secret may be 1 MiB.
    let (secret_reader, secret_writer) = reflector::store();
    let secret_writes = OwnWrites::default();
    let own = secret_writes.clone();
    let secrets = watcher(
        api_in::<Secret>(client, namespace),
        listed(
            watcher::Config::default()
                .labels(MANAGED_SELECTOR)
                .page_size(SECRET_PAGE_SIZE),
        ),
    )
    .default_backoff()
    .inspect(sync.watch())
    .modify(render::trim_for_cache)
    .reflect(secret_writer)
    .touched_objects();

    let ctx = Arc::new(Context {
        client: client.clone(),
        google: google.clone(),
        events: EventRecorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: settings.instance.clone(),
            },
        ),
        metrics: metrics.clone(),
        token_requests: tr_reader.clone(),
        secrets: secret_reader.clone(),
        secret_writes,
        token_request_writes,
        policy: Arc::new(settings.policy.clone()),
        ambient: settings.ambient.clone(),
        exchanges: exchanges.clone(),
        started_at: refresh::whole_second(Timestamp::now()),
        refresh_spread: settings.refresh_spread,
    });
    let metrics = metrics.clone();
    Controller::for_stream(token_requests, tr_reader)
        .watches_stream(secrets, move |secret| triggered_by_secret(&dependents, &own, &secret))
        // No debounce: the operator's own writes trigger nothing (above), so a new TokenRequest
        // is reconciled the moment it arrives.
        .with_config(controller::Config::default().concurrency(settings.concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(move |result| {
            match result {
                Ok(_) => {}
                // A deleted TokenRequest: its Secret goes with it (ownerReference), its series too.
                Err(controller::Error::ObjectNotFound(obj)) => metrics.forget(&ObjectLabels {
                    namespace: obj.namespace.unwrap_or_default(),
                    name: obj.name,
                }),
                Err(controller::Error::ReconcilerFailed(e, obj)) => {
                    warn!(object = %obj, error = %e, "reconcile failed")
                }
                Err(e) => warn!(error = %e, "controller error"),
            }
            future::ready(())
        })
}

/// What of a TokenRequest a reconcile acts on besides its status: its spec (the generation),
/// its annotations (a refresh request) and its deletion.
fn user_changes(tr: &TokenRequest) -> Option<u64> {
    let meta = &tr.metadata;
    let mut hasher = DefaultHasher::new();
    (meta.generation, &meta.annotations, meta.deletion_timestamp.is_some()).hash(&mut hasher);
    Some(hasher.finish())
}

/// A change to a managed Secret concerns the TokenRequest that owns it, unless the operator made
/// it, and every TokenRequest that uses that one as its source (so a chain moves on as soon as its
/// upstream has a token).
fn triggered_by_secret(dependents: &Dependents, own: &OwnWrites, secret: &Secret) -> Vec<ObjectRef<TokenRequest>> {
    let Some(namespace) = secret.namespace() else {
        return Vec::new();
    };
    let Some(owner) = render::controller_name(secret) else {
        return Vec::new();
    };
    let owner = ObjectRef::new(owner).within(&namespace);
    let mut refs = dependents.of(&owner);
    if !own.is_own(&secret.metadata) {
        refs.insert(0, owner);
    }
    refs
}

/// Only failures to write status end up here; everything else is handled (and reported in the
/// status) by the reconciler itself.
fn error_policy(tr: Arc<TokenRequest>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.count_error(error.metric_label());
    warn!(namespace = tr.namespace().unwrap_or_default(), name = tr.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5) + Duration::from_millis(fastrand::u64(0..5000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(extra: serde_json::Value) -> TokenRequest {
        let mut object = serde_json::json!({
            "apiVersion": "gcptoken.dev/v1alpha1",
            "kind": "TokenRequest",
            "metadata": {"name": "t", "namespace": "a", "generation": 1, "resourceVersion": "10"},
            "spec": {"flow": {"sts": {"audience": "a"}}, "source": {"serviceAccountToken": {"serviceAccountName": "d"}}},
        });
        json_patch::merge(&mut object, &extra);
        serde_json::from_value(object).unwrap()
    }

    #[test]
    fn only_what_users_change_triggers_a_reconcile() {
        let seen = user_changes(&tr(serde_json::json!({}))).unwrap();
        // The operator's own writes: the status and the finalizer, with new resourceVersions.
        for own in [
            serde_json::json!({"metadata": {"resourceVersion": "11"}, "status": {"failedAttempts": 3}}),
            serde_json::json!({"metadata": {"resourceVersion": "12", "finalizers": ["gcptoken.dev/x"]}}),
        ] {
            assert_eq!(user_changes(&tr(own.clone())), Some(seen), "{own}");
        }
        for users in [
            serde_json::json!({"metadata": {"generation": 2}}),
            serde_json::json!({"metadata": {"annotations": {"gcptoken.dev/refresh-requested-at": "now"}}}),
            serde_json::json!({"metadata": {"deletionTimestamp": "2026-12-01T00:00:00Z"}}),
        ] {
            assert_ne!(user_changes(&tr(users.clone())), Some(seen), "{users}");
        }
    }
}
