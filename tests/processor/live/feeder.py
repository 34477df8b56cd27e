"""A paced stream feeder for load tests: ``python -m tests.processor.live.feeder URL RATE
SECONDS DEVICES`` XADDs RATE entries a second (in 10 ms slices, pipelined) for SECONDS
seconds, round-robin over DEVICES devices, then stops by itself."""

from __future__ import annotations

import sys
import time

import redis

from teltonika.contract import TELEMETRY_STREAM
from tests.processor.live.conftest import entry, imei


def main(url: str, rate: int, seconds: float, devices: int) -> None:
    client = redis.Redis.from_url(url)
    per_slice = max(1, rate // 100)
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < seconds:
        pipe = client.pipeline(transaction=False)
        ts = int(time.time() * 1000)
        for _ in range(per_slice):
            pipe.xadd(TELEMETRY_STREAM, entry(imei(1000 + n % devices), ts + n // devices))  # type: ignore[arg-type]
            n += 1
        pipe.execute()
        next_slice = started + (n / rate)
        delay = next_slice - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(n, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
