//! TokenRequests by the upstream TokenRequest their `tokenRequest` source names, kept up to date
//! from the TokenRequest watch: a managed Secret's change finds the TokenRequests that depend on
//! it without scanning every TokenRequest of the cluster.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use kube::{
    ResourceExt,
    runtime::{reflector::ObjectRef, watcher},
};

use crate::crd::TokenRequest;

type Ref = ObjectRef<TokenRequest>;

/// Cloning shares the index.
#[derive(Clone, Default)]
pub struct Dependents {
    index: Arc<Mutex<Index>>,
}

#[derive(Default)]
struct Index {
    live: Links,
    /// Built from a relist while it runs; replaces `live` when it is complete.
    relist: Option<Links>,
}

#[derive(Default)]
struct Links {
    by_upstream: HashMap<Ref, HashSet<Ref>>,
    upstream_of: HashMap<Ref, Ref>,
}

impl Links {
    fn set(&mut self, tr: &TokenRequest) {
        let Some(namespace) = tr.namespace() else {
            return;
        };
        let dependent = ObjectRef::new(&tr.name_any()).within(&namespace);
        self.remove(&dependent);
        if let Some(source) = &tr.spec.source.token_request {
            let upstream = ObjectRef::new(&source.name).within(&namespace);
            self.by_upstream
                .entry(upstream.clone())
                .or_default()
                .insert(dependent.clone());
            self.upstream_of.insert(dependent, upstream);
        }
    }

    fn remove(&mut self, dependent: &Ref) {
        let Some(upstream) = self.upstream_of.remove(dependent) else {
            return;
        };
        if let Some(dependents) = self.by_upstream.get_mut(&upstream) {
            dependents.remove(dependent);
            if dependents.is_empty() {
                self.by_upstream.remove(&upstream);
            }
        }
    }
}

impl Dependents {
    /// Follows one event of the TokenRequest watch.
    pub fn observe(&self, event: &watcher::Event<TokenRequest>) {
        let mut index = self.lock();
        match event {
            watcher::Event::Apply(tr) => index.live.set(tr),
            watcher::Event::Delete(tr) => {
                if let Some(namespace) = tr.namespace() {
                    index.live.remove(&ObjectRef::new(&tr.name_any()).within(&namespace));
                }
            }
            watcher::Event::Init => index.relist = Some(Links::default()),
            watcher::Event::InitApply(tr) => index.relist.get_or_insert_with(Links::default).set(tr),
            watcher::Event::InitDone => {
                if let Some(relisted) = index.relist.take() {
                    index.live = relisted;
                }
            }
        }
    }

    /// The TokenRequests whose source is `upstream`.
    pub fn of(&self, upstream: &Ref) -> Vec<Ref> {
        self.lock()
            .live
            .by_upstream
            .get(upstream)
            .map(|dependents| dependents.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // Each update completes under the lock before anything can panic.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(namespace: &str, name: &str, upstream: Option<&str>) -> TokenRequest {
        let source = match upstream {
            Some(up) => serde_json::json!({"tokenRequest": {"name": up}}),
            None => serde_json::json!({"secret": {"name": "caller", "key": "token"}}),
        };
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gcptoken.dev/v1alpha1",
            "kind": "TokenRequest",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"flow": {"sts": {"audience": "a"}}, "source": source},
        }))
        .unwrap()
    }

    fn of(index: &Dependents, namespace: &str, upstream: &str) -> Vec<String> {
        let mut names: Vec<String> = index
            .of(&ObjectRef::new(upstream).within(namespace))
            .into_iter()
            .map(|r| r.name)
            .collect();
        names.sort();
        names
    }

    #[test]
    fn follows_applies_changes_and_deletes() {
        let index = Dependents::default();
        index.observe(&watcher::Event::Apply(tr("a", "down-1", Some("up"))));
        index.observe(&watcher::Event::Apply(tr("a", "down-2", Some("up"))));
        index.observe(&watcher::Event::Apply(tr("b", "down-3", Some("up"))));
        index.observe(&watcher::Event::Apply(tr("a", "up", None)));
        assert_eq!(of(&index, "a", "up"), ["down-1", "down-2"]);
        assert_eq!(of(&index, "b", "up"), ["down-3"], "namespaces are apart");
        // down-2 now uses another upstream.
        index.observe(&watcher::Event::Apply(tr("a", "down-2", Some("other"))));
        assert_eq!(of(&index, "a", "up"), ["down-1"]);
        assert_eq!(of(&index, "a", "other"), ["down-2"]);
        index.observe(&watcher::Event::Delete(tr("a", "down-1", Some("up"))));
        assert!(of(&index, "a", "up").is_empty());
        let up = ObjectRef::new("up").within("a");
        assert!(
            !index.lock().live.by_upstream.contains_key(&up),
            "emptied upstreams are dropped"
        );
    }

    #[test]
    fn a_relist_replaces_what_it_no_longer_holds() {
        let index = Dependents::default();
        index.observe(&watcher::Event::Apply(tr("a", "gone", Some("up"))));
        index.observe(&watcher::Event::Init);
        index.observe(&watcher::Event::InitApply(tr("a", "kept", Some("up"))));
        // Until the relist completes, the index as it was still answers.
        assert_eq!(of(&index, "a", "up"), ["gone"]);
        index.observe(&watcher::Event::InitDone);
        assert_eq!(of(&index, "a", "up"), ["kept"]);
        assert_eq!(index.lock().live.upstream_of.len(), 1);
    }
}
