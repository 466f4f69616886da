//! The Secret as an `imagePullSecret` of ServiceAccounts (`spec.secret.attachToServiceAccounts`):
//! entries added and removed with JSON patches, recorded in the status, and removed before a
//! deleted TokenRequest goes (its finalizer).

use k8s_openapi::{api::core::v1::ServiceAccount, jiff::Timestamp};
use kube::{
    Api,
    api::{Patch, PatchParams},
    runtime::controller::Action,
};
use tracing::{debug, info, warn};

use super::{Error, Reconciler};
use crate::{
    attachment::{self, Plan},
    controller::FIELD_MANAGER,
    crd::{ATTACHMENT_FINALIZER, ServiceAccountAttachment, TokenRequestStatus, bound},
    events::EventType,
    refresh,
    validation::ValidSpec,
};

/// Attempts at one patch when the ServiceAccount keeps changing under it.
const PATCH_ATTEMPTS: usize = 3;
/// How soon a failed attachment is tried again: soon for what may pass; within a minute for a
/// ServiceAccount applied together with the TokenRequest but not there yet (no watch tells when
/// it comes: watching every ServiceAccount would grow with other people's objects); rarely for a
/// permission an administrator has to grant.
const TRANSIENT_RETRY: std::time::Duration = std::time::Duration::from_secs(30);
const MISSING_ACCOUNT_RETRY: std::time::Duration = std::time::Duration::from_secs(60);
const FORBIDDEN_RETRY: std::time::Duration = std::time::Duration::from_secs(300);

/// Why one entry could not be added or removed.
enum Failed {
    NotFound,
    Forbidden(kube::Error),
    Other(kube::Error),
}

impl Failed {
    fn retry(&self) -> std::time::Duration {
        match self {
            Self::Other(_) => TRANSIENT_RETRY,
            Self::NotFound => MISSING_ACCOUNT_RETRY,
            Self::Forbidden(_) => FORBIDDEN_RETRY,
        }
    }
}

impl From<kube::Error> for Failed {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if s.code == 404 => Self::NotFound,
            kube::Error::Api(s) if s.code == 403 => Self::Forbidden(e),
            _ => Self::Other(e),
        }
    }
}

#[derive(Clone, Copy)]
enum Change {
    Attach,
    Detach,
}

