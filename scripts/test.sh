#!/usr/bin/env bash
# Runs every test suite: cmocka unit suites and the integration tests (root, network
# namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d build ] || meson setup build
exec meson test -C build --print-errorlogs "$@"
