"""End to end with a real runtime: the router, the agent `llm-node` and llama.cpp's server (llama-cpp-python, CPU)
serving a tiny model this test writes. The agent registers the machine, an admin approves it, its heartbeats bring
the model online, and the official `openai` client chats through the router: streamed and whole.

The runtime's Python is `$LLAMA_CPP_PYTHON` (scripts/test.sh builds it and sets it); GPUs come from a stand-in
`nvidia-smi`, since the agent announces only machines with a GPU and this one has none.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

import tiny_model
from harness import Router, binary, sdk, wait_for

MODEL = "tiny-llama"
MAX_TOKENS = 8
# Answers the columns it is asked for, as the real one does: the health columns (uuid, uncorrectable ECC count,
# power, throttle reasons) when the query names them, the six basic ones otherwise.
STAND_IN_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *uuid*) echo "0, NVIDIA L4, 23034, 512, 3, 40, GPU-11a4e000-0000-0000-0000-000000000000, 0, 16.52, 0x0000000000000000" ;;
  *) echo "0, NVIDIA L4, 23034, 512, 3, 40" ;;
esac
"""


def llama_python() -> str:
    path = os.environ.get("LLAMA_CPP_PYTHON")
    if not path:
        raise AssertionError("set LLAMA_CPP_PYTHON to a Python with llama-cpp-python[server] "
                             "(scripts/test.sh builds one and sets it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


class Process:
    """A child process whose output goes to a log file, stopped with SIGTERM (then SIGKILL) by `stop()`."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return f"--- {self.name} ---\n{self.log_path.read_text(errors='replace')}"

    def alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}\n{self.log()}")
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict]:
    """A router, llama.cpp's server with the tiny model, and the agent beside it, all running."""
    started: list = []
    try:
        model = tiny_model.write(tmp_path / "tiny.gguf")
        assert model.stat().st_size < 512 * 1024

        data = tmp_path / "router"
        data.mkdir()
        # The reachability probe stays on: the agent's registration is checked against the real runtime.
        router = Router(data, "--heartbeat-interval-secs", "1")
        started.append(router)

        port = free_port()
        runtime = Process("llama-cpp-python", [
            llama_python(), "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "2", "--seed", "1",
        ], tmp_path / "runtime.log")
        started.append(runtime)
        runtime_url = f"http://127.0.0.1:{port}"
        wait_for("llama.cpp's server to list the model",
                 lambda: runtime.alive() and get_json(f"{runtime_url}/v1/models"), timeout=60, context=runtime.log)

        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "nvidia-smi").write_text(STAND_IN_NVIDIA_SMI)
        (bin_dir / "nvidia-smi").chmod(0o755)
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", LLM_NODE_LOG="info")
        agent = Process("llm-node", [
            str(binary("llm-node", "LLM_NODE_BIN")), "--router-url", router.url, "--runtime-url", runtime_url,
            "--name", "llama-e2e", "--state-dir", str(tmp_path / "state"), "--gpu-detection", "nvidia-smi",
        ], tmp_path / "agent.log", env)
        started.append(agent)

        yield {"router": router, "runtime": runtime, "runtime_url": runtime_url, "agent": agent}
    finally:
        for process in reversed(started):
            process.stop()


