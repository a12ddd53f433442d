"""Nodes that fail, hang or break off, and clients that leave, as the official client sees them: a failure before the
first byte is retried on another node and the call succeeds; a failing node is ejected; a stream cut off by its node
raises in the SDK; a client that closes its stream stops the node's work."""

from __future__ import annotations

import itertools
import time

import httpx2 as httpx
import openai
import pytest

from harness import Router, sdk, wait_for
from standin import REPLY, REPLY_PIECES

MODEL = "llama-3-8b"
HELLO = [{"role": "user", "content": "Hello"}]
# Each call asks something else, as a chat application's users do: under the default cache-aware routing, calls with
# one and the same prompt would all go to the node that prompt ranks first, and never reach the node under test.
QUESTIONS = itertools.count()


def question() -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Hello, question {next(QUESTIONS)}"}]
NODE_HEADER = "x-llm-router-node"
# Requests to send until the random choice among two nodes has picked a given one at least once: each request
# picks it with probability 1/2, so not once in this many is 2^-40.
ENOUGH_TRIES = 40


def call(client: openai.OpenAI, stream: bool) -> tuple[str, str]:
    """One chat call, whole or streamed: (the node that answered, the text)."""
    if stream:
        chunks = client.chat.completions.create(model=MODEL, messages=question(), stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        return chunks.response.headers[NODE_HEADER], text
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=question())
    return raw.headers[NODE_HEADER], raw.parse().choices[0].message.content


def test_a_502_is_retried_on_another_node_then_the_node_is_ejected(router: Router, client: openai.OpenAI,
                                                                   standin) -> None:
    failing, healthy = standin("failing", [MODEL]), standin("healthy", [MODEL])
    failing.mode, failing.fail_status = "status", 502
    failing_id = router.online_node("gpu-failing", failing.port, [MODEL])
    healthy_id = router.online_node("gpu-healthy", healthy.port, [MODEL])

    # Three failures in a row eject a node; every call meanwhile succeeds on the healthy one.
    for i in range(ENOUGH_TRIES * 3):
        if len(failing.inference_requests()) >= 3:
            break
        assert call(client, stream=i % 2 == 1) == (healthy_id, REPLY)
    assert len(failing.inference_requests()) == 3

    routing = router.node(failing_id)["routing"]
    assert routing["ejected_until"] is not None, routing
    assert routing["failures_total"] == 3 and routing["in_flight"] == 0
    assert router.node(failing_id)["status"] == "online"
    # Ejected for 5 s: the next calls go to the healthy node without trying the failing one.
    for _ in range(5):
        assert call(client, stream=False) == (healthy_id, REPLY)
    assert len(failing.inference_requests()) == 3


def test_a_node_that_sends_no_headers_in_time_is_retried_elsewhere(start_router, standin) -> None:
    router = start_router("--upstream-header-timeout-secs", "1")
    hanging, healthy = standin("hanging", [MODEL]), standin("healthy", [MODEL])
    hanging.mode = "hang"
    hanging_id = router.online_node("gpu-hanging", hanging.port, [MODEL])
    healthy_id = router.online_node("gpu-healthy", healthy.port, [MODEL])
    client = sdk(router, router.api_key())

    for _ in range(ENOUGH_TRIES):
        started = time.monotonic()
        assert call(client, stream=False) == (healthy_id, REPLY)
        if hanging.inference_requests():
            # The call waited for the hanging node's headers (1 s), then got its answer elsewhere.
            assert time.monotonic() - started >= 1.0
            break
    assert len(hanging.inference_requests()) == 1
    assert router.node(hanging_id)["routing"]["failures_total"] == 1


def test_a_stream_the_node_breaks_off_raises_in_the_client(router: Router, client: openai.OpenAI,
                                                           standin) -> None:
    runtime = standin("a", [MODEL])
    node_id = router.online_node("gpu-a", runtime.port, [MODEL])
    runtime.stream = "reset"

    stream = client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.content == REPLY_PIECES[0]
    # After the first byte nothing is retried: the client must learn that the answer is cut short, not see a
    # stream that merely ended.
    with pytest.raises((httpx.TransportError, openai.APIError)):
        for _ in chunks:
            pass
    assert len(runtime.inference_requests()) == 1
    routing = wait_for("the cut-off stream counted as the node's failure",
                       lambda: (r := router.node(node_id)["routing"])["failures_total"] == 1 and r)
    assert routing["in_flight"] == 0


def test_a_client_that_closes_its_stream_stops_the_node(router: Router, client: openai.OpenAI, standin) -> None:
    runtime = standin("a", [MODEL])
    node_id = router.online_node("gpu-a", runtime.port, [MODEL])
    runtime.stream = "endless"

    stream = client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    chunks = iter(stream)
    for _ in range(3):
        assert next(chunks).choices[0].delta.content
    assert router.node(node_id)["routing"]["in_flight"] == 1
    stream.close()

    wait_for("the stand-in to see its reader gone", runtime.reader_gone.is_set)
    wait_for("the request to leave the node's in-flight count",
             lambda: router.node(node_id)["routing"]["in_flight"] == 0)
    assert len(runtime.inference_requests()) == 1


def test_a_client_that_gives_up_waiting_stops_the_node(router: Router, standin) -> None:
    runtime = standin("a", [MODEL])
    node_id = router.online_node("gpu-a", runtime.port, [MODEL])
    runtime.mode = "hang"
    client = sdk(router, router.api_key(), timeout=0.5)

    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=MODEL, messages=HELLO)
    # The router drops the request to the node as soon as its client has gone, long before its own header timeout.
    wait_for("the stand-in to see the router close the request", runtime.reader_gone.is_set)
    wait_for("the request to leave the node's in-flight count",
             lambda: router.node(node_id)["routing"]["in_flight"] == 0)
    assert len(runtime.inference_requests()) == 1
