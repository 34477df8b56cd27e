"""Real processes for the fault suite: the server (``python -m twisted teltonika``), the
simulator (``python -m teltonika simulate``), their metrics, RSS and ledgers.

Everything listens on loopback free ports. Every wait is bounded; a helper that times out
raises with the server's log tail so a failure says what happened.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import checkout_env, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll *predicate* until true; return the seconds it took. Raise after *timeout*."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not true after {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


class ServerProcess:
    """``python -m twisted teltonika`` on a free loopback port, with /metrics on another.

    :param options: extra server options (``--redis URL`` ...).
    """

    def __init__(self, directory: Path, options: Sequence[str] = ()) -> None:
        self.directory = directory
        self.port = free_port()
        self.metrics_port = free_port()
        self.options = list(options)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "server.log"
        self.starts = 0

    def start(self) -> ServerProcess:
        self.starts += 1
        argv = [
            sys.executable, "-m", "twisted", "teltonika",
            "--port", f"tcp:{self.port}:interface=127.0.0.1",
            "--metrics", f"tcp:{self.metrics_port}:interface=127.0.0.1",
            "--instance-id", "faults",
            *self.options,
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        log.write(f"\n=== start {self.starts}: {' '.join(argv)}\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            argv, cwd=str(self.directory), env=checkout_env(), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        try:
            wait_for_port(self.port, timeout=20)
            wait_for_port(self.metrics_port, timeout=20)
        except TimeoutError:
            raise AssertionError(f"server did not start:\n{self.log_tail()}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: a crash; nothing gets flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float) -> tuple[float, int]:
        """SIGTERM; return (seconds until exit, exit status)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(
                f"server did not exit within {timeout} s of SIGTERM:\n{self.log_tail()}"
            ) from None
        return time.monotonic() - started, code

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def http(self, path: str) -> tuple[int, str]:
        """GET a path of the ops endpoint with a bare socket (no client library needed)."""
        with socket.create_connection(("127.0.0.1", self.metrics_port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        raw = b"".join(chunks)
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, body.decode("utf-8", "replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics as ``{(name, sorted labels): value}``."""
        _status, text = self.http("/metrics")
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def metric_sum(self, name: str) -> float:
        """A counter summed over all its labels."""
        return sum(value for (n, _labels), value in self.metrics().items() if n == name)

    def rss_kib(self) -> int:
        """Resident set size of the server process, KiB."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")


class Simulation:
    """``teltonika simulate`` in a child process, writing its ledger to a file."""

    def __init__(self, directory: Path, port: int, options: Sequence[str], name: str = "sim"):
        self.ledger_path = directory / f"{name}-ledger.json"
        self.stderr_path = directory / f"{name}.stderr"
        argv = [
            sys.executable, "-m", "teltonika", "simulate",
            "--port", str(port), "--json", "--ledger", str(self.ledger_path),
            "--progress", "1", *options,
        ]  # fmt: skip
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 (closed in result())
        self.process = subprocess.Popen(
            argv, cwd=str(ROOT), env=checkout_env(), stdout=subprocess.PIPE, stderr=self._stderr
        )

    def result(self, timeout: float) -> tuple[int, dict[str, Any]]:
        """Wait for the run to end; return (exit status, summary)."""
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            raise AssertionError(f"simulator still running after {timeout} s") from None
        finally:
            self._stderr.close()
        try:
            summary = orjson.loads(out)
        except orjson.JSONDecodeError:
            raise AssertionError(
                f"simulator printed no summary: {out!r}\n{self.stderr_path.read_text()}"
            ) from None
        return self.process.returncode, summary


def verify(ledger_path: Path, *sink: str) -> tuple[int, dict[str, Any]]:
    """``teltonika simulate --verify-only`` on a saved ledger; (exit status, verify dict)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "teltonika",
            "simulate",
            "--verify-only",
            "--ledger",
            str(ledger_path),
            "--json",
            *sink,
        ],
        cwd=str(ROOT),
        env=checkout_env(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    try:
        summary = orjson.loads(out.stdout)
    except orjson.JSONDecodeError:
        raise AssertionError(f"verify printed no summary: {out.stdout!r} {out.stderr!r}") from None
    return out.returncode, summary["verify"]


def fleet_options(
    devices: int, duration: float, interval: float = 0.2, records: int = 2, **extra: str
) -> list[str]:
    """Simulator options for a small, fast fleet that reconnects quickly."""
    options = [
        "--devices", str(devices), "--duration", str(duration), "--interval", str(interval),
        "--records-per-frame", str(records), "--ack-timeout", "3", "--backoff-max", "1",
        "--connect-rate", "200", "--drain", "20", "--keepalive", "1",
    ]  # fmt: skip
    for key, value in extra.items():
        options += ["--" + key.replace("_", "-"), value]
    return options


def assert_nothing_lost(summary: dict[str, Any], check: dict[str, Any]) -> None:
    """The promises every fault test checks: no broken promise, every record ACKed in the
    end (the fleet recovered), and every ACKed record in the sink."""
    assert summary["broken_promises"] == 0, summary["violations"]
    assert summary["never_acked"] == 0, summary["never_acked_sample"]
    assert summary["records_acked"] > 0
    assert check["missing"] == 0, check["missing_sample"]
    assert check["acked"] == summary["records_acked"]


__all__ = [
    "ROOT",
    "ServerProcess",
    "Simulation",
    "assert_nothing_lost",
    "fleet_options",
    "free_port",
    "verify",
    "wait_until",
]
