//! Token buckets: one per Google endpoint and one for the Kubernetes API, each shared by every
//! reconcile, so a cold start or a failover with thousands of TokenRequests cannot flood either.

use std::{
    collections::HashMap,
    future::Future,
    num::NonZeroU32,
    pin::Pin,
    str::FromStr,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter, clock::Clock};
use tokio::time::Instant;

use crate::google::Api;

/// A sustained rate with a burst allowance, in requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Rate {
    fn bucket(self) -> DefaultDirectRateLimiter {
        RateLimiter::direct(Quota::per_second(self.per_second).allow_burst(self.burst))
    }
}

/// One `--google-rate-limit` entry: `N` for every endpoint, or `API=N` for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateSetting {
    pub api: Option<Api>,
    pub per_second: NonZeroU32,
}

impl FromStr for RateSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (api, rate) = match s.split_once('=') {
            Some((api, rate)) => (Some(api.trim().parse::<Api>()?), rate),
            None => (None, s),
        };
        let per_second = rate
            .trim()
            .parse::<NonZeroU32>()
            .map_err(|_| format!("{rate:?} is not a whole number of requests per second above 0"))?;
        Ok(Self { api, per_second })
    }
}

/// The limits of every Google endpoint, from the `--google-rate-limit` entries and the burst.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoogleLimits {
    pub default: Rate,
    pub per_api: HashMap<Api, Rate>,
}

impl GoogleLimits {
    /// Later entries win; the burst is `burst` or else one second's worth of requests.
    pub fn new(settings: &[RateSetting], default_per_second: NonZeroU32, burst: Option<NonZeroU32>) -> Self {
        let rate = |per_second| Rate {
            per_second,
            burst: burst.unwrap_or(per_second),
        };
        let default = settings
            .iter()
            .rev()
            .find(|s| s.api.is_none())
            .map_or(default_per_second, |s| s.per_second);
        let mut per_api = HashMap::new();
        for setting in settings {
            if let Some(api) = setting.api {
                per_api.insert(api, rate(setting.per_second));
            }
        }
        Self {
            default: rate(default),
            per_api,
        }
    }

    pub fn rate(&self, api: Api) -> Rate {
        self.per_api.get(&api).copied().unwrap_or(self.default)
    }
}

/// The longest an endpoint pauses for one `Retry-After`: a far-off value from one response must
/// not stall every refresh through that endpoint (each TokenRequest still honours it in full).
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// The pause after a 429 that named no `Retry-After`.
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);
/// The longest a reconcile waits in line for an endpoint's bucket before it gives up its slot.
const MAX_QUEUE_WAIT: Duration = Duration::from_secs(1);

/// A request held back by the operator's own limit: try again after this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttled(pub Duration);

/// A token bucket per Google endpoint, plus a pause when that endpoint pushes back.
pub struct EndpointLimits {
    endpoints: HashMap<Api, Endpoint>,
}

struct Endpoint {
    bucket: DefaultDirectRateLimiter,
    paused_until: Mutex<Option<Instant>>,
}

impl Endpoint {
    fn pause(&self) -> Option<Instant> {
        let until = (*self.paused_until.lock().expect("not poisoned"))?;
        (until > Instant::now()).then_some(until)
    }
}

impl EndpointLimits {
    pub fn new(limits: &GoogleLimits) -> Self {
        let endpoints = Api::ALL
            .into_iter()
            .map(|api| {
                let endpoint = Endpoint {
                    bucket: limits.rate(api).bucket(),
                    paused_until: Mutex::new(None),
                };
                (api, endpoint)
            })
            .collect();
        Self { endpoints }
    }

