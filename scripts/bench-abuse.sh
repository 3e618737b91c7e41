#!/usr/bin/env bash
# The control plane under abuse, measured (README, "Measured"; issue 10): resident memory
# before and after bursts of concurrent wrong logins, how many are refused (503) and how fast,
# and what idle sockets cost. Starts its own release server on a free loopback port with a
# temporary data dir and stops it by pid. The reference for memory is what argon2 itself
# needs: one 19 MiB block per password thread.
#
#   scripts/bench-abuse.sh            BURST=200 concurrent logins, BURSTS=4, IDLE=1000 sockets
set -euo pipefail
cd "$(dirname "$0")/.."

BURST=${BURST:-200}
BURSTS=${BURSTS:-4}
IDLE=${IDLE:-1000}
scripts/install-deps.sh >&2
cargo build --release --locked -p control-plane >&2
bin=${CARGO_TARGET_DIR:-target}/release/skygate-control-plane

work=$(mktemp -d /tmp/skygate-bench-abuse.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
threads=$(nproc)
"$bin" serve --data-dir "$work" --http-addr "127.0.0.1:$port" --header-timeout-secs 5 \
  --login-per-ip-per-minute 1000000 --login-max-failures 1000000 --login-account-budget 1000000 \
  2>"$work/server.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.1
done
rss() { awk '/^VmRSS:/ {print int($2 / 1024)}' "/proc/$pid/status"; }
fds() { ls "/proc/$pid/fd" | wc -l; }

echo "password threads: $threads (argon2 itself needs $((threads * 19)) MiB)"
echo "resident at start: $(rss) MiB"
for b in $(seq 1 "$BURSTS"); do
  python3 - "$port" "$BURST" <<'PY'
import json, sys, time, urllib.request, urllib.error
from concurrent.futures import ThreadPoolExecutor
port, n = int(sys.argv[1]), int(sys.argv[2])
def login(i):
    body = json.dumps({"username": f"nobody{i}", "password": "wrong password here"}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/auth/login", data=body,
                                 headers={"content-type": "application/json"})
    t = time.monotonic()
    try:
        urllib.request.urlopen(req, timeout=60)
        code = 200
    except urllib.error.HTTPError as e:
        code = e.code
    return code, (time.monotonic() - t) * 1000
start = time.monotonic()
with ThreadPoolExecutor(n) as pool:
    results = list(pool.map(login, range(n)))
wall = time.monotonic() - start
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else float("nan")
by = {}
for code, ms in results:
    by.setdefault(code, []).append(ms)
parts = [f"{code}: {len(ms)} (p50 {pct(ms, .5):.0f} ms, p99 {pct(ms, .99):.0f} ms)" for code, ms in sorted(by.items())]
print(f"burst of {n} concurrent wrong logins in {wall:.1f} s: " + ", ".join(parts))
PY
  echo "resident after burst $b: $(rss) MiB"
done

before=$(fds)
python3 - "$port" "$IDLE" <<'PY' &
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(n):
    try:
        held.append(socket.create_connection(("127.0.0.1", port)))
    except OSError:
        break
time.sleep(12)
PY
idle_pid=$!
sleep 2
during=$(fds)
code=$(curl -s -o /dev/null -w '%{http_code} in %{time_total} s' "http://127.0.0.1:$port/healthz")
sleep 6
after=$(fds)
wait "$idle_pid" || true
echo "$IDLE idle sockets: server descriptors $before before, $during while open, $after after the 5 s header deadline; /healthz meanwhile: $code"
echo "resident at the end: $(rss) MiB"
