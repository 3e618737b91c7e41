#!/usr/bin/env bash
# The whole test run (what CI runs): installs what is missing, checks formatting and lints,
# then runs every test of the workspace. Integration tests start real servers on 127.0.0.1
# and use PostgreSQL at SKYGATE_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --postgres

echo "== cargo fmt" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests" >&2
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --profile ci
else
  cargo test --workspace --locked
fi
