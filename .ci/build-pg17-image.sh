#!/usr/bin/env bash
# Builds the local PostgreSQL 17 test image offline: a Debian stable root filesystem made with
# debootstrap, turned into an image with `docker import`. No registry is needed. Reuses the image
# when it already exists. Image name: $RELAY_TEST_PG_IMAGE (default synapse-relay-test-postgres:17).
set -euo pipefail
image="${RELAY_TEST_PG_IMAGE:-synapse-relay-test-postgres:17}"
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "build-pg17-image: $image already exists, reusing it"
  exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "build-pg17-image: installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
fi
rootfs="$(mktemp -d /tmp/relay-pg17-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "build-pg17-image: debootstrap Debian stable with postgresql-17 into $rootfs"
debootstrap --variant=minbase --include=postgresql-17 stable "$rootfs" http://deb.debian.org/debian >/tmp/relay-debootstrap.log 2>&1 \
  || { tail -n 40 /tmp/relay-debootstrap.log; echo "build-pg17-image: debootstrap failed (log above)"; exit 1; }
# The server is not started by the image; tests start it with their own command line.
tar -C "$rootfs" -c . | docker import - "$image" >/dev/null
echo "build-pg17-image: built $image"
