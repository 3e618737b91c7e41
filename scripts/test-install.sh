#!/usr/bin/env bash
# Tests scripts/install-deps.sh against the traps new machines came with, on this machine, as
# root. Each case first breaks the machine the way a new one was found, then runs the install
# and checks that qemu-img and qemu-system-x86_64 run and carry one version:
#   missing      qemu-utils removed (no qemu-img at all)
#   backports    qemu-utils 10.0 from bookworm-backports, which Breaks qemu-system-common 7.2:
#                installing it removes QEMU's system packages, and installing those again used
#                to remove qemu-utils
# It changes installed packages (and ends with everything installed again, even on failure).
# scripts/test.sh runs it when CI is set; SKYGATE_TEST_INSTALL=0 skips it, =1 forces it.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
[[ ${EUID} -eq 0 ]] || { echo "test-install.sh: run as root" >&2; exit 1; }

say() { echo "test-install: $*" >&2; }
passed=0
failed=0

# A sources list of Debian's own archive with backports, used only by this script's own apt
# calls (the machine's configuration is not touched).
sources=$(mktemp /tmp/skygate-install-test.XXXXXX.list)
trap 'rm -f "$sources"' EXIT
codename=$(. /etc/os-release && echo "${VERSION_CODENAME}")
cat >"$sources" <<LIST
deb http://deb.debian.org/debian ${codename} main
deb http://deb.debian.org/debian ${codename}-updates main
deb http://deb.debian.org/debian-security ${codename}-security main
deb http://deb.debian.org/debian ${codename}-backports main
LIST
apt_bpo() {
  apt-get -o Dir::Etc::sourcelist="$sources" -o Dir::Etc::sourceparts=- \
    -o APT::Get::List-Cleanup=0 -y -qq "$@"
}

version_of() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | awk '$3 == "installed" {print $4}'; }

check() {
  local name=$1 log=$2
  local img sys
  img=$(qemu-img --version 2>/dev/null | head -n 1 || true)
  sys=$(qemu-system-x86_64 --version 2>/dev/null | head -n 1 || true)
  # "qemu-img version 7.2.22 (Debian 1:7.2+dfsg-...)": the versions in parentheses must match.
  if [[ -n $img && -n $sys && ${img#* version } == "${sys#* version }" ]] &&
      virsh -c qemu:///system version >/dev/null 2>&1; then
    say "PASS ${name}: ${img}; ${sys}"
    passed=$((passed + 1))
  else
    say "FAIL ${name}: qemu-img='${img}' qemu-system-x86_64='${sys}'; install output:"
    sed 's/^/  /' "$log" >&2
    failed=$((failed + 1))
  fi
}

run_install() {
  local log=$1
  scripts/install-deps.sh --host >"$log" 2>&1 || say "install-deps.sh exited non-zero"
}

log=$(mktemp)

# Case 1: no qemu-utils at all.
scripts/install-deps.sh --host >/dev/null 2>&1 || true
apt-get remove -y -qq qemu-utils >/dev/null
[[ -z $(version_of qemu-utils) ]] || { say "could not remove qemu-utils for the test"; exit 1; }
run_install "$log"
check missing "$log"

# Case 2: qemu-utils from backports and no QEMU system packages, as a new machine had it.
# Skipped (not failed) only when the archive has no backports build of it, which is not this
# script's finding to report.
qemu_present=()
for pkg in qemu-system-x86 qemu-system-common qemu-system-data qemu-block-extra qemu-utils; do
  [[ -n $(version_of "$pkg") ]] && qemu_present+=("$pkg")
done
((${#qemu_present[@]})) && apt-get remove -y -qq "${qemu_present[@]}" >/dev/null
if apt_bpo update >/dev/null 2>&1 && apt_bpo install -t "${codename}-backports" qemu-utils >/dev/null 2>&1 &&
    [[ -z $(version_of qemu-system-x86) ]]; then
  say "set up: qemu-utils $(version_of qemu-utils), qemu-system-x86 '$(version_of qemu-system-x86)'"
  run_install "$log"
  check backports "$log"
else
  say "SKIP backports: the archive offers no backports qemu-utils now"
  scripts/install-deps.sh --host >/dev/null 2>&1 || true
fi
rm -f "$log"

echo "install: ${passed} passed, ${failed} failed"
[[ $failed -eq 0 ]]
