//! How the watches fetch what exists when they start. As a streaming list (a watch whose first
//! events are the objects), no response holds more than one object: at 10,000 TokenRequests the
//! paged lists' responses, decoded beside the caches they fill, were most of the operator's peak
//! memory. Streaming lists need the apiserver's `WatchList` feature (on by default since
//! Kubernetes 1.34); elsewhere the lists are paged.

use std::time::Duration;

use futures::TryStreamExt;
use kube::{
    Api, Client,
    api::{WatchEvent, WatchParams},
};
use tracing::info;

use crate::crd::TokenRequest;

/// How long the probe waits for the apiserver's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Marks the bookmark that ends a streaming list's initial events.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InitialList {
    /// Streaming where the apiserver serves it, paged elsewhere.
    Auto,
    Streaming,
    Paged,
}

impl InitialList {
    /// Whether the watches stream their initial lists; `Auto` asks the apiserver once.
    pub async fn streams(self, client: &Client, namespace: Option<&str>) -> bool {
        match self {
            Self::Streaming => true,
            Self::Paged => false,
            Self::Auto => {
                let streams = serves_streaming_lists(client, namespace).await;
                info!(streams, "initial lists: {}", if streams { "streamed" } else { "paged" });
                streams
            }
        }
    }
}

/// A streaming watch of TokenRequests selecting none: an apiserver that serves streaming lists
/// ends the initial events with the marked bookmark at once; one that does not refuses the
/// parameter, or ignores it and sends no such bookmark.
async fn serves_streaming_lists(client: &Client, namespace: Option<&str>) -> bool {
    let api: Api<TokenRequest> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let params = WatchParams::default()
        .initial_events()
        .labels("gcptoken.dev/streaming-list-probe")
        .timeout(PROBE_TIMEOUT.as_secs() as u32);
    let probe = async {
        let mut events = Box::pin(api.watch(&params, "0").await.ok()?);
        while let Some(event) = events.try_next().await.ok()? {
            if let WatchEvent::Bookmark(bookmark) = event
                && bookmark
                    .metadata
                    .annotations
                    .get(INITIAL_EVENTS_END)
                    .map(String::as_str)
                    == Some("true")
            {
                return Some(());
            }
        }
        None
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .ok()
        .flatten()
        .is_some()
}
