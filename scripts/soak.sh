#!/usr/bin/env bash
# A soak test (not in the default CI run), as root: one control plane and two host agents on
# 127.0.0.1 over real libvirt, a mixed load of creates, stops, starts, deletes and logins for N
# minutes, with kill -9 of the control plane and of an agent (in turn) every few minutes, then
# a consistency check: every accepted machine final, domains match records, allocations match
# the machines, the control plane's resident memory flat. Prints one line per check and a
# closing SOAK PASS / SOAK FAIL line.
#
#   scripts/soak.sh [MINUTES]        default 30
#
# Settings (environment): SOAK_KILL_EVERY_SECS (240), SOAK_CLIENTS (3 load loops),
# SOAK_MAX_MACHINES (per client, 2: the guests are TCG on a small host), SOAK_DIR (state, a
# fresh temp dir), SOAK_PROFILE (release), SOAK_HTTP_PORT (18480), SOAK_GRPC_PORT (18490),
# SKYGATE_TINY_IMAGE_DIR (/var/lib/skygate-images/tiny, built when missing).
# Everything it starts it stops by pid; it removes only domains named skygate-soak*.
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=${1:-30}
KILL_EVERY=${SOAK_KILL_EVERY_SECS:-240}
CLIENTS=${SOAK_CLIENTS:-3}
MAX_MACHINES=${SOAK_MAX_MACHINES:-2}
PROFILE=${SOAK_PROFILE:-release}
HTTP=127.0.0.1:${SOAK_HTTP_PORT:-18480}
GRPC=127.0.0.1:${SOAK_GRPC_PORT:-18490}
IMAGE_DIR=${SKYGATE_TINY_IMAGE_DIR:-/var/lib/skygate-images/tiny}
DIR=${SOAK_DIR:-$(mktemp -d /var/tmp/skygate-soak.XXXXXX)}
TARGET=$(realpath -m "${CARGO_TARGET_DIR:-target}")/${PROFILE}
API=http://${HTTP}/api/v1
PREFIX=skygate-soak
TOKEN=$(head -c 24 /dev/urandom | base64 | tr '+/' '-_')
PASSWORD="soak $(head -c 12 /dev/urandom | base64)"
VIRSH=(virsh -c qemu:///system)

log() { echo "soak: $(date -u +%H:%M:%S) $*" >&2; }
die() { log "$*"; echo "SOAK FAIL: $*"; exit 1; }

[[ ${MINUTES} =~ ^[0-9]+$ && ${MINUTES} -ge 1 ]] || die "MINUTES must be a whole number ≥ 1"
[[ $(id -u) -eq 0 ]] || die "run as root (libvirt's system instance, QEMU as libvirt-qemu)"
mkdir -p "${DIR}"
chmod 0755 "${DIR}"

declare -A PID=()
stop() { # name
  local pid=${PID[$1]:-}
  [[ -n ${pid} ]] || return 0
  kill "${pid}" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.2; done
  kill -9 "${pid}" 2>/dev/null || true
  wait "${pid}" 2>/dev/null || true
  unset "PID[$1]"
}
kill9() { # name
  local pid=${PID[$1]:-}
  [[ -n ${pid} ]] || return 0
  kill -9 "${pid}" 2>/dev/null || true
  wait "${pid}" 2>/dev/null || true
  unset "PID[$1]"
}
own_domains() { "${VIRSH[@]}" list --all --name 2>/dev/null | grep -E "^${PREFIX}[0-9]+-" || true; }
[[ -z $(own_domains) ]] || die "domains named ${PREFIX}* exist already: another soak runs, or remove them"
cleanup() {
  local status=$?
  for name in "${!PID[@]}"; do stop "${name}"; done
  for d in $(own_domains); do
    "${VIRSH[@]}" destroy "$d" >/dev/null 2>&1 || true
    "${VIRSH[@]}" undefine "$d" >/dev/null 2>&1 || true
  done
  # Logs stay for a failed run (the path is printed); a passed run leaves nothing.
  if [[ ${status} -eq 0 && -z ${SOAK_DIR:-} ]]; then rm -rf "${DIR}"; else log "state and logs kept in ${DIR}"; fi
  exit "${status}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build and prepare ---------------------------------------------------------------------
scripts/install-deps.sh --host >&2
log "building (${PROFILE})"
flag=()
[[ ${PROFILE} == release ]] && flag=(--release)
cargo build "${flag[@]}" --locked -p control-plane -p host-agent >&2
if [[ ! -f ${IMAGE_DIR}/image.json ]]; then
  log "building the tiny image into ${IMAGE_DIR}"
  images/tiny/build.sh "${IMAGE_DIR}" >&2
fi

start_control_plane() {
  SKYGATE_AGENT_TOKEN=${TOKEN} "${TARGET}/skygate-control-plane" serve \
    --http-addr "${HTTP}" --grpc-addr "${GRPC}" --data-dir "${DIR}/cp" \
    --heartbeat-interval-secs 2 --host-unreachable-after-secs 8 --task-lease-secs 10 \
    --reconcile-interval-secs 10 --orphan-grace-secs 30 --stop-timeout-secs 15 \
    --login-per-ip-per-minute 100000 --log-format json >>"${DIR}/cp.log" 2>&1 &
  PID[cp]=$!
  for _ in $(seq 1 100); do
    curl -fsS -m 5 "http://${HTTP}/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "the control plane did not become ready (${DIR}/cp.log)"
}
start_agent() { # number
  local i=$1
  SKYGATE_AGENT_TOKEN=${TOKEN} "${TARGET}/skygate-host-agent" --name "soak-${i}" \
    --listen "127.0.0.1:$((18500 + i))" --control-plane "http://${GRPC}" \
    --data-dir "${DIR}/agent-${i}" --image-dir "${IMAGE_DIR}" --domain-prefix "${PREFIX}${i}-" \
    --forward-ports "$((24000 + i * 500))-$((24000 + i * 500 + 499))" \
    --capacity-vcpus 8 --capacity-memory-mib 4096 --cpu-overcommit 1 \
    --graceful-timeout-secs 10 --log-json >>"${DIR}/agent-${i}.log" 2>&1 &
  PID[agent-${i}]=$!
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/${PID[cp]}/status" 2>/dev/null || echo 0; }

mkdir -p "${DIR}/cp"
SKYGATE_DATA_DIR=${DIR}/cp "${TARGET}/skygate-control-plane" admin create --username root \
  --email root@example.com --password-stdin <<<"${PASSWORD}" >/dev/null 2>&1
start_control_plane
start_agent 1
start_agent 2

token_of() { # username
  curl -fsS -m 30 "${API}/auth/login" -H 'content-type: application/json' \
    -d "$(jq -n --arg u "$1" --arg p "${PASSWORD}" '{username: $u, password: $p}')" | jq -r .access_token
}
ADMIN=$(token_of root)
for _ in $(seq 1 60); do
  ready=$(curl -fsS -m 30 "${API}/hosts" -H "authorization: Bearer ${ADMIN}" | jq '[.items[] | select(.state == "ready")] | length')
  [[ ${ready} == 2 ]] && break
  sleep 1
done
[[ ${ready} == 2 ]] || die "the agents did not register"
code=$(curl -sS -m 30 -o /dev/null -w '%{http_code}' "${API}/images" -H "authorization: Bearer ${ADMIN}" \
  -H 'content-type: application/json' --data-binary @"${IMAGE_DIR}/image.json")
[[ ${code} == 201 ]] || die "registering the image answered ${code}"
for c in $(seq 1 "${CLIENTS}"); do
  curl -fsS -m 30 "${API}/auth/register" -H 'content-type: application/json' \
    -d "$(jq -n --arg u "soak-${c}" --arg p "${PASSWORD}" '{username: $u, email: ($u + "@example.com"), password: $p}')" >/dev/null
done
log "cluster up in ${DIR}; load for ${MINUTES} min, a kill -9 every ${KILL_EVERY} s"

# --- the load --------------------------------------------------------------------------------
# One loop per tenant: every accepted machine id goes to accepted-<c>; answers other than the
# expected ones (202/204, 409 for an action that makes no sense now, 503 while the control
# plane restarts, or no answer at all during a kill) are errors.
END=$(($(date +%s) + MINUTES * 60))
client() { # number
  local c=$1 tok="" n=0 out code id action
  local accepted=${DIR}/accepted-${c} errors=${DIR}/errors-${c}
  : >"${accepted}"
  : >"${errors}"
  while (($(date +%s) < END)); do
    [[ -n ${tok} ]] || tok=$(token_of "soak-${c}" 2>/dev/null) || { tok=""; sleep 1; continue; }
    live=$(curl -fsS -m 30 "${API}/machines?limit=200" -H "authorization: Bearer ${tok}" 2>/dev/null | jq -r '.items[].id' 2>/dev/null) || { tok=""; sleep 1; continue; }
    count=$(grep -c . <<<"${live}" || true)
    case $((RANDOM % 6)) in
      0 | 1)
        if ((count < MAX_MACHINES)); then
          n=$((n + 1))
          key=$(cat /proc/sys/kernel/random/uuid)
          for _ in 1 2 3 4 5; do
            out=$(curl -sS -m 30 -w '\n%{http_code}' "${API}/machines" -H "authorization: Bearer ${tok}" \
              -H 'content-type: application/json' -H "idempotency-key: ${key}" \
              -d "{\"hostname\":\"s${c}-${n}\",\"image\":\"tiny\",\"vcpus\":1,\"memory_mib\":256,\"disk_gib\":1}" 2>/dev/null) || { sleep 2; continue; }
            code=${out##*$'\n'}
            case ${code} in
              202) jq -r .id <<<"${out%$'\n'*}" >>"${accepted}"; break ;;
              503 | 409) sleep 2 ;;
              *) echo "create: ${code} ${out%$'\n'*}" >>"${errors}"; break ;;
            esac
          done
        fi
        ;;
      2) action=stop ;;&
      3) action=start ;;&
      4) action=delete ;;&
      2 | 3 | 4)
        id=$(shuf -n1 <<<"${live}" 2>/dev/null || true)
        [[ -n ${id} ]] || continue
        if [[ ${action} == delete ]]; then
          code=$(curl -sS -m 30 -o /dev/null -w '%{http_code}' -X DELETE "${API}/machines/${id}" -H "authorization: Bearer ${tok}" 2>/dev/null) || code=000
        else
          code=$(curl -sS -m 30 -o /dev/null -w '%{http_code}' -X POST "${API}/machines/${id}/${action}" -H "authorization: Bearer ${tok}" 2>/dev/null) || code=000
        fi
        [[ ${code} =~ ^(202|204|404|409|503|000)$ ]] || echo "${action}: ${code}" >>"${errors}"
        ;;
      5)
        tok="" # a fresh login now and then
        ;;
    esac
    sleep 1
  done
}
for c in $(seq 1 "${CLIENTS}"); do client "${c}" & PID[client-${c}]=$!; done

