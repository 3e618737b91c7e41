#!/usr/bin/env bash
# A whole SkyGate on this machine, as root, in one command (the README's first one): libvirtd,
# one control plane and N host agents (default 1), all on 127.0.0.1, the tiny guest image
# registered, an administrator, and the `skygate` client on PATH. Builds what it runs first.
#
#   scripts/dev-cluster.sh [start] [N]   start; a running cluster is left running, and the
#                                        steps after the start are checked again (harmless)
#   scripts/dev-cluster.sh stop          stop every process it started (by pid); domains stay
#   scripts/dev-cluster.sh purge         stop, then remove the cluster's domains and state
#
# The administrator (created once; a re-run finds it): username admin (SKYGATE_DEV_ADMIN),
# password read from stdin when stdin is not a terminal and carries one
# (`echo PASSWORD | scripts/dev-cluster.sh`), else 24 random URL-safe characters printed once
# on stdout. A generated password is also kept in $SKYGATE_DEV_DIR/admin-password (0600, root):
# that directory already holds the JWT secret, which is worth more, and with the copy a re-run
# can still check hosts and the image. A password given on stdin is stored nowhere.
#
# Settings (environment): SKYGATE_DEV_DIR (state, default /var/lib/skygate-dev),
# SKYGATE_DEV_HTTP (127.0.0.1:8080, the `skygate` client's default), SKYGATE_DEV_GRPC
# (127.0.0.1:9090), SKYGATE_DEV_PREFIX (skygate-dev: agent i owns domains skygate-devi-<uuid>,
# and purge removes only those), SKYGATE_DEV_AGENT_PORT (9101: agent i listens on it + i - 1),
# SKYGATE_DEV_FORWARD_FROM (21000: agent i forwards guests' ssh from 1000 ports starting at it
# + (i - 1) * 1000), SKYGATE_DEV_BIN_DIR (/usr/local/bin, where `skygate` is linked),
# SKYGATE_DEV_PROFILE (release, or debug), SKYGATE_DEV_IMAGE_DIR (/var/lib/skygate-images/tiny,
# built there when missing or older than images/tiny/), SKYGATE_DEV_WAIT_SECS (60, how long
# agents may take to register), and per agent SKYGATE_DEV_AGENT_VCPUS / _MEMORY_MIB /
# _DISK_GIB (capacity before overcommit; default: what the host has). Logs are in
# $SKYGATE_DEV_DIR/*.log.
# Progress goes to stderr; stdout carries only the password (when generated) and what to type
# next.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${SKYGATE_DEV_DIR:-/var/lib/skygate-dev}
HTTP=${SKYGATE_DEV_HTTP:-127.0.0.1:8080}
GRPC=${SKYGATE_DEV_GRPC:-127.0.0.1:9090}
PREFIX=${SKYGATE_DEV_PREFIX:-skygate-dev}
AGENT_PORT=${SKYGATE_DEV_AGENT_PORT:-9101}
FORWARD_FROM=${SKYGATE_DEV_FORWARD_FROM:-21000}
ADMIN=${SKYGATE_DEV_ADMIN:-admin}
BIN_DIR=${SKYGATE_DEV_BIN_DIR:-/usr/local/bin}
PROFILE=${SKYGATE_DEV_PROFILE:-release}
WAIT_SECS=${SKYGATE_DEV_WAIT_SECS:-60}
TARGET=$(realpath -m "${CARGO_TARGET_DIR:-target}")/${PROFILE}
IMAGE_DIR=${SKYGATE_DEV_IMAGE_DIR:-/var/lib/skygate-images/tiny}
API=http://${HTTP}/api/v1
PIDS=${DIR}/pids
ADMIN_PASSWORD_FILE=${DIR}/admin-password
VIRSH=(virsh -c qemu:///system)

log() { echo "dev-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

# The prefix becomes part of a regular expression (purge) and of domain names: letters, digits
# and dashes, ending in a non-digit so that agent numbers cannot run into another prefix.
[[ ${PREFIX} =~ ^[a-z][a-z0-9-]*[a-z-]$ ]] ||
  die "SKYGATE_DEV_PREFIX must be lower-case letters, digits and '-', ending in a non-digit (got '${PREFIX}')"
[[ ${PROFILE} == release || ${PROFILE} == debug ]] ||
  die "SKYGATE_DEV_PROFILE must be release or debug (got '${PROFILE}')"
# Exactly the names this cluster's agents give domains: <prefix><agent number>-<uuid>.
UUID='[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
OWN_DOMAINS="^${PREFIX}[0-9]+-${UUID}\$"

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

stop_all() {
  [[ -f ${PIDS} ]] || return 0
  local name pid
  while read -r name pid; do
    if alive "${pid}"; then
      kill "${pid}" 2>/dev/null || true
      for _ in $(seq 1 50); do alive "${pid}" || break; sleep 0.2; done
      if alive "${pid}"; then kill -9 "${pid}" 2>/dev/null || true; fi
      log "stopped ${name} (pid ${pid})"
    fi
  done <"${PIDS}"
  rm -f "${PIDS}"
}

# Every process in the pid file is alive.
running() {
  [[ -s ${PIDS} ]] || return 1
  local name pid
  while read -r name pid; do
    alive "${pid}" || return 1
  done <"${PIDS}"
}

case ${1:-start} in
  stop)
    stop_all
    exit 0
    ;;
  purge)
    stop_all
    for name in $("${VIRSH[@]}" list --all --name 2>/dev/null | grep -E "${OWN_DOMAINS}" || true); do
      "${VIRSH[@]}" destroy "${name}" >/dev/null 2>&1 || true
      "${VIRSH[@]}" undefine "${name}" >/dev/null 2>&1 || true
      log "removed domain ${name}"
    done
    rm -rf "${DIR}"
    # The client link start made, if it is still this checkout's.
    if [[ -L ${BIN_DIR}/skygate && $(readlink "${BIN_DIR}/skygate") == "${TARGET}/skygate" ]]; then
      rm -f "${BIN_DIR}/skygate"
      log "removed the link ${BIN_DIR}/skygate"
    fi
    exit 0
    ;;
  start) shift || true ;;
  [0-9]*) ;;
  *)
    echo "usage: $0 [start] [N] | stop | purge" >&2
    exit 2
    ;;
