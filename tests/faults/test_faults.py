"""The fault suite: a real server process, real Redis, a simulated fleet and its ledger.

Each test runs a small fast fleet (20-40 devices, frames every 0.2 s) for a few seconds,
breaks something in the middle, lets the fleet drain, and then checks the promises:

* no broken promise seen by any device (wrong ACK count, ACKed corrupt frame ...);
* every record was ACKed in the end (the fleet recovered without help);
* every record any device saw ACKed is in the sink (``teltonika simulate --verify-only``).

Loopback only; every wait is bounded (see ``harness.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import RedisServer

from .harness import (
    ServerProcess,
    Simulation,
    assert_nothing_lost,
    fleet_options,
    verify,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A Redis of this test only, configured so that a SIGKILL loses nothing it confirmed."""
    server = RedisServer(extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Collects server processes so each is stopped even when the test fails."""
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def _fsync_server_and_fleet(
    directory: Path, redis: RedisServer, servers: list[ServerProcess], devices: int, seconds: float
) -> tuple[ServerProcess, Simulation]:
    """A server on --redis-durability fsync and a fleet it has ACKed 200 records of."""
    server = ServerProcess(directory, ["--redis", redis.url, "--redis-durability", "fsync"])
    servers.append(server.start())
    sim = Simulation(directory, server.port, fleet_options(devices, duration=seconds))
    wait_until(lambda: server.metric("teltonika_acked_records_total") > 200, 20, "fleet ACKed")
    return server, sim


def _recovered(server: ServerProcess, sim: Simulation, redis: RedisServer) -> dict[str, Any]:
    """Wait for the server to be ready again and the fleet to finish; check that nothing
    it saw ACKed is missing from the stream. Returns the fleet's summary."""
    wait_until(lambda: server.http("/readyz")[0] == 200, 20, "server ready again")
    code, summary = sim.result(timeout=60)
    _code, check = verify(sim.ledger_path, "--redis", redis.url)
    assert_nothing_lost(summary, check)
    assert code == 0
    return summary


def test_redis_sigkill_and_restart_during_load(
    tmp_path: Path, durable_redis: RedisServer, servers: list[ServerProcess]
) -> None:
    """Redis (appendonly, fsync always) is SIGKILLed under load and restarted 3 s later:
    no ACK while it is down, /readyz says not ready, the server reconnects by itself and
    every ACKed record survives the crash."""
    server, sim = _fsync_server_and_fleet(tmp_path, durable_redis, servers, 30, 9)
    durable_redis.kill()
    wait_until(lambda: server.http("/readyz")[0] == 503, 10, "/readyz reports Redis down")
    time.sleep(0.5)  # frames whose XADD was confirmed before the kill may still be ACKed
    acks_at_outage = server.metric_sum("teltonika_acks_total")
    time.sleep(2.5)
    assert server.metric_sum("teltonika_acks_total") == acks_at_outage, "ACKs while Redis was down"
    assert server.metric_sum("teltonika_sink_failures_total") > 0
    durable_redis.start()
    summary = _recovered(server, sim, durable_redis)
    assert server.metric_sum("teltonika_acks_total") > acks_at_outage
    assert summary["disconnects"] > 0 or summary["ack_timeouts"] > 0


def test_fsync_taken_away_at_runtime_refuses_frames_until_restored(
    tmp_path: Path, durable_redis: RedisServer, servers: list[ServerProcess]
) -> None:
    """--redis-durability fsync, and someone runs CONFIG SET appendfsync everysec under
    load: within the periodic check the server turns not ready (/readyz 503) and ACKs
    nothing more, logs one error and counts it; once appendfsync always is back it takes
    frames again by itself, and every ACKed record is in the stream."""
    server, sim = _fsync_server_and_fleet(tmp_path, durable_redis, servers, 20, 10)
    durable_redis.cli("CONFIG", "SET", "appendfsync", "everysec")
    wait_until(lambda: server.http("/readyz")[0] == 503, 10, "/readyz reports no fsync")
    acks_when_refused = server.metric_sum("teltonika_acks_total")
    time.sleep(2.0)
    assert server.metric_sum("teltonika_acks_total") == acks_when_refused, "ACKs without fsync"
    assert server.metric("teltonika_sink_durability_lost_total") == 1
    durable_redis.cli("CONFIG", "SET", "appendfsync", "always")
    _recovered(server, sim, durable_redis)
    assert server.metric_sum("teltonika_acks_total") > acks_when_refused
    assert server.log_tail(10_000).count("no longer gives the durability") == 1


@pytest.mark.parametrize("sink", ["redis", "jsonl"])
def test_server_sigkill_and_restart_during_load(
    sink: str, tmp_path: Path, redis_url: str, servers: list[ServerProcess]
) -> None:
    """The server is SIGKILLed under load and restarted: devices reconnect, resend what was
    not ACKed, and every record they saw ACKed is in the sink (Redis, or the fsynced file).

    For the file, the kill is made to land in the middle of a write: a SIGKILL cannot be
    aimed inside os.write, so half of a line is appended to the file after the kill. The
    restarted server must start a new line, or the first records it ACKs are unreadable."""
    output = tmp_path / "records.jsonl"
    options = ["--redis", redis_url] if sink == "redis" else ["--output", str(output)]
    server = ServerProcess(tmp_path, options).start()
    servers.append(server)
    sim = Simulation(tmp_path, server.port, fleet_options(30, duration=7))
    wait_until(lambda: server.metric("teltonika_acked_records_total") > 200, 20, "fleet ACKed")
    server.kill()
    torn_end = 0
    if sink == "jsonl":
        last_line = output.read_bytes().splitlines()[-1]
        with output.open("ab") as torn:
            torn.write(last_line[: len(last_line) // 2])
        torn_end = output.stat().st_size
    time.sleep(1.0)
    server.start()
    code, summary = sim.result(timeout=60)
    sink_option = ["--redis", redis_url] if sink == "redis" else ["--output", str(output)]
    _code, check = verify(sim.ledger_path, *sink_option)
    assert_nothing_lost(summary, check)
    assert code == 0
    assert summary["disconnects"] >= 30
    if sink == "jsonl":
        # the half line stays as it was; what the restarted server wrote starts after it
        assert output.read_bytes()[torn_end : torn_end + 2] == b"\n{"
        assert check["unreadable"] == 1


def test_sigterm_during_load_is_graceful_and_loses_nothing(
    tmp_path: Path, redis_url: str, servers: list[ServerProcess]
) -> None:
    """SIGTERM under load: the server finishes in-flight frames, closes connections and
    exits within its shutdown bound; after a restart the fleet drains and nothing that
    was ACKed is missing."""
    shutdown_timeout = 3.0
    server = ServerProcess(
        tmp_path, ["--redis", redis_url, "--shutdown-timeout", str(shutdown_timeout)]
    ).start()
    servers.append(server)
    sim = Simulation(tmp_path, server.port, fleet_options(30, duration=7))
    wait_until(lambda: server.metric("teltonika_acked_records_total") > 200, 20, "fleet ACKed")
    elapsed, code = server.terminate(timeout=4 * shutdown_timeout + 5)
    # Twisted re-raises the terminating signal once the reactor has stopped cleanly, so
    # the status is "killed by SIGTERM" (-15) rather than 0; the log says it was graceful.
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), server.log_tail()
    assert "Shutdown complete" in server.log_tail(200)
    # Two bounded phases (drain in-flight frames, close connections) plus start-up slack.
    assert elapsed < 2 * shutdown_timeout + 3, elapsed
    server.start()
    code, summary = sim.result(timeout=60)
    _code, check = verify(sim.ledger_path, "--redis", redis_url)
    assert_nothing_lost(summary, check)
    assert code == 0


def _hostile_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the server closed this connection (EOF or reset)."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_hostile_clients_while_a_fleet_runs(
    tmp_path: Path, redis_url: str, servers: list[ServerProcess]
) -> None:
    """Slowloris, oversized length fields, random bytes and a connect-and-idle flood beyond
    --max-connections: the fleet keeps being served and loses nothing, every bad connection
    is closed and counted, and the server's RSS stays bounded."""
    max_connections = 80
    server = ServerProcess(
        tmp_path,
        [
            "--redis", redis_url, "--max-connections", str(max_connections),
            "--login-timeout", "2", "--max-frame", "4096",
        ],
    ).start()  # fmt: skip
    servers.append(server)
    sim = Simulation(tmp_path, server.port, fleet_options(20, duration=9))
    wait_until(lambda: server.metric("teltonika_acked_records_total") > 100, 20, "fleet ACKed")
    rss_before = server.rss_kib()
    bad: dict[str, list[socket.socket]] = {
        "slowloris": [],
        "oversize": [],
        "random": [],
        "flood": [],
    }
    try:
        # Oversized length fields: a data frame claiming 4 GiB, and an absurd IMEI length.
        for _ in range(10):
            sock = _hostile_socket(server.port)
            sock.send(b"\x00\x00\x00\x00\xff\xff\xff\xff" + b"\x00" * 64)
            bad["oversize"].append(sock)
            sock = _hostile_socket(server.port)
            sock.send(b"\x16\x03\x01\x02\x00\x01")  # a TLS ClientHello: IMEI length 5635
            bad["oversize"].append(sock)
        # Random bytes (never starting with a plausible IMEI packet).
        for _ in range(10):
            sock = _hostile_socket(server.port)
            sock.send(b"\x7f" + os.urandom(2048))
            bad["random"].append(sock)
        # Slowloris: a valid login packet, one byte a second.
        login = b"\x00\x0f356307042449999"
        for _ in range(5):
            bad["slowloris"].append(_hostile_socket(server.port))
        # Connect-and-idle flood, well beyond --max-connections.
        for _ in range(max_connections + 40):
            bad["flood"].append(_hostile_socket(server.port))
        for index in range(4):
            for sock in bad["slowloris"]:
                with contextlib.suppress(OSError):
                    sock.send(login[index : index + 1])
            time.sleep(1.0)
        every = [sock for group in bad.values() for sock in group]
        wait_until(lambda: all(_closed_by_peer(s) for s in every), 15, "bad connections closed")
        rss_after = server.rss_kib()
    finally:
        for group in bad.values():
            for sock in group:
                sock.close()
    code, summary = sim.result(timeout=60)
    _code, check = verify(sim.ledger_path, "--redis", redis_url)
    assert_nothing_lost(summary, check)
    assert code == 0
    metrics = server.metrics()

    def total(name: str, **labels: str) -> float:
        wanted = set(labels.items())
        return sum(
            value for (n, sample_labels), value in metrics.items()
            if n == name and wanted <= set(sample_labels)
        )  # fmt: skip

    # Every idle flood connection and every slowloris is either refused at the door or
    # closed by the login timeout. How many of each depends on the machine's speed: a
    # flood connection let in is closed after 2 s, which frees a slot for a later one.
    refused = total("teltonika_connections_refused_total", reason="max_connections")
    login_timeouts = total("teltonika_timeouts_total", kind="login")
    assert refused > 0
    assert refused + login_timeouts >= len(bad["flood"]) + len(bad["slowloris"])
    assert total("teltonika_decode_errors_total") >= 30
    assert server.metric("teltonika_connections_open") <= summary["devices"]
    # 200 hostile connections must not cost more than a few MiB.
    assert rss_after - rss_before < 20 * 1024, (rss_before, rss_after)
