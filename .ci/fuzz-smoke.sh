#!/usr/bin/env bash
# Fuzz smoke test: runs the pgoutput_decode fuzz target (fuzz/fuzz_targets/pgoutput_decode.rs)
# for the given number of seconds (default 30) on stable Rust, without sanitizers, starting from
# the committed seeds. Installs cargo-fuzz if missing. Fails if the fuzzer finds a crash; the
# crashing input is then in fuzz/artifacts/pgoutput_decode/.
# Usage: .ci/fuzz-smoke.sh [SECONDS]
set -euo pipefail
seconds="${1:-30}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
  echo "fuzz-smoke: SECONDS must be a whole number, got '$seconds'" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
# New inputs go to the (git-ignored) corpus directory, listed first; the seeds are only read.
mkdir -p fuzz/corpus/pgoutput_decode
echo "fuzz-smoke: running pgoutput_decode for ${seconds}s"
cargo fuzz run --sanitizer none pgoutput_decode \
  fuzz/corpus/pgoutput_decode fuzz/seeds/pgoutput_decode \
  -- -max_total_time="$seconds"
