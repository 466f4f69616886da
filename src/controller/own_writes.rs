//! The resourceVersions of the operator's own Secret writes, so that their watch events do not
//! trigger another reconcile of the TokenRequest that just made them (and scheduled its own next
//! one). Every other change to a managed Secret, a deletion included (its event carries the
//! revision of the deletion), still triggers one.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, PoisonError},
};

use k8s_openapi::api::core::v1::Secret;

/// A create and the apply after it are the most one reconcile writes before their events return.
const KEPT_PER_SECRET: usize = 2;

/// Cloning shares the record. Hashes only: an entry is a few words, and only Secrets written and
/// not yet seen back have one.
#[derive(Clone, Default)]
pub struct OwnWrites {
    written: Arc<Mutex<HashMap<u64, Vec<u64>>>>,
    hasher: RandomState,
}

impl OwnWrites {
    fn key(&self, secret: &Secret) -> Option<(u64, u64)> {
        let namespace = secret.metadata.namespace.as_deref()?;
        let name = secret.metadata.name.as_deref()?;
        let version = secret.metadata.resource_version.as_deref()?;
        Some((self.hasher.hash_one((namespace, name)), self.hasher.hash_one(version)))
    }

    /// Notes a Secret as the apiserver returned it from the operator's write.
    pub fn record(&self, secret: &Secret) {
        let Some((key, version)) = self.key(secret) else {
            return;
        };
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let versions = written.entry(key).or_default();
        if versions.len() == KEPT_PER_SECRET {
            versions.remove(0);
        }
        versions.push(version);
    }

    /// Whether a watch event shows a state the operator itself wrote; it is forgotten then.
    pub fn is_own(&self, secret: &Secret) -> bool {
        let Some((key, version)) = self.key(secret) else {
            return false;
        };
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(versions) = written.get_mut(&key) else {
            return false;
        };
        let Some(at) = versions.iter().position(|v| *v == version) else {
            return false;
        };
        // Events come in order: versions written before this one will not be seen any more.
        versions.drain(..=at);
        if versions.is_empty() {
            written.remove(&key);
        }
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.written.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn secret(namespace: &str, name: &str, version: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn own_writes_are_recognised_once_and_then_forgotten() {
        let own = OwnWrites::default();
        own.record(&secret("a", "s", "10"));
        own.record(&secret("a", "s", "11"));
        assert!(own.is_own(&secret("a", "s", "10")));
        assert!(own.is_own(&secret("a", "s", "11")));
        assert!(!own.is_own(&secret("a", "s", "11")), "seen once");
        assert_eq!(own.len(), 0);
    }

    #[test]
    fn other_writes_and_other_secrets_are_not_own() {
        let own = OwnWrites::default();
        own.record(&secret("a", "s", "10"));
        assert!(!own.is_own(&secret("a", "s", "12")), "someone else's write");
        assert!(!own.is_own(&secret("b", "s", "10")), "another namespace");
        assert!(!own.is_own(&secret("a", "t", "10")), "another Secret");
        assert!(!own.is_own(&Secret::default()), "no identity");
        // A later event means the earlier versions will not come back.
        own.record(&secret("a", "s", "13"));
        assert!(own.is_own(&secret("a", "s", "13")));
        assert_eq!(own.len(), 0);
    }

    #[test]
    fn only_the_latest_writes_of_a_secret_are_kept() {
        let own = OwnWrites::default();
        for version in 1..=10 {
            own.record(&secret("a", "s", &version.to_string()));
        }
        assert_eq!(own.len(), 1);
        assert!(!own.is_own(&secret("a", "s", "8")));
        assert!(own.is_own(&secret("a", "s", "9")));
        assert!(own.is_own(&secret("a", "s", "10")));
    }
}
