#!/usr/bin/env bash
# Checks the Debian package `cargo deb` built: its control fields, that it holds the binary,
# the systemd unit, the config (a conffile, 0640 root:synapse-account-data-relay once installed)
# and the docs where Debian admins look, and that it
# installs with dpkg and runs in a throw-away Debian container (the local PostgreSQL 17 test
# image, a debootstrapped Debian stable: no registry needed).
set -euo pipefail
deb="$1"
image="${RELAY_TEST_PG_IMAGE:-synapse-relay-test-postgres:17}"
contents="$(dpkg-deb -c "$deb")"
fail() { echo "check-deb: $*"; echo "$contents"; exit 1; }
for path in \
  ./usr/bin/synapse-account-data-relay \
  ./usr/lib/systemd/system/synapse-account-data-relay.service \
  ./etc/synapse-account-data-relay/config.toml \
  ./usr/share/doc/synapse-account-data-relay/README.md \
  ./usr/share/doc/synapse-account-data-relay/copyright \
  ./usr/share/doc/synapse-account-data-relay/examples/prometheus-alerts.yml \
  ./usr/share/doc/synapse-account-data-relay/examples/grafana-dashboard.json \
  ./usr/share/doc/synapse-account-data-relay/sql/setup.sql; do
  grep -q " $path\$" <<<"$contents" || fail "missing $path"
done
grep -Eq "^-rwxr-xr-x (root/root|0/0) .* \\./usr/bin/synapse-account-data-relay\$" <<<"$contents" || fail "the binary is not 0755 root:root"
dpkg-deb -I "$deb" conffiles | grep -qx /etc/synapse-account-data-relay/config.toml || fail "config.toml is not a conffile"
# The config may hold a password: never world-readable, not even between unpack and postinst.
grep -Eq "^-rw-r----- (root/root|0/0) .* \./etc/synapse-account-data-relay/config.toml\$" <<<"$contents" || fail "config.toml is not 0640 root:root in the archive"
dpkg-deb -I "$deb" postinst | grep -q "dpkg-statoverride --update --add root \"\$GROUP\" 0640" || fail "no postinst giving config.toml its group"
for field in Package Version Architecture Depends Section Description; do
  value="$(dpkg-deb -f "$deb" "$field")"
  [ -n "$value" ] || fail "no $field field"
  echo "check-deb: $field: $(head -n 1 <<<"$value")"
done
dpkg-deb -f "$deb" Depends | grep -q libc6 || fail "Depends does not name libc6"
if docker image inspect "$image" >/dev/null 2>&1; then
  dir="$(cd "$(dirname "$deb")" && pwd)"
  docker run --rm -u 0 -v "$dir:/deb:ro" "$image" sh -c "
    set -e
    dpkg -i /deb/$(basename "$deb") >/dev/null
    synapse-account-data-relay --version
    synapse-account-data-relay status --help | grep -q Example
    test -f /usr/lib/systemd/system/synapse-account-data-relay.service
    grep -q '^Type=notify' /usr/lib/systemd/system/synapse-account-data-relay.service
    getent group synapse-account-data-relay >/dev/null
    test \"\$(stat -c '%a %U %G' /etc/synapse-account-data-relay/config.toml)\" = '640 root synapse-account-data-relay'
    grep -q '^SupplementaryGroups=synapse-account-data-relay\$' /usr/lib/systemd/system/synapse-account-data-relay.service
    dpkg -r synapse-account-data-relay >/dev/null
    test ! -e /usr/bin/synapse-account-data-relay
    dpkg -P synapse-account-data-relay >/dev/null
    if dpkg-statoverride --list /etc/synapse-account-data-relay/config.toml; then exit 1; fi" || fail "installing the package in $image failed"
  echo "check-deb: installs, runs and removes cleanly in $image"
else
  fail "the image $image (.ci/build-pg17-image.sh) is needed to test the installation"
fi
echo "check-deb: $(basename "$deb") ($(( $(stat -c %s "$deb") / 1024 )) KiB) is complete"
