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
from collections.abc import Callable, Sequence
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

    def __init__(
        self, extra: Sequence[str] = (), port: int | None = None, config: str | None = None
    ) -> None:
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
        self.config: str | None = None
        if config is not None:
            # a config file of its own, so that CONFIG REWRITE (Sentinel sends it with
            # every REPLICAOF) works
            self.config = os.path.join(self.directory, "redis.conf")
            with open(self.config, "w") as file:
                file.write(config)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            *([self.config] if self.config else []),
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


REPLICATION_USER = "replicator"
REPLICATION_PASSWORD = "replication-secret"


class SentinelDeployment:
    """A master, *replicas* replicas and *sentinels* sentinels (``redis-server --sentinel``)
    on free loopback ports, each in its own throwaway directory; the service is
    *service*.

    Replicas authenticate as :data:`REPLICATION_USER` (an ACL user defined on every node),
    so a test can cut every replication link of one master (:meth:`cut_replication`)
    without touching other clients.

    :param extra: redis-server options for every data node (``--appendonly yes`` ...).
    :param down_after_ms: Sentinel's ``down-after-milliseconds``.
    """

    def __init__(
        self,
        extra: Sequence[str] = (),
        replicas: int = 2,
        sentinels: int = 3,
        service: str = "teltonika",
        down_after_ms: int = 1000,
    ) -> None:
        self.service = service
        self.down_after_ms = down_after_ms
        acl = (
            f"user {REPLICATION_USER} on >{REPLICATION_PASSWORD} ~* &* +@all\n"
            f"masteruser {REPLICATION_USER}\nmasterauth {REPLICATION_PASSWORD}\n"
        )
        self.nodes = [RedisServer(extra, config=acl)]
        self.nodes += [
            RedisServer(extra, config=acl + f"replicaof 127.0.0.1 {self.nodes[0].port}\n")
            for _ in range(replicas)
        ]
        self.sentinels = [RedisServer(config="", port=free_port()) for _ in range(sentinels)]
        self.sentinel_processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> SentinelDeployment:
        for node in self.nodes:
            node.start()
        master = self.nodes[0]
        for replica in self.nodes[1:]:

            def linked(r: RedisServer = replica) -> bool:
                return "master_link_status:up" in r.cli("INFO", "replication")

            _wait_for(linked)
        for sentinel in self.sentinels:
            assert sentinel.config is not None
            with open(sentinel.config, "w") as file:
                file.write(
                    f"port {sentinel.port}\nbind 127.0.0.1\ndir {sentinel.directory}\n"
                    f"logfile {os.path.join(sentinel.directory, 'sentinel.log')}\n"
                    f"sentinel monitor {self.service} 127.0.0.1 {master.port} 2\n"
                    f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.service} 10000\n"
                    f"sentinel parallel-syncs {self.service} 2\n"
                )
            process = subprocess.Popen(
                [sentinel.binary, sentinel.config, "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.sentinel_processes.append(process)
            sentinel.process = process
            wait_for_port(sentinel.port)
        others, replicas = str(len(self.sentinels) - 1), str(len(self.nodes) - 1)
        for sentinel in self.sentinels:

            def sees_all(s: RedisServer = sentinel) -> bool:
                state = self._state(s)
                return (
                    state.get("num-other-sentinels") == others
                    and state.get("num-slaves") == replicas
                )

            _wait_for(sees_all, timeout=30)
        return self

    def _state(self, sentinel: RedisServer) -> dict[str, str]:
        lines = sentinel.cli("SENTINEL", "MASTER", self.service).splitlines()
        return dict(zip(lines[::2], lines[1::2], strict=False))

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                out = sentinel.cli("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            except subprocess.SubprocessError:
                continue
            lines = out.split()
            if len(lines) == 2 and lines[1].isdigit():
                return int(lines[1])
        return None

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def master(self) -> RedisServer:
        port = self.master_port()
        assert port is not None, "no sentinel names a master"
        return self.node(port)

    def cut_replication(self, master: RedisServer) -> None:
        """Cut every replication link of *master* and keep it cut: the replication user
        is disabled there and its replica connections killed, so nothing written from
        now on reaches a replica (until *master* is gone)."""
        master.cli("ACL", "SETUSER", REPLICATION_USER, "off")
        master.cli("CLIENT", "KILL", "TYPE", "replica")
        _wait_for(lambda: "connected_slaves:0" in master.cli("INFO", "replication"))

    def cleanup(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.cleanup()


def _wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll a set-up condition (never used for what a test asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (subprocess.SubprocessError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"set-up condition not met after {timeout} s")
        time.sleep(0.05)
