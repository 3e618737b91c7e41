#!/usr/bin/env bash
# Leaves a Debian 12 machine able to build, test and run SkyGate, whatever it had before: every
# package the chosen roles need is resolved in ONE apt transaction (QEMU's packages pinned to
# one version), then every command the project runs is executed once; a command that does not
# run stops the script with its name. Run as root (or with sudo).
#
#   scripts/install-deps.sh                     build the workspace (libvirt's headers included:
#                                               the agent and the fleet simulator link it)
#   scripts/install-deps.sh --host              also a KVM host: QEMU, libvirt (started), the
#                                               guest image's tools
#   scripts/install-deps.sh --postgres          also a PostgreSQL answering on 127.0.0.1:5432
#   scripts/install-deps.sh --test              also what the test scripts run besides the
#                                               build: Python's venv (schemathesis.sh)
#   scripts/install-deps.sh --host --postgres --test   everything scripts/test.sh needs
#
# Why one transaction: a machine can come with qemu-utils 10.0 from bookworm-backports, which
# Breaks the qemu-system-common (7.2) that qemu-system-x86 needs. Installing qemu-system-x86 in
# a second apt call silently removed qemu-utils and nothing put it back (no qemu-img). Here
# qemu-utils is always requested together with qemu-system-x86, at qemu-system-x86's version.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
# The daemons and depmod live in sbin, which a non-root user's PATH (running this with sudo)
# lacks: the checks below must find them either way.
export PATH="${PATH}:/usr/sbin:/sbin"

want_host=false
want_postgres=false
want_test=false
for arg in "$@"; do
  case $arg in
    --host) want_host=true ;;
    --postgres) want_postgres=true ;;
    --test) want_test=true ;;
    *) echo "usage: $0 [--host] [--postgres] [--test]" >&2; exit 2 ;;
  esac
done

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then SUDO="sudo"; fi

say() { echo "install-deps: $*" >&2; }
die() { say "$*"; exit 1; }

# Each entry: package|command that must run once it is installed. The command is what the
# project itself runs (scripts, agent, tests), with arguments that make it exit 0.
BUILD=(
  "build-essential|cc --version"
  "pkg-config|pkg-config --version"
  "ca-certificates|test -s /etc/ssl/certs/ca-certificates.crt"
  "curl|curl --version"
  # Build-time deps of the `virt` crate: the workspace (the host agent, the fleet simulator)
  # does not build without them, with or without a libvirt daemon.
  "libvirt-dev|pkg-config --exists libvirt"
  # Host-agent tests run without libvirt too: disks (qemu-img under prlimit), seeds
  # (genisoimage; isoinfo reads them back), the guest's awk for the seed tests (busybox-static,
  # not busybox: the two conflict).
  "qemu-utils|qemu-img --version"
  "genisoimage|genisoimage --version"
  "genisoimage|isoinfo -version"
  "util-linux|prlimit --version"
  "busybox-static|busybox true"
  # The clock-skew fault test runs a second control plane five minutes ahead (libfaketime).
  "faketime|faketime -f +5m true"
)
HOST=(
  "qemu-system-x86|qemu-system-x86_64 --version"
  "qemu-utils|qemu-img --version"
  "libvirt-daemon-system|libvirtd --version"
  "libvirt-daemon-system|virtlogd --version"
  "libvirt-clients|virsh --version"
  # images/tiny/build.sh: guest userland, initramfs packing, module deps.
  "busybox-static|busybox true"
  "dropbear-bin|test -x /usr/sbin/dropbear"
  "dropbear-bin|test -x /usr/bin/dropbearkey"
  "cpio|cpio --version"
  "kmod|depmod --version"
  # Seeds, boot tests and `skygate machines ssh`; boot-test.sh finds a free port with ss.
  "genisoimage|genisoimage --version"
  "openssh-client|ssh -V"
  "openssh-client|command -v ssh-keygen"
  "iproute2|ss -V"
  # image.json is written (build.sh) and read (boot-test.sh, dev-cluster.sh) with jq.
  "jq|jq --version"
  # virt-xml-validate (libvirt schema checks of generated domain XML) runs xmllint.
  "libxml2-utils|xmllint --version"
)

