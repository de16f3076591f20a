#!/usr/bin/env bash
# A virtual environment with a pinned Synapse, for the real-Synapse integration test
# (tests/integration/real_synapse.rs), and the pinned mautrix-python for the mautrix example's test
# (tests/integration/mautrix_python.rs, examples/mautrix_python_appservice.py). Prints the environment's path on stdout; progress goes to
# stderr.
#
#   .ci/synapse-venv.sh            create it, or reuse it when it is complete (fast: one check)
#   .ci/synapse-venv.sh --check    only check: exit 1 (saying what to run) if it is not ready
#
# Where: $RELAY_TEST_SYNAPSE_VENV, else
#   $HOME/.cache/synapse-account-data-relay/synapse-venv-$SYNAPSE_VERSION
# (the test looks in the same place). Python: $RELAY_TEST_SYNAPSE_PYTHON, else python3 (3.10 or
# newer, with the venv module).
#
# The install is `matrix-synapse[postgres]==$SYNAPSE_VERSION` from PyPI with every dependency
# pinned by .ci/synapse-constraints.txt (`pip freeze` of a working install), so a new release of
# a dependency cannot change what CI runs. psycopg2 is built from source: it needs libpq's headers
# and `pg_config` (Debian: libpq-dev), Python's headers (python3-dev) and a C compiler. The first
# install takes about 3.5 minutes here (mostly downloads); a complete environment is reused in
# well under a second.
#
# The environment is complete when its marker file names this version and the constraints'
# checksum; it is built in place under a lock, and the marker is written last, so an interrupted
# install is redone from scratch next time. Changing the version or the constraints builds anew.
#
# mautrix (`mautrix==$MAUTRIX_VERSION`, its own dependencies pinned by .ci/mautrix-constraints.txt,
# installed together with Synapse's constraints so nothing of Synapse's moves) is added to a
# complete environment when missing, under the same lock, with a marker of its own: an existing
# environment is kept, not rebuilt. The test suite runs this script itself
# (tests/integration/support/synapse.rs), so `cargo test` needs no manual step.
set -euo pipefail

SYNAPSE_VERSION=1.163.2
MAUTRIX_VERSION=0.21.1

here="$(cd "$(dirname "$0")" && pwd)"
constraints="$here/synapse-constraints.txt"
mautrix_constraints="$here/mautrix-constraints.txt"
venv="${RELAY_TEST_SYNAPSE_VENV:-${HOME:?}/.cache/synapse-account-data-relay/synapse-venv-$SYNAPSE_VERSION}"
python="${RELAY_TEST_SYNAPSE_PYTHON:-python3}"
marker="$venv/.relay-synapse-ready"
want="matrix-synapse[postgres]==$SYNAPSE_VERSION constraints-sha256=$(sha256sum "$constraints" | cut -d' ' -f1)"
mautrix_marker="$venv/.relay-mautrix-ready"
mautrix_want="mautrix==$MAUTRIX_VERSION constraints-sha256=$(cat "$constraints" "$mautrix_constraints" | sha256sum | cut -d' ' -f1)"

synapse_ready() {
  [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ] && [ -x "$venv/bin/python" ]
}
mautrix_ready() {
  [ -f "$mautrix_marker" ] && [ "$(cat "$mautrix_marker")" = "$mautrix_want" ]
}
ready() {
  synapse_ready && mautrix_ready
}

if [ "${1:-}" = "--check" ]; then
  if ready; then
    echo "$venv"
    exit 0
  fi
  echo "no Synapse $SYNAPSE_VERSION + mautrix $MAUTRIX_VERSION virtual environment at $venv: run .ci/synapse-venv.sh" >&2
  exit 1
fi

if ready; then
  echo "$venv"
  exit 0
fi

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if ready; then # another run finished it while we waited
  echo "$venv"
  exit 0
fi

if ! synapse_ready; then
  command -v "$python" >/dev/null 2>&1 || {
    echo "$python not found: install Python 3.10 or newer, or set RELAY_TEST_SYNAPSE_PYTHON" >&2
    exit 1
  }
  "$python" -c 'import venv, ensurepip' >/dev/null 2>&1 || {
    echo "$python has no venv module: install it (Debian/Ubuntu: \`apt-get install python3-venv\`)" >&2
    exit 1
  }
  [ -f "$(pg_config --includedir 2>/dev/null)/libpq-fe.h" ] || {
    echo "libpq's headers (pg_config, libpq-fe.h) not found: psycopg2 is built from source; install libpq-dev (Debian/Ubuntu: \`apt-get install libpq-dev\`)" >&2
    exit 1
  }
  "$python" -c 'import os, sysconfig; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' >/dev/null 2>&1 || {
    echo "Python's headers (Python.h) not found: psycopg2 is built from source; install them (Debian/Ubuntu: \`apt-get install python3-dev\`)" >&2
    exit 1
  }
  command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || {
    echo "no C compiler: psycopg2 is built from source; install gcc (Debian/Ubuntu: \`apt-get install build-essential\`)" >&2
    exit 1
  }

  started=$(date +%s)
  echo "installing matrix-synapse[postgres]==$SYNAPSE_VERSION into $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input \
    -c "$constraints" "matrix-synapse[postgres]==$SYNAPSE_VERSION" >&2
  "$venv/bin/python" -c 'import synapse, psycopg2; print("Synapse", synapse.__version__, "psycopg2", psycopg2.__version__)' >&2
  echo "$want" >"$marker"
  echo "Synapse virtual environment ready in $(( $(date +%s) - started ))s" >&2
fi

if ! mautrix_ready; then
  started=$(date +%s)
  echo "adding mautrix==$MAUTRIX_VERSION to $venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input \
    -c "$constraints" -c "$mautrix_constraints" "mautrix==$MAUTRIX_VERSION" >&2
  "$venv/bin/python" -c 'import mautrix, aiohttp; print("mautrix", mautrix.__version__, "aiohttp", aiohttp.__version__)' >&2
  echo "$mautrix_want" >"$mautrix_marker"
  echo "mautrix added in $(( $(date +%s) - started ))s" >&2
fi
echo "$venv"
