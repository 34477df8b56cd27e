"""A cheap WebSocket client harness: many subscribers per process on raw sockets.

``benchmarks/live.py`` measures a server that sends 1,000 clients every position of an
event (2,000 positions/s in is 140 MiB/s of JSON out). With 1,000 autobahn clients in four
Python processes the clients were the bottleneck: autobahn parses every frame in Python,
validates its UTF-8, calls back per message and the client decoded JSON, so the latency
measured was the clients' own queue, for our server and the bare baseline alike. These
clients do the least a subscriber can do:

* one HTTP upgrade (subprotocol ``teltonika-live.v1``, the accept key checked) and one
  masked ``subscribe`` frame;
* then ``recv`` of up to 1 MiB at a time and a walk over the unmasked server frames'
  headers (:class:`FrameReader`): the payload is never decoded or validated, and only
  copied when it is looked at;
* a sampled connection (every ``parse_every``-th) takes the ``ts`` of every position with
  one regular expression over the payload (C speed) and compares it with the time the
  bytes were received, into a 1 ms histogram (no list of millions of values);
* pings are answered (the processor pings every 25 s), a close is counted.

One process runs :func:`run` with one ``selectors`` loop over its connections. It prints
``{"ready": N, ...}`` once every connection is subscribed (or failed), waits for the start
time on stdin (so the caller measures idle memory and starts the feeder first), counts
what arrives between that time and *seconds* later, and prints its figures as JSON (with
the CPU seconds it used meanwhile, to show whether the clients kept up).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import select
import selectors
import socket
import sys
import time
from typing import Any, Final

SUBPROTOCOL: Final = "teltonika-live.v1"
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TS: Final = re.compile(rb'"ts":(\d+)')
_POSITIONS: Final = b'{"type":"positions"'
_SNAPSHOT: Final = b'{"type":"snapshot"'
HISTOGRAM_MS: Final = 120_000
"""Latencies are counted per millisecond up to two minutes (longer ones in the last)."""
RECV_BYTES: Final = 1 << 20
HANDSHAKES_IN_FLIGHT: Final = 50

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class FrameError(ValueError):
    """The server sent something that is not an unmasked RFC 6455 frame."""


class FrameReader:
    """Splits a server's byte stream into frames (RFC 6455, section 5.2).

    :meth:`feed` returns ``(fin, opcode, length, payload)`` per complete frame, where
    *payload* is the frame's bytes only for control frames or when *keep* says so (None
    otherwise: the caller counts it without a copy).
    """

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes, keep: bool) -> list[tuple[bool, int, int, bytes | None]]:
        buffer = self.buffer
        buffer += data
        out: list[tuple[bool, int, int, bytes | None]] = []
        pos = 0
        end = len(buffer)
        while end - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            if second & 0x80:
                raise FrameError("a server frame is masked")
            if first & 0x70:
                raise FrameError("reserved bits set (no extension was negotiated)")
            length = second & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                header = 10
            if end - pos < header + length:
                break
            opcode = first & 0x0F
            start = pos + header
            payload = bytes(buffer[start : start + length]) if keep or opcode >= 8 else None
            out.append((bool(first & 0x80), opcode, length, payload))
            pos = start + length
        if pos:
            del buffer[:pos]
        return out


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (payloads under 64 KiB)."""
    mask = os.urandom(4)
    length = len(payload)
    header = (
        bytes((0x80 | opcode, 0x80 | length))
        if length < 126
        else (bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big"))
    )
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return header + mask + masked


def upgrade_request(port: int, path: str) -> tuple[bytes, bytes]:
    """The HTTP upgrade request and the ``Sec-WebSocket-Accept`` it must be answered with."""
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
    ).encode()
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return request, accept


class Connection:
    """One subscriber: handshake, subscribe, then count (and, if sampled, time) frames."""

    def __init__(self, index: int, sampled: bool) -> None:
        self.index = index
        self.sampled = sampled
        self.sock: socket.socket | None = None
        self.open = False
        self.subscribed = False
        self.failed: str | None = None
        self.head = b""
        self.accept = b""
        self.frames = FrameReader()
        self.pending = b""  # what is left to write


