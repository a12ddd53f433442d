"""Cache-aware routing with a real runtime (SPEC §13): two llama.cpp servers (llama-cpp-python, CPU, the tiny model,
its prompt cache on) behind the router, the same shared-prefix chats sent under each policy, and the prompt tokens
each server evaluated, read from its own timings log. Sent where their prefix is already cached, the requests make
the servers evaluate fewer prompt tokens than when they are spread without regard to it.
"""

from __future__ import annotations

import re
from pathlib import Path

import tiny_model
from harness import Router, sdk, wait_for
from test_llama_cpp import MODEL, Process, free_port, get_json, llama_python

# llama.cpp's timings, printed by llama-cpp-python after every completion: "prompt eval time = 1.23 ms / 45 tokens".
PROMPT_EVAL = re.compile(r"prompt eval time\s*=\s*[\d.]+ ms /\s*(\d+) tokens")

# Twelve system prompts that differ from their first word and are long enough to be worth caching (the tiny model's
# tokens are bytes: about 300 tokens each), each asked a fresh question in each of six rounds.
#
# Both servers keep every prompt they computed, so the policies differ in how many servers compute each prompt:
# least-loaded sends a prompt to either server at random, so in six rounds it lands on both 97 % of the time
# (23.6 computations of the twelve prompts expected); cache-aware sends a prompt's first request to the less loaded
# of two and the others to its node, so it is computed once or twice (18 expected, standard deviation 1.7). With
# fewer prompts and rounds the two overlap: six prompts in four rounds expect 11.25 against 9, and a run can go
# either way.
SYSTEMS = [
    f"{name} You answer in one word. " + "Keep to the facts in the manual; say so when it does not cover the question. " * 5
    for name in ["Alpha.", "Bravo.", "Charlie.", "Delta.", "Echo.", "Foxtrot.", "Golf.", "Hotel.", "India.",
                 "Juliett.", "Kilo.", "Lima."]
]
ROUNDS = 6


def prompt_tokens_evaluated(log: Path) -> int:
    return sum(int(n) for n in PROMPT_EVAL.findall(log.read_text(errors="replace")))


def run_policy(tmp_path: Path, model: Path, policy: str) -> tuple[int, int]:
    """Fresh servers and a router with `policy`; the shared-prefix chats sent one after another. Returns the prompt
    tokens both servers evaluated and the requests they answered."""
    started: list = []
    try:
        data = tmp_path / policy
        data.mkdir()
        router = Router(data, "--heartbeat-interval-secs", "1", "--routing-policy", policy)
        started.append(router)
        logs = []
        for i in range(2):
            port = free_port()
            log = data / f"runtime-{i}.log"
            runtime = Process(f"llama-cpp-python {i}", [
                llama_python(), "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL,
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "1", "--seed", "1",
                "--cache", "true", "--verbose", "true",
            ], log)
            started.append(runtime)
            wait_for(f"llama.cpp's server {i} to list the model",
                     lambda: runtime.alive() and get_json(f"http://127.0.0.1:{port}/v1/models"), timeout=60,
                     context=runtime.log)
            router.online_node(f"llama-{i}", port, [MODEL])
            logs.append(log)
        client = sdk(router, router.api_key("inference"), timeout=60)
        answered = 0
        for round_ in range(ROUNDS):
            for n, system in enumerate(SYSTEMS):
                reply = client.chat.completions.create(
                    model=MODEL, max_tokens=2, temperature=0,
                    messages=[{"role": "system", "content": system},
                              {"role": "user", "content": f"Question {round_}.{n}?"}])
                assert reply.choices[0].finish_reason in ("length", "stop")
                answered += 1
        # Each completion prints its timings when it ends; the last one may still be on its way to the log.
        wait_for("every completion's timings in the servers' logs",
                 lambda: sum(len(PROMPT_EVAL.findall(log.read_text(errors="replace"))) for log in logs) >= answered,
                 timeout=10)
        return sum(prompt_tokens_evaluated(log) for log in logs), answered
    finally:
        for process in reversed(started):
            process.stop()


def test_cache_aware_routing_makes_real_servers_evaluate_fewer_prompt_tokens(tmp_path: Path) -> None:
    model = tiny_model.write(tmp_path / "tiny.gguf")
    spread, spread_answered = run_policy(tmp_path, model, "least-loaded")
    cached, cached_answered = run_policy(tmp_path, model, "cache-aware")
    assert spread_answered == cached_answered == ROUNDS * len(SYSTEMS)
    print(f"prompt tokens evaluated: least-loaded {spread}, cache-aware {cached}")
    # Cache-aware: each system prompt is computed once, on its node, then only the questions. Least-loaded: a prompt
    # is computed again on every server it lands on first, and the two servers' caches hold every prompt.
    assert cached < spread, f"cache-aware evaluated {cached} prompt tokens, least-loaded {spread}"
