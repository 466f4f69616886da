//! The test substrate of gcp-token-operator: a real Kubernetes control plane built from the
//! published Go modules (`kube/`), an emulator of Google's token endpoints, the operator binary
//! as a child process and its release image under podman. Used by the operator's integration tests and benchmark (as a dev-dependency)
//! and by the local demo (`dev-env`); nothing of it is in the operator itself.

pub mod container;
pub mod control_plane;
pub mod emulator;
pub mod examples;
pub mod git_server;
pub mod go;
pub mod operator;
