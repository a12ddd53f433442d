#!/usr/bin/env bash
# Contract fuzzing: schemathesis generates requests from the router's own OpenAPI document and checks that no
# answer is a server error and that every answer matches its documented schema. Then GET /metrics, after all that
# traffic, must parse with the official Python client's OpenMetrics parser (scripts/check-metrics.py).
#
# Needs: a built router (target/debug/llm-router, or $LLM_ROUTER_BIN), schemathesis and prometheus_client: the
# Python in $SCHEMATHESIS_PYTHON (scripts/test.sh sets up .venv-test/ with both), or python3 with
# `pip install schemathesis prometheus_client`.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${LLM_ROUTER_BIN:-target/debug/llm-router}
checks=${CONTRACT_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance}
max_time=${CONTRACT_MAX_TIME:-60}
data=$(mktemp -d)
log=$data/router.log
password=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')

# No reachability probe: generated registrations carry arbitrary addresses, which must never be contacted.
LLM_ROUTER_ADMIN_PASSWORD=$password LLM_ROUTER_LOG=warn \
  "$bin" serve --listen 127.0.0.1:0 --data-dir "$data" --no-reachability-check >"$log" 2>&1 &
router=$!
trap 'kill $router 2>/dev/null || true; wait $router 2>/dev/null || true; rm -rf "$data"' EXIT

# The line the router prints once it listens (`llm_router::app::LISTENING_ON`, then the address).
base=""
for _ in $(seq 1 100); do
  base=$(sed -n 's/^llm-router listening on \(http:[^ ]*\)$/\1/p' "$log")
  [ -n "$base" ] && break
  sleep 0.1
done
[ -n "$base" ] || { echo "contract test: the router did not start:"; cat "$log"; exit 1; }

json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
session=$(curl -sf -X POST "$base/v0/auth/login" -H 'Content-Type: application/json' \
  -d "{\"username\":\"admin\",\"password\":\"$password\"}" | json '["token"]')
# An API key, not a session: a generated logout must not sign the fuzzer out.
key=$(curl -sf -X POST "$base/v0/api-keys" -H 'Content-Type: application/json' -H "Authorization: Bearer $session" \
  -d '{"name":"contract-test"}' | json '["key"]')

"${SCHEMATHESIS_PYTHON:-python3}" -m schemathesis.cli run "$base/v0/openapi.json" \
  --checks "$checks" \
  --header "Authorization: Bearer $key" \
  --max-time "$max_time" \
  --workers 2 \
  --suppress-health-check all \
  --warnings off

"${SCHEMATHESIS_PYTHON:-python3}" scripts/check-metrics.py "$base"
