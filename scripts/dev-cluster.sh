#!/usr/bin/env bash
# A whole SkyGate on this machine, as root: libvirtd, one control plane and N host agents
# (default 2), each agent with its own gRPC port, data dir, domain prefix and forwarded-port
# range, all on 127.0.0.1. Builds the binaries and the tiny guest image first.
#
#   scripts/dev-cluster.sh [start] [N]   start (idempotent: a running cluster is left alone)
#   scripts/dev-cluster.sh stop          stop every process it started (by pid); domains stay
#   scripts/dev-cluster.sh purge         stop, then remove the cluster's domains and state
#
# Settings (environment): SKYGATE_DEV_DIR (state, default /var/lib/skygate-dev),
# SKYGATE_DEV_HTTP (127.0.0.1:8080), SKYGATE_DEV_GRPC (127.0.0.1:9090), and per agent
# SKYGATE_DEV_AGENT_VCPUS / _MEMORY_MIB / _DISK_GIB (capacity before overcommit; default:
# what the host has). Logs are in $SKYGATE_DEV_DIR/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${SKYGATE_DEV_DIR:-/var/lib/skygate-dev}
HTTP=${SKYGATE_DEV_HTTP:-127.0.0.1:8080}
GRPC=${SKYGATE_DEV_GRPC:-127.0.0.1:9090}
TARGET=${CARGO_TARGET_DIR:-target}/release
PIDS=${DIR}/pids

log() { echo "dev-cluster: $*" >&2; }

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

stop_all() {
  [[ -f ${PIDS} ]] || return 0
  local name pid
  while read -r name pid; do
    if alive "${pid}"; then
      kill "${pid}" 2>/dev/null || true
      for _ in $(seq 1 50); do alive "${pid}" || break; sleep 0.2; done
      alive "${pid}" && kill -9 "${pid}" 2>/dev/null || true
      log "stopped ${name} (pid ${pid})"
    fi
  done <"${PIDS}"
  rm -f "${PIDS}"
}

case ${1:-start} in
  stop)
    stop_all
    exit 0
    ;;
  purge)
    stop_all
    for name in $(virsh -c qemu:///system list --all --name 2>/dev/null | grep -E '^skygate-dev[0-9]+-' || true); do
      virsh -c qemu:///system destroy "${name}" >/dev/null 2>&1 || true
      virsh -c qemu:///system undefine "${name}" >/dev/null 2>&1 || true
      log "removed domain ${name}"
    done
    rm -rf "${DIR}"
    exit 0
    ;;
  start) shift || true ;;
  [0-9]*) ;;
  *)
    echo "usage: $0 [start] [N] | stop | purge" >&2
    exit 2
    ;;
esac
AGENTS=${1:-2}
[[ ${AGENTS} =~ ^[1-9]$ ]] || { echo "N must be 1-9" >&2; exit 2; }
[[ ${EUID} -eq 0 ]] || { echo "dev-cluster.sh: run as root (libvirt, QEMU)" >&2; exit 1; }

if [[ -f ${PIDS} ]] && awk '{print $2}' "${PIDS}" | while read -r p; do alive "$p" || exit 1; done; then
  log "already running (${PIDS}); 'scripts/dev-cluster.sh stop' first to restart"
  exit 0
fi

scripts/install-deps.sh --host
cargo build --release --locked -p control-plane -p host-agent
IMAGE_DIR=/var/lib/skygate-images/tiny
if [[ ! -f ${IMAGE_DIR}/image.json ]]; then
  mkdir -p "${IMAGE_DIR}"
  images/tiny/build.sh "${IMAGE_DIR}"
fi

mkdir -p "${DIR}"
chmod 0755 "${DIR}"
# Whatever is left of a partly running cluster goes before a fresh start.
stop_all
TOKEN_FILE=${DIR}/agent-token
if [[ ! -s ${TOKEN_FILE} ]]; then
  (umask 077 && head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"${TOKEN_FILE}")
fi
SKYGATE_AGENT_TOKEN=$(cat "${TOKEN_FILE}")
export SKYGATE_AGENT_TOKEN
: >"${PIDS}"

"${TARGET}/skygate-control-plane" serve --http-addr "${HTTP}" --grpc-addr "${GRPC}" \
  --data-dir "${DIR}/control-plane" >"${DIR}/control-plane.log" 2>&1 &
echo "control-plane $!" >>"${PIDS}"
for _ in $(seq 1 100); do
  curl -fsS "http://${HTTP}/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://${HTTP}/healthz" >/dev/null || { log "the control plane did not start; see ${DIR}/control-plane.log"; exit 1; }

for i in $(seq 1 "${AGENTS}"); do
  capacity=()
  [[ -n ${SKYGATE_DEV_AGENT_VCPUS:-} ]] && capacity+=(--capacity-vcpus "${SKYGATE_DEV_AGENT_VCPUS}")
  [[ -n ${SKYGATE_DEV_AGENT_MEMORY_MIB:-} ]] && capacity+=(--capacity-memory-mib "${SKYGATE_DEV_AGENT_MEMORY_MIB}")
  [[ -n ${SKYGATE_DEV_AGENT_DISK_GIB:-} ]] && capacity+=(--capacity-disk-gib "${SKYGATE_DEV_AGENT_DISK_GIB}")
  "${TARGET}/skygate-host-agent" --name "agent-${i}" --listen "127.0.0.1:$((9100 + i))" \
    --control-plane "http://${GRPC}" --data-dir "${DIR}/agent-${i}" \
    --domain-prefix "skygate-dev${i}-" --forward-ports "$((20000 + i * 1000))-$((20999 + i * 1000))" \
    "${capacity[@]}" >"${DIR}/agent-${i}.log" 2>&1 &
  echo "agent-${i} $!" >>"${PIDS}"
done

log "control plane on http://${HTTP} (agents register on ${GRPC}); ${AGENTS} agent(s)"
log "state and logs in ${DIR}; stop with: scripts/dev-cluster.sh stop"
log "admin: echo PASSWORD | ${TARGET}/skygate-control-plane admin create --username root --email root@example.com --password-stdin --data-dir ${DIR}/control-plane"
log "image: POST /api/v1/images with the body in ${IMAGE_DIR}/image.json"
