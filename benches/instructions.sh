#!/usr/bin/env bash
# The deterministic benchmark, in one command: instructions per request counted by
# valgrind's callgrind (installs Debian's valgrind if missing), heap bytes and allocations
# by a counting allocator, for each variant of benches/instructions.rs; the same figures on
# every run. Instructions per request are the difference between two run lengths, so that
# start-up cancels out.
#   benches/instructions.sh            # every variant
#   benches/instructions.sh one-task   # some
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v valgrind >/dev/null 2>&1; then
  echo "instructions.sh: installing Debian's package 'valgrind' (needs root)" >&2
  apt-get update -qq && apt-get install -y -qq valgrind
fi
cargo build --release --quiet -p tower-background-benches --bin instructions
bin="${CARGO_TARGET_DIR:-target}/release/instructions"
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(bare layer-no-task request-tasks-none spawn floor one-task one-retryable seq-8 seq-64 group-8 group-64)
short=500
long=1500
count() { # variant requests -> instructions
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 >/dev/null |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
printf '%-16s %14s %14s %12s\n' variant instr/request 'heap B/req' 'allocs/req'
declare -A per
for v in "${variants[@]}"; do
  a=$(count "$v" "$short"); b=$(count "$v" "$long")
  per[$v]=$(( (b - a) / (long - short) ))
  heap=$("$bin" "$v" "$long" | sed -n 's/.*: \([0-9.]*\) heap bytes \/ request, \([0-9.]*\) allocations.*/\1 \2/p')
  read -r bytes allocs <<<"$heap"
  printf '%-16s %14s %14s %12s\n' "$v" "${per[$v]}" "$bytes" "$allocs"
done
if [ -n "${per[spawn]:-}" ] && [ -n "${per[one-task]:-}" ]; then
  echo
  awk -v t="${per[one-task]}" -v s="${per[spawn]}" 'BEGIN { printf "one task / tokio::spawn: %.2f x the instructions\n", t / s }'
fi
if [ -n "${per[floor]:-}" ] && [ -n "${per[one-task]:-}" ]; then
  awk -v t="${per[one-task]}" -v f="${per[floor]}" 'BEGIN { printf "one task / the floor (a spawned slot in the extensions): %.2f x the instructions\n", t / f }'
fi
if [ -n "${per[bare]:-}" ] && [ -n "${per[layer-no-task]:-}" ]; then
  echo "the layer without a task adds $(( ${per[layer-no-task]} - ${per[bare]} )) instructions per request"
fi
for n in 8 64; do
  if [ -n "${per[seq-$n]:-}" ] && [ -n "${per[group-$n]:-}" ]; then
    awk -v g="${per[group-$n]}" -v q="${per[seq-$n]}" -v n="$n" 'BEGIN { printf "%d tasks: a group costs %.2f x a sequence\n", n, g / q }'
  fi
done
