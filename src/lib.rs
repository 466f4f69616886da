//! gcp-token-operator: keeps short-lived Google OAuth access tokens fresh in Kubernetes Secrets.
//!
//! The domain lives here (CRD types, validation, refresh policy, Secret rendering, Google calls,
//! the reconciler); `main.rs` only parses flags and wires things together.

pub mod attachment;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod credentials;
pub mod events;
pub mod fairness;
pub mod formats;
pub mod google;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod plugin;
pub mod ratelimit;
pub mod refresh;
pub mod render;
pub mod rollout;
pub mod singleflight;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod template;
pub mod validation;

/// The CRD as YAML, as `gcp-token-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_saphyr::to_string(&crd::TokenRequest::crd()).expect("the CRD serializes")
}
