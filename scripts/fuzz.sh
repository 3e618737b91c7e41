#!/usr/bin/env bash
# Runs the host agent's cargo-fuzz targets (host-agent/fuzz: domain_xml, seed) for SECONDS
# each (default 30), from any checked-in inputs (host-agent/fuzz/corpus/<target>/); exits
# non-zero on any crash or failed property and prints one line per target with runs and
# exec/s. Installs what it needs: a nightly toolchain (libFuzzer's instrumentation flags are
# nightly-only) and a pinned cargo-fuzz in a cache directory, outside the repository.
#
#   scripts/fuzz.sh [SECONDS]
#
# New corpus entries go to a temporary directory (the checked-in corpus is only read);
# crashing inputs to host-agent/fuzz/artifacts/<target>/ (git-ignored), reproduced with
# `cargo +nightly fuzz run <target> <file>` from host-agent/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-30}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [SECONDS]  (seconds per target, a positive integer)" >&2
  exit 2
fi
targets=(domain_xml seed)

# cargo-fuzz pinned: its flags and output are what this script parses. Installed per version
# under the cache (SKYGATE_TOOLS_DIR to put it elsewhere, e.g. a CI cache).
cargo_fuzz_version=0.13.2
tools=${SKYGATE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/skygate}/cargo-fuzz-$cargo_fuzz_version
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "== fuzz: installing the nightly toolchain" >&2
  # --no-self-update: installing a toolchain must not replace the machine's rustup.
  rustup toolchain install nightly --profile minimal --no-self-update
fi
if ! "$tools/bin/cargo-fuzz" --version 2>/dev/null | grep -qx "cargo-fuzz $cargo_fuzz_version"; then
  echo "== fuzz: installing cargo-fuzz $cargo_fuzz_version into $tools" >&2
  cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --root "$tools"
fi
export PATH="$tools/bin:$PATH"

work=$(mktemp -d "${TMPDIR:-/tmp}/skygate-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

cd host-agent
echo "== fuzz: build ($(rustup run nightly rustc --version))" >&2
cargo +nightly fuzz build

# One of libFuzzer's -print_final_stats lines, e.g. `stat::average_exec_per_sec: 4389`.
final_stat() { sed -n "s/^stat::$1: *//p" "$2" | tail -n 1; }

status=0
for target in "${targets[@]}"; do
  mkdir -p "$work/$target" "fuzz/artifacts/$target"
  log="$work/$target.log"
  echo "== fuzz: $target for ${seconds}s" >&2
  # -max_total_time makes libFuzzer stop by itself; the outer timeout is only a backstop
  # (a hang inside one input is caught by -timeout first). New inputs go to the first corpus
  # directory, a temporary one: the checked-in one is only read.
  # Checked-in inputs, if any: inputs that once failed (regressions). No hand-made seeds: the
  # bytes are decoded by `arbitrary`, so a hand-written file means nothing, and from nothing
  # libFuzzer covers most of each target within seconds (README "Fuzzing").
  seeds=()
  if [[ -d fuzz/corpus/$target ]]; then seeds=("fuzz/corpus/$target"); fi
  rc=0
  timeout --kill-after=10 $((seconds + 120)) \
    cargo +nightly fuzz run "$target" "$work/$target" "${seeds[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$target/" >"$log" 2>&1 || rc=$?
  runs=$(final_stat number_of_executed_units "$log")
  speed=$(final_stat average_exec_per_sec "$log")
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1 | cut -d' ' -f2)
  if [[ $rc != 0 ]]; then
    status=1
    # libFuzzer's report: the failed assertion or panic, then where the input was saved.
    grep -E -A 3 "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|Test unit written" "$log" >&2 ||
      tail -n 40 "$log" >&2
    echo "fuzz $target: FAILED (exit $rc) after ${runs:-?} runs; artifacts in host-agent/fuzz/artifacts/$target/" >&2
  else
    echo "fuzz $target: ${runs:-?} runs in ${seconds}s, ${speed:-?} exec/s, coverage ${cov:-?}," \
      "corpus $(find "$work/$target" -type f | wc -l) inputs"
  fi
done
exit "$status"
