#!/usr/bin/env bash
# Times machines through the whole stack against a running scripts/dev-cluster.sh: POST
# /machines → status running, and → `ssh hostname` answering through the forwarded port; then
# the same domain stopped through the API and started by hand with `virsh start` → ssh. Prints
# each run and the medians (README "Measured"). Needs jq, ssh, the tiny image registered as
# "tiny" (the script registers it if missing) and an administrator, created here if absent.
#
#   scripts/bench-provision.sh [RUNS]        (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${1:-5}
DIR=${SKYGATE_DEV_DIR:-/var/lib/skygate-dev}
API=http://${SKYGATE_DEV_HTTP:-127.0.0.1:8080}/api/v1
CP=${CARGO_TARGET_DIR:-target}/release/skygate-control-plane
ADMIN_PASSWORD='bench admin passphrase'
TMP=$(mktemp -d)
trap 'rm -rf "${TMP}"' EXIT

now() { date +%s.%N; }
die() { echo "bench-provision: $*" >&2; exit 1; }
# wait_status ID STATUS: polls (60 s at most) and stops on `failed`.
wait_status() {
  local deadline=$((SECONDS + 60)) status
  while :; do
    status=$(curl -sS "${API}/machines/$1" -H "authorization: Bearer ${TOKEN}" | jq -r .status)
    [[ ${status} == "$2" ]] && return 0
    [[ ${status} == failed ]] && die "machine $1 failed: $(curl -sS "${API}/machines/$1" -H "authorization: Bearer ${TOKEN}" | jq -r .failure_reason)"
    ((SECONDS < deadline)) || die "machine $1 never became $2 (is ${status})"
    sleep 0.05
  done
}
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
json() { curl -sS -H 'content-type: application/json' "$@"; }
login() { json "${API}/auth/login" -d "{\"username\":\"$1\",\"password\":\"$2\"}" | jq -r .access_token; }
median() { sort -n | awk '{ v[NR] = $1 } END { printf "%.2f", v[int((NR + 1) / 2)] }'; }
ssh_until() {
  local deadline=$((SECONDS + 120))
  until ((SECONDS > deadline)) || ssh -i "${TMP}/key" -p "$1" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
      -o BatchMode=yes -o ConnectTimeout=1 -o LogLevel=ERROR root@127.0.0.1 hostname >/dev/null 2>&1; do
    sleep 0.1
  done
  ((SECONDS <= deadline)) || die "ssh on port $1 never answered"
}

echo "${ADMIN_PASSWORD}" | "${CP}" admin create --username bench-admin --email bench-admin@example.com \
  --password-stdin --data-dir "${DIR}/control-plane" >/dev/null 2>&1 || true
ADMIN=$(login bench-admin "${ADMIN_PASSWORD}")
[[ ${ADMIN} != null ]] || { echo "cannot log in as bench-admin" >&2; exit 1; }
json "${API}/images" -H "authorization: Bearer ${ADMIN}" -d @/var/lib/skygate-images/tiny/image.json >/dev/null
json "${API}/auth/register" -d '{"username":"bench","email":"bench@example.com","password":"bench tenant passphrase"}' >/dev/null
TOKEN=$(login bench 'bench tenant passphrase')
ssh-keygen -q -t ed25519 -N '' -f "${TMP}/key"
KEY=$(cat "${TMP}/key.pub")

: >"${TMP}/running"; : >"${TMP}/ssh"; : >"${TMP}/virsh"
for run in $(seq 1 "${RUNS}"); do
  host="bench-$(date +%s)-${run}"
  t0=$(now)
  id=$(json "${API}/machines" -H "authorization: Bearer ${TOKEN}" -d "{\"hostname\":\"${host}\",
    \"image\":\"tiny\",\"vcpus\":1,\"memory_mib\":256,\"disk_gib\":1,\"ssh_keys\":[\"${KEY}\"]}" | jq -r .id)
  [[ ${id} != null && -n ${id} ]] || die "POST /machines failed"
  wait_status "${id}" running
  running=$(since "${t0}")
  machine=$(curl -sS "${API}/machines/${id}" -H "authorization: Bearer ${TOKEN}")
  port=$(jq '.network.ports[0].host_port' <<<"${machine}")
  ssh_until "${port}"
  to_ssh=$(since "${t0}")

  # The same domain, by hand.
  json -X POST "${API}/machines/${id}/stop" -H "authorization: Bearer ${TOKEN}" >/dev/null
  wait_status "${id}" stopped
  domain=$(virsh -c qemu:///system list --all --name | grep -- "${id}" | head -n 1)
  t1=$(now)
  virsh -c qemu:///system start "${domain}" >/dev/null
  ssh_until "${port}"
  by_hand=$(since "${t1}")

  json -X DELETE "${API}/machines/${id}" -H "authorization: Bearer ${TOKEN}" >/dev/null
  echo "run ${run}: POST→running ${running} s, POST→ssh ${to_ssh} s | virsh start→ssh ${by_hand} s"
  echo "${running}" >>"${TMP}/running"; echo "${to_ssh}" >>"${TMP}/ssh"; echo "${by_hand}" >>"${TMP}/virsh"
  # Let the reconciler see the hand-started domain and the delete finish before the next run.
  deadline=$((SECONDS + 60))
  until [[ $(curl -sS -o /dev/null -w '%{http_code}' "${API}/machines/${id}" -H "authorization: Bearer ${TOKEN}") == 404 ]]; do
    ((SECONDS < deadline)) || die "machine ${id} was never deleted"
    sleep 0.2
  done
done
r=$(median <"${TMP}/running"); s=$(median <"${TMP}/ssh"); v=$(median <"${TMP}/virsh")
echo "median of ${RUNS}: POST→running ${r} s, POST→ssh ${s} s, virsh start→ssh ${v} s, ratio (ssh) $(awk -v a="$s" -v b="$v" 'BEGIN { printf "%.2f", a / b }')"
