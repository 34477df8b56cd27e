"""A third-party AVL codec, 0x7A, as a deployment would add one.

This file is self-contained on purpose: the end-to-end test copies it, as it is, into a
``twisted/plugins`` directory on the server's ``PYTHONPATH`` (how a deployment adds a
codec), and the in-process tests import it as ``tests.dropin``.

Its body: ``7A | count u8 | count x (timestamp_ms u64, speed u8) | count u8``.
"""

from __future__ import annotations

import struct

from twisted.plugin import IPlugin
from zope.interface import implementer

from teltonika.interfaces import ICodec
from teltonika.wire import (
    AVLPacket,
    AVLRecord,
    FieldValueError,
    Packet,
    TruncatedError,
    tcp_ack,
)

CODEC_7A = 0x7A
_RECORD = struct.Struct(">QB")


@implementer(IPlugin, ICodec)
class Codec7A:
    codec_id = CODEC_7A
    name = "7A"
    kind = "avl"

    def decode(self, data: bytes, start: int, end: int) -> Packet:
        if end - start < 3:
            raise TruncatedError("codec 7A body too short", start)
        count = data[start + 1]
        if end - start != 3 + count * _RECORD.size or data[end - 1] != count or not count:
            raise FieldValueError("codec 7A counts do not match its length", start)
        records = tuple(
            AVLRecord(timestamp_ms, 0, 0.0, 0.0, 0, 0, 0, speed, 0)
            for timestamp_ms, speed in _RECORD.iter_unpack(data[start + 2 : end - 1])
        )
        return AVLPacket(CODEC_7A, records)

    def encode(self, packet: Packet) -> bytes:
        assert isinstance(packet, AVLPacket)
        count = len(packet.records)
        body = b"".join(_RECORD.pack(r.timestamp_ms, r.speed) for r in packet.records)
        return bytes((CODEC_7A, count)) + body + bytes((count,))

    def acknowledgement(self, packet: Packet) -> bytes | None:
        assert isinstance(packet, AVLPacket)  # what decode returns
        return tcp_ack(len(packet.records))


codec7a = Codec7A()
