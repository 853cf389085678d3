#!/usr/bin/env bash
# Runs the whole service locally: installs dependencies into .venv, then starts Redis (embedded when
# REDIS_URL is unset and nothing answers on localhost:6379), the API on :8000 and one worker.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
exec .venv/bin/python -m app.dev "$@"
