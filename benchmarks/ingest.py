"""End-to-end ingestion speed: the real ``twistd teltonika`` server over loopback.

Usage::

    python benchmarks/ingest.py                 # about 3 minutes
    python benchmarks/ingest.py --seconds 4 --devices 100 --idle 2000   # quicker

Everything runs on this machine and is torn down at the end: a throwaway
``redis-server`` on a free port, the server as a ``twistd -n teltonika`` subprocess, and
load generators in separate processes (``--role client``) that log N devices in, then
send pre-built codec 8E frames (10 records, 13 IO elements each), one unACKed frame per
device as real trackers do, and time every ACK.

Parts, each printed with its in-run baseline:

1. Throughput per sink (Redis ``memory``, Redis ``fsync`` = appendonly + appendfsync
   always, the JSON-lines file): records/s, frames/s, ACK latency p50/p99/max, server RSS.
   Baselines on the same entries, the strongest first: redis-py + hiredis pipelining 100
   XADDs (no decoding), into the memory Redis and into the ``appendfsync always`` one;
   the naive path (decode, then one awaited txredisapi XADD per record).
2. ACK latency at a paced 2,000 frames/s (Redis memory sink and the file sink), next to
   a bare Twisted server that decodes and ACKs at once (the load generator's own noise).
3. Idle logged-in connections: server RSS with ``--idle`` devices logged in, minus the
   empty server's, per device (RLIMIT_NOFILE is raised to its hard limit first).
4. Durability modes in one run: ``--redis-durability memory`` (Redis without AOF),
   ``fsync`` (appendonly + appendfsync always), and ``replicated`` (``WAIT 1`` after every
   batch) against a master with two replicas started here (every node appendfsync
   always), next to ``fsync`` on that same master (what WAIT itself costs) and to
   ``replicated`` over one writer connection (every batch waits for the WAIT before it).

The machine has 2 cores shared by the server, Redis and the load generators: compare the
ratios printed in one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from anywhere: import the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.support import checkout_env, free_port, percentile, rss_kib, wait_port

REPO = Path(__file__).resolve().parents[1]
RECORDS_PER_FRAME = 10
TWISTD = "from twisted.scripts.twistd import run; run()"


def imei(n: int) -> str:
    return f"35{n:013d}"


def build_frame() -> bytes:
    from teltonika.wire import CODEC_8E, AVLRecord, encode_avl_frame

    io = (
        (239, 1, 1),
        (240, 1, 1),
        (80, 1, 0),
        (21, 1, 4),
        (200, 1, 0),
        (69, 1, 1),
        (181, 2, 9),
        (182, 2, 7),
        (66, 2, 12850),
        (24, 2, 42),
        (241, 4, 24602),
        (16, 4, 1234567),
        (11, 8, 893700099),
    )
    records = [
        AVLRecord(
            1_700_000_000_000 + i * 1000, 0, 25.2797 + i * 1e-4, 54.6872, 112, 90, 11, 42, 0, io
        )
        for i in range(RECORDS_PER_FRAME)
    ]
    return encode_avl_frame(CODEC_8E, records)


# -- helper processes ------------------------------------------------------------------


def role_client(args: dict[str, Any]) -> dict[str, Any]:
    """Log devices in, then send frames (one unACKed per device), timing each ACK."""
    port, first, count = args["port"], args["first"], args["count"]
    seconds, rate = args["seconds"], args["rate_per_device"]
    from teltonika.wire import encode_login

    frame = build_frame() if args["send"] else b""
    sel = selectors.DefaultSelector()
    socks = []
    for n in range(first, first + count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(encode_login(imei(n)))
        socks.append(sock)
    for sock in socks:
        if sock.recv(1) != b"\x01":
            raise SystemExit("login refused")
        sock.setblocking(False)
    if not args["send"]:
        print(json.dumps({"logged_in": len(socks)}), flush=True)
        sys.stdin.readline()  # hold the connections until the parent says so
        return {}
    sent_at: dict[int, float] = {}
    pending: dict[int, bytes] = {}
    interval = 1.0 / rate if rate else 0.0
    next_send: dict[int, float] = {}
    latencies: list[float] = []
    by_fd = {sock.fileno(): sock for sock in socks}
    start = time.monotonic()
    end = start + seconds
    for i, sock in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ)
        next_send[sock.fileno()] = start + (interval * i / len(socks) if interval else 0.0)
    acked = 0
    while True:
        now = time.monotonic()
        if now >= end and not sent_at:
            break
        if now >= end + 10:
            break
        if now < end:
            for fd, when in list(next_send.items()):
                if when <= now and fd not in sent_at:
                    try:
                        by_fd[fd].send(frame)
                    except BlockingIOError:
                        continue
                    sent_at[fd] = time.monotonic()
                    del next_send[fd]
        timeout = 0.001 if interval else 0.05
        for key, _ in sel.select(timeout):
            sock = key.fileobj
            fd = sock.fileno()  # type: ignore[union-attr]
            data = pending.get(fd, b"") + sock.recv(4096)  # type: ignore[union-attr]
            while len(data) >= 4:
                data = data[4:]
                t0 = sent_at.pop(fd, None)
                if t0 is not None:
                    t = time.monotonic()
                    latencies.append(t - t0)
                    acked += 1
                    if interval:
                        slot = next_send.get(fd, t0 + interval)
                        next_send[fd] = max(slot, t0 + interval)
                    else:
                        next_send[fd] = t
            pending[fd] = data
    elapsed = min(time.monotonic(), end) - start
    for sock in socks:
        sock.close()
    return {"acked": acked, "elapsed": elapsed, "latencies": latencies}


def role_naive(args: dict[str, Any]) -> dict[str, Any]:
    """Decode each frame, then one awaited txredisapi XADD per record."""
    from twisted.internet import defer, task

    from teltonika.codecs import CodecRegistry
    from teltonika.contract import TELEMETRY_STREAM, entry_fields
    from teltonika.redis.connect import lazy_connection, parse_redis_url
    from teltonika.wire.builtin_codecs import BUILTIN_CODECS

    registry = CodecRegistry(BUILTIN_CODECS)
    frame = build_frame()
    result: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        conn = lazy_connection(parse_redis_url(args["redis"]))
        await conn.execute_command("PING")
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < args["seconds"]:
            codec, packet = registry.decode_frame(frame)
            for rec in packet.records:
                fields = entry_fields(imei(1), codec.name, rec, 1, "bench")
                await conn.execute_command("XADD", TELEMETRY_STREAM, "*", *fields)
                count += 1
        result["records_per_s"] = count / (time.perf_counter() - start)
        await conn.disconnect()

    with contextlib.suppress(SystemExit):
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return result


def role_redispy(args: dict[str, Any]) -> dict[str, Any]:
    """redis-py (+hiredis when installed) pipelining 100 XADDs of pre-built entries."""
    import redis

    from teltonika.codecs import CodecRegistry
    from teltonika.contract import TELEMETRY_STREAM, entry_fields
    from teltonika.wire.builtin_codecs import BUILTIN_CODECS

    codec, packet = CodecRegistry(BUILTIN_CODECS).decode_frame(build_frame())
    entries = []
    for rec in packet.records:
        flat = entry_fields(imei(1), codec.name, rec, 1, "bench")
        entries.append(dict(zip(flat[::2], flat[1::2], strict=True)))
    client = redis.Redis.from_url(args["redis"])
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args["seconds"]:
        pipe = client.pipeline(transaction=False)
        for i in range(100):
            pipe.xadd(TELEMETRY_STREAM, entries[i % len(entries)])
        pipe.execute()
        count += 100
    elapsed = time.perf_counter() - start
    try:
        import hiredis  # noqa: F401

        parser = "hiredis"
    except ImportError:
        parser = "pure-Python parser (hiredis not installed)"
    return {"records_per_s": count / elapsed, "parser": parser}


def role_bare(args: dict[str, Any]) -> dict[str, Any]:
    """The latency baseline: a bare Twisted server that cuts, decodes and ACKs at once
    (no sink, no batching), on the port given."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from teltonika.codecs import CodecRegistry
    from teltonika.wire import Framer, ImeiFrame, tcp_ack
    from teltonika.wire.builtin_codecs import BUILTIN_CODECS

    registry = CodecRegistry(BUILTIN_CODECS)

    class Bare(Protocol):
        def connectionMade(self) -> None:
            self.framer = Framer()

        def dataReceived(self, data: bytes) -> None:
            for frame in self.framer.feed(data):
                if isinstance(frame, ImeiFrame):
                    self.transport.write(b"\x01")  # type: ignore[union-attr]
                elif hasattr(frame, "raw"):
                    _codec, packet = registry.decode_frame(frame.raw)
                    self.transport.write(tcp_ack(len(packet.records)))  # type: ignore

    reactor.listenTCP(args["port"], Factory.forProtocol(Bare), interface="127.0.0.1")
    reactor.run()
    return {}


