"""Immutable values the wire layer produces and consumes.

Messages, frames and datagrams are frozen, slotted attrs classes (treq's
``RequestRecord`` shape). IO elements are plain tuples ``(io_id, width, value)`` rather
than attrs instances: a realistic 8E record carries 20-40 of them, and a tuple costs about
a tenth of a frozen attrs instance to build; tuples are just as immutable.

:class:`AVLRecord` and :class:`AVLPacket`, of which the server builds one per record and
per frame, are typed ``NamedTuple`` classes instead, by measurement
(``benchmarks/decode.py``, part 3): the decoder builds a record with ``tuple.__new__`` in
about 0.2 us where the frozen attrs class took about 1.1 us, a fifth of decoding a
realistic 8E record, which kept the decoder below a plain ``struct`` decoder. They stay
immutable, typed and keyword-constructible; the traps of a tuple are closed where they
matter: a record equals only a record of the same class (never a plain tuple with the
same fields), and orjson refuses to serialize one. ``_replace`` stands in for
``attrs.evolve``.

Values are kept exactly as sent: IO values are unsigned big-endian integers of their
declared width, or raw bytes for the variable-length NX group of codec 8 Extended. What
an IO value *means* (scale, sign, unit) is the catalogue's business, never the decoder's.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

import attrs

NX: Final = 0
"""Width marker of a variable-length (NX, codec 8 Extended) IO element; its value is bytes."""

IOElement = tuple[int, int, int | bytes]
"""``(io_id, width, value)``: width 1, 2, 4 or 8 with an unsigned int value, or NX with bytes."""

CODEC_8: Final = 0x08
CODEC_8E: Final = 0x8E
CODEC_16: Final = 0x10
CODEC_12: Final = 0x0C
CODEC_13: Final = 0x0D
CODEC_14: Final = 0x0E

AVL_CODEC_IDS: Final = frozenset({CODEC_8, CODEC_8E, CODEC_16})
MESSAGE_CODEC_IDS: Final = frozenset({CODEC_12, CODEC_13, CODEC_14})

CODEC_NAMES: Final[dict[int, str]] = {
    CODEC_8: "8",
    CODEC_8E: "8E",
    CODEC_16: "16",
    CODEC_12: "12",
    CODEC_13: "13",
    CODEC_14: "14",
}

MESSAGE_TYPE_COMMAND: Final = 0x05
MESSAGE_TYPE_RESPONSE: Final = 0x06
MESSAGE_TYPE_NACK: Final = 0x11


class AVLRecord(NamedTuple):
    """One AVL record: a position fix and the IO elements sampled with it.

    :ivar timestamp_ms: device time, milliseconds since the Unix epoch, UTC.
    :ivar priority: 0 low, 1 high, 2 panic.
    :ivar longitude: degrees, negative west (sent as a signed i32 of degrees x 10^7).
    :ivar latitude: degrees, negative south.
    :ivar altitude: metres, signed.
    :ivar angle: heading in degrees, 0 = north.
    :ivar satellites: satellites in use; 0 means the fix is not valid.
    :ivar speed: km/h.
    :ivar event_io_id: id of the IO element that triggered the record, 0 for periodic records.
    :ivar io: the IO elements in wire order, as ``(io_id, width, value)``.
    :ivar generation_type: codec 16 only (0 on exit ... 7 periodical); None otherwise.
    """

    timestamp_ms: int
    priority: int
    longitude: float
    latitude: float
    altitude: int
    angle: int
    satellites: int
    speed: int
    event_io_id: int
    io: tuple[IOElement, ...] = ()
    generation_type: int | None = None

    def io_values(self) -> dict[int, int | bytes]:
        """The IO elements as ``{io_id: value}`` (a later duplicate id wins)."""
        return {io_id: value for io_id, _width, value in self.io}


class AVLPacket(NamedTuple):
    """The decoded body of an AVL data frame (codec 8, 8 Extended or 16).

    A tuple like :class:`AVLRecord`, for the same reason: one per frame, and a
    one-record frame is the most common kind.
    """

    codec_id: int
    records: tuple[AVLRecord, ...]

    @property
    def codec_name(self) -> str:
        return CODEC_NAMES.get(self.codec_id, f"0x{self.codec_id:02X}")


def _same_class_eq(self: tuple[object, ...], other: object) -> bool:
    """Equal to a value of the same class with equal fields, never to a plain tuple."""
    return type(other) is type(self) and tuple.__eq__(self, other)


def _same_class_ne(self: tuple[object, ...], other: object) -> bool:
    return not _same_class_eq(self, other)


def same_class_equality(value_class: type[tuple[Any, ...]]) -> None:
    """Make instances of the NamedTuple *value_class* equal only to instances of the same
    class with equal fields, never to a plain tuple (hash stays tuple's).

    Set after the class is made: a NamedTuple body takes no shared base class, and a class
    body that defines ``__eq__`` loses tuple's ``__hash__``."""
    value_class.__eq__ = _same_class_eq  # type: ignore[method-assign]
    value_class.__ne__ = _same_class_ne  # type: ignore[assignment]


for _value_class in (AVLRecord, AVLPacket):
    same_class_equality(_value_class)


@attrs.frozen(slots=True)
class DeviceMessage:
    """One codec 12, 13 or 14 message.

    :ivar codec_id: 0x0C, 0x0D or 0x0E.
    :ivar message_type: 0x05 command, 0x06 response, 0x11 codec 14 nACK.
    :ivar payload: the command or response bytes, without the IMEI or timestamp prefix.
    :ivar imei: codec 14 only: the IMEI carried in the message.
    :ivar timestamp_ms: codec 13 only: the message time in milliseconds.
    """

    codec_id: int
    message_type: int
    payload: bytes
    imei: str | None = None
    timestamp_ms: int | None = None

    @property
    def text(self) -> str | None:
        """The payload as text when it is printable ASCII (CR, LF and tab allowed), else None."""
        try:
            text = self.payload.decode("ascii")
        except UnicodeDecodeError:
            return None
        if all(c.isprintable() or c in "\r\n\t" for c in text):
            return text
        return None


@attrs.frozen(slots=True)
class MessagePacket:
    """The decoded body of a codec 12, 13 or 14 frame (one message in practice)."""

    codec_id: int
    messages: tuple[DeviceMessage, ...]

    @property
    def codec_name(self) -> str:
        return CODEC_NAMES.get(self.codec_id, f"0x{self.codec_id:02X}")


Packet = AVLPacket | MessagePacket


@attrs.frozen(slots=True)
class UDPEnvelope:
    """The envelope of one UDP AVL datagram: everything but the body.

    The server decodes the body apart (through the codec registry, so a codec plugin
    works over UDP as over TCP); the layout is in docs/protocol.rst, section 'Datagram
    layout'.

    :ivar packet_id: channel packet id, echoed in the ACK.
    :ivar packet_type: byte 4 ("not usable byte"; 0x01 in every verified datagram).
    :ivar avl_packet_id: AVL packet id, echoed in the ACK; the device checks it.
    :ivar imei: the sender's IMEI (ASCII digits, length not yet checked).
    :ivar body_start: offset of the body (its codec id byte); it runs to the datagram's end.
    """

    packet_id: int
    packet_type: int
    avl_packet_id: int
    imei: str
    body_start: int


@attrs.frozen(slots=True)
class UDPPacket:
    """One UDP AVL datagram: an envelope around an AVL body.

    The layout is in docs/protocol.rst, section 'Datagram layout'.

    :ivar packet_id: channel packet id, echoed in the ACK.
    :ivar packet_type: byte 4 ("not usable byte"; 0x01 in every verified datagram).
    :ivar avl_packet_id: AVL packet id, echoed in the ACK; the device checks it.
    :ivar imei: the sender's IMEI.
    :ivar packet: the AVL body.
    """

    packet_id: int
    packet_type: int
    avl_packet_id: int
    imei: str
    packet: AVLPacket


@attrs.frozen(slots=True)
class ImeiFrame:
    """A login packet: the raw IMEI bytes as sent (validate with :func:`parse_imei`)."""

    raw: bytes


@attrs.frozen(slots=True)
class DataFrame:
    """A complete TCP data frame (preamble, length, body, CRC field), not yet validated."""

    raw: bytes

    @property
    def codec_id(self) -> int:
        return self.raw[8]


@attrs.frozen(slots=True)
class Keepalive:
    """The one-byte 0xFF ping a device sends on an idle link; it gets no reply."""


KEEPALIVE: Final = Keepalive()

Frame = ImeiFrame | DataFrame | Keepalive
