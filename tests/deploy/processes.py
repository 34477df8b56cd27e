"""Real processes for the scale-out tests: server instances sharing a ``reuseport:`` port
or behind HAProxy, Debian's ``haproxy`` running ``deploy/haproxy.cfg`` itself, and the
server's JSON log events.

Builds on the fault suite's harness (``tests/faults/harness.py``). A missing ``haproxy``
binary is a failure, never a skip (``.ci/run`` installs it)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from tests.faults.harness import ROOT, ServerProcess, free_port, wait_until
from tests.servers import wait_for_port

HAPROXY_CONFIG = ROOT / "deploy" / "haproxy.cfg"


def instance(
    directory: Path, port: int, instance_id: str, endpoint: str, *options: str
) -> ServerProcess:
    """A server in its own *directory* (log, records) on *endpoint* (``{port}`` filled in)
    with its own ``--instance-id`` and metrics port; not started yet."""
    directory.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(
        directory,
        ["--port", endpoint.format(port=port), "--instance-id", instance_id, *options],
    )
    server.port = port  # the harness waits on this port; ours may be shared
    return server


def log_events(server: ServerProcess) -> Iterator[dict[str, Any]]:
    """The JSON log events of every start of *server* (``python -m twisted`` logs JSON
    text sequences, a record separator before each event, when its output is not a
    terminal)."""
    for raw in server.log_path.read_bytes().splitlines():
        line = raw.lstrip(b"\x1e")
        if line.startswith(b"{"):
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                continue


class HAProxy:
    """``haproxy -db -f deploy/haproxy.cfg`` with the addresses in its environment.

    :param servers: ``[(device port, ops port), ...]`` of the instances on 127.0.0.1, in
        the order of the config's ``server`` lines (s1, s2).
    """

    def __init__(self, directory: Path, servers: list[tuple[int, int]]) -> None:
        binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
        if binary is None:
            raise RuntimeError(
                "haproxy is not installed: the balancer tests need Debian's haproxy "
                "(apt-get install haproxy); .ci/run installs it"
            )
        self.port = free_port()
        self.admin_path = directory / "haproxy-admin.sock"
        env = dict(
            os.environ,
            TELTONIKA_BIND=f"127.0.0.1:{self.port}",
            TELTONIKA_HAPROXY_ADMIN=str(self.admin_path),
            TELTONIKA_HAPROXY_MAXCONN="4000",
        )
        for index, (port, ops) in enumerate(servers, start=1):
            env[f"TELTONIKA_SERVER{index}"] = f"127.0.0.1:{port}"
            env[f"TELTONIKA_SERVER{index}_OPS"] = str(ops)
        self.log_path = directory / "haproxy.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(HAPROXY_CONFIG)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(self.port, timeout=20)
            wait_until(self.admin_path.exists, 20, "haproxy admin socket")
        except TimeoutError:
            self.stop()
            raise AssertionError(f"haproxy did not start:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self, command: str) -> str:
        """One command on the runtime API (the admin socket)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.admin_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the ``teltonika`` backend's servers, by server name."""
        text = self.admin("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "teltonika" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def wait_status(self, server: str, status: str, timeout: float = 20) -> None:
        """Until the health check says *status* (``UP``, ``DOWN``, ``DRAIN``...)."""
        try:
            wait_until(
                lambda: self.stats()[server]["status"].startswith(status),
                timeout,
                f"haproxy {server} {status}",
            )
        except TimeoutError:
            raise AssertionError(f"{server} not {status}: {self.stats()[server]}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def connect_from(source: str, port: int) -> socket.socket:
    """A blocking TCP client to 127.0.0.1:*port* from local address *source*."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def wait_total(servers: list[ServerProcess], metric: str, expected: float, timeout: float) -> None:
    """Until the servers' *metric* sums to *expected*."""
    try:
        wait_until(lambda: sum(s.metric_sum(metric) for s in servers) == expected, timeout, metric)
    except TimeoutError:
        seen = [s.metric_sum(metric) for s in servers]
        raise AssertionError(f"{metric}: {seen}, expected {expected} in all") from None


__all__ = ["HAProxy", "connect_from", "instance", "log_events", "wait_total"]