def runtime_version() -> str:
    out = subprocess.run([llama_python(), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_openai_client_chats_with_llama_cpp_through_the_router(fleet: dict) -> None:
    router: Router = fleet["router"]
    agent: Process = fleet["agent"]

    def logs() -> str:
        return "\n".join([agent.log(), fleet["runtime"].log(), f"--- router ---\n{router.log()}"])

    def pending_nodes() -> list | None:
        agent.alive()
        return router.expect(200, "GET", "/v0/nodes?status=pending", token=router.admin) or None

    pending = wait_for("the agent's machine to be pending", pending_nodes, timeout=30, context=logs)
    [node] = pending
    assert node["machine_name"] == "llama-e2e"
    router.expect(200, "POST", f"/v0/nodes/{node['id']}/approve", token=router.admin)
    # Online with the model ready can come from the registration and the approval alone; the GPU figures come with
    # the agent's first heartbeat after it, a second later: wait for those too.
    node = wait_for("the node online with the model ready and its heartbeat's figures",
                    lambda: (n := router.node(node["id"]))["status"] == "online" and MODEL in n["ready_models"]
                    and n.get("metrics") and n,
                    timeout=30, context=logs)

    # What the agent found out about the runtime by itself.
    assert node["supported_runtimes"] == ["llama_cpp_python"]
    assert node["runtime_version"] == runtime_version()
    uuid = "GPU-11a4e000-0000-0000-0000-000000000000"
    assert node["gpu_devices"] == [
        {"model": "NVIDIA L4", "count": 1, "memory_bytes": 23034 * 1024 * 1024, "uuids": [uuid]}]
    # Its GPU's health reached the router too, and it is healthy: no condition.
    [gpu] = node["metrics"]["gpus"]
    assert (gpu["uuid"], gpu["ecc_uncorrected"], gpu["power_watts"]) == (uuid, 0, 16.52)
    assert node["conditions"] == []
    # llama-cpp-python's server has no /metrics (404): heartbeats carry no runtime load.
    assert "load" not in node["metrics"]

    client = sdk(router, router.api_key("inference"), timeout=60)
    assert [m.id for m in client.models.list()] == [MODEL]

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=MAX_TOKENS, temperature=0,
        stream=True)
    assert stream.response.headers["x-llm-router-node"] == node["id"]
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    chunks = list(stream)
    # A first chunk naming the role, at least one more, and a last one that says why the answer ended: the stream
    # ran to its end marker, or the SDK would have raised.
    assert len(chunks) >= 2, chunks
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)

    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=MAX_TOKENS, temperature=0)
    assert raw.headers["x-llm-router-node"] == node["id"]
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.choices[0].finish_reason == "length"
    # llama-cpp-python may count a few more tokens than it was asked for (it finishes a character split over byte
    # tokens), never fewer when the answer ended on length.
    assert reply.usage is not None and reply.usage.completion_tokens >= MAX_TOKENS

    completion = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=MAX_TOKENS, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens >= MAX_TOKENS

    # The same stream as the bytes on the wire: events, then the end marker, then the end of the body.
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=MAX_TOKENS, temperature=0,
            stream=True) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["object"] for e in events[:-1]] == ["chat.completion.chunk"] * (len(events) - 1)
    assert len(events) - 1 == len(chunks)

    routing = wait_for("the last answer's end to leave the node's in-flight count",
                       lambda: (r := router.node(node["id"])["routing"])["in_flight"] == 0 and r)
    assert routing["requests_total"] == 4 and routing["failures_total"] == 0

    # Usage as the router recorded it (SPEC §14): the whole answers' tokens are the runtime's own `usage`; this
    # runtime's streams carry no usage even when asked (llama-cpp-python ignores `stream_options`), so theirs are
    # unknown, never guessed.
    def recorded() -> list | None:
        rows = router.expect(200, "GET", "/v0/usage/requests", token=router.admin)
        return rows if len(rows) >= 4 else None

    rows = wait_for("four usage records", recorded, timeout=5)
    assert len(rows) == 4 and all(r["node"] == node["id"] and r["status"] == 200 for r in rows)
    chat_row = [r for r in rows if not r["stream"]][1]
    assert (chat_row["prompt_tokens"], chat_row["completion_tokens"]) == (
        reply.usage.prompt_tokens, reply.usage.completion_tokens)
    completion_row = [r for r in rows if not r["stream"]][0]
    assert completion_row["completion_tokens"] == completion.usage.completion_tokens
    streamed = [r for r in rows if r["stream"]]
    assert len(streamed) == 2 and all(r["prompt_tokens"] is None and r["ttft_ms"] is not None for r in streamed)
