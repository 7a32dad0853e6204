#!/usr/bin/env bash
# Coverage-guided fuzzing of the pure C parsers with libFuzzer + ASan/UBSan.
#
#   FUZZ_SECONDS=30 bash scripts/fuzz.sh            # every harness in tests/fuzz/
#   FUZZ_SECONDS=300 bash scripts/fuzz.sh json_parse # only the named ones
#
# Each harness tests/fuzz/<name>.c is built with clang -fsanitize=fuzzer and
# run for FUZZ_SECONDS, starting from a temporary copy of its committed seed
# corpus tests/fuzz/corpus_<name>/ (new inputs never land in the repository).
# Exits non-zero on any crash, leak, timeout or out-of-memory, and prints the
# reproducer.  Installs clang (Debian/Ubuntu apt) when it is missing.
#
# Environment: FUZZ_SECONDS (30), FUZZ_CC (clang), FUZZ_OUT (a temporary
# directory; kept when set, so corpora and crashes can be inspected),
# FUZZ_ARGS (extra libFuzzer flags, e.g. "-jobs=2 -workers=2").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECONDS_PER="${FUZZ_SECONDS:-30}"
CC_FUZZ="${FUZZ_CC:-clang}"

log() { printf '[fuzz] %s\n' "$*"; }

# -- a clang with the libFuzzer runtime -----------------------------------
have_libfuzzer() {
    command -v "$CC_FUZZ" >/dev/null 2>&1 || return 1
    local d
    d="$(mktemp -d)"
    printf '#include <stdint.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n' >"$d/t.c"
    if "$CC_FUZZ" -fsanitize=fuzzer,address,undefined -o "$d/t" "$d/t.c" >/dev/null 2>&1; then
        rm -rf "$d"
        return 0
    fi
    rm -rf "$d"
    return 1
}

if ! have_libfuzzer; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "fuzz.sh: $CC_FUZZ with the libFuzzer runtime is missing and apt-get is not available" >&2
        exit 2
    fi
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        SUDO="sudo"
    fi
    log "installing clang and its libFuzzer runtime"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null
    # clang's sanitizer/libFuzzer runtime is a separate package on Debian 12
    # (libclang-rt-<ver>-dev); older releases ship it inside libclang-common.
    ver="$(apt-cache depends clang 2>/dev/null | sed -n 's/.*Depends: clang-\([0-9][0-9]*\)$/\1/p' | head -n1)"
    pkgs="clang"
    if [ -n "$ver" ] && apt-cache show "libclang-rt-$ver-dev" >/dev/null 2>&1; then
        pkgs="$pkgs libclang-rt-$ver-dev"
    fi
    # llvm-symbolizer makes the sanitizer reports readable (file:line)
    if [ -n "$ver" ] && apt-cache show "llvm-$ver" >/dev/null 2>&1; then
        pkgs="$pkgs llvm-$ver"
    fi
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
    if [ -n "$ver" ] && [ -x "/usr/lib/llvm-$ver/bin/llvm-symbolizer" ]; then
        export ASAN_SYMBOLIZER_PATH="/usr/lib/llvm-$ver/bin/llvm-symbolizer"
    fi
    have_libfuzzer || { echo "fuzz.sh: $CC_FUZZ still cannot link -fsanitize=fuzzer" >&2; exit 2; }
fi
if [ -z "${ASAN_SYMBOLIZER_PATH:-}" ]; then
    for s in llvm-symbolizer /usr/lib/llvm-*/bin/llvm-symbolizer; do
        if command -v "$s" >/dev/null 2>&1; then
            export ASAN_SYMBOLIZER_PATH="$(command -v "$s")"
            break
        fi
    done
fi

# -- build -----------------------------------------------------------------
if [ -n "${FUZZ_OUT:-}" ]; then
    OUT="$FUZZ_OUT"
    mkdir -p "$OUT"
else
    OUT="$(mktemp -d "${TMPDIR:-/tmp}/mlu-fuzz.XXXXXX")"
    trap 'rm -rf "$OUT"' EXIT
