"""Stream consumer groups: create one idempotently, read through it, tell its errors apart.

Two parts read a stream through a consumer group: the command consumer (each instance
its own ``commands:outbound:ID``, group ``teltonika``) and the processor
(``telemetry:teltonika``, group ``processor``). Both create their group at start with
``XGROUP CREATE ... MKSTREAM`` (an existing group is fine: ``BUSYGROUP``), read with
``XREADGROUP`` (their own pending entries from an id, then new ones with ``>``), and must
recognise a group that vanished under them (``FLUSHALL``, ``DEL``, ``XGROUP DESTROY``,
a Redis restarted without persistence) to create it again. What each does then is its
own decision; recognising the reply is done here, once (:func:`classify`).

The live broadcast's fan-out reader reads with a plain ``XREAD`` (no group, on purpose:
see :mod:`teltonika.processor.live.fanout`); it shares the classifier (for ``XINFO
STREAM`` on a stream that does not exist yet) and the reading of a reply's entries
(:func:`first_stream`).
"""

from __future__ import annotations

from enum import Enum
from typing import Final

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime

from teltonika.redis.connection import (
    Argument,
    RedisConnection,
    RedisReplyError,
    Reply,
    reply_list,
    reply_text,
)


class GroupReply(Enum):
    """What an error from a stream or group command means."""

    NO_GROUP = "NOGROUP"
    """The group, or the stream holding it, does not exist (``XREADGROUP``, ``XACK``...)."""
    GROUP_EXISTS = "BUSYGROUP"
    """``XGROUP CREATE`` of a group that exists already."""
    UNBLOCKED = "UNBLOCKED"
    """A blocked ``XREADGROUP`` ended because its stream (and group) was deleted."""
    NO_SUCH_KEY = "no such key"
    """``XINFO`` of a stream that does not exist (``ERR no such key``)."""
    OTHER = "other"
    """Anything else: a lost connection, a timeout, another error reply."""


_CODES: Final = {
    reply.value: reply
    for reply in (GroupReply.NO_GROUP, GroupReply.GROUP_EXISTS, GroupReply.UNBLOCKED)
}


def classify(error: BaseException) -> GroupReply:
    """What *error* (whatever a command's Deferred failed with) means for a group.

    Redis error replies begin with their code (``NOGROUP No such key 'x' or consumer
    group 'y' ...``) and txredisapi keeps the reply's text as the exception's message;
    ``no such key`` is matched in any case, after the code, as Redis words it
    ``ERR no such key``."""
    text = str(error)
    code = _CODES.get(text.partition(" ")[0])
    if code is not None:
        return code
    if GroupReply.NO_SUCH_KEY.value in text.lower():
        return GroupReply.NO_SUCH_KEY
    return GroupReply.OTHER


@attrs.frozen(slots=True)
class Entry:
    """One stream entry as ``XREADGROUP`` / ``XAUTOCLAIM`` deliver it: its id and its flat
    field list (``name, value, ...``; a value that is not UTF-8 stays ``bytes``), or
    ``None`` when the entry was deleted while pending."""

    entry_id: str
    fields: list[Reply] | None


def parse_entries(raw: Reply) -> list[Entry]:
    """The entries of one stream in a reply (``[[id, fields], ...]``, or nil).

    :raise RedisReplyError: another shape.
    """
    if not raw:
        return []
    entries = []
    for item in reply_list(raw):
        entry = reply_list(item)
        if len(entry) != 2:
            raise RedisReplyError(f"a stream entry has 2 parts, not {len(entry)}")
        fields = entry[1]
        entries.append(Entry(reply_text(entry[0]), None if fields is None else reply_list(fields)))
    return entries


def first_stream(reply: Reply) -> Reply:
    """The entries of the first stream of an ``XREAD`` / ``XREADGROUP`` reply
    (``[[stream, entries], ...]``), nil when the reply is nil (nothing new in time)."""
    streams = reply_list(reply)
    if not streams:
        return None
    return reply_list(streams[0])[1]


@attrs.frozen
class ConsumerGroup:
    """Consumer *consumer* of *group* on *stream*.

    A per-command timeout, when given (*clock* and *timeout*), fails the command with
    ``twisted.internet.defer.TimeoutError``: txredisapi otherwise waits for a reconnect
    forever.
    """

    stream: str
    group: str
    consumer: str

    async def create(
        self,
        connection: RedisConnection,
        start: str = "0",
        *,
        clock: IReactorTime | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Create the group (and the stream) if missing, delivering entries after
        *start* (``0``: all, ``$``: new ones only); False when it existed already.

        :raise Exception: any other failure (Redis unreachable, a timeout...).
        """
        args = ("XGROUP", "CREATE", self.stream, self.group, start, "MKSTREAM")
        try:
            await _execute(connection, args, clock, timeout)
        except Exception as error:
            if classify(error) is GroupReply.GROUP_EXISTS:
                return False
            raise
        return True

    def read_args(self, cursor: str, count: int, block_ms: int | None) -> list[Argument]:
        """The ``XREADGROUP`` from *cursor*: ``">"`` for new entries (waiting up to
        *block_ms* when given), an id for this consumer's pending ones after it."""
        args: list[Argument] = ["XREADGROUP", "GROUP", self.group, self.consumer]
        args += ["COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", self.stream, cursor]
        return args

    async def read(
        self,
        connection: RedisConnection,
        cursor: str,
        count: int,
        block_ms: int | None = None,
        *,
        clock: IReactorTime | None = None,
        timeout: float | None = None,
    ) -> list[Entry]:
        """``XREADGROUP`` (see :meth:`read_args`) and its entries, in stream order.

        :raise Exception: the read failed; :func:`classify` tells a vanished group
            (``NO_GROUP``, ``UNBLOCKED``) from the rest.
        """
        reply = await _execute(connection, self.read_args(cursor, count, block_ms), clock, timeout)
        return parse_entries(first_stream(reply))


def _execute(
    connection: RedisConnection,
    args: tuple[Argument, ...] | list[Argument],
    clock: IReactorTime | None,
    timeout: float | None,
) -> Deferred[Reply]:
    d: Deferred[Reply] = maybeDeferred(connection.execute_command, *args)
    if clock is not None and timeout is not None:
        d.addTimeout(timeout, clock)
    return d
