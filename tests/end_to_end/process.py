"""Run the real ``twistd teltonika`` plugin as a subprocess (end-to-end tests)."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from tests.servers import checkout_env, free_port

REPO = Path(__file__).resolve().parents[2]
TWISTD = "from twisted.scripts.twistd import run; run()"


class ServerProcess:
    """``twistd -n --pidfile= teltonika --port tcp:N:interface=127.0.0.1 ...`` in *cwd*.

    :param endpoint: the ``--port`` value, with ``{port}`` standing for the free port
        (``tcp6:{port}:interface=\\:\\:1``, ``ssl:{port}:...``); *host* is where it listens.
    :param prelude: Python code the child runs before twistd (a fault test's stand-in for
        a broken part of the machine, such as a disk that stops answering).
    """

    def __init__(
        self,
        cwd: Path,
        *args: str,
        port: int | None = None,
        endpoint: str = "tcp:{port}:interface=127.0.0.1",
        host: str = "127.0.0.1",
        prelude: str = "",
    ) -> None:
        self.port = port or free_port()
        self.host = host
        self.cwd = cwd
        env = checkout_env()
        self.log = cwd / "twistd.out"
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                prelude + "\n" + TWISTD,
                "-n",
                "--pidfile=",
                "teltonika",
                "--port",
                endpoint.format(port=self.port),
                *args,
            ],
            cwd=cwd,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited early:\n{self.output()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"twistd did not listen in time:\n{self.output()}")

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"{text!r} not logged:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def close(self) -> None:
        self.kill()
        self._log_file.close()


class Device:
    """A blocking TCP client speaking the device side (over TLS when given a context)."""

    def __init__(
        self, port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> None:
        sock = socket.create_connection((host, port), timeout=10)
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                return data
            data += chunk
        return data

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
