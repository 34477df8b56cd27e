"""The sender's side of the command contract (used by ``teltonika send`` and the tests).

Sending is: look the device up in ``connections:registry``, XADD the command to that
instance's ``commands:outbound:{instance_id}``, then read ``commands:responses`` until the
command's terminal status. Offline commands (``wait_for_device``) are stored with a
required expiry (never infinite: a stale engine stop firing when a truck regains coverage
is a real accident); if the device is online right now, its instance is asked to deliver
at once (a ``flush`` entry), otherwise the next login delivers. Storing first and looking
the device up second leaves no gap: a login that happens in between takes the command.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Final

import attrs
from twisted.internet.defer import maybeDeferred

from teltonika.commands.messages import (
    FAILED,
    OFFLINE_EXPIRY_KEY,
    REGISTRY_KEY,
    RESPONDED,
    RESPONSES_MAXLEN,
    RESPONSES_STREAM,
    Command,
    InstanceSettings,
    Outcome,
    flat,
    heartbeat_key,
    offline_command,
    offline_list,
    outbound_stream,
    pairs,
    publish_status_args,
    text_of,
)
from teltonika.commands.scripts import STORE_OFFLINE, run_script
from teltonika.redis.connection import RedisConnection, reply_int, reply_list, reply_text
from teltonika.redis.groups import first_stream, parse_entries

SENDER: Final = "teltonika-send"
"""The ``instance_id`` of statuses a sender publishes itself (device_not_connected)."""

TERMINAL: Final = frozenset({RESPONDED, FAILED})
ROUTING_MARGIN: Final = 5.0
"""Seconds for the way through Redis and the instance's consumer (both directions)."""
STREAM_SCAN: Final = 10_000
"""Most entries of an instance's stream read to find the commands ahead of ours."""


@attrs.frozen
class Route:
    """Where a device's commands go: the live instance holding its socket, and what that
    instance announced about its command timing."""

    instance: str
    settings: InstanceSettings


def new_command_id() -> str:
    return uuid.uuid4().hex


async def last_response_id(redis: RedisConnection) -> str:
    """The id of the newest entry of ``commands:responses`` ("0-0" when empty): read
    statuses after it so that none published after this call is missed."""
    reply = await maybeDeferred(
        redis.execute_command, "XREVRANGE", RESPONSES_STREAM, "+", "-", "COUNT", "1"
    )
    newest = reply_list(reply)
    if not newest:
        return "0-0"
    return reply_text(reply_list(newest[0])[0])


async def route_of(redis: RedisConnection, imei: str) -> Route | None:
    """The instance holding *imei*'s socket, or None when the device is not connected
    anywhere, or only to an instance whose heartbeat is gone (a dead instance's entry,
    not yet removed by a janitor)."""
    instance = await maybeDeferred(redis.hget, REGISTRY_KEY, imei)
    if not instance:
        return None
    heartbeat = await maybeDeferred(redis.get, heartbeat_key(instance))
    if heartbeat is None:
        return None
    return Route(str(instance), InstanceSettings.from_heartbeat(heartbeat))


async def unsettled_commands(redis: RedisConnection, instance: str) -> list[dict[str, str]]:
    """The command entries in *instance*'s stream (not settled yet: being dispatched,
    queued on a socket or awaiting a reply), oldest first, at most :data:`STREAM_SCAN`."""
    reply = await maybeDeferred(
        redis.execute_command,
        "XRANGE",
        outbound_stream(instance),
        "-",
        "+",
        "COUNT",
        str(STREAM_SCAN),
    )
    out = []
    for entry in parse_entries(reply):
        values = entry.fields or []
        fields = {
            text_of(name): text_of(value)
            for name, value in zip(values[::2], values[1::2], strict=False)
        }
        if fields.get("kind", "command") != "flush":
            out.append(fields)
    return out


def write_window(ahead: Sequence[float], settings: InstanceSettings) -> float:
    """Seconds within which a command for a socket with commands *ahead* (their reply
    timeouts) should be written, if the device is connected and nothing is wrong.

    Every command, ahead or ours, may wait for its write moment (an ACK, or the quiet
    interval outside the margin around a periodic device's next frame: at most ``quiet``
    plus twice the margin, see :mod:`teltonika.protocol.queue`) and may have to wait out
    a settle interval (the command before it timed out: one ahead, or one already
    settled); each one ahead then runs to its timeout. Plus the routing margin."""
    settle = settings.command_settle_s
    moment = settings.command_quiet_s + 2 * settings.command_due_margin_s
    return sum(settle + moment + timeout for timeout in ahead) + settle + moment + ROUTING_MARGIN


