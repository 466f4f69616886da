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

# The chart tests drive Helm's Go library through helm-sdkpy (there is no helm binary in the
# package registries); it lives in a virtualenv of its own, so no system Python is touched.
helm_python="${XDG_CACHE_HOME:-$HOME/.cache}/gcp-token-operator/helm-sdkpy"
if ! "$helm_python/bin/python" -c 'import helm_sdkpy' 2>/dev/null; then
  log "installing helm-sdkpy into $helm_python"
  if ! python3 -c 'import ensurepip' 2>/dev/null; then
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv
  fi
  python3 -m venv "$helm_python"
  # It declares Python >= 3.12 but works on Debian 12's 3.11.
  "$helm_python/bin/pip" install -q --ignore-requires-python helm-sdkpy==0.1.32
fi
export GCP_TOKEN_OPERATOR_PYTHON="$helm_python/bin/python"

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
