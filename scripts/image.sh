#!/usr/bin/env bash
# The release image, built offline with podman from the Dockerfile users build (README "Container
# image"). No registry is reachable, so the Dockerfile's two public inputs are made here: the
# binary, by the Dockerfile's own `cargo build` command with the same Rust and Debian release,
# and the runtime base, gcr.io/distroless/cc-debian12's contents assembled from the same Debian 12
# packages. The runtime stage itself is the Dockerfile's, unchanged. Each part is rebuilt only when
# its inputs changed; then the image is inspected and its size printed.
#
#   scripts/image.sh                  builds (or reuses) and inspects the image; prints its ID
#   scripts/image.sh podman ARGS...   podman with this project's configuration and image store,
#                                     e.g. `scripts/image.sh podman run --rm gcp-token-operator:0.1.0 --help`
#
# Needs Debian 12 with podman and runc (scripts/test.sh installs them), as root.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "== image: $*" >&2; }
fail() { echo "scripts/image.sh: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

cache="${GCP_TOKEN_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gcp-token-operator}/image"
mkdir -p "$cache"

# Podman's run-time state, per image store, where it does not survive a reboot.
run_dir="/run/gcp-token-operator/$(echo "$cache" | sha256sum | cut -c1-12)"
# What this machine's sandbox allows: no raised RLIMIT_NOFILE/RLIMIT_NPROC (podman's default
# ulimits), no systemd for cgroups, and runc (crun refuses its hybrid cgroups). Images live in
# the cache, apart from any other podman use on the machine.
containers_conf="[containers]
default_ulimits = []
log_driver = \"k8s-file\"

[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"
tmp_dir = \"$run_dir/libpod\"
"
storage_conf="[storage]
driver = \"overlay\"
graphroot = \"$cache/storage\"
runroot = \"$run_dir/storage\"
"
write_if_changed() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ] || printf '%s' "$2" >"$1"; }
write_if_changed "$cache/containers.conf" "$containers_conf"
write_if_changed "$cache/storage.conf" "$storage_conf"
export CONTAINERS_CONF="$cache/containers.conf" CONTAINERS_STORAGE_CONF="$cache/storage.conf"

for tool in podman runc; do
  command -v "$tool" >/dev/null || fail "$tool is required (scripts/test.sh installs it: apt-get install podman runc)"
done

if [ "${1:-}" = podman ]; then
  shift
  exec podman "$@"
fi
[ $# = 0 ] || fail "unknown arguments $* (see the top of $0)"

# One build at a time: two would race on the tags.
exec 9>"$cache/lock"
flock 9

started=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
image="localhost/gcp-token-operator:$version"

# --- The Dockerfile's inputs, as it names them ---------------------------------------------------
runtime_base=$(sed -n 's/^ARG RUNTIME_BASE=//p' Dockerfile)
[ "$runtime_base" = "gcr.io/distroless/cc-debian12:nonroot" ] ||
  fail "the Dockerfile's RUNTIME_BASE is '$runtime_base'; this script reproduces gcr.io/distroless/cc-debian12:nonroot"
builder=$(sed -n 's/^FROM \(.*\) AS build$/\1/p' Dockerfile)
rust=$(echo "$builder" | sed -n 's/^docker\.io\/library\/rust:\([0-9]*\.[0-9]*\)-\([a-z]*\)$/\1 \2/p')
[ -n "$rust" ] || fail "the Dockerfile's build stage is '$builder'; expected docker.io/library/rust:MAJOR.MINOR-CODENAME"
read -r rust_version codename <<<"$rust"
# shellcheck source=/dev/null
host_codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
host_rust=$("${RUSTC:-rustc}" --version | awk '{print $2}')
# The same compiler and the same glibc as the users' build, or the image would not be theirs.
if [ "$codename" != bookworm ] || [ "$host_codename" != bookworm ]; then
  fail "the Dockerfile builds on Debian $codename and runs on debian12 (bookworm); this machine is '$host_codename'"
fi
case $host_rust in
  "$rust_version".*) ;;
  *) fail "the Dockerfile builds with Rust $rust_version; this machine has rustc $host_rust: update the Dockerfile's build stage" ;;
esac

