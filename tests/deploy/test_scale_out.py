"""Several ``twistd teltonika`` processes on one host sharing the device port through the
``reuseport:`` endpoint (README.rst, "Scale-out: all cores, a balancer"): the kernel
spreads the devices over them, a command reaches a device on either, nothing ACKed is
lost, and a second process under the same ``--instance-id`` is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.processes import instance, wait_total
from tests.faults.harness import (
    Simulation,
    assert_nothing_lost,
    fleet_options,
    free_port,
    verify,
    wait_until,
)
from tests.servers import RedisServer, checkout_env

pytestmark = pytest.mark.slow
DEVICES = 40
REUSEPORT = "reuseport:{port}:interface=127.0.0.1"
HEARTBEAT = ("--heartbeat-interval", "2")


def send(redis_url: str, imei: str, command: str) -> tuple[int, str]:
    """``teltonika send``; (exit status, its stdout and stderr)."""
    out = subprocess.run(
        [sys.executable, "-m", "teltonika", "send", "--redis", redis_url, imei, command,
         "--timeout", "20"],
        env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=90,
        check=False,
    )  # fmt: skip
    return out.returncode, out.stdout.decode(errors="replace")


def registry(redis_server: RedisServer) -> dict[str, str]:
    """``connections:registry``: IMEI -> instance id."""
    lines = redis_server.cli("HGETALL", "connections:registry").split()
    return dict(zip(lines[::2], lines[1::2], strict=True))


def test_two_processes_share_one_port_and_commands_reach_either(
    tmp_path: Path, redis_url: str, redis_server: RedisServer
) -> None:
    port = free_port()
    servers = [
        instance(tmp_path / name, port, name, REUSEPORT, "--redis", redis_url, *HEARTBEAT)
        for name in ("edge-a", "edge-b")
    ]
    try:
        for server in servers:
            server.start()
        # A calm fleet (ACK timeout 20 s): a device that timed out and reconnected could
        # land on the other process while its command is on the way (then it fails
        # socket_closed, correctly, but this test is about routing).
        options = fleet_options(DEVICES, duration=15, interval=0.5, ack_timeout="20")
        sim = Simulation(tmp_path, port, options)
        wait_total(servers, "teltonika_connections_open", DEVICES, 30)
        spread = [server.metric_sum("teltonika_connections_open") for server in servers]
        assert min(spread) > 0, spread  # the kernel gave each process some devices
        where = registry(redis_server)
        assert sorted(set(where.values())) == ["edge-a", "edge-b"]
        assert len(where) == DEVICES
        targets = [
            min(imei for imei, name in where.items() if name == n) for n in ("edge-a", "edge-b")
        ]
        # A sender routes only to an instance with a live heartbeat; a first heartbeat
        # that timed out on a loaded machine is repeated at --heartbeat-interval.
        for name in ("edge-a", "edge-b"):

            def beating(n: str = name) -> bool:
                return redis_server.cli("EXISTS", f"instance:heartbeat:{n}").strip() == "1"

            wait_until(beating, 20, f"{name}'s heartbeat")
        replies = [send(redis_url, imei, "getver") for imei in targets]
        code, summary = sim.result(timeout=90)
        _code, check = verify(sim.ledger_path, "--redis", redis_url)
        acked = [server.metric("teltonika_acked_records_total") for server in servers]
    finally:
        for server in servers:
            server.stop()
    for imei, (status, text) in zip(targets, replies, strict=True):
        assert status == 0, text
        assert f"IMEI:{imei}" in text
    assert min(acked) > 0, acked
    assert_nothing_lost(summary, check)
    assert code == 0


def test_a_second_process_with_the_same_instance_id_is_refused(
    tmp_path: Path, redis_url: str
) -> None:
    """Same id, same Redis, same host: exit status 1 and one line saying what to change;
    the first process goes on serving."""
    port = free_port()
    first = instance(tmp_path / "first", port, "edge-a", REUSEPORT, "--redis", redis_url)
    try:
        first.start()
        (tmp_path / "second").mkdir()
        argv = [
            sys.executable, "-m", "twisted", "teltonika",
            "--port", REUSEPORT.format(port=port),
            "--metrics", f"tcp:{free_port()}:interface=127.0.0.1",
            "--instance-id", "edge-a", "--redis", redis_url,
        ]  # fmt: skip
        second = subprocess.run(
            argv,
            cwd=tmp_path / "second",
            env=checkout_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
            check=False,
        )
        assert first.process is not None and first.process.poll() is None
        status, _ = first.http("/readyz")
    finally:
        first.stop()
    output = second.stdout.decode(errors="replace")
    assert second.returncode == 1, output
    assert "already runs --instance-id 'edge-a'" in output
    assert "give every process its own --instance-id" in output
    assert status == 200
