//! Per-namespace fairness in front of the budgets every namespace shares: the reconcile slots, the
//! Google endpoints' buckets and the Kubernetes client's bucket.
//!
//! A running reconcile has at most one request outstanding at a time, so a namespace's share of a
//! shared bucket is its share of the reconciles that are minting. Two limits per namespace keep
//! that share fair, and a reconcile they refuse returns at once (it holds no slot while it waits):
//! - mints in flight: at most `max_in_flight` while one namespace mints, fewer as more namespaces
//!   mint at once, so the slots they hold always leave some free for a namespace that starts;
//! - mints started: a token bucket (`rate`), which bounds the Google calls and the writes (Secret,
//!   status, Event) a namespace's storm causes.
//!
//! Only namespaces that mint right now, or whose bucket is not full, are tracked: the map never
//! grows with the number of namespaces that ever existed.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use crate::ratelimit::Rate;

/// A refused mint comes back no sooner than this (kube-runtime adds its debounce on top).
const MIN_RETRY: Duration = Duration::from_millis(250);
/// A refused mint comes back no later than this (before jitter), however long the namespace's
/// mints took so far: hung calls end at the HTTP timeout.
const MAX_RETRY: Duration = Duration::from_secs(10);
/// Below this many tracked namespaces, idle ones are not swept.
const MIN_SWEEP: usize = 64;

/// The limits; each `None` is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FairnessLimits {
    /// Mints a namespace may start per second, with a burst.
    pub rate: Option<Rate>,
    /// Mints a namespace may have in flight while it is the only one minting.
    pub max_in_flight: Option<NonZeroU32>,
    /// The operator's reconcile slots, all controllers together.
    pub slots: u32,
}

/// Which limit refused a mint; a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Rate,
    InFlight,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rate => "rate",
            Self::InFlight => "in_flight",
        }
    }
}

/// A mint refused for fairness: try again after `retry_in` (jitter included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub limit: Limit,
    pub retry_in: Duration,
}

/// The admission of mints, per namespace. Cloning shares it; the default admits everything.
#[derive(Clone, Default)]
pub struct Fairness {
    /// `None`: both limits off.
    inner: Option<Arc<Inner>>,
}

struct Inner {
    limits: FairnessLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    namespaces: HashMap<String, Namespace>,
    /// Namespaces with a mint in flight.
    minting: usize,
    /// The map's size after the last sweep: the next comes once it has doubled.
    swept_at: usize,
}

#[derive(Default)]
struct Namespace {
    in_flight: u32,
    /// The bucket's theoretical arrival time (GCRA): the bucket is full once it has passed.
    tat: Option<Instant>,
    /// How long this namespace's mints hold their permit, on average: when a refused one returns.
    typical_hold: Duration,
}

impl Namespace {
    fn idle(&self, now: Instant) -> bool {
        self.in_flight == 0 && self.tat.is_none_or(|t| t <= now)
    }
}

/// Leave to mint; held until the Secret and the status are written. Dropping it ends the mint.
pub struct Permit {
    held: Option<Held>,
}

struct Held {
    inner: Arc<Inner>,
    namespace: String,
    since: Instant,
}

impl Fairness {
    pub fn new(limits: FairnessLimits) -> Self {
        let on = limits.rate.is_some() || limits.max_in_flight.is_some();
        Self {
            inner: on.then(|| {
                Arc::new(Inner {
                    limits,
                    state: Mutex::default(),
                })
            }),
        }
    }

    /// Leave for `namespace` to start a mint now, or how long to wait for it.
    pub fn admit(&self, namespace: &str) -> Result<Permit, Refused> {
        let Some(inner) = &self.inner else {
            return Ok(Permit { held: None });
        };
        let now = Instant::now();
        let mut state = inner.lock();
        state.sweep(now);
        let limits = &inner.limits;
        let minting = state.minting;
        if !state.namespaces.contains_key(namespace) {
            state.namespaces.insert(namespace.to_string(), Namespace::default());
        }
        let entry = state.namespaces.get_mut(namespace).expect("inserted above");
        if let Some(max) = limits.max_in_flight {
            let contending = minting + usize::from(entry.in_flight == 0);
            if entry.in_flight >= in_flight_cap(max, limits.slots, contending) {
                return Err(refused(Limit::InFlight, entry.typical_hold));
            }
        }
        if let Some(rate) = limits.rate {
            match next_arrival(entry.tat, now, rate) {
                Ok(tat) => entry.tat = Some(tat),
                Err(wait) => return Err(refused(Limit::Rate, wait)),
            }
        }
        entry.in_flight = entry.in_flight.saturating_add(1);
        if entry.in_flight == 1 {
            state.minting += 1;
        }
        Ok(Permit {
            held: Some(Held {
                inner: inner.clone(),
                namespace: namespace.to_string(),
                since: now,
            }),
        })
    }