fi
JANSSON_CFLAGS="$(pkg-config --cflags jansson 2>/dev/null || true)"
JANSSON_LIBS="$(pkg-config --libs jansson 2>/dev/null || echo -ljansson)"
CFLAGS=(-std=c11 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
        -fno-sanitize-recover=all -DMLU_LIBFUZZER -UNDEBUG -Icsrc -Itests/fuzz)

if [ "$#" -gt 0 ]; then
    HARNESSES=("$@")
else
    HARNESSES=()
    for f in tests/fuzz/*.c; do
        HARNESSES+=("$(basename "$f" .c)")
    done
fi

# The core objects once (with coverage), linked into every harness.
mkdir -p "$OUT/obj"
OBJS=()
for src in csrc/core/*.c; do
    obj="$OUT/obj/$(basename "$src" .c).o"
    # shellcheck disable=SC2086
    "$CC_FUZZ" "${CFLAGS[@]}" $JANSSON_CFLAGS -c -o "$obj" "$src"
    OBJS+=("$obj")
done
for h in "${HARNESSES[@]}"; do
    [ -f "tests/fuzz/$h.c" ] || { echo "fuzz.sh: no harness tests/fuzz/$h.c" >&2; exit 2; }
    [ -d "tests/fuzz/corpus_$h" ] || { echo "fuzz.sh: no seed corpus tests/fuzz/corpus_$h/" >&2; exit 2; }
    log "building $h"
    # shellcheck disable=SC2086
    "$CC_FUZZ" "${CFLAGS[@]}" $JANSSON_CFLAGS -o "$OUT/$h" "tests/fuzz/$h.c" "${OBJS[@]}" \
        $JANSSON_LIBS -lz -lm -lpthread
done

# -- run -------------------------------------------------------------------
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:symbolize=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
failed=()
for h in "${HARNESSES[@]}"; do
    work="$OUT/corpus_$h"
    art="$OUT/artifacts_$h"
    rm -rf "$work" "$art"
    mkdir -p "$work" "$art"
    cp -p "tests/fuzz/corpus_$h"/* "$work"/
    log "running $h for ${SECONDS_PER}s ($(ls "$work" | wc -l) seeds)"
    set +e
    # shellcheck disable=SC2086
    "$OUT/$h" -max_total_time="$SECONDS_PER" -rss_limit_mb=2048 -timeout=10 -max_len=1048576 \
        -print_final_stats=1 -artifact_prefix="$art/" ${FUZZ_ARGS:-} "$work" >"$OUT/$h.log" 2>&1
    rc=$?
    set -e
    grep -E '^#[0-9]+.*(DONE|pulse)|^stat::number_of_executed_units|^stat::peak_rss_mb' "$OUT/$h.log" | tail -n 3 || true
    if [ "$rc" -ne 0 ] || ls "$art" | grep -q .; then
        failed+=("$h")
        echo "=============== $h FAILED (exit $rc) ===============" >&2
        tail -n 80 "$OUT/$h.log" >&2
        for a in "$art"/*; do
            [ -f "$a" ] || continue
            echo "--- reproducer $(basename "$a") ($(wc -c <"$a") bytes), base64:" >&2
            base64 "$a" >&2
            echo "--- replay: gcc replay build of tests/fuzz/$h.c, or: $OUT/$h $a" >&2
        done
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz.sh: failures in: ${failed[*]}" >&2
    if [ -z "${FUZZ_OUT:-}" ]; then
        # keep the evidence when a temporary directory would be deleted
        keep="$(mktemp -d "${TMPDIR:-/tmp}/mlu-fuzz-fail.XXXXXX")"
        cp -r "$OUT"/artifacts_* "$OUT"/*.log "$keep"/ 2>/dev/null || true
        echo "fuzz.sh: logs and reproducers kept in $keep" >&2
    fi
    exit 1
fi
log "all ${#HARNESSES[@]} harnesses clean"
