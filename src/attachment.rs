//! Attaching a pull Secret to ServiceAccounts: which entries to add or remove, and the patches
//! that do it without touching anyone else's. Pure functions.
//!
//! `imagePullSecrets` is an atomic list (`+listType=atomic` in k8s.io/api), so a server-side
//! apply of one entry would own, and replace, the whole list. A JSON patch instead adds or removes
//! exactly the operator's entry, guarded by a `test` of the resourceVersion it was computed from:
//! a concurrent change makes the apiserver refuse it (422) and it is computed again.

use json_patch::{
    AddOperation, Patch, PatchOperation, RemoveOperation, TestOperation,
    jsonptr::{PointerBuf, Token},
};
use k8s_openapi::api::core::v1::{LocalObjectReference, ServiceAccount};
use serde_json::Value;

use crate::crd::ServiceAccountAttachment;

/// What to change to go from the entries recorded to the ones wanted.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub attach: Vec<ServiceAccountAttachment>,
    pub detach: Vec<ServiceAccountAttachment>,
}

/// Entries recorded and no longer wanted are detached; wanted ones not recorded are attached, and
/// with `verify` (a new token, a changed spec) every wanted one is checked, as someone may have
/// edited the ServiceAccount since.
pub fn plan(wanted: &[String], secret: &str, recorded: &[ServiceAccountAttachment], verify: bool) -> Plan {
    let wanted: Vec<ServiceAccountAttachment> = wanted
        .iter()
        .map(|service_account| ServiceAccountAttachment {
            service_account: service_account.clone(),
            secret: secret.to_string(),
        })
        .collect();
    Plan {
        attach: wanted
            .iter()
            .filter(|w| verify || !recorded.contains(w))
            .cloned()
            .collect(),
        detach: recorded.iter().filter(|r| !wanted.contains(r)).cloned().collect(),
    }
}

/// Keeps `recorded` within `limit` entries: every wanted one stays, and of the entries still to be
/// removed (their removal failed) the first in order, up to the limit. Returns those kept and
/// those given up on, which nothing will remove any more.
pub fn bounded(
    mut recorded: Vec<ServiceAccountAttachment>,
    wanted: &[String],
    secret: &str,
    limit: usize,
) -> (Vec<ServiceAccountAttachment>, Vec<ServiceAccountAttachment>) {
    recorded.sort();
    recorded.dedup();
    let is_wanted = |r: &ServiceAccountAttachment| r.secret == secret && wanted.contains(&r.service_account);
    let (mut kept, stale): (Vec<_>, Vec<_>) = recorded.into_iter().partition(is_wanted);
    let room = limit.saturating_sub(kept.len());
    let given_up = stale.iter().skip(room).cloned().collect();
    kept.extend(stale.into_iter().take(room));
    kept.sort();
    (kept, given_up)
}

/// The patch that adds `secret` to the ServiceAccount's `imagePullSecrets`; `None` when it is
/// listed already.
pub fn attach_patch(account: &ServiceAccount, secret: &str) -> Option<Patch> {
    let entry = serde_json::to_value(LocalObjectReference { name: secret.into() }).ok()?;
    let add = match &account.image_pull_secrets {
        Some(list) if list.iter().any(|r| r.name == secret) => return None,
        Some(_) => AddOperation {
            path: pointer(["imagePullSecrets", "-"]),
            value: entry,
        },
        None => AddOperation {
            path: pointer(["imagePullSecrets"]),
            value: Value::Array(vec![entry]),
        },
    };
    Some(Patch(vec![unchanged_since_read(account), PatchOperation::Add(add)]))
}

