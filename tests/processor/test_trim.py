"""Safe trimming: only entries every consumer group has acknowledged are removed."""

from __future__ import annotations

import pytest_twisted
import redis

from teltonika.contract import TELEMETRY_STREAM
from teltonika.processor.streams import GroupInfo, next_id
from teltonika.processor.trim import safe_min_id
from tests.processor.helpers import Processors, entry, eventually, record, xadd, xrange


def group(name: str, pending: int = 0, last: str = "0-0") -> GroupInfo:
    return GroupInfo(name=name, consumers=1, pending=pending, last_delivered_id=last, lag=0)


def test_safe_min_id() -> None:
    """The MINID is the oldest need over all groups: a pending entry, or the first entry
    after what a group has been delivered."""
    assert safe_min_id([], {}) is None
    assert safe_min_id([group("a", last="5-3")], {}) == "5-4"
    assert safe_min_id([group("a", 1, "9-0"), group("b", last="7-0")], {"a": "3-1"}) == "3-1"
    assert safe_min_id([group("a", last="10-0"), group("b", last="9-9")], {}) == "9-10"
    assert safe_min_id([group("a", 2, "9-0")], {"a": None}) is None  # unknown: trim nothing
    assert next_id("1-18446744073709551615") == "2-0"


@pytest_twisted.ensureDeferred
async def test_trim_keeps_what_a_slower_group_needs(
    processors: Processors, rds: redis.Redis, pg_dsn: str
) -> None:
    """With a second, slower group, --trim removes only entries both groups acknowledged,
    and never one the slower group still has pending or has not been delivered yet."""
    rds.xgroup_create(TELEMETRY_STREAM, "slow", "0", mkstream=True)
    ids = [xadd(rds, entry(rec=record(i))) for i in range(20)]
    rds.xreadgroup("slow", "s1", {TELEMETRY_STREAM: ">"}, count=10)
    rds.xack(TELEMETRY_STREAM, "slow", *ids[:5])
    service = processors.start("--trim", "--trim-interval", "0.2", "--stats-interval", "0.1")
    await eventually(lambda: rds.xlen(TELEMETRY_STREAM) == 15)
    assert xrange(rds, count=1)[0][0] == ids[5]  # slow's oldest pending
    assert rds.xpending(TELEMETRY_STREAM, "processor")["pending"] == 0
    assert (
        service.processor.consumer.metrics.registry.get_sample_value(
            "teltonika_processor_entries_trimmed_total"
        )
        == 5
    )

    rds.xack(TELEMETRY_STREAM, "slow", *ids[5:10])
    await eventually(lambda: rds.xlen(TELEMETRY_STREAM) == 10)
    assert xrange(rds, count=1)[0][0] == ids[10]  # never delivered to slow
    assert await service.processor.trim_now() == 0
    assert [e for e, _ in xrange(rds)] == ids[10:]
