"""Cut a TCP byte stream into Teltonika frames, whatever the read boundaries.

docs/protocol.rst, section 'Dispatch rule', gives the rule every capture obeys:

* ``FF`` is a one-byte keepalive (allowed anywhere, even before the login);
* two non-zero bytes ``L`` start an IMEI packet of ``2 + L`` bytes;
* ``00 00 00 00`` starts a data frame whose u32 data length ``L`` at offset 4 gives a
  total size of ``12 + L`` bytes (preamble, length, body, CRC field).

There is no sync marker, so once a length cannot be trusted the stream is lost: the
framer raises a :class:`~teltonika.wire.errors.FramingError` and refuses any further
input. Every length is checked against its cap *before* the body is buffered, so a hostile
peer can make us hold at most one maximum-size frame (plus the bytes of one read). With
``login_first`` a data frame that comes before any IMEI packet is refused at its first two
bytes, so a peer that never logged in cannot make us hold a frame body at all.

Reads stay linear in the bytes received: whole frames are cut straight out of each read,
and only an incomplete frame is kept, in a ``bytearray`` that later reads are appended to
(amortised constant time per byte) instead of being copied again on every read.

The framer only cuts; it checks no CRC and decodes no records. That is the codecs' job.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from teltonika.wire.errors import (
    DataBeforeLoginError,
    FrameLengthError,
    FramingError,
    PreambleError,
)
from teltonika.wire.records import KEEPALIVE, DataFrame, Frame, ImeiFrame

DEFAULT_MAX_FRAME: Final = 64 * 1024
"""Default cap on a whole data frame in bytes. Teltonika documents 512 and 1280 byte
packets, but NX elements are unbounded by the format and verified captures exceed 1 KiB,
so the cap is generous: it bounds memory per connection rather than policing devices
(docs/protocol.rst, section 'Size limits')."""

MAX_IMEI_LENGTH: Final = 17
"""Longest IMEI packet body framed (an IMEI is 15 digits; other lengths up to 17 are framed
and left to the login check; docs/protocol.rst, section 'Length caps'). Anything longer is
not a tracker: a TLS ClientHello (``16 03 ...``) reads as 5635."""

MIN_DATA_LENGTH: Final = 8
"""Smallest data length of any frame: an empty codec 12 message (codec, quantity, type,
size, quantity). AVL codecs need more and their decoders say so."""

FRAME_OVERHEAD: Final = 12
"""Preamble (4) + data length (4) + CRC field (4)."""

_TLS_HANDSHAKE_PREFIX: Final = 0x1603


class Framer:
    """An incremental frame splitter for one TCP connection.

    Feed it every chunk ``dataReceived`` gets; iterate what :meth:`feed` yields.

    :param max_frame: largest whole data frame accepted, framing bytes included.
    :param login_first: refuse a data frame until an IMEI packet has been cut (the server's
        setting; a device sends its IMEI first and may send data before the ``01`` arrives,
        so the rule is about the stream, not about the login decision).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, login_first: bool = False) -> None:
        if max_frame < MIN_DATA_LENGTH + FRAME_OVERHEAD:
            raise ValueError(f"max_frame must be at least {MIN_DATA_LENGTH + FRAME_OVERHEAD}")
        self.max_frame = max_frame
        self._partial = bytearray()
        self._error: FramingError | None = None
        self._need_login = login_first

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._partial)

    def feed(self, data: bytes) -> Iterator[Frame]:
        """Add *data* and yield every frame it completes, in stream order.

        Frames found before a framing error are yielded first; the error is raised when the
        iteration reaches it, and every later call raises it again.

        :raise FramingError: the stream cannot be cut any more (bad length or preamble,
            or data before the IMEI packet with ``login_first``).
        """
        if self._error is not None:
            raise self._error
        partial = self._partial
        buf: bytes | bytearray
        if partial:
            partial += data
            buf = partial
        else:
            buf = data
        consumed = 0
        try:
            for end, frame in self._cut(buf):
                consumed = end
                yield frame
        except FramingError as error:
            self._error = error
            partial.clear()
            raise
        finally:
            # Also reached when the caller stops iterating early: the frames it was given
            # are consumed, the rest stays for the next read.
            if self._error is None:
                if buf is partial:
                    del partial[:consumed]
                elif consumed < len(buf):
                    partial += memoryview(buf)[consumed:]

    def _cut(self, buf: bytes | bytearray) -> Iterator[tuple[int, Frame]]:
        """Yield ``(end offset, frame)`` for every complete frame at the start of *buf*."""
        size = len(buf)
        offset = 0
        max_frame = self.max_frame
        while offset < size:
            if buf[offset] == 0xFF:
                offset += 1
                yield offset, KEEPALIVE
                continue
            if size - offset < 2:
                return
            head = (buf[offset] << 8) | buf[offset + 1]
            if head:
                if head > MAX_IMEI_LENGTH:
                    raise self._imei_length_error(head, offset)
                end = offset + 2 + head
                if end > size:
                    return
                # bytes() copies a slice of the bytearray and is free for a bytes slice
                frame: Frame = ImeiFrame(bytes(buf[offset + 2 : end]))
                self._need_login = False
            else:
                if self._need_login:
                    raise DataBeforeLoginError(
                        "data frame before the IMEI packet: refused at its header", offset
                    )
                if size - offset < 4:
                    return
                if buf[offset + 2] or buf[offset + 3]:
                    raise PreambleError("data frame preamble is not 00000000", offset)
                if size - offset < 8:
                    return
                length = int.from_bytes(buf[offset + 4 : offset + 8], "big")
                if length < MIN_DATA_LENGTH:
                    raise FrameLengthError(
                        f"data length {length} is below the minimum {MIN_DATA_LENGTH}",
                        offset + 4,
                    )
                if length + FRAME_OVERHEAD > max_frame:
                    raise FrameLengthError(
                        f"data length {length} makes a frame above the {max_frame}-byte maximum",
                        offset + 4,
                    )
                end = offset + FRAME_OVERHEAD + length
                if end > size:
                    return
                frame = DataFrame(bytes(buf[offset:end]))
            offset = end
            yield offset, frame

    @staticmethod
    def _imei_length_error(head: int, offset: int) -> FrameLengthError:
        if head == _TLS_HANDSHAKE_PREFIX:
            return FrameLengthError(
                "looks like a TLS ClientHello (16 03): the device is configured for TLS "
                "but talks to a plain port",
                offset,
            )
        return FrameLengthError(
            f"IMEI length {head} is above the maximum {MAX_IMEI_LENGTH}", offset
        )
