#!/usr/bin/env bash
# Makes etcd, kube-apiserver and kube-controller-manager available and prints the directory holding
# them (envtest's KUBEBUILDER_ASSETS layout). Order of preference:
#   1. $KUBEBUILDER_ASSETS, if it already holds etcd and kube-apiserver (plus kube-controller-manager);
#   2. the per-user cache, keyed by Kubernetes version and the reflect2 fix;
#   3. a build from Debian's `kubernetes` source package (about 8 minutes on 2 cores), then cached.
# Progress goes to stderr; stdout carries only the directory.
set -euo pipefail

# bookworm's package; newer Debian releases in the apt sources must not change what is built.
K8S_DEB_UPSTREAM="1.20.5+really1.20.2"
K8S_VERSION="v1.20.2"
# Bump when the build recipe changes so binaries built by an older recipe are never reused.
RECIPE="reflect2-1.0.2"
CACHE_ROOT="${GCP_TOKEN_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gcp-token-operator}"
DEST="$CACHE_ROOT/control-plane/$K8S_VERSION-$RECIPE"

log() { echo "control-plane: $*" >&2; }

have_all() { [ -x "$1/etcd" ] && [ -x "$1/kube-apiserver" ] && [ -x "$1/kube-controller-manager" ]; }

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && have_all "$KUBEBUILDER_ASSETS"; then
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi
if have_all "$DEST"; then
  echo "$DEST"
  exit 0
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=""
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq >&2; apt_updated=1; fi
  log "installing ${missing[*]}"
  # etcd-server's maintainer scripts try to start the service; we run our own instances instead.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

enable_deb_src() {
  local f=/etc/apt/sources.list.d/debian.sources
  if [ -f "$f" ] && ! grep -q '^Types:.*deb-src' "$f"; then
    log "enabling deb-src entries in $f"
    as_root sed -i 's/^Types: deb$/Types: deb deb-src/' "$f"
    apt_updated=""
  fi
  if [ -f /etc/apt/sources.list ] && grep -q '^deb ' /etc/apt/sources.list && ! grep -q '^deb-src ' /etc/apt/sources.list; then
    as_root sh -c "sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/gcp-token-operator-src.list"
    apt_updated=""
  fi
}

# policy-rc.d keeps the packaged etcd service from starting on install.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
  trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
fi

enable_deb_src
apt_install etcd-server golang-go rsync jq golang-github-modern-go-reflect2-dev dpkg-dev make

work="$CACHE_ROOT/build"
rm -rf "$work"
mkdir -p "$work"
cd "$work"
deb_version=$(apt-cache showsrc kubernetes | awk -v p="$K8S_DEB_UPSTREAM" '$1 == "Version:" && index($2, p) == 1 {print $2}' | sort -V | tail -1)
[ -n "$deb_version" ] || { log "no kubernetes $K8S_DEB_UPSTREAM source package in the apt sources"; exit 1; }
log "downloading the kubernetes $deb_version source package"
apt-get source --download-only "kubernetes=$deb_version" >&2
tar xzf kubernetes_*.orig.tar.gz
src=$(find . -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
cd "$src"

# Kubernetes 1.20 vendors reflect2 v1.0.1, which breaks under Go >= 1.18: json-iterator then panics
# on every request body holding a map. Debian ships v1.0.2 with the fix.
reflect2_src=$(dirname "$(find /usr/share/gocode/src -path '*modern-go/reflect2/reflect2.go' | head -1)")
[ -d "$reflect2_src" ] || { log "reflect2 source not found"; exit 1; }
rsync -a --delete --exclude go.mod --exclude '*_test.go' "$reflect2_src/" vendor/github.com/modern-go/reflect2/
sed -i 's#github.com/modern-go/reflect2 => github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 => github.com/modern-go/reflect2 v1.0.2#' go.mod
sed -i 's#github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 v1.0.2#g' go.mod vendor/modules.txt
grep -q 'reflect2 v1.0.2' go.mod || { log "go.mod patch did not apply"; exit 1; }

# Kubernetes 1.20 does not build with current Go (a newer one may be first on PATH); use Debian's.
debian_go=$(ls -d /usr/lib/go-1.* 2>/dev/null | sort -V | head -1)
[ -x "$debian_go/bin/go" ] || { log "Debian's Go (golang-go) not found under /usr/lib/go-1.*"; exit 1; }
export PATH="$debian_go/bin:$PATH" GOTOOLCHAIN=local
log "building kube-apiserver and kube-controller-manager with $("$debian_go/bin/go" version) (several minutes)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" KUBE_GIT_VERSION="$K8S_VERSION" >&2

mkdir -p "$DEST.tmp"
cp _output/bin/kube-apiserver _output/bin/kube-controller-manager "$DEST.tmp/"
etcd_bin=$(command -v etcd || echo /usr/bin/etcd)
cp "$etcd_bin" "$DEST.tmp/etcd"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
cd /
rm -rf "$work"
log "cached in $DEST"
echo "$DEST"
