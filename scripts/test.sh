#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, API, agent end-to-end, and several routers sharing one PostgreSQL
# database, in process and as real processes), the API suite a second time with every router of it on PostgreSQL,
# the official `openai` Python client against the router's /v1 (tests/openai/, stand-in runtimes), the router and
# agent beside a real llama.cpp runtime (tests/llama/), the dashboard in headless Chromium, and the contract fuzzing
# of the API against its own OpenAPI document.
#
# On a fresh machine it first installs what it lacks: Debian's chromium and postgresql (with apt-get, when run as
# root; otherwise it says what to install), schemathesis, prometheus_client, pytest, openai and gguf in a virtualenv
# of the project's own (.venv-test/), llama-cpp-python built from source for the CPU in a virtualenv cached under
# ${XDG_CACHE_HOME:-~/.cache}/llm-router/ (a few minutes, once per version), and the dashboard tests' npm packages
# (pinned in tests/dashboard/package-lock.json). Needs cargo, python3 and node with npm. The PostgreSQL server is a
# throw-away cluster (scripts/postgres.sh) in a temporary directory, stopped and removed when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
# The official OpenMetrics parser that scripts/check-metrics.py reads /metrics with.
PROMETHEUS_CLIENT_VERSION=0.26.0
# The Python tests of /v1: the official OpenAI client, and gguf to write the tiny model the llama.cpp test serves.
PYTEST_VERSION=9.2.0
OPENAI_VERSION=3.57.0
GGUF_VERSION=0.19.0
# The real runtime of tests/llama/: llama.cpp's server through its Python package, built from source (CPU only).
LLAMA_CPP_PYTHON_VERSION=0.3.36

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
  [ "$(installed prometheus_client)" != "$PROMETHEUS_CLIENT_VERSION" ] ||
  [ "$(installed pytest)" != "$PYTEST_VERSION" ] ||
  [ "$(installed openai)" != "$OPENAI_VERSION" ] ||
  [ "$(installed gguf)" != "$GGUF_VERSION" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "schemathesis==$SCHEMATHESIS_VERSION" "prometheus_client==$PROMETHEUS_CLIENT_VERSION" \
    "pytest==$PYTEST_VERSION" "openai==$OPENAI_VERSION" "gguf==$GGUF_VERSION"
fi

# Kept outside the work tree, so that a fresh checkout on the same machine does not build it again. The marker file
# is written last: a build that was interrupted is started over.
llama_cache=${XDG_CACHE_HOME:-$HOME/.cache}/llm-router
llama_venv=$llama_cache/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION
if [ ! -f "$llama_venv/.complete" ]; then
  echo "test.sh: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION for the CPU (a few minutes, once) in $llama_venv"
  rm -rf "$llama_cache"/llama-cpp-python-*
  python3 -m venv "$llama_venv"
  # No system cmake is needed: the build fetches cmake and ninja from PyPI. Should that fail, Debian's is used.
  if ! CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$llama_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-binary llama-cpp-python "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"; then
    if [ "$(id -u)" = 0 ] && ! command -v cmake >/dev/null; then
      apt-get update
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake ninja-build build-essential
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$llama_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-binary llama-cpp-python "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
    else
      echo "test.sh: building llama-cpp-python failed (see above)" >&2
      exit 1
    fi
  fi
  touch "$llama_venv/.complete"
fi

if [ ! -d tests/dashboard/node_modules ] || [ tests/dashboard/package-lock.json -nt tests/dashboard/node_modules ]; then
  npm --prefix tests/dashboard ci --no-audit --no-fund
fi

# A throw-away PostgreSQL server for the whole run: the PostgreSQL tests make a database of their own on it.
pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/llm-router-pg.XXXXXX")
# Readable by the server's own user when run as root (the cluster then belongs to `postgres`).
chmod 755 "$pg_dir"
trap 'scripts/postgres.sh stop "$pg_dir/cluster"; rm -rf "$pg_dir"' EXIT
LLM_ROUTER_TEST_POSTGRES=$(POSTGRES_NO_FSYNC=1 scripts/postgres.sh start "$pg_dir/cluster")
export LLM_ROUTER_TEST_POSTGRES

# The tests that need PostgreSQL find the server in LLM_ROUTER_TEST_POSTGRES. Without it (a plain `cargo test` on a
# machine without PostgreSQL) they say they are skipped and pass; under CI (`CI` set) they fail instead.
cargo test --workspace
# The API suite again, every router of it on PostgreSQL (each test on a database of its own). Skipped here, and
# reported as filtered out: the tests that choose their database themselves, whatever the suite's backend, and so
# ran in the first pass already: several routers on PostgreSQL (postgres::, multi_router::), the database failing
# under the router (outages::), and SQLite itself, its file, log, schema and migrations (sqlite::), which PostgreSQL
# has no counterpart of.
LLM_ROUTER_TEST_BACKEND=postgres cargo test -p llm-router --test api -- \
  --skip postgres:: --skip multi_router:: --skip outages:: --skip sqlite::

# The binaries the Python suites start (cargo test builds llm-node, and llm-router for the agent's end-to-end tests;
# this makes sure both are current).
cargo build -p llm-router -p llm-node -p bench
"$venv/bin/python" -m pytest -p no:cacheprovider tests/openai
LLAMA_CPP_PYTHON="$llama_venv/bin/python" "$venv/bin/python" -m pytest -p no:cacheprovider tests/llama

SCHEMATHESIS_PYTHON="$venv/bin/python" scripts/contract-test.sh

npm --prefix tests/dashboard test

# The dashboard benchmark (SPEC §12), small and on debug builds: it runs end to end against this dashboard, and
# what does not depend on the machine's speed holds (a windowed table, bytes of live updates, the heap).
bench_json=$(mktemp)
LLM_ROUTER_BIN="$PWD/target/debug/llm-router" BENCH_BIN="$PWD/target/debug/bench" \
  node tests/dashboard/bench.mjs --nodes 2000 --live-secs 5 --timeout-secs 60 --json "$bench_json"
python3 scripts/check-dashboard-bench.py "$bench_json"
rm -f "$bench_json"
