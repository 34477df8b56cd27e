"""Cut a TCP byte stream into Teltonika frames, whatever the read boundaries.

docs/protocol.rst, section 'Dispatch rule', gives the rule every capture obeys:

* ``FF`` is a one-byte keepalive (allowed anywhere, even before the login);
* two non-zero bytes ``L`` start an IMEI packet of ``2 + L`` bytes;
* ``00 00 00 00`` starts a data frame whose u32 data length ``L`` at offset 4 gives a
  total size of ``12 + L`` bytes (preamble, length, body, CRC field).

There is no sync marker, so once a length cannot be trusted the stream is lost: the
framer raises a :class:`~teltonika.wire.errors.FramingError` and refuses any further
input. Every length is checked against its cap *before* the body is buffered, so a hostile
peer can make us hold at most one maximum-size frame (plus the bytes of one read).

The framer only cuts; it checks no CRC and decodes no records. That is the codecs' job.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from teltonika.wire.errors import FrameLengthError, FramingError, PreambleError
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
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < MIN_DATA_LENGTH + FRAME_OVERHEAD:
            raise ValueError(f"max_frame must be at least {MIN_DATA_LENGTH + FRAME_OVERHEAD}")
        self.max_frame = max_frame
        self._buffer = b""
        self._offset = 0
        self._error: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes) -> Iterator[Frame]:
        """Add *data* and yield every frame it completes, in stream order.

        Frames found before a framing error are yielded first; the error is raised when the
        iteration reaches it, and every later call raises it again.

        :raise FramingError: the stream cannot be cut any more (bad length or preamble).
        """
        if self._error is not None:
            raise self._error
        buf = self._buffer[self._offset :] + data if self._offset < len(self._buffer) else data
        self._buffer, self._offset = buf, 0
        size = len(buf)
        offset = 0
        max_frame = self.max_frame
        try:
            while offset < size:
                if buf[offset] == 0xFF:
                    offset += 1
                    self._offset = offset
                    yield KEEPALIVE
                    continue
                if size - offset < 2:
                    break
                head = (buf[offset] << 8) | buf[offset + 1]
                if head:
                    if head > MAX_IMEI_LENGTH:
                        raise self._imei_length_error(head, offset)
                    end = offset + 2 + head
                    if end > size:
                        break
                    frame: Frame = ImeiFrame(buf[offset + 2 : end])
                else:
                    if size - offset < 4:
                        break
                    if buf[offset + 2] or buf[offset + 3]:
                        raise PreambleError("data frame preamble is not 00000000", offset)
                    if size - offset < 8:
                        break
                    length = int.from_bytes(buf[offset + 4 : offset + 8], "big")
                    if length < MIN_DATA_LENGTH:
                        raise FrameLengthError(
                            f"data length {length} is below the minimum {MIN_DATA_LENGTH}",
                            offset + 4,
                        )
                    if length + FRAME_OVERHEAD > max_frame:
                        raise FrameLengthError(
                            f"data length {length} makes a frame above the "
                            f"{max_frame}-byte maximum",
                            offset + 4,
                        )
                    end = offset + FRAME_OVERHEAD + length
                    if end > size:
                        break
                    frame = DataFrame(buf[offset:end])
                offset = end
                self._offset = offset
                yield frame
        except FramingError as error:
            self._error = error
            self._buffer, self._offset = b"", 0
            raise
        self._buffer = buf[offset:] if offset < size else b""
        self._offset = 0

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
