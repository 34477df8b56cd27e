"""Server targets measured with the simulated fleet (``teltonika simulate``), each next to
an in-run baseline.

Usage (from the checkout; each part is bounded to a few minutes)::

    python benchmarks/fleet.py capacity     # logged-in devices per process, RSS per device
    python benchmarks/fleet.py throughput   # sustained records/s into Redis
    python benchmarks/fleet.py latency      # ACK latency p99 at 2,000 frames/s, paced
    python benchmarks/fleet.py scale        # devices over several reuseport processes
    python benchmarks/fleet.py memory       # Redis memory per stream entry (sizing)
    python benchmarks/fleet.py scale --devices 100000 --processes 7   # the big one
    python benchmarks/fleet.py all

Parts and their baselines:

* **capacity** -- N simulated devices log in and stay idle (no frames, no keepalives);
  the server's RSS above the empty server, per device. Baseline in the same run: a bare
  Twisted server (a Protocol that discards bytes) holding the same N connections from the
  same simulator. Steps up to ``--max-devices`` (default: as many as the per-process
  open-file limit allows, after raising the soft limit to the hard one). Clients are spread
  over several simulator processes, since they need their own descriptors.
* **throughput** -- a closed-loop fleet (every device sends its next frame as soon as the
  last is ACKed) against ``twistd teltonika --redis``; steady-state records/s read from the
  server's own counter over the middle of the run. Baseline: redis-py with hiredis
  pipelining 100 XADDs of the same contract entries into the same Redis.
* **scale** -- ``--devices`` idle devices (default 6,000) over ``--processes`` server
  processes sharing one port (``reuseport:``), the simulator spread over processes of
  ``--per-process`` devices, each connecting from its own loopback address
  (``--bind 127.0.0.N``: one address has ~28,000 ephemeral ports towards one port);
  logged-in devices, RSS per device and in all. Baseline in the same run: one server
  process holding one process's share. Everything stops within ``--seconds`` per ramp.
* **memory** -- Redis memory per telemetry entry as the server writes them (a fleet of
  ``--devices`` sending one record every ``--interval`` s), from ``MEMORY USAGE`` of the
  stream and ``INFO`` used_memory, against the entry's own bytes; and what a processor
  outage costs per hour at 10,000 and 100,000 devices.
* **latency** -- 200 devices x 10 frames/s = 2,000 frames/s paced; the simulator's ACK
  latency p50/p99/max. Baseline: the same fleet against a bare Twisted server that decodes
  each frame (CRC included) and ACKs at once (no sink).

The machine's 2 cores are shared by the server, Redis and the simulator (and other work):
compare ratios within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.support import checkout_env, free_port, rss_kib, wait_port  # noqa: E402

KIB = 1024
BARE_SERVER = r"""
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

mode = sys.argv[2]

class Discard(Protocol):
    def dataReceived(self, data):
        pass

class DecodeAndAck(Protocol):
    def connectionMade(self):
        from teltonika.wire import Framer
        self.framer = Framer()

    def dataReceived(self, data):
        from teltonika.wire import DataFrame, ImeiFrame, tcp_ack
        for frame in self.framer.feed(data):
            if isinstance(frame, ImeiFrame):
                self.transport.write(b"\x01")
            elif isinstance(frame, DataFrame):
                _codec, packet = REGISTRY.decode_frame(frame.raw)
                self.transport.write(tcp_ack(len(packet.records)))

if mode == "ack":
    from teltonika.codecs import load_codecs
    REGISTRY = load_codecs()
