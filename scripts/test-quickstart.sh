#!/usr/bin/env bash
# Does what the README's "From nothing to an SSH session in a VM" tells a newcomer, as root, on
# a cluster of its own: runs scripts/dev-cluster.sh (its own state dir, ports, domain prefix and
# bin dir, so a developer's cluster and CLI session are never touched), runs it again while it
# runs (must be harmless), logs in with the password it printed, signs a tenant up, creates
# web-1 with a fresh key, waits for it and runs `skygate machines ssh web-1 -- hostname` with
# no terminal, expecting "web-1". Every wait is bounded and names what it waited for. The
# cluster, its domains and state are removed on any exit.
#
#   scripts/test-quickstart.sh
#
# Settings (environment): SKYGATE_QUICKSTART_PROFILE (release, as the README builds; test.sh
# uses debug), SKYGATE_QUICKSTART_START_SECS (2400: the first dev-cluster.sh, a cold build
# included), SKYGATE_QUICKSTART_CREATE_SECS (300), SKYGATE_QUICKSTART_SSH_SECS (120; one attempt
# may take 90 s: the client waits for the guest to print its host keys on the console).
# Last line: "quickstart: 1 passed, 0 failed" or "quickstart: 0 passed, 1 failed".
set -euo pipefail
cd "$(dirname "$0")/.."
[[ ${EUID} -eq 0 ]] || { echo "test-quickstart.sh: run as root (it runs scripts/dev-cluster.sh)" >&2; exit 1; }

START_SECS=${SKYGATE_QUICKSTART_START_SECS:-2400}
CREATE_SECS=${SKYGATE_QUICKSTART_CREATE_SECS:-300}
SSH_SECS=${SKYGATE_QUICKSTART_SSH_SECS:-120}
NAME=web-1

say() { echo "quickstart: $*" >&2; }
PASSED=0
T0=${SECONDS}
since() { echo "$((SECONDS - T0)) s"; }