sleep 60
RSS_START=$(rss_kib)
kills=0
next_kill=$(($(date +%s) + KILL_EVERY))
while (($(date +%s) < END)); do
  sleep 5
  (($(date +%s) >= next_kill)) || continue
  kills=$((kills + 1))
  if ((kills % 2 == 1)); then
    log "kill -9 of the control plane (pid ${PID[cp]})"
    kill9 cp
    sleep 2
    start_control_plane
    RSS_START=0 # a new process: measure flatness from its own warm-up
  else
    agent=$((kills / 2 % 2 + 1))
    log "kill -9 of agent ${agent} (pid ${PID[agent-${agent}]})"
    kill9 "agent-${agent}"
    sleep 5
    start_agent "${agent}"
  fi
  next_kill=$(($(date +%s) + KILL_EVERY))
  if [[ -n ${PID[cp]:-} ]]; then
    (sleep 60 && awk '/^VmRSS:/ {print $2}' "/proc/${PID[cp]}/status" >"${DIR}/rss-after-restart" 2>/dev/null) &
    PID[rss-sampler]=$!
  fi
done
stop rss-sampler
for c in $(seq 1 "${CLIENTS}"); do wait "${PID[client-${c}]}" || true; unset "PID[client-${c}]"; done
log "load over after ${kills} kills; letting every machine settle"

