#!/usr/bin/env bash
# The control plane's baseline on this machine (README, "Measured"): login latency, and
# GET /machines?limit=50 at 32 connections with 10,000 machines in the store. Starts its own
# release server (embedded SQLite, or PostgreSQL with BENCH_DATABASE_URL) on a free loopback
# port with a temporary data dir, loads it with wrk, and stops it by pid.
set -euo pipefail
cd "$(dirname "$0")/.."

MACHINES=${MACHINES:-10000}
DURATION=${DURATION:-20s}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
scripts/install-deps.sh
cargo build --release --locked -p control-plane
bin=${CARGO_TARGET_DIR:-target}/release/skygate-control-plane

work=$(mktemp -d /tmp/skygate-bench.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
db_args=()
[[ -n "${BENCH_DATABASE_URL:-}" ]] && db_args=(--database-url "$BENCH_DATABASE_URL")
admin_password="bench admin passphrase"

printf '%s\n' "$admin_password" |
  "$bin" admin create --data-dir "$work" "${db_args[@]}" --username root --email root@example.com --password-stdin 2>/dev/null
# Limits are lifted so that the load measures the server, not its throttles.
"$bin" serve --data-dir "$work" "${db_args[@]}" --http-addr "127.0.0.1:$port" \
  --quota-machines 1000000 --quota-vcpus 1000000 --quota-memory-mib 1000000000 \
  --login-per-ip-per-minute 1000000 --login-max-failures 1000000 2>"$work/server.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.1
done

echo "seeding $MACHINES machines..." >&2
start=$(date +%s.%N)
token=$(python3 scripts/bench-seed.py 127.0.0.1 "$port" "$admin_password" "$MACHINES")
end=$(date +%s.%N)
python3 -c "print(f'seeded {$MACHINES} machines in {$end - $start:.1f} s ({$MACHINES / ($end - $start):.0f} creates/s, one connection)')"

if [[ -n "${BENCH_DATABASE_URL:-}" ]]; then
  # Fresh statistics, as autovacuum would have gathered by now (it is off on some test
  # machines, and a planner that believes the table empty picks a poor plan).
  psql -q "$BENCH_DATABASE_URL" -c "ANALYZE"
fi

cat >"$work/login.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = '{"username":"bench","password":"bench passphrase 1"}'
LUA

echo "== login, 1 connection"
wrk -t1 -c1 -d"$DURATION" --latency -s "$work/login.lua" "http://127.0.0.1:$port/api/v1/auth/login"
echo "== login, 4 connections"
wrk -t2 -c4 -d"$DURATION" --latency -s "$work/login.lua" "http://127.0.0.1:$port/api/v1/auth/login"
echo "== GET /machines?limit=50, 32 connections"
wrk -t2 -c32 -d"$DURATION" --latency -H "authorization: Bearer $token" \
  "http://127.0.0.1:$port/api/v1/machines?limit=50"
echo "== GET /machines?limit=50&cursor=<deep page>, 32 connections"
cursor=$(curl -fs -H "authorization: Bearer $token" "http://127.0.0.1:$port/api/v1/machines?limit=200" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["next_cursor"])')
wrk -t2 -c32 -d"$DURATION" --latency -H "authorization: Bearer $token" \
  "http://127.0.0.1:$port/api/v1/machines?limit=50&cursor=$cursor"
