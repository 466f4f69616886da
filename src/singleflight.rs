//! Calls made once for everyone who needs the same result at the same time ("single flight"), and
//! results kept while they are fresh. Keys are digests: what a call is made of (keys, tokens) is
//! never held here, only what it produced.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};

/// Names a call by everything that determines its outcome, without holding any of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key([u8; 32]);

impl Key {
    /// The SHA-256 of `parts`, each length-prefixed so that no two ways of splitting the same
    /// bytes give the same key.
    pub fn of(parts: &[&[u8]]) -> Self {
        let mut digest = Sha256::new();
        for part in parts {
            digest.update((part.len() as u64).to_be_bytes());
            digest.update(part);
        }
        Self(digest.finalize().into())
    }
}

type Flight<V, E> = Shared<BoxFuture<'static, Result<V, Arc<E>>>>;

enum Entry<V, E> {
    /// `id` tells this flight from a later one under the same key.
    InFlight {
        id: u64,
        flight: Flight<V, E>,
    },
    Fresh {
        value: V,
        until: Timestamp,
    },
}

struct Entries<V, E> {
    next_id: u64,
    map: HashMap<Key, Entry<V, E>>,
}

/// Outcomes of calls by key. Cloning shares the entries.
pub struct SingleFlight<V, E> {
    entries: Arc<Mutex<Entries<V, E>>>,
}

impl<V, E> Clone for SingleFlight<V, E> {
    fn clone(&self) -> Self {
        Self {
            entries: self.entries.clone(),
        }
    }
}

impl<V, E> Default for SingleFlight<V, E> {
    fn default() -> Self {
        Self {
            entries: Arc::new(Mutex::new(Entries {
                next_id: 0,
                map: HashMap::new(),
            })),
        }
    }
}