impl Reconciler<'_> {
    /// Brings the ServiceAccounts' entries to what the spec asks and records them in `status`.
    /// With `verify`, every wanted entry is checked, not only the ones not recorded yet. Returns
    /// when to try again after a failure.
    pub(super) async fn attach_to_service_accounts(
        &self,
        spec: &ValidSpec,
        verify: bool,
        status: &mut TokenRequestStatus,
    ) -> Result<Option<Timestamp>, Error> {
        let recorded = std::mem::take(&mut status.attached_service_accounts);
        let Plan { attach, detach } = attachment::plan(&spec.attach_to, &spec.secret.name, &recorded, verify);
        let mut kept: Vec<ServiceAccountAttachment> = recorded.into_iter().filter(|r| !detach.contains(r)).collect();
        if !attach.is_empty() && !self.holds_finalizer() {
            // Before the first entry: a TokenRequest deleted from now on waits for its entries to go.
            self.set_finalizer(true).await?;
        }
        let mut retry: Option<std::time::Duration> = None;
        let mut retry_for = |failed: &Failed| retry = Some(retry.map_or(failed.retry(), |r| r.min(failed.retry())));
        for entry in &detach {
            if let Err(failed) = self.change(Change::Detach, entry).await {
                retry_for(&failed);
                self.report_unless_retry(verify, Change::Detach, entry, &failed).await;
                kept.push(entry.clone());
            }
        }
        for entry in attach {
            match self.change(Change::Attach, &entry).await {
                Ok(()) if !kept.contains(&entry) => kept.push(entry),
                Ok(()) => {}
                Err(failed) => {
                    retry_for(&failed);
                    self.report_unless_retry(verify, Change::Attach, &entry, &failed).await;
                    kept.retain(|k| k != &entry);
                }
            }
        }
        let limit = bound::RECORDED_ATTACHMENTS as usize;
        let (kept, given_up) = attachment::bounded(kept, &spec.attach_to, &spec.secret.name, limit);
        for entry in &given_up {
            let note = format!(
                "Secret {:?} stays listed in ServiceAccount {:?}: removing it failed and the status records at most {limit} attachments; remove it by hand",
                entry.secret, entry.service_account
            );
            warn!(namespace = %self.namespace, name = %self.name, service_account = %entry.service_account, "{note}");
            self.publish(EventType::Warning, "DetachAbandoned", note).await;
        }
        status.attached_service_accounts = kept;
        if status.attached_service_accounts.is_empty() && spec.attach_to.is_empty() && self.holds_finalizer() {
            self.set_finalizer(false).await?;
        }
        Ok(retry.map(|wait| refresh::later(self.now, wait)))
    }

    /// A deleted TokenRequest holding the finalizer: its entries are removed, then it may go.
    /// One whose ServiceAccount or permission is gone cannot be removed, and does not hold the
    /// deletion up (a Warning says so); anything else is retried.
    pub(super) async fn finalize(&self) -> Result<Action, Error> {
        if !self.holds_finalizer() {
            return Ok(Action::await_change());
        }
        for entry in &self.status.attached_service_accounts {
            match self.change(Change::Detach, entry).await {
                Ok(()) | Err(Failed::NotFound) => {}
                Err(failed @ Failed::Forbidden(_)) => self.report(Change::Detach, entry, &failed).await,
                Err(failed @ Failed::Other(_)) => {
                    self.report(Change::Detach, entry, &failed).await;
                    return Ok(Action::requeue(failed.retry()));
                }
            }
        }
        self.set_finalizer(false).await?;
        Ok(Action::await_change())
    }

    fn holds_finalizer(&self) -> bool {
        self.tr
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == ATTACHMENT_FINALIZER)
    }

    /// finalizers is a set (`+listType=set`): an apply under the operator's field manager holds or
    /// drops its one item and leaves the others' alone.
    async fn set_finalizer(&self, held: bool) -> Result<(), Error> {
        let finalizers: &[&str] = if held { &[ATTACHMENT_FINALIZER] } else { &[] };
        let patch = serde_json::json!({
            "apiVersion": "gcptoken.dev/v1alpha1",
            "kind": "TokenRequest",
            "metadata": { "name": self.name, "finalizers": finalizers },
        });
        let written = self
            .api::<crate::crd::TokenRequest>()
            .patch(&self.name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&patch))
            .await
            .map_err(Error::PatchFinalizer)?;
        self.record_write(&written);
        Ok(())
    }

    /// Adds or removes one entry, reading the ServiceAccount again when it changed in between.
    async fn change(&self, change: Change, entry: &ServiceAccountAttachment) -> Result<(), Failed> {
        let api = self.api::<ServiceAccount>();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let account = match api.get(&entry.service_account).await {
                Ok(account) => account,
                Err(e) => match (change, Failed::from(e)) {
                    (Change::Detach, Failed::NotFound) => return Ok(()),
                    (_, failed) => return Err(failed),
                },
            };
            let patch = match change {
                Change::Attach => attachment::attach_patch(&account, &entry.secret),
                Change::Detach => attachment::detach_patch(&account, &entry.secret),
            };
            let Some(patch) = patch else { return Ok(()) };
            match api
                .patch(
                    &entry.service_account,
                    &PatchParams::default(),
                    &Patch::<()>::Json(patch),
                )
                .await
            {
                Ok(_) => {
                    let verb = match change {
                        Change::Attach => "attached to",
                        Change::Detach => "detached from",
                    };
                    info!(namespace = %self.namespace, name = %self.name, service_account = %entry.service_account,
                          secret = %entry.secret, "pull secret {verb} service account");
                    return Ok(());
                }
                // The `test` of the resourceVersion failed: someone changed it since it was read.
                Err(kube::Error::Api(s)) if (s.code == 422 || s.code == 409) && attempt < PATCH_ATTEMPTS => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A failure is reported with a new token or spec (`fresh`); the retries in between (every
    /// minute while a ServiceAccount is missing) only log at debug level, so that a lasting
    /// failure makes one Warning per token, not one per retry.
    async fn report_unless_retry(
        &self,
        fresh: bool,
        change: Change,
        entry: &ServiceAccountAttachment,
        failed: &Failed,
    ) {
        if fresh {
            self.report(change, entry, failed).await;
        } else {
            debug!(namespace = %self.namespace, name = %self.name, service_account = %entry.service_account,
                   "attachment still failing; retried");
        }
    }

    async fn report(&self, change: Change, entry: &ServiceAccountAttachment, failed: &Failed) {
        let (reason, what) = match change {
            Change::Attach => ("AttachFailed", "attaching Secret {s} to ServiceAccount {a}"),
            Change::Detach => ("DetachFailed", "detaching Secret {s} from ServiceAccount {a}"),
        };
        let account = &entry.service_account;
        let what = what
            .replace("{s}", &format!("{:?}", entry.secret))
            .replace("{a}", &format!("{account:?}"));
        let note = match failed {
            Failed::NotFound => format!("{what} failed: the ServiceAccount does not exist"),
            Failed::Forbidden(e) => {
                format!("{what} is forbidden (the operator needs get and patch on serviceaccounts): {e}")
            }
            Failed::Other(e) => format!("{what} failed: {e}"),
        };
        warn!(namespace = %self.namespace, name = %self.name, service_account = %account, "{note}");
        self.publish(EventType::Warning, reason, note).await;
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.ctx.client.clone(), &self.namespace)
    }
}
