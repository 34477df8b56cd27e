"""Live broadcast: 1,000 WebSocket clients watching one event of 200 devices, next to a
bare autobahn broadcast of the same bytes.

Usage::

    python benchmarks/live.py                      # ~1.5 min
    python benchmarks/live.py --clients 200 --rate 1000 --seconds 5
    python benchmarks/live.py --no-baseline --profile /tmp/live.stats   # cProfile the processor

What runs (loopback only, bounded in time and count, stops by itself): a throwaway
``redis-server`` and PostgreSQL (tests/servers.py), the processor as a real
``twistd -n teltonika-processor --live`` subprocess (``--live-auth none``, an events file
with one event of ``--devices`` devices), ``--procs`` client processes holding
``--clients`` autobahn clients between them (each subscribes to the event), and a paced
feeder process (``tests/processor/live/feeder.py``) XADDing ``--rate`` records a second
round-robin over the devices, each record's ``timestamp_ms`` being its XADD time.

Figures, for the processor and then for the baseline:

* positions/s in (what the feeder wrote) and messages/s out (what all clients received);
* p50/p99 latency from XADD to client receipt (every ``--parse-every``-th client parses
  its messages; the others only count them);
* RSS per idle client: the server's RSS growth from before the clients connected to after
  they all subscribed, divided by the client count (processor only).

Baseline: a bare autobahn server (this script, ``--bare``) that reads the same stream with
a plain XREAD and every 100 ms sends each client the same ``positions`` message, encoded
once and framed once (``prepareMessage``): the cost of the WebSocket broadcast alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.support import checkout_env, free_port, percentile, rss_kib, wait_port
from tests.processor.live.feeder import FIRST_DEVICE, imei

SCRIPT = str(Path(__file__).resolve())
REPO = str(Path(__file__).resolve().parents[1])


# -- clients --------------------------------------------------------------------------------
def clients(port: int, count: int, parse_every: int, seconds: float, start_at: float) -> None:
    """*count* clients subscribe, then count messages between *start_at* and
    *start_at* + *seconds* (wall clock); print the figures as JSON."""
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    from twisted.internet import reactor

    stats: dict[str, Any] = {"messages": 0, "bytes": 0, "latency": [], "subscribed": 0}

    class Client(WebSocketClientProtocol):  # type: ignore[misc]
        parse = False

        def onOpen(self) -> None:
            self.sendMessage(b'{"type":"subscribe","id":"b","event":"bench"}')

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            now = time.time()
            if payload.startswith(b'{"type":"snapshot"') or payload.startswith(b'{"type":"hello"'):
                if b'"snapshot"' in payload[:20]:
                    stats["subscribed"] += 1
                return
            if not start_at <= now < start_at + seconds:
                return
            stats["messages"] += 1
            stats["bytes"] += len(payload)
            if self.parse and payload.startswith(b'{"type":"positions"'):
                ms = now * 1000
                for p in json.loads(payload)["positions"]:
                    stats["latency"].append(ms - p["ts"])

    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/live/v1/ws")
    factory.protocol = Client
    factory.setProtocolOptions(autoPingInterval=None, openHandshakeTimeout=60)
    made = 0

    def connect_some() -> None:
        nonlocal made
        from twisted.internet.endpoints import TCP4ClientEndpoint

        for _ in range(min(25, count - made)):
            index = made
            made += 1
            d = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30).connect(factory)

            def mark(protocol: Any, index: int = index) -> None:
                protocol.parse = index % parse_every == 0

            d.addCallbacks(mark, lambda f: None)
        if made < count:
            reactor.callLater(0.05, connect_some)

    def finish() -> None:
        print(json.dumps(stats), flush=True)
        reactor.stop()

    reactor.callWhenRunning(connect_some)
    reactor.callLater(max(1.0, start_at + seconds + 1 - time.time()), finish)
    reactor.run()


# -- the bare baseline server ------------------------------------------------------------------
def bare(port: int, redis_url: str) -> None:
    """XREAD the stream; every 100 ms one ``positions`` message, framed once, to all."""
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor, task
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from teltonika.processor.fastreader import reader_connection
    from teltonika.processor.live.fanout import entry_fields
    from teltonika.processor.live.messages import (
        encode_positions,
        encode_positions_array,
        position_from_fields,
    )
    from teltonika.redis.connect import parse_redis_url

    connected: set[Any] = set()
    pending: list[Any] = []

    class Bare(WebSocketServerProtocol):  # type: ignore[misc]
        def onOpen(self) -> None:
            connected.add(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(b'{"type":"snapshot","id":"b","devices":[]}')

        def connectionLost(self, reason: Any) -> None:
            connected.discard(self)
            super().connectionLost(reason)

    factory = WebSocketServerFactory()
    factory.protocol = Bare
    redis = reader_connection(parse_redis_url(redis_url), reply_timeout=30)
    cursor = ["$"]

    async def read() -> None:
        while reactor.running:
            try:
                reply = await redis.execute_command(
                    "XREAD",
                    "COUNT",
                    1000,
                    "BLOCK",
                    1000,
                    "STREAMS",
                    "telemetry:teltonika",
                    cursor[0],
                )
            except Exception:
                return  # the benchmark is over: Redis went away
            if reply:
                entries = reply[0][1]
                cursor[0] = entries[-1][0]
                for entry in entries:
                    position = position_from_fields(entry_fields(entry[1]))
                    if position is not None:
                        pending.append(position)

    def flush() -> None:
        if not pending:
            return
        message = encode_positions("b", 0, encode_positions_array(pending))
        pending.clear()
        prepared = factory.prepareMessage(message)
        for client in list(connected):
            client.sendPreparedMessage(prepared)

    root = Resource()
    live = Resource()
    v1 = Resource()
    root.putChild(b"live", live)
    live.putChild(b"v1", v1)
    v1.putChild(b"ws", WebSocketResource(factory))
    reactor.listenTCP(port, Site(root), interface="127.0.0.1")
    task.LoopingCall(flush).start(0.1, now=False)
    from twisted.internet.defer import Deferred

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(read()))
    reactor.run()


# -- orchestration ----------------------------------------------------------------------------
def child(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args], cwd=REPO, env=checkout_env(), stdout=subprocess.PIPE
    )


def run_round(
    name: str, port: int, server_pid: int, redis_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    per_proc = args.clients // args.procs
    rss_before = rss_kib(server_pid)
    connect_seconds = 5 + args.clients / 100
    start_at = time.time() + connect_seconds + 2
    procs = [
        child(
            "--client-mode",
            str(port),
            str(per_proc),
            str(args.parse_every),
            str(args.seconds),
            str(start_at),
        )
        for _ in range(args.procs)
    ]
    time.sleep(connect_seconds)
    rss_idle = rss_kib(server_pid)
    feeder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.processor.live.feeder",
            redis_url,
            str(args.rate),
            str(args.seconds + 3),
            str(args.devices),
        ],
        cwd=REPO,
        env=checkout_env(),
        stdout=subprocess.PIPE,
    )
    time.sleep(max(0.0, start_at - time.time()))
    load = os.getloadavg()
    results = [json.loads(p.communicate(timeout=args.seconds + 120)[0]) for p in procs]
    fed = json.loads(feeder.communicate(timeout=60)[0])
    latency = [v for r in results for v in r["latency"]]
    figures = {
        "name": name,
        "subscribed": sum(r["subscribed"] for r in results),
        "positions_in": fed["written"] / fed["seconds"],
        "messages_out": sum(r["messages"] for r in results) / args.seconds,
        "mib_out": sum(r["bytes"] for r in results) / args.seconds / 2**20,
        "p50": percentile(latency, 50),
        "p99": percentile(latency, 99),
        "rss_per_idle_client_kib": (rss_idle - rss_before) / max(1, args.clients),
        "load": load,
    }
    print(
        f"{name:10} subscribed {figures['subscribed']:5}  in {figures['positions_in']:7.0f} pos/s"
        f"  out {figures['messages_out']:8.0f} msg/s ({figures['mib_out']:.1f} MiB/s)"
        f"  p50 {figures['p50']:6.1f} ms  p99 {figures['p99']:6.1f} ms"
        f"  RSS/idle client {figures['rss_per_idle_client_kib']:.1f} KiB"
        f"  load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--parse-every", type=int, default=10)
    parser.add_argument(
        "--profile", metavar="FILE", help="run the processor under cProfile, stats to FILE"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare server")
    args = parser.parse_args()

    from tests.servers import PostgresServer, RedisServer

    redis_server = RedisServer().start()
    postgres = PostgresServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="teltonika-live-bench-"))
    events = tmp / "events.json"
    events.write_text(
        json.dumps(
            {
                "events": {
                    "bench": {
                        "devices": {imei(FIRST_DEVICE + n): f"#{n}" for n in range(args.devices)},
                        "users": ["*"],
                    }
                }
            }
        )
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        processor = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                *(
                    [f"--profile={args.profile}", "--profiler=cprofile", "--savestats"]
                    if args.profile
                    else []
                ),
                "--pidfile=",
                f"--logfile={tmp / 'processor.log'}",
                "teltonika-processor",
                "--redis",
                redis_server.url,
                "--postgres",
                postgres.dsn(),
                "--metrics",
                "off",
                "--live",
                f"tcp:{port}:interface=127.0.0.1",
                "--live-events",
                f"file:{events}",
                "--live-max-connections",
                str(args.clients * 2),
            ],
            cwd=REPO,
            env=checkout_env(),
        )
        processes.append(processor)
        wait_port(port, 30)
        ours = run_round("processor", port, processor.pid, redis_server.url, args)
        processor.terminate()
        processor.wait(60)
        if args.no_baseline:
            return
        redis_server.cli("FLUSHALL")
        bare_port = free_port()
        baseline_server = child("--bare-mode", str(bare_port), redis_server.url)
        processes.append(baseline_server)
        wait_port(bare_port, 30)
        base = run_round("bare", bare_port, baseline_server.pid, redis_server.url, args)
        ratio = ours["messages_out"] / base["messages_out"] if base["messages_out"] else 0.0
        print(f"messages/s out: {100 * ratio:.0f} % of the bare broadcast", flush=True)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
        redis_server.cleanup()
        postgres.cleanup()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client-mode":
        a = sys.argv[2:]
        clients(int(a[0]), int(a[1]), int(a[2]), float(a[3]), float(a[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--bare-mode":
        bare(int(sys.argv[2]), sys.argv[3])
    else:
        main()
