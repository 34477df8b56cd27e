"""``reuseport:PORT[:interface=ADDR][:backlog=N]``: a TCP server endpoint whose listening
socket has ``SO_REUSEPORT``, so several ``twistd teltonika`` processes on one host share
the device port and the kernel spreads new connections over them (one core each).

Twisted's ``tcp:`` endpoint string has no option for ``SO_REUSEPORT`` (it sets only
``SO_REUSEADDR``), so this module creates the socket itself, binds it, listens, and hands
it to ``IReactorSocket.adoptStreamPort``, which every Twisted this package supports has.
It composes with other endpoint strings like ``tcp:`` does (``haproxy:reuseport:5027``
behind a balancer).
The Twisted plugin that registers the prefix is ``twisted/plugins/teltonika_reuseport.py``.

Every process sharing the port needs its own ``--instance-id`` and ``--metrics`` port
(README.rst, "Scale-out: all cores, a balancer"). The kernel only lets processes of the
same user join a ``SO_REUSEPORT`` group, and a port held by a plain ``tcp:`` listener
cannot be joined: both fail as "Address already in use".
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, execute
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

PREFIX = "reuseport"
DEFAULT_BACKLOG = 1024
"""Larger than Twisted's 50: after a restart every device of a process reconnects at once."""


def has_reuseport() -> bool:
    """Whether this platform has ``SO_REUSEPORT`` (Linux, the BSDs, macOS)."""
    return hasattr(socket, "SO_REUSEPORT")


def reuseport_socket(port: int, interface: str, backlog: int) -> socket.socket:
    """A non-blocking listening TCP socket with ``SO_REUSEADDR`` and ``SO_REUSEPORT``.

    An IPv6 *interface* (``::1``, ``::``) makes an ``AF_INET6`` socket; the empty string
    means every IPv4 address, as with ``tcp:``.

    :raise CannotListenError: the address is taken (by a listener without
        ``SO_REUSEPORT`` or of another user), unknown here, or the platform lacks
        ``SO_REUSEPORT``.
    """
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if not has_reuseport():
            raise OSError("SO_REUSEPORT is not available on this platform")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            address: tuple[Any, ...] = socket.getaddrinfo(
                interface, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
            )[0][4]
        else:
            address = (interface, port)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
        sock.set_inheritable(False)
    except OSError as error:
        sock.close()
        raise CannotListenError(interface, port, error) from None
    return sock


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """Listen on *port* with ``SO_REUSEPORT`` (see the module docstring).

    :param reactor: provides ``IReactorSocket`` (every POSIX reactor does).
    """

    def __init__(
        self, reactor: Any, port: int, interface: str = "", backlog: int = DEFAULT_BACKLOG
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803
        return execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        sock = reuseport_socket(self.port, self.interface, self.backlog)
        try:
            port: IListeningPort = self.reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
        finally:
            # adoptStreamPort duplicates the descriptor; ours is closed at once.
            sock.close()
        return port

    def __repr__(self) -> str:
        return f"<ReusePortEndpoint {self.interface or '*'}:{self.port}>"


def _parse_int(name: str, value: str, low: int, high: int) -> int:
    if not value.isdigit() or not low <= int(value) <= high:
        raise ValueError(f"reuseport: {name} must be a whole number {low}..{high}, not {value!r}")
    return int(value)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ReusePortParser:
    """The endpoint-string parser for ``reuseport:PORT[:interface=ADDR][:backlog=N]``.

    Parses without touching the network (``serverFromString`` is also used to check
    ``--port`` before anything starts)."""

    prefix = PREFIX

    def parseStreamServer(  # noqa: N802 (Twisted name)
        self,
        reactor: Any,
        *args: object,
        **kwargs: object,
    ) -> ReusePortEndpoint:
        port_text = kwargs.pop("port", None)
        if args:
            if port_text is not None or len(args) > 1:
                raise ValueError(f"reuseport: unexpected arguments {args!r}")
            port_text = args[0]
        if port_text is None:
            raise ValueError("reuseport: a port is required (reuseport:5027)")
        interface = str(kwargs.pop("interface", ""))
        backlog_text = kwargs.pop("backlog", str(DEFAULT_BACKLOG))
        if kwargs:
            raise ValueError(f"reuseport: unknown parameters {sorted(kwargs)}")
        port = _parse_int("the port", str(port_text), 0, 65535)
        backlog = _parse_int("backlog", str(backlog_text), 1, 65535)
        if interface and not (isIPv6Address(interface) or _is_ipv4(interface)):
            raise ValueError(f"reuseport: interface must be an IP address, not {interface!r}")
        return ReusePortEndpoint(reactor, port, interface, backlog)


def _is_ipv4(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return False
    return True


parser = ReusePortParser()
"""The plugin instance (``twisted/plugins/teltonika_reuseport.py`` exposes it)."""
