//! The emulator's state: configuration, the request log and the token registry, behind one
//! mutex that is never held across an `await`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use jsonwebtoken::DecodingKey;
use k8s_openapi::jiff::SignedDuration;

use super::id_tokens::IdTokenSigner;
use super::{Endpoint, Fault, IssuedToken, RecordedRequest};

/// Google's default token lifetime, and the emulator's for every endpoint not configured otherwise.
pub(super) const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

pub(super) struct Shared {
    pub(super) base_url: String,
    /// Signs ID tokens; immutable, so outside the mutex.
    pub(super) id_tokens: IdTokenSigner,
    state: Mutex<State>,
}

impl Shared {
    pub(super) fn new(base_url: String, id_tokens: IdTokenSigner) -> Self {
        Self {
            base_url,
            id_tokens,
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

/// A Developer Connect `gitRepositoryLink` and who may fetch tokens for it.
pub(super) struct GitRepositoryLink {
    pub(super) git_username: String,
    pub(super) readers: Vec<String>,
    /// Writers may read too.
    pub(super) writers: Vec<String>,
}

/// What a token is good for. Only access tokens authenticate calls to Google APIs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum TokenKind {
    Access,
    Id,
    /// A Developer Connect repository token for `link`, with write access if `write`.
    Repository {
        link: String,
        write: bool,
    },
}

/// One entry of the token registry.
struct Record {
    info: IssuedToken,
    kind: TokenKind,
    revoked: bool,
}

/// How a token presented back to the emulator stands.
pub(super) enum Standing<'a> {
    Live(&'a IssuedToken),
    /// Issued with this kind, but expired or revoked since.
    Dead,
    /// Never issued, or not of the kind asked for.
    Unknown,
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
    /// The metadata server's project: ID and number.
    pub(super) metadata_project: Option<(String, u64)>,
    pub(super) account_connectors: HashSet<String>,
    pub(super) data_connectors: HashSet<String>,
    /// Link name → link.
    pub(super) git_repository_links: HashMap<String, GitRepositoryLink>,
    pub(super) requests: Vec<RecordedRequest>,
    /// Tokens in issue order; `tokens` holds what is known about each.
    pub(super) issued: Vec<String>,
    tokens: HashMap<String, Record>,
}

impl State {
    /// Logs a request and hands out what is scripted for it: its latency and its next fault.
    pub(super) fn admit(&mut self, request: RecordedRequest) -> (Duration, Option<Fault>) {
        let Some(endpoint) = request.endpoint else {
            self.requests.push(request);
            return (Duration::ZERO, None);
        };
        let mut latency = self.latencies.get(&endpoint).copied().unwrap_or_default();
        if matches!(endpoint, Endpoint::GenerateAccessToken | Endpoint::GenerateIdToken)
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

    /// Registers a new opaque token and returns it. Tokens look like the real ones (`ya29.` for
    /// Google's) but are recognisable as the emulator's, and are never reused.
    pub(super) fn issue(&mut self, info: IssuedToken, kind: TokenKind) -> String {
        let prefix = match kind {
            TokenKind::Repository { .. } => "emu_git_",
            TokenKind::Access | TokenKind::Id => "ya29.emu.",
        };
        let token = loop {
            let candidate: String = std::iter::repeat_with(fastrand::alphanumeric).take(48).collect();
            let candidate = format!("{prefix}{candidate}");
            if !self.tokens.contains_key(&candidate) {
                break candidate;
            }
        };
        self.record(token.clone(), info, kind);
        token
    }

    /// Registers a token made elsewhere (a signed JWT). The same JWT minted twice within a second
    /// is one token, listed once per issue.
    pub(super) fn record(&mut self, token: String, info: IssuedToken, kind: TokenKind) {
        self.issued.push(token.clone());
        let record = Record {
            info,
            kind,
            revoked: false,
        };
        self.tokens.insert(token, record);
    }

    /// What the emulator knows about `token`, whatever its kind and standing.
    pub(super) fn token_info(&self, token: &str) -> Option<&IssuedToken> {
        self.tokens.get(token).map(|record| &record.info)
    }

    /// Where `token` stands as a token of a kind that `accepts` admits.
    pub(super) fn standing(&self, token: &str, accepts: impl Fn(&TokenKind) -> bool) -> Standing<'_> {
        match self.tokens.get(token) {
            Some(record) if !accepts(&record.kind) => Standing::Unknown,
            Some(record) if record.revoked || record.info.expires_at <= SystemTime::now() => Standing::Dead,
            Some(record) => Standing::Live(&record.info),
            None => Standing::Unknown,
        }
    }

    /// An access token this emulator issued that has neither expired nor been revoked.
    pub(super) fn live_token(&self, token: &str) -> Option<&IssuedToken> {
        match self.standing(token, |kind| *kind == TokenKind::Access) {
            Standing::Live(info) => Some(info),
            Standing::Dead | Standing::Unknown => None,
        }
    }

    /// Marks `token` revoked, whatever its kind; unknown tokens are ignored.
    pub(super) fn revoke(&mut self, token: &str) {
        if let Some(record) = self.tokens.get_mut(token) {
            record.revoked = true;
        }
    }

    /// Whether `principal` may mint tokens for the service account `email`.
    pub(super) fn may_impersonate(&self, principal: &str, email: &str) -> bool {
        self.service_accounts
            .get(email)
            .is_some_and(|callers| grants(callers, principal))
    }

    /// Whether `principal` may fetch a read (or, if `write`, a read-write) token for `link`.
    pub(super) fn may_fetch(&self, principal: &str, link: &str, write: bool) -> bool {
        self.git_repository_links
            .get(link)
            .is_some_and(|link| grants(&link.writers, principal) || (!write && grants(&link.readers, principal)))
    }

    /// Whether a Git server should accept `username`:`password` for `link`: a live repository
    /// token issued for it, with write access if `write`, under the link's Git username.
    pub(super) fn git_credentials_valid(&self, link: &str, username: &str, password: &str, write: bool) -> bool {
        let fits = |kind: &TokenKind| {
            matches!(kind, TokenKind::Repository { link: issued_for, write: writable }
                if issued_for == link && (*writable || !write))
        };
        let registered = self.git_repository_links.get(link);
        registered.is_some_and(|l| l.git_username == username)
            && matches!(self.standing(password, fits), Standing::Live(_))
    }
}

/// Whether a list of principals (`"*"`: anyone with an emulator token) includes `principal`.
fn grants(principals: &[String], principal: &str) -> bool {
    principals.iter().any(|p| p == "*" || p == principal)
}

/// The account of an IAM Credentials path, `.../serviceAccounts/{account}:METHOD`.
fn impersonated_account(path: &str) -> Option<&str> {
    let (_, rest) = path.split_once("/serviceAccounts/")?;
    rest.split_once(':').map(|(account, _)| account)
}
