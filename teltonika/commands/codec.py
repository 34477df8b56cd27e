"""Codec 12 and 14 handlers: a command into a frame, a reply into text.

Codec 12 sends the payload as is; codec 14 puts the target IMEI in front of it, so the
device itself checks that the command reached the intended tracker and answers with a
type 0x11 nACK when it did not (docs/protocol.rst, section 'Codec 14'). Neither codec's
frames are ever acknowledged: devices log ``CODEC12 ERROR`` when they are (section
'Commands on a live socket').
"""

from __future__ import annotations

from typing import Final

from teltonika.protocol.queue import InvalidCommandError
from teltonika.wire import encode_command_frame
from teltonika.wire.records import CODEC_12, CODEC_14, DeviceMessage

MAX_PAYLOAD: Final = 4096
"""Largest command payload accepted (device command buffers are far smaller in practice)."""

CODECS: Final[dict[str, int]] = {"12": CODEC_12, "14": CODEC_14}


def codec_id_of(name: str) -> int:
    """``"12"`` or ``"14"`` to the codec id byte.

    :raise InvalidCommandError: any other name.
    """
    try:
        return CODECS[name]
    except KeyError:
        raise InvalidCommandError(f"codec must be 12 or 14, not {name!r}") from None


def encode_command(codec_id: int, payload: bytes, imei: str) -> bytes:
    """The complete TCP frame (type 0x05) that carries *payload* to *imei*.

    :raise InvalidCommandError: unknown codec, empty or oversized payload, or an IMEI
        that codec 14 cannot carry.
    """
    if codec_id not in (CODEC_12, CODEC_14):
        raise InvalidCommandError(f"codec 0x{codec_id:02X} is not 12 or 14")
    if not payload:
        raise InvalidCommandError("the command payload is empty")
    if len(payload) > MAX_PAYLOAD:
        raise InvalidCommandError(f"the payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if codec_id == CODEC_14 and not (imei.isascii() and imei.isdigit() and len(imei) <= 16):
        raise InvalidCommandError(f"codec 14 needs a numeric IMEI, not {imei!r}")
    return encode_command_frame(codec_id, payload, imei if codec_id == CODEC_14 else None)


def reply_text(message: DeviceMessage) -> str:
    """The reply as text: printable ASCII as is (trailing CR/LF dropped), else its hex."""
    text = message.text
    if text is None:
        return message.payload.hex()
    return text.rstrip("\r\n")
