"""CRC-16/IBM (CRC-16/ARC in the CRC catalogue) as Teltonika uses it.

Polynomial 0x8005 reflected (0xA001), initial value 0, no final XOR; check value
``crc16(b"123456789") == 0xBB3D``. It covers the bytes from the codec id through
Number of Data 2 of every TCP data frame (docs/protocol.rst, section 'CRC-16/IBM').

We use ``fastcrc`` (a maintained Rust extension): measured here it is about 20x faster
than ``crcmod`` and 3x faster than ``anycrc`` on a 1 KiB frame, and the CRC runs on every
frame a tracker sends. It is a hard dependency, so there is no pure-Python fallback.
"""

from __future__ import annotations

from fastcrc import crc16 as _fastcrc16

crc16 = _fastcrc16.arc
"""``crc16(data: bytes) -> int``: CRC-16/IBM of *data*."""
