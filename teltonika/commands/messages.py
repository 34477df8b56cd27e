"""The command contract: Redis keys, the command entry and the status entry (version 1).

This is to commands what :mod:`teltonika.contract` is to telemetry: the interface between
the servers and whoever sends commands (``teltonika send``, a back office). README.rst,
"Commands", documents it field by field. Change the layout only by adding a version.

Keys::

    connections:registry                 hash  IMEI -> instance id holding its socket
    instance:heartbeat:{instance_id}     string, SET EX 90 every 30 s: the instance is alive;
                                         its value is JSON, :class:`InstanceSettings`
    commands:outbound:{instance_id}      stream of commands for that instance (group "teltonika")
    commands:responses                   stream of statuses, every command ends with one
                                         terminal status (responded or failed)
    commands:offline:{imei}              list of command ids waiting for the device's login
    commands:offline:command:{id}        hash: one waiting command (its entry + attempts)
    commands:offline:expiry              sorted set: command id by expires_at_ms
    commands:delivered:{instance_id}     hash: entry id -> "1" once ``delivered`` was
                                         published for it (fields removed at settle)

A command entry (``commands:outbound:*``), every value a string::

    v              "1"
    kind           "command" (default) | "flush" (deliver the IMEI's offline commands now)
    id             command id chosen by the sender (unique; statuses carry it)
    imei           15 digits
    codec          "12" (default) | "14"
    payload        the command text (ASCII), or
    payload_hex    the command bytes in hex (exactly one of the two)
    timeout_s      seconds to wait for the reply once written ("" = server default, 30)
    created_at_ms  when the sender created it
    expires_at_ms  fail with "expired" instead of writing after this time ("" = never);
                   required for offline commands
    offline        "1" when the command waits for the device (offline delivery)
    attempt        delivery attempt, offline commands only ("1", "2", ...)

A status entry (``commands:responses``)::

    v              "1"
    id, imei, codec     as in the command
    status         delivered | responded | failed | queued | requeued
    reason         failed: device_not_connected | timeout | socket_closed | queue_full |
                   nack | invalid_command | instance_gone | expired | attempts_exhausted;
                   requeued: the reason of the failed attempt; otherwise ""
    response       responded: the reply as text (printable ASCII, else its hex)
    response_hex   responded: the reply bytes in hex
    instance_id    the instance that published the status
    at_ms          when it was published
    attempt        offline commands: the attempt this status belongs to, else ""

``delivered`` (bytes written to the socket) and ``queued``/``requeued`` (kept for the
device's next login) are progress; ``responded`` and ``failed`` are terminal, and each
command gets exactly one terminal status.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from teltonika.protocol.queue import (
    DEFAULT_COMMAND_QUIET,
    DEFAULT_COMMAND_SETTLE,
    DEFAULT_COMMAND_TIMEOUT,
    FRAME_DUE_MARGIN,
    InvalidCommandError,
)

COMMANDS_VERSION: Final = "1"
REGISTRY_KEY: Final = "connections:registry"
RESPONSES_STREAM: Final = "commands:responses"
CONSUMER_GROUP: Final = "teltonika"
OFFLINE_EXPIRY_KEY: Final = "commands:offline:expiry"
RESPONSES_MAXLEN: Final = 1_000_000
"""Approximate cap (XADD MAXLEN ~) of the responses stream: bounded memory."""

DELIVERED: Final = "delivered"
RESPONDED: Final = "responded"
FAILED: Final = "failed"
QUEUED: Final = "queued"
REQUEUED: Final = "requeued"

REASONS: Final = frozenset(
    {
        "device_not_connected",
        "timeout",
        "socket_closed",
        "queue_full",
        "nack",
        "invalid_command",
        "instance_gone",
        "expired",
        "attempts_exhausted",
    }
)
REASON_MEANINGS: Final = {
    "device_not_connected": "the device is not connected to any server; it was not sent",
    "timeout": "the device did not answer within the command's timeout",
    "socket_closed": "the device's connection closed before it answered",
    "queue_full": "too many commands are already queued for this device; it was not sent",
    "nack": "the device refused it (codec 14: the IMEI is not its own); it did not run",
    "invalid_command": "the server could not parse or encode it; it was not sent",
    "instance_gone": "the server holding the device's connection died before it answered",
    "expired": "its expiry passed before it could be written; it was not sent and will not be",
    "attempts_exhausted": "offline delivery failed on every allowed attempt",
}
"""What each ``failed`` reason means, in words for people (``teltonika send``)."""
NEVER_WRITTEN: Final = frozenset(
    {"device_not_connected", "queue_full", "invalid_command", "expired"}
)
"""Reasons that say the command's frame was not written to the device (this attempt)."""
RETRYABLE: Final = frozenset({"device_not_connected", "timeout", "socket_closed", "queue_full"})
"""Reasons after which an offline command goes back to wait for the next login."""
SESSION_GONE: Final = frozenset({"device_not_connected", "socket_closed"})
"""Retryable reasons that mean the attempt's session is gone: if the device is logged in
again by the time the command is back, it is delivered at once (a ``flush``)."""

