//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: only the holder
//! reconciles; the other replicas stand by and take over when the holder releases the Lease or
//! stops renewing it.
//!
//! Three rules keep it to one leader at a time:
//! * Every write is a create, or a replace carrying the resourceVersion just read: of several
//!   replicas racing for the Lease the apiserver lets exactly one win and answers 409 Conflict to
//!   the others, whatever field manager they use.
//! * The holder stops leading once no renewal has succeeded for the renew deadline
//!   (`duration - grace`), counted on its own monotonic clock from when the renewal was sent,
//!   whether or not the apiserver answers at all.
//! * A standby takes a held Lease only after it has seen the Lease unchanged for `duration`,
//!   counted on its own monotonic clock from when it saw the change. It never compares the holder's
//!   `renewTime` with its own wall clock, so a skewed clock cannot make a live Lease look expired.
//!
//! The holder therefore stops at least `grace` before any standby can take over.

use std::{future::Future, pin::pin, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

use crate::{controller::FIELD_MANAGER, metrics::Metrics, refresh::ErrorClass};

/// Shortest lease: below it a renewal has no time to be retried before the deadline.
pub const MIN_DURATION: Duration = Duration::from_secs(2);
/// Longest lease, and the most a standby believes of a Lease's `leaseDurationSeconds`.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Shortest margin between the holder giving up and a standby taking over.
pub const MIN_GRACE: Duration = Duration::from_secs(1);
/// Renewals per renew deadline: a few may fail before the holder gives up.
const RENEWALS_PER_DEADLINE: u32 = 5;

/// How long leases last and how the holder renews them; the constructor checks that they make sense.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    duration: Duration,
    grace: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("--lease-duration and --lease-grace are whole seconds (the Lease stores seconds); got {0:?}")]
    NotWholeSeconds(Duration),
    #[error("--lease-duration must be from {min}s to {max}s, not {0:?}", min = MIN_DURATION.as_secs(), max = MAX_DURATION.as_secs())]
    Duration(Duration),
    #[error("--lease-grace must be at least {min}s, not {0:?}", min = MIN_GRACE.as_secs())]
    GraceTooShort(Duration),
    #[error("--lease-grace ({grace:?}) must be shorter than --lease-duration ({duration:?})")]
    GraceNotShorter { grace: Duration, duration: Duration },
}

impl Timing {
    pub fn new(duration: Duration, grace: Duration) -> Result<Timing, TimingError> {
        for d in [duration, grace] {
            if d.subsec_nanos() != 0 {
                return Err(TimingError::NotWholeSeconds(d));
            }
        }
        if !(MIN_DURATION..=MAX_DURATION).contains(&duration) {
            return Err(TimingError::Duration(duration));
        }
        if grace < MIN_GRACE {
            return Err(TimingError::GraceTooShort(grace));
        }
        if grace >= duration {
            return Err(TimingError::GraceNotShorter { grace, duration });
        }
        Ok(Timing { duration, grace })
    }

    /// How long a standby waits, after it last saw the Lease change, before taking it.
    pub fn duration(self) -> Duration {
        self.duration
    }

    /// How long the holder keeps leading without a successful renewal.
    pub fn renew_deadline(self) -> Duration {
        // `new` ensures grace < duration.
        self.duration.saturating_sub(self.grace)
    }

    /// How often the holder renews, and retries a failed renewal.
    pub fn renew_period(self) -> Duration {
        self.renew_deadline() / RENEWALS_PER_DEADLINE
    }

    fn duration_seconds(self) -> i32 {
        // At most MAX_DURATION.
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// Why a leader stopped leading.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Loss {
    #[error("no renewal of the lease succeeded within the renew deadline")]
    RenewDeadline,
    #[error("another replica holds the lease")]
    TakenOver,
    #[error("the lease was released or deleted by someone else")]
    Released,
}

/// What to do next, given the Lease as just read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create one naming this replica.
    Create,
    /// The Lease is free, lapsed, or names this replica from an earlier run: take it.
    Acquire,
    /// This replica leads: renew.
    Renew,
    /// Another replica's lease is live: look again then (`None`: only when it changes).
    Wait { until: Option<Instant> },
    /// This replica led and must stop now.
    StepDown(Loss),
}

