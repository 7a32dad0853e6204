#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer and
# runs the test suite under it (Python itself is not instrumented, so the
# runtime is preloaded).  Leaves a normal build behind when it is done.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_test_deps  # pytest with pytest-timeout: a hang under the sanitizers must end
asan_lib=$(gcc -print-file-name=libasan.so)
ubsan_lib=$(gcc -print-file-name=libubsan.so)
rm -rf build/asan
MLUTILS_SANITIZE=1 MLUTILS_WERROR=1 MLUTILS_CUDA=0 python3 setup.py -q build_ext --inplace --build-temp build/asan --force
make -s ctest-asan
status=0
# refuse to pass with an uninstrumented extension
LD_PRELOAD="$asan_lib $ubsan_lib" ASAN_OPTIONS=detect_leaks=0 \
  python3 -c 'import mlutils, sys; sys.exit(0 if "asan" in mlutils.features else "extension is not the sanitizer build")'
# torch's libraries are not instrumented but run fine with the runtime preloaded,
# so the torch tests run here too; MLUTILS_NO_TORCH=1 skips them where they cannot.
LD_PRELOAD="$asan_lib $ubsan_lib" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
MLUTILS_NO_TORCH="${MLUTILS_NO_TORCH:-0}" \
  python3 -m pytest -q -p no:cacheprovider -m "not slow and not heavy" "$@" || status=$?
# back to the normal build
MLUTILS_WERROR=1 python3 setup.py -q build_ext --inplace --force
exit $status