# --- The binary: the Dockerfile's build command, read from it ------------------------------------
[ "$(grep -c 'cargo build ' Dockerfile)" = 1 ] || fail "the Dockerfile should run exactly one cargo build"
read -r -a build <<<"$(grep -o 'cargo build [^\\&]*' Dockerfile)"
# Nothing from the caller's environment that the Docker build would not have.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET
while read -r variable; do unset "$variable"; done < <(compgen -e | grep '^CARGO_PROFILE_RELEASE_' || true)
step=$(date +%s)
log "${build[*]}"
"${CARGO:-cargo}" "${build[@]:1}"
target_dir=$("${CARGO:-cargo}" metadata --format-version 1 --no-deps --locked |
  grep -o '"target_directory":"[^"]*"' | sed 's/.*:"\(.*\)"/\1/')
binary="$target_dir/release/gcp-token-operator"
binary_seconds=$(( $(date +%s) - step ))
binary_tag="localhost/gcp-token-operator-binary:$(sha256sum "$binary" | cut -c1-16)"
if ! podman image exists "$binary_tag"; then
  install -D -m 0755 "$binary" "$work/binary/gcp-token-operator"
  tar --numeric-owner --owner=0 --group=0 -C "$work/binary" -c gcp-token-operator |
    podman import --quiet - "$binary_tag" >/dev/null
fi

# --- The runtime base: gcr.io/distroless/cc-debian12:nonroot from Debian packages ----------------
# distroless's static layer (base-files, netbase, tzdata, media-types, the CA bundle, users,
# /tmp, /home/nonroot, nsswitch.conf), its base layer (libc6, libssl3) and its cc layer (libgcc,
# libgomp, libstdc++), each package extracted whole, with its control file in
# /var/lib/dpkg/status.d/ for image scanners, and no maintainer script run.
packages=(base-files netbase tzdata media-types libc6 libssl3 libgomp1 libstdc++6 libgcc-s1 gcc-12-base)
step=$(date +%s)
debs="$cache/debs"
mkdir -p "$debs"
print_uris() { apt-get download --print-uris "${packages[@]}" ca-certificates 2>/dev/null; }
# URL FILE SIZE SHA256:HEX, one per package.
cached() {
  local file checksum
  while read -r _ file _ checksum; do
    echo "${checksum#SHA256:}  $debs/$file" | sha256sum --check --status 2>/dev/null || return 1
  done <<<"$uris"
}
# apt's download sandbox user cannot write to the cache; `cached` checks the files after.
download() { (cd "$debs" && apt-get -qq -o APT::Sandbox::User=root download "${packages[@]}" ca-certificates); }
if ! uris=$(print_uris) || [ -z "$uris" ]; then
  log "apt-get update (no package lists)"
  as_root apt-get update -qq
  uris=$(print_uris) || fail "apt cannot find ${packages[*]} ca-certificates"
fi
if ! cached; then
  log "downloading ${packages[*]} ca-certificates"
  if ! download; then
    # The lists name versions the archive no longer has.
    log "apt-get update (stale package lists)"
    as_root apt-get update -qq
    uris=$(print_uris) || fail "apt cannot find ${packages[*]} ca-certificates"
    download
  fi
  cached || fail "the downloaded packages do not match their checksums"
fi
base_key=$( (cat "$0"; echo "$uris" | awk '{print $2, $4}') | sha256sum | cut -c1-16)
base_tag="localhost/gcp-token-operator-base:cc-debian12-$base_key"
if ! podman image exists "$base_tag"; then
  log "assembling the runtime base $base_tag"
  rootfs="$work/rootfs"
  mkdir -p "$rootfs/var/lib/dpkg/status.d"
  while read -r _ file _ _; do
    name=${file%%_*}
    deb="$debs/$file"
    if [ "$name" = ca-certificates ]; then
      # Only the bundle, as distroless has it: the package's certificates, concatenated.
      certs="$work/ca-certificates"
      dpkg-deb --extract "$deb" "$certs"
      mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/usr/share/doc/ca-certificates"
      find "$certs/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z | xargs -0 cat \
        >"$rootfs/etc/ssl/certs/ca-certificates.crt"
      cp "$certs/usr/share/doc/ca-certificates/copyright" "$rootfs/usr/share/doc/ca-certificates/"
    else
      dpkg-deb --extract "$deb" "$rootfs"
    fi
    dpkg-deb --field "$deb" >"$rootfs/var/lib/dpkg/status.d/$name"
  done <<<"$uris"
  cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
  cat >"$rootfs/etc/nsswitch.conf" <<'EOF'
