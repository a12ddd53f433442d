"""Fixtures of the `openai` client tests: a real router per test (stopped after it), stand-in runtimes made into
online nodes, and clients of the official SDK pointed at the router's /v1 with an `inference` key."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import openai
import pytest

from harness import Router
from standin import StandIn

# Every call of these tests ends well within this; a request the router should have answered and did not fails
# the test instead of hanging it.
CLIENT_TIMEOUT_S = 20


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    """Start a router with extra `serve` flags (the reachability probe is off: stand-ins register by hand)."""
    routers: list[Router] = []

    def start(*args: str) -> Router:
        data = tmp_path / f"router-{len(routers)}"
        data.mkdir()
        router = Router(data, "--no-reachability-check", *args)
        routers.append(router)
        return router

    yield start
    for router in routers:
        router.stop()


@pytest.fixture
def router(start_router: Callable[..., Router]) -> Router:
    return start_router()


@pytest.fixture
def standin() -> Iterator[Callable[..., StandIn]]:
    """Start a stand-in runtime serving `models`."""
    runtimes: list[StandIn] = []

    def start(name: str, models: list[str]) -> StandIn:
        runtime = StandIn(name, models)
        runtimes.append(runtime)
        return runtime

    yield start
    for runtime in runtimes:
        runtime.stop()


def sdk(router: Router, key: str, **options: object) -> openai.OpenAI:
    """The official client at the router's /v1, without the SDK's own retries (the router's are under test)."""
    options.setdefault("max_retries", 0)
    options.setdefault("timeout", CLIENT_TIMEOUT_S)
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key=key, **options)


@pytest.fixture
def client(router: Router) -> openai.OpenAI:
    return sdk(router, router.api_key("inference"))
