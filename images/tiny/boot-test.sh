#!/usr/bin/env bash
# Boot the tiny image under libvirt and check it end to end.
#
#   images/tiny/boot-test.sh OUTDIR      (OUTDIR as given to build.sh)
#
# Boots OUTDIR/image.json's kernel+initrd (TCG, 256 MiB, 1 vCPU) with a fresh
# NoCloud seed, waits for "SKYGATE-READY" on the serial console, checks the
# SSH host key block printed before it, then runs `hostname` over ssh through
# a 127.0.0.1 port forward, with the console's ed25519 key as the only key
# ssh accepts, and expects "tiny-check"; ssh-keyscan must see that same key. Prints the seconds from `virsh start` to readiness and to the
# first successful ssh. The domain and temp dir are always removed.
# Last line: "1 passed, 0 failed" or "0 passed, 1 failed".
#
# Needs root, a running libvirtd (scripts/install-host-deps.sh), jq,
# genisoimage, ssh-keygen/ssh/ssh-keyscan, ss.
set -euo pipefail

VIRSH=(virsh -q -c qemu:///system)
PREFIX=skygate-imgtest-
# Temp dirs live here, not in /tmp: every directory on the path to the seed
# must be traversable by libvirt-qemu (mktemp -d makes 0700 dirs).
BASE=/var/lib/skygate-imgtest
# Overridable: READY_TIMEOUT / SSH_TIMEOUT (seconds), BOOT_TEST_CONSOLE_OUT
# (file to copy the serial console log to).
READY_TIMEOUT=${READY_TIMEOUT:-60}
SSH_TIMEOUT=${SSH_TIMEOUT:-30}
EXPECT_HOST=tiny-check

DOM=${PREFIX}$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
TMP=
PASSED=0

log() { echo "boot-test: $*"; }
# Everything goes to stdout so that, however the streams are combined, the
# summary printed by cleanup is the last line.
fail() { echo "boot-test: FAIL: $*"; exit 1; }

cleanup() {
    local rc=$?
    # Guard: this script must never touch a domain it did not create.
    if [[ ${DOM} == "${PREFIX}"* ]]; then
        if [[ ${PASSED} -ne 1 && -n ${TMP} && -s ${TMP}/console.log ]]; then
            echo "--- last lines of the serial console ---"
            tail -n 30 "${TMP}/console.log" || true
        fi
        "${VIRSH[@]}" destroy "${DOM}" >/dev/null 2>&1 || true
        "${VIRSH[@]}" undefine "${DOM}" >/dev/null 2>&1 || true
    fi
    # Optional copy of the serial console for debugging/timing analysis.
    if [[ -n ${BOOT_TEST_CONSOLE_OUT:-} && -n ${TMP} && -f ${TMP}/console.log ]]; then
        cp "${TMP}/console.log" "${BOOT_TEST_CONSOLE_OUT}" || true
    fi
    [[ -n ${TMP} ]] && rm -rf "${TMP}"
    if [[ ${rc} -eq 0 && ${PASSED} -eq 1 ]]; then
        echo "1 passed, 0 failed"
    else
        echo "0 passed, 1 failed"
        [[ ${rc} -ne 0 ]] || rc=1
    fi
    exit "${rc}"
}
trap cleanup EXIT
# Turn signals into a normal exit so the EXIT trap cleans up.
trap 'exit 130' INT TERM HUP

[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR"; exit 2; }
OUTDIR=$(cd "$1" && pwd -P)

[[ ${EUID} -eq 0 ]] || fail "must run as root (libvirt qemu:///system)"
for tool in virsh jq genisoimage ssh ssh-keygen ssh-keyscan ss runuser; do
    command -v "${tool}" >/dev/null || fail "missing tool: ${tool}"
done
[[ -f ${OUTDIR}/image.json ]] || fail "${OUTDIR}/image.json not found; run build.sh ${OUTDIR} first"

# --- image.json ------------------------------------------------------------------
json() { jq -er "$1" "${OUTDIR}/image.json"; }
[[ $(json .format) == kernel ]] || fail "image.json: format is not 'kernel'"
KERNEL=$(json .boot.kernel)
INITRD=$(json .boot.initrd)
CMDLINE=$(json .boot.cmdline)
[[ ${KERNEL} == file://* && ${INITRD} == file://* ]] || fail "image.json: boot URLs must be file://"
KERNEL=${KERNEL#file://}
INITRD=${INITRD#file://}
[[ $(sha256sum <"${KERNEL}" | cut -d' ' -f1) == "$(json .boot.kernel_sha256)" ]] ||
    fail "kernel sha256 does not match image.json"
[[ $(sha256sum <"${INITRD}" | cut -d' ' -f1) == "$(json .boot.initrd_sha256)" ]] ||
    fail "initrd sha256 does not match image.json"
# QEMU opens these as libvirt-qemu; a 0700 ancestor gives a confusing
# "Permission denied" from virsh start, so check up front.
for f in "${KERNEL}" "${INITRD}"; do
    runuser -u libvirt-qemu -- test -r "${f}" ||
        fail "libvirt-qemu cannot read ${f} (make every parent directory o+x)"
done

# --- seed, key, port ---------------------------------------------------------------
mkdir -p "${BASE}"
chmod 0755 "${BASE}"
TMP=$(mktemp -d "${BASE}/run.XXXXXX")
chmod 0755 "${TMP}"

ssh-keygen -q -t ed25519 -N '' -C boot-test -f "${TMP}/id_ed25519"
mkdir "${TMP}/seed"
printf 'instance-id: %s\nlocal-hostname: %s\n' "${DOM}" "${EXPECT_HOST}" >"${TMP}/seed/meta-data"
{
    echo '#cloud-config'
    echo 'ssh_authorized_keys:'
    echo "  - $(cat "${TMP}/id_ed25519.pub")"
} >"${TMP}/seed/user-data"
genisoimage -quiet -output "${TMP}/seed.iso" -volid cidata -joliet -rock \
    "${TMP}/seed/meta-data" "${TMP}/seed/user-data"
chmod 0644 "${TMP}/seed.iso"

# A random unused port on 127.0.0.1 (ss lists listening sockets). A race with
# another process grabbing it only makes `virsh start` fail, loudly.
PORT=
for _ in $(seq 1 50); do
    p=$((20000 + $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % 40000))
    if [[ -z $(ss -Htln "sport = :${p}") ]]; then
        PORT=${p}
        break
    fi
done
[[ -n ${PORT} ]] || fail "no free TCP port found"

# --- domain -----------------------------------------------------------------------------
# type='qemu' (TCG): on this host /dev/kvm is kvm_pvm and ordinary guests hang
# under it (see HOST-NOTES). machine 'pc' (i440fx): its root bus is pci.0,
# which the NIC's explicit address refers to. The seed is a CD-ROM on
# virtio-scsi because the cloud kernel has no AHCI driver (SATA won't work)
# and virtio-scsi needs no libata probing. on_* = destroy: a crash or panic
# reboot ends the run instead of looping.
cat >"${TMP}/domain.xml" <<EOF
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>${DOM}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${KERNEL}</kernel>
    <initrd>${INITRD}</initrd>
    <cmdline>${CMDLINE}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='${TMP}/seed.iso'/>
      <target dev='sda' bus='scsi'/>
      <readonly/>
    </disk>
    <serial type='file'>
      <source path='${TMP}/console.log'/>
      <target port='0'/>
    </serial>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=net0,hostfwd=tcp:127.0.0.1:${PORT}-:22'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=net0,bus=pci.0,addr=0x10'/>
  </qemu:commandline>
</domain>
EOF

"${VIRSH[@]}" define "${TMP}/domain.xml" >/dev/null
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

T0=$(now)
"${VIRSH[@]}" start "${DOM}" >/dev/null
T_STARTED=$(now)

# --- wait for the readiness line -------------------------------------------------
deadline=$(($(date +%s) + READY_TIMEOUT))
READY_LINE=
while [[ $(date +%s) -lt ${deadline} ]]; do
    if READY_LINE=$(grep -a -m1 -o 'SKYGATE-READY hostname=[^[:space:]]*' "${TMP}/console.log" 2>/dev/null); then
        break
    fi
    READY_LINE=
    [[ $("${VIRSH[@]}" domstate "${DOM}" 2>/dev/null) == running ]] || fail "domain stopped before readiness"
    sleep 0.1
done
T_READY=$(now)
[[ -n ${READY_LINE} ]] || fail "no SKYGATE-READY line within ${READY_TIMEOUT}s"
[[ ${READY_LINE} == "SKYGATE-READY hostname=${EXPECT_HOST}" ]] ||
    fail "unexpected readiness line: ${READY_LINE}"
[[ $(grep -a -c 'SKYGATE-READY' "${TMP}/console.log") -eq 1 ]] || fail "more than one readiness line"

# --- host keys on the console ------------------------------------------------------------
# The init prints the host's public keys between these markers (cloud-init's
# shape), complete before the readiness line; `skygate machines ssh` pins them
# from there instead of trusting whatever answers on the forwarded port.
BEGIN_KEYS='-----BEGIN SSH HOST KEY KEYS-----'
END_KEYS='-----END SSH HOST KEY KEYS-----'
tr -d '\r' <"${TMP}/console.log" >"${TMP}/console.txt"
for marker in "${BEGIN_KEYS}" "${END_KEYS}"; do
    [[ $(grep -a -c -x -F -e "${marker}" "${TMP}/console.txt") -eq 1 ]] ||
        fail "expected exactly one '${marker}' line on the console"
done
read -r N_BEGIN N_END N_READY < <(awk -v b="${BEGIN_KEYS}" -v e="${END_KEYS}" '
    $0 == b { nb = NR } $0 == e { ne = NR } /SKYGATE-READY hostname=/ { nr = NR }
    END { print nb + 0, ne + 0, nr + 0 }' "${TMP}/console.txt")
((N_BEGIN < N_END && N_END < N_READY)) ||
    fail "the host key block (lines ${N_BEGIN}-${N_END}) must be complete before the readiness line (${N_READY})"
HOST_KEYS=$(sed -n "$((N_BEGIN + 1)),$((N_END - 1))p" "${TMP}/console.txt")
BAD=$(grep -v -E '^(ssh-ed25519|ssh-rsa|ecdsa-sha2-[a-z0-9]+) [A-Za-z0-9+/]+=*( .*)?$' <<<"${HOST_KEYS}" || true)
[[ -z ${BAD} ]] || fail "not a key line in the host key block: ${BAD}"
ED25519_KEY=$(awk '$1 == "ssh-ed25519" { print $1, $2; exit }' <<<"${HOST_KEYS}")
[[ -n ${ED25519_KEY} ]] || fail "no ssh-ed25519 key in the console's host key block"
# Pinned under an alias: the only key ssh will accept is the console's.
printf 'boot-test %s\n' "${ED25519_KEY}" >"${TMP}/known_hosts"

# --- ssh ---------------------------------------------------------------------------------
SSH=(ssh -i "${TMP}/id_ed25519" -p "${PORT}" -o HostKeyAlias=boot-test
    -o UserKnownHostsFile="${TMP}/known_hosts" -o GlobalKnownHostsFile=/dev/null
    -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=5 -o LogLevel=ERROR)
deadline=$(($(date +%s) + SSH_TIMEOUT))
ANSWER=
while [[ $(date +%s) -lt ${deadline} ]]; do
    if ANSWER=$("${SSH[@]}" root@127.0.0.1 hostname 2>"${TMP}/ssh.err"); then
        break
    fi
    ANSWER=
    # Not worth retrying: the port answers with a key the console did not print.
    grep -q 'Host key verification failed' "${TMP}/ssh.err" &&
        fail "ssh refused the key on 127.0.0.1:${PORT} (the console printed '${ED25519_KEY}'): $(cat "${TMP}/ssh.err")"
    sleep 0.2
done
T_SSH=$(now)
[[ -n ${ANSWER} ]] || fail "ssh did not succeed within ${SSH_TIMEOUT}s: $(cat "${TMP}/ssh.err")"
[[ ${ANSWER} == "${EXPECT_HOST}" ]] || fail "ssh hostname answered '${ANSWER}', expected '${EXPECT_HOST}'"
# The same comparison the other way round: what a scanner sees on the port.
SCANNED=$(ssh-keyscan -T 5 -t ed25519 -p "${PORT}" 127.0.0.1 2>/dev/null |
    awk '$2 == "ssh-ed25519" { print $2, $3; exit }' || true)
[[ ${SCANNED} == "${ED25519_KEY}" ]] ||
    fail "ssh-keyscan saw '${SCANNED}' on 127.0.0.1:${PORT}, the console printed '${ED25519_KEY}'"
log "the console's host key is the port's: $(ssh-keygen -l -f "${TMP}/known_hosts" | awk '{ print $2 }')"

log "domain ${DOM}, ssh port 127.0.0.1:${PORT}"
log "virsh start took $(elapsed "${T0}" "${T_STARTED}") s"
log "virsh start -> readiness line: $(elapsed "${T0}" "${T_READY}") s"
log "virsh start -> first successful ssh: $(elapsed "${T0}" "${T_SSH}") s"
PASSED=1
