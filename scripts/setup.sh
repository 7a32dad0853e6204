#!/usr/bin/env bash
# Installs what mlutils needs on a Debian/Ubuntu machine and builds it in place
# (editable install).  Safe to run again: it skips what is already there.
#   MLUTILS_EXTRAS  pip extras to install (default: test,torch)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

need=()
command -v gcc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v strace >/dev/null || need+=(strace)   # tests/test_atomicfile.py watches the fsync calls
[ -f /usr/include/jansson.h ] || need+=(libjansson-dev)
[ -f /usr/include/zlib.h ] || need+=(zlib1g-dev)
python3 -P -c 'import sysconfig,os,sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"],"Python.h")) else 1)' || need+=(python3-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

extras="${MLUTILS_EXTRAS:-test,torch}"
pyver_torch="torch==2.13.0"
pip_q="python3 -m pip install -q --disable-pip-version-check"
# torch is pinned so pip takes the CPU wheel the machines already carry.
case ",$extras," in *,torch,*) py_has torch || $pip_q "$pyver_torch";; esac
$pip_q "setuptools>=77" wheel "numpy>=1.23"
$pip_q --no-build-isolation -e ".[${extras}]"
python3 -c 'import mlutils; print("setup: mlutils", mlutils.__version__, "features:", sorted(mlutils.features))'
