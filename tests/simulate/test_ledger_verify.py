"""The ledger (counters, percentiles, save/load, merge) and the ledger check against sinks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted

from teltonika.contract import entry_fields, json_line
from teltonika.simulate.ledger import Ledger, percentile
from teltonika.simulate.verify import compare, read_jsonl, verify_jsonl, verify_redis
from teltonika.wire import AVLRecord

A = "356307042440001"
B = "356307042440002"


def record(stamp: int) -> AVLRecord:
    return AVLRecord(stamp, 0, 25.1, 54.6, 100, 90, 9, 50, 0, ((239, 1, 1),))


def ledger_with(acked: dict[str, list[int]]) -> Ledger:
    ledger = Ledger(devices=len(acked))
    for imei, stamps in acked.items():
        ledger.ack(imei, stamps, 1.0)
    return ledger


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.99) == 0.0
    assert percentile([7.0], 0.99) == 7.0


def test_save_load_merge_round_trip(tmp_path: Path) -> None:
    """A saved ledger reads back equal; merging adds counters, records and devices."""
    one = ledger_with({A: [1, 2]})
    one.violation("wrong_ack", "detail")
    one.never_acked[A] = [3]
    path = tmp_path / "ledger.json"
    one.save(path)
    loaded = Ledger.load(path)
    assert loaded.summary() == one.summary()
    two = ledger_with({B: [5]})
    loaded.merge(two)
    assert loaded.devices == 2
    assert loaded.counts["records_acked"] == 3
    assert loaded.broken_promises == 1
    assert loaded.summary()["never_acked"] == 1


def test_load_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(b'{"version": 99}')
    with pytest.raises(ValueError, match="not a teltonika simulate ledger"):
        Ledger.load(path)


def test_compare_missing_fails_duplicates_reported() -> None:
    """Missing ACKed records fail the check; duplicates and unACKed extras do not."""
    ledger = ledger_with({A: [1, 2, 3], B: [10]})
    present: Counter[tuple[str, int]] = Counter({(A, 1): 1, (A, 2): 3, (B, 10): 1, (B, 11): 1})
    result = compare(ledger, present, "test")
    assert (result.acked, result.found, result.missing) == (4, 3, 1)
    assert (result.duplicated, result.extra_copies) == (1, 2)
    assert result.missing_sample == [[A, 3]]
    assert not result.ok
    present[(A, 3)] = 1
    assert compare(ledger, present, "test").ok


def test_verify_jsonl_reads_the_contract_lines_and_tolerates_a_torn_tail(tmp_path: Path) -> None:
    """The file sink's lines are matched by (imei, timestamp_ms); a torn last line is unreadable."""
    path = tmp_path / "records.jsonl"
    lines = [json_line(A, "8E", record(s), 5, "i1") for s in (1, 2, 2)]
    path.write_bytes(b"".join(lines) + b'{"imei": "3563')
    present, unreadable = read_jsonl(path)
    assert present[(A, 2)] == 2
    assert unreadable == 1
    result = verify_jsonl(ledger_with({A: [1, 2]}), path)
    assert result.ok and result.duplicated == 1
    assert not verify_jsonl(ledger_with({A: [1, 2, 4]}), path).ok


@pytest_twisted.ensureDeferred
async def test_verify_redis_pages_through_the_stream(redis_server: Any, redis_url: str) -> None:
    """Entries written per the record contract are found; paging covers the whole stream."""
    import redis

    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    stamps = list(range(1, 12_001))
    for stamp in stamps:
        flat = entry_fields(A, "8E", record(stamp), 5, "i1")
        pipe.xadd("telemetry:teltonika", dict(zip(flat[::2], flat[1::2], strict=True)))
    pipe.xadd("telemetry:teltonika", {b"imei": A.encode(), b"timestamp_ms": b"5"})
    pipe.xadd("telemetry:teltonika", {b"garbage": b"1"})
    pipe.execute()
    client.close()
    ledger = ledger_with({A: [*stamps, 12_345]})
    result = await verify_redis(ledger, redis_url)
    assert result.entries == 12_001
    assert result.unreadable == 1
    assert result.missing == 1 and result.missing_sample == [[A, 12_345]]
    assert result.duplicated == 1
    assert orjson.loads(orjson.dumps(result.as_dict()))["ok"] is False