/// The patch that removes every entry naming `secret` (the last one takes the list with it);
/// `None` when there is none.
pub fn detach_patch(account: &ServiceAccount, secret: &str) -> Option<Patch> {
    let list = account.image_pull_secrets.as_deref().unwrap_or_default();
    let ours: Vec<usize> = (0..list.len()).filter(|&i| list[i].name == secret).collect();
    if ours.is_empty() {
        return None;
    }
    let mut ops = vec![unchanged_since_read(account)];
    if ours.len() == list.len() {
        ops.push(PatchOperation::Remove(RemoveOperation {
            path: pointer(["imagePullSecrets"]),
        }));
    } else {
        // From the end, so that each index still names the entry it was computed for.
        ops.extend(ours.iter().rev().map(|&i| {
            PatchOperation::Remove(RemoveOperation {
                path: pointer(["imagePullSecrets".to_string(), i.to_string()]),
            })
        }));
    }
    Some(Patch(ops))
}

fn unchanged_since_read(account: &ServiceAccount) -> PatchOperation {
    PatchOperation::Test(TestOperation {
        path: pointer(["metadata", "resourceVersion"]),
        value: account
            .metadata
            .resource_version
            .clone()
            .map_or(Value::Null, Value::String),
    })
}

fn pointer<T: Into<String>>(tokens: impl IntoIterator<Item = T>) -> PointerBuf {
    PointerBuf::from_tokens(tokens.into_iter().map(|t| Token::new(t.into())))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use proptest::prelude::*;

    use super::*;

    fn account(entries: Option<Vec<&str>>) -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some("builder".into()),
                resource_version: Some("42".into()),
                ..ObjectMeta::default()
            },
            image_pull_secrets: entries.map(|names| {
                names
                    .into_iter()
                    .map(|n| LocalObjectReference { name: n.into() })
                    .collect()
            }),
            ..ServiceAccount::default()
        }
    }

    fn entry(account: &str, secret: &str) -> ServiceAccountAttachment {
        ServiceAccountAttachment {
            service_account: account.into(),
            secret: secret.into(),
        }
    }

    #[test]
    fn the_record_keeps_what_is_wanted_and_gives_up_the_oldest_removals() {
        let wanted = ["a".to_string(), "b".to_string()];
        let recorded = vec![
            entry("z", "pull"),
            entry("b", "pull"),
            entry("x", "old"),
            entry("a", "pull"),
            entry("a", "pull"),
            entry("y", "pull"),
        ];
        let (kept, given_up) = bounded(recorded.clone(), &wanted, "pull", 4);
        assert_eq!(
            kept,
            [
                entry("a", "pull"),
                entry("b", "pull"),
                entry("x", "old"),
                entry("y", "pull")
            ]
        );
        assert_eq!(given_up, [entry("z", "pull")]);
        let (kept, given_up) = bounded(recorded, &wanted, "pull", 32);
        assert_eq!(kept.len(), 5, "duplicates folded: {kept:?}");
        assert!(given_up.is_empty());
    }

    proptest! {
        #[test]
        fn the_record_never_exceeds_its_limit_nor_drops_a_wanted_entry(
            recorded in prop::collection::vec(("[a-d]", "[pq]"), 0..40),
            wanted in prop::collection::btree_set("[a-d]", 0..4),
            limit in 4usize..8,
        ) {
            let recorded: Vec<_> = recorded.iter().map(|(a, s)| entry(a, s)).collect();
            let wanted: Vec<String> = wanted.into_iter().collect();
            let (kept, given_up) = bounded(recorded.clone(), &wanted, "p", limit);
            prop_assert!(kept.len() <= limit);
            for r in &recorded {
                prop_assert!(kept.contains(r) != given_up.contains(r), "{r:?} kept or given up, once");
                if r.secret == "p" && wanted.contains(&r.service_account) {
                    prop_assert!(kept.contains(r));
                }
            }
        }
    }

    /// Applies the patch as the apiserver would, to the ServiceAccount as JSON.
    fn applied(account: &ServiceAccount, patch: &Patch) -> Result<ServiceAccount, json_patch::PatchError> {
        let mut doc = serde_json::to_value(account).unwrap();
        json_patch::patch(&mut doc, patch)?;
        Ok(serde_json::from_value(doc).unwrap())
    }

    fn names(account: &ServiceAccount) -> Option<Vec<String>> {
        account
            .image_pull_secrets
            .as_ref()
            .map(|l| l.iter().map(|r| r.name.clone()).collect())
    }

    fn attachment(service_account: &str, secret: &str) -> ServiceAccountAttachment {
        ServiceAccountAttachment {
            service_account: service_account.into(),
            secret: secret.into(),
        }
    }

    #[test]
    fn attaching_appends_or_creates_the_list_and_is_idempotent() {
        let with_others = account(Some(vec!["theirs"]));
        let patched = applied(&with_others, &attach_patch(&with_others, "pull").unwrap()).unwrap();
        assert_eq!(names(&patched), Some(vec!["theirs".into(), "pull".into()]));
        assert_eq!(attach_patch(&patched, "pull"), None);

        let without = account(None);
        let patched = applied(&without, &attach_patch(&without, "pull").unwrap()).unwrap();
        assert_eq!(names(&patched), Some(vec!["pull".into()]));
    }

    #[test]
    fn detaching_removes_only_the_entries_naming_the_secret() {
        let mixed = account(Some(vec!["pull", "theirs", "pull", "other"]));
        let patched = applied(&mixed, &detach_patch(&mixed, "pull").unwrap()).unwrap();
        assert_eq!(names(&patched), Some(vec!["theirs".into(), "other".into()]));
        assert_eq!(detach_patch(&patched, "pull"), None);

        let only_ours = account(Some(vec!["pull"]));
        let patched = applied(&only_ours, &detach_patch(&only_ours, "pull").unwrap()).unwrap();
        assert_eq!(names(&patched), None);
        assert_eq!(detach_patch(&account(None), "pull"), None);
    }

    #[test]
    fn a_patch_fails_once_the_account_changed_since_it_was_read() {
        let read = account(Some(vec!["theirs"]));
        let patch = attach_patch(&read, "pull").unwrap();
        let mut changed = read.clone();
        changed.metadata.resource_version = Some("43".into());
        changed.image_pull_secrets = None;
        assert!(applied(&changed, &patch).is_err());
    }

    #[test]
    fn the_plan_detaches_what_is_no_longer_wanted_and_checks_all_when_verifying() {
        let recorded = [
            attachment("a", "pull"),
            attachment("b", "pull"),
            attachment("a", "old-name"),
        ];
        let wanted = ["a".to_string(), "c".to_string()];
        let plan = plan(&wanted, "pull", &recorded, false);
        assert_eq!(plan.attach, [attachment("c", "pull")]);
        assert_eq!(plan.detach, [attachment("b", "pull"), attachment("a", "old-name")]);
        let verify = super::plan(&wanted, "pull", &recorded, true);
        assert_eq!(verify.attach, [attachment("a", "pull"), attachment("c", "pull")]);
        assert_eq!(super::plan(&[], "pull", &[], true), Plan::default());
    }

    proptest! {
        /// Whatever the list holds (names crafted to look like JSON pointers included), attaching
        /// then detaching leaves every other entry as it was, in its order.
        #[test]
        fn attach_then_detach_leaves_other_entries_alone(
            list in proptest::option::of(proptest::collection::vec(
                prop_oneof![Just("pull".to_string()), "[a-z0-9~/.-]{0,12}"], 0..8)),
        ) {
            let entries = list.as_ref().map(|l| l.iter().map(String::as_str).collect());
            let start = account(entries);
            let others: Vec<String> = names(&start).unwrap_or_default().into_iter().filter(|n| n != "pull").collect();
            let attached = match attach_patch(&start, "pull") {
                Some(patch) => applied(&start, &patch).unwrap(),
                None => start.clone(),
            };
            let listed = names(&attached).unwrap();
            prop_assert!(listed.iter().any(|n| n == "pull"));
            prop_assert_eq!(listed.iter().filter(|n| *n != "pull").cloned().collect::<Vec<_>>(), others.clone());
            let detached = applied(&attached, &detach_patch(&attached, "pull").unwrap()).unwrap();
            prop_assert_eq!(names(&detached).unwrap_or_default(), others);
        }
    }
}
