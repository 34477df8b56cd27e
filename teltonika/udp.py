"""The UDP listener (``--udp-port``): one AVL datagram in, one ACK out after the sink.

docs/protocol.rst, section 'UDP channel': a datagram carries the IMEI and one AVL packet;
the reply ``0005 <packet id> 01 <AVL packet id> <count>`` goes to the datagram's source
address, and only after the sink confirmed the records. Malformed datagrams are dropped and
counted (UDP has no connection to close); a datagram from a device the authority refuses
is dropped too, unacknowledged.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika.interfaces import IDeviceAuthority, ISink
from teltonika.metrics import ServerMetrics
from teltonika.protocol.server import DEFAULT_SINK_TIMEOUT, truncated_hex
from teltonika.wire.errors import DecodeError, ImeiError
from teltonika.wire.login import parse_imei
from teltonika.wire.records import CODEC_NAMES, UDPPacket
from teltonika.wire.udp import decode_udp, udp_ack

Address = tuple[str, int]


class DeviceDatagramProtocol(DatagramProtocol):
    """Decode, authorize, publish, then acknowledge each datagram."""

    _log = Logger()
    noisy = False

    def __init__(
        self,
        sink: ISink,
        authority: IDeviceAuthority,
        metrics: ServerMetrics,
        clock: IReactorTime,
        *,
        luhn: bool = False,
        sink_timeout: float = DEFAULT_SINK_TIMEOUT,
    ) -> None:
        self.sink = sink
        self.authority = authority
        self.metrics = metrics
        self.clock = clock
        self.luhn = luhn
        self.sink_timeout = sink_timeout

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.metrics.bytes_in.labels("udp").inc(len(datagram))
        try:
            packet = decode_udp(datagram)
            parse_imei(packet.imei.encode("ascii"), luhn=self.luhn)
        except (DecodeError, ImeiError) as error:
            self.metrics.datagrams.labels("malformed").inc()
            self.metrics.decode_errors.labels(error.reason).inc()
            self._log.warn(
                "Dropped malformed datagram from {peer}, reason {reason}: {error}. Bytes: {hex}",
                peer=_peer(addr),
                reason=error.reason,
                error=str(error),
                hex=truncated_hex(datagram),
                event="rejected_frame",
            )
            return
        d: Deferred[bool] = maybeDeferred(self.authority.is_allowed, packet.imei)
        d.addBoth(self._authorized, packet, addr)

    def _authorized(self, allowed: bool | Failure, packet: UDPPacket, addr: Address) -> Any:
        if isinstance(allowed, Failure):
            self._log.error(
                "Device authority failed for {imei}; dropping its datagram: {error}",
                imei=packet.imei,
                error=allowed.getErrorMessage(),
            )
        if allowed is not True:
            self.metrics.datagrams.labels("rejected").inc()
            self._log.info("Datagram from {imei} refused by the device authority", imei=packet.imei)
            return None
        avl = packet.packet
        codec = CODEC_NAMES.get(avl.codec_id, str(avl.codec_id))
        count = len(avl.records)
        self.metrics.frames.labels(codec).inc()
        self.metrics.records.labels(codec).inc(count)
        started = self.clock.seconds()
        d: Deferred[None] = maybeDeferred(
            self.sink.publish, packet.imei, codec, avl.records, int(started * 1000)
        )
        d.addTimeout(self.sink_timeout, self.clock)
        return d.addCallbacks(
            self._stored,
            self._failed,
            callbackArgs=(packet, addr, started),
            errbackArgs=(packet,),
        )

    def _stored(self, _: object, packet: UDPPacket, addr: Address, started: float) -> None:
        self.metrics.sink_latency.labels(self.sink.name).observe(self.clock.seconds() - started)
        ack = udp_ack(packet.packet_id, packet.avl_packet_id, len(packet.packet.records))
        if self.transport is not None:
            self.transport.write(ack, addr)
            self.metrics.bytes_out.labels("udp").inc(len(ack))
            self.metrics.acks.labels("udp").inc()
            self.metrics.acked_records.inc(len(packet.packet.records))
            self.metrics.datagrams.labels("acked").inc()

    def _failed(self, failure: Failure, packet: UDPPacket) -> None:
        self.metrics.datagrams.labels("sink_failed").inc()
        self.metrics.sink_failures.labels(self.sink.name).inc()
        self._log.error(
            "Sink {sink} did not store a datagram from {imei}; no ACK: {error}",
            sink=self.sink.name,
            imei=packet.imei,
            error=failure.getErrorMessage(),
        )


def _peer(addr: Any) -> str:
    try:
        host, port = addr
    except (TypeError, ValueError):
        return str(addr)
    return f"{host}:{port}"
