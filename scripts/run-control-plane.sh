#!/usr/bin/env bash
# Builds and runs the control plane with the embedded SQLite store: nothing else to set up.
# Extra arguments go to `skygate-control-plane serve` (see --help); state lives in
# $SKYGATE_DATA_DIR (default /var/lib/skygate as root, ~/.local/share/skygate otherwise).
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
exec "${CARGO_TARGET_DIR:-target}/release/skygate-control-plane" serve "$@"
