"""The real twistd plugin in a subprocess, real TCP/UDP clients, real Redis and files."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis as redis_py

from teltonika.contract import FIELDS, TELEMETRY_STREAM
from teltonika.wire import (
    CODEC_8,
    CODEC_8E,
    AVLPacket,
    encode_avl_frame,
    encode_login,
    encode_udp,
    tcp_ack,
    udp_ack,
    wrap,
    wrap_udp,
)
from tests import dropin
from tests.end_to_end.process import Device, ServerProcess
from tests.helpers import IMEI, record
from tests.servers import free_port, wait_for_port

pytestmark = pytest.mark.slow


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.close()


def start(servers: list[ServerProcess], cwd: Path, *args: str, **kwargs: Any) -> ServerProcess:
    server = ServerProcess(cwd, *args, **kwargs)
    servers.append(server)
    server.wait_listening()
    return server


def frames(count: int, records: int = 2, codec: int = CODEC_8E) -> list[bytes]:
    return [
        encode_avl_frame(codec, [record(i * records + j) for j in range(records)])
        for i in range(count)
    ]


def test_jsonl_server_end_to_end(servers: list[ServerProcess], tmp_path: Path) -> None:
    """The default sink: login, frames ACKed in order, a UDP datagram ACKed, /metrics and
    /readyz served, SIGTERM exits 0, every record is in the JSON-lines file."""
    metrics_port, udp_port = free_port(), free_port()
    server = start(
        servers,
        tmp_path,
        "--metrics",
        str(metrics_port),
        "--udp-port",
        f"127.0.0.1:{udp_port}",
        "--instance-id",
        "e2e",
    )
    server.wait_for_log("File sink ready")
    device = Device(server.port)
    device.send(b"\xff" + encode_login(IMEI))
    assert device.recv_exactly(1) == b"\x01"
    batch = frames(5)
    device.send(b"".join(batch[:3]))  # several frames in one write
    assert device.recv_exactly(12) == tcp_ack(2) * 3
    for frame in batch[3:]:
        device.send(frame)
        assert device.recv_exactly(4) == tcp_ack(2)

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(10)
    udp.sendto(
        encode_udp(IMEI, CODEC_8, [record(100)], packet_id=1, avl_packet_id=9),
        ("127.0.0.1", udp_port),
    )
    assert udp.recv(64) == bytes.fromhex("0005000101" + "0901")
    udp.close()

    base = f"http://127.0.0.1:{metrics_port}"
    with urllib.request.urlopen(base + "/readyz", timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'teltonika_records_total{codec="8E"} 10.0' in text
    assert IMEI not in text and "imei=" not in text  # no per-device labels

    device.close()
    # twistd re-raises the signal it stopped on, so a clean SIGTERM exit reads as -15
    assert server.terminate() == -signal.SIGTERM
    assert "Shutdown complete" in server.output()
    raw = (tmp_path / "teltonika-records.jsonl").read_bytes()
    lines = [orjson.loads(line) for line in raw.splitlines()]
    assert len(lines) == 11
    assert all(list(line) == list(FIELDS) for line in lines)
    assert {line["imei"] for line in lines} == {IMEI}
    assert {line["instance_id"] for line in lines} == {"e2e"}
    assert sorted(int(line["timestamp_ms"]) for line in lines) == sorted(
        record(i).timestamp_ms for i in [*range(10), 100]
    )


def test_codec_plugin_works_over_tcp_and_udp(
    servers: list[ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third-party codec (0x7A) dropped into a ``twisted/plugins`` directory on the
    server's PYTHONPATH is decoded, stored and ACKed over TCP and over UDP alike."""
    plugins = tmp_path / "path" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    shutil.copy(dropin.__file__, plugins / "teltonika_test_dropin_7a.py")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "path"))
    workdir = tmp_path / "server"
    workdir.mkdir()
    udp_port = free_port()
    server = start(servers, workdir, "--metrics", "off", "--udp-port", f"127.0.0.1:{udp_port}")
    server.wait_for_log("File sink ready")
    codec = dropin.codec7a
    over_tcp = AVLPacket(dropin.CODEC_7A, (record(1), record(2)))
    over_udp = AVLPacket(dropin.CODEC_7A, (record(3), record(4), record(5)))

    device = Device(server.port)
    device.send(encode_login(IMEI))
    assert device.recv_exactly(1) == b"\x01"
    device.send(wrap(codec.encode(over_tcp)))
    assert device.recv_exactly(4) == tcp_ack(2)
    device.close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(10)
    udp.sendto(wrap_udp(IMEI, codec.encode(over_udp), 1, 2), ("127.0.0.1", udp_port))
    assert udp.recv(64) == udp_ack(1, 2, 3)
    udp.close()

    assert server.terminate() == -signal.SIGTERM
    raw = (workdir / "teltonika-records.jsonl").read_bytes()
    lines = [orjson.loads(line) for line in raw.splitlines()]
    assert {line["codec"] for line in lines} == {"7A"}
    assert sorted(int(line["timestamp_ms"]) for line in lines) == [
        record(i).timestamp_ms for i in range(1, 6)
    ]


