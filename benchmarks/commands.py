"""Command round trip: ``send`` -> Redis -> instance -> device reply -> status, over loopback.

Usage::

    python benchmarks/commands.py                      # ~60 s: 1,000 idle + 200 streaming
    python benchmarks/commands.py --devices 200 --rtt 100 --commands 2000 --streaming 50

What runs: a throwaway ``redis-server`` on a free port, the server as a
``twistd -n teltonika --redis ...`` subprocess (one instance), and in this process a fleet
of scripted devices (each logs in and answers every codec 12 command at once) plus the
sender, which uses the same library as ``teltonika send`` (registry lookup, XADD to the
instance's stream) and one reader on ``commands:responses``.

Figures:

1. RTT to idle devices, one command at a time to a random device: p50 / p99 from the
   sender's XADD to the ``responded`` status arriving at the sender (the path: HGET
   registry, XADD, XREADGROUP by the instance, CommandQueue write, device reply, Lua
   settle + XADD status, XREAD by the sender). An idle device has been quiet for longer
   than ``--command-quiet``, so its command is written at once.
2. Throughput: commands/s through the one instance with ``--concurrency`` commands in
   flight (each to a different idle device: one outstanding command per socket). Each
   device gets one command every ``devices / concurrency`` commands; after its reply it
   has received bytes, so its next command waits ``--command-quiet`` (1 s): with 1,000
   devices the figure cannot exceed about 1,000 commands/s, whatever the server's speed.
3. RTT to devices streaming one frame a second (``teltonika simulate``'s device, strict
   like the firmware): a command waits for the device's next ACK (it is never written
   where the device awaits one), so about half a frame interval is added. The devices'
   broken promises (a command where an ACK was awaited, ...) must be 0.
4. Baseline for context: a raw Redis round trip (XADD on one connection, blocking XREAD
   on another) with the same client library. A command crosses Redis twice (command
   stream, status stream), so ~2x the baseline is the floor for figure 1.

Loopback only, 2 shared cores: compare the ratios printed in one run.
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from anywhere: import the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from benchmarks.support import checkout_env, free_port, percentile, wait_port
from teltonika.commands.client import send_command
from teltonika.commands.messages import RESPONSES_STREAM, Command, pairs
from teltonika.redis.connect import lazy_connection, parse_redis_url
from teltonika.simulate.device import Device as StreamingDevice
from teltonika.simulate.device import DeviceConfig
from teltonika.simulate.fleet import SimulatedDeviceFactory
from teltonika.simulate.ledger import Ledger
from teltonika.wire import decode_messages, encode_login, encode_message, unwrap, wrap

REPO = Path(__file__).resolve().parents[1]


class Device(Protocol):
    """Logs in, answers every command frame with a codec 12 reply at once."""

    def __init__(self, imei: str) -> None:
        self.imei = imei
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.buffer = b""
        self.logged_in = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(encode_login(self.imei))

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.logged_in:
            self.logged_in, self.buffer = True, self.buffer[1:]
            self.ready.callback(None)
        while len(self.buffer) >= 8:
            size = 12 + int.from_bytes(self.buffer[4:8], "big")
            if len(self.buffer) < size:
                return
            frame, self.buffer = self.buffer[:size], self.buffer[size:]
            message = decode_messages(frame, 8, unwrap(frame)).messages[0]
            reply = wrap(encode_message(12, b"OK " + message.payload, 0x06))
            assert self.transport is not None
            self.transport.write(reply)


class Statuses:
    """One XREAD loop on commands:responses that fires a Deferred per command id."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.waiting: dict[str, defer.Deferred[float]] = {}
        self.cursor = "$"
        self.running = True

    def expect(self, command_id: str) -> defer.Deferred[float]:
        d: defer.Deferred[float] = defer.Deferred()
        self.waiting[command_id] = d
        return d

    async def run(self) -> None:
        while self.running:
            reply = await self.conn.execute_command(
                "XREAD", "COUNT", "1000", "BLOCK", "200", "STREAMS", RESPONSES_STREAM, self.cursor
            )
            if not reply:
                continue
            now = time.perf_counter()
            for _stream, items in reply:
                for entry_id, values in items:
                    self.cursor = entry_id
                    fields = pairs(list(values))
                    if fields["status"] in ("responded", "failed"):
                        d = self.waiting.pop(fields["id"], None)
                        if d is not None:
                            if fields["status"] == "failed":
                                d.errback(RuntimeError(fields["reason"]))
                            else:
                                d.callback(now)


