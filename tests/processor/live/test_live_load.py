"""The live broadcast under load and across instances: a client that stops reading while
10,000 positions/s flow, and two processors sharing the consumer group."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from teltonika.contract import TELEMETRY_STREAM
from tests.processor.live.feeder import FIRST_DEVICE
from tests.processor.live.helpers import (
    Env,
    connect,
    entry,
    eventually,
    imei,
    now_ms,
    wait_table,
)
from tests.servers import REPO, checkout_env

pytestmark = pytest.mark.slow
DEVICES = 200


def feeder(env: Env, rate: int, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.processor.live.feeder",
            env.redis_url,
            str(rate),
            str(seconds),
            str(DEVICES),
        ],
        cwd=REPO,
        env=checkout_env(),
        stdout=subprocess.PIPE,
    )


def stop_reading(client: Any) -> None:
    """The client's socket stops being read."""
    client.transport.pauseProducing()


def resume_reading(client: Any) -> None:
    """The client's socket is read again."""
    client.transport.resumeProducing()


@pytest_twisted.ensureDeferred
async def test_slow_client_conflated_then_evicted(live_env: Env, clients: list[Any]) -> None:
    """While 10,000 positions/s flow: a client that stops reading is conflated (skipped
    reported once it reads again), one that never reads again is evicted after
    --live-slow-timeout, and the server's RSS stays flat."""
    proc = live_env.processor("live-slow", "--live-slow-timeout", "5")
    await deferToThread(wait_table, live_env.dsn)
    devices = [imei(FIRST_DEVICE + n) for n in range(DEVICES)]
    resuming, stuck, steady = [await connect(proc.port) for _ in range(3)]
    for client in (resuming, stuck, steady):
        clients.append(client)
        await client.next("hello")
        client.send({"type": "subscribe", "id": "all", "devices": devices})
        await client.next("snapshot")
    feed = feeder(live_env, 10_000, 12)
    try:
        await eventually(lambda: steady.received[-1]["type"] == "positions", timeout=20)
        rss_start = proc.rss_kib()
        stop_reading(resuming)
        stop_reading(stuck)
        await eventually(
            lambda: proc.metric("teltonika_processor_live_positions_conflated_total") > 0,
            timeout=20,
        )
        resume_reading(resuming)
        await eventually(
            lambda: any(m["type"] == "positions" and m["skipped"] > 0 for m in resuming.received),
            timeout=20,
        )
        await eventually(
            lambda: proc.metric("teltonika_processor_live_slow_client_evictions_total") == 1,
            timeout=20,
        )
        resume_reading(stuck)  # a paused socket does not notice the abort
        code, _ = await stuck.wait_closed(timeout=20)
        assert code == 1006  # aborted, no closing handshake
        rss_end = proc.rss_kib()
    finally:
        feed.wait(30)
    assert rss_end - rss_start < 40 * 1024, (rss_start, rss_end)
    assert steady.transport is not None and resuming.transport is not None
    assert all(m["skipped"] == 0 for m in steady.received if m["type"] == "positions")


@pytest_twisted.ensureDeferred
async def test_two_instances_share_the_group(live_env: Env, clients: list[Any]) -> None:
    """Two processors with one consumer group: a client on either gets every position of
    its subscription; after one is killed its client reconnects to the other and
    converges; the live readers leave nothing in Redis."""
    one = live_env.processor("live-one")
    two = live_env.processor("live-two")
    await deferToThread(wait_table, live_env.dsn)
    devices = [imei(2000 + n) for n in range(5)]
    base = now_ms()

    async def subscribed(port: int) -> Any:
        client = await connect(port)
        clients.append(client)
        await client.next("hello")
        client.send({"type": "subscribe", "id": "s", "devices": devices})
        await client.next("snapshot")
        return client

    first, second = await subscribed(one.port), await subscribed(two.port)
    live_env.xadd(*(entry(d, base + k) for k in range(10) for d in devices))

    def newest(client: Any) -> dict[str, int]:
        out: dict[str, int] = {}
        for message in client.received:
            if message["type"] == "positions":
                for p in message["positions"]:
                    out[p["device"]] = p["ts"]
            elif message["type"] == "snapshot":
                for d in message["devices"]:
                    if d["position"]:
                        out[d["device"]] = d["position"]["ts"]
        return out

    expected = dict.fromkeys(devices, base + 9)
    for client in (first, second):

        def caught_up(c: Any = client) -> bool:
            return newest(c) == expected

        await eventually(caught_up)
        got = [p["ts"] for m in client.received if m["type"] == "positions" for p in m["positions"]]
        assert len(got) == 50
    one.stop(signal.SIGKILL)
    await first.wait_closed()
    live_env.xadd(*(entry(d, base + 20) for d in devices))
    again = await subscribed(two.port)  # the page's reconnect, to the surviving instance
    await eventually(lambda: newest(again) == dict.fromkeys(devices, base + 20))
    groups = {g["name"] for g in live_env.rds.xinfo_groups(TELEMETRY_STREAM)}
    assert groups == {"processor"}
    assert set(live_env.rds.keys("*")) <= {TELEMETRY_STREAM, "telemetry:teltonika:dead"}