MAX_INTEGER: Final = 2**63
"""Integer fields (milliseconds, attempts) stay below what Redis and Lua count with."""

_IMEI = re.compile(r"\A[0-9]{15,16}\Z")


def heartbeat_key(instance_id: str) -> str:
    return f"instance:heartbeat:{instance_id}"


def outbound_stream(instance_id: str) -> str:
    return f"commands:outbound:{instance_id}"


def delivered_marks(instance_id: str) -> str:
    return f"commands:delivered:{instance_id}"


def offline_list(imei: str) -> str:
    return f"commands:offline:{imei}"


def offline_command(command_id: str) -> str:
    return f"commands:offline:command:{command_id}"


def text_of(value: object) -> str:
    """*value* as text for a status or a log event: ``bytes`` that are not UTF-8 (what
    txredisapi returns for them) with backslash escapes, anything else through ``str``."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _optional_int(fields: Mapping[str, str], name: str) -> int | None:
    raw = fields.get(name, "")
    if raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidCommandError(f"{name} must be an integer, not {raw!r}") from None
    if not 0 <= value < MAX_INTEGER:
        raise InvalidCommandError(f"{name} must be between 0 and 2^63, not {raw!r}")
    return value


@attrs.frozen
class Command:
    """One command entry, parsed (see the module docstring for the fields).

    :ivar payload: the bytes to send.
    :ivar timeout_s: None means the server's default.
    """

    id: str
    imei: str
    payload: bytes
    codec: str = "12"
    timeout_s: float | None = None
    created_at_ms: int = 0
    expires_at_ms: int | None = None
    offline: bool = False
    attempt: int = 0
    kind: str = "command"

    def fields(self) -> dict[str, str]:
        """The entry to XADD (payload as text when it is printable ASCII)."""
        out = {
            "v": COMMANDS_VERSION,
            "kind": self.kind,
            "id": self.id,
            "imei": self.imei,
            "codec": self.codec,
            "timeout_s": "" if self.timeout_s is None else f"{self.timeout_s:g}",
            "created_at_ms": str(self.created_at_ms),
            "expires_at_ms": "" if self.expires_at_ms is None else str(self.expires_at_ms),
            "offline": "1" if self.offline else "",
            "attempt": str(self.attempt) if self.attempt else "",
        }
        try:
            text = self.payload.decode("ascii")
        except UnicodeDecodeError:
            text = None
        if text is not None and text.isprintable():
            out["payload"] = text
        else:
            out["payload_hex"] = self.payload.hex()
        return out

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> Command:
        """Parse an entry; the id and IMEI are kept verbatim even when invalid.

        Anything may come out of a stream: txredisapi returns a value that is not UTF-8
        as ``bytes``, so every name and value is checked to be text first.

        :raise InvalidCommandError: a field is missing, not text, or malformed.
        """
        for name, value in fields.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise InvalidCommandError(f"field {text_of(name)!r} is not UTF-8 text")
        kind = fields.get("kind") or "command"
        if kind not in ("command", "flush"):
            raise InvalidCommandError(f"kind must be command or flush, not {kind!r}")
        imei = fields.get("imei", "")
        if not _IMEI.match(imei):
            raise InvalidCommandError(f"imei must be 15 digits, not {imei!r}")
        command_id = fields.get("id", "")
        if kind == "flush":
            return cls(id=command_id, imei=imei, payload=b"", kind=kind)
        if not command_id:
            raise InvalidCommandError("the command has no id")
        codec = fields.get("codec") or "12"
        if codec not in ("12", "14"):
            raise InvalidCommandError(f"codec must be 12 or 14, not {codec!r}")
        if fields.get("payload_hex"):
            try:
                payload = bytes.fromhex(fields["payload_hex"])
            except ValueError:
                raise InvalidCommandError("payload_hex is not hex") from None
        else:
            try:
                payload = fields.get("payload", "").encode("ascii")
            except UnicodeEncodeError:
                raise InvalidCommandError("payload must be ASCII (use payload_hex)") from None
        if not payload:
            raise InvalidCommandError("the command payload is empty")
        raw_timeout = fields.get("timeout_s", "")
        timeout: float | None = None
        if raw_timeout:
            try:
                timeout = float(raw_timeout)
            except ValueError:
                raise InvalidCommandError(f"timeout_s is not a number: {raw_timeout!r}") from None
            if not 0 < timeout <= 3600:
                raise InvalidCommandError(f"timeout_s must be in (0, 3600], not {timeout}")
        return cls(
            id=command_id,
            imei=imei,
            payload=payload,
            codec=codec,
            timeout_s=timeout,
            created_at_ms=_optional_int(fields, "created_at_ms") or 0,
            expires_at_ms=_optional_int(fields, "expires_at_ms"),
            offline=fields.get("offline", "") == "1",
            attempt=_optional_int(fields, "attempt") or 0,
            kind=kind,
        )


@attrs.frozen
class InstanceSettings:
    """What an instance announces in its heartbeat value, so that a sender can tell how
    long a command sent there may take: ``{"at_ms": ..., "command_timeout_s": ...,
    "command_quiet_s": ..., "command_settle_s": ..., "command_due_margin_s": ...}``.

    :ivar command_timeout_s: the instance's ``--command-timeout`` (commands without
        ``timeout_s``).
    :ivar command_quiet_s: its ``--command-quiet``: an idle device gets a command after it.
    :ivar command_settle_s: its ``--command-settle``: the pause after a timeout.
    :ivar command_due_margin_s: seconds either side of a periodic device's next frame in
        which a command waits for an ACK rather than the quiet interval
        (:data:`~teltonika.protocol.queue.FRAME_DUE_MARGIN`).
    """

    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT
    command_quiet_s: float = DEFAULT_COMMAND_QUIET
    command_settle_s: float = DEFAULT_COMMAND_SETTLE
    command_due_margin_s: float = FRAME_DUE_MARGIN

    def heartbeat_value(self, at_ms: int) -> str:
        return json.dumps({"at_ms": at_ms, **attrs.asdict(self)}, separators=(",", ":"))

    @classmethod
    def from_heartbeat(cls, value: object) -> InstanceSettings:
        """Read a heartbeat value; anything missing or malformed (an older instance wrote
        only milliseconds) takes the default."""
        try:
            raw = json.loads(value) if isinstance(value, str | bytes) else None
        except ValueError:
            raw = None
        if not isinstance(raw, dict):
            return cls()
        out: dict[str, float] = {}
        for field in attrs.fields(cls):
            number = raw.get(field.name)
            if isinstance(number, int | float) and math.isfinite(number) and 0 <= number <= 3600:
                out[field.name] = float(number)
        return cls(**out)


@attrs.frozen
class Outcome:
    """What became of one command: the fields of its status entry that are the command's
    own (the instance publishing it and the time are added by :meth:`fields`).

    :ivar status: ``delivered``, ``responded``, ``failed``, ``queued`` or ``requeued``.
    :ivar reason: ``failed``: why (one of :data:`REASONS`); otherwise ``""``.
    :ivar response: ``responded``: the reply as text; ``response_hex`` its bytes in hex.
    :ivar attempt: offline commands: the attempt the status belongs to; 0 otherwise.
    """

    command_id: str
    imei: str
    codec: str
    status: str
    reason: str = ""
    response: str = ""
    response_hex: str = ""
    attempt: int = 0

    @classmethod
    def of(cls, command: Command, status: str, *, reason: str = "") -> Outcome:
        """*command* came to *status* (with *reason* when it failed)."""
        return cls(command.id, command.imei, command.codec, status, reason, attempt=command.attempt)

    def fields(self, *, instance_id: str, at_ms: int) -> dict[str, str]:
        """The status entry for ``commands:responses``, published by *instance_id* at
        *at_ms*."""
        return {
            "v": COMMANDS_VERSION,
            "id": self.command_id,
            "imei": self.imei,
            "codec": self.codec,
            "status": self.status,
            "reason": self.reason,
            "response": self.response,
            "response_hex": self.response_hex,
            "instance_id": instance_id,
            "at_ms": str(at_ms),
            "attempt": str(self.attempt) if self.attempt else "",
        }


def publish_status_args(fields: dict[str, str]) -> list[str]:
    """The command that appends a status entry to the (capped) responses stream."""
    return ["XADD", RESPONSES_STREAM, "MAXLEN", "~", str(RESPONSES_MAXLEN), "*", *flat(fields)]


def flat(fields: dict[str, str]) -> list[str]:
    """``{"a": "1"}`` -> ``["a", "1"]`` for XADD and script arguments."""
    out: list[str] = []
    for name, value in fields.items():
        out.append(name)
        out.append(value)
    return out


def pairs(values: list[str]) -> dict[str, str]:
    """The inverse of :func:`flat` (a Redis reply of field, value, ...)."""
    return dict(zip(values[::2], values[1::2], strict=True))
