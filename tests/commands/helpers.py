"""Helpers shared by the Redis-backed command tests."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.task import deferLater

from teltonika.commands.messages import Command, flat, pairs
from teltonika.commands.metrics import CommandMetrics


async def eventually(
    predicate: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0, step: float = 0.01
) -> Any:
    """Poll *predicate* (sync or async) until it returns something truthy.

    Only for tests that run real servers (Redis, TCP): there is no event to wait on
    across processes.
    """
    waited = 0.0
    while True:
        value = predicate()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, step, lambda: None)
        waited += step


async def statuses(redis: Any, command_id: str | None = None) -> list[dict[str, str]]:
    """Every entry of commands:responses (optionally of one command), oldest first."""
    entries = await redis.execute_command("XRANGE", "commands:responses", "-", "+")
    out = [pairs(list(values)) for _id, values in entries]
    return [e for e in out if command_id is None or e["id"] == command_id]


async def terminal(redis: Any, command_id: str, timeout: float = 10.0) -> dict[str, str]:
    """Wait for the command's terminal status (responded or failed) and return it."""

    async def find() -> dict[str, str] | None:
        for entry in await statuses(redis, command_id):
            if entry["status"] in ("responded", "failed"):
                return entry
        return None

    result: dict[str, str] = await eventually(find, timeout)
    return result


async def publish(redis: Any, instance_id: str, imei: str, payload: str, **kwargs: Any) -> str:
    """XADD a command for *imei* to *instance_id*'s stream; returns the command id."""
    command_id = kwargs.pop("id", None) or uuid.uuid4().hex
    command = Command(id=command_id, imei=imei, payload=payload.encode(), **kwargs)
    await redis.execute_command(
        "XADD", f"commands:outbound:{instance_id}", "*", *flat(command.fields())
    )
    return command_id


def fresh_metrics() -> tuple[CommandMetrics, CollectorRegistry]:
    """The command plane's metrics on a registry of their own, and that registry."""
    registry = CollectorRegistry()
    return CommandMetrics.create(registry), registry
