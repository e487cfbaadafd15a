#!/usr/bin/env bash
# Quick start: install (once), then prepare the embedded corpus, train the `tiny` preset, evaluate, sample.
# Extra arguments go to launcher/run.py, e.g. --set training.max_steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python launcher/run.py --preset tiny "$@"
