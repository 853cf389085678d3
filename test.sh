#!/usr/bin/env bash
# Runs every check: installs dev dependencies into .venv, then ruff, mypy and the full pytest suite
# (real Redis started privately on a free port, real API and worker processes).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
if [ -x scripts/install-test-tools.sh ]; then scripts/install-test-tools.sh; fi
echo "== ruff"; .venv/bin/ruff check app worker.py tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
