"""Helpers shared by the Redis-backed command tests."""

from __future__ import annotations

import uuid
from typing import Any

from prometheus_client import CollectorRegistry

from teltonika.commands.messages import Command, flat, pairs
from teltonika.commands.metrics import CommandMetrics
from tests.helpers import eventually


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
