"""The one error family every decoder raises.

Every byte from the network is hostile, so the decoders promise that *nothing but*
:class:`DecodeError` (or a subclass) ever escapes them, whatever the input. Each subclass
names a precise failure and its message names the field and the byte offset, so that a
log line is enough to see what a device (or an attacker) sent.

Each error also carries a short, stable ``reason`` string. The server uses it as the
low-cardinality label of its decode-error metric, so it must never contain data.
"""

from __future__ import annotations


class DecodeError(Exception):
    """Bytes that are not a valid Teltonika frame.

    :ivar reason: a stable identifier for metrics (``"crc"``, ``"truncated"``, ...).
    :ivar offset: byte offset in the frame (or datagram) where the problem was found.
    """

    reason = "malformed"

    def __init__(self, message: str, offset: int | None = None) -> None:
        if offset is not None:
            message = f"{message} (at offset {offset})"
        super().__init__(message)
        self.offset = offset


class FramingError(DecodeError):
    """The TCP byte stream cannot be cut into frames any more; the connection is unusable."""

    reason = "framing"


class FrameLengthError(FramingError):
    """A declared length (data length or IMEI length) is zero, too small or above the cap."""

    reason = "length"


class DataBeforeLoginError(FramingError):
    """A data frame started before the IMEI packet (a login must come first)."""

    reason = "before_login"


class PreambleError(FramingError):
    """The four preamble bytes of a data frame are not zero."""

    reason = "preamble"


class TruncatedError(DecodeError):
    """A field runs past the end of the bytes that should contain it."""

    reason = "truncated"


class CRCError(DecodeError):
    """The CRC-16/IBM field does not match the data."""

    reason = "crc"


class RecordCountError(DecodeError):
    """Number of Data 1 and Number of Data 2 differ, or the count is zero."""

    reason = "count"


class TrailingBytesError(DecodeError):
    """Bytes are left over after the last field where the length said the data ends."""

    reason = "trailing"


class FieldValueError(DecodeError):
    """A field holds a value the format does not allow (an IO count mismatch, a bad IMEI...)."""

    reason = "field"


class UnknownCodecError(DecodeError):
    """No codec is registered for this codec id."""

    reason = "unknown_codec"

    def __init__(self, codec_id: int, offset: int | None = None) -> None:
        super().__init__(f"unknown codec id 0x{codec_id:02X}", offset)
        self.codec_id = codec_id


class ImeiError(DecodeError):
    """The login packet does not carry a valid IMEI."""

    reason = "imei"