impl<V, E> SingleFlight<V, E>
where
    V: Clone + Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    /// The outcome for `key`: a value kept from earlier while it is fresh, else the outcome of the
    /// identical call in flight, else that of `call`, made now. A success is kept until
    /// `fresh_until` of it (`None`: not kept); a failure only reaches the callers that waited for
    /// it, and the next caller calls again.
    ///
    /// `call` runs to completion even if the caller that started it goes away, as long as
    /// another caller waits for it.
    pub async fn get_or_call<F>(&self, key: Key, call: F, fresh_until: fn(&V) -> Option<Timestamp>) -> Result<V, Arc<E>>
    where
        F: Future<Output = Result<V, E>> + Send + 'static,
    {
        let flight = {
            let mut entries = self.lock();
            let now = Timestamp::now();
            // Stale values go on every lookup: the map only ever holds what is in use.
            entries.map.retain(|_, e| match e {
                Entry::Fresh { until, .. } => *until > now,
                Entry::InFlight { .. } => true,
            });
            match entries.map.get(&key) {
                Some(Entry::Fresh { value, .. }) => return Ok(value.clone()),
                Some(Entry::InFlight { flight, .. }) => flight.clone(),
                None => {
                    let id = entries.next_id;
                    entries.next_id += 1;
                    let registry = Arc::downgrade(&self.entries);
                    let flight = async move {
                        let outcome = call.await.map_err(Arc::new);
                        settle(&registry, key, id, &outcome, fresh_until);
                        outcome
                    }
                    .boxed()
                    .shared();
                    entries.map.insert(
                        key,
                        Entry::InFlight {
                            id,
                            flight: flight.clone(),
                        },
                    );
                    flight
                }
            }
        };
        flight.await
    }

    /// Drops the value kept for `key`, e.g. a token Google no longer accepts.
    pub fn forget(&self, key: &Key) {
        let mut entries = self.lock();
        if matches!(entries.map.get(key), Some(Entry::Fresh { .. })) {
            entries.map.remove(key);
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.lock().map.is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, Entries<V, E>> {
        lock(&self.entries)
    }
}

fn lock<V, E>(entries: &Mutex<Entries<V, E>>) -> MutexGuard<'_, Entries<V, E>> {
    // Nothing is left half-written under the lock: a panic elsewhere does not make it unusable.
    entries.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Replaces flight `id` with its value while fresh, or with nothing; unless a later flight (after
/// a `forget`) has taken its place.
fn settle<V: Clone, E>(
    registry: &Weak<Mutex<Entries<V, E>>>,
    key: Key,
    id: u64,
    outcome: &Result<V, Arc<E>>,
    fresh_until: fn(&V) -> Option<Timestamp>,
) {
    let Some(registry) = registry.upgrade() else {
        return;
    };
    let mut entries = lock(&registry);
    if !matches!(entries.map.get(&key), Some(Entry::InFlight { id: current, .. }) if *current == id) {
        return;
    }
    let keep = outcome
        .as_ref()
        .ok()
        .and_then(|value| Some((value, fresh_until(value)?)))
        .filter(|(_, until)| *until > Timestamp::now());
    match keep {
        Some((value, until)) => {
            let value = value.clone();
            entries.map.insert(key, Entry::Fresh { value, until });
        }
        None => {
            entries.map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use super::*;

    fn later(_: &u32) -> Option<Timestamp> {
        Timestamp::now().checked_add(Duration::from_secs(60)).ok()
    }

    fn never(_: &u32) -> Option<Timestamp> {
        None
    }

    /// A call that counts itself and answers `value` after a while.
    fn call(
        calls: &Arc<AtomicUsize>,
        value: Result<u32, &'static str>,
    ) -> impl Future<Output = Result<u32, String>> + use<> {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            value.map_err(String::from)
        }
    }

    #[test]
    fn keys_differ_by_every_part_and_by_how_parts_split() {
        assert_eq!(Key::of(&[b"a", b"bc"]), Key::of(&[b"a", b"bc"]));
        assert_ne!(Key::of(&[b"a", b"bc"]), Key::of(&[b"ab", b"c"]));
        assert_ne!(Key::of(&[b"a", b"bc"]), Key::of(&[b"a", b"bd"]));
        assert_ne!(Key::of(&[b"a"]), Key::of(&[b"a", b""]));
    }

    #[tokio::test]
    async fn concurrent_identical_calls_are_made_once_and_kept_while_fresh() {
        let flights = SingleFlight::<u32, String>::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let key = Key::of(&[b"k"]);
        let outcomes =
            futures::future::join_all((0..10).map(|_| flights.get_or_call(key, call(&calls, Ok(7)), later))).await;
        assert!(outcomes.iter().all(|o| o.as_ref().ok() == Some(&7)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Kept: no second call.
        assert_eq!(flights.get_or_call(key, call(&calls, Ok(8)), later).await.ok(), Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Another key is another call.
        let other = flights
            .get_or_call(Key::of(&[b"other"]), call(&calls, Ok(9)), later)
            .await;
        assert_eq!(other.ok(), Some(9));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        flights.forget(&key);
        assert_eq!(
            flights.get_or_call(key, call(&calls, Ok(10)), later).await.ok(),
            Some(10)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn failures_are_shared_by_waiters_but_not_kept() {
        let flights = SingleFlight::<u32, String>::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let key = Key::of(&[b"k"]);
        let outcomes =
            futures::future::join_all((0..5).map(|_| flights.get_or_call(key, call(&calls, Err("no")), later))).await;
        assert!(
            outcomes
                .iter()
                .all(|o| o.as_ref().err().map(|e| e.as_str()) == Some("no"))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty());
        assert!(flights.get_or_call(key, call(&calls, Ok(1)), later).await.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn values_without_freshness_are_only_shared_in_flight() {
        let flights = SingleFlight::<u32, String>::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let key = Key::of(&[b"k"]);
        let (a, b) = tokio::join!(
            flights.get_or_call(key, call(&calls, Ok(1)), never),
            flights.get_or_call(key, call(&calls, Ok(2)), never)
        );
        assert_eq!((a.ok(), b.ok()), (Some(1), Some(1)));
        assert!(flights.is_empty());
        assert_eq!(flights.get_or_call(key, call(&calls, Ok(3)), never).await.ok(), Some(3));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_call_outlives_the_caller_that_started_it() {
        let flights = SingleFlight::<u32, String>::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let key = Key::of(&[b"k"]);
        let first = flights.get_or_call(key, call(&calls, Ok(1)), later);
        // Started, then abandoned (a cancelled reconcile).
        assert!(tokio::time::timeout(Duration::from_millis(1), first).await.is_err());
        let second = flights.get_or_call(key, call(&calls, Ok(2)), later).await;
        assert_eq!(second.ok(), Some(1));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
