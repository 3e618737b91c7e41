#!/usr/bin/env bash
# The control plane at fleet scale (issue 13; README, "Measured"). Starts the release control
# plane (R replicas on one PostgreSQL, or one on SQLite) and a simulated fleet of N hosts
# (`skygate-host-agent simulate`: real gRPC agents over fake hypervisors, fake disk and seed
# tools, define 20 ms / start 50 ms / stop 50 ms), then scripts/bench-fleet.py creates M
# one-vCPU machines through the REST API from T tenants, waits until every one runs, waits for
# a reconcile pass, samples GET /machines/{id} during the storm, checks the hosts' books against
# what the fleet's hypervisors run (its `census`), deletes everything and checks both sides
# again. Each host offers 10 % more vCPUs than its share of the machines.
#
#   scripts/bench-fleet.sh [--hosts N] [--machines M] [--tenants T] [--store sqlite|postgres] [--replicas R]
#   (defaults: 50 hosts, 2,000 machines, 20 tenants, sqlite, 1 replica; WORKERS=64 per replica)
#
# Prints a table (stderr) and, as its very last line, one JSON object with the keys hosts,
# machines, tenants, store, replicas, create_per_s, placements_per_s, all_running_s,
# reconcile_pass_s, api_p99_ms, cp_rss_mib, db_mib, oversubscribed, errors, and
# placements_per_s_early / _late (the rate while 1-10 % and 80-100 % of the machines were
# placed: issue 13 asks that it not fall as the fleet fills). Every process it
# starts is stopped by pid on exit, and its database dropped. The client (Python, 32 threads)
# shares the machine's cores with the server, the database and the fleet.
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTS=50 MACHINES=2000 TENANTS=20 STORE=sqlite REPLICAS=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --hosts) HOSTS=$2; shift 2 ;;
    --machines) MACHINES=$2; shift 2 ;;
    --tenants) TENANTS=$2; shift 2 ;;
    --store) STORE=$2; shift 2 ;;
    --replicas) REPLICAS=$2; shift 2 ;;
    *) echo "bench-fleet: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ $STORE == sqlite || $STORE == postgres ]] || { echo "bench-fleet: --store sqlite|postgres" >&2; exit 2; }
