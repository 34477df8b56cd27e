"""Processor throughput: the telemetry stream drained into PostgreSQL, next to a baseline.

Usage::

    python benchmarks/processor.py                  # ~1-2 min: 100,000 entries
    python benchmarks/processor.py --entries 20000 --devices 500
    python benchmarks/processor.py --against main   # + the processor of another commit

What runs: a throwaway ``redis-server`` and a throwaway PostgreSQL cluster (tests/servers.py),
and the processor as a real ``twistd -n teltonika-processor`` subprocess (batch 500).

Entries are built by the ingestion server's own encoder (``teltonika.contract.entry_fields``)
from codec 8E records with realistic IO: 18 elements of widths 1/2/4/8, one u64 above 2**53
(a ``__bigint`` sentinel) and one NX value (a ``__buffer_b64`` sentinel).

Figures:

1. baseline: the same rows written by plain psycopg on one connection, COPY into a
   temporary table + ``INSERT ... ON CONFLICT DO NOTHING``, batches of 500, one
   transaction each; no Redis, no Python decoding (rows pre-built); run before and
   after figure 2, ratios use the mean;
2. processor: rows/s from "ready" to "every entry acknowledged", batch latency p50/p99
   (read -> XACK, from the processor's debug log), RSS after the drain; ratio to 1;
   with ``--against REF``, the processor of git commit REF (exported with ``git archive``)
   drains the same entries into its own fresh database, alternating with this checkout's
   (two runs each), and the ratio of the means is printed;
3. replay: a second consumer group re-reads every entry (all duplicates); ratio to 2;
4. state: a stream of ``--state-devices`` distinct devices with ``--state-size`` equal to
   it: RSS growth per device held, and the Python heap per DeviceSnapshot (tracemalloc).

Loopback only, 2 shared cores: compare the ratios printed in one run.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
import redis

from teltonika.contract import TELEMETRY_STREAM, entry_fields
from teltonika.processor.entries import fields_dict, parse_entry
from teltonika.processor.migrations import apply_migrations
from teltonika.processor.state import DeviceState
from teltonika.processor.writer import _COPY, _INSERT, _STAGING_DDL
from teltonika.wire.records import NX, AVLRecord
from tests.servers import PostgresServer, RedisServer, checkout_env, free_port

REPO = Path(__file__).resolve().parents[1]
BASE_MS = 1_700_000_000_000


def make_record(rng: random.Random, ts_ms: int) -> AVLRecord:
    io = (
        (239, 1, rng.randint(0, 1)),
        (240, 1, rng.randint(0, 1)),
        (21, 1, rng.randint(0, 5)),
        (200, 1, 0),
        (69, 1, 1),
        (1, 1, 0),
        (179, 1, 0),
        (181, 2, rng.randint(5, 30)),
        (182, 2, rng.randint(5, 30)),
        (66, 2, rng.randint(11000, 14500)),
        (24, 2, rng.randint(0, 130)),
        (67, 2, rng.randint(3500, 4200)),
        (68, 2, 0),
        (16, 4, rng.randint(0, 10**8)),
        (241, 4, 24602),
        (199, 4, rng.randint(0, 1000)),
        (78, 8, rng.randint(2**53 + 1, 2**64 - 1)),  # iButton id: a u64 above 2**53
        (385, NX, rng.randbytes(rng.randint(4, 24))),  # beacon data: NX bytes
    )
    return AVLRecord(
        timestamp_ms=ts_ms,
        priority=0,
        longitude=25.0 + rng.random(),
        latitude=54.0 + rng.random(),
        altitude=rng.randint(50, 300),
        angle=rng.randint(0, 359),
        satellites=rng.randint(4, 14),
        speed=rng.randint(0, 130),
        event_io_id=0,
        io=io,
    )


def build_entries(count: int, devices: int, seed: int = 8) -> list[list[bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        device = i % devices
        imei = f"35{device:013d}"
        ts = BASE_MS + (i // devices) * 1000
        out.append(entry_fields(imei, "8E", make_record(rng, ts), ts + 700, "bench"))
    return out


def fill(client: redis.Redis, entries: list[list[bytes]], stream: str = TELEMETRY_STREAM) -> None:
    pipe = client.pipeline(transaction=False)
    for n, flat in enumerate(entries, 1):
        pipe.xadd(stream, dict(zip(flat[::2], flat[1::2], strict=True)))
        if n % 2000 == 0:
            pipe.execute()
    pipe.execute()


def fresh_db(pg: PostgresServer, name: str) -> str:
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    return pg.dsn(name)


def baseline(dsn: str, entries: list[list[bytes]], batch: int = 500) -> tuple[float, list[float]]:
    """Plain psycopg: COPY + INSERT ON CONFLICT in batches; rows pre-built (not timed)."""
    rows = [
        parse_entry(str(i), fields_dict([v.decode() for v in flat])).copy_row()
        for i, flat in enumerate(entries)
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_migrations(conn)
        conn.execute(_STAGING_DDL)
        latencies = []
        started = time.perf_counter()
        with conn.cursor() as cur:
            for i in range(0, len(rows), batch):
                t = time.perf_counter()
                with conn.transaction():
                    with cur.copy(_COPY) as copy:
                        for row in rows[i : i + batch]:
                            copy.write_row(row)
                    cur.execute(_INSERT)
                latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        (stored,) = conn.execute("select count(*) from positions").fetchone() or (0,)
    assert stored == len({(r[0], r[1], r[-1]) for r in rows}), stored
    return len(rows) / elapsed, latencies


class Processor:
    """``twistd -n teltonika-processor`` as a child process (of this checkout, or of the
    tree at *root*)."""

    def __init__(
        self, redis_url: str, dsn: str, group: str, *extra: str, root: Path | None = None
    ) -> None:
        self.metrics_port = free_port()
        self.log = Path(tempfile.mkdtemp(prefix="bench-processor-")) / "processor.log"
        args = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--logfile={self.log}",
            "teltonika-processor",
            "--redis",
            redis_url,
            "--group",
            group,
            "--consumer",
            "bench",
            "--metrics",
            f"tcp:{self.metrics_port}:interface=127.0.0.1",
            "--batch-size",
            "500",
            *extra,
        ]
        env = checkout_env(TELTONIKA_POSTGRES_DSN=dsn)
        if root is not None:  # that tree's code and plugins first on the path
            env["PYTHONPATH"] = os.pathsep.join([str(root), env["PYTHONPATH"]])
        self.process = subprocess.Popen(args, cwd=root or REPO, env=env)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1):
                return True
        except OSError:
            return False

    def rss_kb(self) -> tuple[int, int]:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        return rss, hwm

    def latencies(self) -> list[float]:
        text = self.log.read_text()
        return [float(x) for x in re.findall(r"Batch written: .* in ([0-9.]+)s", text)]

    def db_latencies(self) -> list[float]:
        text = self.log.read_text()
        return [float(x) for x in re.findall(r"Batch written: .*\(database ([0-9.]+)s\)", text)]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def drain(client: redis.Redis, processor: Processor, group: str, total: int) -> float:
    """Seconds from the processor being ready to every entry acknowledged by *group*."""
    deadline = time.monotonic() + 120
    while not processor.ready():
        if processor.process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"processor did not start; see {processor.log}")
        time.sleep(0.01)
    started = time.perf_counter()
    while True:
        info = next((g for g in client.xinfo_groups(TELEMETRY_STREAM) if g["name"] == group), None)
        if info and info["pending"] == 0 and info.get("entries-read") == total:
            return time.perf_counter() - started
        if time.monotonic() > deadline + 600:
            raise SystemExit(f"not drained; see {processor.log}")
        time.sleep(0.02)


def export(ref: str) -> Path:
    """The tree of git commit *ref* of this repository, in a temporary directory."""
    root = Path(tempfile.mkdtemp(prefix="bench-processor-ref-"))
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def drain_rate(
    client: redis.Redis, pg: PostgresServer, name: str, total: int, root: Path | None = None
) -> tuple[float, float]:
    """rows/s of one processor (this checkout, or the tree at *root*) draining the whole
    stream as a new group into a fresh database, and its batches' database part p50 (s)."""
    dsn = fresh_db(pg, f"bench_{name}")
    processor = Processor(client_url(client), dsn, name, root=root)
    try:
        seconds = drain(client, processor, name, total)
        db_p50 = pct(processor.db_latencies(), 0.5)
    finally:
        processor.stop()
    with psycopg.connect(dsn) as conn:
        (stored,) = conn.execute("select count(*) from positions").fetchone() or (0,)
    assert stored == total, stored
    return total / seconds, db_p50