def test_redis_server_end_to_end(
    servers: list[ServerProcess], tmp_path: Path, redis_url: str, redis_server: Any
) -> None:
    """--redis: entries in telemetry:teltonika; --devices redis:KEY admits set members only;
    a corrupt frame is not ACKed and closes the connection."""
    redis_server.cli("SADD", "fleet", IMEI)
    server = start(
        servers, tmp_path, "--redis", redis_url, "--metrics", "off", "--devices", "redis:fleet"
    )
    server.wait_for_log("Redis sink ready")
    stranger = Device(server.port)
    stranger.send(encode_login("490154203237518"))
    assert stranger.recv_exactly(1) == b"\x00"
    assert stranger.closed_by_peer()

    device = Device(server.port)
    device.send(encode_login(IMEI))
    assert device.recv_exactly(1) == b"\x01"
    for frame in frames(4, records=3):
        device.send(frame)
        assert device.recv_exactly(4) == tcp_ack(3)
    corrupt = bytearray(frames(1)[0])
    corrupt[-1] ^= 0x55
    device.send(bytes(corrupt))
    assert device.closed_by_peer()
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    # redis-py types XRANGE for any client (None, bytes or str); decode_responses: str
    entries = cast("list[tuple[str, dict[str, str]]]", client.xrange(TELEMETRY_STREAM))
    client.close()
    assert len(entries) == 12
    assert all(list(fields) == list(FIELDS) for _, fields in entries)
    assert "reason crc" in server.output()
    assert server.terminate() == -signal.SIGTERM
    assert "Shutdown complete" in server.output()


def test_fsync_durability_refused(
    servers: list[ServerProcess], tmp_path: Path, redis_url: str
) -> None:
    """--redis-durability fsync against a Redis without appendfsync always: twistd
    logs why and exits with status 1."""
    server = ServerProcess(
        tmp_path, "--redis", redis_url, "--redis-durability", "fsync", "--metrics", "off"
    )
    servers.append(server)
    try:
        status = server.process.wait(30)
    except Exception:
        raise AssertionError(server.output()) from None
    output = server.output()
    assert status == 1, output
    assert "Refusing to start" in output and "appendfsync always" in output


def test_taken_port_exits_with_clear_message(servers: list[ServerProcess], tmp_path: Path) -> None:
    """A port already in use makes twistd exit at once, naming the problem."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        server = ServerProcess(tmp_path, "--metrics", "off", port=port)
        servers.append(server)
        assert server.process.wait(30) == 1
        output = server.output()
        assert "Cannot listen for devices" in output and "Address already in use" in output
        assert "Traceback" not in output
    finally:
        blocker.close()


def test_taken_metrics_port_exits_with_clear_message(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """A second instance on one host: the metrics port is taken, and twistd exits with
    status 1 and one line naming the endpoint and --metrics, without a traceback."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    metrics_port = blocker.getsockname()[1]
    try:
        server = ServerProcess(tmp_path, "--metrics", str(metrics_port))
        servers.append(server)
        assert server.process.wait(30) == 1
        output = server.output()
        assert f"Cannot listen for /metrics on tcp:{metrics_port}:interface=127.0.0.1" in output
        assert "Choose another port with --metrics" in output
        assert "Traceback" not in output
    finally:
        blocker.close()


