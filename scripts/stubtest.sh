#!/usr/bin/env bash
# Checks the stub mlutils/_core.pyi against the built extension with
# mypy.stubtest: every name, class, base and (where the C function declares a
# signature) parameter must match.  scripts/stubtest_allowlist.txt holds the
# few things stubtest cannot judge, each with why.  Installs mypy when pip has
# no record of it.  Exits non-zero on any mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1

python3 setup.py -q build_ext --inplace

# Ask pip's record of installed distributions, from outside the checkout:
# a folder named mypy/ here cannot pass for the package.
if ! (cd / && python3 -m pip show -q mypy >/dev/null 2>&1); then
  echo "stubtest: pip install mypy"
  python3 -m pip install -q mypy
fi

# Run where nothing of the checkout but mlutils/ can be imported (-P: no
# current folder on sys.path), so that the installed mypy is the one that runs.
W=$(mktemp -d "${TMPDIR:-/tmp}/mlutils-stubtest.XXXXXX")
trap 'rm -rf "$W"' EXIT
ln -s "$ROOT/mlutils" "$W/mlutils"
cd "$W"
PYTHONPATH="$W" python3 -P -m mypy.stubtest mlutils._core \
  --allowlist "$ROOT/scripts/stubtest_allowlist.txt"
echo "stubtest: mlutils/_core.pyi matches mlutils._core"
