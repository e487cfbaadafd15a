#!/usr/bin/env bash
# The whole test suite on CPU (installs first if needed, test-only dependencies included). Extra arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
stamp=".venv/.installed-dev-$(cat requirements-dev.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing test dependencies (requirements-dev.txt)"
  .venv/bin/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
  rm -f .venv/.installed-dev-*
  touch "$stamp"
fi
exec .venv/bin/python -m pytest tests "$@"