passwd:         compat
group:          compat
shadow:         compat
gshadow:        files

hosts:          files dns
networks:       files

protocols:      db files
services:       db files
ethers:         db files
rpc:            db files

netgroup:       nis
EOF
  install -d -m 1777 "$rootfs/tmp"
  install -d -m 0700 "$rootfs/root"
  install -d -m 0755 "$rootfs/home"
  install -d -m 0700 -o 65532 -g 65532 "$rootfs/home/nonroot"
  tar --numeric-owner --sort=name -C "$rootfs" -c . |
    podman import --quiet \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
      --change 'USER 65532' \
      --change 'WORKDIR /home/nonroot' \
      - "$base_tag" >/dev/null
fi
base_seconds=$(( $(date +%s) - step ))

# --- The image: the Dockerfile, with those two inputs --------------------------------------------
step=$(date +%s)
# The runtime stage copies from the binary image only: the build context can be empty.
mkdir "$work/context"
podman build --quiet --pull=never --file Dockerfile \
  --build-arg "RUNTIME_BASE=$base_tag" --build-arg "BINARY_FROM=$binary_tag" \
  --tag "$image" "$work/context" >/dev/null
image_seconds=$(( $(date +%s) - step ))
built_seconds=$(( $(date +%s) - started ))
id=$(podman image inspect --format '{{.Id}}' "$image")
# Only the current inputs stay; the images they replace go.
for repository in localhost/gcp-token-operator-binary localhost/gcp-token-operator-base; do
  mapfile -t stale < <(podman images --format '{{.Repository}}:{{.Tag}}' "$repository" |
    grep -vxF -e "$binary_tag" -e "$base_tag")
  [ ${#stale[@]} = 0 ] || podman rmi --force "${stale[@]}" >/dev/null
done
podman image prune --force >/dev/null

# --- Inspection -----------------------------------------------------------------------------------
expect() {
  local actual
  actual=$(podman image inspect --format "$2" "$image")
  [ "$actual" = "$3" ] || fail "$image: $1 is $actual, not $3"
}
expect "the user" '{{.Config.User}}' '65532:65532'
expect "the entrypoint" '{{json .Config.Entrypoint}}' '["/gcp-token-operator"]'
expect "the command" '{{json .Config.Cmd}}' '["run"]'
expect "the exposed ports" '{{json .Config.ExposedPorts}}' '{"8080/tcp":{}}'
container=$(podman create --pull=never "$image")
files=$(podman export "$container" | tar -t)
podman rm "$container" >/dev/null
forbidden=$(echo "$files" | grep -E '(^|/)(s?bin/.+|sh|bash|dash|ash|busybox|apt|apt-get|dpkg|dpkg-deb|perl|python3?)$' || true)
[ -z "$forbidden" ] || fail "$image holds a shell, a package manager or a program besides the operator:
$forbidden"
# The binary finds its libraries and runs, as the chart runs it.
podman run --rm --pull=never --network none --read-only --read-only-tmpfs=false --cap-drop ALL \
  --security-opt no-new-privileges --user 65532:65532 "$image" --help >/dev/null ||
  fail "$image --help failed"

mb() { awk -v bytes="$1" 'BEGIN { printf "%.1f MB", bytes / 1000000 }'; }
size=$(podman image inspect --format '{{.Size}}' "$image")
base_size=$(podman image inspect --format '{{.Size}}' "$base_tag")
compressed=$(podman image save "$image" 2>/dev/null | gzip -6 | wc -c)
log "$image ($id): $(mb "$size") ($(mb "$compressed") gzipped): runtime base $(mb "$base_size"), operator $(mb "$(stat -c %s "$binary")")"
log "no shell, no package manager, user 65532:65532, ENTRYPOINT [\"/gcp-token-operator\"] CMD [\"run\"]"
log "built in ${built_seconds}s (binary ${binary_seconds}s, runtime base ${base_seconds}s, image ${image_seconds}s), inspected in $(( $(date +%s) - started - built_seconds ))s"
echo "$id"
