"""The TCP data frame envelope: preamble, data length, body, CRC-16/IBM field.

Validation order (docs/protocol.rst, section 'Validation order'): lengths, then CRC, then
the codec's own structure (count, record walk). :func:`unwrap` does the first two; codecs
do the rest on the body it returns.
"""

from __future__ import annotations

from typing import Final

from teltonika.wire.crc import crc16
from teltonika.wire.errors import CRCError, FrameLengthError, PreambleError, TruncatedError

BODY_OFFSET: Final = 8
"""Offset of the codec id, where the CRC-covered body starts."""

_PREAMBLE: Final = b"\x00\x00\x00\x00"


def unwrap(frame: bytes) -> int:
    """Check the envelope of a complete data frame and return its body's end offset.

    The body (codec id through Number of Data 2) is ``frame[8:end]``; its CRC has been
    checked.

    :raise DecodeError: a wrong preamble, a length that does not match the frame size,
        non-zero CRC high bytes or a CRC mismatch.
    """
    size = len(frame)
    if size < 12:
        raise TruncatedError(f"data frame of {size} bytes is shorter than its 12-byte envelope", 0)
    if frame[:4] != _PREAMBLE:
        raise PreambleError("data frame preamble is not 00000000", 0)
    length = int.from_bytes(frame[4:8], "big")
    end = BODY_OFFSET + length
    if end + 4 != size:
        raise FrameLengthError(
            f"data length {length} does not match a {size}-byte frame (expected {length + 12})", 4
        )
    field = int.from_bytes(frame[end:], "big")
    if field >> 16:
        raise CRCError(f"CRC field 0x{field:08X} has non-zero high bytes", end)
    computed = crc16(frame[BODY_OFFSET:end])
    if computed != field:
        raise CRCError(f"CRC field 0x{field:04X} does not match computed 0x{computed:04X}", end)
    return end


def wrap(body: bytes) -> bytes:
    """Build a data frame around *body* (codec id through Number of Data 2)."""
    return _PREAMBLE + len(body).to_bytes(4, "big") + body + crc16(body).to_bytes(4, "big")
