"""``teltonika simulate --bind``: devices connect from chosen loopback addresses
(``teltonika/simulate/source.py``), each simulator process from its own share."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from teltonika.cli import main
from teltonika.cli.simulate import _child_argv
from teltonika.simulate.source import (
    IP_BIND_ADDRESS_NO_PORT,
    _SourceClient,
    parse_sources,
)
from tests.helpers import simulate

from .fakeserver import FakeServerFactory, FakeServerProtocol

reactor: Any = _reactor


def test_parse_sources() -> None:
    assert parse_sources(None) == []
    assert parse_sources("127.0.0.2, 127.0.0.3,") == ["127.0.0.2", "127.0.0.3"]
    assert parse_sources("::1") == ["::1"]
    with pytest.raises(ValueError, match="'localhost' is not an IP address"):
        parse_sources("127.0.0.2,localhost")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bind", "nowhere"], "is not an IP address"),
        (["--bind", "127.0.0.2", "--udp"], "--bind applies to TCP devices only"),
    ],
)
def test_bind_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_children_get_their_own_share_of_the_addresses() -> None:
    parser = argparse.ArgumentParser()
    from teltonika.cli.simulate import add_arguments

    add_arguments(parser)
    args = parser.parse_args(["--processes", "3", "--devices", "9", "--duration", "1"])
    args.sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]

    def bind_of(index: int) -> str:
        argv = _child_argv(args, index, 3, 0, "ledger")
        return argv[argv.index("--bind") + 1]

    assert [bind_of(i) for i in range(3)] == ["127.0.0.2,127.0.0.5", "127.0.0.3", "127.0.0.4"]
    args.sources = ["127.0.0.2"]
    assert [bind_of(i) for i in range(3)] == ["127.0.0.2"] * 3


def test_the_port_is_chosen_at_connect() -> None:
    """IP_BIND_ADDRESS_NO_PORT: binding the source address reserves no port host-wide."""
    client = _SourceClient.__new__(_SourceClient)
    client.addressFamily = socket.AF_INET
    client.socketType = socket.SOCK_STREAM
    sock = client.createInternetSocket()
    try:
        assert sock.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1
    finally:
        sock.close()


class _PeerFactory(FakeServerFactory):
    def __init__(self) -> None:
        super().__init__()
        self.peers: list[str] = []

    def buildProtocol(self, addr: Any) -> FakeServerProtocol:
        self.peers.append(addr.host)
        return super().buildProtocol(addr)


@pytest_twisted.ensureDeferred
async def test_fleet_connects_from_the_given_addresses(tmp_path: Path) -> None:
    """Two simulator processes, four devices, two addresses: every connection comes from
    one of them, both are used, and every record is ACKed."""
    factory = _PeerFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        code, out, err = await simulate(
            "--port", str(port.getHost().port), "--devices", "4", "--frames", "2",
            "--interval", "0.05", "--json", "--progress", "0", "--processes", "2",
            "--bind", "127.0.0.2,127.0.0.3",
        )  # fmt: skip
    finally:
        await port.stopListening()
    assert code == 0, err
    assert orjson.loads(out)["records_acked"] == 8
    assert sorted(set(factory.peers)) == ["127.0.0.2", "127.0.0.3"]
    assert sorted(factory.peers).count("127.0.0.2") == 2
