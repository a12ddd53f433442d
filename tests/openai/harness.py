"""The real router binary, started on 127.0.0.1:0 with a data directory of its own, the admin calls the Python
suites make on it (sign in, API keys, registering, approving and heartbeating nodes), and the official client
pointed at its /v1.

Nothing here sleeps hoping something happened: every wait polls with a deadline (`wait_for`) and fails saying what
it waited for.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

import openai

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

# The line the router prints once it listens (`llm_router::app::LISTENING_ON`, then the address).
LISTENING_ON = "llm-router listening on "

# What a registration announces about the machine: the router refuses a machine without a GPU.
ONE_GPU = [{"model": "NVIDIA H100 80GB HBM3", "count": 1, "memory_bytes": 85899345920}]

# Every call of these tests ends well within this; a request the router should have answered and did not fails
# the test instead of hanging it.
CLIENT_TIMEOUT_S = 20


def binary(name: str, env_var: str) -> Path:
    """A built binary of the workspace: `$env_var`, else target/debug/`name`."""
    path = Path(os.environ.get(env_var) or ROOT / "target" / "debug" / name)
    if not path.is_file():
        raise AssertionError(f"{path} is missing: run `cargo build -p {name}` first (or set {env_var})")
    return path


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 10.0, context: Callable[[], str] = str) -> T:
    """Call `check` every 50 ms until it returns something other than None or False; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}\n{context()}")
        time.sleep(0.05)


class Answer:
    """An answer of the router's own API: status, headers and the JSON body (None when there is none)."""

    def __init__(self, status: int, headers: Any, body: bytes):
        self.status = status
        self.headers = headers
        self.json = json.loads(body) if body else None

    def __repr__(self) -> str:
        return f"HTTP {self.status} {self.json}"


class Router:
    """A running `llm-router serve`, stopped by `stop()`."""

    def __init__(self, data_dir: Path, *args: str):
        self.data_dir = data_dir
        self.password = secrets.token_hex(12)
        self.log_path = data_dir / "router.log"
        env = dict(os.environ, LLM_ROUTER_ADMIN_PASSWORD=self.password, LLM_ROUTER_LOG="warn")
        command = [str(binary("llm-router", "LLM_ROUTER_BIN")), "serve", "--listen", "127.0.0.1:0"]
        command += ["--data-dir", str(data_dir), *args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            self.url = wait_for("the router's listening line", self._listening, context=self.log)
            self.admin = self.login("admin", self.password)
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> str | None:
        if self.process.poll() is not None:
            raise AssertionError(f"the router exited with {self.process.returncode}:\n{self.log()}")
        for line in self.log().splitlines():
            if line.startswith(LISTENING_ON):
                return line[len(LISTENING_ON) :].strip()
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def call(self, method: str, path: str, body: Any = None, token: str | None = None,
             headers: dict[str, str] | None = None) -> Answer:
        """One request to the router; any status is an answer, never an exception."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return Answer(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            return Answer(error.code, error.headers, error.read())

    def expect(self, status: int, method: str, path: str, body: Any = None, token: str | None = None,
               headers: dict[str, str] | None = None) -> Any:
        """`call`, asserting the status; the JSON body."""
        answer = self.call(method, path, body, token, headers)
        assert answer.status == status, f"{method} {path}: expected {status}, got {answer}"
        return answer.json

    def login(self, username: str, password: str) -> str:
        return self.expect(200, "POST", "/v0/auth/login", {"username": username, "password": password})["token"]

    def api_key(self, scope: str = "inference") -> str:
        """A new API key of `scope`, made by the admin."""
        key = self.expect(201, "POST", "/v0/api-keys", {"name": f"python-{scope}", "scope": scope}, self.admin)
        return key["key"]

    def register(self, name: str, port: int) -> tuple[str, str]:
        """Register a node as its agent would, with its runtime at 127.0.0.1:`port`: (node id, node token)."""
        body = {"machine_name": name, "ip_address": "127.0.0.1", "runtime_port": port,
                "runtime_version": "stand-in", "gpu_devices": ONE_GPU}
        answer = self.expect(201, "POST", "/v0/nodes", body)
        return answer["node_id"], answer["node_token"]

    def heartbeat(self, node_id: str, token: str, models: list[str]) -> str:
        body = {"node_id": node_id, "cpu_usage": 1.0, "memory_usage": 1.0, "ready_models": models,
                "loaded_models": models}
        return self.expect(200, "POST", "/v0/health", body, headers={"X-Node-Token": token})["status"]

    def online_node(self, name: str, port: int, models: list[str]) -> str:
        """A node registered, approved and heartbeating with `models` ready, so that it is `online`: its id."""
        node_id, token = self.register(name, port)
        self.expect(200, "POST", f"/v0/nodes/{node_id}/approve", token=self.admin)
        assert self.heartbeat(node_id, token, models) == "online"
        return node_id

    def node(self, node_id: str) -> dict[str, Any]:
        return self.expect(200, "GET", f"/v0/nodes/{node_id}", token=self.admin)


def sdk(router: Router, key: str, **options: Any) -> openai.OpenAI:
    """The official client at the router's /v1, without the SDK's own retries (the router's are under test)."""
    options.setdefault("max_retries", 0)
    options.setdefault("timeout", CLIENT_TIMEOUT_S)
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key=key, **options)
