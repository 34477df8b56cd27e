"""Debian's HAProxy running ``deploy/haproxy.cfg`` in front of two real instances
(``--port haproxy:tcp:...``): every log event names the device's own address (PROXY
protocol v2), ``leastconn`` evens out a late instance, the ``/readyz`` health check
follows the instances, and a drain-then-SIGTERM rolling restart moves every device to
the other instance and back with no broken promise and nothing ACKed lost."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from teltonika.protocol.settings import DEFAULT_IDLE_TIMEOUT
from teltonika.wire import CODEC_8E, encode_avl_frame, encode_login, tcp_ack
from tests.deploy.processes import (
    HAPROXY_CONFIG,
    HAProxy,
    connect_from,
    instance,
    log_events,
    wait_total,
)
from tests.faults.harness import (
    ServerProcess,
    Simulation,
    assert_nothing_lost,
    fleet_options,
    free_port,
    verify,
    wait_until,
)
from tests.helpers import record

PROXIED = "haproxy:tcp:{port}:interface=127.0.0.1"
PROXIED_REUSEPORT = "haproxy:reuseport:{port}:interface=127.0.0.1"  # the two compose
DEVICE_ADDRESS = "127.0.0.5"  # the devices' source; HAProxy connects from 127.0.0.1


@pytest.fixture
def deployment(tmp_path: Path, redis_url: str) -> Iterator[tuple[HAProxy, list[ServerProcess]]]:
    """HAProxy and two instances (s1 on ``haproxy:tcp:``, s2 on ``haproxy:reuseport:``) on
    one Redis; the instances are not started."""
    servers = [
        instance(tmp_path / name, free_port(), name, endpoint, "--redis", redis_url)
        for name, endpoint in (("s1", PROXIED), ("s2", PROXIED_REUSEPORT))
    ]
    haproxy = HAProxy(tmp_path, [(s.port, s.metrics_port) for s in servers])
    try:
        yield haproxy, servers
    finally:
        for server in servers:
            server.stop()
        haproxy.stop()


def test_timeouts_in_the_config_outlast_the_idle_timeout() -> None:
    """HAProxy cuts a connection idle for ``timeout tunnel``: it must be longer than the
    server's own ``--idle-timeout``, or idle devices are cut by the balancer first."""
    text = HAPROXY_CONFIG.read_text()
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for name in ("tunnel", "client", "server"):
        match = re.search(rf"^\s*timeout {name} (\d+)(ms|s|m|h)\s*$", text, re.MULTILINE)
        assert match, name
        assert int(match.group(1)) * units[match.group(2)] > DEFAULT_IDLE_TIMEOUT, name
    assert re.search(r"^\s*balance leastconn\s*$", text, re.MULTILINE)
    assert "send-proxy-v2" in text and "uri /readyz" in text
    assert "shutdown-sessions" not in text.replace('No "on-marked-down shutdown-sessions"', "")


def _device(port: int, imei: str) -> tuple[object, int]:
    """A device logged in through the balancer from DEVICE_ADDRESS, one frame ACKed;
    returns its socket and its own port."""
    sock = connect_from(DEVICE_ADDRESS, port)
    sock.sendall(encode_login(imei))
    assert sock.recv(1) == b"\x01"
    sock.sendall(encode_avl_frame(CODEC_8E, [record(1)]))
    assert sock.recv(4) == tcp_ack(1)
    return sock, sock.getsockname()[1]


def test_proxy_addresses_in_logs_and_leastconn_evens_out_a_late_instance(
    deployment: tuple[HAProxy, list[ServerProcess]],
) -> None:
    haproxy, (s1, s2) = deployment
    s1.start()
    haproxy.wait_status("s1", "UP")
    haproxy.wait_status("s2", "DOWN")  # /readyz does not answer: not started
    imeis = [f"35630704244{index:04d}" for index in range(12)]
    devices = {imei: _device(haproxy.port, imei) for imei in imeis[:6]}
    s2.start()
    haproxy.wait_status("s2", "UP")
    devices.update({imei: _device(haproxy.port, imei) for imei in imeis[6:]})
    try:
        # leastconn: all six late devices went to the instance that had none.
        assert s1.metric_sum("teltonika_connections_open") == 6
        assert s2.metric_sum("teltonika_connections_open") == 6
    finally:
        for sock, _port in devices.values():
            sock.close()  # type: ignore[attr-defined]
    wait_total([s1, s2], "teltonika_connections_open", 0, 20)
    for server in (s1, s2):
        server.stop()  # its log reaches the file at exit (not a terminal: buffered)
    events = [event for server in (s1, s2) for event in log_events(server)]
    logins = {e["imei"]: e["peer"] for e in events if e.get("event") == "login"}
    assert logins == {imei: f"{DEVICE_ADDRESS}:{port}" for imei, (_s, port) in devices.items()}
    about_devices = [e for e in events if e.get("imei") in devices and "peer" in e]
    assert len(about_devices) >= 2 * len(devices)  # logins and logouts at least
    for event in about_devices:
        assert event["peer"].startswith(f"{DEVICE_ADDRESS}:"), event


def test_rolling_restart_moves_every_device_with_no_broken_promise(
    deployment: tuple[HAProxy, list[ServerProcess]], redis_url: str
) -> None:
    """Drain s1 on the runtime API, SIGTERM it: every device ends up on s2; start s1
    again, mark it ready; then the same for s2. The fleet streams all along."""
    haproxy, servers = deployment
    devices = 30
    for server in servers:
        server.start()
    for name in ("s1", "s2"):
        haproxy.wait_status(name, "UP")
    sim = Simulation(
        servers[0].directory,
        haproxy.port,
        fleet_options(devices, duration=45, interval=0.2, bind=DEVICE_ADDRESS),
    )
    wait_total(servers, "teltonika_connections_open", devices, 30)
    moved = []
    first, second = servers
    for name, server, other in (("s1", first, second), ("s2", second, first)):
        haproxy.admin(f"set server teltonika/{name} state drain")
        seconds, _status = server.terminate(timeout=60)
        assert "Shutdown complete" in server.log_tail(10), server.log_tail()

        def all_moved(o: ServerProcess = other) -> bool:
            return o.metric_sum("teltonika_connections_open") == devices

        wait_until(
            all_moved,
            30,
            f"every device on the other instance after {name} stopped",
        )
        moved.append(seconds)
        acked_before = other.metric("teltonika_acked_records_total")

        def streaming(o: ServerProcess = other, a: float = acked_before) -> bool:
            return o.metric("teltonika_acked_records_total") > a + 100

        wait_until(
            streaming,
            20,
            "the fleet streams on",
        )
        server.start()
        haproxy.admin(f"set server teltonika/{name} state ready")
        haproxy.wait_status(name, "UP")
    code, summary = sim.result(timeout=120)
    _code, check = verify(sim.ledger_path, "--redis", redis_url)
    assert_nothing_lost(summary, check)
    assert code == 0
    assert summary["broken_promises"] == 0
    assert all(server.starts == 2 for server in servers)
    assert len(moved) == 2