def role_sink(args: dict[str, Any]) -> dict[str, Any]:
    """The Redis sink alone, in this process: *publishers* concurrent publishers each
    publish one 10-record frame and await it, again and again (no sockets, no decoding:
    what is left is the sink's Redis round trips, where WAIT's cost lives)."""
    from prometheus_client import CollectorRegistry
    from twisted.internet import defer, task

    import teltonika.sinks.redis_stream as sink_module
    from teltonika.codecs import CodecRegistry
    from teltonika.metrics import ServerMetrics
    from teltonika.redis.connect import lazy_connection, parse_redis_url
    from teltonika.wire.builtin_codecs import BUILTIN_CODECS

    sink_module.REPLICATED_WRITERS = args["writers"]
    _codec, packet = CodecRegistry(BUILTIN_CODECS).decode_frame(build_frame())
    address = parse_redis_url(args["redis"])
    result: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        sink = sink_module.RedisStreamSink(
            lambda: lazy_connection(address),
            reactor,
            ServerMetrics.create(CollectorRegistry()),
            instance_id="bench",
            settings=sink_module.RedisSinkSettings(durability=args["durability"]),
            connect=lambda: lazy_connection(address),
        )
        await sink.start()
        count = 0
        end = time.perf_counter() + args["seconds"]

        async def publisher(n: int) -> None:
            nonlocal count
            while time.perf_counter() < end:
                await sink.publish(imei(n), "8E", packet.records, 1)
                count += len(packet.records)

        start = time.perf_counter()
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(publisher(n)) for n in range(args["publishers"])]
        )
        result["records_per_s"] = count / (time.perf_counter() - start)
        await sink.close()

    with contextlib.suppress(SystemExit):
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return result


