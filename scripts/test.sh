#!/usr/bin/env bash
# The whole test run (what CI runs), as root: installs what is missing, checks formatting and
# lints, builds and boots the tiny guest image, then runs every test of the workspace.
# Integration tests start real servers on 127.0.0.1 and use PostgreSQL at
# SKYGATE_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

# The install's own test first (CI, or SKYGATE_TEST_INSTALL=1): it breaks QEMU's packages the
# ways new machines came, and checks that the install below repairs them.
if [[ ${SKYGATE_TEST_INSTALL:-${CI:+1}} == 1 ]]; then
  echo "== install: scripts/test-install.sh" >&2
  scripts/test-install.sh
fi
# One apt transaction for everything (build tools, QEMU, libvirt, PostgreSQL), every command
# checked to run, libvirtd and PostgreSQL started, Python's venv for schemathesis. Before the
# first build: the host agent links libvirt, and its tests drive the real libvirtd.
scripts/install-deps.sh --host --postgres --test

# Domains a killed test run may have left running (only the tests' own prefixes), now and
# at the end whatever happens.
remove_test_domains() {
  local name
  for name in $(virsh -c qemu:///system list --all --name 2>/dev/null |
      grep -E '^skygate-(test|imgtest|timing|e2e)-' || true); do
    virsh -c qemu:///system destroy "$name" >/dev/null 2>&1 || true
    virsh -c qemu:///system undefine "$name" >/dev/null 2>&1 || true
  done
}
remove_test_domains
trap remove_test_domains EXIT

echo "== cargo fmt" >&2
cargo fmt --all -- --check
# The fuzz crate has a workspace of its own, which `--all` does not reach.
cargo fmt --manifest-path host-agent/fuzz/Cargo.toml -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== API contract: schemathesis against the served OpenAPI document (scripts/schemathesis.sh)" >&2
# The document against the server, from outside: both stores, anonymous, tenant and admin,
# every check, a fixed seed; about two minutes (debug build, the suites below reuse it).
scripts/schemathesis.sh
# libFuzzer over the two pure renderers the tenant's strings reach (domain XML, NoCloud seed),
# briefly: a smoke test of the properties, not a campaign (see README "Fuzzing"). Before the
# Rust suites so that their summary stays the run's closing line.
fuzz_seconds=${SKYGATE_FUZZ_SECONDS:-30}
echo "== fuzz: domain_xml and seed, ${fuzz_seconds} s each (scripts/fuzz.sh)" >&2
scripts/fuzz.sh "$fuzz_seconds"
echo "== guest image: build images/tiny and boot it under libvirt to SSH" >&2
# Real QEMU through libvirt (TCG here), reached only through a port on 127.0.0.1. Runs before
# the Rust suites so that their summary is the run's closing line. The agent's libvirt tests
# boot this image too.
# build.sh resolves the kernel package from apt's lists: refresh lists older than a day.
if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -n 1) ]]; then
  apt-get update -qq
fi
image_dir=/var/lib/skygate-images/tiny
mkdir -p "$image_dir"
images/tiny/build.sh "$image_dir"
images/tiny/boot-test.sh "$image_dir"

echo "== quickstart: the README's first command and a newcomer's next ones (scripts/test-quickstart.sh)" >&2
# Its own cluster (ports, state, domain prefix), built like the tests below (debug): a release
# build here would cost minutes and test nothing more.
SKYGATE_QUICKSTART_PROFILE=debug scripts/test-quickstart.sh

echo "== tests" >&2
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --profile ci
else
  cargo test --workspace --locked
fi
