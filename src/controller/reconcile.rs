//! One reconcile of one TokenRequest: decide whether the held token is good, mint a new one when
//! it is not, write the Secret and the status.

mod attachments;

use std::{panic::AssertUnwindSafe, sync::Arc, time::Instant};

use futures::FutureExt;

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        core::v1::Secret,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{controller::Action, reflector::ObjectRef},
};
use secrecy::{ExposeSecret, SecretString};
use tracing::{debug, error, info, warn};

use super::{Context, FIELD_MANAGER};
use crate::{
    crd::{TokenRequest, TokenRequestStatus, WorkloadKind, bound},
    events::{Event, EventType},
    fairness::Permit,
    google::{GoogleError, IssuedToken},
    metrics::ObjectLabels,
    refresh::{self, ErrorClass},
    render::{self, PreviousToken, StoredToken, TokenRecord, Unusable},
    rollout::{self, Step},
    singleflight::Key,
    source::{SourceError, Sources},
    status::{self, Reason},
    validation::{Flow, IdTokenParams, Placement, ValidSpec, caller_scopes, validate},
};

/// How soon a failed rollout restart is tried again.
const ROLLOUT_RETRY: std::time::Duration = std::time::Duration::from_secs(30);
/// How soon a reconcile that found the cache behind the operator's own write looks again.
const CACHE_CATCH_UP: std::time::Duration = std::time::Duration::from_millis(100);
/// The least time between two mints a refresh request causes for one TokenRequest.
pub const REFRESH_REQUEST_FLOOR: std::time::Duration = std::time::Duration::from_secs(10);

/// Failures that end a reconcile without a status written; retried by the error policy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the status failed: {0}")]
    PatchStatus(#[source] kube::Error),
    #[error("updating the TokenRequest's finalizer failed: {0}")]
    PatchFinalizer(#[source] kube::Error),
    #[error("reading Secret {name:?} failed: {source}")]
    ReadSecret {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::PatchStatus(_) => "PatchStatus",
            Self::PatchFinalizer(_) => "PatchFinalizer",
            Self::ReadSecret { .. } => "ReadSecret",
        }
    }
}

