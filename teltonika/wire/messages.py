"""Decode and encode the message codecs: 12 (commands), 13 (timestamped), 14 (IMEI-addressed).

Layout of the body (docs/protocol.rst, section 'Common message frame'), after the envelope::

    codec id | quantity 1 | (type | size S u32 | S bytes)* | quantity 2

Codec 13 prefixes the S bytes with a timestamp, codec 14 with the IMEI as 8 BCD bytes.
None of these frames is ever acknowledged (docs/protocol.rst, section 'Commands on a live
socket'): devices log errors when they are.

The two quantities are not trusted. Teltonika's codec description says "Command Quantity 1
is ignored when parsing" and does not parse Quantity 2 either; frames in the field carry
two messages under quantity 1 = 1, or quantity 2 different from quantity 1. So the
decoder reads messages one after another until the end of the data (the byte before
quantity 2, found from the outer data length), and every message must end exactly there.
"""

from __future__ import annotations

from typing import Final

from teltonika.wire.errors import (
    DecodeError,
    FieldValueError,
    RecordCountError,
    TruncatedError,
)
from teltonika.wire.records import (
    CODEC_12,
    CODEC_13,
    CODEC_14,
    MESSAGE_CODEC_IDS,
    MESSAGE_TYPE_COMMAND,
    DeviceMessage,
    MessagePacket,
)

IMEI_BCD_SIZE: Final = 8
MAX_MESSAGES: Final = 255
"""Most messages one frame may hold: what the quantity byte can count. Devices send one;
the cap keeps a hostile frame from turning into thousands of published messages."""
_SECONDS_THRESHOLD: Final = 0x10000000
_MILLIS_LIMIT: Final = (1 << 32) * 1000


def imei_to_bcd(imei: str) -> bytes:
    """Encode a 15-digit IMEI as codec 14's 8 bytes: '0' + 15 digits as hex nibbles."""
    if not (imei.isdigit() and imei.isascii() and len(imei) <= 16):
        raise ValueError(f"IMEI must be up to 16 decimal digits, not {imei!r}")
    return bytes.fromhex(imei.rjust(16, "0"))


def bcd_to_imei(raw: bytes, offset: int = 0) -> str:
    """Decode codec 14's 8-byte IMEI; the single padding nibble is dropped."""
    digits = raw.hex()
    if not digits.isdigit():
        raise FieldValueError(f"IMEI bytes {digits} are not BCD digits", offset)
    return digits[1:] if len(digits) == 16 and digits[0] == "0" else digits


def decode_messages(data: bytes, start: int, end: int) -> MessagePacket:
    """Decode a message body ``data[start:end]`` (codec id through quantity 2).

    :raise DecodeError: any structural problem; nothing else escapes.
    """
    if end - start < 8 or end > len(data):
        raise TruncatedError(f"message body of {end - start} bytes is too short", start)
    codec_id = data[start]
    if codec_id not in MESSAGE_CODEC_IDS:
        raise FieldValueError(f"codec id 0x{codec_id:02X} is not a message codec", start)
    last = end - 1  # quantity 2: not parsed, like quantity 1
    offset = start + 2
    messages: list[DeviceMessage] = []
    while offset < last:
        if len(messages) == MAX_MESSAGES:
            raise RecordCountError(f"more than {MAX_MESSAGES} messages in one frame", offset)
        if offset + 5 > last:
            raise TruncatedError(
                f"{last - offset} bytes before quantity 2 are too few for a message header",
                offset,
            )
        message_type = data[offset]
        size = int.from_bytes(data[offset + 1 : offset + 5], "big")
        offset += 5
        if offset + size > last:
            raise TruncatedError(
                f"message size {size} runs past the body ({last - offset} bytes remain)",
                offset - 4,
            )
        body = data[offset : offset + size]
        messages.append(_decode_message(codec_id, message_type, body, offset))
        offset += size
    return MessagePacket(codec_id, tuple(messages))


def _decode_message(codec_id: int, message_type: int, body: bytes, offset: int) -> DeviceMessage:
    if codec_id == CODEC_14:
        if len(body) < IMEI_BCD_SIZE:
            raise TruncatedError("codec 14 message is shorter than its 8-byte IMEI", offset)
        imei = bcd_to_imei(body[:IMEI_BCD_SIZE], offset)
        return DeviceMessage(codec_id, message_type, body[IMEI_BCD_SIZE:], imei=imei)
    if codec_id == CODEC_13:
        if len(body) < 4:
            raise TruncatedError("codec 13 message is shorter than its timestamp", offset)
        # docs/protocol.rst, section 'Codec 13': 4-byte seconds in real captures, 8-byte
        # milliseconds in the wiki. An implausibly early seconds value is re-read as
        # milliseconds, but only when that reading is itself plausible (before 2106, the
        # end of u32 seconds); otherwise the seconds reading stands (vector
        # c13_alim_four_byte_timestamp).
        seconds = int.from_bytes(body[:4], "big")
        if seconds < _SECONDS_THRESHOLD and len(body) >= 8:
            millis = int.from_bytes(body[:8], "big")
            if millis < _MILLIS_LIMIT:
                return DeviceMessage(codec_id, message_type, body[8:], timestamp_ms=millis)
        return DeviceMessage(codec_id, message_type, body[4:], timestamp_ms=seconds * 1000)
    return DeviceMessage(codec_id, message_type, body)


def encode_message(
    codec_id: int,
    payload: bytes,
    message_type: int = MESSAGE_TYPE_COMMAND,
    imei: str | None = None,
    timestamp_ms: int | None = None,
) -> bytes:
    """Encode one codec 12/13/14 message as a body (wrap it for TCP).

    :param imei: required for codec 14.
    :param timestamp_ms: required for codec 13 (written as 4-byte seconds, as devices do).
    """
    if codec_id == CODEC_14:
        if imei is None:
            raise ValueError("a codec 14 message needs an IMEI")
        inner = imei_to_bcd(imei) + payload
    elif codec_id == CODEC_13:
        if timestamp_ms is None:
            raise ValueError("a codec 13 message needs a timestamp")
        inner = (timestamp_ms // 1000).to_bytes(4, "big") + payload
    elif codec_id == CODEC_12:
        inner = payload
    else:
        raise ValueError(f"codec id 0x{codec_id:02X} is not a message codec")
    return bytes((codec_id, 1, message_type)) + len(inner).to_bytes(4, "big") + inner + b"\x01"


__all__ = [
    "DecodeError",
    "bcd_to_imei",
    "decode_messages",
    "encode_message",
    "imei_to_bcd",
]