TEST=(
  # scripts/schemathesis.sh installs schemathesis from PyPI into a venv: Debian's python3
  # lacks ensurepip (so `python3 -m venv` fails) until python3-venv is installed.
  "python3-venv|python3 -c 'import ensurepip, venv'"
)

entries=("${BUILD[@]}")
$want_host && entries+=("${HOST[@]}")
$want_test && entries+=("${TEST[@]}")

packages=()
for entry in "${entries[@]}"; do
  pkg=${entry%%|*}
  [[ " ${packages[*]} " == *" ${pkg} "* ]] || packages+=("$pkg")
done

installed_version() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | awk '$3 == "installed" {print $4}'; }

# The QEMU binary packages come from one source package and must carry one version (but for a
# binNMU suffix "+bN", which the architecture-independent ones lack).
QEMU_PACKAGES=(qemu-utils qemu-system-x86 qemu-system-common qemu-system-data qemu-block-extra)
source_version() { sed -E 's/\+b[0-9]+$//' <<<"$1"; }
# The version of package $1 that apt offers for source version $2.
offered_version() {
  apt-cache madison "$1" 2>/dev/null | awk -F' [|] ' '{print $2}' |
    while read -r v; do
      if [[ $(source_version "$v") == "$2" ]]; then echo "$v"; break; fi
    done
}

qemu_consistent() {
  local pkg version first=""
  for pkg in "${QEMU_PACKAGES[@]}"; do
    version=$(source_version "$(installed_version "$pkg")")
    [[ -z $version ]] && continue
    [[ -z $first ]] && first=$version
    [[ $version == "$first" ]] || return 1
  done
}