def _stream_until_killed(server: ServerProcess, window: int = 4) -> list[int]:
    """Send frames with up to *window* unACKed; SIGKILL the server mid-stream. Return the
    timestamps of every record whose frame the device saw ACKed."""
    device = Device(server.port)
    device.send(encode_login(IMEI))
    assert device.recv_exactly(1) == b"\x01"
    sent: list[list[int]] = []
    acked: list[int] = []
    killer = threading.Timer(1.0, server.kill)
    killer.start()
    try:
        n = 0
        while True:
            while len(sent) - len(acked) < window:
                recs = [record(n * 2), record(n * 2 + 1)]
                n += 1
                sent.append([r.timestamp_ms for r in recs])
                try:
                    device.send(encode_avl_frame(CODEC_8E, recs))
                except OSError:
                    break
            ack = device.recv_exactly(4)
            if len(ack) < 4:
                break
            assert ack == tcp_ack(2)
            acked.append(len(acked))
    except OSError:
        pass
    finally:
        killer.join()
        device.close()
    assert server.process.returncode == -9
    assert len(acked) > 10, "the kill came before any traffic; the test proves nothing"
    return [ts for index in acked for ts in sent[index]]


def test_sigkill_loses_nothing_acked_jsonl(servers: list[ServerProcess], tmp_path: Path) -> None:
    """SIGKILL during a stream: every record the device saw ACKed is in the file."""
    server = start(servers, tmp_path, "--metrics", "off")
    server.wait_for_log("File sink ready")
    acked = _stream_until_killed(server)
    stored = {
        int(orjson.loads(line)["timestamp_ms"])
        for line in (tmp_path / "teltonika-records.jsonl").read_bytes().splitlines()
        if line.endswith(b"}")
    }
    assert set(acked) <= stored


def test_sigkill_loses_nothing_acked_redis(
    servers: list[ServerProcess], tmp_path: Path, redis_url: str
) -> None:
    """SIGKILL during a stream: every record the device saw ACKed is in the stream."""
    server = start(servers, tmp_path, "--redis", redis_url, "--metrics", "off")
    server.wait_for_log("Redis sink ready")
    acked = _stream_until_killed(server)
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    # redis-py types XRANGE for any client (None, bytes or str); decode_responses: str
    entries = cast("list[tuple[str, dict[str, str]]]", client.xrange(TELEMETRY_STREAM))
    stored = {int(fields["timestamp_ms"]) for _, fields in entries}
    client.close()
    assert set(acked) <= stored