async def baseline(redis_url: str, rounds: int) -> list[float]:
    """Raw XADD -> blocking XREAD round trips (txredisapi on both ends)."""
    address = parse_redis_url(redis_url)
    writer, reader = lazy_connection(address), lazy_connection(address)
    times = []
    await reader.ping()
    cursor = await writer.execute_command("XADD", "bench:raw", "*", "n", "start")
    for i in range(rounds):
        read = reader.execute_command("XREAD", "BLOCK", "1000", "STREAMS", "bench:raw", cursor)
        start = time.perf_counter()
        await writer.execute_command("XADD", "bench:raw", "*", "n", str(i))
        reply = await read
        times.append(time.perf_counter() - start)
        cursor = reply[0][1][-1][0]
    await writer.disconnect()
    await reader.disconnect()
    return times


async def bench(reactor: Any, args: argparse.Namespace, redis_url: str, port: int) -> None:
    address = parse_redis_url(redis_url)
    sender, reader = lazy_connection(address), lazy_connection(address)
    imeis = [f"35{i:013d}" for i in range(args.devices)]
    started = time.perf_counter()
    devices = []
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    for chunk in range(0, len(imeis), 100):
        batch = [Device(imei) for imei in imeis[chunk : chunk + 100]]
        await defer.gatherResults([connectProtocol(endpoint, d) for d in batch])
        await defer.gatherResults([d.ready for d in batch])
        devices += batch
    while int(await sender.hlen("connections:registry")) < len(imeis):
        await task.deferLater(reactor, 0.05, lambda: None)
    print(
        f"{len(devices)} devices logged in and registered in {time.perf_counter() - started:.1f} s"
    )

    statuses = Statuses(reader)
    loop = defer.Deferred.fromCoroutine(statuses.run())

    async def one(n: int, imei: str) -> float:
        command = Command(id=f"b{n}", imei=imei, payload=b"getinfo")
        done = statuses.expect(command.id)
        start = time.perf_counter()
        await send_command(sender, command, 0)
        end = await done
        return end - start

    # Each device at most once: a device that just answered has sent bytes, so its next
    # command waits for an ACK or the quiet interval (that is the throughput figure's limit).
    chosen = random.Random(1).sample(imeis, min(len(imeis), args.rtt + 20))
    for n, imei in enumerate(chosen[:20]):  # warm-up
        await one(-1 - n, imei)
    rtts = [await one(n, imei) for n, imei in enumerate(chosen[20:])]

    count = 0
    start = time.perf_counter()
    deadline = start + args.max_seconds

    async def worker(w: int) -> None:
        nonlocal count
        mine = imeis[w :: args.concurrency]
        i = 0
        while count + args.concurrency <= args.commands and time.perf_counter() < deadline:
            await one(100_000 + w * 1_000_000 + i, mine[i % len(mine)])
            count += 1
            i += 1

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker(w)) for w in range(args.concurrency)]
    )
    elapsed = time.perf_counter() - start

    streaming, ledger = await start_streaming(reactor, args, port, sender, len(imeis))
    stream_rtts: list[float] = []
    stream_failures: list[str] = []

    async def streaming_worker(w: int) -> None:
        mine = streaming[w :: args.streaming_concurrency]
        for i in range(args.streaming_rtt // args.streaming_concurrency):
            device = mine[i % len(mine)]
            try:
                stream_rtts.append(await one(2_000_000 + w * 10_000 + i, device.imei))
            except RuntimeError as error:  # a failed status: counted and shown below
                stream_failures.append(str(error))

    await defer.gatherResults(
        [
            defer.Deferred.fromCoroutine(streaming_worker(w))
            for w in range(args.streaming_concurrency)
        ]
    )
    for device in streaming:
        device.stop()
    statuses.running = False
    await loop
    raw = await baseline(redis_url, args.rtt)
    for d in devices:
        if d.transport is not None:
            d.transport.loseConnection()
    await sender.disconnect()
    await reader.disconnect()

    ms = 1000.0
    p50, p99 = percentile(rtts, 50) * ms, percentile(rtts, 99) * ms
    s50, s99 = percentile(stream_rtts, 50) * ms, percentile(stream_rtts, 99) * ms
    b50, b99 = percentile(raw, 50) * ms, percentile(raw, 99) * ms
    print()
    print(f"{'figure':<52}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'command RTT, idle devices (send -> reply -> status)':<52}{p50:>10.2f}{p99:>10.2f}")
    label = f"command RTT, devices streaming 1 frame/{args.stream_interval:g} s"
    print(f"{label:<52}{s50:>10.2f}{s99:>10.2f}")
    print(f"{'baseline: raw XADD -> XREAD round trip':<52}{b50:>10.2f}{b99:>10.2f}")
    print(f"{'ratio (idle command / baseline)':<52}{p50 / b50:>10.1f}{p99 / b99:>10.1f}")
    print()
    print(
        f"throughput: {count} commands in {elapsed:.1f} s = {count / elapsed:,.0f} commands/s "
        f"through one instance ({args.concurrency} in flight, {len(devices)} idle devices)"
    )
    print(f"  vs the baseline's sequential rate {1 / (sum(raw) / len(raw)):,.0f} round trips/s")
    summary = ledger.summary()
    print(
        f"streaming devices: {len(streaming)}, {len(stream_rtts)} commands answered, "
        f"{len(stream_failures)} failed {sorted(set(stream_failures))}, "
        f"{summary['frames_acked']} frames ACKed, broken promises {summary['broken_promises']} "
        f"(command in place of an ACK {summary['command_in_place_of_ack']})"
    )
    if summary["broken_promises"]:
        print(f"  violations: {summary['violations']}")


async def start_streaming(
    reactor: Any, args: argparse.Namespace, port: int, sender: Any, idle: int
) -> tuple[list[StreamingDevice], Ledger]:
    """Connect ``--streaming`` simulated devices that log one record every
    ``--stream-interval`` seconds; return once they are registered and streaming."""
    ledger = Ledger(devices=args.streaming)
    config = DeviceConfig(
        records_per_frame=1, interval_s=args.stream_interval, keepalive_s=0, ack_timeout_s=30
    )

    def connect(device: StreamingDevice) -> None:
        reactor.connectTCP("127.0.0.1", port, SimulatedDeviceFactory(device))

    devices = [
        StreamingDevice(
            f"36{i:013d}", config, reactor, random.Random(f"stream:{i}"), ledger, connect
        )
        for i in range(args.streaming)
    ]
    for device in devices:
        device.start()
    while int(await sender.hlen("connections:registry")) < idle + len(devices):
        await task.deferLater(reactor, 0.05, lambda: None)
    await task.deferLater(reactor, 2 * args.stream_interval, lambda: None)
    return devices, ledger


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rtt", type=int, default=300, help="sequential commands timed")
    parser.add_argument("--commands", type=int, default=5000, help="throughput commands")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument("--streaming", type=int, default=200, help="devices streaming")
    parser.add_argument("--stream-interval", type=float, default=1.0, help="their frame period")
    parser.add_argument("--streaming-rtt", type=int, default=200, help="commands to them")
    parser.add_argument("--streaming-concurrency", type=int, default=20)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, (args.devices + args.streaming) * 2 + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    workdir = Path(tempfile.mkdtemp(prefix="bench-commands-"))
    redis_port, port = free_port(), free_port()
    redis_proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = None
    try:
        wait_port(redis_port)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        env = checkout_env()
        log = (workdir / "twistd.log").open("wb")
        server = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import resource as r; s, h = r.getrlimit(r.RLIMIT_NOFILE); "
                "r.setrlimit(r.RLIMIT_NOFILE, (h, h)); "
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "teltonika",
                "--port",
                f"tcp:{port}:interface=127.0.0.1",
                "--redis",
                redis_url,
                "--instance-id",
                "bench",
                "--metrics",
                "off",
            ],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_port(port)
        task.react(
            lambda reactor: defer.Deferred.fromCoroutine(bench(reactor, args, redis_url, port))
        )
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
