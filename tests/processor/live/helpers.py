"""Helpers for the live broadcast tests: a real ``twistd teltonika-processor --live``
child process on its own Redis and PostgreSQL database (``Env``, ``LiveProcessor``), a
WebSocket client (autobahn, in the test reactor) and the waits the tests share; the
fixtures are in conftest.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import redis
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater

from teltonika.contract import TELEMETRY_STREAM
from tests.processor.helpers import eventually
from tests.processor.live.feeder import entry, imei, now_ms
from tests.servers import REPO, RedisServer, checkout_env, free_port, wait_for_port

SUBPROTOCOL = "teltonika-live.v1"
__all__ = ["entry", "eventually", "imei", "now_ms"]


class LiveProcessor:
    """One ``twistd teltonika-processor --live`` child process."""

    def __init__(self, tmp: Path, name: str, redis_url: str, dsn: str, *extra: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.log = tmp / f"{name}.log"
        command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--logfile={self.log}",
            "teltonika-processor",
            "--redis",
            redis_url,
            "--postgres",
            dsn,
            "--metrics",
            f"tcp:{self.metrics_port}:interface=127.0.0.1",
            "--consumer",
            name,
            "--block-ms",
            "100",
            "--live",
            f"tcp:{self.port}:interface=127.0.0.1:backlog=1024",
            *extra,
        ]
        self.process = subprocess.Popen(command, cwd=REPO, env=checkout_env())
        try:
            wait_for_port(self.port, timeout=30)
        except TimeoutError:
            self.stop()
            raise AssertionError(self.log.read_text()[-3000:]) from None

    def metric(self, name: str, **labels: str) -> float:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        wanted = name + (
            "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
        )
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class Client(WebSocketClientProtocol):
    """Collects every message; ``closed`` fires with (code, reason)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.received: list[dict[str, Any]] = []
        self.closed: Deferred[tuple[int | None, str]] = Deferred()
        self.opened: Deferred[None] = Deferred()
        self.protocol_in_use: str | None = None

    def onConnect(self, response: Any) -> None:
        self.protocol_in_use = response.protocol

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload)
        self.received.append(message)
        self.messages.put(message)

    def onClose(self, wasClean: bool, code: int | None, reason: str) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def send(self, message: dict[str, Any] | bytes, binary: bool = False) -> None:
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.sendMessage(payload, isBinary=binary)

    async def next(self, kind: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The next message (of type *kind*, skipping ticks and others when given)."""
        while True:
            d = self.messages.get()
            d.addTimeout(timeout, reactor)
            message = await d
            if kind is None or message["type"] == kind:
                return message

    async def wait_closed(self, timeout: float = 15.0) -> tuple[int | None, str]:
        d: Deferred[tuple[int | None, str]] = Deferred()

        def relay(result: tuple[int | None, str]) -> tuple[int | None, str]:
            d.callback(result)
            return result

        self.closed.addCallback(relay)  # closed never fails
        d.addTimeout(timeout, reactor)
        return await d


async def connect(
    port: int,
    *,
    origin: str | None = None,
    protocols: list[str] | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/live/v1/ws",
) -> Client:
    """Open a WebSocket to the live endpoint and wait for the handshake."""
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}{path}",
        origin=origin,
        protocols=[SUBPROTOCOL] if protocols is None else protocols,
        headers=headers or {},
    )
    factory.protocol = Client
    factory.setProtocolOptions(openHandshakeTimeout=15, autoPingInterval=None)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    client = await endpoint.connect(factory)
    assert isinstance(client, Client)
    await client.opened
    return client


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class Env:
    """Redis, a database and helpers shared by the processes of one test module."""

    def __init__(self, redis_server: RedisServer, dsn: str, tmp: Path) -> None:
        self.redis_server = redis_server
        self.redis_url = redis_server.url
        self.dsn = dsn
        self.tmp = tmp
        self.rds = redis.Redis.from_url(self.redis_url, decode_responses=True)
        self.processes: list[LiveProcessor] = []

    def processor(self, name: str, *extra: str) -> LiveProcessor:
        process = LiveProcessor(self.tmp, name, self.redis_url, self.dsn, *extra)
        self.processes.append(process)
        return process

    def xadd(self, *entries: dict[str, str]) -> list[str]:
        pipe = self.rds.pipeline(transaction=False)
        for fields in entries:
            pipe.xadd(TELEMETRY_STREAM, fields)  # type: ignore[arg-type]
        return pipe.execute()

    def insert_row(
        self, device: str, ts: int, lat: float, lon: float, event_io_id: int = 0
    ) -> None:
        """A stored row (what an earlier run of the writer left in positions)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO positions (device_id, ts, received_at, latitude, longitude, "
                "altitude, angle, speed, satellites, priority, event_io_id, codec, "
                "instance_id, io, record_hash) SELECT *, teltonika_record_hash(ts, latitude,"
                " longitude, altitude, angle, speed, satellites, priority, event_io_id, NULL,"
                " io) FROM (VALUES (%s, to_timestamp(%s / 1000.0), to_timestamp(%s / 1000.0),"
                " %s::numeric, %s::numeric, 10, 45, 30, 7, 0::smallint, %s, '8', 'old',"
                " '{}'::jsonb)) AS row (device_id, ts, received_at, latitude, longitude,"
                " altitude, angle, speed, satellites, priority, event_io_id, codec,"
                " instance_id, io)",
                (device, ts, ts + 1000, lat, lon, event_io_id),
            )

    def close(self) -> None:
        for process in self.processes:
            process.stop()
        self.rds.close()


def wait_table(dsn: str, timeout: float = 30.0) -> None:
    """Block until the processor's migrations brought positions to the current schema
    (each migration commits on its own: the table exists before 003 adds its last
    column, so waiting for the table alone races the migration on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(dsn, autocommit=True) as conn:
            if conn.execute(
                "select 1 from information_schema.columns"
                " where table_name = 'positions' and column_name = 'record_hash'"
            ).fetchone():
                return
        if time.monotonic() > deadline:
            raise TimeoutError("positions was not brought to the current schema")
        time.sleep(0.05)