esac
AGENTS=${1:-1}
[[ ${AGENTS} =~ ^[1-9]$ ]] || { echo "N must be 1-9" >&2; exit 2; }
[[ ${EUID} -eq 0 ]] || { echo "dev-cluster.sh: run as root (libvirt, QEMU)" >&2; exit 1; }
[[ ${ADMIN} =~ ^[a-z0-9_.-]{3,32}$ ]] || die "SKYGATE_DEV_ADMIN must be 3-32 of [a-z0-9_.-] (got '${ADMIN}')"

# The administrator's password, if stdin brings one. Read first, before anything else can
# consume stdin; a pipe that stays open without data is not waited on for long.
GIVEN_PASSWORD=
if [[ ! -t 0 ]]; then
  IFS= read -r -t 5 GIVEN_PASSWORD || true
  GIVEN_PASSWORD=${GIVEN_PASSWORD%$'\r'}
fi

# The control plane and the admin command must read the same database: only --data-dir
# chooses it here, so a database URL or secret exported for some other SkyGate must not leak in.
unset SKYGATE_DATABASE_URL SKYGATE_JWT_SECRET_FILE

if running; then
  AGENTS=$(grep -c '^agent-' "${PIDS}")
  log "already running (${PIDS}, ${AGENTS} agent(s)); checking the administrator, image and client"
  log "('scripts/dev-cluster.sh stop' first to restart it)"
