# Sourced by scripts/test and scripts/demo: a ready .venv with the package installed.
# A fresh machine has nothing; a second run installs nothing new.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
# The CPU build of torch, where no torch is present yet: a bare `torch` requirement
# would pull a multi-GB CUDA build.  A torch the user installed is kept.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "$VPY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
stamp=".venv/.rf-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VPY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    touch "$stamp"
fi
