"""The ``reuseport:`` endpoint (``teltonika/reuseport.py``) and its plugin: parsing, real
``SO_REUSEPORT`` sockets on loopback, and the hand-over to ``adoptStreamPort``.

Processes sharing one port end to end: ``tests/deploy/test_scale_out.py``."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python import usage

from teltonika.options import normalize_endpoint
from teltonika.reuseport import (
    DEFAULT_BACKLOG,
    ReusePortEndpoint,
    ReusePortParser,
    reuseport_socket,
)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def test_plugin_parses_port_interface_and_backlog() -> None:
    endpoint = serverFromString(MemoryReactor(), "reuseport:5027:interface=127.0.0.1:backlog=10")
    assert isinstance(endpoint, ReusePortEndpoint)
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (5027, "127.0.0.1", 10)
    default = serverFromString(MemoryReactor(), "reuseport:port=5027")
    assert isinstance(default, ReusePortEndpoint)
    assert (default.port, default.interface, default.backlog) == (5027, "", DEFAULT_BACKLOG)


def test_plugin_parses_an_escaped_ipv6_interface() -> None:
    endpoint = serverFromString(MemoryReactor(), "reuseport:5027:interface=\\:\\:1")
    assert isinstance(endpoint, ReusePortEndpoint)
    assert endpoint.interface == "::1"


def test_composes_with_the_proxy_protocol_wrapper() -> None:
    """``haproxy:reuseport:PORT``: Twisted's PROXY wrapper around our endpoint."""
    endpoint = serverFromString(MemoryReactor(), "haproxy:reuseport:5027:interface=127.0.0.1")
    wrapped = endpoint._wrappedEndpoint
    assert isinstance(wrapped, ReusePortEndpoint)
    assert wrapped.port == 5027


@pytest.mark.parametrize(
    "text",
    [
        "reuseport:",
        "reuseport:http",
        "reuseport:70000",
        "reuseport:5027:backlog=0",
        "reuseport:5027:backlog=lots",
        "reuseport:5027:interface=localhost",
        "reuseport:5027:reuse=1",
        "reuseport:5027:5028",
    ],
)
def test_bad_descriptions_are_refused_with_a_sentence(text: str) -> None:
    with pytest.raises(ValueError, match="reuseport"):
        serverFromString(MemoryReactor(), text)


@given(st.text(max_size=12), st.text(max_size=12))
def test_parser_either_builds_an_endpoint_or_raises_value_error(port: str, backlog: str) -> None:
    """Any text for the port and backlog: an endpoint with sane numbers, or ValueError."""
    try:
        endpoint = ReusePortParser().parseStreamServer(None, port, backlog=backlog)
    except ValueError:
        return
    assert 0 <= endpoint.port <= 65535
    assert 1 <= endpoint.backlog <= 65535


def test_port_option_accepts_reuseport_descriptions() -> None:
    assert normalize_endpoint("reuseport:5027", "--port") == "reuseport:5027"
    assert normalize_endpoint("haproxy:reuseport:5027", "--port") == "haproxy:reuseport:5027"
    with pytest.raises(usage.UsageError, match="--port"):
        normalize_endpoint("reuseport:many", "--port")


def test_two_sockets_share_one_port(sockets: list[socket.socket]) -> None:
    first = reuseport_socket(0, "127.0.0.1", 128)
    sockets.append(first)
    port = first.getsockname()[1]
    second = reuseport_socket(port, "127.0.0.1", 128)
    sockets.append(second)
    assert second.getsockname() == ("127.0.0.1", port)
    assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    assert not first.getblocking()
    # Both accept: connect until each has taken one (the kernel hashes the 4-tuple).
    clients, accepted = [], {0: 0, 1: 0}
    try:
        for _ in range(32):
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(client)
        for index, listener in enumerate((first, second)):
            listener.settimeout(0)
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.close()
                accepted[index] += 1
    finally:
        for client in clients:
            client.close()
    assert accepted[0] > 0 and accepted[1] > 0
    assert accepted[0] + accepted[1] == 32


def test_ipv6_interface(sockets: list[socket.socket]) -> None:
    first = reuseport_socket(0, "::1", 16)
    sockets.append(first)
    assert first.family == socket.AF_INET6
    sockets.append(reuseport_socket(first.getsockname()[1], "::1", 16))


def test_a_port_held_without_reuseport_cannot_be_joined(sockets: list[socket.socket]) -> None:
    """A plain ``tcp:`` listener (no SO_REUSEPORT) keeps the port to itself; the error is
    Twisted's CannotListenError, which the server reports as a taken port."""
    plain = socket.socket()
    sockets.append(plain)
    plain.bind(("127.0.0.1", 0))
    plain.listen(1)
    with pytest.raises(CannotListenError, match="Address already in use"):
        reuseport_socket(plain.getsockname()[1], "127.0.0.1", 16)


def test_listen_hands_the_socket_to_adopt_stream_port() -> None:
    reactor = MemoryReactor()
    factory = Factory.forProtocol(Protocol)
    endpoint = ReusePortEndpoint(reactor, 0, "127.0.0.1", 8)
    result = endpoint.listen(factory)
    ports: list[object] = []
    result.addCallback(ports.append)
    assert len(ports) == 1
    [(fileno, family, adopted)] = reactor.adoptedPorts
    assert (family, adopted) == (socket.AF_INET, factory)
    # Our descriptor is closed once the reactor has its own copy.
    with pytest.raises(OSError):
        socket.socket(fileno=fileno).close()


def test_listen_failure_is_a_failed_deferred(sockets: list[socket.socket]) -> None:
    plain = socket.socket()
    sockets.append(plain)
    plain.bind(("127.0.0.1", 0))
    plain.listen(1)
    endpoint = ReusePortEndpoint(MemoryReactor(), plain.getsockname()[1], "127.0.0.1")
    failures: list[object] = []
    endpoint.listen(Factory.forProtocol(Protocol)).addErrback(failures.append)
    assert len(failures) == 1
    assert failures[0].check(CannotListenError)  # type: ignore[attr-defined]


def test_help_says_each_process_needs_its_own_id_and_metrics_port() -> None:
    from teltonika.tap import Options

    text = " ".join(str(Options()).split())
    assert "reuseport:5027 lets several processes share the port" in text
    assert "each with its own --instance-id and --metrics port" in text
    assert "Unique per process" in text