factory = Factory.forProtocol(Discard if mode == "idle" else DecodeAndAck)
factory.noisy = False
reactor.listenTCP(int(sys.argv[1]), factory, backlog=4096, interface="127.0.0.1")
reactor.run()
"""


# -- plumbing -------------------------------------------------------------------------


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle_rss(pid: int, seconds: float = 1.5) -> int:
    """RSS once it stops moving (max over a short window: allocations lag connections)."""
    best = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        best = max(best, rss_kib(pid))
        time.sleep(0.25)
    return best


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-fleet-redis-")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             self.dir, "--save", "", "--appendonly", "no", "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port, 30.0)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "FLUSHALL"], check=True,
                       capture_output=True)  # fmt: skip

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Process:
    """A server subprocess (ours or the bare baseline) on a free loopback port."""

    def __init__(
        self, argv: list[str], workdir: Path, port: int, name: str, wait_on: int = 0
    ) -> None:
        self.port = port
        self.log = (workdir / f"{name}.log").open("wb")
        self.proc = subprocess.Popen(argv, cwd=workdir, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=checkout_env())  # fmt: skip
        wait_port(wait_on or port, 60.0)
        time.sleep(0.5)

    metrics_port = 0

    @classmethod
    def teltonika(cls, workdir: Path, *options: str) -> Process:
        port = free_port()
        metrics_port = free_port()
        argv = [
            sys.executable, "-m", "twisted", "teltonika",
            "--port", f"tcp:{port}:interface=127.0.0.1",
            "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1",
            "--max-connections", "0", "--idle-timeout", "0", "--login-timeout", "600",
            "--instance-id", "bench", *options,
        ]  # fmt: skip
        process = cls(argv, workdir, port, "teltonika")
        process.metrics_port = metrics_port
        return process

    @classmethod
    def teltonika_shared(cls, workdir: Path, port: int, index: int) -> Process:
        """One of several servers sharing *port* (``reuseport:``), each with its own
        instance id, metrics port and output file; idle devices are never closed."""
        metrics_port = free_port()
        argv = [
            sys.executable, "-m", "twisted", "teltonika",
            "--port", f"reuseport:{port}:interface=127.0.0.1:backlog=4096",
            "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1",
            "--max-connections", "0", "--idle-timeout", "0", "--login-timeout", "600",
            "--instance-id", f"bench-{index}", "--output", str(workdir / f"idle-{index}.jsonl"),
        ]  # fmt: skip
        process = cls(argv, workdir, port, f"teltonika-{index}", wait_on=metrics_port)
        process.metrics_port = metrics_port
        return process

    def metric(self, name: str) -> float:
        """Sum of one metric's samples on /metrics (our server only)."""
        with socket.create_connection(("127.0.0.1", self.metrics_port), timeout=30) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        total = 0.0
        for line in raw.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    @classmethod
    def bare(cls, workdir: Path, mode: str) -> Process:
        port = free_port()
        return cls([sys.executable, "-c", BARE_SERVER, str(port), mode], workdir, port, "bare")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def simulate(port: int, *options: str, timeout: float = 600) -> dict[str, Any]:
    """Run ``teltonika simulate --json`` to the end; return its summary."""
    out = subprocess.run(
        [sys.executable, "-m", "teltonika", "simulate", "--port", str(port), "--json",
         "--progress", "0", *options],
        capture_output=True, timeout=timeout, env=checkout_env(), cwd=REPO, check=False,
    )  # fmt: skip
    try:
        result: dict[str, Any] = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"simulate failed: {out.stdout!r} {out.stderr[-2000:]!r}") from None
    return result


def start_idle_fleet(
    port: int,
    devices: int,
    per_process: int,
    imei_start: int,
    sources: list[str] | None = None,
    duration: float = 900,
) -> list[Any]:
    """Simulator processes holding *devices* idle logged-in connections (killed by the
    caller; each also stops by itself after *duration* seconds). With *sources*, process
    *i* connects from ``sources[i % len(sources)]`` (``--bind``)."""
    procs = []
    offset = 0
    while offset < devices:
        count = min(per_process, devices - offset)
        bind = ["--bind", sources[len(procs) % len(sources)]] if sources else []
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "teltonika", "simulate", "--port", str(port),
             "--devices", str(count), "--imei-start", str(imei_start + offset),
             "--interval", "1000000", "--keepalive", "0", "--ack-timeout", "100000",
             "--duration", str(duration), "--connect-rate", "500", "--progress", "0",
             "--backoff-max", "2", "--drain", "1", *bind],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=checkout_env(), cwd=REPO,
        ))  # fmt: skip
        offset += count
    return procs


def stop_all(procs: list[Any]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(30)


def machine() -> str:
    return f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}"


# -- parts ----------------------------------------------------------------------------


