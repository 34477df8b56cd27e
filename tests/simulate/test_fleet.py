"""The fleet runner over real loopback TCP/UDP against the tiny in-test fake server."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import DatagramProtocol

from teltonika.codecs import load_codecs
from teltonika.simulate.device import DeviceConfig
from teltonika.simulate.fleet import Fleet, FleetSettings, imei_for
from teltonika.wire import CODEC_8, CODEC_16, DecodeError, decode_udp, udp_ack

from .fakeserver import FakeServerFactory

reactor: Any = _reactor
CODECS = load_codecs()


def listen(factory: FakeServerFactory) -> Any:
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_fleet_every_record_acked_matches_what_the_server_received() -> None:
    """20 devices x 3 frames: the ledger holds exactly the records the server received."""
    factory = FakeServerFactory()
    port = listen(factory)
    try:
        config = DeviceConfig(
            codec_id=CODEC_16, records_per_frame=3, interval_s=0.05, ack_timeout_s=5, max_frames=3
        )
        fleet = Fleet(reactor, config, "127.0.0.1", port.getHost().port, 20, 1000, seed=3)
        ledger = await fleet.run(None, drain_s=5.0)
    finally:
        await port.stopListening()
    assert ledger.counts["records_acked"] == 20 * 3 * 3
    assert ledger.broken_promises == 0
    assert not ledger.never_acked
    received = {(imei, r.timestamp_ms) for imei, packet in factory.frames for r in packet.records}
    acked = {(imei, stamp) for imei, stamps in ledger.acked.items() for stamp in stamps}
    assert acked == received
    assert sorted(set(factory.logins)) == [imei_for(1000, i) for i in range(20)]
    summary = ledger.summary()
    for key in (
        "devices",
        "frames_sent",
        "frames_acked",
        "records_sent",
        "records_acked",
        "resent",
        "rejected",
        "ack_latency_ms_p50",
        "ack_latency_ms_p99",
        "ack_latency_ms_max",
    ):
        assert key in summary
    assert summary["devices"] == 20
    assert summary["frames_acked"] == 60


@pytest_twisted.ensureDeferred
async def test_fleet_catches_a_server_that_acks_the_wrong_count() -> None:
    """A server answering N+1 is caught as a broken promise; the records are never ACKed."""
    factory = FakeServerFactory()
    factory.ack_count = lambda n: n + 1
    port = listen(factory)
    try:
        config = DeviceConfig(
            codec_id=CODEC_8,
            records_per_frame=2,
            interval_s=0.05,
            max_frames=1,
            backoff_initial_s=0.05,
        )
        fleet = Fleet(reactor, config, "127.0.0.1", port.getHost().port, 3, 2000, seed=1)
        ledger = await fleet.run(None, drain_s=0.3)
    finally:
        await port.stopListening()
    assert ledger.counts["wrong_ack"] >= 3
    assert ledger.counts["records_acked"] == 0
    assert sum(len(v) for v in ledger.never_acked.values()) == 6


@pytest_twisted.ensureDeferred
async def test_fleet_corrupt_frames_are_refused_by_a_crc_checking_server() -> None:
    """Against a server that checks CRCs, corrupt frames are refused and nothing is lost."""
    factory = FakeServerFactory()
    factory.close_on_bad = True
    port = listen(factory)
    try:
        config = DeviceConfig(
            records_per_frame=2,
            interval_s=0.05,
            max_frames=4,
            corrupt_rate=0.5,
            backoff_initial_s=0.05,
        )
        fleet = Fleet(reactor, config, "127.0.0.1", port.getHost().port, 10, 3000, seed=5)
        ledger = await fleet.run(None, drain_s=5.0)
    finally:
        await port.stopListening()
    assert ledger.counts["corrupt_sent"] > 0
    assert ledger.counts["corrupt_rejected"] == ledger.counts["corrupt_sent"]
    assert ledger.counts["records_acked"] == 10 * 4 * 2
    assert ledger.broken_promises == 0


class FakeUDPServer(DatagramProtocol):
    """ACKs every datagram; drops the first one from each device (forcing a resend)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.records: list[tuple[str, int]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        packet = decode_udp(datagram)
        if packet.imei not in self.seen:
            self.seen.add(packet.imei)
            return
        self.records.extend((packet.imei, r.timestamp_ms) for r in packet.packet.records)
        assert self.transport is not None  # listening
        self.transport.write(
            udp_ack(packet.packet_id, packet.avl_packet_id, len(packet.packet.records)), addr
        )


@pytest_twisted.ensureDeferred
async def test_udp_fleet_resends_after_a_lost_datagram() -> None:
    """UDP devices resend an unanswered datagram after the ACK timeout and end fully ACKed."""
    server = FakeUDPServer()
    port = reactor.listenUDP(0, server, interface="127.0.0.1")
    try:
        config = DeviceConfig(records_per_frame=2, interval_s=0.05, max_frames=2, ack_timeout_s=0.2)
        fleet = Fleet(
            reactor,
            config,
            "127.0.0.1",
            port.getHost().port,
            5,
            4000,
            seed=2,
            settings=FleetSettings(udp=True),
        )
        ledger = await fleet.run(None, drain_s=5.0)
    finally:
        await port.stopListening()
    assert ledger.counts["records_acked"] == 5 * 2 * 2
    assert ledger.counts["resent"] >= 5
    assert ledger.broken_promises == 0
    acked = {(imei, stamp) for imei, stamps in ledger.acked.items() for stamp in stamps}
    assert acked <= set(server.records)


class CheckingUDPServer(DatagramProtocol):
    """ACKs valid datagrams; ignores malformed ones (as a correct server does)."""

    def __init__(self) -> None:
        self.bad = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            packet = decode_udp(datagram)
        except DecodeError:
            self.bad += 1
            return
        assert self.transport is not None  # listening
        self.transport.write(
            udp_ack(packet.packet_id, packet.avl_packet_id, len(packet.packet.records)), addr
        )


@pytest_twisted.ensureDeferred
async def test_udp_corrupt_datagrams_are_not_acked_then_sent_intact() -> None:
    """A UDP datagram sent corrupt (N1 != N2) must go unanswered; the intact one follows."""
    server = CheckingUDPServer()
    port = reactor.listenUDP(0, server, interface="127.0.0.1")
    try:
        config = DeviceConfig(
            records_per_frame=2, interval_s=0.05, max_frames=4, ack_timeout_s=0.1,
            corrupt_rate=0.5,
        )  # fmt: skip
        fleet = Fleet(
            reactor,
            config,
            "127.0.0.1",
            port.getHost().port,
            5,
            5000,
            seed=4,
            settings=FleetSettings(udp=True),
        )
        ledger = await fleet.run(None, drain_s=5.0)
    finally:
        await port.stopListening()
    assert ledger.counts["corrupt_sent"] == server.bad > 0
    assert ledger.counts["corrupt_rejected"] == ledger.counts["corrupt_sent"]
    assert ledger.counts["resent"] == 0
    assert ledger.counts["records_acked"] == 5 * 4 * 2
    assert ledger.broken_promises == 0
