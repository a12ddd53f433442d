#!/usr/bin/env python3
"""Checks a small run of the dashboard benchmark (tests/dashboard/bench.mjs --json FILE) as CI makes it: every
figure of SPEC §12 was measured, the table held a screenful of rows, not the fleet, and the figures that do not
depend on the machine's speed are within their targets. The timed figures of 10,000 and 100,000 nodes are measured
on release builds and quoted in docs/performance.md; on CI's shared cores, in a debug build, they are only required
to exist."""

import json
import sys

runs = json.load(open(sys.argv[1]))["runs"]
problems = []
for run in runs:
    figures = run.get("figures", {})
    where = f"{run.get('nodes')} nodes"
    for key in ("signin_to_rows_ms", "search_ms", "status_filter_ms", "sort_ms", "kb_per_10s", "heap_mb"):
        if not isinstance(figures.get(key), (int, float)):
            problems.append(f"{where}: {key} was not measured: {figures.get(key)!r}")
    if figures.get("longest_task_ms") != "< 50 ms" and not isinstance(figures.get("longest_task_ms"), (int, float)):
        problems.append(f"{where}: longest_task_ms was not measured: {figures.get('longest_task_ms')!r}")
    if isinstance(figures.get("kb_per_10s"), (int, float)) and figures["kb_per_10s"] >= 500:
        problems.append(f"{where}: {figures['kb_per_10s']} KB per 10 s of live updates (target < 500)")
    if isinstance(figures.get("heap_mb"), (int, float)) and figures["heap_mb"] >= 50:
        problems.append(f"{where}: JS heap {figures['heap_mb']} MB (target < 50)")
    if not run.get("rows_at_rest") or run["rows_at_rest"] >= 100:
        problems.append(f"{where}: {run.get('rows_at_rest')} rows in the page at rest: the table is not windowed")
    problems += [f"{where}: {note}" for note in run.get("notes", [])]
if not runs:
    problems.append("no run")
for problem in problems:
    print(f"dashboard benchmark: {problem}", file=sys.stderr)
if problems:
    sys.exit(1)
print(f"dashboard benchmark: {len(runs)} run(s), every figure measured: "
      + "; ".join(f"{r['nodes']} nodes {r['figures']}" for r in runs))
