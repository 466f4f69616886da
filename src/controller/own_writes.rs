//! The resourceVersions of the operator's own writes (of Secrets, of TokenRequests' status and
//! finalizer), recorded from the apiserver's answers and ticked off as their watch events come
//! back. For Secrets, so that those events do not trigger another reconcile of the TokenRequest
//! that just made them (and scheduled its own next one); every other change, a deletion included
//! (its event carries the revision of the deletion), still triggers one. For TokenRequests, so
//! that a reconcile does not act on a cached object older than the operator's own last write of it.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use kube::api::ObjectMeta;

/// A create and the apply after it are the most one reconcile writes before their events return.
const KEPT_PER_OBJECT: usize = 2;
/// A write not seen back within this long is taken as seen: a watch that restarted and relisted
/// a later state never shows it.
const SEEN_WITHIN: Duration = Duration::from_secs(5);

/// Cloning shares the record. Hashes only: an entry is a few words, and only objects written and
/// not yet seen back have one.
#[derive(Clone, Default)]
pub struct OwnWrites {
    written: Arc<Mutex<HashMap<u64, Written>>>,
    hasher: RandomState,
}

struct Written {
    versions: Vec<u64>,
    at: Instant,
}

impl OwnWrites {
    fn key(&self, meta: &ObjectMeta) -> Option<u64> {
        let namespace = meta.namespace.as_deref()?;
        let name = meta.name.as_deref()?;
        Some(self.hasher.hash_one((namespace, name)))
    }

    fn version(&self, meta: &ObjectMeta) -> Option<u64> {
        meta.resource_version.as_deref().map(|v| self.hasher.hash_one(v))
    }

    /// Notes an object as the apiserver returned it from the operator's write.
    pub fn record(&self, meta: &ObjectMeta) {
        let (Some(key), Some(version)) = (self.key(meta), self.version(meta)) else {
            return;
        };
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = written.entry(key).or_insert_with(|| Written {
            versions: Vec::new(),
            at: Instant::now(),
        });
        if entry.versions.len() == KEPT_PER_OBJECT {
            entry.versions.remove(0);
        }
        entry.versions.push(version);
        entry.at = Instant::now();
    }

    /// Whether a watch event shows a state the operator itself wrote; it is forgotten then.
    pub fn is_own(&self, meta: &ObjectMeta) -> bool {
        let (Some(key), Some(version)) = (self.key(meta), self.version(meta)) else {
            return false;
        };
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = written.get_mut(&key) else {
            return false;
        };
        let Some(at) = entry.versions.iter().position(|v| *v == version) else {
            return false;
        };
        // Events come in order: versions written before this one will not be seen any more.
        entry.versions.drain(..=at);
        if entry.versions.is_empty() {
            written.remove(&key);
        }
        true
    }

    /// Whether the operator wrote this object lately and the watch has not shown that write yet:
    /// a cached copy is older than what the operator knows.
    pub fn awaited(&self, meta: &ObjectMeta) -> bool {
        let Some(key) = self.key(meta) else {
            return false;
        };
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        match written.get(&key) {
            Some(entry) if entry.at.elapsed() < SEEN_WITHIN => true,
            Some(_) => {
                written.remove(&key);
                false
            }
            None => false,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.written.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(namespace: &str, name: &str, version: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            resource_version: Some(version.into()),
            ..Default::default()
        }
    }

    #[test]
    fn own_writes_are_recognised_once_and_then_forgotten() {
        let own = OwnWrites::default();
        own.record(&meta("a", "s", "10"));
        own.record(&meta("a", "s", "11"));
        assert!(
            own.awaited(&meta("a", "s", "9")),
            "the cache still shows an older state"
        );
        assert!(own.is_own(&meta("a", "s", "10")));
        assert!(own.awaited(&meta("a", "s", "10")), "11 is still to come");
        assert!(own.is_own(&meta("a", "s", "11")));
        assert!(!own.is_own(&meta("a", "s", "11")), "seen once");
        assert!(!own.awaited(&meta("a", "s", "11")));
        assert_eq!(own.len(), 0);
    }

    #[test]
    fn other_writes_and_other_objects_are_not_own() {
        let own = OwnWrites::default();
        own.record(&meta("a", "s", "10"));
        assert!(!own.is_own(&meta("a", "s", "12")), "someone else's write");
        assert!(!own.is_own(&meta("b", "s", "10")), "another namespace");
        assert!(!own.is_own(&meta("a", "t", "10")), "another object");
        assert!(!own.awaited(&meta("a", "t", "10")));
        assert!(!own.is_own(&ObjectMeta::default()), "no identity");
        // A later event means the earlier versions will not come back.
        own.record(&meta("a", "s", "13"));
        assert!(own.is_own(&meta("a", "s", "13")));
        assert_eq!(own.len(), 0);
    }

    #[test]
    fn only_the_latest_writes_of_an_object_are_kept() {
        let own = OwnWrites::default();
        for version in 1..=10 {
            own.record(&meta("a", "s", &version.to_string()));
        }
        assert_eq!(own.len(), 1);
        assert!(!own.is_own(&meta("a", "s", "8")));
        assert!(own.is_own(&meta("a", "s", "9")));
        assert!(own.is_own(&meta("a", "s", "10")));
    }
}