else
  # Whatever is left of a partly running cluster goes before a fresh start.
  stop_all
  # Something else on our ports would answer the checks below in our control plane's stead.
  for addr in "${HTTP}" "${GRPC}"; do
    if (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null; then
      die "something already listens on ${addr} (another SkyGate?); stop it or set SKYGATE_DEV_HTTP / SKYGATE_DEV_GRPC"
    fi
  done
  scripts/install-deps.sh --host
  build=(cargo build --locked -p control-plane -p host-agent -p skygate-cli)
  [[ ${PROFILE} == release ]] && build+=(--release)
  "${build[@]}"
  # Built when missing, or older than its recipe (another checkout built it): the build is
  # reproducible and takes seconds once its packages are cached.
  if [[ ! -f ${IMAGE_DIR}/image.json || -n $(find images/tiny -newer "${IMAGE_DIR}/image.json" -print -quit) ]]; then
    # build.sh resolves the kernel package from apt's lists: refresh lists older than a day.
    if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -n 1) ]]; then
      apt-get update -qq
    fi
    mkdir -p "${IMAGE_DIR}"
    images/tiny/build.sh "${IMAGE_DIR}"
  fi

  mkdir -p "${DIR}"
  # libvirt's QEMU runs as another user and must reach the agents' disks and seeds inside.
  chmod 0755 "${DIR}"
  TOKEN_FILE=${DIR}/agent-token
  if [[ ! -s ${TOKEN_FILE} ]]; then
    (umask 077 && head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"${TOKEN_FILE}")
  fi
  SKYGATE_AGENT_TOKEN=$(cat "${TOKEN_FILE}")
  export SKYGATE_AGENT_TOKEN
  : >"${PIDS}"

  NO_COLOR=1 "${TARGET}/skygate-control-plane" serve --http-addr "${HTTP}" --grpc-addr "${GRPC}" \
    --data-dir "${DIR}/control-plane" </dev/null >"${DIR}/control-plane.log" 2>&1 &
  echo "control-plane $!" >>"${PIDS}"

  for i in $(seq 1 "${AGENTS}"); do
    capacity=()
    [[ -n ${SKYGATE_DEV_AGENT_VCPUS:-} ]] && capacity+=(--capacity-vcpus "${SKYGATE_DEV_AGENT_VCPUS}")
    [[ -n ${SKYGATE_DEV_AGENT_MEMORY_MIB:-} ]] && capacity+=(--capacity-memory-mib "${SKYGATE_DEV_AGENT_MEMORY_MIB}")
    [[ -n ${SKYGATE_DEV_AGENT_DISK_GIB:-} ]] && capacity+=(--capacity-disk-gib "${SKYGATE_DEV_AGENT_DISK_GIB}")
    from=$((FORWARD_FROM + (i - 1) * 1000))
    "${TARGET}/skygate-host-agent" --name "agent-${i}" --listen "127.0.0.1:$((AGENT_PORT + i - 1))" \
      --control-plane "http://${GRPC}" --data-dir "${DIR}/agent-${i}" --image-dir "${IMAGE_DIR}" \
      --domain-prefix "${PREFIX}${i}-" --forward-ports "${from}-$((from + 999))" \
      "${capacity[@]}" </dev/null >"${DIR}/agent-${i}.log" 2>&1 &
    echo "agent-${i} $!" >>"${PIDS}"
  done
fi

pid_of() { awk -v n="$1" '$1 == n {print $2}' "${PIDS}"; }
# The last lines of a process's log, indented, for a failure message.
log_tail() {
  if [[ -f ${DIR}/$1.log ]]; then tail -n 15 "${DIR}/$1.log" | sed 's/^/    /' >&2; fi
}

# --- the control plane answers -----------------------------------------------------------------
deadline=$((SECONDS + 20))
until curl -fsS "http://${HTTP}/healthz" >/dev/null 2>&1; do
  if ! alive "$(pid_of control-plane)" || ((SECONDS >= deadline)); then
    log "waited for the control plane to answer http://${HTTP}/healthz; it did not (pid $(pid_of control-plane)," \
      "$(alive "$(pid_of control-plane)" && echo alive || echo exited)); the end of ${DIR}/control-plane.log:"
    log_tail control-plane
    exit 1
  fi
  sleep 0.1
