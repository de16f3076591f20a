#!/usr/bin/env bash
# Builds the local PostgreSQL 17 test image offline (debootstrap Debian stable + `docker import`,
# no registry; see build-pg-image.sh), or reuses it when it exists. Image name:
# $RELAY_TEST_PG_IMAGE (default synapse-relay-test-postgres:17). `cargo test` runs the same build
# itself when the image is missing.
set -euo pipefail
exec "$(dirname "$0")/build-pg-image.sh" 17 stable "${RELAY_TEST_PG_IMAGE:-synapse-relay-test-postgres:17}"
