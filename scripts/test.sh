#!/usr/bin/env bash
# Runs the whole test suite: C unit tests of the pure core, then pytest.
# Warnings fail the build here (MLUTILS_WERROR=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MLUTILS_WERROR=1 python3 setup.py -q build_ext --inplace
make -s ctest
python3 -m pytest -q "$@"