# A port nothing listens on now, below the agents' forwarding ranges (20000 and up) and the
# kernel's ephemeral ports (the agents pick forwarded ports that are free themselves).
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((10000 + RANDOM % 10000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/${p}") 2>/dev/null; then
      echo "${p}"
      return 0
    fi
  done
  return 1
}

# Under /var/lib, not /tmp: every directory on the path to the agent's disks and seeds must be
# traversable by libvirt's QEMU user (mktemp -d makes 0700 dirs; dev-cluster opens its own).
WORK=$(mktemp -d /var/lib/skygate-test-quickstart.XXXXXX)
chmod 0755 "${WORK}"
export SKYGATE_DEV_DIR=${WORK}/cluster
ports=()
while ((${#ports[@]} < 3)); do
  p=$(free_port) || { echo "test-quickstart.sh: no free port found" >&2; rm -rf "${WORK}"; exit 1; }
  [[ " ${ports[*]} " == *" ${p} "* ]] || ports+=("${p}")
done
export SKYGATE_DEV_HTTP=127.0.0.1:${ports[0]}
export SKYGATE_DEV_GRPC=127.0.0.1:${ports[1]}
export SKYGATE_DEV_AGENT_PORT=${ports[2]}
# Below the kernel's ephemeral ports (32768 and up) and above dev-cluster's defaults.
export SKYGATE_DEV_FORWARD_FROM=$((24000 + RANDOM % 8 * 1000))
# Matches test.sh's clean-up of test domains (^skygate-test-) should this run be killed -9.
export SKYGATE_DEV_PREFIX=skygate-test-qs-$$-
export SKYGATE_DEV_BIN_DIR=${WORK}/bin
export SKYGATE_DEV_PROFILE=${SKYGATE_QUICKSTART_PROFILE:-release}
export SKYGATE_CONFIG_DIR=${WORK}/config
export PATH=${WORK}/bin:${PATH}
unset SKYGATE_API SKYGATE_DEV_ADMIN
API=http://${SKYGATE_DEV_HTTP}

cleanup() {
  local rc=$?
  if [[ ${PASSED} -ne 1 ]]; then
    for f in "${SKYGATE_DEV_DIR}"/control-plane.log "${SKYGATE_DEV_DIR}"/agent-1.log; do
      [[ -f ${f} ]] || continue
      echo "--- the end of ${f} (without access-log lines) ---" >&2
      grep -v 'skygate::access' "${f}" | tail -n 20 >&2
    done
  fi
  scripts/dev-cluster.sh purge >/dev/null 2>&1 || say "warning: 'scripts/dev-cluster.sh purge' failed"
  rm -rf "${WORK}"
  if [[ ${rc} -eq 0 && ${PASSED} -eq 1 ]]; then
    echo "quickstart: 1 passed, 0 failed"
  else
    echo "quickstart: 0 passed, 1 failed"
    [[ ${rc} -ne 0 ]] || rc=1
  fi
  exit "${rc}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { say "FAIL: $*"; exit 1; }
# The last lines of a step's output, for a failure.
show() { sed 's/^/    /' "$1" >&2; }

say "cluster in ${SKYGATE_DEV_DIR}, API ${API}, domains ${SKYGATE_DEV_PREFIX}1-<uuid>, ${SKYGATE_DEV_PROFILE} build"

# How a bounded step ended, from its exit status.
ended() { if (($1 == 124)); then echo "still running after $2 s"; else echo "exit status $1"; fi; }

# 1. The README's first command.
rc=0
timeout "${START_SECS}" scripts/dev-cluster.sh </dev/null >"${WORK}/start.out" 2>"${WORK}/start.err" || rc=$?
if ((rc != 0)); then
  say "its last output:"
  tail -n 30 "${WORK}/start.err" | show /dev/stdin
  fail "waited for scripts/dev-cluster.sh to start the cluster: $(ended "${rc}" "${START_SECS}")"
fi
say "dev-cluster.sh started the cluster after $(since); it printed:"
{ grep -v '^Password: ' "${WORK}/start.out" || true; } | show /dev/stdin
PASSWORD=$(sed -n 's/^Password: //p' "${WORK}/start.out")
[[ ${PASSWORD} =~ ^[A-Za-z0-9_-]{24}$ ]] || fail "no 24-character generated password on a 'Password: ' line of dev-cluster.sh's stdout"
# Not the default port, so the commands it prints must name the API.
grep -q "^  skygate --api ${API} machines create ${NAME} " "${WORK}/start.out" ||
  fail "dev-cluster.sh's next steps do not show 'skygate --api ${API} machines create ${NAME} ...'"

# 2. Again, while it runs: harmless, and no new password.
rc=0
timeout 120 scripts/dev-cluster.sh </dev/null >"${WORK}/again.out" 2>"${WORK}/again.err" || rc=$?
if ((rc != 0)); then
  tail -n 30 "${WORK}/again.err" | show /dev/stdin
  fail "a second scripts/dev-cluster.sh while the cluster runs: $(ended "${rc}" 120)"
fi
! grep -q '^Password: ' "${WORK}/again.out" || fail "the second dev-cluster.sh printed a password again"
grep -q 'already running' "${WORK}/again.err" || { show "${WORK}/again.err"; fail "the second dev-cluster.sh did not find the cluster running"; }
say "dev-cluster.sh again while running: exit 0, no new password ($(since))"

# 3. As a newcomer: the administrator logs in and sees the host; a tenant signs up and logs in.
# --api only where the session does not name the control plane yet, as the printed commands.
cli() { timeout 60 skygate "$@" </dev/null; }
[[ $(command -v skygate) == "${WORK}/bin/skygate" ]] || fail "skygate is not on PATH from ${WORK}/bin"
echo "${PASSWORD}" | timeout 60 skygate --api "${API}" login -u admin --password-stdin 2>"${WORK}/login.err" ||
  { show "${WORK}/login.err"; fail "skygate login -u admin with the printed password"; }
cli -o json hosts list >"${WORK}/hosts" 2>&1 || { show "${WORK}/hosts"; fail "skygate hosts list as admin"; }
jq -e '.[] | select(.name == "agent-1" and .state == "ready")' "${WORK}/hosts" >/dev/null ||
  { show "${WORK}/hosts"; fail "agent-1 is not ready in 'skygate hosts list'"; }
cli -o json images list >"${WORK}/images" 2>&1 || { show "${WORK}/images"; fail "skygate images list"; }
jq -e '.[] | select(.name == "tiny")' "${WORK}/images" >/dev/null || { show "${WORK}/images"; fail "image tiny is not registered"; }
cli logout 2>/dev/null || fail "skygate logout"
echo 'correct horse battery' | timeout 60 skygate --api "${API}" register -u ann --email ann@example.com \
  --password-stdin >"${WORK}/register" 2>&1 || { show "${WORK}/register"; fail "skygate register -u ann"; }
echo 'correct horse battery' | timeout 60 skygate --api "${API}" login -u ann --password-stdin 2>"${WORK}/login.err" ||
  { show "${WORK}/login.err"; fail "skygate login -u ann"; }
say "admin and tenant logged in ($(since))"

# 4. The tenant's machine, with a fresh key.
ssh-keygen -q -t ed25519 -N '' -f "${WORK}/key"
events() {
  say "the machine's events (skygate machines events ${NAME}):"
  cli machines events "${NAME}" 2>&1 | show /dev/stdin || true
}
rc=0
timeout "${CREATE_SECS}" skygate machines create "${NAME}" --image tiny --memory-mib 256 --disk-gib 1 \
  --ssh-key "${WORK}/key.pub" --wait </dev/null >"${WORK}/create" 2>&1 || rc=$?
if ((rc != 0)); then
  show "${WORK}/create"
  events
  fail "waited for 'skygate machines create ${NAME} --wait' to see it running: $(ended "${rc}" "${CREATE_SECS}")"
fi
say "${NAME} running after $(since)"

# 5. ssh through the client with no terminal at all (setsid: no controlling tty, so nothing can
# prompt even when this runs in one), retried until the guest has booted.
deadline=$((SECONDS + SSH_SECS))
while :; do
  if out=$(setsid -w timeout 90 skygate machines ssh "${NAME}" -i "${WORK}/key" -- hostname \
      </dev/null 2>"${WORK}/ssh.err"); then
    [[ ${out} == "${NAME}" ]] && break
    fail "'skygate machines ssh ${NAME} -- hostname' printed '${out}', not '${NAME}'"
  fi
  # An unknown or changed host key does not change by waiting.
  if grep -q 'Host key verification failed' "${WORK}/ssh.err"; then
    show "${WORK}/ssh.err"
    fail "'skygate machines ssh ${NAME} -- hostname' without a terminal: ssh refused the guest's host key (not pinned by the client?)"
  fi
  if ((SECONDS >= deadline)); then
    say "the last attempt's stderr:"
    show "${WORK}/ssh.err"
    cli machines show "${NAME}" 2>&1 | show /dev/stdin || true
    events
    fail "waited ${SSH_SECS} s for 'skygate machines ssh ${NAME} -- hostname' to print ${NAME}"
  fi
  sleep 2
done
say "'skygate machines ssh ${NAME} -- hostname' printed ${NAME} after $(since)"
PASSED=1