ROLES = {
    "client": role_client,
    "naive": role_naive,
    "redispy": role_redispy,
    "bare": role_bare,
    "sink": role_sink,
}


def run_role(role: str, args: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--role", role, json.dumps(args)],
        capture_output=True,
        check=True,
        timeout=timeout,
        env=checkout_env(),
    )
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


# -- servers ---------------------------------------------------------------------------


class Redis:
    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir,
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                "",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "FLUSHALL"], check=True, capture_output=True
        )

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Server:
    def __init__(self, workdir: Path, *args: str, code: str = TWISTD) -> None:
        self.port = free_port()
        self.log = (workdir / f"twistd-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                "-n",
                "--pidfile=",
                "teltonika",
                "--port",
                f"tcp:{self.port}:interface=127.0.0.1",
                "--metrics",
                "off",
                "--max-connections",
                "0",
                *args,
            ],
            cwd=workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=checkout_env(),
        )
        wait_port(self.port)
        time.sleep(0.3)  # let the sink's start-up check finish

    def rss(self) -> int:
        return rss_kib(self.proc.pid)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def drive(
    port: int, devices: int, seconds: float, rate_per_device: float = 0.0, processes: int = 2
) -> dict[str, Any]:
    """Run *processes* load generators against *port*; merge their results."""
    per = devices // processes
    procs = []
    for p in range(processes):
        args = {
            "port": port,
            "first": p * per,
            "count": per,
            "seconds": seconds,
            "rate_per_device": rate_per_device,
            "send": True,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--role", "client", json.dumps(args)],
                stdout=subprocess.PIPE,
                env=checkout_env(),
            )
        )
    acked, elapsed, latencies = 0, 0.0, []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 120)
        result = json.loads(out.decode().strip().splitlines()[-1])
        acked += result["acked"]
        elapsed = max(elapsed, result["elapsed"])
        latencies += result["latencies"]
    return {"frames": acked, "elapsed": elapsed, "latencies": latencies}


