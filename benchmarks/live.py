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
``--clients`` subscribers between them (each subscribes to the event), and a paced
feeder process (``tests/processor/live/feeder.py``) XADDing ``--rate`` records a second
round-robin over the devices, each record's ``timestamp_ms`` being its XADD time.

The clients are ``benchmarks/wsclients.py``: raw sockets and a minimal WebSocket client
(one handshake, then server frames counted in bulk, ``ts`` taken by one regular
expression), because 1,000 autobahn clients in Python were slower than the servers they
measured (p99 about 9 s for ours and the bare baseline alike).

Figures, for the processor and then for the baseline:

* positions/s in (what the feeder wrote) and messages/s out (what all clients received);
* p50/p99 latency from XADD to client receipt of every position, over every
  ``--parse-every``-th client (the others only count);
* RSS per idle client: the server's RSS growth from before the clients connected to after
  they all subscribed, divided by the client count;
* CPU: the server's and all clients' CPU time over the measured seconds (100 % is one
  core), and the server's MiB out per CPU second: what the broadcast costs, whatever
  else loads the machine, and whether the clients kept up.

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

from benchmarks.support import checkout_env, cpu_seconds, free_port, rss_kib, wait_port
from benchmarks.wsclients import histogram_percentile
from benchmarks.wsclients import run as run_clients
from tests.processor.live.feeder import FIRST_DEVICE, imei

SCRIPT = str(Path(__file__).resolve())
REPO = str(Path(__file__).resolve().parents[1])


# -- the bare baseline server ------------------------------------------------------------------
def bare(port: int, redis_url: str) -> None:
    """XREAD the stream; every 100 ms one ``positions`` message, framed once, to all."""
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor, task
    from twisted.internet.protocol import connectionDone
    from twisted.python.failure import Failure
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from teltonika.processor.fastreader import reader_connection
    from teltonika.processor.live.messages import (
        encode_positions,
        encode_positions_array,
        position_from_entry,
    )
    from teltonika.redis.connect import parse_redis_url

    connected: set[Any] = set()
    pending: list[Any] = []

    class Bare(WebSocketServerProtocol):  # type: ignore[misc]
        def onOpen(self) -> None:
            connected.add(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(b'{"type":"snapshot","id":"b","devices":[]}')

        def connectionLost(self, reason: Failure = connectionDone) -> None:
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
                    position = position_from_entry(entry[0], entry[1])
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
def child(*args: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        cwd=REPO,
        env=checkout_env(),
        stdin=stdin,
        stdout=subprocess.PIPE,
    )


def run_round(
    name: str, port: int, server_pid: int, redis_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    per_proc = args.clients // args.procs
    rss_before = rss_kib(server_pid)
    procs = [
        child(
            "--client-mode",
            str(port),
            str(per_proc),
            str(args.parse_every),
            str(args.seconds),
            stdin=subprocess.PIPE,
        )
        for _ in range(args.procs)
    ]
    ready = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
    time.sleep(1)  # let the server settle after the last subscription
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
    start_at = time.time() + 2  # the feeder's first second is not measured
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"{start_at}\n".encode())
        p.stdin.flush()
    time.sleep(max(0.0, start_at - time.time()))
    user_start, system_start = cpu_seconds(server_pid)
    time.sleep(args.seconds)
    user_end, system_end = cpu_seconds(server_pid)
    server_user, server_system = user_end - user_start, system_end - system_start
    load = os.getloadavg()
    results = [json.loads(p.communicate(timeout=args.seconds + 120)[0]) for p in procs]
    fed = json.loads(feeder.communicate(timeout=60)[0])
    histogram: dict[int, int] = {}
    for r in results:
        for ms, count in r["histogram"].items():
            histogram[int(ms)] = histogram.get(int(ms), 0) + count
    figures = {
        "name": name,
        "subscribed": sum(r["subscribed"] for r in ready),
        "failed": sum(r["failed"] for r in ready),
        "closed": sum(r["closed"] for r in results),
        "positions_in": fed["written"] / fed["seconds"],
        "messages_out": sum(r["messages"] for r in results) / args.seconds,
        "mib_out": sum(r["bytes"] for r in results) / args.seconds / 2**20,
        "p50": histogram_percentile(histogram, 50),
        "p99": histogram_percentile(histogram, 99),
        "rss_per_idle_client_kib": (rss_idle - rss_before) / max(1, args.clients),
        "server_cpu": (server_user + server_system) / args.seconds,
        "server_system": server_system / args.seconds,
        "clients_cpu": sum(r["cpu"] for r in results) / args.seconds,
        "load": load,
    }
    failure = next((r["first_failure"] for r in ready if r["first_failure"]), None)
    print(
        f"{name:10} subscribed {figures['subscribed']:5}  in {figures['positions_in']:7.0f} pos/s"
        f"  out {figures['messages_out']:8.0f} msg/s ({figures['mib_out']:.1f} MiB/s)"
        f"  p50 {figures['p50']:6.1f} ms  p99 {figures['p99']:6.1f} ms"
        f"  RSS/idle client {figures['rss_per_idle_client_kib']:.1f} KiB"
        f"  CPU server {100 * figures['server_cpu']:.0f} %"
        f" (system {100 * figures['server_system']:.0f} %)"
        f" ({figures['mib_out'] / max(figures['server_cpu'], 1e-9):.0f} MiB,"
        f" {figures['messages_out'] / max(figures['server_cpu'], 1e-9):.0f} msg per CPU s)"
        f" clients {100 * figures['clients_cpu']:.0f} %"
        f"  load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        + (f"  failed {figures['failed']} ({failure})" if figures["failed"] else "")
        + (f"  closed {figures['closed']}" if figures["closed"] else ""),
        flush=True,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=2)
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
        run_clients(int(a[0]), int(a[1]), int(a[2]), float(a[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--bare-mode":
        bare(int(sys.argv[2]), sys.argv[3])
    else:
        main()
