#!/usr/bin/env bash
# The load benchmark's optional peer row: FastAPI under uvicorn (one worker, pinned to
# CPU 0), driven by the same wrk command (pinned to CPU 1). Installs fastapi and uvicorn
# from PyPI into a virtual environment of its own (benches/fastapi/.venv) if they are
# missing, and says so. Prints requests/s and the server's CPU µs per request, per round.
#   benches/fastapi/run.sh [rounds] [seconds] [connections]
set -euo pipefail
cd "$(dirname "$0")"
rounds=${1:-5}; seconds=${2:-3}; connections=${3:-32}
if [ ! -x .venv/bin/python ]; then
  echo "fastapi/run.sh: creating benches/fastapi/.venv and installing fastapi and uvicorn[standard] (uvloop, httptools) from PyPI" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q fastapi 'uvicorn[standard]'
fi
command -v wrk >/dev/null || { echo "fastapi/run.sh: wrk is missing (benches/load.sh installs it)" >&2; exit 1; }
port=18080
taskset -c 0 .venv/bin/python -m uvicorn app:app --port $port --log-level warning --no-access-log &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$server/stat"; }
taskset -c 1 wrk -t1 -c"$connections" -d1s "http://127.0.0.1:$port/" >/dev/null  # warm-up
echo "| round | requests/s | p50 | p99 | CPU µs/request |"
echo "|---|---|---|---|---|"
for round in $(seq "$rounds"); do
  before=$(cpu)
  out=$(taskset -c 1 wrk -t1 -c"$connections" -d"${seconds}s" --latency "http://127.0.0.1:$port/")
  after=$(cpu)
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  per=$(awk -v t="$((after - before))" -v hz="$ticks" -v n="$requests" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
  echo "| $round | $rps | $p50 | $p99 | $per |"
done
