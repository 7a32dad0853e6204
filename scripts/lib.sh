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

# missing_test_requirements: the requirements of pyproject.toml's `test` extra
# (pytest-timeout among them) that are not installed, one a line.
missing_test_requirements() {
  (cd / && "${PY:-python3}" -P - "$MLU_ROOT/pyproject.toml" <<'EOF'
import re, sys, tomllib
from importlib import metadata
with open(sys.argv[1], "rb") as f:
    reqs = tomllib.load(f)["project"]["optional-dependencies"]["test"]
try:
    from packaging.requirements import Requirement
except ImportError:  # no version check then: installed is enough
    Requirement = None
for req in reqs:
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(req)
        continue
    if Requirement is not None and not Requirement(req).specifier.contains(version, prereleases=True):
        print(req)
EOF
  )
}

# ensure_test_deps: installs what the `test` extra lists and is missing, then
# makes sure pytest and pytest-timeout are there (without the timeout plugin
# pytest ignores `timeout` in pyproject.toml, and a hang would never end).
ensure_test_deps() {
  local missing reqs m
  missing=$(missing_test_requirements) || return 1
  mapfile -t reqs < <(printf '%s' "$missing" | sed '/^$/d')
  if [ ${#reqs[@]} -gt 0 ]; then
    echo "pip install ${reqs[*]} (the test extra)"
    "${PY:-python3}" -m pip install -q --disable-pip-version-check "${reqs[@]}"
  fi
  for m in pytest pytest_timeout; do
    py_has "$m" || { echo "$m is missing after installing the test extra" >&2; return 1; }
  done
}
