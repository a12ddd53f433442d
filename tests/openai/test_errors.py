"""What goes wrong reaches the official client as the SDK's own exceptions, with the status and OpenAI error code
the router chose: no or wrong key, unknown model, no node that can take the model now, a bad body; and a node's own
error answer comes through unchanged."""

from __future__ import annotations

import httpx2 as httpx
import openai
import pytest

from harness import Router, sdk

MODEL = "llama-3-8b"
HELLO = [{"role": "user", "content": "Hello"}]


def test_no_key_or_a_wrong_one_is_an_authentication_error(router: Router, standin) -> None:
    runtime = standin("a", [MODEL])
    router.online_node("gpu-a", runtime.port, [MODEL])

    wrong = sdk(router, "llmk_" + "0" * 40)
    with pytest.raises(openai.AuthenticationError) as error:
        wrong.chat.completions.create(model=MODEL, messages=HELLO)
    assert error.value.status_code == 401
    assert error.value.code == "invalid_api_key"

    no_key = sdk(router, "unused")
    with pytest.raises(openai.AuthenticationError) as error:
        no_key.models.list(extra_headers={"Authorization": openai.Omit()})
    assert error.value.status_code == 401
    assert "authorization" not in {name.lower() for name in error.value.request.headers}

    assert runtime.inference_requests() == []


def test_an_inference_key_is_refused_on_the_admin_api(router: Router, client: openai.OpenAI) -> None:
    key = router.api_key("inference")
    assert router.call("GET", "/v0/nodes", token=key).status in (401, 403)
    assert client.models.list().data == []


def test_an_unknown_model_is_not_found(router: Router, client: openai.OpenAI, standin) -> None:
    runtime = standin("a", [MODEL])
    router.online_node("gpu-a", runtime.port, [MODEL])

    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert error.value.status_code == 404
    assert error.value.code == "model_not_found"
    assert "no-such-model" in error.value.message

    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("no-such-model")
    assert error.value.code == "model_not_found"
    assert runtime.inference_requests() == []


def test_a_model_whose_nodes_are_all_cordoned_is_unavailable(router: Router, client: openai.OpenAI,
                                                             standin) -> None:
    runtime = standin("a", [MODEL])
    node_id = router.online_node("gpu-a", runtime.port, [MODEL])
    router.expect(200, "POST", f"/v0/nodes/{node_id}/cordon", token=router.admin)

    with pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(model=MODEL, messages=HELLO)
    assert error.value.status_code == 503
    assert error.value.code == "no_available_node"
    assert error.value.response.headers["retry-after"] == "2"
    assert runtime.inference_requests() == []

    router.expect(200, "POST", f"/v0/nodes/{node_id}/uncordon", token=router.admin)
    assert client.chat.completions.create(model=MODEL, messages=HELLO).choices[0].message.content


def test_a_model_whose_every_try_failed_is_unavailable(start_router, standin) -> None:
    router = start_router("--max-retries", "1")
    a, b = standin("a", [MODEL]), standin("b", [MODEL])
    for runtime in (a, b):
        runtime.mode, runtime.fail_status = "status", 503
    router.online_node("gpu-a", a.port, [MODEL])
    router.online_node("gpu-b", b.port, [MODEL])

    client = sdk(router, router.api_key())
    with pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(model=MODEL, messages=HELLO)
    assert error.value.status_code == 503
    assert error.value.code == "no_available_node"
    # One try and one retry, on the two nodes.
    assert len(a.inference_requests()) == 1 and len(b.inference_requests()) == 1


def test_a_bad_body_is_a_bad_request(router: Router, client: openai.OpenAI, standin) -> None:
    runtime = standin("a", [MODEL])
    router.online_node("gpu-a", runtime.port, [MODEL])

    with pytest.raises(openai.BadRequestError) as error:
        client.post("/chat/completions", body={"messages": HELLO}, cast_to=httpx.Response)
    assert error.value.status_code == 400
    assert error.value.code == "invalid_request"

    with pytest.raises(openai.BadRequestError) as error:
        client.post("/chat/completions", content=b"{not json", cast_to=httpx.Response,
                    options={"headers": {"Content-Type": "application/json"}})
    assert error.value.status_code == 400
    assert runtime.inference_requests() == []


def test_a_node_error_that_is_not_retried_comes_through_unchanged(router: Router, client: openai.OpenAI,
                                                                  standin) -> None:
    runtime = standin("a", [MODEL])
    node_id = router.online_node("gpu-a", runtime.port, [MODEL])
    runtime.mode, runtime.fail_status = "status", 500

    with pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(model=MODEL, messages=HELLO)
    assert error.value.status_code == 500
    assert error.value.code == "stand_in"
    assert error.value.message.endswith("a fails on purpose")
    assert error.value.response.headers["x-llm-router-node"] == node_id
    assert len(runtime.inference_requests()) == 1

    runtime.fail_status = 422
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client.chat.completions.create(model=MODEL, messages=HELLO)
    assert error.value.code == "stand_in"
    assert len(runtime.inference_requests()) == 2
