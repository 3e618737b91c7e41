#!/usr/bin/env bash
# The API at the speed of its framework (issue 12; README, "Measured"). In one run, for each
# store (embedded SQLite, then PostgreSQL on 127.0.0.1:5432): starts the release control plane
# on a free loopback port with a fresh data dir / database, seeds the same data through the API
# (scripts/bench-api-seed.py), and drives every row with wrk at 32 connections on one thread:
#
#   GET /healthz                 the server's own ceiling for a request that touches nothing
#   GET /auth/profile            authentication plus the caller's account
#   GET /machines?limit=10       from a tenant owning 2,200 machines
#   POST /machines               one tenant owning 10 at the start, then one owning 10,000
#   POST /auth/login             LOGIN_SECONDS of load; RSS before, after, and IDLE_SECONDS later
#
# plus the argon2 crate's own hash rate on the same cores (auth/examples/argon2_rate.rs). Only
# 2xx answers are counted; anything else (and socket errors) is reported in the `bad` column.
# (wrk's own counter is of answers >= 400; these routes have no redirects, so no 3xx can slip
# through, and the scripted rows also print their first answer >= 300.)
#
# The control plane runs without an agent registry (no hosts, no workers), as the peer had none:
# creates are accepted and stay pending.
# The server and database are stopped/dropped by pid/name on exit.
#
#   scripts/bench-api.sh                    both stores, 15 s rows, 60 s login, 60 s rest
#   STORES=sqlite SECONDS_PER_ROW=5 LOGIN_SECONDS=10 IDLE_SECONDS=10 scripts/bench-api.sh
set -euo pipefail
cd "$(dirname "$0")/.."

STORES=${STORES:-sqlite postgres}
SECONDS_PER_ROW=${SECONDS_PER_ROW:-15}
LOGIN_SECONDS=${LOGIN_SECONDS:-60}
IDLE_SECONDS=${IDLE_SECONDS:-60}
LISTED=${LISTED:-2200}
OWNED=${OWNED:-10000}
CONNECTIONS=${CONNECTIONS:-32}
PG_URL_BASE=${PG_URL_BASE:-postgres://postgres@127.0.0.1:5432}

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
if [[ " $STORES " == *" postgres "* ]]; then scripts/install-deps.sh --postgres >&2; else scripts/install-deps.sh >&2; fi
cargo build --release --locked -p control-plane >&2
cargo build --release --locked -p auth --example argon2_rate >&2
bin=${CARGO_TARGET_DIR:-target}/release/skygate-control-plane

work=$(mktemp -d /tmp/skygate-bench-api.XXXXXX)
pid=""
db=""
cleanup() {
  [[ -n "$pid" ]] && { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; }
  [[ -n "$db" ]] && psql -q "$PG_URL_BASE/postgres" -c "DROP DATABASE IF EXISTS $db" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
# A signal becomes an exit, so that the cleanup above runs (a benchmark stopped with kill left
# its work directory behind).
trap 'exit 130' INT
trap 'exit 143' TERM

rss() { awk '/^VmRSS:/ {print int($2 / 1024)}' "/proc/$pid/status"; }

# Scripted rows show the first answer that was not 2xx, to say why.
cat >"$work/first-bad.lua" <<'LUA'
local shown = false
function response(status, headers, body)
  if status >= 300 and not shown then
    shown = true
    print("first bad answer: " .. status .. " " .. string.sub(body or "", 1, 300))
  end
end
LUA
cat >"$work/login.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = '{"username":"small","password":"bench passphrase 1"}'
LUA
cat "$work/first-bad.lua" >>"$work/login.lua"
# Each request a new hostname: the run id (argument) and a per-thread counter.
cat >"$work/create.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local n, run = 0, "r"
function init(args) run = args[1] or "r" end
function request()
  n = n + 1
  return wrk.format(nil, nil, nil, '{"hostname":"' .. run .. '-' .. n ..
    '","image":"tiny","vcpus":1,"memory_mib":256,"disk_gib":1}')
end
LUA
cat "$work/first-bad.lua" >>"$work/create.lua"

# One wrk run; prints "<ok_per_s> <p99_ms> <bad>" where bad counts non-2xx answers and socket
# errors (never counted as done).
measure() {
  local seconds=$1; shift
  wrk -t1 -c"$CONNECTIONS" -d"${seconds}s" --latency "$@" >"$work/wrk.out" 2>&1 || true
  python3 - "$work/wrk.out" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", text)
if not m:
    sys.exit("wrk gave no summary:\n" + text)
total, span = int(m.group(1)), float(m.group(2)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(3)]
bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
bad += sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", text)
first_bad = re.search(r"first bad answer: .*", text)
if first_bad:
    print(first_bad.group(0), file=sys.stderr)
p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)] if p99 else float("nan")
print(f"{max(total - bad, 0) / span:.0f} {p99_ms:.1f} {bad}")
PY
}

results="$work/results"
: >"$results"
row() { echo "$*" >>"$results"; echo "  $*" >&2; }

echo "== argon2 crate, raw" >&2
argon2_rate=$(${CARGO_TARGET_DIR:-target}/release/examples/argon2_rate 10 | awk '{print $2}')
echo "  $argon2_rate hashes/s" >&2

