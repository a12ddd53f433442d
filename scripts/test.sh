#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, API, agent end-to-end), the dashboard in headless Chromium, and the
# contract fuzzing of the API against its own OpenAPI document.
#
# Needs: cargo; node + npm and Debian's chromium (/usr/bin/chromium); python3 with schemathesis.
# `.ci/run` installs the latter on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace

scripts/contract-test.sh

if [ ! -d tests/dashboard/node_modules ]; then
  npm --prefix tests/dashboard ci --no-audit --no-fund
fi
npm --prefix tests/dashboard test
