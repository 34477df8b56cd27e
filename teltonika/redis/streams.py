"""Redis Streams writes through txredisapi: pipelined XADD and the durability check.

txredisapi has no XADD helper, so entries go through ``execute_command("XADD", ...)``.
Replies arrive as whatever txredisapi parsed: with ``convertNumbers=False`` (see
:mod:`teltonika.redis.connect`) an entry id stays a string, while integer replies (``:1``,
as WAITAOF sends) are ints. :func:`entry_id_ok` and :func:`waitaof_ok` accept exactly the
shapes they expect and nothing else.

Durability, stated plainly: an XADD reply means the entry is in Redis's *memory*. A Redis
crash then loses nothing acknowledged only when Redis runs with ``appendonly yes`` and
``appendfsync always`` (every write is fsynced before the reply), or when we wait for
``WAITAOF 1 0 0`` after the writes (Redis 7.2 and later; Debian 12 ships 7.0, so the
version is detected). :func:`check_durability` verifies at start-up that Redis can give
what ``--redis-durability`` asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any, Final

from twisted.internet.defer import DeferredList, FirstError, maybeDeferred

WAITAOF_MIN_VERSION: Final = (7, 2)

SEPARATOR: Final = b"\0"
"""Joins the values of one entry into one script argument. No contract value can hold a
NUL: numbers, digits, orjson's output (which escapes control characters) and the
instance id (refused at start if it holds one)."""

XADD_SCRIPT: Final = b"""
local key, maxlen, n = KEYS[1], ARGV[1], tonumber(ARGV[2])
local added = 0
for j = 3 + n, #ARGV do
  local blob, pos = ARGV[j], 1
  local args
  if maxlen ~= '' then args = {key, 'MAXLEN', '~', maxlen, '*'} else args = {key, '*'} end
  for i = 1, n do
    local stop = string.find(blob, '\0', pos, true)
    if stop == nil then
      if i ~= n then return redis.error_reply('entry ' .. (j - 2 - n) .. ' has too few values') end
      stop = #blob + 1
    end
    args[#args + 1] = ARGV[2 + i]
    args[#args + 1] = string.sub(blob, pos, stop - 1)
    pos = stop + 1
  end
  if pos ~= #blob + 2 then return redis.error_reply('entry has too many values') end
  redis.call('XADD', unpack(args))
  added = added + 1
end
return added
"""
"""Add one stream entry per packed argument, in order; reply with the count added.

Why a script rather than one XADD command per record: txredisapi builds, tracks and parses
every command in Python (argument encoding, a Deferred, a reply-timeout timer and a reply
per command), which capped the server near 2x the naive one-XADD-per-await path. One
``EVAL`` per batch carrying one packed argument per record moves that per-record work
into Redis (measured in ``benchmarks/ingest.py``). The entries are the same XADDs with
the same fields in the same order; a script runs atomically, and with ``appendfsync
always`` its writes are fsynced before the reply like any other write."""


class Durability(Enum):
    """How a batch is confirmed before the server ACKs the devices."""

    MEMORY = "memory"
    """The XADD replies: entries are in Redis memory (lost if Redis crashes before its
    next AOF/RDB write)."""
    AOF_ALWAYS = "aof-always"
    """Redis fsyncs its AOF before every reply (``appendfsync always``)."""
    WAITAOF = "waitaof"
    """Each batch ends with ``WAITAOF 1 0 0``: the reply comes after the local fsync."""


class DurabilityError(Exception):
    """Redis is not configured for the durability asked for; the message says what to do."""


class StreamWriteError(Exception):
    """Redis answered a pipeline with something other than the expected replies."""


def xadd_command(stream: bytes, fields: Sequence[bytes], maxlen: int | None = None) -> list[bytes]:
    """The arguments of one ``XADD`` (``MAXLEN ~ N`` only when *maxlen* is given)."""
    if maxlen is None:
        return [b"XADD", stream, b"*", *fields]
    return [b"XADD", stream, b"MAXLEN", b"~", b"%d" % maxlen, b"*", *fields]


def xadd_script_command(
    stream: bytes,
    names: Sequence[bytes],
    packed: Sequence[bytes],
    maxlen: int | None = None,
) -> list[bytes]:
    """One ``EVAL`` of :data:`XADD_SCRIPT` adding one entry per item of *packed* (the
    entry's values joined by :data:`SEPARATOR`, in the order of *names*)."""
    return [
        b"EVAL",
        XADD_SCRIPT,
        b"1",
        stream,
        b"" if maxlen is None else b"%d" % maxlen,
        b"%d" % len(names),
        *names,
        *packed,
    ]


def script_count_ok(reply: object, expected: int) -> bool:
    """True when the script replied with the number of entries it was given (an int:
    txredisapi parses integer replies whatever ``convertNumbers`` says)."""
    return isinstance(reply, int) and not isinstance(reply, bool) and reply == expected


def entry_id_ok(reply: object) -> bool:
    """True for an XADD reply: an entry id ``<ms>-<seq>`` as str or bytes."""
    if isinstance(reply, bytes):
        reply = reply.decode("ascii", "replace")
    if not isinstance(reply, str):
        return False
    ms, _, seq = reply.partition("-")
    return ms.isdigit() and seq.isdigit()


def waitaof_ok(reply: object) -> bool:
    """True when a WAITAOF reply says the local AOF holds the writes (``[>=1, n]``)."""
    if not isinstance(reply, list | tuple) or len(reply) != 2:
        return False
    try:
        return int(reply[0]) >= 1
    except (TypeError, ValueError):
        return False


async def pipeline_commands(redis: Any, commands: Sequence[Sequence[bytes]]) -> list[object]:
    """Send *commands* back to back and return their replies, in order.

    They are written in the same reactor turn, so they leave in one segment and come
    back in one round trip, like a pipeline. txredisapi's own ``pipeline()`` would hold
    the connection for itself until the replies arrive, so a second batch could not be
    sent while the first is in Redis; plain commands share the connection, whose replies
    Redis returns in order.

    :raise Exception: the first failure (a lost connection, an error reply).
    """
    ds = [maybeDeferred(redis.execute_command, *command) for command in commands]
    try:
        results = await DeferredList(ds, fireOnOneErrback=True, consumeErrors=True)
    except FirstError as error:
        error.subFailure.raiseException()
    return [value for _success, value in results]


def parse_version(text: str) -> tuple[int, ...]:
    """``"7.0.15"`` -> ``(7, 0, 15)`` (non-numeric parts end the tuple)."""
    parts: list[int] = []
    for part in text.strip().split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def _config_value(reply: object, name: str) -> str:
    """The value from a ``CONFIG GET name`` reply (a flat list, or a dict on RESP3)."""
    if isinstance(reply, dict):
        value = reply.get(name)
    elif isinstance(reply, list | tuple) and len(reply) >= 2:
        value = reply[1]
    else:
        value = None
    if isinstance(value, bytes):
        value = value.decode()
    if not isinstance(value, str):
        raise DurabilityError(f"Redis gave no value for CONFIG GET {name} (got {reply!r})")
    return value


def _info_field(info: object, name: str) -> str:
    if isinstance(info, bytes):
        info = info.decode()
    if isinstance(info, str):
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    return ""


async def check_durability(redis: Any, wanted: str) -> Durability:
    """Check that Redis can give the durability *wanted* (``memory`` or ``fsync``).

    :return: how batches are to be confirmed.
    :raise DurabilityError: with a message naming the Redis settings to change.
    """
    if wanted == "memory":
        await redis.execute_command("PING")
        return Durability.MEMORY
    if wanted != "fsync":
        raise DurabilityError(f"unknown durability {wanted!r}: use memory or fsync")
    try:
        appendonly = _config_value(
            await redis.execute_command("CONFIG", "GET", "appendonly"), "appendonly"
        )
        appendfsync = _config_value(
            await redis.execute_command("CONFIG", "GET", "appendfsync"), "appendfsync"
        )
    except DurabilityError:
        raise
    except Exception as error:
        raise DurabilityError(
            "--redis-durability fsync needs CONFIG GET to verify the Redis settings, "
            f"and Redis refused it: {error}"
        ) from None
    version_text = _info_field(await redis.execute_command("INFO", "server"), "redis_version")
    version = parse_version(version_text)
    if appendonly == "yes" and appendfsync == "always":
        return Durability.AOF_ALWAYS
    if appendonly == "yes" and version >= WAITAOF_MIN_VERSION:
        return Durability.WAITAOF
    raise DurabilityError(
        "--redis-durability fsync: Redis "
        f"{version_text or '(unknown version)'} runs with appendonly={appendonly} "
        f"appendfsync={appendfsync}. Configure 'appendonly yes' and 'appendfsync always' "
        "(or 'appendonly yes' on Redis 7.2+ for WAITAOF), or start with "
        "--redis-durability memory."
    )