done

# --- the administrator -------------------------------------------------------------------------
# A token for the checks below, or nothing when the password is not known to this run.
login_token() {
  PW=$1 jq -n --arg u "${ADMIN}" '{username: $u, password: env.PW}' |
    curl -sS "${API}/auth/login" -H 'content-type: application/json' --data-binary @- |
    jq -r '.access_token // empty'
}

PASSWORD=${GIVEN_PASSWORD}
GENERATED=false
if [[ -z ${PASSWORD} ]]; then
  if [[ -s ${ADMIN_PASSWORD_FILE} ]]; then
    PASSWORD=$(cat "${ADMIN_PASSWORD_FILE}")
  else
    PASSWORD=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
    GENERATED=true
  fi
fi
created_err=$(mktemp)
trap 'rm -f "${created_err}"' EXIT
CREATED=false
if printf '%s\n' "${PASSWORD}" | "${TARGET}/skygate-control-plane" admin create --username "${ADMIN}" \
    --email "${ADMIN}@example.com" --password-stdin --data-dir "${DIR}/control-plane" \
    >/dev/null 2>"${created_err}"; then
  CREATED=true
  if ${GENERATED}; then
    (umask 077 && printf '%s\n' "${PASSWORD}" >"${ADMIN_PASSWORD_FILE}")
  fi
  log "created administrator ${ADMIN}"
elif grep -q "username '${ADMIN}' is taken" "${created_err}"; then
  ${GENERATED} && PASSWORD=
  log "administrator ${ADMIN} exists (made by an earlier run)"
else
  log "could not create administrator ${ADMIN}:"
  sed 's/^/    /' "${created_err}" >&2
  exit 1
fi
TOKEN=
[[ -n ${PASSWORD} ]] && TOKEN=$(login_token "${PASSWORD}")
if [[ -z ${TOKEN} ]]; then
  log "cannot log in as ${ADMIN} with the password this run knows; not checking hosts and the image" \
    "(pipe the administrator's password to this script to check them)"
fi
auth=(-H "authorization: Bearer ${TOKEN}")

