#!/usr/bin/env bash
# Builds every fuzz target, then runs each for ${FUZZ_SECONDS:-60} seconds,
# one after the other; exits non-zero as soon as one finds a crash (the
# input is saved under fuzz/artifacts/<target>/ and its log printed).
#
#   fuzz/run-all.sh                      # 60 s each (about 4 minutes after the build)
#   FUZZ_SECONDS=600 fuzz/run-all.sh     # the "10 minutes without a crash" run
#   FUZZ_SECONDS=20 fuzz/run-all.sh      # what .ci/run does
#   FUZZ_TARGETS="http pattern" fuzz/run-all.sh
#
# Installs the pinned cargo-fuzz if it is missing; needs a nightly toolchain
# (`rustup toolchain install nightly`). The dependencies are the ones in
# fuzz/Cargo.lock (checked with --locked before anything is built).
# FUZZ_CORPUS=DIR puts the new corpus under DIR/<target> instead of
# fuzz/corpus/<target>; FUZZ_RSS_MB is libFuzzer's memory limit (2048).
set -euo pipefail
cd "$(dirname "$0")"

CARGO_FUZZ_VERSION=0.13.2
seconds="${FUZZ_SECONDS:-60}"
rss="${FUZZ_RSS_MB:-2048}"
corpus_root="${FUZZ_CORPUS:-corpus}"

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "=$CARGO_FUZZ_VERSION" --locked
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzzing needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 1
fi

# The lockfile is committed: refuse to build with anything else.
cargo +nightly fetch --locked --quiet

targets="${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"
start=$(date +%s)
echo "== building: $(echo $targets)"
cargo +nightly fuzz build
echo "== built in $(($(date +%s) - start)) s"

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
for target in $targets; do
    mkdir -p "$corpus_root/$target"
    args=("$corpus_root/$target")
    # Seeds are read, never written: the first corpus dir takes new inputs.
    if [ -d "seeds/$target" ]; then
        args+=("seeds/$target")
    fi
    flags=(-max_total_time="$seconds" -rss_limit_mb="$rss" -timeout=30 -print_final_stats=1)
    if [ -f "dict/$target.dict" ]; then
        flags+=(-dict="dict/$target.dict")
    fi
    log="$logs/$target.log"
    echo "== $target: ${seconds} s"
    if ! cargo +nightly fuzz run "$target" "${args[@]}" -- "${flags[@]}" >"$log" 2>&1; then
        # The panic (or sanitizer report) first: the tail is mostly backtrace.
        grep -m 1 -A 3 -E "panicked at|ERROR: (AddressSanitizer|libFuzzer)" "$log" >&2 || true
        echo "..." >&2
        tail -n 40 "$log" >&2
        echo "fuzz target $target failed: the input is under fuzz/artifacts/$target/" >&2
        exit 1
    fi
    # libFuzzer's closing stats: runs, speed, corpus.
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    units=$(grep -Eo 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -n 1 || true)
    echo "   $target: ${runs:-?} runs, ${speed:-?} exec/s, ${units:-corp: ?}, no crash"
done
echo "all fuzz targets ran ${seconds} s each without a crash ($(($(date +%s) - start)) s with the build)"
