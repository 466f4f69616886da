//! Events (`events.k8s.io/v1`) about TokenRequests.
//!
//! kube's `Recorder` is not used: it names an Event after the object plus a timestamp, which is
//! longer than an object name may be for names over 236 characters, so such TokenRequests would
//! get no Events at all; and it keeps every Event for six minutes and scans them all on each
//! publish (O(N²) over a cold start of N objects). Here a one-off Event is created and forgotten,
//! and a repeated one (same object, type and reason within six minutes) is counted into the
//! series of the first, which is what `kubectl describe` shows as `(x5 over 3m)`.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event as KubeEvent, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};

use crate::{names, status};

/// How long an Event keeps counting repeats, as client-go's and kube's recorders do.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// Room in an Event's name for the object's name: 253 less a dot and 16 hex digits.
const NAME_ROOM: usize = 253 - 17;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

/// One thing to report about an object.
pub struct Event {
    pub type_: EventType,
    pub reason: String,
    pub note: String,
    pub action: String,
}

/// Who reports: the controller's name and this replica's instance.
pub struct Reporter {
    pub controller: String,
    pub instance: String,
}

#[derive(PartialEq, Eq, Hash)]
struct SeriesKey {
    uid: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    type_: EventType,
    reason: String,
}

struct SeriesEntry {
    event_name: String,
    count: i32,
    last: Timestamp,
}

pub struct EventRecorder {
    client: Client,
    reporter: Reporter,
    series: Mutex<Series>,
}

/// Recent repeatable Events. Expired entries are swept when the map has doubled since the last
/// sweep, so the cost per publish stays constant and the size follows the Events of the window.
#[derive(Default)]
struct Series {
    entries: HashMap<SeriesKey, SeriesEntry>,
    swept_at_len: usize,
}

impl Series {
    fn sweep(&mut self, now: Timestamp) {
        if self.entries.len() < 2 * self.swept_at_len.max(64) {
            return;
        }
        self.entries.retain(|_, e| within_window(e.last, now));
        self.swept_at_len = self.entries.len();
    }
}

fn within_window(last: Timestamp, now: Timestamp) -> bool {
    crate::refresh::later(last, SERIES_WINDOW) > now
}

impl EventRecorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            series: Mutex::default(),
        }
    }

    /// Publishes `event` about `regarding`: a new Event, or the next count of a Warning's series.
    pub async fn publish(&self, event: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<KubeEvent> = Api::namespaced(self.client.clone(), namespace);
        let key = SeriesKey {
            uid: regarding.uid.clone(),
            namespace: regarding.namespace.clone(),
            name: regarding.name.clone(),
            type_: event.type_,
            reason: event.reason.clone(),
        };
        // Only Warnings repeat (one per failed retry); one-off Events are not remembered.
        let repeat = (event.type_ == EventType::Warning)
            .then(|| self.next_in_series(&key, now))
            .flatten();
        if let Some((event_name, count)) = repeat {
            let patch = serde_json::json!({
                "note": status::bounded(event.note.clone()),
                "series": EventSeries { count, last_observed_time: MicroTime(now) },
            });
            match api
                .patch(&event_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                // Deleted meanwhile (Events have a TTL): start a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let created = api
            .create(&PostParams::default(), &self.new_event(event, regarding, now))
            .await?;
        if event.type_ == EventType::Warning {
            let entry = SeriesEntry {
                event_name: created.metadata.name.unwrap_or_default(),
                count: 1,
                last: now,
            };
            let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
            series.sweep(now);
            series.entries.insert(key, entry);
        }
        Ok(())
    }

    /// The Event to patch and its new count, if `key` was published within the window.
    fn next_in_series(&self, key: &SeriesKey, now: Timestamp) -> Option<(String, i32)> {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = series.entries.get_mut(key).filter(|e| within_window(e.last, now))?;
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        Some((entry.event_name.clone(), entry.count))
    }

    fn new_event(&self, event: &Event, regarding: &ObjectReference, now: Timestamp) -> KubeEvent {
        let object = regarding.name.as_deref().unwrap_or(&self.reporter.controller);
        // Unique enough: object and time, as kube's names, plus the reason for two at once.
        let mut hasher = DefaultHasher::new();
        (now.as_nanosecond(), &event.reason).hash(&mut hasher);
        KubeEvent {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:016x}", names::fit(object, NAME_ROOM), hasher.finish())),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: Some(status::bounded(event.note.clone())),
            type_: Some(event.type_.as_str().into()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(self.reporter.instance.clone()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(reason: &str) -> SeriesKey {
        SeriesKey {
            uid: Some("u".into()),
            namespace: Some("ns".into()),
            name: Some("tr".into()),
            type_: EventType::Warning,
            reason: reason.into(),
        }
    }

    #[test]
    fn expired_series_are_swept_as_the_map_grows() {
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let later = crate::refresh::later(t0, SERIES_WINDOW + Duration::from_secs(1));
        let mut series = Series::default();
        let mut add = |i: usize, at: Timestamp| {
            let entry = SeriesEntry {
                event_name: format!("e{i}"),
                count: 1,
                last: at,
            };
            series.entries.insert(key(&format!("r{i}")), entry);
            series.sweep(at);
            series.entries.len()
        };
        let fresh: Vec<usize> = (0..200).map(|i| add(i, t0)).collect();
        assert_eq!(fresh.last(), Some(&200), "nothing expired yet");
        let later_sizes: Vec<usize> = (200..400).map(|i| add(i, later)).collect();
        assert!(later_sizes.iter().any(|n| *n < 200), "the expired ones were swept");
        assert!(series.entries.len() < 300, "{}", series.entries.len());
        assert!(series.entries.values().all(|e| e.last == later));
    }
}
