"""Shared bits for the policy unit tests."""

from __future__ import annotations

from gateway.routing import RoutingInput, WorkerView


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def views(*loads: int) -> list[WorkerView]:
    """Workers w0, w1, ... with the given in-flight counts."""
    return [WorkerView(f"w{i}", f"http://w{i}", load, None) for i, load in enumerate(loads)]


def text_input(text: str | None = None, key: str | None = None) -> RoutingInput:
    return RoutingInput(None, "none", text=text, routing_key=key)