# --- consistency -----------------------------------------------------------------------------
# Access tokens last 15 minutes: the administrator logs in again for the checks.
ADMIN=$(token_of root)
fail=0
check() { # ok message
  if [[ $1 == ok ]]; then echo "soak: ok   $2"; else echo "soak: FAIL $2"; fail=1; fi
}
TRANSITIONAL='pending|provisioning|starting|stopping|rebooting|deleting'
deadline=$(($(date +%s) + 600))
while :; do
  all=$(curl -fsS -m 30 "${API}/machines?limit=200" -H "authorization: Bearer ${ADMIN}" 2>/dev/null) || all='{"items":[]}'
  busy=$(jq -r --arg t "^(${TRANSITIONAL})$" '[.items[] | select(.status | test($t))] | length' <<<"${all}")
  [[ ${busy} == 0 ]] && break
  (($(date +%s) < deadline)) || break
  sleep 5
done
# Domains of machines deleted while their agent was dead are orphans until the reconciler's
# grace (30 s) and next pass (10 s) are over.
sleep 45
all=$(curl -fsS -m 30 "${API}/machines?limit=200" -H "authorization: Bearer ${ADMIN}")
accepted=$(cat "${DIR}"/accepted-* | sort -u)
total=$(grep -c . <<<"${accepted}" || true)
not_final=0
for id in ${accepted}; do
  status=$(curl -sS -m 30 -o "${DIR}/m.json" -w '%{http_code}' "${API}/machines/${id}" -H "authorization: Bearer ${ADMIN}")
  if [[ ${status} == 200 ]]; then
    s=$(jq -r .status "${DIR}/m.json")
    [[ ${s} =~ ^(running|stopped|failed)$ ]] || { not_final=$((not_final + 1)); echo "  ${id}: ${s}" >&2; }
  elif [[ ${status} != 404 ]]; then
    not_final=$((not_final + 1))
  fi
