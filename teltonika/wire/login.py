"""The IMEI login packet and its one-byte reply.

docs/protocol.rst, sections 'Login' and 'Accept and reject'.
"""

from __future__ import annotations

from typing import Final

from teltonika.wire.errors import ImeiError

IMEI_LENGTH: Final = 15
ACCEPT: Final = b"\x01"
REJECT: Final = b"\x00"


def luhn_ok(digits: str) -> bool:
    """True when *digits* pass the Luhn check that real IMEIs carry in their last digit."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def parse_imei(raw: bytes, *, luhn: bool = False) -> str:
    """Validate the body of a login packet and return the IMEI.

    :param luhn: also require a valid Luhn check digit. Off by default: test fleets and
        simulators routinely use IMEIs that fail it.
    :raise ImeiError: not exactly 15 ASCII digits, or a failed Luhn check when asked.
    """
    if len(raw) != IMEI_LENGTH or not raw.isdigit():
        shown = raw[:32].hex()
        raise ImeiError(f"IMEI must be {IMEI_LENGTH} ASCII digits, got {len(raw)} bytes {shown}", 2)
    imei = raw.decode("ascii")
    if luhn and not luhn_ok(imei):
        raise ImeiError(f"IMEI {imei} fails the Luhn check", 2)
    return imei


def encode_login(imei: str) -> bytes:
    """The login packet a device sends: u16 length then the IMEI in ASCII."""
    raw = imei.encode("ascii")
    return len(raw).to_bytes(2, "big") + raw


def tcp_ack(count: int) -> bytes:
    """The 4-byte reply to an AVL frame: the number of records accepted."""
    return count.to_bytes(4, "big")
