#!/usr/bin/env bash
# Installs what building and testing the control plane needs on a Debian machine, and makes
# sure PostgreSQL answers on 127.0.0.1:5432 for the store tests. Idempotent: installs only
# what is missing, starts only what is not running. Run as root (or with sudo available).
#
#   scripts/install-deps.sh            build tools only
#   scripts/install-deps.sh --postgres build tools and a running PostgreSQL
set -euo pipefail

want_postgres=false
[[ "${1:-}" == "--postgres" ]] && want_postgres=true

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

missing=()
# For the host-agent tests: qemu-utils (qemu-img), genisoimage (genisoimage, isoinfo),
# util-linux (prlimit) and busybox-static (the guest's awk, for the seed tests). Not plain
# busybox: it conflicts with busybox-static, which install-host-deps.sh installs too, and the
# two scripts would swap them on every run.
for pkg in build-essential pkg-config ca-certificates curl qemu-utils genisoimage util-linux busybox-static; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done

pg_answers() {
  timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5432' 2>/dev/null
}

installed_postgres=false
if $want_postgres && ! pg_answers && ! command -v pg_ctlcluster >/dev/null; then
  missing+=(postgresql)
  installed_postgres=true
fi

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust with rustup (the toolchain is pinned in rust-toolchain.toml)" >&2
  exit 1
fi

if $want_postgres && ! pg_answers; then
  # No systemd here: start every cluster Debian knows about directly.
  for version in $(ls /etc/postgresql 2>/dev/null); do
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  done
  for _ in $(seq 1 30); do pg_answers && break; sleep 1; done
  pg_answers || { echo "PostgreSQL does not answer on 127.0.0.1:5432" >&2; exit 1; }
fi

if $installed_postgres; then
  # A server this script just installed: let the local postgres user in over TCP without a
  # password, as on the CI machines (loopback only).
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -n 1)
  if ! grep -q "skygate-test" "$hba"; then
    $SUDO sed -i '1i host all postgres 127.0.0.1/32 trust # skygate-test' "$hba"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$(basename "$(dirname "$(dirname "$hba")")")" main reload
  fi
fi