/// The Lease as last seen, and since when, on the local monotonic clock.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    version: Option<String>,
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    /// How long it must stay unchanged before a standby may take it.
    lasts: Duration,
    since: Instant,
}

/// The decisions of leader election, without I/O: fed with what was read and when, it says what to
/// write and whether this replica may lead.
#[derive(Debug)]
pub struct Elector {
    identity: String,
    timing: Timing,
    seen: Option<Seen>,
    /// When the last successful acquisition or renewal of ours was sent: the start of the renew
    /// deadline. Set once this replica has led.
    renewed: Option<Instant>,
}

impl Elector {
    pub fn new(identity: String, timing: Timing) -> Elector {
        Elector {
            identity,
            timing,
            seen: None,
            renewed: None,
        }
    }

    /// Records the Lease as seen at `now` (`None`: there is none). Only a change restarts the
    /// standby's wait: the resourceVersion, the holder or the renew time.
    pub fn observe(&mut self, lease: Option<&Lease>, now: Instant) {
        let Some(lease) = lease else {
            self.seen = None;
            return;
        };
        let spec = lease.spec.as_ref();
        let version = lease.metadata.resource_version.clone();
        let holder = spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty());
        let renew_time = spec.and_then(|s| s.renew_time.clone());
        let unchanged = self
            .seen
            .as_ref()
            .is_some_and(|s| s.version == version && s.holder == holder && s.renew_time == renew_time);
        if unchanged {
            return;
        }
        // A holder configured with a longer lease than ours is waited for as long as it says,
        // within reason; a shorter one is waited for as long as ours.
        let declared = spec
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(Duration::ZERO, Duration::from_secs)
            .min(MAX_DURATION);
        self.seen = Some(Seen {
            version,
            holder,
            renew_time,
            lasts: declared.max(self.timing.duration),
            since: now,
        });
    }

    /// Observes `lease` (as just read at `now`) and decides.
    pub fn decide(&mut self, lease: Option<&Lease>, now: Instant) -> Decision {
        self.observe(lease, now);
        let led = self.has_led();
        if led && !self.is_leading(now) {
            return Decision::StepDown(Loss::RenewDeadline);
        }
        let Some(seen) = &self.seen else {
            return if led {
                Decision::StepDown(Loss::Released)
            } else {
                Decision::Create
            };
        };
        match &seen.holder {
            Some(holder) if *holder == self.identity => {
                if led {
                    Decision::Renew
                } else {
                    Decision::Acquire
                }
            }
            Some(_) if led => Decision::StepDown(Loss::TakenOver),
            Some(_) => match seen.since.checked_add(seen.lasts) {
                Some(lapses) if now >= lapses => Decision::Acquire,
                until => Decision::Wait { until },
            },
            None if led => Decision::StepDown(Loss::Released),
            None => Decision::Acquire,
        }
    }

    /// Records that our write (`written`, as the apiserver returned it), sent at `sent`, succeeded.
    /// Returns whether this replica leads now. An answer that comes after the renew deadline of the
    /// write counts for nothing, and once a leader's deadline has passed it never leads again.
    pub fn succeeded(&mut self, sent: Instant, written: &Lease, now: Instant) -> bool {
        self.observe(Some(written), now);
        if self.has_led() && !self.is_leading(now) {
            return false;
        }
        let start = self.renewed.map_or(sent, |r| r.max(sent));
        let in_time = start
            .checked_add(self.timing.renew_deadline())
            .is_some_and(|deadline| now < deadline);
        if in_time {
            self.renewed = Some(start);
        }
        in_time
    }

    /// Whether this replica has led (and so may not stand by again).
    pub fn has_led(&self) -> bool {
        self.renewed.is_some()
    }

    /// When leadership ends unless a renewal succeeds first; `None` if this replica does not lead
    /// (or the sum overflows, which counts as having passed).
    pub fn deadline(&self) -> Option<Instant> {
        self.renewed?.checked_add(self.timing.renew_deadline())
    }

    pub fn is_leading(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|deadline| now < deadline)
    }

    /// When the holder renews next.
    fn next_renewal(&self) -> Option<Instant> {
        self.renewed?.checked_add(self.timing.renew_period())
    }

    /// The Lease to write for `decision` (`Create`, `Acquire` or `Renew`) over `current`, at
    /// wall-clock time `wall`. The times are for people and other tools: no replica of ours
    /// judges expiry by them.
    pub fn claim(&self, current: Option<&Lease>, decision: &Decision, wall: Timestamp) -> Lease {
        let mut lease = current.cloned().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let now = Some(MicroTime(wall));
        if *decision != Decision::Renew {
            let previous = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
            let transitions = spec.lease_transitions.unwrap_or(0).max(0);
            if previous != Some(self.identity.as_str()) && current.is_some() {
                spec.lease_transitions = Some(transitions.saturating_add(1));
            } else {
                spec.lease_transitions = Some(transitions);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = now.clone();
        }
        spec.renew_time = now;
        spec.lease_duration_seconds = Some(self.timing.duration_seconds());
        lease
    }
}

