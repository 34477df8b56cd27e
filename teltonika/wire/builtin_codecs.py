"""The built-in codecs as :class:`~teltonika.interfaces.ICodec` providers.

These objects are exported as plugins by ``twisted/plugins/teltonika_codecs.py``; the
registry in :mod:`teltonika.codecs` finds them (and any third-party codec) through
``twisted.plugin.getPlugins``. They import nothing but the wire layer, so a plugin scan
never pulls in the reactor, Redis or metrics.
"""

from __future__ import annotations

from typing import Final

from twisted.plugin import IPlugin
from zope.interface import implementer

from teltonika.interfaces import ICodec
from teltonika.wire.avl import decode_avl, encode_avl
from teltonika.wire.errors import FieldValueError, TruncatedError
from teltonika.wire.login import tcp_ack
from teltonika.wire.messages import decode_messages, encode_message
from teltonika.wire.records import (
    CODEC_8,
    CODEC_8E,
    CODEC_12,
    CODEC_13,
    CODEC_14,
    CODEC_16,
    AVLPacket,
    MessagePacket,
    Packet,
)


@implementer(IPlugin, ICodec)
class AVLCodec:
    """Codec 8, 8 Extended or 16: position records, acknowledged with their count."""

    kind: Final = "avl"

    def __init__(self, codec_id: int, name: str) -> None:
        self.codec_id = codec_id
        self.name = name

    def __repr__(self) -> str:
        return f"<AVLCodec {self.name}>"

    def decode(self, data: bytes, start: int, end: int) -> Packet:
        """ICodec API"""
        if start >= end or end > len(data):
            raise TruncatedError(f"codec {self.name} body is empty or runs past the data", start)
        if data[start] != self.codec_id:
            raise FieldValueError(f"codec id 0x{data[start]:02X} is not {self.name}", start)
        return decode_avl(data, start, end)

    def encode(self, packet: Packet) -> bytes:
        """ICodec API"""
        if not isinstance(packet, AVLPacket):
            raise TypeError(f"codec {self.name} encodes AVL packets, not {packet!r}")
        return encode_avl(self.codec_id, packet.records)

    def acknowledgement(self, packet: Packet) -> bytes | None:
        """ICodec API: the record count, as a u32."""
        assert isinstance(packet, AVLPacket)
        return tcp_ack(len(packet.records))


@implementer(IPlugin, ICodec)
class MessageCodec:
    """Codec 12, 13 or 14: command and message frames, never acknowledged."""

    kind: Final = "message"

    def __init__(self, codec_id: int, name: str) -> None:
        self.codec_id = codec_id
        self.name = name

    def __repr__(self) -> str:
        return f"<MessageCodec {self.name}>"

    def decode(self, data: bytes, start: int, end: int) -> Packet:
        """ICodec API"""
        if start >= end or end > len(data):
            raise TruncatedError(f"codec {self.name} body is empty or runs past the data", start)
        if data[start] != self.codec_id:
            raise FieldValueError(f"codec id 0x{data[start]:02X} is not {self.name}", start)
        return decode_messages(data, start, end)

    def encode(self, packet: Packet) -> bytes:
        """ICodec API (one message per body, as every device sends)."""
        if not isinstance(packet, MessagePacket) or len(packet.messages) != 1:
            raise TypeError(f"codec {self.name} encodes one-message packets, not {packet!r}")
        message = packet.messages[0]
        return encode_message(
            self.codec_id,
            message.payload,
            message.message_type,
            imei=message.imei,
            timestamp_ms=message.timestamp_ms,
        )

    def acknowledgement(self, packet: Packet) -> bytes | None:
        """ICodec API: never (docs/protocol.rst, section 'Commands on a live socket')."""
        return None


codec8 = AVLCodec(CODEC_8, "8")
codec8e = AVLCodec(CODEC_8E, "8E")
codec16 = AVLCodec(CODEC_16, "16")
codec12 = MessageCodec(CODEC_12, "12")
codec13 = MessageCodec(CODEC_13, "13")
codec14 = MessageCodec(CODEC_14, "14")

BUILTIN_CODECS: Final = (codec8, codec8e, codec16, codec12, codec13, codec14)