for store in $STORES; do
  echo "== $store" >&2
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  data="$work/$store"
  mkdir -p "$data"
  db_args=()
  if [[ "$store" == postgres ]]; then
    db="skygate_bench_api_$$"
    psql -q "$PG_URL_BASE/postgres" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
    db_args=(--database-url "$PG_URL_BASE/$db")
  fi
  admin_password="bench admin passphrase"
  printf '%s\n' "$admin_password" |
    "$bin" admin create --data-dir "$data" "${db_args[@]}" --username root --email root@example.com --password-stdin 2>/dev/null
  # Limits are lifted so that the load measures the server, not its throttles.
  "$bin" serve --data-dir "$data" "${db_args[@]}" --http-addr "127.0.0.1:$port" \
    --quota-machines 10000000 --quota-vcpus 10000000 --quota-memory-mib 10000000000 \
    --login-per-ip-per-minute 100000000 --login-max-failures 100000000 \
    --login-account-budget 100000000 2>"$data/server.log" &
  pid=$!
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.1
  done
  base="http://127.0.0.1:$port"
  fresh_rss=$(rss)
  echo "  seeding ($LISTED + 10 + $OWNED machines)..." >&2
  tokens=$(python3 scripts/bench-api-seed.py 127.0.0.1 "$port" "$admin_password" "$LISTED" "$OWNED")
  token() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$tokens" "$1"; }
  lister=$(token lister) small=$(token small) big=$(token big)
  if [[ "$store" == postgres ]]; then psql -q "$PG_URL_BASE/$db" -c "ANALYZE"; fi

  row "$store healthz $(measure "$SECONDS_PER_ROW" "$base/healthz")"
  row "$store profile $(measure "$SECONDS_PER_ROW" -H "authorization: Bearer $small" "$base/api/v1/auth/profile")"
  row "$store list $(measure "$SECONDS_PER_ROW" -H "authorization: Bearer $lister" "$base/api/v1/machines?limit=10")"
  row "$store create_small $(measure "$SECONDS_PER_ROW" -H "authorization: Bearer $small" -s "$work/create.lua" "$base/api/v1/machines" -- "s$store")"
  row "$store create_big $(measure "$SECONDS_PER_ROW" -H "authorization: Bearer $big" -s "$work/create.lua" "$base/api/v1/machines" -- "b$store")"
  idle_rss=$(rss)
  row "$store login $(measure "$LOGIN_SECONDS" -s "$work/login.lua" "$base/api/v1/auth/login")"
  loaded_rss=$(rss)
  sleep "$IDLE_SECONDS"
  row "$store rss $fresh_rss $idle_rss $loaded_rss $(rss)"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  if [[ -n "$db" ]]; then psql -q "$PG_URL_BASE/postgres" -c "DROP DATABASE IF EXISTS $db"; db=""; fi
done

python3 - "$results" "$argon2_rate" "$CONNECTIONS" "$LOGIN_SECONDS" "$IDLE_SECONDS" "$LISTED" "$OWNED" <<'PY'
import sys
rows, argon2, conns, login_s, idle_s = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
listed, owned = int(sys.argv[6]), int(sys.argv[7])
PEER = {"profile": 1398, "list": 397, "create_small": 369, "login": 16}  # issue 12, NestJS + PostgreSQL
got = {}
for line in open(rows):
    store, name, *vals = line.split()
    got[(store, name)] = vals
stores = list(dict.fromkeys(s for s, _ in got))
print(f"\nwrk -t1 -c{conns}; rate = 2xx answers/s; peer figures quoted from issue 12")
print("| row | " + " | ".join(stores) + " | peer |")
print("| --- |" + " --- |" * (len(stores) + 1))
def cell(store, name):
    vals = got.get((store, name))
    if not vals:
        return "-"
    rate, p99, bad = float(vals[0]), vals[1], int(vals[2])
    text = f"{rate:,.0f}/s"
    extra = []
    if name in PEER:
        extra.append(f"{rate / PEER[name]:.1f}x peer")
    if name == "profile" and (store, "healthz") in got:
        extra.append(f"{rate / float(got[(store, 'healthz')][0]):.2f} of healthz")
    if name == "login":
        extra.append(f"{rate / argon2:.2f} of argon2")
    if name.startswith("create"):
        extra.append(f"p99 {p99} ms")
    if name == "create_big" and (store, "create_small") in got:
        extra.append(f"{rate / float(got[(store, 'create_small')][0]):.2f} of small")
    if bad:
        extra.append(f"**{bad} bad**")
    return text + (" (" + ", ".join(extra) + ")" if extra else "")
labels = {"healthz": "GET /healthz", "profile": "GET /auth/profile",
          "list": f"GET /machines?limit=10 ({listed:,} owned)", "create_small": "POST /machines, tenant owning 10 at the start",
          "create_big": f"POST /machines, tenant owning {owned:,} at the start", "login": f"POST /auth/login ({login_s} s)"}
for name, label in labels.items():
    peer = f"{PEER[name]:,}/s" if name in PEER else ""
    print(f"| {label} | " + " | ".join(cell(s, name) for s in stores) + f" | {peer} |")
print(f"| argon2 crate, raw | {argon2:.0f}/s | | |")
for s in stores:
    fresh, idle, loaded, later = got[(s, "rss")]
    print(f"{s}: RSS fresh {fresh} MiB, before logins {idle} MiB, after {login_s} s of logins "
          f"{loaded} MiB, {idle_s} s later {later} MiB")
bad = sum(int(v[2]) for (s, n), v in got.items() if n != "rss")
print(f"bench-api: {'all answers 2xx' if bad == 0 else f'{bad} answers were not 2xx'}")
PY