/// `current` without a holder, for a successor to take at once.
fn released(current: &Lease) -> Lease {
    let mut lease = current.clone();
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
    }
    lease
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("reading the Lease failed: {source}")]
    Read {
        #[source]
        source: kube::Error,
    },
    #[error("creating the Lease failed: {source}")]
    Create {
        #[source]
        source: kube::Error,
    },
    #[error("writing the Lease failed: {source}")]
    Write {
        #[source]
        source: kube::Error,
    },
    #[error("the apiserver returned the Lease without a resourceVersion, so it cannot be replaced safely")]
    Unversioned,
    #[error("the apiserver did not answer within {0:?}")]
    Timeout(Duration),
}

impl LeaderError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Read { source } | Self::Create { source } | Self::Write { source } => match source {
                kube::Error::Api(s) if s.code < 500 && s.code != 429 => ErrorClass::Permanent,
                _ => ErrorClass::Transient,
            },
            Self::Unversioned => ErrorClass::Permanent,
            Self::Timeout(_) => ErrorClass::Transient,
        }
    }
}

pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub timing: Timing,
}

/// What ended a term of leadership.
pub enum Outcome<T> {
    /// `work` finished (e.g. on a shutdown signal) while this replica led; the lease is released.
    Finished(T),
    /// Leadership ended: another replica may already be writing, so the caller must stop.
    Lost(Loss),
    /// `shutdown` completed while standing by.
    ShutDown,
}

/// Waits for the lease, then runs `work` for as long as this replica leads. `shutdown` ends the
/// wait of a standby; `work` is expected to handle the signal itself once started. `client`
/// should not be throttled with the reconciles: a renewal queued behind them can miss its deadline.
/// The `leader` gauge of `metrics` is 1 for exactly that time.
pub async fn run_as_leader<T>(
    client: Client,
    settings: LeaseSettings,
    metrics: &Metrics,
    shutdown: impl Future<Output = ()>,
    work: impl Future<Output = T>,
) -> Outcome<T> {
    let mut lock = LeaseLock::new(client, settings);
    info!(lease = %lock.name, identity = %lock.elector.identity, "standing by for the lease");
    if !lock.acquire(shutdown).await {
        return Outcome::ShutDown;
    }
    info!(identity = %lock.elector.identity, "acquired the lease; leading");
    metrics.set_leader(true);
    // The work runs inside this future, so leaving the select stops all of it. The lease is
    // polled first, so a deadline that has passed wins over more work in the same wake-up.
    let outcome = tokio::select! {
        biased;
        loss = lock.hold() => {
            warn!(identity = %lock.elector.identity, "{loss}; stopping at once");
            Outcome::Lost(loss)
        }
        result = work => Outcome::Finished(result),
    };
    metrics.set_leader(false);
    if matches!(outcome, Outcome::Finished(_)) {
        lock.release().await;
    }
    outcome
}

/// The result of one read-decide-write round.
enum Round {
    /// Our write succeeded and this replica leads.
    Leading,
    /// Another replica wrote first (409): read again.
    Contended,
    Wait(Option<Instant>),
    Lost(Loss),
}