def client_url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def snapshot_bytes(devices: int) -> float:
    """Python heap per device held in DeviceState (tracemalloc): everything the state keeps
    alive once the batches that filled it are gone (snapshot, strings, LRU entry)."""
    entries = build_entries(devices, devices, seed=3)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state = DeviceState(devices)
    for i, flat in enumerate(entries):
        state.apply(parse_entry(str(i), fields_dict([v.decode() for v in flat])))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(state) == devices
    return (after - before) / devices


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=1_000)
    parser.add_argument("--state-devices", type=int, default=100_000)
    parser.add_argument(
        "--against",
        metavar="REF",
        help="also run the processor of git commit REF on the same entries, alternating",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of each processor with --against"
    )
    args = parser.parse_args()
    against = export(args.against) if args.against else None

    redis_server = RedisServer().start()
    pg = PostgresServer().start()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        print(f"building {args.entries:,} entries ({args.devices:,} devices, 18 IO incl. u64 + NX)")
        entries = build_entries(args.entries, args.devices)
        size = sum(len(v) for e in entries for v in e) / len(entries)
        print(f"  mean entry payload {size:.0f} bytes")

        base_rate, base_lat = baseline(fresh_db(pg, "bench_baseline"), entries)
        print(
            f"1. baseline psycopg COPY+INSERT ON CONFLICT, batch 500: {base_rate:,.0f} rows/s, "
            f"batch p50 {pct(base_lat, 0.5) * 1000:.1f} ms p99 {pct(base_lat, 0.99) * 1000:.1f} ms"
        )

        fill(client, entries)
        dsn = fresh_db(pg, "bench_processor")
        processor = Processor(redis_server.url, dsn, "processor")
        try:
            seconds = drain(client, processor, "processor", args.entries)
            rss, hwm = processor.rss_kb()
            lat = processor.latencies()
            db_lat = processor.db_latencies()
        finally:
            processor.stop()
        with psycopg.connect(dsn) as conn:
            (stored,) = conn.execute("select count(*) from positions").fetchone() or (0,)
        assert stored == args.entries, stored
        rate = args.entries / seconds
        # the baseline again, right after: the machine's load drifts (2 shared cores), so
        # the ratio uses the mean of the runs before and after
        again, _ = baseline(fresh_db(pg, "bench_baseline2"), entries)
        base_rate = (base_rate + again) / 2
        print(f"   baseline again: {again:,.0f} rows/s; mean {base_rate:,.0f} rows/s")
        print(
            f"2. processor end to end: {rate:,.0f} rows/s ({seconds:.1f} s), "
            f"batch p50 {pct(lat, 0.5) * 1000:.1f} ms p99 {pct(lat, 0.99) * 1000:.1f} ms, "
            f"(database part p50 {pct(db_lat, 0.5) * 1000:.1f} ms), "
            f"RSS {rss / 1024:.0f} MiB (peak {hwm / 1024:.0f} MiB); "
            f"{rate / base_rate:.0%} of the mean baseline"
        )

        if against is not None:
            ours = [(rate, pct(db_lat, 0.5))]
            theirs = []
            for run in range(args.rounds):
                theirs.append(drain_rate(client, pg, f"ref{run}", args.entries, root=against))
                if run < args.rounds - 1:
                    ours.append(drain_rate(client, pg, f"ours{run}", args.entries))
            mine = sum(r for r, _ in ours) / len(ours)
            ref = sum(r for r, _ in theirs) / len(theirs)

            def runs(results: list[tuple[float, float]]) -> str:
                return ", ".join(f"{r:,.0f} ({db * 1000:.1f} ms)" for r, db in results)

            print(
                f"2b. rows/s (database part p50 per batch) of {args.against}: {runs(theirs)}; "
                f"this checkout: {runs(ours)} (alternated); means {ref:,.0f} vs {mine:,.0f}: "
                f"this checkout at {mine / ref:.0%} of {args.against}"
            )

        processor = Processor(redis_server.url, dsn, "replay")
        try:
            replay_seconds = drain(client, processor, "replay", args.entries)
        finally:
            processor.stop()
        replay_rate = args.entries / replay_seconds
        print(
            f"3. replay, all duplicates: {replay_rate:,.0f} rows/s; "
            f"{replay_rate / rate:.0%} of run 2"
        )

        n = args.state_devices
        client.delete(TELEMETRY_STREAM)
        fill(client, build_entries(n, n, seed=5))
        processor = Processor(
            redis_server.url, fresh_db(pg, "bench_state"), "processor", "--state-size", str(n)
        )
        try:
            drain(client, processor, "processor", n)
            rss_state, _ = processor.rss_kb()
        finally:
            processor.stop()
        per_device_rss = (rss_state - rss) * 1024 / max(1, n - args.devices)
        print(
            f"4. state: {n:,} devices held (--state-size {n}): RSS {rss_state / 1024:.0f} MiB, "
            f"about {per_device_rss:,.0f} bytes/device over run 2; "
            f"Python heap {snapshot_bytes(min(n, 20_000)):,.0f} bytes per device held"
        )
    finally:
        client.close()
        redis_server.cleanup()
        pg.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