done
[[ ${not_final} == 0 ]] && check ok "all ${total} accepted machines are final (running, stopped, failed or deleted)" ||
  check fail "${not_final} of ${total} accepted machines are not final"

errors=$(cat "${DIR}"/errors-* 2>/dev/null | sort | uniq -c | sort -rn | head -5)
[[ -z ${errors} ]] && check ok "no unexpected answers" || check fail "unexpected answers: ${errors//$'\n'/; }"

hosts=$(curl -fsS -m 30 "${API}/hosts" -H "authorization: Bearer ${ADMIN}")
for i in 1 2; do
  # Running and stopped machines must have their domain; a failed one may or may not (it
  # failed somewhere along the way); nothing else may have one.
  want=$(jq -r --arg h "soak-${i}" --arg p "${PREFIX}${i}-" '.items[] | select(.host == $h and (.status == "running" or .status == "stopped")) | $p + .id' <<<"${all}" | sort)
  may=$(jq -r --arg h "soak-${i}" --arg p "${PREFIX}${i}-" '.items[] | select(.host == $h) | $p + .id' <<<"${all}" | sort)
  have=$("${VIRSH[@]}" list --all --name | grep -E "^${PREFIX}${i}-" | sort || true)
  missing=$(comm -23 <(grep . <<<"${want}" || true) <(grep . <<<"${have}" || true))
  orphans=$(comm -13 <(grep . <<<"${may}" || true) <(grep . <<<"${have}" || true))
  [[ -z ${missing} && -z ${orphans} ]] && check ok "agent ${i}: domains match the records ($(grep -c . <<<"${have}" || true) domains)" ||
    check fail "agent ${i}: missing domains [${missing//$'\n'/ }], orphans [${orphans//$'\n'/ }]"
  alloc=$(jq -r --arg n "soak-${i}" '.items[] | select(.name == $n) | "\(.allocated.vcpus) \(.allocated.memory_mib)"' <<<"${hosts}")
  sum=$(jq -r --arg h "soak-${i}" '[.items[] | select(.host == $h)] | "\(map(.vcpus) | add // 0) \(map(.memory_mib) | add // 0)"' <<<"${all}")
  # The host's allocation (GET /hosts, the scheduler's view) against the machines listed on
  # it (GET /machines): two queries that must agree after kills mid-placement.
  [[ ${alloc} == "${sum}" ]] && check ok "agent ${i}: allocation ${alloc} (vCPUs, MiB) matches the machines placed on it" ||
    check fail "agent ${i}: allocation ${alloc} but the machines placed on it hold ${sum}"
done

RSS_END=$(rss_kib)
RSS_REF=$(cat "${DIR}/rss-after-restart" 2>/dev/null || echo "${RSS_START}")
((RSS_REF > 0)) || RSS_REF=${RSS_START}
if ((RSS_REF > 0 && RSS_END * 10 <= RSS_REF * 15)); then
  check ok "control plane RSS flat: $((RSS_REF / 1024)) MiB after warm-up, $((RSS_END / 1024)) MiB at the end"
else
  check fail "control plane RSS grew: $((RSS_REF / 1024)) MiB after warm-up, $((RSS_END / 1024)) MiB at the end"
fi

# Leave nothing: delete every machine and wait for the domains to go.
for id in $(jq -r '.items[].id' <<<"${all}"); do
  curl -sS -m 30 -o /dev/null -X DELETE "${API}/machines/${id}" -H "authorization: Bearer ${ADMIN}" || true
done
for _ in $(seq 1 60); do [[ -z $(own_domains) ]] && break; sleep 2; done
[[ -z $(own_domains) ]] && check ok "every domain removed after the deletes" || check fail "domains left: $(own_domains | tr '\n' ' ')"

summary="${MINUTES} min, ${total} machines accepted, ${kills} kills (control plane and agents in turn)"
if ((fail == 0)); then echo "SOAK PASS: ${summary}"; else echo "SOAK FAIL: ${summary}"; exit 1; fi
