"""Redis Streams writes through txredisapi: pipelined XADD.

txredisapi has no XADD helper, so entries go through ``execute_command("XADD", ...)``.
Replies arrive as whatever txredisapi parsed: with ``convertNumbers=False`` (see
:mod:`teltonika.redis.connect`) an entry id stays a string, while integer replies (``:1``,
as the script and WAITAOF send) are ints. :func:`entry_id_ok` and
:func:`script_count_ok` accept exactly the shapes they expect and nothing else.

Whether those writes are durable beyond Redis's memory, and how each batch proves it, is
:mod:`teltonika.redis.durability`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from twisted.internet.defer import DeferredList, FirstError, maybeDeferred

from teltonika.redis.connection import RedisConnection

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


async def pipeline_commands(
    redis: RedisConnection, commands: Sequence[Sequence[bytes]]
) -> list[object]:
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
