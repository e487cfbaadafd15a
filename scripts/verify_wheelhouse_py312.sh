#!/usr/bin/env bash
# Prove here, without a GPU, that the wheelhouse installs and imports the way tools/gpu_check.sh will use it on the
# device machine: a Python 3.12 environment shaped like the device image (.venv-image312, git-ignored; the image
# packages the wheels rely on, at the image's versions where they were read, torch 2.11 included), then
# `pip install --no-index --no-deps --target` of the wheelhouse into a fresh folder and
# `tools/gpu_wheelhouse.py imports` with that folder on PYTHONPATH, as on the device.
#
#   bash tools/gpu_wheelhouse.sh && bash scripts/verify_wheelhouse_py312.sh [WHEELHOUSE]
#
# Needs a Python 3.12 (PYTHON312, else python3.12 on PATH, else pyenv's) and PyPI for the first run (~3 GB: PyPI's
# torch 2.11 is the CUDA build, which runs on CPU). Once .venv-image312 exists, tests/tools/test_gpu_wheelhouse.py
# repeats the install and the imports offline.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELHOUSE=${1:-.wheelhouse}
VENV=.venv-image312
[ -d "$WHEELHOUSE" ] || { echo "error: no wheelhouse at $WHEELHOUSE; build it with: bash tools/gpu_wheelhouse.sh" >&2; exit 2; }
PY312=${PYTHON312:-$(command -v python3.12 2>/dev/null || true)}
if ! "${PY312:-false}" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    PY312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
fi
[ -n "$PY312" ] && [ -x "$PY312" ] || { echo "error: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 2; }
PY=${PYTHON:-}  # any Python with `packaging`, for the resolver
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

# The image-like environment: what the wheels need from the image, plus the image's packages that the project's
# requirement files name (sentencepiece, safetensors, tensorboard, pillow, pytest), at the image's versions where read.
mapfile -t needs < <("$PY" tools/gpu_wheelhouse.py image-needs "$WHEELHOUSE")
image_pin() { grep -E "^$1(==|$)" tools/gpu_image_packages.txt; }
wanted=("${needs[@]}")
for name in sentencepiece safetensors tokenizers tensorboard pillow pytest; do wanted+=("$(image_pin "$name")"); done
stamp="$VENV/.installed-$(printf '%s\n' "${wanted[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
    echo "installing the image-like environment into $VENV: ${wanted[*]}"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${wanted[@]}"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
extra=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | cut -d= -f1 | "$PY" -c '
import sys
sys.path.insert(0, "tools")
from gpu_wheelhouse import read_image_packages
from packaging.utils import canonicalize_name
image = read_image_packages()
print(" ".join(sorted(n for n in (canonicalize_name(l.strip()) for l in sys.stdin) if n and n not in image)))')
# Where pip pulled in more than the image lists (a newer typer needs pydantic, python-dateutil tzdata), take it out
# again: the imports below must come from the image's packages and the wheelhouse alone.
if [ -n "$extra" ]; then
    echo "removing what pip pulled in beyond the image list: $extra"
    "$VENV/bin/python" -m pip uninstall -q -y $extra
fi

site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-index --no-deps --no-compile --target "$site" \
    "$WHEELHOUSE"/*.whl
echo "installed $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels into a --target folder; importing on $("$VENV/bin/python" -c 'import sys, torch; print("Python", sys.version.split()[0], "torch", torch.__version__)')"
PYTHONPATH="$site" DS_ACCELERATOR=cpu "$VENV/bin/python" tools/gpu_wheelhouse.py imports
