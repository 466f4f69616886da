//! The test substrate: a real Kubernetes control plane started from local binaries and an emulator of
//! Google's token endpoints. Used by the integration tests and the local demo (`dev-env`); release
//! builds leave it out (`--no-default-features`).

pub mod control_plane;
pub mod emulator;
pub mod examples;
pub mod operator;
