"""Usage (SPEC §14) with the official `openai` client: a stream is counted whether or not its client asked for
usage, and what the client reads is what the runtime would have sent it directly: the router's own request for
usage never shows."""

from __future__ import annotations

import json
import time

import openai

from harness import Router, sdk, wait_for
from standin import USAGE

MODEL = "llama-3-8b"
MESSAGES = [{"role": "user", "content": "Hello"}]


def chunks_of(stream: openai.Stream) -> list[dict]:
    """The events as the client parsed them, exactly the fields the server sent."""
    return [chunk.model_dump(exclude_unset=True) for chunk in stream]


def recorded(router: Router, count: int) -> list[dict]:
    """The router's records, newest first, once `count` are written."""
    def ready() -> list[dict] | None:
        rows = router.expect(200, "GET", "/v0/usage/requests", token=router.admin)
        return rows if len(rows) >= count else None

    return wait_for(f"{count} usage records", ready, timeout=5)


def test_a_stream_without_include_usage_is_counted_and_reads_as_if_direct(router: Router, client: openai.OpenAI,
                                                                          standin) -> None:
    runtime = standin("a", [MODEL])
    router.online_node("gpu-a", runtime.port, [MODEL])
    direct = openai.OpenAI(base_url=f"http://127.0.0.1:{runtime.port}/v1", api_key="unused", max_retries=0)

    through = chunks_of(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    alone = chunks_of(direct.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))

    assert through == alone
    assert all("usage" not in chunk for chunk in through), through
    routed, _ = runtime.inference_requests()
    assert json.loads(routed.body)["stream_options"] == {"include_usage": True}, "the router asked for usage"
    [row] = recorded(router, 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (USAGE["prompt_tokens"], USAGE["completion_tokens"])
    assert row["stream"] is True and row["status"] == 200 and row["ttft_ms"] is not None


def test_a_stream_that_asks_for_usage_gets_it_as_the_runtime_sent_it(router: Router, client: openai.OpenAI,
                                                                      standin) -> None:
    runtime = standin("a", [MODEL])
    router.online_node("gpu-a", runtime.port, [MODEL])
    direct = openai.OpenAI(base_url=f"http://127.0.0.1:{runtime.port}/v1", api_key="unused", max_retries=0)
    options = {"include_usage": True}

    through = chunks_of(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options=options))
    alone = chunks_of(direct.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options=options))

    assert through == alone
    assert through[-1]["choices"] == [] and through[-1]["usage"]["total_tokens"] == USAGE["total_tokens"]
    routed, _ = runtime.inference_requests()
    assert json.loads(routed.body)["stream_options"] == options
    [row] = recorded(router, 1)
    assert row["completion_tokens"] == USAGE["completion_tokens"]


def test_whole_answers_and_embeddings_are_counted_by_key(router: Router, standin) -> None:
    runtime = standin("a", [MODEL, "embedder"])
    router.online_node("gpu-a", runtime.port, [MODEL, "embedder"])
    created = router.expect(201, "POST", "/v0/api-keys", {"name": "team-search", "scope": "inference"}, router.admin)
    client = sdk(router, created["key"])

    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.usage.total_tokens == USAGE["total_tokens"]
    client.embeddings.create(model="embedder", input="hello", encoding_format="float")

    rows = recorded(router, 2)
    assert [r["model"] for r in rows] == ["embedder", MODEL]
    assert all(r["principal"] == f"key:{created['id']}" and r["principal_name"] == "team-search" for r in rows)
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (2, 0)
    usage = router.expect(200, "GET", "/v0/usage?group_by=model", token=router.admin)
    assert usage["totals"]["requests"] == 2
    assert usage["totals"]["prompt_tokens"] == USAGE["prompt_tokens"] + 2


def test_a_key_over_its_limit_gets_the_sdks_rate_limit_error(router: Router, standin) -> None:
    runtime = standin("a", [MODEL])
    router.online_node("gpu-a", runtime.port, [MODEL])
    created = router.expect(201, "POST", "/v0/api-keys",
                            {"name": "tight", "scope": "inference", "limits": {"requests_per_minute": 1}}, router.admin)
    client = sdk(router, created["key"])

    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    reset = raw.headers["x-ratelimit-reset-requests"]
    if reset.endswith("ms") or reset in ("1s", "2s"):
        # The minute turns within two seconds: start again in the next one, so that both requests share a minute.
        time.sleep(2.5)
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    admitted = len(runtime.inference_requests())
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    try:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    except openai.RateLimitError as error:
        assert error.code == "rate_limit_exceeded"
        assert int(error.response.headers["retry-after"]) >= 1
    else:
        raise AssertionError("the second request of the minute was admitted")
    assert len(runtime.inference_requests()) == admitted, "the refused request reached no node"
