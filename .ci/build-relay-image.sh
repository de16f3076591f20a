#!/usr/bin/env bash
# Builds the relay's container image offline: `FROM scratch` with the release binary (debug info
# stripped), exactly the shared libraries it links (ldd) and the machine's CA certificates.
# No registry is needed. Image: $RELAY_IMAGE (default synapse-account-data-relay:latest), also
# tagged with the crate's version. Prints the image's size. RELAY_IMAGE_USE_BUILT_BINARY=1 takes
# target/release/synapse-account-data-relay as it is instead of building it (.ci/run: the binary
# the benchmarks just built and measured, which saves a second release build).
set -euo pipefail
cd "$(dirname "$0")/.."
image="${RELAY_IMAGE:-synapse-account-data-relay:latest}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
[ -f /etc/ssl/certs/ca-certificates.crt ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q ca-certificates >/dev/null
bin=target/release/synapse-account-data-relay
if [ "${RELAY_IMAGE_USE_BUILT_BINARY:-0}" != 1 ] || [ ! -x "$bin" ]; then
  cargo build --release --locked --quiet
fi
ctx=target/relay-image
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/bin" "$ctx/rootfs/etc/ssl/certs"
objcopy --strip-debug "$bin" "$ctx/rootfs/usr/bin/synapse-account-data-relay"
# The dynamic loader and every library the binary needs, at the paths ldd resolves them to.
ldd "$bin" | awk '/=> \// { print $3 } /^\t\/.*ld-linux/ { print $1 }' | while read -r lib; do
  cp -L --parents "$lib" "$ctx/rootfs/"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$ctx/rootfs/etc/ssl/certs/"
printf 'hosts: files dns\n' >"$ctx/rootfs/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/nonexistent\nnobody:x:65534:65534:nobody:/nonexistent:/nonexistent\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$ctx/rootfs/etc/group"
docker build --quiet -t "$image" -t "synapse-account-data-relay:$version" -f Dockerfile "$ctx" >/dev/null
size=$(docker image inspect -f '{{.Size}}' "$image")
echo "build-relay-image: built $image ($((size / 1024 / 1024)) MiB): $(find "$ctx/rootfs" -type f | sed "s|$ctx/rootfs||" | sort | tr '\n' ' ')"