def timeout_of(fields: dict[str, str], default: float) -> float:
    """The reply timeout of a command entry (``timeout_s``, else *default*)."""
    try:
        value = float(fields.get("timeout_s") or default)
    except ValueError:
        return default
    return value if 0 < value <= 3600 else default


async def publish_not_connected(redis: RedisConnection, command: Command, now_ms: int) -> None:
    """The sender's own terminal status for a device connected nowhere."""
    outcome = Outcome(command.id, command.imei, command.codec, FAILED, "device_not_connected")
    fields = outcome.fields(instance_id=SENDER, at_ms=now_ms)
    await maybeDeferred(redis.execute_command, *publish_status_args(fields))


async def publish_command(redis: RedisConnection, instance: str, command: Command) -> None:
    """XADD *command* to *instance*'s stream."""
    await maybeDeferred(
        redis.execute_command, "XADD", outbound_stream(instance), "*", *flat(command.fields())
    )


async def send_command(redis: RedisConnection, command: Command, now_ms: int) -> str | None:
    """Route *command* to the instance holding its device.

    :return: the instance id it was published to, or None when the device is not
        connected anywhere (see :func:`route_of`; a ``failed``/``device_not_connected``
        status is published).
    """
    route = await route_of(redis, command.imei)
    if route is None:
        await publish_not_connected(redis, command, now_ms)
        return None
    await publish_command(redis, route.instance, command)
    return route.instance


async def store_offline(redis: RedisConnection, command: Command, now_ms: int) -> str | None:
    """Keep *command* for its device's next login (status ``queued``), and if the device
    is connected now, ask its instance to deliver it at once.

    :return: the instance asked to deliver now, or None (the next login delivers).
    :raise ValueError: the command has no expiry, or its id is already stored.
    """
    if command.expires_at_ms is None:
        raise ValueError("an offline command needs an expiry")
    stored = await run_script(
        redis,
        STORE_OFFLINE,
        [
            offline_command(command.id),
            offline_list(command.imei),
            OFFLINE_EXPIRY_KEY,
            RESPONSES_STREAM,
        ],
        [
            command.id,
            str(command.expires_at_ms),
            str(now_ms),
            str(RESPONSES_MAXLEN),
            SENDER,
            *flat(command.fields()),
        ],
    )
    if not reply_int(stored):
        raise ValueError(f"command id {command.id} is already stored")
    instance = await maybeDeferred(redis.hget, REGISTRY_KEY, command.imei)
    if not instance:
        return None
    flush = Command(id=command.id, imei=command.imei, payload=b"", kind="flush")
    await maybeDeferred(
        redis.execute_command, "XADD", outbound_stream(instance), "*", *flat(flush.fields())
    )
    return str(instance)


async def wait_for_terminal(
    redis: RedisConnection,
    command_id: str,
    after: str,
    deadline: float,
    seconds: Callable[[], float],
    on_status: Callable[[dict[str, str]], None] | None = None,
    block: float = 1.0,
) -> dict[str, str] | None:
    """Read ``commands:responses`` after entry *after* until *command_id*'s terminal
    status, or None when *deadline* (in ``seconds()`` time) passes.

    :param redis: a connection that may block (XREAD BLOCK); not shared.
    :param on_status: called with every status of the command (progress included).
    """
    cursor = after
    while True:
        remaining = deadline - seconds()
        if remaining <= 0:
            return None
        wait_ms = max(1, int(min(block, remaining) * 1000))
        reply = await maybeDeferred(
            redis.execute_command,
            "XREAD",
            "COUNT",
            "500",
            "BLOCK",
            str(wait_ms),
            "STREAMS",
            RESPONSES_STREAM,
            cursor,
        )
        for entry in parse_entries(first_stream(reply)):
            cursor = entry.entry_id
            fields = pairs([text_of(value) for value in entry.fields or []])
            if fields.get("id") != command_id:
                continue
            if on_status is not None:
                on_status(fields)
            if fields.get("status") in TERMINAL:
                return fields