class Harness:
    """The connections of one process and their figures (see the module docstring)."""

    def __init__(
        self, port: int, path: str, subscribe: bytes, count: int, parse_every: int
    ) -> None:
        self.port = port
        self.path = path
        self.subscribe = subscribe
        self.selector = selectors.DefaultSelector()
        self.connections = [Connection(i, i % parse_every == 0) for i in range(count)]
        self.next_to_open = 0
        self.handshaking = 0
        self.window: tuple[float, float] | None = None
        self.messages = 0
        self.bytes = 0
        self.closed = 0
        self.histogram = [0] * (HISTOGRAM_MS + 1)

    # -- connecting ------------------------------------------------------------------------
    def open_more(self) -> None:
        while self.handshaking < HANDSHAKES_IN_FLIGHT and self.next_to_open < len(self.connections):
            connection = self.connections[self.next_to_open]
            self.next_to_open += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect_ex(("127.0.0.1", self.port))
            request, connection.accept = upgrade_request(self.port, self.path)
            connection.sock = sock
            connection.pending = request
            self.handshaking += 1
            self.selector.register(sock, selectors.EVENT_WRITE, connection)

    def fail(self, connection: Connection, why: str) -> None:
        if connection.failed is None and not connection.subscribed:
            connection.failed = why
            self.handshaking -= 1
        self.drop(connection)

    def drop(self, connection: Connection) -> None:
        if connection.sock is not None:
            self.selector.unregister(connection.sock)
            connection.sock.close()
            connection.sock = None
        connection.open = False

    # -- I/O -------------------------------------------------------------------------------
    def writable(self, connection: Connection) -> None:
        sock = connection.sock
        assert sock is not None
        try:
            sent = sock.send(connection.pending)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(connection, f"send: {e}")
            return
        connection.pending = connection.pending[sent:]
        if not connection.pending:
            self.selector.modify(sock, selectors.EVENT_READ, connection)

    def write(self, connection: Connection, data: bytes) -> None:
        sock = connection.sock
        if sock is None:
            return
        if connection.pending:
            connection.pending += data
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self.fail(connection, f"send: {e}")
            return
        if sent < len(data):
            connection.pending = data[sent:]
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, connection)

    def readable(self, connection: Connection) -> None:
        sock = connection.sock
        assert sock is not None
        try:
            data = sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(connection, f"recv: {e}")
            return
        received = time.time()
        if not data:
            if connection.subscribed:
                self.closed += 1
            self.fail(connection, "connection closed")
            return
        if not connection.open:
            connection.head += data
            head, sep, rest = connection.head.partition(b"\r\n\r\n")
            if not sep:
                if len(connection.head) > 16384:
                    self.fail(connection, "no end of the HTTP response")
                return
            lines = head.split(b"\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(b":") for line in lines[1:])
            }
            if (
                not lines[0].startswith(b"HTTP/1.1 101")
                or headers.get(b"sec-websocket-accept") != connection.accept
            ):
                self.fail(connection, f"handshake refused: {lines[0][:60]!r}")
                return
            connection.open = True
            connection.head = b""
            self.write(connection, client_frame(OP_TEXT, self.subscribe))
            data = rest
        self.frames_in(connection, data, received)

    def frames_in(self, connection: Connection, data: bytes, received: float) -> None:
        keep = connection.sampled or not connection.subscribed
        try:
            frames = connection.frames.feed(data, keep)
        except FrameError as e:
            self.fail(connection, str(e))
            return
        window = self.window
        counting = window is not None and window[0] <= received < window[1]
        for fin, opcode, length, payload in frames:
            if opcode >= OP_CLOSE:
                if opcode == OP_PING:
                    self.write(connection, client_frame(OP_PONG, payload or b""))
                elif opcode == OP_CLOSE:
                    self.write(connection, client_frame(OP_CLOSE, (payload or b"")[:2]))
                    self.closed += 1
                    self.drop(connection)
                    return
                continue
            if not connection.subscribed:
                if payload is not None and payload.startswith(_SNAPSHOT):
                    connection.subscribed = True
                    self.handshaking -= 1
                continue
            if not counting:
                continue
            self.bytes += length
            if fin:
                self.messages += 1
            if connection.sampled and payload is not None and payload.startswith(_POSITIONS):
                ms = int(received * 1000)
                histogram = self.histogram
                for ts in _TS.findall(payload):
                    delay = ms - int(ts)
                    histogram[0 if delay < 0 else min(delay, HISTOGRAM_MS)] += 1

    # -- the loop --------------------------------------------------------------------------
    def poll(self, timeout: float) -> None:
        for key, events in self.selector.select(timeout):
            connection = key.data
            if events & selectors.EVENT_WRITE and connection.sock is not None:
                self.writable(connection)
            if events & selectors.EVENT_READ and connection.sock is not None:
                self.readable(connection)

    def settled(self) -> bool:
        return self.next_to_open == len(self.connections) and all(
            c.subscribed or c.failed is not None for c in self.connections
        )

    def summary(self) -> dict[str, Any]:
        return {
            "subscribed": sum(c.subscribed for c in self.connections),
            "failed": sum(c.failed is not None for c in self.connections),
            "first_failure": next((c.failed for c in self.connections if c.failed), None),
        }


def run(
    port: int, count: int, parse_every: int, seconds: float, connect_timeout: float = 120.0
) -> None:
    """The client process: see the module docstring (start time read from stdin)."""
    harness = Harness(
        port, "/live/v1/ws", b'{"type":"subscribe","id":"b","event":"bench"}', count, parse_every
    )
    deadline = time.monotonic() + connect_timeout
    while not harness.settled() and time.monotonic() < deadline:
        harness.open_more()
        harness.poll(0.05)
    print(json.dumps({"ready": True, **harness.summary()}), flush=True)
    stdin = sys.stdin.fileno()
    line = b""
    while not line.endswith(b"\n"):
        harness.poll(0.05)  # keep reading (pings, stray messages) while waiting
        if select.select([stdin], [], [], 0)[0]:
            chunk = os.read(stdin, 64)
            if not chunk:
                return
            line += chunk
    start = float(line)
    harness.window = (start, start + seconds)
    while time.time() < start:
        harness.poll(0.05)
    cpu = time.process_time()
    while time.time() < start + seconds:
        harness.poll(0.05)
    result = {
        "cpu": time.process_time() - cpu,
        **harness.summary(),
        "messages": harness.messages,
        "bytes": harness.bytes,
        "closed": harness.closed,
        "histogram": {str(k): v for k, v in enumerate(harness.histogram) if v},
    }
    print(json.dumps(result), flush=True)
    for connection in harness.connections:
        harness.drop(connection)


def histogram_percentile(histogram: dict[int, int], p: float) -> float:
    """Nearest-rank percentile *p* (0-100) of a ``{milliseconds: count}`` histogram."""
    total = sum(histogram.values())
    if not total:
        return float("nan")
    rank = min(total - 1, int(p / 100 * total))
    seen = 0
    for ms in sorted(histogram):
        seen += histogram[ms]
        if seen > rank:
            return float(ms)
    return float(max(histogram))
