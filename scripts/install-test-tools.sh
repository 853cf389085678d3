#!/usr/bin/env bash
# Installs the tools the test suite drives but pip cannot provide: Debian's docker-compose (to
# validate docker-compose.yml without a Docker engine), Chromium (for the browser test) and libfaketime
# (for the clock-skew tests).
# Needs root and Debian's package archive; without them the tests that need a tool say so loudly.
set -euo pipefail
missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || missing+=(faketime)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: cannot install ${missing[*]} (needs root and apt-get); tests that need them will skip" >&2
  exit 0
fi
echo "== installing ${missing[*]} from Debian's archive"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || true
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || \
  echo "note: could not install ${missing[*]}; tests that need them will skip" >&2
