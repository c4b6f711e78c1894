#!/usr/bin/env bash
# Builds the fuzz targets as `cargo fuzz build -O --sanitizer none` does, without needing
# cargo-fuzz installed: nightly, SanitizerCoverage instrumentation, debug assertions and overflow
# checks on. Usage: fuzz/build.sh; then fuzz/target/x86_64-unknown-linux-gnu/release/<target>.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
cargo +nightly build --release --target x86_64-unknown-linux-gnu --bins "$@"
