"""Deployments end to end (SPEC §15), with real parts only: the router, three agents `llm-node --manage-runtimes`, and
llama.cpp's server (llama-cpp-python, CPU) started by the agents themselves for a tiny GGUF model this test serves
over HTTP with its sha256. Nothing runs on the machines before the deployment: the router places the replicas, the
agents download the model, start the runtime, report it, and the official `openai` client is answered through the
router by each replica.

Shown here: 1, then 2, then 3 replicas answering; a runtime killed by its PID serving again within its start time +
5 s; scaling from 1 to 2 to 3 and a change of args that lose no request of a steady client; an agent stopped by
SIGTERM that leaves no runtime process behind. The time from `POST` to the first ready replica is printed, split into download,
start and the rest (placement, the agent hearing of it, its report).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest

import tiny_model
from harness import Router, sdk, wait_for
from test_llama_cpp import STAND_IN_NVIDIA_SMI, Process, binary, llama_python

# The GPU the stand-in `nvidia-smi` reports (an L4 with 22 GiB free): a replica asking for GPU memory runs on it.
GPU_UUID = "GPU-11a4e000-0000-0000-0000-000000000000"

MODEL = "tiny-deployed"
ARGS = ["--n_ctx", "512", "--n_threads", "1", "--seed", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for every purpose but its entry.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


class ModelServer:
    """Serves one directory over HTTP, as a model hub or an internal mirror would."""

    def __init__(self, directory: Path):
        handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(directory))  # noqa: E731
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


class SteadyClient:
    """Sends one small chat request after another until stopped; counts answers, failures and the nodes seen."""

    def __init__(self, client: openai.OpenAI):
        self.client = client
        self.answered = 0
        self.failures: list[str] = []
        self.nodes: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sent = 0
        while not self._stop.is_set():
            # Prompts that differ from their first byte: the cache-aware choice spreads them over the replicas.
            sent += 1
            try:
                raw = self.client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": f"{sent} Hi"}], max_tokens=2, temperature=0)
                raw.parse()
                self.nodes.add(raw.headers["x-llm-router-node"])
                self.answered += 1
            except Exception as error:  # every failure is what the test is about
                self.failures.append(repr(error))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict]:
    started: list = []
    try:
        models = tmp_path / "hub"
        models.mkdir()
        model = tiny_model.write(models / "tiny.gguf")
        sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
        hub = ModelServer(models)
        started.append(hub)

        data = tmp_path / "router"
        data.mkdir()
        # Heartbeats at the default interval: an agent hears of its assignments by waiting on the router for them,
        # and reports a replica's change of state early, not at its next heartbeat.
        router = Router(data)
        started.append(router)

        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "nvidia-smi").write_text(STAND_IN_NVIDIA_SMI)
        (bin_dir / "nvidia-smi").chmod(0o755)
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", LLM_NODE_LOG="info")
        agents = {}
        for name in ("deploy-a", "deploy-b", "deploy-c"):
            agent = Process(name, [
                str(binary("llm-node", "LLM_NODE_BIN")), "--router-url", router.url, "--name", name,
                "--state-dir", str(tmp_path / name), "--gpu-detection", "nvidia-smi", "--manage-runtimes",
                "--serve-port", str(free_port()), "--runtime-url", f"http://127.0.0.1:{free_port()}",
                "--llama-cpp-python", llama_python(),
            ], tmp_path / f"{name}.log", env)
            started.append(agent)
            agents[name] = agent

        yield {"router": router, "agents": agents, "source": f"{hub.url}/tiny.gguf", "sha256": sha256,
               "runtime_logs": tmp_path}
    finally:
        for process in reversed(started):
            process.stop()


def test_a_deployment_is_placed_downloaded_started_served_healed_scaled_rolled_and_stopped(fleet: dict) -> None:
    router: Router = fleet["router"]
    agents: dict[str, Process] = fleet["agents"]

    def logs() -> str:
        runtime_logs = [f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                        for p in sorted(fleet["runtime_logs"].glob("*/runtimes/*.log"))]
        return "\n".join([*(a.log() for a in agents.values()), *runtime_logs, f"--- router ---\n{router.log()}"])

    def pending_nodes() -> list | None:
        for agent in agents.values():
            agent.alive()
        nodes = router.expect(200, "GET", "/v0/nodes?status=pending", token=router.admin)
        return nodes if len(nodes) == 3 else None

    nodes = wait_for("the agents' machines to be pending", pending_nodes, timeout=30, context=logs)
    for node in nodes:
        # The agents say they start llama.cpp themselves: that is what makes them candidates.
        assert "managed:llama_cpp" in node["supported_runtimes"], node
        router.expect(200, "POST", f"/v0/nodes/{node['id']}/approve", token=router.admin)
    names = {node["id"]: node["machine_name"] for node in nodes}
    wait_for("the nodes' first heartbeats after approval",
             lambda: all(router.node(n)["status"] == "registering" and router.node(n).get("metrics") for n in names),
             timeout=30, context=logs)

    def deployment() -> dict:
        return router.expect(200, "GET", "/v0/deployments/tiny", token=router.admin)

    # One replica: from the POST to serving.
    posted = time.monotonic()
    router.expect(201, "POST", "/v0/deployments", {
        "name": "tiny", "model": MODEL, "source": fleet["source"], "sha256": fleet["sha256"],
        "runtime": "llama_cpp", "args": ARGS, "replicas": 1, "gpu_memory_bytes": 1 << 30,
    }, token=router.admin)
    ready = wait_for("the first replica ready", lambda: (d := deployment())["ready_replicas"] == 1 and d,
                     timeout=120, context=logs)
    to_ready = time.monotonic() - posted
    [replica] = ready["replica_states"]
    download_s, start_s = replica["download_ms"] / 1000, replica["start_ms"] / 1000
    print(f"\nPOST to first ready replica: {to_ready:.2f} s = download {download_s:.2f} s + start {start_s:.2f} s "
          f"+ placement, assignment and report {to_ready - download_s - start_s:.2f} s")
    assert replica["state"] == "ready" and replica["revision"] == 1 and replica["pid"] > 0
    first_node = replica["node_id"]
    # The agent chose the node's GPU for it and showed the runtime that GPU alone.
    assert replica["gpus"] == [0], replica
    environ = Path(f"/proc/{replica['pid']}/environ").read_bytes().split(b"\0")
    assert f"CUDA_VISIBLE_DEVICES={GPU_UUID}".encode() in environ

    client = sdk(router, router.api_key("inference"), timeout=60)
    wait_for("the model listed on /v1", lambda: MODEL in [m.id for m in client.models.list()], timeout=10,
             context=logs)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
    assert raw.headers["x-llm-router-node"] == first_node
    assert raw.parse().choices[0].finish_reason == "length"

    # A runtime killed by its PID serves again within its start time + 5 s.
    os.kill(replica["pid"], signal.SIGKILL)
    killed = time.monotonic()

    def serving_again() -> bool:
        state = deployment()["replica_states"][0]
        if state["restarts"] < 1 or state["state"] != "ready":
            return False
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        return True

    wait_for("the killed runtime to serve again", serving_again, timeout=start_s + 30, context=logs)
    healed = time.monotonic() - killed
    print(f"killed runtime serving again after {healed:.2f} s (start time {start_s:.2f} s)")
    assert healed <= start_s + 5, f"{healed:.2f} s to serve again, start time {start_s:.2f} s"

    # Scaling from 1 to 2, then to 3, under a steady client: nothing lost, and every replica answers.
    steady = SteadyClient(sdk(router, router.api_key("inference"), timeout=60))
    try:
        wait_for("the steady client's first answers", lambda: steady.answered >= 3, timeout=30, context=logs)
        for count in (2, 3):
            router.expect(200, "PATCH", "/v0/deployments/tiny", {"replicas": count}, token=router.admin)
            scaled = wait_for(f"{count} replicas ready", lambda: (d := deployment())["ready_replicas"] == count and d,
                              timeout=120, context=logs)
            placed = {r["node_id"] for r in scaled["replica_states"]}
            assert len(placed) == count and first_node in placed, f"one replica per node: {scaled}"
            wait_for(f"{count} replicas answering the steady client", lambda: placed <= steady.nodes, timeout=30,
                     context=logs)
        assert steady.nodes == set(names)

        # A change of args: a new revision, rolled out with each new runtime ready before the old one stops.
        before = steady.answered
        changed = router.expect(200, "PATCH", "/v0/deployments/tiny", {"args": [*ARGS, "--n_batch", "256"]},
                                token=router.admin)
        assert changed["revision"] == 2
        rolled = wait_for("every replica ready at revision 2",
                          lambda: (d := deployment())["ready_replicas"] == 3
                          and all(r["revision"] == 2 for r in d["replica_states"]) and d,
                          timeout=120, context=logs)
        old_pids = {r["pid"] for r in scaled["replica_states"]}
        new_pids = {r["pid"] for r in rolled["replica_states"]}
        assert not old_pids & new_pids, "every runtime was started anew with the new args"
        wait_for("the old runtimes stopped", lambda: not any(alive(pid) for pid in old_pids), timeout=30,
                 context=logs)
        wait_for("answers from the new runtimes", lambda: steady.answered >= before + 5, timeout=30, context=logs)
    finally:
        steady.stop()
    assert steady.failures == [], f"{len(steady.failures)} of {steady.answered} requests failed: {steady.failures[:3]}"
    print(f"steady client: {steady.answered} answers, none lost, through scaling from 1 to 3 and a change of args")

    # An agent stopped by SIGTERM leaves no runtime behind.
    pids = {r["node_id"]: r["pid"] for r in deployment()["replica_states"]}
    victim = next(name for node, name in names.items() if node == first_node)
    agents[victim].process.send_signal(signal.SIGTERM)
    agents[victim].process.wait(timeout=30)
    assert agents[victim].process.returncode == 0, agents[victim].log()
    assert not alive(pids[first_node]), "the runtime outlived its agent"
