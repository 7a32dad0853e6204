# Shared by the scripts (sourced, never run): checks for Python tools that no
# folder of the checkout can fool.
#
# `python3 -c 'import build'` run from the repository root finds setuptools'
# build/ folder (a namespace package: any folder will do) and reports PyPA's
# `build` as installed; `python3 -m build` then fails.  These checks run from
# / with -P (nothing prepended to sys.path), and py_has finds the module
# without importing it and accepts only a real module or package outside the
# checkout.

MLU_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

# py_has MODULE: exit status 0 when ${PY:-python3} has MODULE installed.
py_has() {
  (cd / && "${PY:-python3}" -P - "$1" "$MLU_ROOT" <<'EOF'
import importlib.util, os, sys
name, root = sys.argv[1], sys.argv[2]
try:
    spec = importlib.util.find_spec(name)
except (ImportError, ValueError):
    spec = None
origin = spec.origin if spec is not None else None  # None or "namespace": a bare folder
ok = origin not in (None, "namespace") and not os.path.realpath(origin).startswith(root + os.sep)
sys.exit(0 if ok else 1)
EOF
  )
}
