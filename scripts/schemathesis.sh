#!/usr/bin/env bash
# The API contract, checked from outside: schemathesis (pinned, from PyPI) drives the served
# /api/v1/openapi.json against a debug build of the control plane, on SQLite and on
# PostgreSQL, three times each: anonymous, as a tenant and as an administrator. Every check
# (`--checks all`), a fixed seed and a bounded number of examples per operation, so a run is
# repeatable and takes a few minutes on 2 cores. Only 127.0.0.1 is contacted (PyPI aside).
#
#   scripts/schemathesis.sh
#
# Settings (environment): SKYGATE_SCHEMATHESIS_SEED (1), SKYGATE_SCHEMATHESIS_EXAMPLES (25,
# per operation and phase), SKYGATE_SCHEMATHESIS_VENV (where the venv is kept and reused,
# default ~/.cache/skygate/schemathesis-<version>), SKYGATE_SCHEMATHESIS_STORES ("sqlite
# postgres"), SKYGATE_TEST_POSTGRES_URL (a server where the script may create and drop a
# database; default postgres://postgres@127.0.0.1:5432/postgres).
# What the server may answer beyond the document's promises (an unknown image name, a random
# cursor) is listed, with reasons, in scripts/schemathesis.toml.
# SKYGATE_SCHEMATHESIS_KEEP=1 keeps the scratch dir (logs, server logs) for a look afterwards.
# One line per run ("schemathesis: sqlite tenant: 1383 cases, 0 failures, 19 s (...)"), the
# failures' reports after a failed run; the last line sums up; non-zero exit on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=4.32.5
SEED=${SKYGATE_SCHEMATHESIS_SEED:-1}
EXAMPLES=${SKYGATE_SCHEMATHESIS_EXAMPLES:-25}
STORES=${SKYGATE_SCHEMATHESIS_STORES:-sqlite postgres}
PG_ADMIN_URL=${SKYGATE_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
VENV=${SKYGATE_SCHEMATHESIS_VENV:-${XDG_CACHE_HOME:-${HOME}/.cache}/skygate/schemathesis-${VERSION}}
CONFIG=$(pwd)/scripts/schemathesis.toml

say() { echo "schemathesis: $*" >&2; }
die() { say "$*"; exit 1; }

WORK=$(mktemp -d /tmp/skygate-schemathesis.XXXXXX)
SERVER_PID=""
PG_DB=""
stop_server() {
  if [[ -n ${SERVER_PID} ]]; then
    kill "${SERVER_PID}" 2>/dev/null || true
    wait "${SERVER_PID}" 2>/dev/null || true
    SERVER_PID=""
  fi
}
drop_database() {
  if [[ -n ${PG_DB} ]]; then
    psql "${PG_ADMIN_URL}" -q -v ON_ERROR_STOP=1 \
      -c "DROP DATABASE IF EXISTS \"${PG_DB}\" WITH (FORCE)" >/dev/null 2>&1 || true
    PG_DB=""
  fi
}
cleanup() {
  stop_server
  drop_database
  [[ -n ${SKYGATE_SCHEMATHESIS_KEEP:-} ]] || rm -rf "${WORK}"
}
trap cleanup EXIT
# Interrupted, terminated, or its output gone: exit, so that the EXIT trap stops the server and
# drops the database (a signal without a trap would end the script and skip it).
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 141' PIPE
trap 'exit 143' TERM

# schemathesis itself: a venv kept between runs, rebuilt when it is not the pinned version.
if [[ $("${VENV}/bin/schemathesis" --version 2>/dev/null) != *" ${VERSION}" ]]; then
  say "installing schemathesis ${VERSION} into ${VENV}"
  rm -rf "${VENV}"
  mkdir -p "$(dirname "${VENV}")"
  python3 -m venv "${VENV}" || die "python3 -m venv failed (scripts/install-deps.sh --test installs python3-venv)"
  "${VENV}/bin/pip" install --quiet --disable-pip-version-check "schemathesis==${VERSION}" ||
    die "pip install schemathesis==${VERSION} failed"
fi
ST=${VENV}/bin/schemathesis

cargo build --quiet --locked -p control-plane --bin skygate-control-plane
BIN=${CARGO_TARGET_DIR:-target}/debug/skygate-control-plane
[[ -x ${BIN} ]] || die "no binary at ${BIN}"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# POSTs JSON to the server; prints the body, fails on a non-2xx answer.
post() {
  curl -sS --fail-with-body -H 'content-type: application/json' -d "$2" "${BASE}$1"
}
token_of() {
  post /auth/login "{\"username\":\"$1\",\"password\":\"$2\"}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])'
}

TOTAL_CASES=0
TOTAL_FAILURES=0
FAILED_RUNS=()

# run STORE WHO [TOKEN]: one schemathesis run; prints its summary line.
run() {
  local store=$1 who=$2 token=${3:-} out started cases failures status=0
  out=${WORK}/${store}-${who}
  local auth=()
  [[ -n ${token} ]] && auth=(-H "Authorization: Bearer ${token}")
  started=${SECONDS}
  # From the scratch dir: schemathesis keeps a cache (.schemathesis/) in its working directory.
  # GET /events is a stream that stays open by design (15 minutes): schemathesis would wait
  # on every case until its own timeout. The integration tests cover it
  # (the_event_stream_shows_each_tenant_its_own_events_resumably_and_skips_none).
  (cd "${WORK}" && "${ST}" --config-file "${CONFIG}" run "${BASE}/openapi.json" \
    --exclude-operation-id event_stream \
    --checks all --seed "${SEED}" --max-examples "${EXAMPLES}" --workers 1 \
    --suppress-health-check all --no-color \
    "${auth[@]}") >"${out}.log" 2>&1 || status=$?
  # Its own summary: "Test cases:" then "  150 generated, ...", and a closing line such as
  # "=== 28 failures, 1 error, 1 warning in 1.54s ===" or "=== 24 passed in 9.10s ===".
  cases=$(grep -A1 '^Test cases:' "${out}.log" | sed -n 's/^ *\([0-9]\+\) generated.*/\1/p')
  last=$(grep -E '^=+ .* =+$' "${out}.log" | tail -n 1 | sed -E 's/^=+ (.*) =+$/\1/')
  failures=$(sed -nE 's/(^|.* )([0-9]+) failures?.*/\2/p' <<<"${last}")
  cases=${cases:-?}
  failures=${failures:-0}
  say "${store} ${who}: ${cases} cases, ${failures} failures, $((SECONDS - started)) s (${last:-no summary})"
  TOTAL_CASES=$((TOTAL_CASES + ${cases/\?/0}))
  if [[ ${status} -ne 0 ]]; then
    TOTAL_FAILURES=$((TOTAL_FAILURES + ${failures/\?/0}))
    FAILED_RUNS+=("${store}-${who}")
    sed -n '/FAILURES/,$p' "${out}.log" | head -n 200 >&2 || true
  fi
}

T0=${SECONDS}
for store in ${STORES}; do
  data=${WORK}/${store}
  mkdir -p "${data}"
  case ${store} in
    sqlite) db_url="sqlite://${data}/skygate.db" ;;
    postgres)
      PG_DB=skygate_schemathesis_$$_${RANDOM}
      psql "${PG_ADMIN_URL}" -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"${PG_DB}\"" >/dev/null ||
        die "cannot create a database at ${PG_ADMIN_URL}"
      db_url=${PG_ADMIN_URL%/*}/${PG_DB}
      ;;
    *) die "unknown store ${store}" ;;
  esac
  export SKYGATE_DATA_DIR=${data} SKYGATE_DATABASE_URL=${db_url}
  admin_password=admin-$(python3 -c 'import secrets; print(secrets.token_hex(12))')
  tenant_password=tenant-$(python3 -c 'import secrets; print(secrets.token_hex(12))')
  "${BIN}" admin create --username root --email root@example.com --password-stdin \
    <<<"${admin_password}" >"${data}/admin.log" 2>&1 || { cat "${data}/admin.log" >&2; die "admin create failed"; }
  port=$(free_port)
  BASE=http://127.0.0.1:${port}/api/v1
  # Logins come from one address many times a minute here: lift the per-address limit.
  "${BIN}" serve --http-addr "127.0.0.1:${port}" --grpc-addr "127.0.0.1:$(free_port)" \
    --login-per-ip-per-minute 100000 >"${data}/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:${port}/readyz" >/dev/null 2>&1 && break
    kill -0 "${SERVER_PID}" 2>/dev/null || { tail -n 20 "${data}/server.log" >&2; die "the server exited"; }
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:${port}/readyz" >/dev/null || die "the server is not ready after 10 s"
  post /auth/register "{\"username\":\"tenant\",\"email\":\"tenant@example.com\",\"password\":\"${tenant_password}\"}" >/dev/null
  tenant_token=$(token_of tenant "${tenant_password}")
  admin_token=$(token_of root "${admin_password}")
  run "${store}" anonymous
  run "${store}" tenant "${tenant_token}"
  run "${store}" admin "${admin_token}"
  stop_server
  drop_database
  unset SKYGATE_DATA_DIR SKYGATE_DATABASE_URL
done

summary="${TOTAL_CASES} cases, ${TOTAL_FAILURES} failures in $((SECONDS - T0)) s (seed ${SEED}, ${EXAMPLES} examples, schemathesis ${VERSION})"
if ((${#FAILED_RUNS[@]} > 0)); then
  say "FAILED (${FAILED_RUNS[*]}): ${summary}; logs above"
  exit 1
fi
say "all runs passed: ${summary}"
