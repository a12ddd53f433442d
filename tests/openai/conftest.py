"""Fixtures of the `openai` client tests: a real router per test (stopped after it), stand-in runtimes made into
online nodes, and clients of the official SDK pointed at the router's /v1 with an `inference` key."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import openai
import pytest

from harness import Router, sdk
from standin import StandIn

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


@pytest.fixture
def client(router: Router) -> openai.OpenAI:
    return sdk(router, router.api_key("inference"))
