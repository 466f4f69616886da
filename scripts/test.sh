#!/usr/bin/env bash
# The project's one test command (README "Testing"; .ci/run calls it). On a fresh Debian machine
# with Rust and Go it installs what is missing, builds or reuses the cached test substrate
# (Kubernetes, etcd, kubectl and Helm from the Go module proxy), then runs formatting, lints and
# every test, including the ones against the real control plane and the Google emulator.
#
#   scripts/test.sh                        every test on the newest pinned Kubernetes minor; with
#                                          CI=true or --all-versions, then the end-to-end operator,
#                                          CRD, chart, admission, example, format and attachment tests on every
#                                          other pinned minor
#   scripts/test.sh --kube-version 1.34    every test on Kubernetes 1.34 only (also KUBE_VERSION=1.34)
#   scripts/test.sh -- NAME_FILTER         arguments after `--` go to the test binaries
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "== $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

kube_version=${KUBE_VERSION:-}
all_versions=${CI:-false}
while [ $# -gt 0 ]; do
  case $1 in
    --kube-version) kube_version=${2:?--kube-version needs a minor such as 1.34}; shift 2 ;;
    --kube-version=*) kube_version=${1#*=}; shift ;;
    --all-versions) all_versions=true; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
# An explicit version is the whole run.
[ -n "$kube_version" ] && all_versions=false

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    log "installing the $component component"
    rustup component add "$component"
  fi
done
# flock serialises substrate builds; the end-to-end tests run the real git (with its
# git-http-backend) and curl as consumers of the Secrets the operator writes.
packages=()
command -v flock >/dev/null || packages+=(util-linux)
command -v git >/dev/null && [ -x "$(git --exec-path)/git-http-backend" ] || packages+=(git)
command -v curl >/dev/null || packages+=(curl)
# tests/alerts.rs checks and unit-tests the chart's alerts with Prometheus's own promtool.
command -v promtool >/dev/null || packages+=(prometheus)
# tests/image.rs builds the release image offline and runs it with podman (scripts/image.sh), on
# Debian's runc.
command -v podman >/dev/null || packages+=(podman)
command -v runc >/dev/null || packages+=(runc)
if [ ${#packages[@]} -gt 0 ]; then
  log "installing ${packages[*]}"
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi

# Build artifacts live outside the repository so that fresh clones (CI) start warm.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${GCP_TOKEN_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gcp-token-operator}/target}"

started=$(date +%s)
substrate() {
  local assets
  if ! assets=$(KUBE_VERSION=$1 testkit/substrate.sh); then
    echo "FAILED: the test substrate for Kubernetes ${1:-newest} could not be built; see the messages above" >&2
    exit 1
  fi
  echo "$assets"
}
log "test substrate"
KUBEBUILDER_ASSETS=$(substrate "$kube_version")
export KUBEBUILDER_ASSETS
newest=$("$KUBEBUILDER_ASSETS/kube-apiserver" --version)
log "substrate in $KUBEBUILDER_ASSETS ($(( $(date +%s) - started ))s): $newest, $("$KUBEBUILDER_ASSETS/etcd" --version | head -1), Helm $("$KUBEBUILDER_ASSETS/helm" version --short)"

log "cargo fmt --check, gofmt"
cargo fmt --all -- --check
# Go's own formatter, from PATH or the usual install location.
gofmt_bin=$(command -v gofmt || command -v /usr/local/go/bin/gofmt || true)
[ -n "$gofmt_bin" ] || { echo "gofmt is required (it comes with Go)" >&2; exit 1; }
unformatted=$("$gofmt_bin" -l testkit)
[ -z "$unformatted" ] || { echo "gofmt: $unformatted" >&2; exit 1; }
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo test, every test on $newest"
cargo test --workspace --all-targets --locked -- "$@"
tested=("$newest")

if [ "$all_versions" = true ]; then
  newest_minor=$(echo "$newest" | sed 's/.*v\(1\.[0-9]*\).*/\1/')
  for pin in testkit/kube/v1.*; do
    minor=${pin##*/v}
    [ "$minor" = "$newest_minor" ] && continue
    log "test substrate for Kubernetes $minor"
    KUBEBUILDER_ASSETS=$(substrate "$minor")
    version=$("$KUBEBUILDER_ASSETS/kube-apiserver" --version)
    log "cargo test, the end-to-end operator, CRD, chart, admission-policy, example, consumer-format and ServiceAccount-attachment tests on $version"
    cargo test --locked -p gcp-token-operator --test operator --test crd --test chart --test admission --test examples --test formats --test attachments -- "$@"
    cargo test --locked -p gcp-token-operator-testkit --test substrate -- "$@"
    tested+=("$version")
  done
fi
log "done in $(( $(date +%s) - started ))s; tested on: ${tested[*]}"