/// Why an attempt to obtain and store a token failed. Source and Google failures may be shared by
/// several TokenRequests (single-flight), hence the `Arc`s.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("source: {0}")]
    Source(#[from] Arc<SourceError>),
    #[error(transparent)]
    Google(#[from] Arc<GoogleError>),
    #[error(transparent)]
    Unusable(#[from] Unusable),
    #[error("writing Secret {name:?} failed: {source}")]
    ApplySecret {
        name: String,
        #[source]
        source: kube::Error,
    },
    /// A Secret of the target name appeared that is not this TokenRequest's: left untouched.
    #[error("Secret {name} exists and is not owned by this TokenRequest; it is left untouched")]
    SecretTaken { name: String },
    #[error("Secret {name:?} was deleted while being written; it is created again")]
    SecretGone { name: String },
    /// The Secret could not be changed in place (its type is immutable, or it was made immutable)
    /// and deleting it to create it anew failed.
    #[error("replacing Secret {name:?} failed: {source}")]
    ReplaceSecret {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Failure {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Source(e) => e.class(),
            Self::Google(e) => e.class(),
            // Google's answers do not get better within seconds, and a clock is not fixed that fast.
            Self::Unusable(_) => ErrorClass::Permanent,
            Self::ApplySecret {
                source: kube::Error::Api(s),
                ..
            }
            | Self::ReplaceSecret {
                source: kube::Error::Api(s),
                ..
            } if s.code < 500 && s.code != 429 && s.code != 409 => ErrorClass::Permanent,
            Self::ApplySecret { .. } | Self::ReplaceSecret { .. } | Self::SecretGone { .. } => ErrorClass::Transient,
            Self::SecretTaken { .. } => ErrorClass::Permanent,
        }
    }

    fn reason(&self) -> Reason {
        match self {
            Self::Source(e) => e.reason(),
            Self::Google(e) => e.reason(),
            Self::Unusable(_) => Reason::UnusableToken,
            Self::ApplySecret { .. } | Self::ReplaceSecret { .. } | Self::SecretGone { .. } => Reason::ApiError,
            Self::SecretTaken { .. } => Reason::SecretConflict,
        }
    }

    /// Held back by the operator's own rate limit: come back then, with nothing to report.
    fn throttled(&self) -> Option<std::time::Duration> {
        match self {
            Self::Source(e) => e.throttled(),
            Self::Google(e) => e.throttled(),
            Self::Unusable(_)
            | Self::ApplySecret { .. }
            | Self::ReplaceSecret { .. }
            | Self::SecretTaken { .. }
            | Self::SecretGone { .. } => None,
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::Source(e) => e.retry_after(),
            Self::Google(e) => e.retry_after(),
            Self::Unusable(_)
            | Self::ApplySecret { .. }
            | Self::ReplaceSecret { .. }
            | Self::SecretTaken { .. }
            | Self::SecretGone { .. } => None,
        }
    }
}

/// The Secret of the target name, as far as this TokenRequest is concerned.
enum Existing {
    Missing,
    Owned(Arc<Secret>),
    /// Exists and is not controlled by this TokenRequest: never touched.
    Foreign,
}

pub async fn reconcile(tr: Arc<TokenRequest>, ctx: Arc<Context>) -> Result<Action, Error> {
    // The cache does not show this object's last status yet (a trigger raced the watch): acting
    // on the older copy would write that status again, from stale facts.
    if ctx.token_request_writes.awaited(&tr.metadata) {
        return Ok(Action::requeue(CACHE_CATCH_UP));
    }
    let started = Instant::now();
    let reconciler = Reconciler::new(&tr, &ctx);
    if let Some(next_attempt) = reconciler.internal_error_backoff() {
        return Ok(Action::requeue(refresh::delay_until(reconciler.now, next_attempt)));
    }
    let result = match contain_panic(reconciler.run()).await {
        Ok(result) => result,
        Err(Panicked) => Reconciler::new(&tr, &ctx).internal_error().await,
    };
    ctx.metrics.observe_reconcile(started.elapsed());
    result
}

/// A panic inside a reconcile was caught.
#[derive(Debug, PartialEq)]
pub struct Panicked;

/// Runs `work`, turning a panic into `Panicked`. kube-runtime re-raises a reconciler's panic in
/// the task that drives every controller, which would end the process for all tenants; one
/// object's contents meeting a bug must cost that object only. (The panic message still goes to
/// the log through the panic hook.)
pub async fn contain_panic<T>(work: impl Future<Output = T>) -> Result<T, Panicked> {
    AssertUnwindSafe(work).catch_unwind().await.map_err(|_| Panicked)
}

struct Reconciler<'a> {
    tr: &'a TokenRequest,
    ctx: &'a Context,
    namespace: String,
    name: String,
    now: Timestamp,
    status: TokenRequestStatus,
}

impl<'a> Reconciler<'a> {
    fn new(tr: &'a TokenRequest, ctx: &'a Context) -> Self {
        Self {
            tr,
            ctx,
            namespace: tr.namespace().unwrap_or_default(),
            name: tr.name_any(),
            now: refresh::whole_second(Timestamp::now()),
            status: tr.status.clone().unwrap_or_default(),
        }
    }

    async fn run(self) -> Result<Action, Error> {
        // Only a TokenRequest holding the operator's finalizer is still here once deleted.
        if self.tr.metadata.deletion_timestamp.is_some() {
            return self.finalize().await;
        }
        let at = Placement {
            namespace: &self.namespace,
            name: &self.name,
            policy: &self.ctx.policy,
        };
        let spec = match validate(&self.tr.spec, &at) {
            Ok(spec) => spec,
            Err(invalid) => return self.invalid_spec(&invalid.to_string()).await,
        };
        // A Secret the cache does not hold costs a GET, and a mint nearly always follows: a
        // namespace over its fair share is turned away before either.
        let cached = self
            .ctx
            .secrets
            .get(&ObjectRef::new(&spec.secret.name).within(&self.namespace));
        let permit = match cached {
            Some(_) => None,
            None => match self.admit() {
                Ok(permit) => Some(permit),
                Err(requeue) => return Ok(requeue),
            },
        };
        let existing = self.existing_secret(&spec.secret.name).await?;
        let stored = match &existing {
            Existing::Foreign => return self.secret_conflict(&spec).await,
            Existing::Missing => None,
            Existing::Owned(secret) => render::stored_token(secret, &spec.secret),
        };
        // Only a token the current flow and source produced counts; anything else is replaced.
        let held = stored.filter(|t| t.spec_hash == spec.token_hash);
        let valid = held.as_ref().filter(|t| t.record.expires_at > self.now);

        // A refresh asked for with the annotation skips the backoff and the held token, not the
        // budgets (the mint still needs the namespace's and the endpoint's leave), nor the floor.
        let requested = self.tr.pending_refresh_request().is_some();
        if requested {
            if let Some(at) = self.refresh_request_floor() {
                return Ok(Action::requeue(refresh::delay_until(self.now, at)));
            }
            info!(namespace = %self.namespace, name = %self.name, "refresh requested by annotation");
        } else if let Some(next_attempt) = self.backing_off(&spec) {
            return self.wait_for_retry(&spec, held.as_ref(), next_attempt).await;
        }
        if let Some(token) = valid.filter(|_| !requested) {
            let refresh_at = self.refresh_point(&spec, &token.record);
            if self.now < refresh_at {
                return self.keep(&spec, &existing, token, refresh_at).await;
            }
        }
        self.mint_and_store(&spec, &existing, valid, permit).await
    }

    /// Leave to mint within the namespace's fair share; or, when it has none left, the requeue
    /// for when it has again, with nothing written and no Event.
    fn admit(&self) -> Result<Permit, Action> {
        self.ctx.exchanges.fairness.admit(&self.namespace).map_err(|refused| {
            let limit = refused.limit.as_str();
            self.ctx.metrics.count_namespace_throttled(limit);
            debug!(namespace = %self.namespace, name = %self.name, limit, retry_in = ?refused.retry_in,
                   "held back for the other namespaces");
            Action::requeue(refused.retry_in)
        })
    }

    fn object_key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn refresh_point(&self, spec: &ValidSpec, record: &TokenRecord) -> Timestamp {
        let key = self.object_key();
        let at = refresh::refresh_point(record.issued_at, record.expires_at, &spec.refresh, &key);
        refresh::catch_up_point(
            at,
            record.expires_at,
            self.ctx.started_at,
            self.ctx.refresh_spread,
            &key,
        )
    }

    /// When a requested refresh may mint, if not now: [`REFRESH_REQUEST_FLOOR`] after the last
    /// attempt, so that an annotation changed in a loop mints at most once per floor.
    fn refresh_request_floor(&self) -> Option<Timestamp> {
        let times = [&self.status.last_refresh_time, &self.status.last_failure_time];
        let last = times.into_iter().flatten().map(|t| t.0).max()?;
        let at = refresh::later(last, REFRESH_REQUEST_FLOOR);
        (self.now < at).then_some(at)
    }

    fn generation_observed(&self) -> bool {
        self.status.observed_generation.is_some() && self.status.observed_generation == self.tr.metadata.generation
    }

    /// The time of the next attempt while failures are backing off. A spec change, or a fresh token
    /// in an upstream TokenRequest, ends the backoff at once.
    fn backing_off(&self, spec: &ValidSpec) -> Option<Timestamp> {
        if self.status.failed_attempts.unwrap_or(0) == 0 || !self.generation_observed() {
            return None;
        }
        let next = self.status.next_refresh_time.as_ref()?.0;
        if next <= self.now {
            return None;
        }
        let last_failure = self.status.last_failure_time.as_ref().map(|t| t.0);
        let upstream_moved = self
            .sources()
            .upstream_issued_at(&spec.source)
            .zip(last_failure)
            .is_some_and(|(u, f)| u > f);
        (!upstream_moved).then_some(next)
    }

    fn sources(&self) -> Sources<'_> {
        Sources {
            client: &self.ctx.client,
            namespace: &self.namespace,
            token_requests: &self.ctx.token_requests,
            managed_secrets: &self.ctx.secrets,
            policy: &self.ctx.policy,
            google: &self.ctx.google,
            kept: &self.ctx.exchanges.kept,
            ambient: &self.ctx.ambient,
        }
    }

    async fn existing_secret(&self, name: &str) -> Result<Existing, Error> {
        let uid = self.tr.uid().unwrap_or_default();
        if let Some(cached) = self.ctx.secrets.get(&ObjectRef::new(name).within(&self.namespace))
            && !(render::is_trimmed(&cached) && render::is_controlled_by(&cached, &uid))
        {
            return Ok(self.classify(cached));
        }
        // Not in the cache of labelled Secrets (absent, stripped of its label, or someone else's),
        // or cached without its contents because it grew too large: read it live. (Assuming it
        // absent would save the read, but mint a token for a name someone else holds.)
        self.read_secret(name).await.map_err(|source| Error::ReadSecret {
            name: name.into(),
            source,
        })
    }

    fn classify(&self, secret: Arc<Secret>) -> Existing {
        if render::is_controlled_by(&secret, &self.tr.uid().unwrap_or_default()) {
            Existing::Owned(secret)
        } else {
            Existing::Foreign
        }
    }

    async fn read_secret(&self, name: &str) -> Result<Existing, kube::Error> {
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        Ok(match api.get_opt(name).await? {
            Some(secret) => self.classify(Arc::new(secret)),
            None => Existing::Missing,
        })
    }

    /// The held token is good until `refresh_at`: repair Secret drift without minting.
    async fn keep(
        self,
        spec: &ValidSpec,
        existing: &Existing,
        token: &StoredToken,
        refresh_at: Timestamp,
    ) -> Result<Action, Error> {
        // The previous token stays until it expires; a reconcile then drops it.
        let previous = token.previous.as_ref().filter(|p| p.expires_at > self.now);
        if let Err(failure) = self.apply_secret(spec, existing, &token.record, previous).await {
            return self.failed(spec, Some(token), failure).await;
        }
        let reason = match self.tr.ready_condition().map(|c| c.reason.as_str()) {
            Some("Refreshed") => Reason::Refreshed,
            _ => Reason::Issued,
        };
        let previous_expiry = previous.map(|p| p.expires_at);
        self.succeeded(spec, &token.record, refresh_at, reason, previous_expiry)
            .await
    }

    async fn mint_and_store(
        self,
        spec: &ValidSpec,
        existing: &Existing,
        valid: Option<&StoredToken>,
        permit: Option<Permit>,
    ) -> Result<Action, Error> {
        // Held until the Secret and the status are written: those writes are the namespace's too.
        let _permit = match permit.map_or_else(|| self.admit(), Ok) {
            Ok(permit) => permit,
            Err(requeue) => return Ok(requeue),
        };
        let flow = spec.flow.name();
        let minted = match self.mint(spec).await {
            Ok(record) => record,
            Err(failure) if let Some(wait) = failure.throttled() => {
                debug!(namespace = %self.namespace, name = %self.name, ?wait, "held back by the Google rate limit");
                return Ok(Action::requeue(wait.max(refresh::MIN_DELAY)));
            }
            Err(failure) => {
                self.ctx.metrics.count_attempt(flow, failure.reason().as_str());
                return self.failed(spec, valid, failure).await;
            }
        };
        let previous = valid.map(|t| PreviousToken::from(&t.record));
        if let Err(failure) = self.apply_secret(spec, existing, &minted, previous.as_ref()).await {
            self.ctx.metrics.count_attempt(flow, failure.reason().as_str());
            return self.failed(spec, valid, failure).await;
        }
        self.ctx.metrics.count_attempt(flow, "Success");
        self.delete_stale_secrets(&spec.secret.name).await;
        let reason = if valid.is_some() {
            Reason::Refreshed
        } else {
            Reason::Issued
        };
        let recovered = self.status.failed_attempts.unwrap_or(0) > 0;
        info!(namespace = %self.namespace, name = %self.name, flow, fingerprint = %minted.fingerprint(),
              expires_at = %minted.expires_at, "token {}", if valid.is_some() { "refreshed" } else { "issued" });
        if recovered {
            self.publish(
                EventType::Normal,
                "Recovered",
                format!(
                    "token obtained again after {} failed attempts",
                    self.status.failed_attempts.unwrap_or(0)
                ),
            )
            .await;
        } else if valid.is_none() {
            self.publish(
                EventType::Normal,
                reason.as_str(),
                format!("token issued by {flow}; expires at {}", minted.expires_at),
            )
            .await;
        }
        let refresh_at = self.refresh_point(spec, &minted);
        let previous_expiry = previous.map(|p| p.expires_at);
        self.succeeded(spec, &minted, refresh_at, reason, previous_expiry).await
    }

    async fn mint(&self, spec: &ValidSpec) -> Result<TokenRecord, Failure> {
        let sources = self.sources();
        if let Flow::IdToken(IdTokenParams {
            service_account: None,
            audience,
            include_email,
            ..
        }) = &spec.flow
        {
            let issued_at = refresh::whole_second(Timestamp::now());
            sources.check_ambient_id_token()?;
            let issued = self.ctx.google.metadata_id_token(audience, *include_email).await;
            let issued = issued.map_err(Arc::new)?;
            return self.record(spec, issued, issued_at, None);
        }
        let caller = sources.resolve(&spec.source, &caller_scopes(&spec.flow)).await?;
        let issued_at = refresh::whole_second(Timestamp::now());
        let issued = self.exchange(&spec.flow, &caller.token).await;
        if issued.as_ref().is_err_and(|e| e.is_unauthenticated()) {
            sources.forget(&caller);
        }
        let issued = issued?;
        // STS returns no expiry for an access-token subject: the new token lives as long as that one.
        let inherited = matches!(spec.flow, Flow::Sts(_)).then_some(caller.expires_at).flatten();
        self.record(spec, issued, issued_at, inherited)
    }

    /// The record of a token just issued, if it is one worth storing.
    fn record(
        &self,
        spec: &ValidSpec,
        issued: IssuedToken,
        issued_at: Timestamp,
        inherited: Option<Timestamp>,
    ) -> Result<TokenRecord, Failure> {
        let expires_at = issued
            .expires_at
            .or(inherited)
            .map(refresh::whole_second)
            .unwrap_or_else(|| refresh::assumed_expiry(issued_at, &spec.refresh));
        // The status holds the granted scopes: Google's list is cut to what the status schema takes.
        let scopes = issued
            .scopes
            .into_iter()
            .filter(|s| s.len() <= bound::STATUS_SCOPE as usize)
            .take(bound::STATUS_SCOPES as usize)
            .collect();
        let record = TokenRecord {
            token: issued.token,
            issued_at,
            expires_at,
            scopes,
            username: issued.username,
        };
        render::check_issued(&record, Timestamp::now(), spec.flow.max_lifetime())?;
        Ok(record)
    }

    /// The flow's call, made once for all identical calls in flight: the same flow with the same
    /// caller credential (so only those who hold that credential share the outcome).
    async fn exchange(&self, flow: &Flow, caller: &SecretString) -> Result<IssuedToken, Arc<GoogleError>> {
        let flow_json = serde_json::to_vec(flow).expect("flows serialize");
        let key = Key::of(&[b"flow", &flow_json, caller.expose_secret().as_bytes()]);
        let (google, flow, caller) = (self.ctx.google.clone(), flow.clone(), caller.clone());
        let call = async move { google.mint(&flow, &caller).await };
        self.ctx.exchanges.flows.get_or_call(key, call, |_| None).await
    }

    /// Server-side applies the Secret, unless it already is exactly as desired.
    ///
    /// The apply carries the `uid` of the Secret it is meant for, which the apiserver takes as a
    /// precondition: it updates that Secret only, and fails if the name now belongs to another (or
    /// to none). A Secret is created by a plain create, which fails if the name is taken, so the
    /// operator never takes over a Secret that someone created after it looked. The create holds
    /// only fields every apply sets, so that the apply owns everything else and can remove it
    /// later. A Secret that cannot be changed in place (another `type`, or `immutable`) is deleted,
    /// preconditioned on what was seen, and created anew the same way.
    async fn apply_secret(
        &self,
        spec: &ValidSpec,
        existing: &Existing,
        record: &TokenRecord,
        previous: Option<&PreviousToken>,
    ) -> Result<(), Failure> {
        let mut desired = render::desired_secret(self.tr, spec, record, previous)?;
        let name = &spec.secret.name;
        let failed = |source| Failure::ApplySecret {
            name: name.clone(),
            source,
        };
        // A create that finds the name taken: judge the Secret that is there, once.
        let taken;
        let existing = match existing {
            Existing::Missing => match self.create_secret(&desired).await {
                Ok(uid) => {
                    desired.metadata.uid = uid;
                    return self.apply(name, &desired).await.map_err(failed);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    taken = self.read_secret(name).await.map_err(failed)?;
                    &taken
                }
                Err(e) => return Err(failed(e)),
            },
            other => other,
        };
        let uid = match existing {
            Existing::Owned(current) if render::secret_is_current(current, &desired) => return Ok(()),
            Existing::Owned(current) if render::needs_replacing(current, &desired) => {
                self.delete_owned(current)
                    .await
                    .map_err(|source| Failure::ReplaceSecret {
                        name: name.clone(),
                        source,
                    })?;
                info!(namespace = %self.namespace, secret = %name, "Secret deleted to be created anew: its type or immutability cannot change in place");
                self.create_secret(&desired).await.map_err(failed)?
            }
            Existing::Owned(current) => current.uid(),
            // Deleted between the create and the read: the next reconcile creates it.
            Existing::Missing => return Err(Failure::SecretGone { name: name.clone() }),
            Existing::Foreign => return Err(Failure::SecretTaken { name: name.clone() }),
        };
        desired.metadata.uid = uid;
        self.apply(name, &desired).await.map_err(failed)
    }

    async fn apply(&self, name: &str, desired: &Secret) -> Result<(), kube::Error> {
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let applied = api.patch(name, &params, &Patch::Apply(desired)).await?;
        self.ctx.secret_writes.record(&applied.metadata);
        debug!(namespace = %self.namespace, secret = %name, "Secret applied");
        Ok(())
    }

    /// Creates the Secret `desired` describes with only its name, type, owner and the watched
    /// label; returns its uid.
    async fn create_secret(&self, desired: &Secret) -> Result<Option<String>, kube::Error> {
        let skeleton = render::skeleton(desired);
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let created = api.create(&params, &skeleton).await?;
        self.ctx.secret_writes.record(&created.metadata);
        Ok(created.uid())
    }

    /// Deletes a Secret of this TokenRequest's, only if it still is exactly the one seen.
    async fn delete_owned(&self, secret: &Secret) -> Result<(), kube::Error> {
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: secret.uid(),
                resource_version: secret.resource_version(),
            }),
            ..Default::default()
        };
        match api.delete(&secret.name_any(), &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// After `spec.secret.name` changed, the Secrets written under earlier names go.
    async fn delete_stale_secrets(&self, current: &str) {
        // Only after a rename: scanning the whole Secret cache on every mint costs O(N) each.
        if self
            .status
            .secret_name
            .as_deref()
            .is_none_or(|previous| previous == current)
        {
            return;
        }
        let uid = self.tr.uid().unwrap_or_default();
        let stale = self.ctx.secrets.state().into_iter().filter(|s| {
            s.namespace().as_deref() == Some(self.namespace.as_str())
                && s.name_any() != current
                && render::is_controlled_by(s, &uid)
        });
        for secret in stale {
            if let Err(e) = self.delete_owned(&secret).await {
                warn!(namespace = %self.namespace, secret = %secret.name_any(), error = %e, "deleting a stale Secret failed");
            }
        }
    }

    async fn succeeded(
        self,
        spec: &ValidSpec,
        record: &TokenRecord,
        refresh_at: Timestamp,
        reason: Reason,
        previous_expiry: Option<Timestamp>,
    ) -> Result<Action, Error> {
        let message = format!(
            "Secret {} holds a token from {} that expires at {}; refresh at {}",
            spec.secret.name,
            spec.flow.name(),
            record.expires_at,
            refresh_at
        );
        let mut status = self.base_status(spec, true, reason, message);
        // Only where a token was written: after a rename whose first attempts fail, the old name
        // stays here, so the Secret under it is cleaned up once the new one holds a token.
        status.secret_name = Some(spec.secret.name.clone());
        status.expiration_time = Some(Time(record.expires_at));
        status.last_refresh_time = Some(Time(record.issued_at));
        status.next_refresh_time = Some(Time(refresh_at));
        status.scopes = record.scopes.clone();
        status.token_fingerprint = Some(record.fingerprint());
        status.username = record.username.clone();
        status.failed_attempts = None;
        let restart_at = self.restart_rollouts(spec, record, &mut status).await;
        // A new token or a new spec: check the entries are still there, someone may have edited them.
        let verify = !self.generation_observed() || self.status.token_fingerprint != status.token_fingerprint;
        let attach_at = self.attach_to_service_accounts(spec, verify, &mut status).await?;
        self.set_schedule(Some(record.expires_at), refresh_at, 0);
        self.write_status(status).await?;
        let wake = [Some(refresh_at), previous_expiry, restart_at, attach_at]
            .into_iter()
            .flatten()
            .min();
        Ok(Action::requeue(refresh::delay_until(
            Timestamp::now(),
            wake.unwrap_or(refresh_at),
        )))
    }

    /// Restarts `spec.rolloutRestartTargets` when the token changed since they last were, at most
    /// once per minimum interval; records that in `status`. Returns when to come back for a
    /// restart that has to wait (the interval) or to be retried (a failed patch).
    async fn restart_rollouts(
        &self,
        spec: &ValidSpec,
        record: &TokenRecord,
        status: &mut TokenRequestStatus,
    ) -> Option<Timestamp> {
        let plan = &spec.rollout;
        if plan.targets.is_empty() {
            status.rollout_restart_fingerprint = None;
            status.last_rollout_restart_time = None;
            return None;
        }
        let current = record.fingerprint();
        let last_restart = status.last_rollout_restart_time.as_ref().map(|t| t.0);
        let step = rollout::next_step(
            status.rollout_restart_fingerprint.as_deref(),
            last_restart,
            &current,
            self.now,
            plan.min_interval,
        );
        match step {
            Step::Nothing => return None,
            Step::WaitUntil(at) => return Some(at),
            Step::Remember => {
                status.rollout_restart_fingerprint = Some(current);
                return None;
            }
            Step::Restart => {}
        }
        let patch = rollout::restart_patch(&self.name, &current);
        let mut restarted = Vec::new();
        let mut failed = false;
        for (kind, name) in &plan.targets {
            let target = format!("{} {name}", kind.as_str());
            match self.patch_workload(*kind, name, &patch).await {
                Ok(()) => restarted.push(target),
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    let note = format!("{target} does not exist; nothing to restart");
                    self.publish(EventType::Warning, "RolloutRestartSkipped", note).await;
                }
                Err(e) => {
                    failed = true;
                    warn!(namespace = %self.namespace, name = %self.name, %target, error = %e, "rollout restart failed");
                    let note = format!("restarting {target} failed: {e}");
                    self.publish(EventType::Warning, "RolloutRestartFailed", note).await;
                }
            }
        }
        if !restarted.is_empty() {
            let note = format!("restarted {} for the new token", restarted.join(", "));
            self.publish(EventType::Normal, "RolloutRestarted", note).await;
        }
        if failed {
            // The patch is idempotent: retrying restarts only the targets that were not.
            return Some(refresh::later(self.now, ROLLOUT_RETRY));
        }
        status.rollout_restart_fingerprint = Some(current);
        status.last_rollout_restart_time = Some(Time(self.now));
        None
    }

    async fn patch_workload(
        &self,
        kind: WorkloadKind,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<(), kube::Error> {
        match kind {
            WorkloadKind::Deployment => self.merge_patch::<Deployment>(name, patch).await,
            WorkloadKind::StatefulSet => self.merge_patch::<StatefulSet>(name, patch).await,
            WorkloadKind::DaemonSet => self.merge_patch::<DaemonSet>(name, patch).await,
        }
    }

    async fn merge_patch<K>(&self, name: &str, patch: &serde_json::Value) -> Result<(), kube::Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        // A merge patch, not an apply: one apply per TokenRequest under the one field manager
        // would remove the other TokenRequests' annotations from a shared workload.
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        api.patch(name, &params, &Patch::Merge(patch)).await.map(|_| ())
    }

    async fn failed(self, spec: &ValidSpec, valid: Option<&StoredToken>, failure: Failure) -> Result<Action, Error> {
        let attempts = if self.generation_observed() {
            self.status.failed_attempts.unwrap_or(0) + 1
        } else {
            1
        };
        let valid_until = valid.map(|t| t.record.expires_at);
        // Counted from the failure, not from the start of the reconcile, so Retry-After holds.
        let failed_at = Timestamp::now();
        let delay = refresh::retry_delay(
            attempts,
            failure.class(),
            failure.retry_after(),
            failed_at,
            valid_until,
            fastrand::f64(),
        );
        let next_attempt = refresh::next_whole_second(refresh::later(failed_at, delay));
        warn!(namespace = %self.namespace, name = %self.name, attempts, error = %failure, retry_in = ?delay, "obtaining a token failed");
        self.publish(EventType::Warning, failure.reason().as_str(), failure.to_string())
            .await;
        let (ready, reason, message) = match valid {
            Some(t) => (
                true,
                Reason::RefreshFailed,
                format!(
                    "refresh failed ({}): {failure}; the token in Secret {} stays valid until {}; next attempt at {next_attempt}",
                    failure.reason().as_str(),
                    spec.secret.name,
                    t.record.expires_at
                ),
            ),
            None => (
                false,
                failure.reason(),
                format!("{failure}; next attempt at {next_attempt}"),
            ),
        };
        let mut status = self.base_status(spec, ready, reason, message);
        status.failed_attempts = Some(attempts);
        status.last_failure_time = Some(Time(refresh::whole_second(failed_at)));
        status.next_refresh_time = Some(Time(next_attempt));
        if valid.is_none() {
            status.token_fingerprint = None;
            status.username = None;
        }
        self.set_schedule(valid_until, next_attempt, attempts);
        self.write_status(status).await?;
        // Come back at expiry too, so Ready turns False the moment the held token lapses.
        let wake = valid_until.filter(|u| *u < next_attempt).unwrap_or(next_attempt);
        Ok(Action::requeue(refresh::delay_until(Timestamp::now(), wake)))
    }

    /// Waiting for the next attempt after failures; only keeps Ready in line with the held token.
    async fn wait_for_retry(
        self,
        spec: &ValidSpec,
        held: Option<&StoredToken>,
        next_attempt: Timestamp,
    ) -> Result<Action, Error> {
        let expired_at = held.map(|t| t.record.expires_at).filter(|e| *e <= self.now);
        let still_ready = self.tr.ready_condition().is_some_and(|c| c.status == "True");
        if let (Some(expired_at), true) = (expired_at, still_ready) {
            let message =
                format!("the token expired at {expired_at} and could not be refreshed; next attempt at {next_attempt}");
            let status = self.base_status(spec, false, Reason::Expired, message);
            self.publish(
                EventType::Warning,
                Reason::Expired.as_str(),
                format!("token expired at {expired_at}"),
            )
            .await;
            self.write_status(status).await?;
        }
        // A replica that just took over (or restarted) learns the schedule here first: the alerts
        // read these series while the backoff lasts.
        let unexpired = held.map(|t| t.record.expires_at).filter(|e| *e > self.now);
        self.set_schedule(unexpired, next_attempt, self.status.failed_attempts.unwrap_or(0));
        let valid_until = unexpired.filter(|e| *e < next_attempt);
        Ok(Action::requeue(refresh::delay_until(
            self.now,
            valid_until.unwrap_or(next_attempt),
        )))
    }

    async fn invalid_spec(self, problems: &str) -> Result<Action, Error> {
        let message = format!("invalid spec, nothing was requested from Google: {problems}");
        let status = TokenRequestStatus {
            conditions: vec![self.condition(false, Reason::InvalidSpec, message.clone())],
            observed_generation: self.tr.metadata.generation,
            ..self.status.clone()
        };
        if status::status_changed(self.tr.status.as_ref(), &status) {
            self.publish(EventType::Warning, Reason::InvalidSpec.as_str(), message)
                .await;
        }
        self.write_status(status).await?;
        Ok(Action::await_change())
    }

    async fn secret_conflict(self, spec: &ValidSpec) -> Result<Action, Error> {
        let message = format!(
            "Secret {} exists and is not owned by this TokenRequest; it is left untouched. Delete it or choose another spec.secret.name",
            spec.secret.name
        );
        let status = self.base_status(spec, false, Reason::SecretConflict, message.clone());
        if status::status_changed(self.tr.status.as_ref(), &status) {
            self.publish(EventType::Warning, Reason::SecretConflict.as_str(), message)
                .await;
        }
        self.write_status(status).await?;
        // The foreign Secret is outside the watched set: look again now and then.
        Ok(Action::requeue(std::time::Duration::from_secs(60)))
    }

    fn condition(
        &self,
        ready: bool,
        reason: Reason,
        message: String,
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        status::ready_condition(
            self.tr.ready_condition(),
            ready,
            reason,
            message,
            self.tr.metadata.generation,
            self.now,
        )
    }

    /// The previous status with a new Ready condition and the fields every outcome sets.
    /// The status every outcome writes. A refresh request pending when it is written has been
    /// acted on (a mint, or why none could be made), so it is recorded as handled.
    fn base_status(&self, spec: &ValidSpec, ready: bool, reason: Reason, message: String) -> TokenRequestStatus {
        let handled = self.tr.pending_refresh_request().map(String::from);
        TokenRequestStatus {
            conditions: vec![self.condition(ready, reason, message)],
            observed_generation: self.tr.metadata.generation,
            flow: Some(spec.flow.name().into()),
            last_handled_refresh_request: handled.or_else(|| self.status.last_handled_refresh_request.clone()),
            ..self.status.clone()
        }
    }

    fn object_labels(&self) -> ObjectLabels {
        ObjectLabels {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The metrics of what the status records: expiry, next attempt and failed attempts.
    fn set_schedule(&self, expires_at: Option<Timestamp>, next: Timestamp, failed_attempts: u32) {
        let object = self.object_labels();
        self.ctx
            .metrics
            .set_schedule(&object, expires_at.map(|t| t.as_second()), next.as_second());
        self.ctx.metrics.set_failed_attempts(&object, failed_attempts);
    }

    /// Server-side applies the status, unless it is unchanged.
    async fn write_status(&self, status: TokenRequestStatus) -> Result<(), Error> {
        if !status::status_changed(self.tr.status.as_ref(), &status) {
            return Ok(());
        }
        let api: Api<TokenRequest> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let patch = serde_json::json!({
            "apiVersion": "gcptoken.dev/v1alpha1",
            "kind": "TokenRequest",
            "status": status,
        });
        let written = api
            .patch_status(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(Error::PatchStatus)?;
        self.record_write(&written);
        Ok(())
    }

    /// Notes a write of this TokenRequest that changed it: until the watch shows it, a reconcile
    /// waits for the cache. (A write that changed nothing makes no watch event to wait for.)
    fn record_write(&self, written: &TokenRequest) {
        if written.metadata.resource_version != self.tr.metadata.resource_version {
            self.ctx.token_request_writes.record(&written.metadata);
        }
    }

    /// Set by `internal_error`: while it holds, nothing is tried for this object.
    fn internal_error_backoff(&self) -> Option<Timestamp> {
        let condition = self.tr.ready_condition()?;
        let next = self.status.next_refresh_time.as_ref()?.0;
        (condition.reason == Reason::InternalError.as_str() && self.generation_observed() && next > self.now)
            .then_some(next)
    }

    /// After a panic in this object's reconcile: say so in its status and an Event, and back it
    /// off like a permanent failure. Uses nothing of the spec, which may be what caused it.
    async fn internal_error(self) -> Result<Action, Error> {
        let attempts = match self.generation_observed() {
            true => self.status.failed_attempts.unwrap_or(0).saturating_add(1),
            false => 1,
        };
        let delay = refresh::retry_delay(attempts, ErrorClass::Permanent, None, self.now, None, fastrand::f64());
        let next_attempt = refresh::next_whole_second(refresh::later(self.now, delay));
        error!(namespace = %self.namespace, name = %self.name, attempts, "internal error: the reconcile panicked; backing off");
        let message = format!(
            "internal error in the operator while handling this TokenRequest (a bug; the operator's log has the details); next attempt at {next_attempt}"
        );
        self.publish(EventType::Warning, Reason::InternalError.as_str(), message.clone())
            .await;
        self.ctx.metrics.set_failed_attempts(&self.object_labels(), attempts);
        let status = TokenRequestStatus {
            conditions: vec![self.condition(false, Reason::InternalError, message)],
            observed_generation: self.tr.metadata.generation,
            failed_attempts: Some(attempts),
            last_failure_time: Some(Time(self.now)),
            next_refresh_time: Some(Time(next_attempt)),
            ..self.status.clone()
        };
        self.write_status(status).await?;
        Ok(Action::requeue(delay))
    }

    async fn publish(&self, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note,
            action: "ObtainToken".into(),
        };
        if let Err(e) = self.ctx.events.publish(&event, &self.tr.object_ref(&())).await {
            warn!(namespace = %self.namespace, name = %self.name, error = %e, "publishing an event failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_contained_to_its_own_reconcile() {
        let poisoned = contain_panic(async {
            let renew_before = std::time::Duration::MAX;
            // The overflow that used to end the process for every tenant.
            renew_before + std::time::Duration::from_secs(1)
        });
        let healthy = contain_panic(async { 42 });
        let (poisoned, healthy) = futures::join!(poisoned, healthy);
        assert_eq!(poisoned, Err(Panicked));
        assert_eq!(healthy, Ok(42));
    }
}
