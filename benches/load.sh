#!/usr/bin/env bash
# The load benchmark, in one command: installs wrk (Debian's package) if it is missing,
# then runs `cargo run --release -p tower-background-benches --bin loadbench` with the arguments given, e.g.
#   benches/load.sh --rounds 5 --seconds 3 --connections 32
# Loopback only; about rounds x 4 x seconds, plus the build.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1; then
  echo "load.sh: wrk is not installed; installing Debian's package 'wrk' (needs root)" >&2
  apt-get update -qq && apt-get install -y -qq wrk
fi
exec cargo run --release --quiet -p tower-background-benches --bin loadbench -- "$@"
