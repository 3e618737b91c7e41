#!/usr/bin/env bash
# A KVM host's dependencies, installed and started (QEMU, libvirt, the guest image's tools):
# the same single transaction and checks as `scripts/install-deps.sh --host`, kept under this
# name for host setups (vagrant/provision.sh, images/README.md). Run as root.
set -euo pipefail
exec "$(dirname "$0")/install-deps.sh" --host "$@"
