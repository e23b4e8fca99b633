"""Shared fixtures: engines in real processes, stopped after each test."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from blueengine import BlueEngine
from blueengine.client import LocalEngine


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    """Wait for a condition to hold, checking often; fail the test if it never does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what or condition}")
        time.sleep(0.01)


@pytest.fixture
def run_engine() -> Iterator[Callable[..., LocalEngine]]:
    """Start an engine locally; every engine started is stopped after the test."""
    started: list[LocalEngine] = []

    def start(engine: BlueEngine, **options: object) -> LocalEngine:
        options.setdefault("ready_timeout_s", 30.0)
        options.setdefault("drain_timeout_s", 5.0)
        client = engine.run_local(**options).start()
        started.append(client)
        return client

    yield start
    for client in started:
        client.stop(drain=False)
