"""Scrapes a running router's GET /metrics and reads it with the official Python client's OpenMetrics parser.

Usage: check-metrics.py BASE_URL   (e.g. http://127.0.0.1:8080; scripts/contract-test.sh runs it after the fuzzing)

Fails unless the answer has the OpenMetrics content type, parses, holds every family below with its type, counts
HTTP requests by method, route and status, and has one node-count sample per status. Needs `prometheus_client`
(scripts/test.sh installs it into .venv-test/).
"""

import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# Family names as OpenMetrics has them: a counter's samples add `_total`.
FAMILIES = {
    "llm_router_nodes": "gauge",
    "llm_router_registrations": "counter",
    "llm_router_heartbeats": "counter",
    "llm_router_approvals": "counter",
    "llm_router_deletions": "counter",
    "llm_router_status_changes": "counter",
    "llm_router_http_requests": "counter",
    "llm_router_http_request_duration_seconds": "histogram",
    "llm_router_flush_batch_size": "histogram",
    "llm_router_flush_lag_seconds": "histogram",
    "llm_router_flush_errors": "counter",
    "llm_router_storage_errors": "counter",
    "llm_router_offline_sweep_seconds": "histogram",
    "llm_router_logins_throttled": "counter",
    "llm_router_password_hashes_refused": "counter",
    "llm_router_registrations_rate_limited": "counter",
    "llm_router_registrations_too_many_pending": "counter",
    "llm_router_pending_expired": "counter",
    "llm_router_audit_dropped": "counter",
    "llm_router_mass_silences": "counter",
    "llm_router_mass_silence": "gauge",
    "llm_router_sweep_lease": "gauge",
    "llm_router_http_connections_open": "gauge",
    "llm_router_http_connections_max": "gauge",
    "llm_router_http_connections_evicted": "counter",
    "llm_router_http_connections_refused": "counter",
    "llm_router_http_connection_timeouts": "counter",
    "llm_router_inference_queued": "gauge",
    "llm_router_deployment_replicas": "gauge",
}

# Families labelled by model: they appear with the first /v1 request for a model some node has ready.
FAMILIES_BY_MODEL = {
    "llm_router_inference_requests": "counter",
    "llm_router_inference_upstream_headers_seconds": "histogram",
    "llm_router_inference_first_byte_seconds": "histogram",
    "llm_router_inference_retries": "counter",
    "llm_router_inference_ejections": "counter",
}

NODE_STATUSES = {"registering", "pending", "online", "degraded", "offline"}


def main(base):
    with urllib.request.urlopen(base.rstrip("/") + "/metrics", timeout=10) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode("utf-8")
    problems = []
    if content_type != CONTENT_TYPE:
        problems.append(f"content type {content_type!r}, not {CONTENT_TYPE!r}")

    try:
        families = {family.name: family for family in text_string_to_metric_families(text)}
    except ValueError as error:
        print(f"check-metrics: GET /metrics does not parse as OpenMetrics: {error}", file=sys.stderr)
        return 1
    for name, kind in FAMILIES.items():
        if name not in families:
            problems.append(f"no family {name}")
        elif families[name].type != kind:
            problems.append(f"{name} is a {families[name].type}, not a {kind}")
    for name, kind in FAMILIES_BY_MODEL.items():
        if name in families and families[name].type != kind:
            problems.append(f"{name} is a {families[name].type}, not a {kind}")
        for sample in families[name].samples if name in families else []:
            if "model" not in sample.labels:
                problems.append(f"{sample.name} without a model label")

    if "llm_router_http_requests" in families:
        samples = families["llm_router_http_requests"].samples
        requests = [s for s in samples if s.name == "llm_router_http_requests_total"]
        if not requests:
            problems.append("llm_router_http_requests_total has no samples, though the fuzzer sent requests")
        for sample in requests:
            if set(sample.labels) != {"method", "route", "status"}:
                problems.append(f"llm_router_http_requests_total with labels {sorted(sample.labels)}")

    if "llm_router_http_request_duration_seconds" in families:
        counts = [
            s
            for s in families["llm_router_http_request_duration_seconds"].samples
            if s.name == "llm_router_http_request_duration_seconds_count"
        ]
        if not counts or any(set(s.labels) != {"method", "route"} for s in counts):
            problems.append(f"llm_router_http_request_duration_seconds_count by method and route: {counts}")

    if "llm_router_nodes" in families:
        statuses = [s.labels.get("status") for s in families["llm_router_nodes"].samples]
        if sorted(statuses) != sorted(NODE_STATUSES):
            problems.append(f"llm_router_nodes samples by status: {statuses}, not one for each of {NODE_STATUSES}")

    if problems:
        print("check-metrics: GET /metrics is not as expected:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    samples = sum(len(family.samples) for family in families.values())
    print(f"check-metrics: /metrics parses as OpenMetrics: {len(families)} families, {samples} samples")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
