"""Throwaway servers for tests: real ``redis-server`` (and PostgreSQL) on free ports.

A missing binary is a test *failure*, never a skip: CI must prove the real parts work.
Each server lives in its own temporary directory and is killed at the end of the session.
Fault tests use :meth:`RedisServer.kill` and :meth:`RedisServer.start` to crash and
restart the same server (same port, same data directory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The checkout's root: the directory holding ``teltonika/`` and ``twisted/plugins/``."""


def checkout_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that must import *this checkout* (the
    repository root first on ``PYTHONPATH``, so ``python -m twisted teltonika`` finds our
    plugins and code rather than an installed copy), plus *extra* variables."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until *port* accepts connections (used only to start servers, never in tests)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


class RedisServer:
    """A ``redis-server`` child process on a free loopback port.

    :param extra: extra command-line config, e.g. ``["--appendonly", "yes"]``.
    """

    def __init__(self, extra: Sequence[str] = (), port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: the suite needs a real Redis "
                "(apt-get install redis-server); .ci/run installs it"
            )
        self.binary = binary
        self.port = port or free_port()
        self.directory = tempfile.mkdtemp(prefix="teltonika-redis-")
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            os.path.join(self.directory, "redis.log"),
            *self.extra,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed beyond what Redis's own config guarantees."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def cli(self, *args: str) -> str:
        """Run ``redis-cli`` against this server (for assertions and setup)."""
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return out.stdout.decode()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class PostgresServer:
    """A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl``) on a free loopback port.

    As root the cluster runs as the ``postgres`` user (initdb refuses root). Trust
    authentication, ``fsync=off`` (thrown away; ``synchronous_commit`` stays on so that an
    immediate stop loses no committed row). :meth:`stop` (``-m immediate``, a
    crash) and :meth:`start` restart the same cluster on the same port, for fault tests.
    """

    def __init__(self, port: int | None = None) -> None:
        self.bindir = self._find_bindir()
        self.port = port or free_port()
        self.directory = tempfile.mkdtemp(prefix="teltonika-pg-")
        self.data = os.path.join(self.directory, "data")
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(
            os.path.join(self.bindir, "initdb"),
            "-D",
            self.data,
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        )

    @staticmethod
    def _find_bindir() -> str:
        import glob

        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
        pg_config = shutil.which("pg_config")
        if pg_config:
            out = subprocess.run(
                [pg_config, "--bindir"], check=False, capture_output=True, text=True
            )
            candidates.append(out.stdout.strip())
        for directory in candidates:
            if os.path.exists(os.path.join(directory, "pg_ctl")):
                return directory
        raise RuntimeError(
            "PostgreSQL server binaries (initdb, pg_ctl) are not installed: the suite needs "
            "a real PostgreSQL (apt-get install postgresql); .ci/run installs it"
        )

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> PostgresServer:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        self._run(
            os.path.join(self.bindir, "pg_ctl"),
            "-D",
            self.data,
            "-o",
            options,
            "-l",
            os.path.join(self.directory, "postgres.log"),
            "-w",
            "start",
        )
        wait_for_port(self.port)
        return self

    def stop(self, mode: str = "immediate") -> None:
        """Stop the cluster (``immediate`` is a crash: no checkpoint, clients cut)."""
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return os.path.exists(os.path.join(self.data, "postmaster.pid"))

    def cleanup(self) -> None:
        if self.running():
            with contextlib.suppress(subprocess.SubprocessError):
                self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)
