#!/usr/bin/env bash
# Install and start everything SkyGate needs on a Debian 12 host (run as root).
#
# Idempotent: packages are only installed when missing, daemons only started
# when not already running. Works without systemd (CI/dev containers), which is
# why virtlogd/libvirtd are started by hand rather than with systemctl.
# Quiet on success; on failure the failing command's output is shown.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if [[ ${EUID} -ne 0 ]]; then
    echo "install-host-deps.sh: must run as root" >&2
    exit 1
fi

PACKAGES=(
    # Hypervisor and management daemon.
    qemu-system-x86 qemu-utils
    libvirt-daemon-system libvirt-clients
    # Build-time deps of the `virt` crate.
    libvirt-dev pkg-config
    # images/tiny/build.sh: guest userland, initramfs packing, module deps.
    busybox-static dropbear-bin cpio kmod
    # NoCloud seed ISO (genisoimage) and ssh for boot tests; boot-test.sh finds a free port
    # with ss.
    genisoimage openssh-client iproute2
    # image.json is written (build.sh) and read (boot-test.sh) with jq.
    jq
    # virt-xml-validate (libvirt schema checks of generated domain XML) runs xmllint.
    libxml2-utils
)

# Run a command silently; print its captured output only if it fails.
quiet() {
    local log rc=0
    log=$(mktemp)
    "$@" >"${log}" 2>&1 || rc=$?
    if [[ ${rc} -ne 0 ]]; then
        echo "install-host-deps.sh: command failed (exit ${rc}): $*" >&2
        cat "${log}" >&2
    fi
    rm -f "${log}"
    return "${rc}"
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    # dpkg-query prints "install ok installed" only for fully installed packages.
    if [[ $(dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null || true) != "install ok installed" ]]; then
        missing+=("${pkg}")
    fi
done

if [[ ${#missing[@]} -gt 0 ]]; then
    quiet apt-get update
    quiet apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Without udev, /dev/kvm stays root:root 0600 instead of Debian's root:kvm 0660
# (udev rule). libvirt then sees that libvirt-qemu cannot open /dev/kvm, judges
# its cached QEMU capabilities stale and re-probes QEMU on every API call:
# measured ~4 s per `virsh version` and ~50 s per `virsh define` here. Apply
# the udev rule by hand. This does not make guests use KVM: domains still pick
# type='qemu' or type='kvm' explicitly.
if [[ -c /dev/kvm ]] && getent group kvm >/dev/null &&
    [[ $(stat -c %G:%a /dev/kvm) != kvm:660 ]]; then
    chgrp kvm /dev/kvm
    chmod 0660 /dev/kvm
fi

# The daemons need these runtime dirs; no systemd/tmpfiles creates them here.
mkdir -p /var/log/libvirt /var/run/libvirt

# A daemon counts as running if its pidfile names a live process, or pgrep
# finds one (covers daemons started with a different pidfile path).
running() {
    local name=$1 pidfile=$2 pid
    if [[ -r ${pidfile} ]]; then
        pid=$(<"${pidfile}")
        if [[ -n ${pid} ]] && kill -0 "${pid}" 2>/dev/null; then
            return 0
        fi
    fi
    pgrep -x "${name}" >/dev/null 2>&1
}

# virtlogd first: libvirtd's QEMU driver connects to it when starting guests. Where systemd
# runs (a real host, the Vagrant VM) it owns the daemons and their sockets.
if [[ -d /run/systemd/system ]]; then
    quiet systemctl start virtlogd.socket libvirtd.service
else
    if ! running virtlogd /var/run/virtlogd.pid; then
        quiet virtlogd -d
    fi
    if ! running libvirtd /var/run/libvirtd.pid; then
        quiet libvirtd -d
    fi
fi

# libvirtd daemonises before its socket is ready; wait (bounded) for an answer.
for _ in $(seq 1 60); do
    if virsh -c qemu:///system version >/dev/null 2>&1; then
        exit 0
    fi
    sleep 0.5
done
echo "install-host-deps.sh: libvirtd did not answer 'virsh -c qemu:///system version' within 30 s" >&2
virsh -c qemu:///system version >&2 || true
exit 1