struct LeaseLock {
    api: Api<Lease>,
    name: String,
    elector: Elector,
}

impl LeaseLock {
    fn new(client: Client, settings: LeaseSettings) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(client, &settings.namespace),
            elector: Elector::new(settings.identity, settings.timing),
            name: settings.name,
        }
    }

    fn timing(&self) -> Timing {
        self.elector.timing
    }

    fn params() -> PostParams {
        PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        }
    }

    /// Reads the Lease, decides, and writes what the decision calls for.
    async fn round(&mut self) -> Result<Round, LeaderError> {
        let sent = Instant::now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| LeaderError::Read { source })?;
        let decision = self.elector.decide(current.as_ref(), Instant::now());
        let written = match (&decision, &current) {
            (Decision::Wait { until }, _) => return Ok(Round::Wait(*until)),
            (Decision::StepDown(loss), _) => return Ok(Round::Lost(loss.clone())),
            (Decision::Create, _) | (Decision::Acquire | Decision::Renew, None) => {
                let mut lease = self.elector.claim(None, &Decision::Create, Timestamp::now());
                lease.metadata = ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                };
                self.api
                    .create(&Self::params(), &lease)
                    .await
                    .map_err(|source| LeaderError::Create { source })
            }
            (Decision::Acquire | Decision::Renew, Some(current)) => {
                if current.metadata.resource_version.is_none() {
                    return Err(LeaderError::Unversioned);
                }
                let lease = self.elector.claim(Some(current), &decision, Timestamp::now());
                self.api
                    .replace(&self.name, &Self::params(), &lease)
                    .await
                    .map_err(|source| LeaderError::Write { source })
            }
        };
        match written {
            Ok(lease) if self.elector.succeeded(sent, &lease, Instant::now()) => Ok(Round::Leading),
            Ok(_) if self.elector.has_led() => Ok(Round::Lost(Loss::RenewDeadline)),
            // Taken, but answered too late to lead on: a standby tries again.
            Ok(_) => Ok(Round::Contended),
            Err(
                LeaderError::Create {
                    source: kube::Error::Api(s),
                }
                | LeaderError::Write {
                    source: kube::Error::Api(s),
                },
            ) if s.code == 409 => {
                debug!("another write of the Lease came first");
                Ok(Round::Contended)
            }
            Err(e) => Err(e),
        }
    }

    /// Stands by until this replica holds the Lease (`true`) or `shutdown` completes (`false`).
    /// The Lease is watched, so a released one is taken at once.
    async fn acquire(&mut self, shutdown: impl Future<Output = ()>) -> bool {
        let mut shutdown = pin!(shutdown);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = pin!(watcher(self.api.clone(), config).default_backoff());
        let mut next = Some(Instant::now());
        loop {
            tokio::select! {
                () = &mut shutdown => return false,
                Some(event) = events.next() => {
                    let lease = match event {
                        Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => Some(lease),
                        Ok(watcher::Event::Delete(_)) => None,
                        Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
                        Err(e) => {
                            debug!(error = %e, "watching the lease failed; retrying");
                            continue;
                        }
                    };
                    next = match self.elector.decide(lease.as_ref(), Instant::now()) {
                        Decision::Wait { until } => until,
                        _ => Some(Instant::now()),
                    };
                }
                () = sleep_until_some(next) => {
                    let timeout = self.timing().renew_deadline();
                    let round = tokio::time::timeout(timeout, self.round())
                        .await
                        .unwrap_or(Err(LeaderError::Timeout(timeout)));
                    next = match round {
                        Ok(Round::Leading) => return true,
                        Ok(Round::Wait(until)) => until,
                        Ok(Round::Contended | Round::Lost(_)) => Instant::now().checked_add(self.timing().renew_period()),
                        Err(e) => {
                            warn!(error = %e, "trying for the lease failed; retrying");
                            let wait = match e.class() {
                                ErrorClass::Transient => self.timing().renew_period(),
                                ErrorClass::Permanent => self.timing().duration(),
                            };
                            Instant::now().checked_add(wait)
                        }
                    };
                }
            }
        }
    }

    /// Renews the Lease until leadership ends, and says why it did. Ends at the renew deadline at the
    /// latest, even while a request hangs.
    async fn hold(&mut self) -> Loss {
        let mut next = self.elector.next_renewal();
        loop {
            let Some(deadline) = self.elector.deadline() else {
                return Loss::RenewDeadline;
            };
            let wake = next.map_or(deadline, |n| n.min(deadline));
            let round = async {
                sleep_until(wake).await;
                self.round().await
            };
            let round = tokio::select! {
                biased;
                () = sleep_until(deadline) => return Loss::RenewDeadline,
                round = round => round,
            };
            next = match round {
                Ok(Round::Leading) => self.elector.next_renewal(),
                Ok(Round::Lost(loss)) => return loss,
                Ok(Round::Contended | Round::Wait(_)) => Instant::now().checked_add(self.timing().renew_period()),
                Err(e) => {
                    warn!(error = %e, "renewing the lease failed; retrying");
                    Instant::now().checked_add(self.timing().renew_period())
                }
            };
        }
    }

    /// Clears the holder, if it is still this replica, so that a standby takes over at once; on any
    /// failure the lease simply lapses.
    async fn release(&mut self) {
        let timeout = self.timing().renew_deadline();
        let result = tokio::time::timeout(timeout, async {
            let current = self
                .api
                .get_opt(&self.name)
                .await
                .map_err(|source| LeaderError::Read { source })?;
            let ours = current.filter(|lease| {
                lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.elector.identity.as_str())
            });
            let Some(ours) = ours else { return Ok(false) };
            if ours.metadata.resource_version.is_none() {
                return Err(LeaderError::Unversioned);
            }
            self.api
                .replace(&self.name, &Self::params(), &released(&ours))
                .await
                .map_err(|source| LeaderError::Write { source })?;
            Ok(true)
        })
        .await
        .unwrap_or(Err(LeaderError::Timeout(timeout)));
        match result {
            Ok(true) => info!("lease released"),
            Ok(false) => info!("the lease is no longer ours; nothing to release"),
            Err(e) => warn!(error = %e, "releasing the lease failed; it lapses on its own"),
        }
    }
}

