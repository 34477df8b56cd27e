"""End to end: a scripted fleet -> ``twistd teltonika`` (Redis sink) -> ``twistd
teltonika-processor`` -> PostgreSQL. Every record a device saw ACKed is exactly one row."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from teltonika.wire import ACCEPT, CODEC_8, CODEC_8E, encode_avl_frame, encode_login
from teltonika.wire.records import NX
from tests.processor.helpers import BASE_MS, query, record
from tests.servers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def start(
    tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{name}.log"
    command = [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        f"--logfile={log}",
        *args,
    ]
    environment = dict(os.environ, **(env or {}))
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen(command, cwd=ROOT, env=environment), log


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def run_device(port: int, imei: str, frames: int, offset: int) -> set[tuple[str, int, int]]:
    """Log in, send *frames* AVL frames of 3 records (one frame twice, as a device does
    after a lost ACK; every other frame with an ignition event stamped in the same
    millisecond as its first, periodic, record) and return the (imei, ts, event IO id) of
    every record the server ACKed."""
    acked: set[tuple[str, int, int]] = set()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(encode_login(imei))
        assert recv_exactly(sock, 1) == ACCEPT
        for n in range(frames):
            codec = CODEC_8E if n % 2 else CODEC_8
            io: tuple[tuple[int, int, int | bytes], ...] = (
                (1, 1, n % 2),
                (66, 2, 12000 + n),
                (78, 8, 2**63 + n),
            )
            if codec == CODEC_8E:
                io += ((385, NX, bytes([n, offset, 255])),)
            records = [record(offset + n * 10_000 + k * 1000, io=io) for k in range(3)]
            if n % 2 == 0:  # ignition off in the same millisecond as the periodic record
                event_io = ((239, 1, 0), *io[1:])
                event = record(offset + n * 10_000, io=event_io, speed=0)
                records.insert(1, event._replace(priority=1, event_io_id=239))
            frame = encode_avl_frame(codec, records)
            for _ in range(2 if n in (1, 2) else 1):  # frames 1 and 2 retransmitted
                sock.sendall(frame)
                assert int.from_bytes(recv_exactly(sock, 4), "big") == len(records)
                acked.update((imei, r.timestamp_ms, r.event_io_id) for r in records)
    return acked


def wait_ready(port: int, timeout: float = 30.0) -> None:
    """Wait for the server's /readyz (its Redis sink is up) before devices connect."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_fleet_to_postgres_exactly_once(redis_url: str, pg_dsn: str, tmp_path: Path) -> None:
    """Six devices, codec 8 and 8E frames with a u64 and NX IO value, event records that
    share their millisecond with a periodic record, two frames sent twice: the rows are
    exactly the records the devices saw ACKed, each once."""
    port, ops = free_port(), free_port()
    server, server_log = start(
        tmp_path,
        "server",
        "teltonika",
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--redis",
        redis_url,
        "--metrics",
        f"tcp:{ops}:interface=127.0.0.1",
        "--instance-id",
        "e2e",
    )
    processor, processor_log = start(
        tmp_path,
        "processor",
        "teltonika-processor",
        "--redis",
        redis_url,
        "--metrics",
        "off",
        "--block-ms",
        "100",
        "--consumer",
        "e2e",
        env={"TELTONIKA_POSTGRES_DSN": pg_dsn},
    )
    try:
        wait_for_port(port, timeout=30)
        wait_ready(ops)
        acked: set[tuple[str, int, int]] = set()
        for d in range(6):
            acked |= run_device(port, f"35730400000{d:04d}", frames=8, offset=d * 7)
        assert len(acked) == 6 * (8 * 3 + 4)

        def rows() -> set[tuple[str, int, int]]:
            try:
                found = query(
                    pg_dsn,
                    "select device_id, (extract(epoch from ts) * 1000)::bigint, event_io_id"
                    " from positions",
                )
            except Exception:
                return set()
            return {(device, int(ts), event) for device, ts, event in found}

        deadline = time.monotonic() + 60
        while rows() != acked and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rows() == acked, (server_log.read_text()[-2000:], processor_log.read_text()[-2000:])
        assert query(pg_dsn, "select count(*) from positions")[0][0] == len(acked)
        ((u64, nx, instance),) = query(
            pg_dsn,
            "select io->>'78', io->>'385', instance_id from positions"
            " where device_id = '357304000000001' and ts = to_timestamp(%s / 1000.0)"
            " and event_io_id = 0",
            BASE_MS + 7 + 10_000,
        )
        assert u64 == str(2**63 + 1) and nx == bytes([1, 7, 255]).hex() and instance == "e2e"
    finally:
        stop(processor)
        stop(server)
