"""The official `openai` client, pointed at the router with an `inference` key, gets what the node's runtime
answered: chat (whole and streamed), completions, embeddings, the model list and one model."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai

from harness import Router, sdk
from standin import EMBEDDING, REPLY, REPLY_PIECES

MODEL = "llama-3-8b"
NODE_HEADER = "x-llm-router-node"


def test_chat_reaches_the_node_and_says_which(router: Router, client: openai.OpenAI, standin) -> None:
    runtime = standin("a", [MODEL])
    node_id = router.online_node("gpu-a", runtime.port, [MODEL])

    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5)
    reply = raw.parse()
    assert reply.choices[0].message.content == REPLY
    assert reply.model == MODEL
    assert raw.headers[NODE_HEADER] == node_id

    [seen] = runtime.inference_requests()
    assert seen.path == "/v1/chat/completions"
    assert json.loads(seen.body)["messages"] == [{"role": "user", "content": "Hello"}]
    # The application's key is the router's business: it is not passed on to the runtime.
    assert "authorization" not in seen.headers


def test_the_body_reaches_the_runtime_byte_for_byte(router: Router, standin) -> None:
    runtime = standin("a", [MODEL])
    router.online_node("gpu-a", runtime.port, [MODEL])
    sent: list[bytes] = []

    def remember(request: httpx.Request) -> None:
        sent.append(request.read())

    client = sdk(router, router.api_key(), http_client=httpx.Client(event_hooks={"request": [remember]}))
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "caf\u00e9 \u2615"}], temperature=0.25,
        extra_body={"x_vendor_field": {"nested": [1, 2.5, None]}})

    [seen] = runtime.inference_requests()
    assert len(sent) == 1 and sent[0]
    assert seen.body == sent[0]


def test_a_streamed_chat_arrives_piece_by_piece_and_ends(router: Router, client: openai.OpenAI, standin) -> None:
    runtime = standin("a", [MODEL])
    node_id = router.online_node("gpu-a", runtime.port, [MODEL])

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True)
    assert stream.response.headers[NODE_HEADER] == node_id
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    chunks = list(stream)

    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert pieces == REPLY_PIECES
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert json.loads(runtime.inference_requests()[0].body)["stream"] is True


def test_each_piece_is_passed_on_as_soon_as_the_runtime_sends_it(router: Router, client: openai.OpenAI,
                                                                 standin) -> None:
    runtime = standin("a", [MODEL])
    router.online_node("gpu-a", runtime.port, [MODEL])
    runtime.stream = "hold"

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True, timeout=10)
    chunks = iter(stream)
    # The runtime holds the rest back until released: the first piece can only be here if the router passed it on
    # alone (were it buffering, this read would time out).
    first = next(chunks)
    assert first.choices[0].delta.content == REPLY_PIECES[0]
    assert not runtime.released.is_set()
    runtime.release()
    rest = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert rest == REPLY_PIECES[1:]


def test_completions(router: Router, client: openai.OpenAI, standin) -> None:
    runtime = standin("a", [MODEL])
    node_id = router.online_node("gpu-a", runtime.port, [MODEL])

    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert raw.parse().choices[0].text == REPLY
    assert raw.headers[NODE_HEADER] == node_id
    [seen] = runtime.inference_requests()
    assert seen.path == "/v1/completions"
    assert json.loads(seen.body)["prompt"] == "Once upon a time"


def test_embeddings_as_floats_and_as_base64(router: Router, client: openai.OpenAI, standin) -> None:
    runtime = standin("a", ["embedder"])
    node_id = router.online_node("gpu-a", runtime.port, ["embedder"])

    # The SDK asks for base64 by default and decodes it itself.
    raw = client.embeddings.with_raw_response.create(model="embedder", input="hello")
    assert raw.parse().data[0].embedding == EMBEDDING
    assert raw.headers[NODE_HEADER] == node_id
    floats = client.embeddings.create(model="embedder", input=["hello"], encoding_format="float")
    assert floats.data[0].embedding == EMBEDDING
    formats = [json.loads(r.body).get("encoding_format") for r in runtime.inference_requests()]
    assert formats == ["base64", "float"]
    assert {r.path for r in runtime.inference_requests()} == {"/v1/embeddings"}


def test_models_lists_what_online_nodes_have_ready(router: Router, client: openai.OpenAI, standin) -> None:
    a = standin("a", [MODEL, "qwen2"])
    b = standin("b", [MODEL, "mistral"])
    router.online_node("gpu-a", a.port, [MODEL, "qwen2"])
    router.online_node("gpu-b", b.port, [MODEL, "mistral"])

    models = client.models.list()
    ids = [m.id for m in models]
    assert sorted(ids) == sorted([MODEL, "qwen2", "mistral"])
    assert all(m.object == "model" for m in models)

    one = client.models.retrieve("qwen2")
    assert one.id == "qwen2" and one.object == "model"


def test_models_leaves_out_nodes_that_cannot_take_traffic(router: Router, client: openai.OpenAI, standin) -> None:
    a = standin("a", ["qwen2"])
    node_id = router.online_node("gpu-a", a.port, ["qwen2"])
    # Registered but never approved: pending, its models are nobody's business yet.
    pending_id, pending_token = router.register("gpu-pending", standin("p", ["secret-model"]).port)
    assert router.heartbeat(pending_id, pending_token, ["secret-model"]) == "pending"
    assert [m.id for m in client.models.list()] == ["qwen2"]

    router.expect(200, "POST", f"/v0/nodes/{node_id}/cordon", token=router.admin)
    assert [m.id for m in client.models.list()] == []
