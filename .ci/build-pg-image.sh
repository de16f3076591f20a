#!/usr/bin/env bash
# Builds a local PostgreSQL test image offline: a Debian root filesystem made with debootstrap
# (`--include=postgresql-<version>`), turned into an image with `docker import`. No registry is
# needed. Reuses the image when it already exists.
#
#   .ci/build-pg-image.sh <version> <debian suite> <image>
#   .ci/build-pg-image.sh 17 stable synapse-relay-test-postgres:17     (what build-pg17-image.sh runs)
#
# The test suite runs this itself when the image is missing (tests/integration/support/setup.rs),
# so `cargo test` on a fresh machine needs no manual step. Parallel runs build the image once: the
# build holds a file lock ($RELAY_TEST_CACHE_DIR, default ~/.cache/synapse-account-data-relay,
# `pg-image-<image>.lock`) and whoever waited for it finds the image there. What it cannot do
# itself (no Docker daemon, no debootstrap and not root to install it) fails with the command
# that fixes it.
set -euo pipefail
version="${1:?usage: build-pg-image.sh <version> <debian suite> <image>}"
suite="${2:?usage: build-pg-image.sh <version> <debian suite> <image>}"
image="${3:?usage: build-pg-image.sh <version> <debian suite> <image>}"
me="build-pg-image ($image)"

present() { docker image inspect "$image" >/dev/null 2>&1; }

if ! command -v docker >/dev/null 2>&1; then
  echo "$me: docker not found: install Docker (Debian/Ubuntu: \`apt-get install docker.io\`) and start its daemon" >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "$me: the Docker daemon is not running (or not reachable by $(id -un)): start it (\`systemctl start docker\`, or \`dockerd &\` as root)" >&2
  exit 1
fi
if present; then
  echo "$me: already exists, reusing it" >&2
  exit 0
fi

cache="${RELAY_TEST_CACHE_DIR:-${HOME:?}/.cache/synapse-account-data-relay}"
mkdir -p "$cache"
exec 9>"$cache/pg-image-${image//[^A-Za-z0-9._-]/_}.lock"
flock 9
if present; then # another run built it while we waited
  echo "$me: built by another run meanwhile, reusing it" >&2
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "$me: debootstrap needs root: run \`sudo $0 $version $suite $image\` once" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "$me: installing debootstrap" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null 2>&1; } \
    || { echo "$me: cannot install debootstrap: run \`apt-get update && apt-get install debootstrap\`" >&2; exit 1; }
fi
started=$(date +%s)
rootfs="$(mktemp -d /tmp/relay-pg"$version"-rootfs.XXXXXX)"
log="$rootfs.log"
trap 'rm -rf "$rootfs"' EXIT
echo "$me: debootstrap Debian $suite with postgresql-$version into $rootfs (a few minutes)" >&2
debootstrap --variant=minbase --include="postgresql-$version" "$suite" "$rootfs" >"$log" 2>&1 \
  || { tail -n 40 "$log" >&2; echo "$me: debootstrap failed (log above, in full in $log)" >&2; exit 1; }
# The server is not started by the image; tests start it with their own command line.
tar -C "$rootfs" -c . | docker import - "$image" >/dev/null
rm -f "$log"
echo "$me: built in $(( $(date +%s) - started ))s" >&2
