"""A record's identity: its canonical content and the 64-bit hash that keys its row.

``positions`` is unique on ``(device_id, ts, record_hash)``. ``(device_id, ts)`` alone is
not enough: trackers stamp records in whole seconds, and two *different* records of one
device often share a second (an ignition event and the periodic record of that second,
several IO events triggered together, codec 16's On-Change and Eventual records). A true
resend (the same record again: only ``received_at_ms`` and ``instance_id`` differ) must
still map to the same key, so the hash covers the record's content and nothing the
ingestion side adds. README.rst, "The record contract", documents the canonical text so
that any other consumer can reproduce the hash; migration ``003_record_hash.sql`` holds
the same computation in SQL (``teltonika_record_hash``) for rows already stored.

The canonical text joins with ``|``, in the contract's field order:
``timestamp_ms``, ``latitude``, ``longitude``, ``altitude``, ``angle``, ``speed``,
``satellites``, ``priority``, ``event_io_id``, ``generation_type`` (``""`` when absent),
and the IO bag. Numbers are plain decimals (no ``+``, no leading zeros, no ``-0``);
degrees drop trailing fractional zeros (:func:`canonical_degrees`); the IO bag is compact
JSON with its sentinels reversed (a ``__bigint`` as its digits, a ``__buffer_b64`` as a
string of lowercase hex) and its ``"id":value`` elements in byte order of the id. The
hash is the first 8 bytes of the SHA-256 of that text (UTF-8), read as a big-endian
signed 64-bit integer (PostgreSQL's ``bigint``).

SHA-256 rather than a faster non-cryptographic hash: PostgreSQL has it built in (the
migration computes it in SQL for existing rows) and every language has it. The digest is
not the expensive part: of the 3 to 4 microseconds the key costs per record on the reactor
thread, sorting the IO bag's elements takes a third and the digest a quarter (README.rst,
the processor's "Benchmark").
"""

from __future__ import annotations

import struct
from hashlib import sha256

_first_eight = struct.Struct(">q").unpack_from
"""The first 8 bytes of a digest as a big-endian signed 64-bit integer."""


def canonical_degrees(text: str) -> str:
    """Degrees as the contract's writer formats them: ``54.6872000`` -> ``54.6872``,
    ``054.10`` -> ``54.1``, ``-0.0`` -> ``0``, ``12.0`` -> ``12``.

    The one text form of a latitude or longitude everywhere in the processor: the record
    hash, the per-device state, rehydrated rows (``numeric(10,7)`` prints seven decimals)
    and anything serving positions (the live broadcast).

    :param text: a decimal, optionally negative (already checked by the caller).
    """
    negative = text.startswith("-")
    whole, _, fraction = (text[1:] if negative else text).partition(".")
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    out = f"{whole}.{fraction}" if fraction else whole
    return "-" + out if negative and out != "0" else out


def record_hash(
    timestamp_ms: str,
    latitude: str,
    longitude: str,
    altitude: str,
    angle: str,
    speed: str,
    satellites: str,
    priority: str,
    event_io_id: str,
    generation_type: str | None,
    io: str,
) -> int:
    """The ``record_hash`` key column of one record (see the module docstring).

    Every argument is already canonical decimal text, and *io* compact JSON with canonical
    ids and values (what :func:`teltonika.processor.entries.reverse_io` returns): no
    element of it holds a comma, so splitting on commas yields the ``"id":value``
    elements, and since each starts with a quoted id and a quote sorts before every digit,
    sorting the elements sorts them by id. Written as one function, without helpers: it
    runs once per record on the reactor thread.
    """
    elements = io[1:-1].split(",")
    elements.sort()
    text = (
        f"{timestamp_ms}|{latitude}|{longitude}|{altitude}|{angle}|{speed}|{satellites}|"
        f"{priority}|{event_io_id}|{generation_type or ''}|{{{','.join(elements)}}}"
    )
    return _first_eight(sha256(text.encode("utf-8")).digest())[0]  # type: ignore[no-any-return]
