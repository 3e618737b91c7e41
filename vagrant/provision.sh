#!/usr/bin/env bash
# Runs inside the Vagrant VM as root: toolchain, dependencies, build, guest image, and the two
# systemd services. Idempotent: `vagrant provision` rebuilds and restarts.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd /skygate

if ! command -v cargo >/dev/null 2>&1 && [[ ! -x /root/.cargo/bin/cargo ]]; then
  apt-get update -qq
  apt-get install -y -qq curl ca-certificates build-essential
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none
fi
export PATH=/root/.cargo/bin:$PATH

scripts/install-deps.sh --host
export CARGO_TARGET_DIR=/var/tmp/skygate-target
cargo build --release --locked -p control-plane -p host-agent
install -m 0755 "$CARGO_TARGET_DIR"/release/{skygate-control-plane,skygate-host-agent,skygate} /usr/local/bin/

mkdir -p /var/lib/skygate-images/tiny
images/tiny/build.sh /var/lib/skygate-images/tiny

install -d -m 0700 /etc/skygate
if [[ ! -f /etc/skygate/agent-token ]]; then
  (umask 077 && head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >/etc/skygate/agent-token)
fi
TOKEN=$(cat /etc/skygate/agent-token)
cat >/etc/skygate/control-plane.env <<ENV
SKYGATE_HTTP_ADDR=0.0.0.0:8080
SKYGATE_GRPC_ADDR=127.0.0.1:9090
SKYGATE_AGENT_TOKEN=${TOKEN}
ENV
cat >/etc/skygate/host-agent.env <<ENV
SKYGATE_CONTROL_PLANE=http://127.0.0.1:9090
SKYGATE_AGENT_TOKEN=${TOKEN}
SKYGATE_AGENT_NAME=skygate-dev
SKYGATE_AGENT_LISTEN=127.0.0.1:9091
SKYGATE_AGENT_NETWORK=user
SKYGATE_AGENT_HYPERVISOR=auto
SKYGATE_AGENT_IMAGE_DIRS=/var/lib/skygate-images
ENV
chmod 0600 /etc/skygate/*.env
id skygate-agent >/dev/null 2>&1 ||
  useradd --system --home-dir /var/lib/skygate-agent --shell /usr/sbin/nologin skygate-agent
install -m 0644 scripts/systemd/skygate-control-plane.service scripts/systemd/skygate-host-agent.service \
  /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now libvirtd
systemctl enable skygate-control-plane skygate-host-agent
systemctl restart skygate-control-plane skygate-host-agent

echo "SkyGate is up: API on http://127.0.0.1:8080 (from the laptop too)."
echo "Hypervisor chosen by the agent: $(journalctl -u skygate-host-agent -o cat | grep -o 'hypervisor=[a-z"]*' | tail -n 1)"
