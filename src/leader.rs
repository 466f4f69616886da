//! Leader election on a `coordination.k8s.io/v1` Lease (kube-lease-manager): with several
//! replicas only the holder reconciles; the others stand by and take over when its lease lapses.

use std::{future::Future, pin::pin, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::controller::FIELD_MANAGER;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("preparing the Lease {namespace}/{name} failed: {source}")]
    Prepare {
        namespace: String,
        name: String,
        #[source]
        source: LeaseManagerError,
    },
    #[error("the lease manager stopped")]
    ManagerStopped,
}

pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// How long a lease is valid after its last renewal: how long a dead leader blocks takeover.
    pub duration: Duration,
    /// How long before expiry the holder renews.
    pub grace: Duration,
}

/// What ended a term of leadership.
pub enum Outcome<T> {
    /// `work` finished (e.g. on a shutdown signal) while this replica led; the lease is released.
    Finished(T),
    /// The lease was lost: another replica may already be writing, so the caller must stop.
    Lost,
    /// `shutdown` completed while standing by.
    ShutDown,
}

/// Waits for the lease, then runs `work` for as long as the lease is held. `shutdown` ends the
/// wait of a standby; `work` is expected to handle the signal itself once started.
pub async fn run_as_leader<T>(
    client: Client,
    settings: LeaseSettings,
    shutdown: impl Future<Output = ()>,
    work: impl Future<Output = T>,
) -> Result<Outcome<T>, LeaderError> {
    let mut shutdown = pin!(shutdown);
    info!(lease = %settings.name, identity = %settings.identity, "standing by for the lease");
    // A standby's lease manager sleeps until the holder's lease would lapse. A holder that stops
    // releases its lease first, so a released lease is taken at once by starting a new manager,
    // which looks at the lease straight away.
    let (mut leading, lease_task) = loop {
        let (mut leading, lease_task) = manager(&client, &settings).await?.watch().await;
        tokio::select! {
            acquired = wait_for(&mut leading, true) => {
                acquired?;
                break (leading, lease_task);
            }
            () = released(&client, &settings) => {
                drop(leading);
                let _ = lease_task.await;
            }
            () = &mut shutdown => return release(leading, lease_task, Outcome::ShutDown).await,
        }
    };
    info!(identity = %settings.identity, "leading");
    let outcome = tokio::select! {
        result = work => Outcome::Finished(result),
        lost = wait_for(&mut leading, false) => {
            lost?;
            warn!(identity = %settings.identity, "lost the lease; stopping at once");
            Outcome::Lost
        }
    };
    release(leading, lease_task, outcome).await
}

async fn manager(client: &Client, settings: &LeaseSettings) -> Result<LeaseManager, LeaderError> {
    LeaseManagerBuilder::new(client.clone(), &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.duration.as_secs())
        .with_grace(settings.grace.as_secs())
        .with_field_manager(FIELD_MANAGER)
        .build()
        .await
        .map_err(|source| LeaderError::Prepare {
            namespace: settings.namespace.clone(),
            name: settings.name.clone(),
            source,
        })
}

/// Completes when the Lease is seen without a holder.
async fn released(client: &Client, settings: &LeaseSettings) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", settings.name));
    let mut events = pin!(watcher(leases, config).default_backoff().applied_objects());
    while let Some(event) = events.next().await {
        let free = event.is_ok_and(|lease| lease.spec.and_then(|s| s.holder_identity).is_none_or(|h| h.is_empty()));
        if free {
            return;
        }
    }
    std::future::pending().await
}

async fn wait_for(leading: &mut watch::Receiver<bool>, state: bool) -> Result<(), LeaderError> {
    leading
        .wait_for(|l| *l == state)
        .await
        .map(|_| ())
        .map_err(|_| LeaderError::ManagerStopped)
}

/// Closing the channel makes the manager release the lease, so a successor starts at once.
async fn release<T>(
    leading: watch::Receiver<bool>,
    lease_task: tokio::task::JoinHandle<Result<LeaseManager, LeaseManagerError>>,
    outcome: Outcome<T>,
) -> Result<Outcome<T>, LeaderError> {
    drop(leading);
    match lease_task.await {
        Ok(Ok(_)) => info!("lease released"),
        Ok(Err(e)) => warn!(error = %e, "releasing the lease failed; it lapses on its own"),
        Err(e) => warn!(error = %e, "the lease task failed"),
    }
    Ok(outcome)
}
