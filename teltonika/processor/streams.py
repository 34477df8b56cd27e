"""The Redis stream commands the processor uses, over txredisapi, with parsed replies.

Every command gets a timeout of its own (txredisapi's lazy pool otherwise waits for a
reconnect forever), so a Redis outage turns into errors the consumer can retry and a
shutdown never hangs on Redis. Replies are decoded as UTF-8 where possible
(``convertNumbers`` off, see :mod:`teltonika.redis.connect`); a value that is not UTF-8
stays ``bytes`` and fails the contract check.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from teltonika.redis.connection import (
    Argument,
    RedisConnection,
    Reply,
    reply_int,
    reply_list,
    reply_text,
)
from teltonika.redis.groups import ConsumerGroup, Entry, GroupReply, classify, parse_entries

DEAD_STREAM: Final = "telemetry:teltonika:dead"
"""The default ``--dead-stream``: the stream that receives entries given up on."""
DEAD_MAXLEN: Final = 1_000_000
"""Entries (a count): the default ``--dead-maxlen``, the ``MAXLEN ~`` of the dead-letter stream."""
COMMAND_TIMEOUT: Final = 10.0
"""Seconds: how long one Redis command may take (plus the BLOCK time for reads)."""

TOUCH_SCRIPT: Final = """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local mine, lost = {}, {}
for i = 3, #ARGV do
  local row = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1)
  if row[1] ~= nil and row[1][2] == consumer then
    mine[#mine + 1] = ARGV[i]
  else
    lost[#lost + 1] = ARGV[i]
  end
end
-- at most 1000 ids per command: Lua's unpack and a call's arguments have a stack limit
for i = 1, #mine, 1000 do
  local args = {stream, group, consumer, 0}
  for k = i, math.min(i + 999, #mine) do args[#args + 1] = mine[k] end
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
end
return lost
"""
"""Reset the idle time of the entries still pending *for this consumer*; reply with the
others (taken over by another consumer, or acknowledged). One script, so no peer can claim
an entry between the ownership check and the XCLAIM: an entry a peer already took is
never taken back."""

DEAD_LETTER_SCRIPT: Final = """
local stream, dead = KEYS[1], KEYS[2]
local group, consumer, maxlen, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local i, written = 6, 0
for _ = 1, tonumber(ARGV[5]) do
  local id, reason, detail, count = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  i = i + 4
  if #redis.call('XPENDING', stream, group, id, id, 1) > 0 then
    local args = {dead, 'MAXLEN', '~', maxlen, '*'}
    for k = i, i + count - 1 do args[#args + 1] = ARGV[k] end
    local meta = {'dead.id', id, 'dead.stream', stream, 'dead.reason', reason,
                  'dead.detail', detail, 'dead.group', group, 'dead.consumer', consumer,
                  'dead.at_ms', now}
    for _, value in ipairs(meta) do args[#args + 1] = value end
    redis.call('XADD', unpack(args))
    redis.call('XACK', stream, group, id)
    written = written + 1
  end
  i = i + count
end
-- at most 1000 ids per XACK: Lua's unpack has a stack limit
for k = i, #ARGV, 1000 do
  redis.call('XACK', stream, group, unpack(ARGV, k, math.min(k + 999, #ARGV)))
end
return written
"""
"""XADD each dead letter whose entry is still pending in the group and XACK it at once,
then XACK the rest of the batch. Idempotent: a letter is written only while its entry is
pending and its entry is acknowledged right after, so a retry (a lost reply, an error
half-way, another consumer dead-lettering the same entry) never writes a letter twice."""

RETIRE_SCRIPT: Final = """
local stream, group, keep, min_idle = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local retired = {}
for _, row in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
  local info = {}
  for k = 1, #row, 2 do info[row[k]] = row[k + 1] end
  if info['name'] ~= keep and info['pending'] == 0 and info['idle'] > min_idle then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, info['name'])
    retired[#retired + 1] = info['name']
    retired[#retired + 1] = tostring(info['idle'])
  end
end
return retired
"""
"""Delete the consumers of the group (other than ours) that have nothing pending and have
been idle longer than ARGV[3] ms; reply ``name, idle ms, ...``. In one script because
``XGROUP DELCONSUMER`` drops the consumer's pending entries from the group: checked and
deleted atomically, a consumer that just read something is never deleted."""


LETTER_FIELDS: Final = 64
"""Most of an entry's fields a dead letter copies (the script's ``unpack`` of one XADD
takes a few thousand arguments at most)."""
LETTER_CHARS: Final = 1 << 20
"""Most characters of an entry a dead letter copies (names and values together)."""


def letter_fields(fields: Sequence[Any]) -> tuple[list[Any], str | None]:
    """The fields a dead letter copies: all of them, verbatim, when the entry is within
    :data:`LETTER_FIELDS` and :data:`LETTER_CHARS`; else the leading ones that fit, each
    cut to what is left, and a note for ``dead.truncated`` saying what the entry held
    (the entry itself stays in the stream until trimmed)."""
    total = 0
    for item in fields:
        total += len(item) if isinstance(item, str | bytes) else 0
    pairs = len(fields) // 2
    if pairs <= LETTER_FIELDS and total <= LETTER_CHARS and len(fields) % 2 == 0:
        return list(fields), None
    kept: list[Any] = []
    budget = LETTER_CHARS
    for item in fields[: 2 * LETTER_FIELDS]:
        text = item if isinstance(item, str | bytes) else str(item)
        cut = text[: max(budget, 0)]
        budget -= len(cut)
        kept.append(cut)
    if len(kept) % 2:
        kept.append("")
    return kept, f"{pairs} fields, {total} characters"


@attrs.frozen(slots=True)
class DeadLetter:
    """An entry going to the dead-letter stream, and why."""

    entry_id: str
    fields: list[Any]
    reason: str
    detail: str


@attrs.frozen(slots=True)
class GroupInfo:
    """One row of ``XINFO GROUPS`` (lag is None when Redis cannot tell)."""

    name: str
    consumers: int
    pending: int
    last_delivered_id: str
    lag: int | None


def parse_id(entry_id: str) -> tuple[int, int]:
    """``"ms-seq"`` as a tuple that sorts like Redis sorts ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: str) -> str:
    """The smallest id greater than *entry_id*."""
    ms, seq = parse_id(entry_id)
    if seq >= 2**64 - 1:
        return f"{ms + 1}-0"
    return f"{ms}-{seq + 1}"


def _required(connection: RedisConnection | None) -> RedisConnection:
    if connection is None:
        raise RuntimeError("no Redis connection yet: Streams.use() was not called")
    return connection


@attrs.frozen
class StreamsSettings:
    """Where :class:`Streams` dead-letters entries and how long a command may take (the
    processor's tap fills it from ``--dead-stream`` and ``--dead-maxlen``).

    :ivar dead_stream: the stream that receives entries given up on.
    :ivar dead_maxlen: ``MAXLEN ~`` of *dead_stream*.
    :ivar timeout: seconds any command may take (plus the BLOCK time for reads).
    """

    dead_stream: str = DEAD_STREAM
    dead_maxlen: int = DEAD_MAXLEN
    timeout: float = COMMAND_TIMEOUT


class Streams:
    """Commands on *stream* for consumer *consumer* of *group*.

    :param settings: the dead-letter stream and its length, and the command timeout.
    :param redis: a Redis connection (see :func:`teltonika.redis.connect.lazy_connection`);
        ``None`` until :meth:`use` hands one over (a service that connects at start).
    :param reader: a second connection for XREADGROUP only (default *redis*): a blocking
        read must not queue the XACKs of the batch being written behind it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        stream: str,
        group: str,
        consumer: str,
        *,
        settings: StreamsSettings = StreamsSettings(),
        redis: RedisConnection | None = None,
        reader: RedisConnection | None = None,
    ) -> None:
        self.clock = clock
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.consumer_group = ConsumerGroup(stream, group, consumer)
        self.dead_stream = settings.dead_stream
        self.dead_maxlen = settings.dead_maxlen
        self.timeout = settings.timeout
        self.redis: RedisConnection | None = None
        self.reader: RedisConnection | None = None
        if redis is not None:
            self.use(redis, reader)

    def use(self, redis: RedisConnection, reader: RedisConnection | None = None) -> None:
        """Send commands on *redis* and read with *reader* (default *redis*) from now on."""
        self.redis = redis
        self.reader = redis if reader is None else reader

    def command(
        self,
        *args: Argument,
        timeout: float | None = None,
        connection: RedisConnection | None = None,
    ) -> Deferred[Reply]:
        """Run one command with a timeout (raises ``TimeoutError`` when it expires)."""
        d: Deferred[Reply] = Deferred.fromCoroutine(
            self._command(self.redis if connection is None else connection, args)
        )
        d.addTimeout(self.timeout if timeout is None else timeout, self.clock)
        return d

    @staticmethod
    async def _command(connection: RedisConnection | None, args: Sequence[Argument]) -> Reply:
        return await _required(connection).execute_command(*args)

    async def ping(self) -> None:
        await self.command("PING")

    async def create_group(self, start: str = "0") -> bool:
        """Create the group (and the stream) if missing; False when it already existed."""
        return await self.consumer_group.create(
            _required(self.redis), start, clock=self.clock, timeout=self.timeout
        )

    async def read(self, cursor: str, count: int, block_ms: int | None) -> list[Entry]:
        """XREADGROUP from *cursor* (``">"`` for new entries, an id for own pending ones)."""
        timeout = self.timeout
        if block_ms is not None:
            timeout += block_ms / 1000
        return await self.consumer_group.read(
            _required(self.reader),
            cursor,
            count,
            block_ms,
            clock=self.clock,
            timeout=timeout,
        )

    async def autoclaim(
        self, min_idle_ms: int, start: str, count: int
    ) -> tuple[str, list[Entry], list[str]]:
        """XAUTOCLAIM: (next cursor, claimed entries, ids of claimed-but-deleted entries)."""
        reply = await self.command(
            "XAUTOCLAIM",
            self.stream,
            self.group,
            self.consumer,
            min_idle_ms,
            start,
            "COUNT",
            count,
        )
        parts = reply_list(reply)
        deleted = [reply_text(i) for i in reply_list(parts[2])] if len(parts) > 2 else []
        return reply_text(parts[0]), parse_entries(parts[1]), deleted

    async def deliveries(self, first: str, last: str, count: int) -> dict[str, int]:
        """How often each of our pending entries in [first, last] was delivered."""
        reply = await self.command(
            "XPENDING", self.stream, self.group, first, last, count, self.consumer
        )
        rows = [reply_list(row) for row in reply_list(reply)]
        return {reply_text(row[0]): reply_int(row[3]) for row in rows}

    async def touch(self, ids: Sequence[str]) -> list[str]:
        """Reset the idle time of entries we still hold (``XCLAIM ... JUSTID`` does not
        count as a delivery), so no other processor claims them while we retry
        PostgreSQL; return those of *ids* no longer pending for us (:data:`TOUCH_SCRIPT`)."""
        if not ids:
            return []
        reply = await self.command(
            "EVAL", TOUCH_SCRIPT, 1, self.stream, self.group, self.consumer, *ids
        )
        return [reply_text(i) for i in reply_list(reply)]

    async def ack(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        return reply_int(await self.command("XACK", self.stream, self.group, *ids))

    async def dead_letter(
        self, letters: Sequence[DeadLetter], ack_ids: Iterable[str], now_ms: int
    ) -> int:
        """Dead-letter *letters* and acknowledge them with the rest of *ack_ids*, in one
        idempotent script (:data:`DEAD_LETTER_SCRIPT`); return how many letters were
        written (fewer on a retry). A letter holds the original fields verbatim (bounded
        by :func:`letter_fields`, with ``dead.truncated`` when it had to cut), then
        the ``dead.*`` metadata (so a replay is "drop the dead.* fields and XADD the
        rest"; last, so a reader that builds a map gets the real metadata even from an
        entry that carried dead.* fields of its own)."""
        args: list[Any] = [self.group, self.consumer, self.dead_maxlen, now_ms, len(letters)]
        lettered = set()
        for letter in letters:
            lettered.add(letter.entry_id)
            fields, truncated = letter_fields(letter.fields)
            if truncated is not None:
                fields += ["dead.truncated", truncated]
            args += [letter.entry_id, letter.reason, letter.detail, len(fields)]
            args += fields
        args += [i for i in ack_ids if i not in lettered]
        reply = await self.command(
            "EVAL", DEAD_LETTER_SCRIPT, 2, self.stream, self.dead_stream, *args
        )
        return reply_int(reply)

    async def retire_idle_consumers(self, min_idle_ms: int) -> list[tuple[str, int]]:
        """Delete the group's consumers idle longer than *min_idle_ms* with nothing pending
        (never our own); return (name, idle ms) of each (:data:`RETIRE_SCRIPT`)."""
        reply = await self.command(
            "EVAL", RETIRE_SCRIPT, 1, self.stream, self.group, self.consumer, min_idle_ms
        )
        flat = reply_list(reply)
        return [
            (reply_text(name), reply_int(idle))
            for name, idle in zip(flat[::2], flat[1::2], strict=True)
        ]

    async def groups(self) -> list[GroupInfo]:
        """``XINFO GROUPS`` of the stream (empty when the stream does not exist)."""
        try:
            reply = await self.command("XINFO", "GROUPS", self.stream)
        except Exception as e:
            if classify(e) is GroupReply.NO_SUCH_KEY:
                return []
            raise
        out = []
        for row in map(reply_list, reply_list(reply)):
            info = {reply_text(k): v for k, v in zip(row[::2], row[1::2], strict=False)}
            lag = info.get("lag")
            out.append(
                GroupInfo(
                    name=reply_text(info["name"]),
                    consumers=reply_int(info.get("consumers", 0)),
                    pending=reply_int(info.get("pending", 0)),
                    last_delivered_id=reply_text(info.get("last-delivered-id", "0-0")),
                    lag=None if lag is None else reply_int(lag),
                )
            )
        return out

    async def oldest_pending(self, group: str) -> str | None:
        """The smallest id *group* has delivered and not acknowledged, or None."""
        summary = reply_list(await self.command("XPENDING", self.stream, group))
        if not summary or not reply_int(summary[0]):
            return None
        return reply_text(summary[1])

    async def trim_minid(self, min_id: str) -> int:
        """``XTRIM stream MINID min_id`` (exact): removes entries with smaller ids."""
        return reply_int(await self.command("XTRIM", self.stream, "MINID", min_id))