# --- the agents registered ---------------------------------------------------------------------
if [[ -n ${TOKEN} ]]; then
  deadline=$((SECONDS + WAIT_SECS))
  while :; do
    hosts=$(curl -sS "${API}/hosts" "${auth[@]}" || true)
    waiting=()
    for i in $(seq 1 "${AGENTS}"); do
      state=$(jq -r --arg n "agent-${i}" '[.items[]? | select(.name == $n) | .state][0] // "not registered"' <<<"${hosts}" 2>/dev/null || echo "?")
      [[ ${state} == ready ]] || waiting+=("agent-${i} (${state})")
      if ! alive "$(pid_of "agent-${i}")"; then
        log "agent-${i} exited before it registered; the end of ${DIR}/agent-${i}.log:"
        log_tail "agent-${i}"
        exit 1
      fi
    done
    ((${#waiting[@]} == 0)) && break
    if ((SECONDS >= deadline)); then
      log "waited ${WAIT_SECS} s for every agent to be ready in GET ${API}/hosts; still waiting for: ${waiting[*]}"
      for i in $(seq 1 "${AGENTS}"); do log "the end of ${DIR}/agent-${i}.log:"; log_tail "agent-${i}"; done
      log "the end of ${DIR}/control-plane.log:"
      log_tail control-plane
      exit 1
    fi
    sleep 0.5
  done
  log "${AGENTS} agent(s) registered and ready"
fi

# --- the tiny image ----------------------------------------------------------------------------
if [[ -n ${TOKEN} ]]; then
  name=$(jq -r .name "${IMAGE_DIR}/image.json")
  images=$(curl -fsS "${API}/images" "${auth[@]}") || die "GET ${API}/images failed"
  # What identifies the bytes: the image's digest or its kernel's and initrd's.
  digests='[.sha256, .boot.kernel_sha256?, .boot.initrd_sha256?] | map(. // "-") | join(" ")'
  registered=$(jq -r --arg n "${name}" "[.items[] | select(.name == \$n)][0] // empty | ${digests}" <<<"${images}")
  if [[ -z ${registered} ]]; then
    answer=$(curl -sS -w '\n%{http_code}' "${API}/images" "${auth[@]}" -H 'content-type: application/json' \
      --data-binary @"${IMAGE_DIR}/image.json")
    [[ ${answer##*$'\n'} == 201 ]] || die "POST ${API}/images (${IMAGE_DIR}/image.json) failed: ${answer%$'\n'*}"
    log "registered image ${name} (${IMAGE_DIR}/image.json)"
  else
    log "image ${name} is registered"
    built=$(jq -r "${digests}" "${IMAGE_DIR}/image.json")
    [[ ${registered} == "${built}" ]] ||
      log "warning: image ${name} was registered with other files than ${IMAGE_DIR} holds now (rebuilt" \
        "since?): its machines will fail the agent's check; 'scripts/dev-cluster.sh purge' and start again"
  fi
fi

# --- the client on PATH ------------------------------------------------------------------------
CLI=${TARGET}/skygate
LINK=${BIN_DIR}/skygate
if [[ -e ${LINK} && ! -L ${LINK} ]]; then
  log "${LINK} exists and is not a link; leaving it (this build's client is ${CLI})"
  LINK=${CLI}
elif [[ $(readlink "${LINK}" 2>/dev/null) != "${CLI}" ]]; then
  mkdir -p "${BIN_DIR}"
  ln -sfn "${CLI}" "${LINK}"
  log "linked ${LINK} -> ${CLI}"
fi
# What a newcomer types: the bare name when it is the one on PATH.
skygate=${LINK}
[[ $(command -v skygate 2>/dev/null) == "${LINK}" ]] && skygate=skygate
[[ ${HTTP} == 127.0.0.1:8080 ]] || skygate="${skygate} --api http://${HTTP}"

# --- what to type next (stdout) ----------------------------------------------------------------
log "control plane on http://${HTTP} (agents register on ${GRPC}); state and logs in ${DIR}"
echo
echo "SkyGate runs: control plane http://${HTTP}, ${AGENTS} agent(s), image tiny."
if ${CREATED} && ${GENERATED}; then
  echo "Administrator: ${ADMIN}"
  echo "Password: ${PASSWORD}"
  echo "  (generated; shown only this once. A copy is kept in ${ADMIN_PASSWORD_FILE}, mode 0600.)"
elif ${CREATED}; then
  echo "Administrator: ${ADMIN}, with the password read from stdin (stored nowhere)."
elif [[ -s ${ADMIN_PASSWORD_FILE} ]]; then
  echo "Administrator: ${ADMIN}, created earlier; its generated password is in ${ADMIN_PASSWORD_FILE}."
else
  echo "Administrator: ${ADMIN}, created earlier with the password given then."
fi
# Printed for the reader to type, so the tilde stays.
# shellcheck disable=SC2088
KEY='~/.ssh/skygate'
echo
echo "Next, as a tenant (the administrator '${ADMIN}' sees hosts: ${skygate} login -u ${ADMIN}; ${skygate} hosts list):"
echo "  ${skygate} register -u ann --email ann@example.com    # asks for a password"
echo "  ${skygate} login -u ann"
if [[ ! -d ${HOME}/.ssh ]]; then
  echo "  mkdir -m 700 ~/.ssh; ssh-keygen -q -t ed25519 -N '' -f ${KEY}"
elif [[ ! -f ${HOME}/.ssh/skygate ]]; then
  echo "  ssh-keygen -q -t ed25519 -N '' -f ${KEY}"
fi
echo "  ${skygate} machines create web-1 --image tiny --memory-mib 256 --disk-gib 1 --ssh-key ${KEY}.pub --wait"
echo "  ${skygate} machines ssh web-1 -i ${KEY} -- hostname"
echo
echo "Stop it with 'scripts/dev-cluster.sh stop'; 'purge' also removes its machines and state."
