"""Refuse to start a second process with the same ``--instance-id`` on one Redis, on one host.

With ``--redis`` the instance id is a name in Redis: the registry maps IMEIs to it,
``commands:outbound:{id}`` is consumed by it, ``instance:heartbeat:{id}`` says it is alive.
Two processes under one id (easy to do with ``reuseport:``, where several share a port,
and the default id is the host name) would steal each other's commands and registry
entries. On one host that is detectable without any state that could go stale: each
process binds a Linux *abstract* Unix socket named after (Redis target, instance id). The
kernel refuses the second bind and frees the name when the process dies, however it
dies. Abstract names are per network namespace, so containers do not see each other's
(each container has its own host name, the default id, anyway). Elsewhere than Linux the
check is skipped.
"""

from __future__ import annotations

import hashlib
import socket
import sys
from typing import Final
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.logger import Logger

NAME_PREFIX: Final = b"\0teltonika-instance-"


def redis_target(url: str) -> str:
    """The Redis deployment a URL names, without credentials: scheme, hosts and path."""
    try:
        parts = urlsplit(url)
    except ValueError:  # --redis was validated before; never fail (or leak a password) here
        return url.rpartition("@")[2]
    hosts = parts.netloc.rpartition("@")[2].lower()
    return f"{parts.scheme.lower()}://{hosts}{parts.path or '/0'}"


def lock_name(instance_id: str, redis_url: str) -> bytes:
    """The abstract socket name for *instance_id* on the Redis *redis_url* names."""
    digest = hashlib.sha256(f"{redis_target(redis_url)}\n{instance_id}".encode()).hexdigest()
    return NAME_PREFIX + digest[:40].encode()


class InstanceTaken(Exception):
    """Another process on this host holds the same instance id on the same Redis."""


class InstanceLock:
    """Holds the abstract socket while the process runs (released by the kernel at exit)."""

    def __init__(self, instance_id: str, redis_url: str) -> None:
        self.instance_id = instance_id
        self.target = redis_target(redis_url)
        self.name = lock_name(instance_id, redis_url)
        self._socket: socket.socket | None = None

    def acquire(self) -> bool:
        """Take the name; False when the platform has no abstract sockets (not checked).

        :raise InstanceTaken: another live process holds it.
        """
        if not sys.platform.startswith("linux"):
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.name)
        except OSError as error:
            sock.close()
            raise InstanceTaken(
                f"another process on this host already runs --instance-id "
                f"{self.instance_id!r} against {self.target} ({error.strerror}): give "
                "every process its own --instance-id (and its own --metrics port)"
            ) from None
        sock.set_inheritable(False)
        self._socket = sock
        return True

    def release(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class InstanceLockService(Service):
    """Takes the :class:`InstanceLock` before anything listens (first child of the root);
    :meth:`release` frees it.

    A taken id makes twistd exit with status 1 and one critical line, like a taken port.
    """

    _log = Logger()

    def __init__(self, lock: InstanceLock) -> None:
        self.lock = lock
        self._taken = False

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._take()

    def startService(self) -> None:
        # ``twist`` does not call privilegedStartService: take it here then.
        self._take()
        Service.startService(self)

    def _take(self) -> None:
        if self._taken:
            return
        try:
            self.lock.acquire()
        except InstanceTaken as error:
            self._log.critical("Refusing to start: {error}", error=str(error))
            raise SystemExit(1) from None
        self._taken = True

    def release(self) -> None:
        """Free the name: the ingestion service's last shutdown step, once the devices
        are gone (``MultiService`` stops its children all at once, so ``stopService``
        here would free it while this process still holds connections)."""
        self.lock.release()
        self._taken = False
