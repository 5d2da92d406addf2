#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) on a scratch copy of the committed seed
# corpus, on the stable toolchain (libFuzzer instrumentation without a sanitizer).
#
#   bash fuzz/run.sh [SECONDS [TARGET...]]
#   bash fuzz/run.sh --build-only    install cargo-fuzz and build the targets, run nothing
#                                    (CI builds them early, in the background)
#
# Exits non-zero if any target crashes (panic, failed assertion, out-of-memory, timeout) and
# prints where libFuzzer saved the input; replay it with
#   cargo fuzz run --sanitizer none TARGET fuzz/artifacts/TARGET/crash-…
# The committed corpus under fuzz/corpus/ is never modified. Needs a C++ compiler (libFuzzer is
# built from source by libfuzzer-sys).
set -euo pipefail

build_only=false
if [ "${1:-}" = --build-only ]; then
    build_only=true
    shift
fi
seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS [TARGET...]]  (seconds per target, default 60; all targets by default)" >&2
    exit 2
fi

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$fuzz_dir/.."
targets=(run_request image_decode)
if [ "$#" -gt 1 ]; then
    targets=("${@:2}")
fi
cargo_fuzz_version="${CARGO_FUZZ_VERSION:-0.13.2}"
# libFuzzer options: inputs up to 1 MiB (room for real images), RSS capped at 4 GiB, and one
# input taking over 60 s counts as a hang.
libfuzzer_args=(-max_len=1048576 -rss_limit_mb=4096 -timeout=60 -print_final_stats=1)

# libFuzzer is compiled from source by libfuzzer-sys: it needs a C++ compiler.
if ! command -v c++ >/dev/null; then
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi
echo "== $(cargo fuzz --version), $(rustc --version)"

# `cargo fuzz` has no --locked; this fails instead if fuzz/Cargo.lock would have to change.
cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null

build_start=$SECONDS
cargo fuzz build --fuzz-dir fuzz --sanitizer none
echo "== fuzz build took $((SECONDS - build_start)) s"
if "$build_only"; then
    exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/sdxl-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

failed=()
for target in "${targets[@]}"; do
    seeds="fuzz/corpus/$target"
    if [ ! -d "$seeds" ] || [ -z "$(ls -A "$seeds")" ]; then
        echo "error: no seed corpus at $seeds" >&2
        exit 1
    fi
    corpus="$work/corpus/$target"
    mkdir -p "$corpus" "fuzz/artifacts/$target"
    cp -- "$seeds"/* "$corpus"/
    before=$(find "$corpus" -type f | wc -l)
    log="$work/$target.log"
    echo "== fuzzing $target for $seconds s ($before seed inputs)"
    touch "$work/$target.start"
    status=0
    cargo fuzz run --fuzz-dir fuzz --sanitizer none "$target" "$corpus" -- \
        "${libfuzzer_args[@]}" -max_total_time="$seconds" 2>&1 | tee "$log" || status=$?
    after=$(find "$corpus" -type f | wc -l)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
    echo "== $target: ${execs:-?} executions, ${rate:-?} exec/s, corpus $before -> $after inputs"
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        echo "== $target FAILED (exit $status); saved input(s):" >&2
        find "fuzz/artifacts/$target" -type f -newer "$work/$target.start" | sed 's/^/  /' >&2
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzzing found failures in: ${failed[*]}" >&2
    exit 1
fi
echo "== all targets ran $seconds s without a failure"
