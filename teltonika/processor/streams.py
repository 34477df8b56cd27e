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

DEAD_STREAM: Final = "telemetry:teltonika:dead"


class RedisReplyError(Exception):
    """A reply that does not have the shape the command documents."""


@attrs.frozen(slots=True)
class Entry:
    """One stream entry; ``fields`` is None when it was deleted while pending."""

    entry_id: str
    fields: list[Any] | None


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


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _entries(raw: Any) -> list[Entry]:
    if not raw:
        return []
    return [Entry(_text(item[0]), item[1]) for item in raw]


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


class Streams:
    """Commands on *stream* for consumer *consumer* of *group*.

    :param redis: a txredisapi connection (see :func:`teltonika.redis.connect.lazy_connection`).
    :param reader: a second connection for XREADGROUP only (default *redis*): a blocking
        read must not queue the XACKs of the batch being written behind it.
    :param timeout: seconds any command may take (plus the BLOCK time for reads).
    """

    def __init__(
        self,
        redis: Any,
        clock: IReactorTime,
        stream: str,
        group: str,
        consumer: str,
        dead_stream: str = DEAD_STREAM,
        dead_maxlen: int = 1_000_000,
        timeout: float = 10.0,
        reader: Any = None,
    ) -> None:
        self.redis = redis
        self.reader = redis if reader is None else reader
        self.clock = clock
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_stream = dead_stream
        self.dead_maxlen = dead_maxlen
        self.timeout = timeout

    def command(
        self, *args: Any, timeout: float | None = None, connection: Any = None
    ) -> Deferred[Any]:
        """Run one command with a timeout (raises ``TimeoutError`` when it expires)."""
        d: Deferred[Any] = Deferred.fromCoroutine(
            self._command(self.redis if connection is None else connection, args)
        )
        d.addTimeout(self.timeout if timeout is None else timeout, self.clock)
        return d

    @staticmethod
    async def _command(connection: Any, args: Sequence[Any]) -> Any:
        return await connection.execute_command(*args)

    async def ping(self) -> None:
        await self.command("PING")

    async def create_group(self, start: str = "0") -> bool:
        """Create the group (and the stream) if missing; False when it already existed."""
        try:
            await self.command("XGROUP", "CREATE", self.stream, self.group, start, "MKSTREAM")
        except Exception as e:
            if "BUSYGROUP" in str(e):
                return False
            raise
        return True

    async def read(self, cursor: str, count: int, block_ms: int | None) -> list[Entry]:
        """XREADGROUP from *cursor* (``">"`` for new entries, an id for own pending ones)."""
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count]
        timeout = self.timeout
        if block_ms is not None:
            args += ["BLOCK", block_ms]
            timeout += block_ms / 1000
        args += ["STREAMS", self.stream, cursor]
        reply = await self.command(*args, timeout=timeout, connection=self.reader)
        if not reply:
            return []
        return _entries(reply[0][1])

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
        deleted = [_text(i) for i in reply[2]] if len(reply) > 2 and reply[2] else []
        return _text(reply[0]), _entries(reply[1]), deleted

    async def deliveries(self, first: str, last: str, count: int) -> dict[str, int]:
        """How often each of our pending entries in [first, last] was delivered."""
        reply = await self.command(
            "XPENDING", self.stream, self.group, first, last, count, self.consumer
        )
        return {_text(row[0]): int(row[3]) for row in reply or ()}

    async def touch(self, ids: Sequence[str]) -> None:
        """Reset the idle time of entries we still hold (XCLAIM JUSTID does not count as a
        delivery), so no other processor claims them while we retry PostgreSQL."""
        if ids:
            await self.command("XCLAIM", self.stream, self.group, self.consumer, 0, *ids, "JUSTID")

    async def ack(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        return int(await self.command("XACK", self.stream, self.group, *ids))

    async def dead_letter(self, letters: Iterable[DeadLetter], now_ms: int) -> None:
        """XADD each letter: ``dead.*`` metadata, then the original fields verbatim (so a
        replay is "drop the dead.* fields and XADD the rest")."""
        for letter in letters:
            await self.command(
                "XADD",
                self.dead_stream,
                "MAXLEN",
                "~",
                self.dead_maxlen,
                "*",
                "dead.id",
                letter.entry_id,
                "dead.stream",
                self.stream,
                "dead.reason",
                letter.reason,
                "dead.detail",
                letter.detail,
                "dead.group",
                self.group,
                "dead.consumer",
                self.consumer,
                "dead.at_ms",
                now_ms,
                *letter.fields,
            )

    async def groups(self) -> list[GroupInfo]:
        """``XINFO GROUPS`` of the stream (empty when the stream does not exist)."""
        try:
            reply = await self.command("XINFO", "GROUPS", self.stream)
        except Exception as e:
            if "no such key" in str(e):
                return []
            raise
        out = []
        for row in reply or ():
            info = {_text(k): v for k, v in zip(row[::2], row[1::2], strict=False)}
            lag = info.get("lag")
            out.append(
                GroupInfo(
                    name=_text(info["name"]),
                    consumers=int(info.get("consumers", 0)),
                    pending=int(info.get("pending", 0)),
                    last_delivered_id=_text(info.get("last-delivered-id", "0-0")),
                    lag=None if lag is None else int(lag),
                )
            )
        return out

    async def oldest_pending(self, group: str) -> str | None:
        """The smallest id *group* has delivered and not acknowledged, or None."""
        reply = await self.command("XPENDING", self.stream, group)
        if not reply or not int(reply[0]):
            return None
        return _text(reply[1])

    async def trim_minid(self, min_id: str) -> int:
        """``XTRIM stream MINID min_id`` (exact): removes entries with smaller ids."""
        return int(await self.command("XTRIM", self.stream, "MINID", min_id))
