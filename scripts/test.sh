#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, API, agent end-to-end), the dashboard in headless Chromium, and the
# contract fuzzing of the API against its own OpenAPI document.
#
# On a fresh machine it first installs what it lacks: Debian's chromium (with apt-get, when run as root; otherwise
# it says what to install), schemathesis and prometheus_client in a virtualenv of the project's own (.venv-test/),
# and the dashboard tests' npm packages (pinned in tests/dashboard/package-lock.json). Needs cargo, python3 and node
# with npm.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
# The official OpenMetrics parser that scripts/check-metrics.py reads /metrics with.
PROMETHEUS_CLIENT_VERSION=0.26.0

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
  else
    echo "test.sh: the dashboard tests need Debian's chromium: run 'sudo apt-get install chromium', then again." >&2
    exit 1
  fi
fi

venv=.venv-test
installed() { "$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }
if [ "$(installed schemathesis)" != "$SCHEMATHESIS_VERSION" ] ||
  [ "$(installed prometheus_client)" != "$PROMETHEUS_CLIENT_VERSION" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "schemathesis==$SCHEMATHESIS_VERSION" "prometheus_client==$PROMETHEUS_CLIENT_VERSION"
fi

if [ ! -d tests/dashboard/node_modules ] || [ tests/dashboard/package-lock.json -nt tests/dashboard/node_modules ]; then
  npm --prefix tests/dashboard ci --no-audit --no-fund
fi

cargo test --workspace

SCHEMATHESIS_PYTHON="$venv/bin/python" scripts/contract-test.sh

npm --prefix tests/dashboard test