def report(label: str, result: dict[str, Any], rss: int | None = None) -> float:
    frames_per_s = result["frames"] / result["elapsed"]
    records_per_s = frames_per_s * RECORDS_PER_FRAME
    lat = [x * 1000 for x in result["latencies"]]
    line = (
        f"  {label:<28} {records_per_s:>9,.0f} records/s {frames_per_s:>8,.0f} frames/s  "
        f"ACK p50 {percentile(lat, 50):6.2f} ms  p99 {percentile(lat, 99):6.2f} ms  "
        f"max {max(lat) if lat else float('nan'):7.2f} ms"
    )
    if rss is not None:
        line += f"  RSS {rss / 1024:6.1f} MiB"
    print(line, flush=True)
    return records_per_s


def part_throughput(opts: argparse.Namespace, workdir: Path) -> None:
    print(
        f"\n1. Throughput: {opts.devices} devices, frames of {RECORDS_PER_FRAME} 8E records, "
        f"{opts.seconds:g} s per run",
        flush=True,
    )
    redis = Redis()
    aof = Redis("--appendonly", "yes", "--appendfsync", "always")
    try:
        naive = run_role("naive", {"redis": redis.url, "seconds": opts.seconds})
        redis.flush()
        redispy = run_role("redispy", {"redis": redis.url, "seconds": opts.seconds})
        redis.flush()
        # the same pipelining into the appendfsync-always Redis: what fsync costs anyone
        redispy_aof = run_role("redispy", {"redis": aof.url, "seconds": opts.seconds})
        aof.flush()
        print(
            f"  {'baseline redis-py pipeline':<28} {redispy['records_per_s']:>9,.0f} records/s"
            f"  ({redispy['parser']})",
        )
        print(
            f"  {'baseline redis-py, fsync':<28} {redispy_aof['records_per_s']:>9,.0f} records/s"
            "  (into the appendfsync always Redis)"
        )
        print(f"  {'baseline naive (1 XADD/await)':<28} {naive['records_per_s']:>9,.0f} records/s")
        figures = {}
        for label, _url, args in (
            ("server -> Redis (memory)", redis.url, ["--redis", redis.url]),
            (
                "server -> Redis (fsync)",
                aof.url,
                ["--redis", aof.url, "--redis-durability", "fsync"],
            ),
            ("server -> JSONL file", None, ["--output", str(workdir / "records.jsonl")]),
        ):
            server = Server(workdir, *args)
            try:
                result = drive(server.port, opts.devices, opts.seconds)
                figures[label] = report(label, result, server.rss())
            finally:
                server.close()
        memory = figures["server -> Redis (memory)"]
        fsync = figures["server -> Redis (fsync)"]
        print(
            f"  ratios: Redis(memory) / redis-py pipeline = "
            f"{memory / redispy['records_per_s']:.0%} (target >= 80%); "
            f"Redis(fsync) / redis-py pipeline = {fsync / redispy['records_per_s']:.0%} "
            f"(target >= 80%), / redis-py into the fsync Redis = "
            f"{fsync / redispy_aof['records_per_s']:.0%}; fsync / memory = {fsync / memory:.0%}; "
            f"Redis(memory) / naive = {memory / naive['records_per_s']:.2f}x",
            flush=True,
        )
    finally:
        redis.close()
        aof.close()


