"""Any entry, whatever its bytes, ends as exactly one row or one dead letter: property-based,
through ``Consumer.prepare`` alone and through a running consumer against a real Redis and
a real PostgreSQL."""

from __future__ import annotations

from typing import Any, cast

import psycopg
import pytest_twisted
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from teltonika.contract import entry_fields
from teltonika.processor.consumer import Consumer
from teltonika.processor.entries import ContractError, fields_dict, parse_entry
from teltonika.processor.metrics import ProcessorMetrics
from teltonika.processor.state import DeviceState
from teltonika.redis.groups import Entry
from tests.helpers import LoggedErrors, successResultOf
from tests.processor.helpers import DEAD, Processors, eventually, pending, record, sample, xrange
from tests.processor.strategies import field_values, hostile_fields, huge_bigint_entry

IMEIS = st.sampled_from(["356307042441013", "356307042441014"])


@st.composite
def field_maps(draw: st.DrawFn) -> list[Any]:
    """A flat field list: a valid entry of one of two devices (a few seconds apart, so that
    some are duplicates), hostile in up to three fields, or arbitrary names and values
    (text or bytes); never empty (Redis refuses an empty entry)."""
    fields: dict[Any, Any] = dict(draw(hostile_fields()))
    if draw(st.booleans()):
        rec = record(draw(st.integers(0, 5)) * 1000, speed=draw(st.integers(0, 2)))
        flat = entry_fields(draw(IMEIS), "8E", rec, rec.timestamp_ms + 1, "i")
        valid = fields_dict([v.decode() for v in flat])
        changed = {k: v for k, v in fields.items() if draw(st.integers(0, 3)) == 0}
        fields = {**valid, **changed}
    if draw(st.booleans()):
        fields.update(draw(st.dictionaries(st.binary(max_size=8), field_values, max_size=3)))
    if not fields:
        fields = {"v": "1"}
    return [part for pair in fields.items() for part in pair]


def as_sent(flat: list[Any]) -> dict[bytes, bytes]:
    """The entry as bytes for XADD (text with lone surrogates becomes the bytes Python
    would write for it: not UTF-8, like any other hostile bytes)."""
    raw = [v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass") for v in flat]
    return dict(zip(raw[::2], raw[1::2], strict=True))


def as_read(flat: list[Any]) -> list[Any]:
    """What the processor's reader sees: every value decoded as UTF-8 with replacement."""
    raw = as_sent(flat)
    return [v.decode("utf-8", "replace") for pair in raw.items() for v in pair]


class Unused:
    """Stands for the stores prepare() never touches on new entries."""

    consumer = "prop"


def with_a_huge_bigint() -> list[list[Any]]:
    """A valid entry, the entry that used to kill the consumer, another valid entry."""
    valid = entry_fields("356307042441013", "8E", record(0), 1, "i")
    bad = [part for pair in huge_bigint_entry().items() for part in pair]
    return [valid, bad, entry_fields("356307042441013", "8E", record(1), 1, "i")]


@example(batch=with_a_huge_bigint())
@given(batch=st.lists(field_maps(), min_size=1, max_size=20))
def test_prepare_puts_every_entry_in_one_place(batch: list[list[Any]]) -> None:
    """prepare() sorts every entry of a batch into exactly one of positions or dead letters
    (a ContractError reason, never the check_failed safety net), and the COPY payload has
    one line per position."""
    consumer = Consumer(
        Unused(),  # type: ignore[arg-type]
        Unused(),  # type: ignore[arg-type]
        DeviceState(10),
        ProcessorMetrics.create(CollectorRegistry()),
        Clock(),
    )
    entries = [Entry(f"{n}-0", as_read(flat)) for n, flat in enumerate(batch)]
    prepared = successResultOf(Deferred.fromCoroutine(consumer.prepare(entries, redelivered=False)))
    placed = [p.entry_id for p in prepared.positions] + [d.entry_id for d in prepared.dead]
    assert sorted(placed) == sorted(e.entry_id for e in entries)
    assert all(letter.reason != "check_failed" for letter in prepared.dead)
    lines = prepared.payload.count(b"\n") if prepared.payload else 0
    assert lines == len(prepared.positions)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(batch=with_a_huge_bigint())
@given(batch=st.lists(field_maps(), min_size=1, max_size=15))
@pytest_twisted.ensureDeferred
async def test_every_entry_ends_as_one_row_or_one_dead_letter(
    processors: Processors,
    rds: redis.Redis,
    pg_dsn: str,
    logged_errors: LoggedErrors,
    batch: list[list[Any]],
) -> None:
    """Arbitrary entries through a running processor: all are acknowledged; every one
    is either a dead letter (exactly one, with its id) or its row is in positions; rows
    inserted plus duplicates plus dead letters add up to the entries read."""
    if not processors.running:
        processors.start("--batch-size", "7")
    service = processors.running[0]

    def metric(name: str) -> float:
        return sample(service, f"teltonika_processor_{name}_total")

    base = {name: metric(name) for name in ("entries_acked", "rows_inserted", "duplicates")}
    last_letter = str((rds.xrevrange(DEAD, count=1) or [("0-0", None)])[0][0])
    ids = [
        str(rds.xadd("telemetry:teltonika", cast("dict[Any, Any]", as_sent(flat))))
        for flat in batch
    ]

    def acked() -> bool:
        return metric("entries_acked") >= base["entries_acked"] + len(ids) and pending(rds) == 0

    await eventually(acked)
    assert metric("entries_acked") == base["entries_acked"] + len(ids)
    letters = [f["dead.id"] for _, f in xrange(rds, DEAD, min=f"({last_letter}")]
    assert len(letters) == len(set(letters)) and set(letters) <= set(ids)
    inserted = metric("rows_inserted") - base["rows_inserted"]
    duplicates = metric("duplicates") - base["duplicates"]
    assert inserted + duplicates + len(letters) == len(ids)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        stored = set(
            conn.execute(
                "select device_id, (extract(epoch from ts) * 1000)::bigint, record_hash"
                " from positions"
            ).fetchall()
        )
    for entry_id, flat in zip(ids, batch, strict=True):
        if entry_id in letters:
            continue
        try:
            p = parse_entry(entry_id, fields_dict(as_read(flat)))
        except ContractError:  # pragma: no cover - the processor would have dead-lettered it
            raise AssertionError(f"{entry_id} is neither a row nor a dead letter") from None
        assert (p.device_id, p.timestamp_ms, p.record_hash) in stored
    logged_errors.flush()


__all__ = ["reactor"]
