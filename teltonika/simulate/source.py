"""TCP connections from a chosen local address without using up the host's ephemeral ports.

One source address can hold at most one connection per ephemeral port to one server
address (about 28,000 with Linux's default ``ip_local_port_range``). A fleet larger than
that must connect from several addresses (``--bind 127.0.0.2,127.0.0.3,...``: all of
127.0.0.0/8 is loopback on Linux). A plain ``bind((address, 0))`` would reserve each port
for the socket's lifetime in the whole host's port table, so 100,000 simulated devices
would leave no ports for anyone else's outgoing connections. With
``IP_BIND_ADDRESS_NO_PORT`` (Linux 4.2+) the port is chosen at ``connect`` for the full
4-tuple instead, and stays free for connections to other destinations.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any, Final

from twisted.internet import tcp
from twisted.internet.interfaces import IConnector
from twisted.internet.protocol import ClientFactory

IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class _SourceClient(tcp.Client):
    """A Twisted TCP client whose socket defers the port choice to ``connect``."""

    def createInternetSocket(self) -> socket.socket:  # noqa: N802 (Twisted name)
        sock: socket.socket = super().createInternetSocket()  # type: ignore[no-untyped-call]
        # Not Linux: bind((address, 0)) reserves a port, which still works.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        return sock


class _SourceConnector(tcp.Connector):
    def _makeTransport(self) -> tcp.Client:  # noqa: N802 (Twisted name)
        return _SourceClient(  # type: ignore[no-untyped-call]
            self.host, self.port, self.bindAddress, self, self.reactor
        )


def connect_from(
    reactor: Any,
    source: str | None,
    host: str,
    port: int,
    factory: ClientFactory,
    timeout: float,
) -> IConnector:
    """``reactor.connectTCP(host, port, factory)``, from local address *source* when given."""
    if source is None:
        connector: IConnector = reactor.connectTCP(host, port, factory, timeout=timeout)
        return connector
    made = _SourceConnector(host, port, factory, timeout, (source, 0), reactor)
    made.connect()
    return made


def parse_sources(text: str | None) -> list[str]:
    """``--bind A,B,...`` -> the addresses (each an IPv4 or IPv6 literal).

    :raise ValueError: an entry is not an IP address.
    """
    if not text:
        return []
    sources = [part.strip() for part in text.split(",") if part.strip()]
    for source in sources:
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.inet_pton(family, source)
                break
            except OSError:
                continue
        else:
            raise ValueError(f"--bind: {source!r} is not an IP address")
    return sources
