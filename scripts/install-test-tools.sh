#!/usr/bin/env bash
# Installs what the tests need besides the services: Debian's chromium (the
# JS SDK's browser test drives it with playwright-core) and the JS SDK's npm
# packages. Called by scripts/start-services.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
    as_root=()
    [ "$(id -u)" -ne 0 ] && as_root=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${as_root[@]}" apt-get install -y -qq chromium >/dev/null 2>&1; then
        "${as_root[@]}" apt-get update -qq >/dev/null
        "${as_root[@]}" apt-get install -y -qq chromium >/dev/null
    fi
    echo "chromium: installed ($(command -v chromium))"
else
    echo "chromium: already installed"
fi

if [ -f sdk/js/package-lock.json ]; then
    (cd sdk/js && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "sdk/js: npm packages installed"
fi
