"""The ledger check: is every record the server ACKed really in its sink?

An ACK is the server's promise that the records are durable (in the Redis stream
``telemetry:teltonika``, or fsynced in the JSON lines file; see :mod:`teltonika.contract`).
This module reads the sink back and compares it with the fleet's ledger, keyed by
``(imei, timestamp_ms)``:

* ACKed but missing -> the promise was broken: the check fails;
* present more than once -> a duplicate, expected after lost ACKs and resends: reported only
  (downstream deduplicates by IMEI and timestamp);
* present but never ACKed -> fine (stored, but the ACK was lost on the way).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import attrs
import orjson
from twisted.internet.defer import Deferred

from teltonika.contract import TELEMETRY_STREAM
from teltonika.simulate.ledger import Ledger

PAGE: Final = 10_000
Key = tuple[str, int]


@attrs.frozen
class VerifyResult:
    """The outcome of a ledger check.

    :ivar sink: what was read ("redis://... stream" or a path).
    :ivar acked: records in the ledger.
    :ivar found: ledger records present in the sink at least once.
    :ivar missing: ACKed records absent from the sink (must be zero).
    :ivar duplicated: ledger records present more than once.
    :ivar extra_copies: copies beyond the first, over all records.
    :ivar entries: sink entries read (all devices, ours or not).
    :ivar unreadable: sink entries that could not be parsed.
    :ivar missing_sample: a few missing ``[imei, timestamp_ms]`` for the report.
    """

    sink: str
    acked: int
    found: int
    missing: int
    duplicated: int
    extra_copies: int
    entries: int
    unreadable: int
    missing_sample: list[list[Any]]

    @property
    def ok(self) -> bool:
        return self.missing == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sink": self.sink,
            "acked": self.acked,
            "found": self.found,
            "missing": self.missing,
            "duplicated": self.duplicated,
            "extra_copies": self.extra_copies,
            "entries": self.entries,
            "unreadable": self.unreadable,
            "missing_sample": self.missing_sample,
            "ok": self.ok,
        }


def compare(ledger: Ledger, present: Counter[Key], sink: str, unreadable: int = 0) -> VerifyResult:
    """Compare the ledger's ACKed records with the records found in the sink."""
    acked = found = duplicated = extra = 0
    missing: list[list[Any]] = []
    missing_count = 0
    for imei, stamps in ledger.acked.items():
        for stamp in stamps:
            acked += 1
            copies = present.get((imei, stamp), 0)
            if copies:
                found += 1
                if copies > 1:
                    duplicated += 1
                    extra += copies - 1
            else:
                missing_count += 1
                if len(missing) < 20:
                    missing.append([imei, stamp])
    return VerifyResult(
        sink=sink,
        acked=acked,
        found=found,
        missing=missing_count,
        duplicated=duplicated,
        extra_copies=extra,
        entries=sum(present.values()),
        unreadable=unreadable,
        missing_sample=missing,
    )


def read_jsonl(path: str | Path) -> tuple[Counter[Key], int]:
    """Count ``(imei, timestamp_ms)`` over a JSON lines sink file.

    A torn last line (a crash mid-write of a record that was never ACKed) is counted as
    unreadable, not an error.
    """
    present: Counter[Key] = Counter()
    unreadable = 0
    with open(path, "rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
                present[(str(record["imei"]), int(record["timestamp_ms"]))] += 1
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                unreadable += 1
    return present, unreadable


def count_entries(entries: Iterable[Any], present: Counter[Key]) -> tuple[int, str | None]:
    """Count one XRANGE page into *present*; return (unreadable, last id)."""
    unreadable = 0
    last: str | None = None
    for entry in entries:
        entry_id, flat = entry[0], entry[1]
        last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        fields: dict[str, Any] = {}
        for index in range(0, len(flat) - 1, 2):
            name = flat[index]
            fields[name.decode() if isinstance(name, bytes) else str(name)] = flat[index + 1]
        try:
            imei = fields["imei"]
            stamp = fields["timestamp_ms"]
            present[
                (
                    imei.decode() if isinstance(imei, bytes) else str(imei),
                    int(stamp),
                )
            ] += 1
        except (KeyError, ValueError, TypeError):
            unreadable += 1
    return unreadable, last


async def read_redis(url: str, stream: str = TELEMETRY_STREAM) -> tuple[Counter[Key], int]:
    """Count ``(imei, timestamp_ms)`` over the whole Redis stream, page by page.

    :return: the counts and the number of unreadable entries.
    """
    from teltonika.redis.connect import lazy_connection, parse_redis_url
    from teltonika.redis.connection import reply_list

    connection = lazy_connection(parse_redis_url(url), reply_timeout=30.0)
    present: Counter[Key] = Counter()
    unreadable = 0
    try:
        start = "-"
        while True:
            page = reply_list(
                await connection.execute_command("XRANGE", stream, start, "+", "COUNT", PAGE)
            )
            if not page:
                break
            bad, last = count_entries(page, present)
            unreadable += bad
            if last is None or len(page) < PAGE:
                break
            start = "(" + last
    finally:
        await connection.disconnect()
    return present, unreadable


def verify_redis(ledger: Ledger, url: str, stream: str = TELEMETRY_STREAM) -> Deferred[Any]:
    """:func:`read_redis` then :func:`compare`; fires with a :class:`VerifyResult`."""
    d = Deferred.fromCoroutine(read_redis(url, stream))
    d.addCallback(lambda found: compare(ledger, found[0], f"{url} {stream}", found[1]))
    return d


def verify_jsonl(ledger: Ledger, path: str | Path) -> VerifyResult:
    present, unreadable = read_jsonl(path)
    return compare(ledger, present, str(path), unreadable)
