"""Stream entries for the live tests and benchmark, and a paced feeder.

``python -m tests.processor.live.feeder URL RATE SECONDS DEVICES`` XADDs RATE entries a
second (in 10 ms slices, pipelined) for SECONDS seconds, round-robin over DEVICES
devices (``imei(1000 + n)``), each stamped with its XADD time (strictly increasing per
device), then prints ``{"written": N, "seconds": S}`` and stops. Imports nothing of
pytest, so ``benchmarks/live.py`` uses it too.
"""

from __future__ import annotations

import json
import sys
import time

FIRST_DEVICE = 1000
"""The feeder's devices are ``imei(FIRST_DEVICE + n)``."""


def imei(n: int) -> str:
    return f"35209308{n:07d}"


def now_ms() -> int:
    return int(time.time() * 1000)


def entry(
    device: str,
    ts: int,
    *,
    rx: int | None = None,
    lat: str = "41.3275123",
    lon: str = "19.8187456",
    speed: int = 40,
    angle: int = 90,
    sats: int = 9,
    event_io_id: int = 0,
    priority: int = 0,
) -> dict[str, str]:
    """A record contract v1 entry (the fields the ingestion server writes)."""
    return {
        "v": "1",
        "imei": device,
        "codec": "8E",
        "timestamp_ms": str(ts),
        "received_at_ms": str(ts + 500 if rx is None else rx),
        "latitude": lat,
        "longitude": lon,
        "altitude": "112",
        "angle": str(angle),
        "speed": str(speed),
        "satellites": str(sats),
        "priority": str(priority),
        "event_io_id": str(event_io_id),
        "generation_type": "",
        "instance_id": "live-test",
        "io": "{}",
    }


def feed(url: str, rate: int, seconds: float, devices: int) -> dict[str, float]:
    import redis

    from teltonika.contract import TELEMETRY_STREAM

    client = redis.Redis.from_url(url)
    per_slice = max(1, rate // 100)
    last = [0] * devices
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < seconds:
        pipe = client.pipeline(transaction=False)
        now = now_ms()
        for _ in range(per_slice):
            k = n % devices
            last[k] = ts = max(now, last[k] + 1)
            fields = entry(imei(FIRST_DEVICE + k), ts, rx=ts, lat=f"41.{3200000 + n % 99999}")
            pipe.xadd(TELEMETRY_STREAM, fields)  # type: ignore[arg-type]
            n += 1
        pipe.execute()
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    client.close()
    return {"written": n, "seconds": time.monotonic() - started}


if __name__ == "__main__":
    result = feed(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
    print(json.dumps(result), flush=True)