    /// Waits until a request to `api` may go out and returns how long that took; or, when that
    /// would take longer than `MAX_QUEUE_WAIT` (the endpoint pushed back, or many requests are
    /// queued), returns how long to wait instead, so that the reconcile frees its slot for
    /// TokenRequests of other endpoints rather than holding it.
    pub async fn acquire(&self, api: Api) -> Result<Duration, Throttled> {
        let endpoint = &self.endpoints[&api];
        let started = Instant::now();
        loop {
            if let Some(until) = endpoint.pause() {
                return Err(Throttled(until - Instant::now()));
            }
            let wait = match endpoint.bucket.check() {
                Ok(()) => return Ok(started.elapsed()),
                Err(not_until) => not_until.wait_time_from(endpoint.bucket.clock().now()),
            };
            if started.elapsed() + wait > MAX_QUEUE_WAIT {
                return Err(Throttled(wait));
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// `api` answered 429 or named a `Retry-After`: hold back every request to it for that long.
    pub fn push_back(&self, api: Api, retry_after: Option<Duration>) {
        let pause = retry_after.unwrap_or(DEFAULT_PAUSE).min(MAX_PAUSE);
        let until = Instant::now() + pause;
        let mut paused = self.endpoints[&api].paused_until.lock().expect("not poisoned");
        *paused = Some(paused.map_or(until, |p| p.max(until)));
    }
}

/// A tower layer that takes a token from a shared bucket before each Kubernetes API request, as
/// client-go's QPS and burst do.
#[derive(Clone)]
pub struct KubeRateLimitLayer {
    bucket: Arc<DefaultDirectRateLimiter>,
}

impl KubeRateLimitLayer {
    pub fn new(rate: Rate) -> Self {
        Self {
            bucket: Arc::new(rate.bucket()),
        }
    }
}

impl<S> tower::Layer<S> for KubeRateLimitLayer {
    type Service = KubeRateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KubeRateLimit {
            inner,
            bucket: self.bucket.clone(),
            permit: None,
            permitted: false,
        }
    }
}

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct KubeRateLimit<S> {
    inner: S,
    bucket: Arc<DefaultDirectRateLimiter>,
    /// The wait for a token, while one is pending.
    permit: Option<Wait>,
    /// A token was taken for the next call.
    permitted: bool,
}

impl<S, R> tower::Service<R> for KubeRateLimit<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.permitted {
            let bucket = self.bucket.clone();
            let wait = self
                .permit
                .get_or_insert_with(|| Box::pin(async move { bucket.until_ready().await }));
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.permit = None;
            self.permitted = true;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.permitted = false;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn settings_parse_and_combine() {
        let settings: Vec<RateSetting> = ["50", "sts=5", "iamcredentials = 200"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let limits = GoogleLimits::new(&settings, nz(100), None);
        assert_eq!(
            limits.rate(Api::Sts),
            Rate {
                per_second: nz(5),
                burst: nz(5)
            }
        );
        assert_eq!(limits.rate(Api::IamCredentials).per_second, nz(200));
        assert_eq!(
            limits.rate(Api::OAuth2),
            Rate {
                per_second: nz(50),
                burst: nz(50)
            }
        );
        let limits = GoogleLimits::new(&[], nz(100), Some(nz(7)));
        assert_eq!(
            limits.rate(Api::Metadata),
            Rate {
                per_second: nz(100),
                burst: nz(7)
            }
        );
        for bad in ["0", "sts=0", "nope=3", "sts=x", ""] {
            assert!(bad.parse::<RateSetting>().is_err(), "{bad:?}");
        }
    }

    fn limits(per_second: u32, burst: u32) -> EndpointLimits {
        let rate = Rate {
            per_second: nz(per_second),
            burst: nz(burst),
        };
        EndpointLimits::new(&GoogleLimits {
            default: rate,
            per_api: HashMap::new(),
        })
    }

    #[tokio::test]
    async fn the_bucket_allows_the_burst_then_the_rate() {
        let limits = limits(20, 5);
        let started = std::time::Instant::now();
        for _ in 0..5 {
            limits.acquire(Api::Sts).await.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "the burst passes at once"
        );
        for _ in 0..10 {
            limits.acquire(Api::Sts).await.unwrap();
        }
        // Ten more at 20/s take about half a second; never less than 0.45 s.
        assert!(
            started.elapsed() >= Duration::from_millis(450),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_long_line_gives_the_slot_back() {
        let limits = limits(2, 1);
        // Six at once at 2/s: those that would wait more than a second are sent away.
        let outcomes = futures::future::join_all((0..6).map(|_| limits.acquire(Api::Sts))).await;
        let sent = outcomes.iter().filter(|o| o.is_ok()).count();
        assert!((2..=3).contains(&sent), "{outcomes:?}");
        for outcome in outcomes {
            if let Err(Throttled(wait)) = outcome {
                assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
            }
        }
    }

    #[tokio::test]
    async fn push_back_pauses_only_that_endpoint() {
        let limits = limits(1000, 1000);
        limits.push_back(Api::Sts, Some(Duration::from_millis(600)));
        assert!(
            limits.acquire(Api::IamCredentials).await.is_ok(),
            "other endpoints are not slowed"
        );
        let Err(Throttled(wait)) = limits.acquire(Api::Sts).await else {
            panic!("a paused endpoint sends nothing");
        };
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(600),
            "{wait:?}"
        );
        // A Retry-After far in the future is capped for the endpoint as a whole.
        limits.push_back(Api::Sts, Some(Duration::from_secs(3600)));
        let paused = limits.endpoints[&Api::Sts].pause().unwrap();
        assert!(paused <= Instant::now() + MAX_PAUSE);
    }
}
