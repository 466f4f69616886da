#!/usr/bin/env bash
# The project's one test command (README "Testing"; .ci/run calls it). On a fresh Debian machine
# it installs what is missing, builds or reuses the cached control plane, then runs formatting,
# lints and every test, including the ones against the real control plane and the Google emulator.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "== $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    log "installing the $component component"
    rustup component add "$component"
  fi
done
if ! command -v kubectl >/dev/null; then
  log "installing kubectl (Debian's kubernetes-client)"
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client
fi

# Build artifacts live outside the repository so that fresh clones (CI) start warm.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gcp-token-operator/target}"

started=$(date +%s)
log "control plane binaries"
if ! assets=$(scripts/control-plane-binaries.sh); then
  echo "FAILED: the control plane binaries could not be built or found; see the messages above" >&2
  exit 1
fi
export KUBEBUILDER_ASSETS="$assets"
log "control plane binaries in $KUBEBUILDER_ASSETS ($(( $(date +%s) - started ))s)"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
log "cargo test"
cargo test --all-targets --locked -- "$@"
log "done in $(( $(date +%s) - started ))s"