# Runs every entry's command; prints the failing ones as "package: command".
failing_commands() {
  local entry pkg cmd
  for entry in "${entries[@]}"; do
    pkg=${entry%%|*}
    cmd=${entry#*|}
    bash -c "$cmd" >/dev/null 2>&1 || echo "${pkg}: ${cmd}"
  done
}

# Run once here and again only after an install: each run starts some twenty programs.
failing=$(failing_commands)

needs_install() {
  local pkg
  for pkg in "${packages[@]}"; do
    [[ -n $(installed_version "$pkg") ]] || return 0
  done
  qemu_consistent || return 0
  [[ -z $failing ]] || return 0
  return 1
}

pg_answers() {
  timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5432' 2>/dev/null
}

installed_postgres=false
if $want_postgres && ! pg_answers && ! command -v pg_ctlcluster >/dev/null; then
  packages+=(postgresql)
  installed_postgres=true
fi

if $installed_postgres || needs_install; then
  say "installing (one transaction): ${packages[*]}"
  $SUDO apt-get update -qq
  request=()
  for pkg in "${packages[@]}"; do
    request+=("$pkg")
  done
  if $want_host || [[ -n $(installed_version qemu-system-x86) ]]; then
    # Pin every QEMU package requested or present to qemu-system-x86's candidate, downgrading
    # a backports qemu-utils if there is one: one version, and qemu-img stays.
    # apt's candidate for qemu-system-x86 (by pin priority: a configured backports archive does
    # not win over the release), unless apt cannot supply qemu-utils at that version (the
    # candidate is an installed build from an archive no longer configured): then the newest
    # version apt offers both at (a downgrade).
    qemu=$(source_version "$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')")
    if [[ -z $qemu || $qemu == "(none)" || -z $(offered_version qemu-utils "$qemu") ]]; then
      qemu=""
      while read -r v; do
        if [[ -n $(offered_version qemu-utils "$(source_version "$v")") ]]; then
          qemu=$(source_version "$v")
          break
        fi
      done < <(apt-cache madison qemu-system-x86 | awk -F' [|] ' '{print $2}')
    fi
    [[ -n $qemu ]] || die "apt offers no qemu-system-x86 (apt-get update failed?)"
    request=()
    for pkg in "${packages[@]}"; do
      [[ " ${QEMU_PACKAGES[*]} " == *" ${pkg} "* ]] || request+=("$pkg")
    done
    for pkg in "${QEMU_PACKAGES[@]}"; do
      if [[ " ${packages[*]} " == *" ${pkg} "* || -n $(installed_version "$pkg") ]]; then
        version=$(offered_version "$pkg" "$qemu")
        [[ -n $version ]] || die "apt offers no ${pkg} at QEMU ${qemu}"
        request+=("${pkg}=${version}")
      fi
    done
  fi
  log=$(mktemp)
  if ! $SUDO apt-get install -y -q --no-install-recommends --allow-downgrades "${request[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    die "apt-get install failed (output above)"
  fi
  # What apt removed is worth a line: the trap this script exists for was a silent removal.
  removed=$(awk '/^The following packages will be REMOVED:/ {r=1; next} r && /^  / {print; next} {r=0}' "$log" | xargs)
  [[ -n $removed ]] && say "apt removed: ${removed}"
  rm -f "$log"
  failing=$(failing_commands)
fi

if [[ -n $failing ]]; then
  say "these commands do not run after the install (package: command):"
  while read -r line; do echo "  ${line}" >&2; done <<<"$failing"
  exit 1
fi
qemu_consistent || die "QEMU packages carry different versions: $(for p in "${QEMU_PACKAGES[@]}"; do v=$(installed_version "$p"); [[ -n $v ]] && printf '%s=%s ' "$p" "$v"; done)"

if ! command -v cargo >/dev/null; then
  die "cargo not found: install Rust with rustup (the toolchain is pinned in rust-toolchain.toml)"
fi

if $want_postgres && ! pg_answers; then
  # No systemd here: start every cluster Debian knows about directly.
  for dir in /etc/postgresql/*/; do
    [[ -d $dir ]] || continue
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$(basename "$dir")" main start 2>/dev/null || true
  done
  for _ in $(seq 1 30); do pg_answers && break; sleep 1; done
  pg_answers || die "PostgreSQL does not answer on 127.0.0.1:5432"
fi

if $installed_postgres; then
  # A server this script just installed: let the local postgres user in over TCP without a
  # password, as on the CI machines (loopback only).
  hbas=(/etc/postgresql/*/main/pg_hba.conf)
  hba=${hbas[0]}
  if ! grep -q "skygate-test" "$hba"; then
    $SUDO sed -i '1i host all postgres 127.0.0.1/32 trust # skygate-test' "$hba"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$(basename "$(dirname "$(dirname "$hba")")")" main reload
  fi
fi

$want_host || exit 0

# Without udev, /dev/kvm stays root:root 0600 instead of Debian's root:kvm 0660 (udev rule).
# libvirt then sees that libvirt-qemu cannot open /dev/kvm, judges its cached QEMU capabilities
# stale and re-probes QEMU on every API call: measured ~4 s per `virsh version` and ~50 s per
# `virsh define` here. Apply the udev rule by hand. This does not make guests use KVM: domains
# still pick type='qemu' or type='kvm' explicitly.
if [[ -c /dev/kvm ]] && getent group kvm >/dev/null &&
    [[ $(stat -c %G:%a /dev/kvm) != kvm:660 ]]; then
  $SUDO chgrp kvm /dev/kvm
  $SUDO chmod 0660 /dev/kvm
fi

# The daemons need these runtime dirs; no systemd/tmpfiles creates them here.
$SUDO mkdir -p /var/log/libvirt /var/run/libvirt

# A daemon counts as running if its pidfile names a live process, or pgrep finds one (covers
# daemons started with a different pidfile path).
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
  $SUDO systemctl start virtlogd.socket libvirtd.service
else
  running virtlogd /var/run/virtlogd.pid || $SUDO virtlogd -d
  running libvirtd /var/run/libvirtd.pid || $SUDO libvirtd -d
fi

# libvirtd daemonises before its socket is ready; wait (bounded) for an answer.
for _ in $(seq 1 60); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.5
done
say "libvirtd did not answer 'virsh -c qemu:///system version' within 30 s:"
virsh -c qemu:///system version >&2 || true
exit 1