[[ $STORE == postgres || $REPLICAS == 1 ]] || { echo "bench-fleet: replicas need --store postgres" >&2; exit 2; }
PG_URL_BASE=${PG_URL_BASE:-postgres://postgres@127.0.0.1:5432}
# Workflow workers per replica: each provisions one machine at a time, and a simulated one
# takes some 100 ms of agent calls, so the default of 4 caps a storm near 50 machines/s.
WORKERS=${WORKERS:-64}
# Database connections per replica (PostgreSQL allows 100 by default, for every replica).
DB_CONNECTIONS=${DB_CONNECTIONS:-40}

if [[ $STORE == postgres ]]; then scripts/install-deps.sh --postgres >&2; else scripts/install-deps.sh >&2; fi
cargo build --release --locked -p control-plane -p host-agent >&2
bin=${CARGO_TARGET_DIR:-target}/release

work=$(mktemp -d /tmp/skygate-bench-fleet.XXXXXX)
# The fleet checks its data dirs as a real agent does (QEMU must traverse them).
chmod 755 "$work"
pids=() db=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  # BENCH_FLEET_LOGS=DIR keeps the control planes' and the fleet's logs there.
  [[ -n ${BENCH_FLEET_LOGS:-} ]] && mkdir -p "$BENCH_FLEET_LOGS" && cp "$work"/*.log "$BENCH_FLEET_LOGS"/
  [[ -n $db ]] && psql -q "$PG_URL_BASE/postgres" -c "DROP DATABASE IF EXISTS $db" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
# A signal becomes an exit, so that the cleanup above runs (a benchmark stopped with kill left
# its work directory behind).
trap 'exit 130' INT
trap 'exit 143' TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

db_args=()
if [[ $STORE == postgres ]]; then
  db="skygate_bench_fleet_$$"
  psql -q "$PG_URL_BASE/postgres" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
  db_args=(--database-url "$PG_URL_BASE/$db")
fi
admin_password="bench admin passphrase"
printf '%s\n' "$admin_password" |
  "$bin/skygate-control-plane" admin create --data-dir "$work/cp" "${db_args[@]}" --username root \
    --email root@example.com --password-stdin 2>/dev/null
token=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
head -c 32 /dev/urandom | base64 >"$work/jwt-secret"
share=$(( (MACHINES + HOSTS - 1) / HOSTS ))
vcpus=$(( share + share / 10 + 1 ))
bases=() cp_pids=() grpc=""
for r in $(seq 1 "$REPLICAS"); do
  http=$(free_port) g=$(free_port)
  [[ -z $grpc ]] && grpc=$g
  # Limits lifted so the storm measures the control plane, not its throttles.
  SKYGATE_AGENT_TOKEN=$token "$bin/skygate-control-plane" serve --data-dir "$work/cp" "${db_args[@]}" \
    --http-addr "127.0.0.1:$http" --grpc-addr "127.0.0.1:$g" --jwt-secret-file "$work/jwt-secret" \
    --workers "$WORKERS" --database-max-connections "$DB_CONNECTIONS" \
    --quota-machines 10000000 --quota-vcpus 10000000 --quota-memory-mib 10000000000 \
    --login-per-ip-per-minute 100000000 --login-max-failures 100000000 \
    --login-account-budget 100000000 </dev/null 2>"$work/cp-$r.log" &
  pids+=($!) cp_pids+=($!)
  bases+=("http://127.0.0.1:$http")
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$http/readyz" >/dev/null && break; sleep 0.1; done
done
mkdir -p "$work/images"
# The fleet reads commands from stdin, a FIFO held open here (fd 3): the benchmark asks it for
# its `census` there and reads the answer from fleet.out.
mkfifo "$work/faults"
SKYGATE_AGENT_TOKEN=$token "$bin/skygate-host-agent" simulate --hosts "$HOSTS" \
  --control-plane "http://127.0.0.1:$grpc" --vcpus "$vcpus" --memory-mib $((vcpus * 256)) \
  --disk-gib "$vcpus" --data-dir "$work/fleet" --image-dir "$work/images" \
  <"$work/faults" >"$work/fleet.out" 2>"$work/fleet.log" &
pids+=($!)
exec 3>"$work/faults"
echo "== $HOSTS simulated hosts of $vcpus vCPUs, $STORE, $REPLICAS replica(s)" >&2
for _ in $(seq 1 600); do grep -q "hosts registered" "$work/fleet.out" && break; sleep 0.5; done
grep -q "hosts registered" "$work/fleet.out" || { echo "bench-fleet: the fleet did not register" >&2; tail -5 "$work/fleet.log" >&2; exit 1; }

IFS=, ; base_list="${bases[*]}" pid_list="${cp_pids[*]}"; unset IFS
# In the background and waited for: bash runs a trap only between commands, and `wait` is
# one that a signal interrupts (a foreground client would keep a stopped benchmark running).
python3 scripts/bench-fleet.py "$base_list" "$admin_password" "$work/images" "$MACHINES" \
  "$TENANTS" "$HOSTS" "$STORE" "$REPLICAS" "$pid_list" "$work/faults" "$work/fleet.out" \
  >"$work/result" &
pids+=($!)
wait $!
result=$(cat "$work/result")
if [[ $STORE == postgres ]]; then
  db_mib=$(psql -tA "$PG_URL_BASE/postgres" -c "SELECT pg_database_size('$db') / 1048576")
else
  db_mib=$(( $(du -sk "$work/cp" | cut -f1) / 1024 ))
fi
exec 3>&-
echo "| database | $db_mib MiB |" >&2
python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["db_mib"]=int(sys.argv[2]); print(json.dumps(r))' "$result" "$db_mib"
