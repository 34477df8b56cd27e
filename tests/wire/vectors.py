"""The protocol test vectors, shipped with the tests.

``vectors.json`` beside this module holds the reference frames (documentation examples and
real-device captures; each entry names its source); docs/protocol.rst, section 'Test
vectors', describes what they cover and the format of an entry. Set ``TELTONIKA_VECTORS``
to run the suite against another copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

VECTORS_PATH = Path(os.environ.get("TELTONIKA_VECTORS") or Path(__file__).with_name("vectors.json"))


def load_vectors() -> list[dict[str, Any]]:
    """Every vector, in file order."""
    with VECTORS_PATH.open(encoding="utf-8") as handle:
        vectors: list[dict[str, Any]] = json.load(handle)
    return vectors


VECTORS = load_vectors()
BY_NAME = {vector["name"]: vector for vector in VECTORS}


def frame(name: str) -> bytes:
    """The bytes of the vector called *name*."""
    return bytes.fromhex(BY_NAME[name]["hex"])


def is_valid(vector: dict[str, Any]) -> bool:
    """A vector the decoders must accept: its CRC (if any) and structure are good."""
    return vector["crc_ok"] is not False and vector["structure_ok"] is not False