def wait_connected(count: Any, target: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen = count()
    while seen < target and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = count()
    return int(seen)


def capacity(opts: argparse.Namespace, workdir: Path) -> None:
    limit = raise_nofile()
    ceiling = opts.max_devices or (limit - 100)
    steps = sorted({s for s in (1000, 5000, 10_000, ceiling) if s <= ceiling})
    print(f"capacity: RLIMIT_NOFILE {limit} per process; steps {steps}; "
          f"{opts.per_process} simulated devices per client process")  # fmt: skip
    print(f"{'devices':>8} {'bare KiB/conn':>14} {'teltonika KiB/dev':>18} {'ratio':>6} "
          f"{'logged in':>10}")  # fmt: skip
    for step in steps:
        bare = Process.bare(workdir, "idle")
        empty = settle_rss(bare.pid, 1.0)
        fds0 = open_fds(bare.pid)
        clients = start_idle_fleet(bare.port, step, opts.per_process, 350000000000000)
        held = wait_connected(lambda b=bare, f=fds0: open_fds(b.pid) - f, step, 120)
        bare_per = (settle_rss(bare.pid) - empty) / max(held, 1)
        stop_all(clients)
        bare.close()

        server = Process.teltonika(workdir, "--output", str(workdir / "idle.jsonl"))
        empty = settle_rss(server.pid, 1.0)
        clients = start_idle_fleet(server.port, step, opts.per_process, 350000000000000)
        logged = wait_connected(lambda s=server: s.metric("teltonika_logins_total"), step, 180)
        ours_per = (settle_rss(server.pid, 2.5) - empty) / max(logged, 1)
        stop_all(clients)
        server.close()
        print(f"{step:>8} {bare_per:>14.2f} {ours_per:>18.2f} {ours_per / bare_per:>6.1f} "
              f"{logged:>10}", flush=True)  # fmt: skip
    print("target: 10,000 devices under 16 KiB each above the empty server")


def scale(opts: argparse.Namespace, workdir: Path) -> None:
    """Idle logged-in devices over several ``reuseport:`` server processes sharing one
    port, against one process holding one process's share (the in-run baseline)."""
    limit = raise_nofile()
    processes = opts.processes
    share = -(-opts.devices // processes)
    if share > limit - 300:
        raise SystemExit(
            f"{share} devices a process exceeds RLIMIT_NOFILE {limit}: more --processes"
        )
    # Client side: one simulator process per source address, each well under both the
    # open-file limit and the ~28,000 ephemeral ports one address has towards one port.
    clients = max(1, -(-opts.devices // min(opts.per_process, limit - 300, 25_000)))
    per_client = -(-opts.devices // clients)
    sources = [f"127.0.0.{2 + index}" for index in range(clients)]
    bound = opts.seconds
    # Simulators outlive the ramp and the measurement (slow /metrics answers on a loaded
    # machine included), then stop by themselves.
    lifetime = bound + 300
    print(f"scale: {opts.devices:,} idle devices over {processes} reuseport processes "
          f"(~{share:,} each), {clients} simulator processes of ~{per_client:,} from "
          f"{sources[0]}..{sources[-1]}; RLIMIT_NOFILE {limit}; load {loadavg()}")  # fmt: skip

    single = Process.teltonika(workdir, "--output", str(workdir / "single.jsonl"))
    empty = settle_rss(single.pid, 1.0)
    fleet = start_idle_fleet(single.port, share, per_client, 350000000000000, sources, lifetime)
    logged = wait_connected(lambda: single.metric("teltonika_logins_total"), share, bound)
    single_rss = settle_rss(single.pid, 2.5)
    single_per = (single_rss - empty) / max(logged, 1)
    stop_all(fleet)
    single.close()
    print(f"  baseline: 1 process, {logged:,} devices: {single_per:.2f} KiB/device above the "
          f"empty server, RSS {single_rss / KIB:.0f} MiB")  # fmt: skip

    port = free_port()
    servers = [Process.teltonika_shared(workdir, port, index) for index in range(processes)]
    fleet = []
    try:
        empties = [settle_rss(server.pid, 1.0) for server in servers]
        started = time.monotonic()
        fleet = start_idle_fleet(port, opts.devices, per_client, 350000000000000, sources, lifetime)

        seen = [0.0] * processes

        def logins() -> float:
            # A process busy with the ramp may answer /metrics late: keep its last figure.
            for index, server in enumerate(servers):
                with contextlib.suppress(OSError):
                    seen[index] = server.metric("teltonika_logins_total")
            print(f"    {sum(seen):,.0f} logged in, load {loadavg()}", flush=True)
            return sum(seen)

        logged = wait_connected(logins, opts.devices, bound)
        ramp = time.monotonic() - started
        rss = [settle_rss(server.pid, 2.5) for server in servers]
        per_server = [int(held(server)) for server in servers]
        client_rss = sum(rss_kib(client.pid) for client in fleet)
        print(f"  load after the ramp: {loadavg()}")
    finally:
        stop_all(fleet)
        for server in servers:
            server.close()
    above = sum(r - e for r, e in zip(rss, empties, strict=True))
    multi_per = above / max(logged, 1)
    print(f"  {processes} processes: {logged:,} of {opts.devices:,} devices logged in after "
          f"{ramp:.0f} s; per process {min(per_server):,}..{max(per_server):,}")  # fmt: skip
    print(
        f"  RSS per device above the empty servers: {multi_per:.2f} KiB "
        f"(baseline 1 process: {single_per:.2f} KiB, ratio {multi_per / single_per:.2f})"
    )
    total = sum(rss)
    print(f"  RSS of all servers: {total / KIB / KIB:.2f} GiB ({total / max(logged, 1):.2f} "
          f"KiB/device including the {processes} empty servers' {sum(empties) / KIB:.0f} MiB);"
          f" simulators {client_rss / KIB / KIB:.2f} GiB")  # fmt: skip


def stream_memory(opts: argparse.Namespace, workdir: Path) -> None:
    """Redis memory per telemetry entry, as the server writes them, for sizing (how much
    a processor outage costs): INFO used_memory and MEMORY USAGE of the stream after a
    fleet run, per entry, against the entry's own bytes (fields + values, from XRANGE)."""
    raise_nofile()
    redis = Redis()
    try:
        before = redis_info(redis, "used_memory")
        server = Process.teltonika(workdir, "--redis", redis.url)
        try:
            summary = simulate(
                server.port, "--devices", str(opts.devices), "--records-per-frame", "1",
                "--interval", str(opts.interval), "--duration", str(opts.seconds),
                "--connect-rate", "1000", "--keepalive", "0",
            )  # fmt: skip
        finally:
            server.close()
        entries = stream_length(redis)
        used = redis_info(redis, "used_memory") - before
        usage = int(redis_cli(redis, "MEMORY", "USAGE", "telemetry:teltonika", "SAMPLES", "0"))
        raw = entry_bytes(redis)
    finally:
        redis.close()
    print(
        f"stream memory: {opts.devices} devices x 1 record every {opts.interval} s for "
        f"{opts.seconds:.0f} s -> {entries:,} entries ({summary['records_acked']:,} ACKed)"
    )
    print(f"  entry's own bytes (fields + values, baseline): {raw:8.1f} B/entry")
    print(
        f"  MEMORY USAGE telemetry:teltonika:             {usage / entries:8.1f} B/entry "
        f"({usage / entries / raw:.2f}x)"
    )
    print(f"  INFO used_memory growth:                      {used / entries:8.1f} B/entry")
    per_hour = used / entries * 3600
    for fleet in (10_000, 100_000):
        rate = fleet / 10  # one record every 10 s a device
        print(
            f"  a processor outage at {fleet:,} devices x 1 record/10 s: "
            f"{rate * per_hour / 1e9:.2f} GB of Redis memory per hour"
        )


def redis_cli(redis: Redis, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(redis.port), *args], capture_output=True,
                         check=True)  # fmt: skip
    return out.stdout.decode().strip()


def redis_info(redis: Redis, field: str) -> int:
    for line in redis_cli(redis, "INFO", "memory").splitlines():
        if line.startswith(field + ":"):
            return int(line.split(":", 1)[1])
    raise SystemExit(f"no {field} in INFO")


def entry_bytes(redis: Redis) -> float:
    """Mean bytes of an entry's fields and values over the first 1,000 entries."""
    import redis as redispy

    client = redispy.Redis(port=redis.port)
    try:
        sample = client.xrange("telemetry:teltonika", count=1000)
    finally:
        client.close()
    sizes = [sum(len(k) + len(v) for k, v in fields.items()) for _id, fields in sample]
    return sum(sizes) / max(len(sizes), 1)


def held(server: Process) -> float:
    """Open device connections of *server*; -1 when its /metrics does not answer in time."""
    try:
        return server.metric("teltonika_connections_open")
    except OSError:
        return -1


def loadavg() -> str:
    with open("/proc/loadavg") as load:
        return " ".join(load.read().split()[:3])


def redispy_baseline(url: str, seconds: float) -> float:
    import random

    import redis

    from teltonika.codecs import load_codecs
    from teltonika.contract import TELEMETRY_STREAM, entry_fields
    from teltonika.simulate.track import Track
    from teltonika.wire import CODEC_8E

    track = Track(random.Random(1), CODEC_8E)
    entries = []
    for index in range(100):
        track.advance(1)
        flat = entry_fields("356307042440000", "8E", track.record(1_700_000_000_000 + index),
                            1, "bench")  # fmt: skip
        entries.append(dict(zip(flat[::2], flat[1::2], strict=True)))
    load_codecs()
    client = redis.Redis.from_url(url)
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        pipe = client.pipeline(transaction=False)
        for entry in entries:
            pipe.xadd(TELEMETRY_STREAM, entry)
        pipe.execute()
        count += len(entries)
    client.close()
    return count / (time.perf_counter() - start)


def throughput(opts: argparse.Namespace, workdir: Path) -> None:
    raise_nofile()
    bare = Process.bare(workdir, "ack")
    try:
        ceiling = simulate(
            bare.port, "--devices", str(opts.devices), "--records-per-frame",
            str(opts.records), "--interval", "0", "--duration", "10", "--keepalive", "0",
        )  # fmt: skip
    finally:
        bare.close()
    redis = Redis()
    try:
        baseline = redispy_baseline(redis.url, 5.0)
        redis.flush()
        server = Process.teltonika(workdir, "--redis", redis.url)
        try:
            sim = subprocess.Popen(
                [sys.executable, "-m", "teltonika", "simulate", "--port", str(server.port),
                 "--json", "--progress", "0", "--devices", str(opts.devices),
                 "--records-per-frame", str(opts.records), "--interval", "0",
                 "--duration", str(opts.seconds), "--connect-rate", "2000",
                 "--ack-timeout", "30", "--drain", "10"],
                stdout=subprocess.PIPE, env=checkout_env(), cwd=REPO,
            )  # fmt: skip
            time.sleep(opts.seconds * 0.25)
            pids = {"server": server.pid, "redis": redis.proc.pid, "simulator": sim.pid}
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            first = (time.perf_counter(), stream_length(redis))
            time.sleep(opts.seconds * 0.5)
            second = (time.perf_counter(), stream_length(redis))
            cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
            rss = rss_kib(server.pid)
            out, _ = sim.communicate(timeout=opts.seconds + 120)
            summary = json.loads(out)
        finally:
            server.close()
    finally:
        redis.close()
    steady = (second[1] - first[1]) / (second[0] - first[0])
    print(f"throughput: {opts.devices} devices, {opts.records} records/frame, closed loop, "
          f"{opts.seconds:.0f} s; steady state over the middle half")  # fmt: skip
    print(f"  baseline redis-py + hiredis, 100-XADD pipelines: {baseline:10,.0f} records/s")
    print(f"  teltonika server -> Redis stream (steady):       {steady:10,.0f} records/s  "
          f"= {steady / baseline:.0%} of baseline (target >= 50%)")  # fmt: skip
    print(f"  fleet ceiling (same fleet, bare decode+ACK server, no sink): "
          f"{ceiling['records_per_s']:10,.0f} records/s")  # fmt: skip
    print(f"  simulator saw: {summary['records_acked']:,} records ACKed, "
          f"{summary['frames_per_s']:,.0f} frames/s, ACK p50 {summary['ack_latency_ms_p50']} ms "
          f"p99 {summary['ack_latency_ms_p99']} ms; broken promises "
          f"{summary['broken_promises']}; server RSS {rss / KIB:.0f} MiB")  # fmt: skip
    window = second[0] - first[0]
    shares = ", ".join(f"{name} {used / window:.0%}" for name, used in cpu.items())
    print(
        f"  CPU use in the window (of one core): {shares} -- the simulator shares the "
        "2 cores with the server and Redis; the redis-py baseline ran alone"
    )


def stream_length(redis: Redis) -> int:
    out = subprocess.run(["redis-cli", "-p", str(redis.port), "XLEN", "telemetry:teltonika"],
                         capture_output=True, check=True)  # fmt: skip
    return int(out.stdout.strip() or 0)


def latency(opts: argparse.Namespace, workdir: Path) -> None:
    raise_nofile()
    devices = 200
    interval = devices / opts.rate
    fleet = ["--devices", str(devices), "--interval", f"{interval}", "--duration",
             str(opts.seconds), "--records-per-frame", str(opts.records), "--connect-rate",
             "1000", "--keepalive", "0"]  # fmt: skip
    bare = Process.bare(workdir, "ack")
    try:
        base = simulate(bare.port, *fleet)
    finally:
        bare.close()
    redis = Redis()
    try:
        server = Process.teltonika(workdir, "--redis", redis.url)
        try:
            ours = simulate(server.port, *fleet)
        finally:
            server.close()
    finally:
        redis.close()
    print(f"latency: {devices} devices x {1 / interval:.0f} frames/s = {opts.rate} frames/s "
          f"paced, {opts.records} records/frame, {opts.seconds:.0f} s")  # fmt: skip
    for label, result in (("bare Twisted decode+ACK", base), ("teltonika -> Redis", ours)):
        print(f"  {label:<24} {result['frames_per_s']:>7,.0f} frames/s  "
              f"ACK p50 {result['ack_latency_ms_p50']:6.2f} ms  "
              f"p99 {result['ack_latency_ms_p99']:6.2f} ms  "
              f"max {result['ack_latency_ms_max']:7.2f} ms  "
              f"broken {result['broken_promises']}")  # fmt: skip
    ratio = ours["ack_latency_ms_p99"] / max(base["ack_latency_ms_p99"], 1e-9)
    print(f"  p99 ratio teltonika / bare: {ratio:.1f}x (target: p99 under 10 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    cap = sub.add_parser("capacity")
    cap.add_argument(
        "--max-devices",
        type=int,
        default=0,
        help="largest step (default: the open-file limit minus 100)",
    )
    cap.add_argument("--per-process", type=int, default=5000)
    thr = sub.add_parser("throughput")
    thr.add_argument("--devices", type=int, default=200)
    thr.add_argument("--records", type=int, default=10)
    thr.add_argument("--seconds", type=float, default=30.0)
    lat = sub.add_parser("latency")
    lat.add_argument("--rate", type=int, default=2000)
    lat.add_argument("--records", type=int, default=1)
    lat.add_argument("--seconds", type=float, default=20.0)
    multi = sub.add_parser("scale")
    multi.add_argument("--devices", type=int, default=6000, help="idle devices in all")
    multi.add_argument("--processes", type=int, default=3, help="reuseport server processes")
    multi.add_argument(
        "--per-process", type=int, default=12_500, help="devices per simulator process"
    )
    multi.add_argument(
        "--seconds", type=float, default=300.0, help="bound on each ramp (simulators stop by then)"
    )
    mem = sub.add_parser("memory")
    mem.add_argument("--devices", type=int, default=2000)
    mem.add_argument("--interval", type=float, default=1.0)
    mem.add_argument("--seconds", type=float, default=60.0)
    every = sub.add_parser("all")
    every.add_argument("--max-devices", type=int, default=0)
    every.add_argument("--per-process", type=int, default=5000)
    opts = parser.parse_args()
    print(f"machine: {machine()}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        if opts.part in ("capacity", "all"):
            capacity(opts, workdir)
        if opts.part == "scale":
            scale(opts, workdir)
        if opts.part == "memory":
            stream_memory(opts, workdir)
        if opts.part in ("throughput", "all"):
            if opts.part == "all":
                opts.devices, opts.records, opts.seconds = 200, 10, 30.0
            throughput(opts, workdir)
        if opts.part in ("latency", "all"):
            if opts.part == "all":
                opts.rate, opts.records, opts.seconds = 2000, 1, 20.0
            latency(opts, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