    /// Namespaces tracked now.
    pub fn tracked(&self) -> usize {
        self.inner.as_ref().map_or(0, |inner| inner.lock().namespaces.len())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update under the lock is complete before it can panic: a poisoned map is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Drops idle namespaces once the map has doubled since the last sweep: amortised O(1).
    fn sweep(&mut self, now: Instant) {
        if self.namespaces.len() < MIN_SWEEP.max(self.swept_at.saturating_mul(2)) {
            return;
        }
        self.namespaces.retain(|_, ns| !ns.idle(now));
        self.swept_at = self.namespaces.len();
    }
}

/// The most mints in flight for a namespace while `contending` namespaces (itself included) mint:
/// `max` alone, and never so many that a namespace that starts minting finds no slot free.
fn in_flight_cap(max: NonZeroU32, slots: u32, contending: usize) -> u32 {
    let share = u32::try_from(contending.saturating_add(1)).unwrap_or(u32::MAX);
    (slots / share).min(max.get()).max(1)
}

/// GCRA: the bucket's next theoretical arrival time if a mint may start `now`, else how long
/// until one may.
fn next_arrival(tat: Option<Instant>, now: Instant, rate: Rate) -> Result<Instant, Duration> {
    let interval = Duration::from_secs(1) / rate.per_second.get();
    // At most u32::MAX seconds: fits a Duration.
    let tolerance = interval.saturating_mul(rate.burst.get());
    let start = tat.filter(|t| *t > now).unwrap_or(now);
    let next = start.checked_add(interval).ok_or(interval)?;
    let ahead = next.saturating_duration_since(now);
    if ahead <= tolerance {
        Ok(next)
    } else {
        Err(ahead - tolerance)
    }
}

/// Refused ones that would all return at the same moment are spread over half as long again.
fn refused(limit: Limit, wait: Duration) -> Refused {
    let wait = wait.clamp(MIN_RETRY, MAX_RETRY);
    Refused {
        limit,
        // At most 15 s: mul_f64 cannot overflow.
        retry_in: wait + wait.mul_f64(fastrand::f64() / 2.0),
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        let now = Instant::now();
        let mut state = held.inner.lock();
        let Some(entry) = state.namespaces.get_mut(&held.namespace) else {
            return;
        };
        entry.in_flight = entry.in_flight.saturating_sub(1);
        let took = now.saturating_duration_since(held.since);
        entry.typical_hold = if entry.typical_hold.is_zero() {
            took
        } else {
            entry.typical_hold.saturating_mul(3).saturating_add(took) / 4
        };
        let (ended, idle) = (entry.in_flight == 0, entry.idle(now));
        if ended {
            state.minting = state.minting.saturating_sub(1);
        }
        if idle {
            state.namespaces.remove(&held.namespace);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn fairness(per_second: u32, burst: u32, max_in_flight: u32, slots: u32) -> Fairness {
        Fairness::new(FairnessLimits {
            rate: Some(Rate {
                per_second: nz(per_second),
                burst: nz(burst),
            }),
            max_in_flight: NonZeroU32::new(max_in_flight),
            slots,
        })
    }

    fn refusal(outcome: Result<Permit, Refused>) -> Refused {
        match outcome {
            Ok(_) => panic!("admitted"),
            Err(refused) => refused,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_allows_the_burst_then_says_when() {
        let fairness = fairness(10, 3, 100, 400);
        for _ in 0..3 {
            drop(fairness.admit("a").unwrap());
        }
        let refused = refusal(fairness.admit("a"));
        assert_eq!(refused.limit, Limit::Rate);
        // At 10/s the next mint may start 100 ms later; refusals come back no sooner than 250 ms,
        // with up to half as long again of jitter.
        assert!(
            (MIN_RETRY..=MIN_RETRY * 3 / 2).contains(&refused.retry_in),
            "{refused:?}"
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(fairness.admit("a").unwrap());
        assert_eq!(refusal(fairness.admit("a")).limit, Limit::Rate);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_wait_for_the_rate_is_reported_in_full() {
        let fairness = fairness(1, 1, 100, 400);
        drop(fairness.admit("a").unwrap());
        let refused = refusal(fairness.admit("a"));
        assert!(
            (Duration::from_secs(1)..=Duration::from_millis(1500)).contains(&refused.retry_in),
            "{refused:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn mints_in_flight_are_capped_and_freed_by_their_permits() {
        let fairness = fairness(1000, 1000, 8, 16);
        let mut held: Vec<Permit> = (0..8).map(|_| fairness.admit("a").unwrap()).collect();
        tokio::time::advance(Duration::from_secs(2)).await;
        let refused = refusal(fairness.admit("a"));
        assert_eq!(refused.limit, Limit::InFlight);
        held.truncate(1);
        // The permits were held 2 s: a mint refused now comes back after about that long.
        held.extend((0..7).map(|_| fairness.admit("a").unwrap()));
        let refused = refusal(fairness.admit("a"));
        assert_eq!(refused.limit, Limit::InFlight);
        assert!(
            (Duration::from_secs(2)..=Duration::from_secs(3)).contains(&refused.retry_in),
            "{refused:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn mints_that_hang_send_the_refused_ones_back_within_bounds() {
        let fairness = fairness(1000, 1000, 2, 4);
        let mut held: Vec<Permit> = (0..2).map(|_| fairness.admit("a").unwrap()).collect();
        tokio::time::advance(Duration::from_secs(120)).await;
        held.truncate(1);
        held.push(fairness.admit("a").unwrap());
        let refused = refusal(fairness.admit("a"));
        assert!(
            (MAX_RETRY..=MAX_RETRY * 3 / 2).contains(&refused.retry_in),
            "{refused:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_storming_namespace_leaves_another_untouched() {
        let fairness = fairness(20, 20, 8, 16);
        // Namespace a takes all it can: refused for in-flight first, then its bucket runs dry.
        let mut storm = Vec::new();
        let mut refusals = 0;
        for _ in 0..1000 {
            match fairness.admit("a") {
                Ok(permit) => storm.push(permit),
                Err(_) => refusals += 1,
            }
        }
        assert_eq!(storm.len(), 8, "half the slots");
        assert_eq!(refusals, 992);
        // b starts while a storms: its first mints pass at once, and a's share shrinks so that
        // slots stay free for a third namespace.
        let b: Vec<Permit> = (0..5).map(|_| fairness.admit("b").unwrap()).collect();
        assert_eq!(refusal(fairness.admit("b")).limit, Limit::InFlight, "16 / 3 each");
        drop(storm.pop());
        assert_eq!(
            refusal(fairness.admit("a")).limit,
            Limit::InFlight,
            "a is above its share now"
        );
        let c = fairness.admit("c").unwrap();
        drop((b, c, storm));
        // b's bucket was never drawn on by a's storm: of its burst of 20 it used only its own 5.
        for _ in 0..15 {
            drop(fairness.admit("b").unwrap());
        }
        assert_eq!(refusal(fairness.admit("b")).limit, Limit::Rate);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_namespace_always_gets_one_slot() {
        let fairness = fairness(100, 100, 8, 1);
        let first = fairness.admit("a").unwrap();
        assert_eq!(refusal(fairness.admit("a")).limit, Limit::InFlight);
        let other = fairness.admit("b").unwrap();
        drop((first, other));
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_stays_bounded() {
        let fairness = fairness(1, 1, 4, 8);
        // Every namespace leaves its bucket empty: each stays tracked until the bucket refills.
        for n in 0..10_000 {
            drop(fairness.admit(&format!("ns-{n}")).unwrap());
            if n % 1000 == 999 {
                tokio::time::advance(Duration::from_secs(1)).await;
            }
        }
        // At most the namespaces of the last second, twice over between sweeps.
        assert!(fairness.tracked() <= 2 * 1000 + MIN_SWEEP, "{}", fairness.tracked());
        // Without a rate, a namespace is forgotten the moment its last mint ends.
        let unlimited = Fairness::new(FairnessLimits {
            rate: None,
            max_in_flight: Some(nz(4)),
            slots: 8,
        });
        for n in 0..10_000 {
            drop(unlimited.admit(&format!("ns-{n}")).unwrap());
        }
        assert_eq!(unlimited.tracked(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn off_admits_everything() {
        let fairness = Fairness::new(FairnessLimits {
            rate: None,
            max_in_flight: None,
            slots: 1,
        });
        let permits: Vec<Permit> = (0..10_000).map(|_| fairness.admit("a").unwrap()).collect();
        assert_eq!(permits.len(), 10_000);
        assert_eq!(fairness.tracked(), 0);
        assert!(Fairness::default().admit("a").is_ok());
    }

    #[test]
    fn the_cap_shrinks_with_contention_but_never_to_zero() {
        let max = nz(8);
        assert_eq!(in_flight_cap(max, 16, 1), 8);
        assert_eq!(in_flight_cap(max, 16, 2), 5);
        assert_eq!(in_flight_cap(max, 16, 3), 4);
        assert_eq!(in_flight_cap(max, 16, 100), 1);
        assert_eq!(in_flight_cap(max, 0, 1), 1);
        assert_eq!(in_flight_cap(nz(2), 1000, 1), 2);
        assert_eq!(in_flight_cap(max, u32::MAX, usize::MAX), 1);
    }

    #[test]
    fn extreme_rates_neither_panic_nor_overflow() {
        let now = Instant::now();
        let rate = |per_second, burst| Rate {
            per_second: nz(per_second),
            burst: nz(burst),
        };
        assert!(next_arrival(None, now, rate(u32::MAX, u32::MAX)).is_ok());
        assert!(next_arrival(None, now, rate(1, u32::MAX)).is_ok());
        let far = now + Duration::from_secs(3600);
        assert_eq!(next_arrival(Some(far), now, rate(1, 1)), Err(Duration::from_secs(3600)));
    }
}
