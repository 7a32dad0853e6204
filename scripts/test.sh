#!/usr/bin/env bash
# Runs the whole test suite: C unit tests of the pure core, then pytest.
# Warnings fail the build here (MLUTILS_WERROR=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# pytest-timeout and the rest of the test extra, even when MLUTILS_EXTRAS left it out
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_test_deps
MLUTILS_WERROR=1 python3 setup.py -q build_ext --inplace
# nvcc present and CUDA not switched off: the build must carry CUDA (checked by a test).
if [ "${MLUTILS_CUDA:-}" != 0 ] && { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; }; then
  export MLUTILS_EXPECT_CUDA=1
fi
make -s ctest
python3 -m pytest -q "$@"
# again as on a machine without torch (numpy-only paths; torch tests skip)
MLUTILS_NO_TORCH=1 python3 -m pytest -q -p no:cacheprovider "$@"