def part_paced(opts: argparse.Namespace, workdir: Path) -> None:
    devices = 100
    rate = opts.paced_rate / devices
    print(
        f"\n2. Paced load: {opts.paced_rate:,} frames/s ({devices} devices x {rate:g}/s), "
        f"{opts.seconds:g} s",
        flush=True,
    )
    redis = Redis()
    bare_port = free_port()
    bare = subprocess.Popen(
        [sys.executable, __file__, "--role", "bare", json.dumps({"port": bare_port})],
        env=checkout_env(),
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port(bare_port)
        result = drive(bare_port, devices, opts.seconds, rate_per_device=rate)
        report("baseline bare decode+ACK", result, rss_kib(bare.pid))
        bare_p99 = percentile([x * 1000 for x in result["latencies"]], 99)
    finally:
        bare.terminate()
        bare.wait(10)
    try:
        for label, args in (
            ("server -> Redis (memory)", ["--redis", redis.url]),
            ("server -> JSONL file", ["--output", str(workdir / "paced.jsonl")]),
        ):
            server = Server(workdir, *args)
            try:
                result = drive(server.port, devices, opts.seconds, rate_per_device=rate)
                report(label, result, server.rss())
                p99 = percentile([x * 1000 for x in result["latencies"]], 99)
                print(f"    ACK p99 / bare p99 = {p99 / bare_p99:.1f}x (target < 2x)", flush=True)
            finally:
                server.close()
    finally:
        redis.close()


def part_idle(opts: argparse.Namespace, workdir: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = min(opts.idle, hard - 200)
    print(f"\n3. Idle connections: {count:,} logged-in devices (RLIMIT_NOFILE {hard})", flush=True)
    server = Server(workdir, "--output", str(workdir / "idle.jsonl"))
    holders = []
    try:
        time.sleep(0.5)
        empty = server.rss()
        per = count // 2
        for p in range(2):
            args = {
                "port": server.port,
                "first": p * per,
                "count": per,
                "seconds": 0,
                "rate_per_device": 0,
                "send": False,
            }
            holders.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--role", "client", json.dumps(args)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=checkout_env(),
                )
            )
        for holder in holders:
            assert holder.stdout is not None
            line = holder.stdout.readline()
            if not line:
                raise RuntimeError("idle client failed")
        time.sleep(1.0)
        full = server.rss()
        print(
            f"  empty server RSS {empty / 1024:.1f} MiB; with {2 * per:,} devices "
            f"{full / 1024:.1f} MiB; {(full - empty) / (2 * per):.2f} KiB per device "
            f"(target < 16 KiB)",
            flush=True,
        )
    finally:
        for holder in holders:
            if holder.stdin is not None:
                holder.stdin.close()
            holder.wait(30)
        server.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def part_durability(opts: argparse.Namespace, workdir: Path) -> None:
    print(
        f"\n4. Durability modes: {opts.devices} devices, {opts.seconds:g} s per run "
        f"(load before: {Path('/proc/loadavg').read_text().split()[0]})",
        flush=True,
    )
    always = ("--appendonly", "yes", "--appendfsync", "always")
    plain = Redis()
    single = Redis(*always)
    master = Redis(*always)
    replicas = [Redis(*always, "--replicaof", "127.0.0.1", str(master.port)) for _ in range(2)]
    try:
        for replica in replicas:
            deadline = time.monotonic() + 30
            while (
                b"master_link_status:up"
                not in subprocess.run(
                    ["redis-cli", "-p", str(replica.port), "INFO", "replication"],
                    capture_output=True,
                    check=True,
                ).stdout
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("a replica did not sync with its master")
                time.sleep(0.05)
        one_writer = (
            "import teltonika.sinks.redis_stream as sink; sink.REPLICATED_WRITERS = 1; " + TWISTD
        )
        runs = (
            ("memory (no AOF)", ["--redis", plain.url]),
            ("fsync (one Redis)", ["--redis", single.url, "--redis-durability", "fsync"]),
            ("fsync (master of 2)", ["--redis", master.url, "--redis-durability", "fsync"]),
            (
                "replicated (WAIT 1 of 2)",
                ["--redis", master.url, "--redis-durability", "replicated"],
            ),
            (
                "replicated, 1 connection",
                ["--redis", master.url, "--redis-durability", "replicated"],
            ),
        )
        # The machine is shared: the modes take turns, opts.repeat times, and each
        # figure is the median of its turns, so that a burst of outside load does not
        # land on one mode only.
        samples: dict[str, list[float]] = {label: [] for label, _args in runs}
        for turn in range(opts.repeat):
            for label, args in runs:
                code = one_writer if label.endswith("1 connection") else TWISTD
                server = Server(workdir, *args, code=code)
                try:
                    samples[label].append(
                        report(
                            f"{label} #{turn + 1}",
                            drive(server.port, opts.devices, opts.seconds),
                            server.rss(),
                        )
                    )
                finally:
                    server.close()
        figures = {label: sorted(values)[len(values) // 2] for label, values in samples.items()}
        for label, value in figures.items():
            print(f"  median {label:<28} {value:>9,.0f} records/s", flush=True)
        memory = figures["memory (no AOF)"]
        replicated = figures["replicated (WAIT 1 of 2)"]
        print(
            f"  ratios: fsync / memory = {figures['fsync (one Redis)'] / memory:.0%}; "
            f"replicated / memory = {replicated / memory:.0%}; replicated / fsync on the "
            f"same master = {replicated / figures['fsync (master of 2)']:.0%}; 1 connection "
            f"/ 4 = {figures['replicated, 1 connection'] / replicated:.0%} "
            f"(load after: {Path('/proc/loadavg').read_text().split()[0]})",
            flush=True,
        )
        print(
            f"  the sink alone, {opts.devices} publishers in one process (medians of "
            f"{opts.repeat}):",
            flush=True,
        )
        sink_runs = (
            ("memory (no AOF)", plain.url, "memory", 1),
            ("fsync (master of 2)", master.url, "fsync", 1),
            ("replicated, 4 connections", master.url, "replicated", 4),
            ("replicated, 1 connection", master.url, "replicated", 1),
        )
        alone: dict[str, list[float]] = {label: [] for label, *_rest in sink_runs}
        for _turn in range(opts.repeat):
            for label, url, durability, writers in sink_runs:
                measured = run_role(
                    "sink",
                    {
                        "redis": url,
                        "durability": durability,
                        "writers": writers,
                        "publishers": opts.devices,
                        "seconds": opts.seconds,
                    },
                )
                alone[label].append(measured["records_per_s"])
        medians = {label: sorted(v)[len(v) // 2] for label, v in alone.items()}
        for label, value in medians.items():
            print(f"  sink {label:<28} {value:>9,.0f} records/s", flush=True)
        print(
            "  ratios: replicated 4 connections / fsync = "
            f"{medians['replicated, 4 connections'] / medians['fsync (master of 2)']:.0%}; "
            "1 connection / 4 = "
            f"{medians['replicated, 1 connection'] / medians['replicated, 4 connections']:.0%}"
            f" (load after: {Path('/proc/loadavg').read_text().split()[0]})",
            flush=True,
        )
    finally:
        for redis in (plain, single, master, *replicas):
            redis.close()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--role":
        result = ROLES[sys.argv[2]](json.loads(sys.argv[3]))
        print(json.dumps(result), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each run")
    parser.add_argument("--devices", type=int, default=200, help="devices for part 1")
    parser.add_argument("--paced-rate", type=int, default=2000, help="frames/s in part 2")
    parser.add_argument("--idle", type=int, default=10_000, help="idle devices in part 3")
    parser.add_argument("--parts", default="1234", help="which parts to run, e.g. 13")
    parser.add_argument("--repeat", type=int, default=3, help="turns of each mode in part 4")
    opts = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is needed (apt-get install redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    started = time.monotonic()
    try:
        if "1" in opts.parts:
            part_throughput(opts, workdir)
        if "2" in opts.parts:
            part_paced(opts, workdir)
        if "3" in opts.parts:
            part_idle(opts, workdir)
        if "4" in opts.parts:
            part_durability(opts, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
