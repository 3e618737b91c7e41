#!/usr/bin/env bash
# Tests scripts/install-deps.sh against the traps new machines came with, on this machine, as
# root. Each case first breaks the machine the way a new one was found, then runs the install
# and checks that qemu-img and qemu-system-x86_64 run and carry one version:
#   missing      qemu-utils removed (no qemu-img at all)
#   backports    qemu-utils 10.0 from bookworm-backports, which Breaks qemu-system-common 7.2:
#                installing it removes QEMU's system packages, and installing those again used
#                to remove qemu-utils
#   backports-configured
#                the same with bookworm-backports in apt's sources while the install runs
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
configured=/etc/apt/sources.list.d/skygate-install-test-backports.list
log=$(mktemp)
# Whatever happens, the machine ends as the install leaves it, without this script's sources.
cleanup() {
  rm -f "$sources" "$log" "$configured"
  scripts/install-deps.sh --host >/dev/null 2>&1 || say "could not reinstall after the test"
}
trap cleanup EXIT
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
  if [[ $install_rc -eq 0 && -n $img && -n $sys && ${img#* version } == "${sys#* version }" ]] &&
      virsh -c qemu:///system version >/dev/null 2>&1; then
    say "PASS ${name}: ${img}; ${sys}"
    passed=$((passed + 1))
  else
    say "FAIL ${name}: install exit ${install_rc}, qemu-img='${img}' qemu-system-x86_64='${sys}'; install output:"
    sed 's/^/  /' "$log" >&2
    failed=$((failed + 1))
  fi
}

# Runs the install; its exit status is part of the verdict.
run_install() {
  local log=$1
  install_rc=0
  scripts/install-deps.sh --host >"$log" 2>&1 || install_rc=$?
}
install_rc=0
skipped=0

# Case 1: no qemu-utils at all.
scripts/install-deps.sh --host >/dev/null 2>&1 || true
apt-get remove -y -qq qemu-utils >/dev/null
[[ -z $(version_of qemu-utils) ]] || { say "could not remove qemu-utils for the test"; exit 1; }
run_install "$log"
check missing "$log"

# Case 2: qemu-utils from backports and no QEMU system packages, as a new machine had it.
# Case 3: the same, with backports left in apt's sources while the install runs (its pin
# priority is lower than the release's, so the install must still pick the release's QEMU).
# Skipped (not failed) only when the archive has no backports build of qemu-utils, which is
# not this script's finding to report.
backports_trap() {
  local pkg present=()
  for pkg in qemu-system-x86 qemu-system-common qemu-system-data qemu-block-extra qemu-utils; do
    [[ -n $(version_of "$pkg") ]] && present+=("$pkg")
  done
  ((${#present[@]})) && apt-get remove -y -qq "${present[@]}" >/dev/null
  apt_bpo update >/dev/null 2>&1 && apt_bpo install -t "${codename}-backports" qemu-utils >/dev/null 2>&1 &&
    [[ -z $(version_of qemu-system-x86) ]]
}
for name in backports backports-configured; do
  if ! backports_trap; then
    say "SKIP ${name}: the archive offers no backports qemu-utils now"
    skipped=$((skipped + 1))
    continue
  fi
  [[ $name == backports-configured ]] && echo "deb http://deb.debian.org/debian ${codename}-backports main" >"$configured"
  say "set up ${name}: qemu-utils $(version_of qemu-utils), qemu-system-x86 '$(version_of qemu-system-x86)'"
  run_install "$log"
  check "$name" "$log"
  rm -f "$configured"
done

if ((skipped)); then
  echo "install: ${passed} passed, ${failed} failed, ${skipped} skipped"
else
  echo "install: ${passed} passed, ${failed} failed"
fi
[[ $failed -eq 0 ]]
