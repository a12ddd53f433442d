"""Capacity limits as the official client sees them: with every node of a model at its `max_concurrency` and no
room to wait (`--max-queued 0`), a request is a rate-limit error; once a place frees up, calls go through again."""

from __future__ import annotations

import time

import openai
import pytest

from harness import sdk, wait_for
from standin import REPLY, REPLY_PIECES

MODEL = "llama-3-8b"
HELLO = [{"role": "user", "content": "Hello"}]


def test_a_full_node_with_no_queue_is_a_rate_limit_error(start_router, standin) -> None:
    router = start_router("--max-queued", "0")
    runtime = standin("a", [MODEL])
    node_id = router.online_node("gpu-a", runtime.port, [MODEL])
    node = router.expect(200, "PATCH", f"/v0/nodes/{node_id}", {"max_concurrency": 1}, router.admin)
    assert node["max_concurrency"] == 1
    client = sdk(router, router.api_key())

    # One stream takes the node's only place and keeps it while the runtime holds the rest back.
    runtime.stream = "hold"
    held = client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    chunks = iter(held)
    assert next(chunks).choices[0].delta.content == REPLY_PIECES[0]
    assert router.node(node_id)["routing"]["in_flight"] == 1

    with pytest.raises(openai.RateLimitError) as error:
        client.chat.completions.create(model=MODEL, messages=HELLO)
    assert error.value.status_code == 429
    assert error.value.code == "over_capacity"
    assert error.value.response.headers["retry-after"] == "1"
    assert len(runtime.inference_requests()) == 1

    runtime.release()
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(REPLY_PIECES[1:])
    wait_for("the node's place to free up", lambda: router.node(node_id)["routing"]["in_flight"] == 0)
    assert client.chat.completions.create(model=MODEL, messages=HELLO).choices[0].message.content == REPLY


def test_a_request_that_waited_its_time_in_the_queue_is_a_rate_limit_error(start_router, standin) -> None:
    router = start_router("--max-queued", "4", "--queue-timeout-ms", "300")
    runtime = standin("a", [MODEL])
    node_id = router.online_node("gpu-a", runtime.port, [MODEL])
    router.expect(200, "PATCH", f"/v0/nodes/{node_id}", {"max_concurrency": 1}, router.admin)
    client = sdk(router, router.api_key())

    runtime.stream = "hold"
    held = client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    assert next(iter(held)).choices[0].delta.content == REPLY_PIECES[0]

    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as error:
        client.chat.completions.create(model=MODEL, messages=HELLO)
    assert time.monotonic() - started >= 0.3
    assert error.value.code == "over_capacity"
    assert len(runtime.inference_requests()) == 1
    runtime.release()
    held.close()
