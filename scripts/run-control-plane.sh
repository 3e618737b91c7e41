#!/usr/bin/env bash
# Builds and runs the control plane with the embedded SQLite store: nothing else to set up.
# Extra arguments go to `skygate-control-plane serve` (see --help); state lives in
# $SKYGATE_DATA_DIR (default /var/lib/skygate as root, ~/.local/share/skygate otherwise),
# kept 0700 and written with umask 077: the SQLite database holds password hashes and
# sessions (the systemd unit does the same with StateDirectoryMode and UMask).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --locked -p control-plane

if [[ -z "${SKYGATE_DATA_DIR:-}" ]]; then
  if [[ "$(id -u)" -eq 0 ]]; then
    export SKYGATE_DATA_DIR=/var/lib/skygate
  else
    export SKYGATE_DATA_DIR="$HOME/.local/share/skygate"
  fi
fi
# The directory's mode guards files an earlier run left readable (it was 0755 with 0644 files);
# the umask covers everything the server creates from now on, under this directory or not.
mkdir -p "${SKYGATE_DATA_DIR}"
chmod 0700 "${SKYGATE_DATA_DIR}"
umask 077
exec "${CARGO_TARGET_DIR:-target}/release/skygate-control-plane" serve "$@"