def test_devices_file_reloaded_on_sighup(servers: list[ServerProcess], tmp_path: Path) -> None:
    """--devices file:PATH: an unknown IMEI is refused; after the list is edited and the
    server gets SIGHUP, the same IMEI logs in."""
    devices = tmp_path / "devices.txt"
    devices.write_text("490154203237518\n")
    server = start(servers, tmp_path, "--metrics", "off", "--devices", f"file:{devices}")
    device = Device(server.port)
    device.send(encode_login(IMEI))
    assert device.recv_exactly(1) == b"\x00"
    device.close()
    devices.write_text(f"490154203237518\n{IMEI}\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log("2 IMEIs")
    device = Device(server.port)
    device.send(encode_login(IMEI))
    assert device.recv_exactly(1) == b"\x01"
    device.close()


STALLING_DISK = """
import os, threading
_real_fsync = os.fsync
def _fsync(fd):
    # A disk that stops answering: once the test creates the marker, fsync never returns.
    if os.path.exists(os.environ["TELTONIKA_TEST_STALL"]):
        threading.Event().wait()
    return _real_fsync(fd)
os.fsync = _fsync
"""


def test_shutdown_with_a_stalled_disk_keeps_its_bound(
    servers: list[ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk stops answering in the middle of a write+fsync: no ACK for that frame, and
    SIGTERM still ends the process within its bound (drain, close and the sink's close,
    each bounded by --shutdown-timeout): the writer thread stuck in fsync does not keep the
    process alive."""
    marker = tmp_path / "stall"
    monkeypatch.setenv("TELTONIKA_TEST_STALL", str(marker))
    shutdown_timeout = 1.0
    server = start(
        servers,
        tmp_path,
        "--metrics",
        "off",
        "--shutdown-timeout",
        str(shutdown_timeout),
        prelude=STALLING_DISK,
    )
    server.wait_for_log("File sink ready")
    device = Device(server.port)
    device.send(encode_login(IMEI))
    assert device.recv_exactly(1) == b"\x01"
    [first, second] = frames(2)
    device.send(first)
    assert device.recv_exactly(4) == tcp_ack(2)
    marker.touch()
    device.send(second)
    device.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        device.recv_exactly(4)  # stuck in fsync: never ACKed
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    bound = 3 * shutdown_timeout + 5  # three bounded steps, plus interpreter exit
    try:
        server.process.wait(bound)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {bound} s after SIGTERM:\n{server.output()}") from None
    assert time.monotonic() - started < bound
    assert "Shutdown complete" in server.output()
    device.close()


def _http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_a_disk_stalled_at_start_does_not_freeze_the_server(
    servers: list[ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk stops answering before the server starts, so opening the file (its
    directory fsync) never ends. The open runs on the writer thread: the reactor still
    answers /healthz at once, /readyz says not ready, a device is refused (no ACK), and
    SIGTERM ends the process within its bound."""
    marker = tmp_path / "stall"
    marker.touch()
    monkeypatch.setenv("TELTONIKA_TEST_STALL", str(marker))
    metrics = free_port()
    server = start(
        servers,
        tmp_path,
        "--metrics",
        str(metrics),
        "--shutdown-timeout",
        "1",
        prelude=STALLING_DISK,
    )
    wait_for_port(metrics)
    assert _http_status(metrics, "/healthz") == 200
    assert _http_status(metrics, "/readyz") == 503
    device = Device(server.port)
    device.send(encode_login(IMEI) + frames(1)[0])
    assert device.recv_exactly(1) == b"\x01"
    assert device.recv_exactly(4) == b""  # refused (the sink is not ready) and closed
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 10 s after SIGTERM:\n{server.output()}") from None
    assert time.monotonic() - started < 10
    assert "File sink ready" not in server.output()
    device.close()


def test_torn_tail_from_a_crash_is_repaired_at_restart(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """A crash in the middle of a write leaves half a line in the file (made certain here
    by writing one: a SIGKILL cannot be aimed inside os.write). The restarted server logs
    the repair, and the first record it ACKs is on a line of its own that parses."""
    output = tmp_path / "teltonika-records.jsonl"
    fragment = b'{"v":"1","imei":"' + IMEI.encode() + b'","timestamp_ms":"17'
    output.write_bytes(fragment)
    server = start(servers, tmp_path, "--metrics", "off")
    server.wait_for_log("File sink ready")
    assert f"torn line of {len(fragment)} bytes" in server.output()
    device = Device(server.port)
    device.send(encode_login(IMEI))
    assert device.recv_exactly(1) == b"\x01"
    device.send(encode_avl_frame(CODEC_8E, [record(0)]))
    assert device.recv_exactly(4) == tcp_ack(1)
    device.close()
    torn, first, end = output.read_bytes().split(b"\n")
    assert torn == fragment and end == b""
    assert int(orjson.loads(first)["timestamp_ms"]) == record(0).timestamp_ms
