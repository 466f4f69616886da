#!/usr/bin/env bash
# Builds (once) and prints the directory of the test substrate's binaries, envtest's
# KUBEBUILDER_ASSETS layout: etcd, kube-apiserver, kube-controller-manager and kubectl (one
# multi-call binary from kube/, version-stamped) and helm (from helm/). Everything comes from the
# Go module proxy at the versions pinned in kube/v1.MINOR/go.sum and helm/go.sum.
#
#   testkit/substrate.sh            the newest pinned Kubernetes minor
#   KUBE_VERSION=1.34 testkit/substrate.sh
#
# Binaries are cached per version under $GCP_TOKEN_OPERATOR_CACHE (default
# ~/.cache/gcp-token-operator)/substrate, keyed by a hash of everything that goes into them (these
# files and the Go version), so a changed recipe builds afresh and an unchanged one never does.
# A first build takes about 15 minutes per Kubernetes version on 2 cores. Progress goes to stderr;
# stdout carries only the directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log() { echo "substrate: $*" >&2; }

minor=${KUBE_VERSION:-newest}
minor=${minor#v}
if [ "$minor" = newest ]; then
  minor=$(cd "$here/kube" && ls -d v1.* | sed 's/^v//' | sort -V | tail -1)
fi
minor=$(echo "$minor" | cut -d. -f1,2)
pin="$here/kube/v$minor"
if [ ! -f "$pin/go.mod" ]; then
  log "Kubernetes $minor is not pinned; pinned: $(cd "$here/kube" && ls -d v1.* | tr '\n' ' ')(testkit/kube/pin.sh pins another)"
  exit 1
fi
kube_version=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$pin/go.mod")
helm_version=$(awk '$1 == "helm.sh/helm/v4" {print $2}' "$here/helm/go.mod")

# Kubernetes needs the Go its go.mod names; the newest Go on the machine builds every pinned one.
go_bin=""
for candidate in "${GO:-}" "$(command -v go || true)" /usr/local/go/bin/go; do
  [ -n "$candidate" ] && [ -x "$candidate" ] || continue
  if "$candidate" version | grep -qE 'go1\.(2[6-9]|[3-9][0-9])'; then go_bin=$candidate; break; fi
done
[ -n "$go_bin" ] || { log "Go 1.26 or newer is required (set GO=/path/to/go)"; exit 1; }
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0

cache="${GCP_TOKEN_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gcp-token-operator}/substrate"
mkdir -p "$cache"
recipe() { cat "$0" "$@" | cat - <("$go_bin" version) | sha256sum | cut -c1-12; }
kube_dir="$cache/kubernetes-$kube_version-$(recipe "$here/kube/main.go" "$pin/go.mod" "$pin/go.sum")"
helm_dir="$cache/helm-$helm_version-$(recipe "$here/helm/go.mod" "$here/helm/go.sum")"
assets="$kube_dir/bin"

# One build at a time per cache, so parallel callers wait instead of building twice.
exec 9>"$cache/.lock"
flock 9

# Builds in a scratch copy of the module's files (the first arguments, up to `--`), then moves the
# scratch directory into place at once, so an interrupted build is never mistaken for a finished one.
build() {
  local name=$1 dest=$2
  shift 2
  local scratch="$dest.tmp"
  rm -rf "$scratch"
  mkdir -p "$scratch/src"
  while [ "$1" != -- ]; do cp "$1" "$scratch/src/"; shift; done
  shift
  local started=$SECONDS
  log "building $name with $("$go_bin" version | cut -d' ' -f3) (first time only; minutes on 2 cores)"
  (cd "$scratch/src" && "$@" >&2)
  rm -rf "$scratch/src" "$dest"
  mv "$scratch" "$dest"
  log "built $name in $((SECONDS - started)) s, cached in $dest"
}

if [ ! -x "$helm_dir/helm" ]; then
  build "Helm $helm_version" "$helm_dir" "$here/helm/go.mod" "$here/helm/go.sum" -- \
    "$go_bin" build -trimpath -o ../helm \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version -X helm.sh/helm/v4/internal/version.gitTreeState=clean" \
    helm.sh/helm/v4/cmd/helm
fi

if [ ! -x "$assets/kubectl" ]; then
  major=$(echo "$kube_version" | sed 's/^v\([0-9]*\)\..*/\1/')
  minor_number=$(echo "$kube_version" | cut -d. -f2)
  stamp=""
  for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $package.gitVersion=$kube_version -X $package.gitMajor=$major -X $package.gitMinor=$minor_number -X $package.gitTreeState=clean"
  done
  # go vet as well: main.go is the project's own Go code.
  build_kube() { "$go_bin" build -trimpath -pgo=off -ldflags "-s -w$stamp" -o ../bin/kube . && "$go_bin" vet -trimpath -pgo=off .; }
  build "Kubernetes $kube_version" "$kube_dir" "$here/kube/main.go" "$pin/go.mod" "$pin/go.sum" -- build_kube
  for tool in etcd kube-apiserver kube-controller-manager kubectl; do ln -sf kube "$assets/$tool"; done
fi
ln -sfn "$helm_dir/helm" "$assets/helm"
# Builds by an older recipe are never used again.
for stale in "$cache/kubernetes-$kube_version-"* "$cache/helm-$helm_version-"*; do
  case $stale in "$kube_dir" | "$helm_dir") ;; *) rm -rf "$stale" ;; esac
done
echo "$assets"