/// Completes at `at`, or never for `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ME: &str = "me_1";

    fn timing() -> Timing {
        Timing::new(Duration::from_secs(6), Duration::from_secs(2)).unwrap()
    }

    /// A Lease as the apiserver returns it; `renewed` is the holder's renewTime, in seconds from a
    /// fixed point in time.
    fn lease(version: &str, holder: Option<&str>, renewed: i64, duration: Option<i32>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                renew_time: Some(MicroTime(Timestamp::from_second(1_800_000_000 + renewed).unwrap())),
                lease_duration_seconds: duration,
                lease_transitions: Some(3),
                ..LeaseSpec::default()
            }),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn timing_is_validated() {
        assert_eq!(timing().renew_deadline(), secs(4));
        assert_eq!(timing().renew_period(), Duration::from_millis(800));
        let defaults = Timing::new(secs(15), secs(5)).unwrap();
        assert_eq!(
            (defaults.renew_deadline(), defaults.renew_period()),
            (secs(10), secs(2))
        );
        assert!(Timing::new(secs(2), secs(1)).is_ok());
        assert!(Timing::new(MAX_DURATION, secs(1)).is_ok());
        assert_eq!(Timing::new(secs(1), secs(1)), Err(TimingError::Duration(secs(1))));
        assert_eq!(
            Timing::new(MAX_DURATION + secs(1), secs(1)),
            Err(TimingError::Duration(MAX_DURATION + secs(1)))
        );
        assert_eq!(
            Timing::new(Duration::from_millis(2500), secs(1)),
            Err(TimingError::NotWholeSeconds(Duration::from_millis(2500)))
        );
        assert_eq!(
            Timing::new(secs(5), Duration::from_millis(500)),
            Err(TimingError::NotWholeSeconds(Duration::from_millis(500)))
        );
        assert_eq!(
            Timing::new(secs(5), Duration::ZERO),
            Err(TimingError::GraceTooShort(Duration::ZERO))
        );
        for grace in [5, 6, 100] {
            assert_eq!(
                Timing::new(secs(5), secs(grace)),
                Err(TimingError::GraceNotShorter {
                    grace: secs(grace),
                    duration: secs(5)
                })
            );
        }
    }

    #[test]
    fn a_missing_or_free_lease_is_taken_at_once() {
        let now = Instant::now();
        let mut elector = Elector::new(ME.into(), timing());
        assert_eq!(elector.decide(None, now), Decision::Create);
        assert_eq!(
            elector.decide(Some(&lease("1", None, 0, Some(6))), now),
            Decision::Acquire
        );
        assert_eq!(
            elector.decide(Some(&lease("2", Some(""), 0, Some(6))), now),
            Decision::Acquire
        );
        // Ours from an earlier run of this identity (a restarted container): no one else writes.
        assert_eq!(
            elector.decide(Some(&lease("3", Some(ME), 0, Some(6))), now),
            Decision::Acquire
        );
    }

    #[test]
    fn a_held_lease_is_taken_only_after_it_was_seen_unchanged_for_its_duration() {
        let t0 = Instant::now();
        let mut elector = Elector::new(ME.into(), timing());
        // Renewed an hour ago by the holder's clock: irrelevant, only the local observation counts.
        let held = lease("1", Some("other"), -3600, Some(6));
        assert_eq!(
            elector.decide(Some(&held), t0),
            Decision::Wait {
                until: Some(t0 + secs(6))
            }
        );
        assert_eq!(
            elector.decide(Some(&held), t0 + secs(5)),
            Decision::Wait {
                until: Some(t0 + secs(6))
            }
        );
        // A renewal (new resourceVersion, still an old renewTime) restarts the wait.
        let renewed = lease("2", Some("other"), -3599, Some(6));
        assert_eq!(
            elector.decide(Some(&renewed), t0 + secs(5)),
            Decision::Wait {
                until: Some(t0 + secs(11))
            }
        );
        assert_eq!(elector.decide(Some(&renewed), t0 + secs(11)), Decision::Acquire);
    }

    #[test]
    fn a_holder_with_a_longer_lease_is_waited_for_within_reason() {
        let t0 = Instant::now();
        let mut elector = Elector::new(ME.into(), timing());
        let long = lease("1", Some("other"), 0, Some(60));
        assert_eq!(
            elector.decide(Some(&long), t0),
            Decision::Wait {
                until: Some(t0 + secs(60))
            }
        );
        for (version, declared) in [("2", Some(i32::MAX)), ("3", Some(-5)), ("4", None), ("5", Some(1))] {
            let expected = match declared {
                Some(i32::MAX) => MAX_DURATION,
                _ => secs(6),
            };
            assert_eq!(
                elector.decide(Some(&lease(version, Some("other"), 0, declared)), t0),
                Decision::Wait {
                    until: Some(t0 + expected)
                },
                "{declared:?}"
            );
        }
    }

    #[test]
    fn the_leader_renews_until_its_deadline_and_steps_down_when_taken_over() {
        let t0 = Instant::now();
        let mut elector = Elector::new(ME.into(), timing());
        let mine = lease("1", Some(ME), 0, Some(6));
        assert_eq!(elector.decide(None, t0), Decision::Create);
        assert!(elector.succeeded(t0, &mine, t0 + secs(1)));
        assert_eq!(elector.deadline(), Some(t0 + secs(4)));
        assert_eq!(elector.decide(Some(&mine), t0 + secs(2)), Decision::Renew);
        assert!(elector.succeeded(t0 + secs(2), &lease("2", Some(ME), 0, Some(6)), t0 + secs(3)));
        assert_eq!(elector.deadline(), Some(t0 + secs(6)));
        assert_eq!(
            elector.decide(Some(&lease("3", Some("other"), 0, Some(6))), t0 + secs(4)),
            Decision::StepDown(Loss::TakenOver)
        );
        assert_eq!(
            elector.decide(Some(&lease("4", None, 0, Some(6))), t0 + secs(4)),
            Decision::StepDown(Loss::Released)
        );
        assert_eq!(elector.decide(None, t0 + secs(4)), Decision::StepDown(Loss::Released));
        assert_eq!(
            elector.decide(Some(&lease("5", Some(ME), 0, Some(6))), t0 + secs(6)),
            Decision::StepDown(Loss::RenewDeadline)
        );
        // A renewal answered after the deadline does not bring leadership back.
        assert!(!elector.succeeded(t0 + secs(5), &lease("6", Some(ME), 0, Some(6)), t0 + secs(7)));
        assert!(!elector.is_leading(t0 + secs(7)));
    }

    #[test]
    fn an_acquisition_answered_after_the_deadline_does_not_lead() {
        let t0 = Instant::now();
        let mut elector = Elector::new(ME.into(), timing());
        assert!(!elector.succeeded(t0, &lease("1", Some(ME), 0, Some(6)), t0 + secs(4)));
    }

    #[test]
    fn claims_name_this_replica_and_count_transitions() {
        let elector = Elector::new(ME.into(), timing());
        let wall = Timestamp::now();
        let created = elector.claim(None, &Decision::Create, wall);
        let spec = created.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(ME));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.lease_duration_seconds, Some(6));
        assert_eq!(spec.renew_time, Some(MicroTime(wall)));
        assert_eq!(spec.acquire_time, Some(MicroTime(wall)));

        let other = lease("7", Some("other"), 0, Some(60));
        let taken = elector.claim(Some(&other), &Decision::Acquire, wall);
        assert_eq!(
            taken.metadata.resource_version.as_deref(),
            Some("7"),
            "the write is conditional"
        );
        let spec = taken.spec.unwrap();
        assert_eq!(
            (spec.holder_identity.as_deref(), spec.lease_transitions),
            (Some(ME), Some(4))
        );
        assert_eq!(spec.lease_duration_seconds, Some(6));

        let mut saturated = lease("8", Some("other"), 0, Some(6));
        saturated.spec.as_mut().unwrap().lease_transitions = Some(i32::MAX);
        let spec = elector.claim(Some(&saturated), &Decision::Acquire, wall).spec.unwrap();
        assert_eq!(spec.lease_transitions, Some(i32::MAX));

        let mine = lease("9", Some(ME), -10, Some(6));
        let renewed = elector.claim(Some(&mine), &Decision::Renew, wall);
        let spec = renewed.spec.unwrap();
        assert_eq!(spec.lease_transitions, Some(3));
        assert_eq!(spec.renew_time, Some(MicroTime(wall)));
        assert_eq!(spec.acquire_time, None, "a renewal keeps the acquisition time");

        let free = released(&mine);
        assert_eq!(free.spec.unwrap().holder_identity, None);
        assert_eq!(free.metadata.resource_version.as_deref(), Some("9"));
    }

    /// One step of a random history: time passes, then the elector sees a Lease or hears back
    /// from a write.
    #[derive(Clone, Debug)]
    enum Step {
        Observe {
            after_ms: u64,
            lease: Option<(u8, Option<u8>, i64, Option<i32>)>,
        },
        Decide {
            after_ms: u64,
            lease: Option<(u8, Option<u8>, i64, Option<i32>)>,
        },
        Succeeded {
            after_ms: u64,
            sent_ms_ago: u64,
            version: u8,
        },
    }

    fn holder_name(holder: u8) -> &'static str {
        ["", ME, "other", "third"][usize::from(holder % 4)]
    }

    fn to_lease(spec: &Option<(u8, Option<u8>, i64, Option<i32>)>) -> Option<Lease> {
        spec.as_ref().map(|(version, holder, renewed, duration)| {
            lease(&version.to_string(), holder.map(holder_name), *renewed, *duration)
        })
    }

    fn step() -> impl Strategy<Value = Step> {
        let lease = proptest::option::weighted(
            0.9,
            (
                0u8..6,
                proptest::option::of(0u8..4),
                -7200i64..7200,
                proptest::option::of(any::<i32>()),
            ),
        );
        prop_oneof![
            (0u64..3000, lease.clone()).prop_map(|(after_ms, lease)| Step::Observe { after_ms, lease }),
            (0u64..3000, lease).prop_map(|(after_ms, lease)| Step::Decide { after_ms, lease }),
            (0u64..3000, 0u64..6000, 0u8..6).prop_map(|(after_ms, sent_ms_ago, version)| Step::Succeeded {
                after_ms,
                sent_ms_ago,
                version
            }),
        ]
    }

    proptest! {
        /// Whatever it sees and whenever its writes succeed, the elector never leads (nor decides
        /// to renew) once no renewal has succeeded for the renew deadline, and never leads again
        /// after that.
        #[test]
        fn never_leads_past_its_deadline(steps in proptest::collection::vec(step(), 1..60)) {
            let t0 = Instant::now() + secs(10);
            let mut now = t0;
            let mut elector = Elector::new(ME.into(), timing());
            // The model: the latest accepted `sent`, and whether the deadline has ever passed.
            let mut last_sent: Option<Instant> = None;
            let mut deposed = false;
            for step in steps {
                let after = match &step {
                    Step::Observe { after_ms, .. } | Step::Decide { after_ms, .. } | Step::Succeeded { after_ms, .. } => *after_ms,
                };
                now += Duration::from_millis(after);
                if last_sent.is_some_and(|sent| now >= sent + timing().renew_deadline()) {
                    deposed = true;
                }
                match step {
                    Step::Observe { lease, .. } => elector.observe(to_lease(&lease).as_ref(), now),
                    Step::Decide { lease, .. } => {
                        let decision = elector.decide(to_lease(&lease).as_ref(), now);
                        if decision == Decision::Renew {
                            prop_assert!(!deposed && elector.is_leading(now));
                        }
                        if last_sent.is_some() {
                            prop_assert!(!matches!(decision, Decision::Create | Decision::Acquire | Decision::Wait { .. }), "{decision:?}");
                        }
                    }
                    Step::Succeeded { sent_ms_ago, version, .. } => {
                        let sent = now
                            .checked_sub(Duration::from_millis(sent_ms_ago))
                            .unwrap_or(now)
                            .max(last_sent.unwrap_or(t0));
                        let written = lease(&version.to_string(), Some(ME), 0, Some(6));
                        let leading = elector.succeeded(sent, &written, now);
                        let in_time = !deposed && now < sent + timing().renew_deadline();
                        prop_assert_eq!(leading, in_time);
                        if in_time {
                            last_sent = Some(sent);
                        }
                    }
                }
                let leading = elector.is_leading(now);
                prop_assert!(!leading || (!deposed && last_sent.is_some_and(|sent| now < sent + timing().renew_deadline())));
            }
        }

        /// Whatever renewTime another holder writes (skewed clocks), a standby takes its Lease only
        /// once it has seen the Lease unchanged for the lease duration, on its own clock.
        #[test]
        fn a_standby_never_takes_a_lease_that_changed_within_its_duration(
            steps in proptest::collection::vec((0u64..4000, 0u8..3, -100_000i64..100_000, proptest::option::of(1i32..20)), 1..60)
        ) {
            let mut now = Instant::now();
            let mut elector = Elector::new(ME.into(), timing());
            // The last change seen (resourceVersion and renewTime), when, and how long it lasts.
            let mut changed: Option<(u8, i64, Instant, Duration)> = None;
            for (after_ms, version, renewed, duration) in steps {
                now += Duration::from_millis(after_ms);
                let held = lease(&version.to_string(), Some("other"), renewed, duration);
                if changed.is_none_or(|(v, r, _, _)| (v, r) != (version, renewed)) {
                    let declared = secs(duration.map_or(0, |d| u64::try_from(d).unwrap_or(0)));
                    changed = Some((version, renewed, now, declared.max(timing().duration())));
                }
                let decision = elector.decide(Some(&held), now);
                let (_, _, since, lasts) = changed.expect("set above");
                if now < since + lasts {
                    prop_assert!(matches!(decision, Decision::Wait { until: Some(until) } if until == since + lasts), "{decision:?}");
                } else {
                    prop_assert_eq!(decision, Decision::Acquire);
                }
            }
        }
    }
}
