//! The emulator's state: configuration, the request log and the token registry, behind one
//! mutex that is never held across an `await`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use jsonwebtoken::DecodingKey;
use k8s_openapi::jiff::SignedDuration;

use super::{Endpoint, Fault, IssuedToken, RecordedRequest};

/// Google's default token lifetime, and the emulator's for every endpoint not configured otherwise.
pub(super) const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

pub(super) struct Shared {
    pub(super) base_url: String,
    state: Mutex<State>,
}

impl Shared {
    pub(super) fn new(base_url: String) -> Self {
        Self {
            base_url,
            state: Mutex::default(),
        }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock leaves nothing half-written that matters.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) struct ServiceAccountKey {
    pub(super) client_email: String,
    pub(super) key: DecodingKey,
}

pub(super) struct AuthorizedUser {
    pub(super) client_id: String,
    pub(super) client_secret: String,
    pub(super) refresh_token: String,
    pub(super) user: String,
}

#[derive(Default)]
pub(super) struct State {
    /// Only lifetimes set explicitly; see [`State::lifetime`].
    pub(super) lifetimes: HashMap<Endpoint, Duration>,
    pub(super) latencies: HashMap<Endpoint, Duration>,
    /// How far the emulator's clock is off the real one.
    pub(super) clock_offset: SignedDuration,
    /// Service account email → latency of `generateAccessToken` calls for it.
    pub(super) account_latencies: HashMap<String, Duration>,
    pub(super) faults: HashMap<Endpoint, VecDeque<Fault>>,
    pub(super) providers: HashSet<String>,
    /// Service account email → principals allowed to impersonate it.
    pub(super) service_accounts: HashMap<String, Vec<String>>,
    /// Key ID → key.
    pub(super) keys: HashMap<String, ServiceAccountKey>,
    pub(super) users: Vec<AuthorizedUser>,
    pub(super) metadata_account: Option<String>,
    pub(super) account_connectors: HashSet<String>,
    pub(super) data_connectors: HashSet<String>,
    pub(super) requests: Vec<RecordedRequest>,
    /// Tokens in issue order; `tokens` holds what is known about each.
    pub(super) issued: Vec<String>,
    pub(super) tokens: HashMap<String, IssuedToken>,
}

impl State {
    /// Logs a request and hands out what is scripted for it: its latency and its next fault.
    pub(super) fn admit(&mut self, request: RecordedRequest) -> (Duration, Option<Fault>) {
        let Some(endpoint) = request.endpoint else {
            self.requests.push(request);
            return (Duration::ZERO, None);
        };
        let mut latency = self.latencies.get(&endpoint).copied().unwrap_or_default();
        if endpoint == Endpoint::GenerateAccessToken
            && let Some(account) = impersonated_account(&request.path)
            && let Some(slow) = self.account_latencies.get(account)
        {
            latency = latency.max(*slow);
        }
        let fault = self.faults.get_mut(&endpoint).and_then(VecDeque::pop_front);
        self.requests.push(request);
        (latency, fault)
    }

    /// Now, by the emulator's clock.
    pub(super) fn now(&self) -> SystemTime {
        self.on_clock(SystemTime::now())
    }

    /// The real time `t` as the emulator's clock reads it.
    pub(super) fn on_clock(&self, t: SystemTime) -> SystemTime {
        let magnitude = self.clock_offset.unsigned_abs();
        let shifted = if self.clock_offset.is_negative() {
            t.checked_sub(magnitude)
        } else {
            t.checked_add(magnitude)
        };
        shifted.unwrap_or(t)
    }

    /// The lifetime of tokens `endpoint` issues.
    pub(super) fn lifetime(&self, endpoint: Endpoint) -> Duration {
        self.lifetimes.get(&endpoint).copied().unwrap_or(DEFAULT_LIFETIME)
    }

    /// Registers a new token and returns it. Tokens look like Google's (`ya29.` prefix) but are
    /// recognisable as the emulator's, and are never reused.
    pub(super) fn issue(&mut self, info: IssuedToken) -> String {
        let token = loop {
            let candidate: String = std::iter::repeat_with(fastrand::alphanumeric).take(48).collect();
            let candidate = format!("ya29.emu.{candidate}");
            if !self.tokens.contains_key(&candidate) {
                break candidate;
            }
        };
        self.issued.push(token.clone());
        self.tokens.insert(token.clone(), info);
        token
    }

    /// A token this emulator issued that has not expired yet.
    pub(super) fn live_token(&self, token: &str) -> Option<&IssuedToken> {
        self.tokens
            .get(token)
            .filter(|info| info.expires_at > SystemTime::now())
    }

    /// Whether `principal` may mint tokens for the service account `email`.
    pub(super) fn may_impersonate(&self, principal: &str, email: &str) -> bool {
        self.service_accounts
            .get(email)
            .is_some_and(|callers| callers.iter().any(|c| c == "*" || c == principal))
    }
}

/// The account of a `generateAccessToken` path, `.../serviceAccounts/{account}:generateAccessToken`.
fn impersonated_account(path: &str) -> Option<&str> {
    let (_, rest) = path.split_once("/serviceAccounts/")?;
    rest.split_once(':').map(|(account, _)| account)
}
