"""The UDP listener (``--udp-port``): one AVL datagram in, one ACK out after the sink.

docs/protocol.rst, section 'UDP channel': a datagram carries the IMEI and one AVL packet;
the reply ``0005 <packet id> 01 <AVL packet id> <count>`` goes to the datagram's source
address, and only after the sink confirmed the records (the rule TCP follows too, written
once in :mod:`teltonika.protocol.publish`). The body is decoded by the codec registry, as
a TCP frame's is, so a codec plugin works here too. Malformed datagrams are dropped and
counted (UDP has no connection to close); a datagram from a device the authority refuses
is dropped too, unacknowledged, and so is one whose device lookup gives no answer.

Every datagram ends in exactly one ``teltonika_udp_datagrams_total`` result. A source
address is whatever the packet claims, so events a datagram can cause (a malformed
datagram, a refused device, a failed lookup, an ACK the kernel will not send) are logged
rate-limited.

Shutdown drains like TCP: :meth:`DeviceDatagramProtocol.stop_reading` stops taking
datagrams while the socket stays open, so the ACKs of datagrams already handed to the
sink still go out (:meth:`DeviceDatagramProtocol.when_idle`).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Final

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from teltonika.interfaces import ICodec, IDeviceAuthority, ISink
from teltonika.logs import RateLimitedLog, truncated_hex
from teltonika.metrics import ServerMetrics
from teltonika.protocol.publish import Publisher
from teltonika.protocol.settings import DEFAULT_SINK_TIMEOUT
from teltonika.units import SECONDS
from teltonika.wire.errors import DecodeError, FieldValueError
from teltonika.wire.login import parse_imei
from teltonika.wire.records import AVLPacket, UDPEnvelope
from teltonika.wire.udp import decode_udp_envelope, udp_ack

if TYPE_CHECKING:
    from teltonika.codecs import CodecRegistry

Address = tuple[str, int]

LOG_INTERVAL: Final = 10 * SECONDS
"""Seconds between two log events of one kind a datagram can cause."""


class DeviceDatagramProtocol(DatagramProtocol):
    """Decode, authorize, publish, then acknowledge each datagram.

    :ivar in_flight: datagrams handed on (to the authority or the sink) and not yet done.
    """

    _log = Logger()
    noisy = False

    def __init__(
        self,
        codecs: CodecRegistry,
        sink: ISink,
        authority: IDeviceAuthority,
        metrics: ServerMetrics,
        clock: IReactorTime,
        *,
        luhn: bool = False,
        sink_timeout: float = DEFAULT_SINK_TIMEOUT,
    ) -> None:
        self.codecs = codecs
        self.sink = sink
        self.authority = authority
        self.metrics = metrics
        self.clock = clock
        self.luhn = luhn
        self.sink_timeout = sink_timeout
        self.publisher = Publisher(sink, metrics, clock, sink_timeout, "udp")
        """Publish, then ACK (shared with TCP)."""
        self.in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._limited = RateLimitedLog(self._log, clock, LOG_INTERVAL)

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        self.metrics.bytes_in.labels("udp").inc(len(datagram))
        try:
            envelope, codec, packet = self._decode(datagram)
        except DecodeError as error:
            self.metrics.datagrams.labels("malformed").inc()
            self.metrics.decode_errors.labels(error.reason).inc()
            self._limited.emit(
                LogLevel.warn,
                "Dropped malformed datagram from {peer}, reason {reason}: {error}. Bytes: {hex} "
                "({suppressed} more left out)",
                peer=_peer(addr),
                reason=error.reason,
                error=str(error),
                hex=truncated_hex(datagram),
                event="rejected_frame",
            )
            return
        self.in_flight += 1
        d: Deferred[bool] = maybeDeferred(self.authority.is_allowed, envelope.imei)
        d.addBoth(self._authorized, envelope, codec, packet, addr)
        d.addBoth(self._done)

    def _decode(self, datagram: bytes) -> tuple[UDPEnvelope, ICodec, AVLPacket]:
        """The envelope, then the body through the codec registry (a codec plugin works
        over UDP as over TCP); only AVL packets travel in datagrams.

        :raise DecodeError: anything wrong with the datagram.
        """
        envelope = decode_udp_envelope(datagram)
        codec, packet = self.codecs.decode_body(datagram, envelope.body_start, len(datagram))
        if not isinstance(packet, AVLPacket):
            raise FieldValueError(
                f"codec {codec.name} carries no AVL records; a datagram takes an AVL codec",
                envelope.body_start,
            )
        parse_imei(envelope.imei.encode("ascii"), luhn=self.luhn)
        return envelope, codec, packet

    def _done(self, _: object) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:  # a bounded wait may have cancelled it
                    waiter.callback(None)

    def _authorized(
        self,
        allowed: bool | Failure,
        envelope: UDPEnvelope,
        codec: ICodec,
        packet: AVLPacket,
        addr: Address,
    ) -> Deferred[None] | None:
        if isinstance(allowed, Failure):
            self.metrics.datagrams.labels("authority_failed").inc()
            self._limited.emit(
                LogLevel.error,
                "Device authority failed for {imei}; dropping its datagram: {error} "
                "({suppressed} more left out)",
                imei=envelope.imei,
                error=allowed.getErrorMessage(),
            )
            return None
        if allowed is not True:
            self.metrics.datagrams.labels("rejected").inc()
            self._limited.emit(
                LogLevel.info,
                "Datagram from {imei} refused by the device authority ({suppressed} more left out)",
                imei=envelope.imei,
            )
            return None
        return self.publisher.publish(
            envelope.imei,
            codec.name,
            packet.records,
            self.clock.seconds(),
            udp_ack(envelope.packet_id, envelope.avl_packet_id, len(packet.records)),
            partial(self._send_ack, envelope.imei, addr),
            partial(self._store_failed, envelope.imei),
        )

    def _send_ack(self, imei: str, addr: Address, ack: bytes) -> bool:
        """Publisher's ``send_ack``: answer the datagram's source address."""
        try:
            if self.transport is None:
                raise OSError("the UDP port is closed")
            self.transport.write(ack, addr)
        except (OSError, MessageLengthError) as error:
            # EAGAIN/ENOBUFS (a full socket buffer), EACCES (a broadcast source address a
            # spoofed datagram claimed) ...: the records are stored, the device resends.
            self.metrics.datagrams.labels("ack_failed").inc()
            self._limited.emit(
                LogLevel.warn,
                "Could not send the ACK to {peer} ({imei}): {error} ({suppressed} more left out)",
                peer=_peer(addr),
                imei=imei,
                error=str(error),
            )
            return False
        self.metrics.bytes_out.labels("udp").inc(len(ack))
        self.metrics.datagrams.labels("acked").inc()
        return True

    def _store_failed(self, imei: str, failure: Failure, count: int) -> None:
        """Publisher's ``failed``: no ACK; the device sends the datagram again."""
        self.metrics.datagrams.labels("sink_failed").inc()
        self._limited.emit(
            LogLevel.error,
            "Sink {sink} did not store a datagram from {imei}; no ACK: {error} "
            "({suppressed} more left out)",
            sink=self.sink.name,
            imei=imei,
            error=failure.getErrorMessage(),
        )

    # -- shutdown support --------------------------------------------------------------

    def stop_reading(self) -> None:
        """Take no more datagrams; the socket stays open for the ACKs still to come."""
        if self.transport is not None:
            # The UDP port is a push producer (a FileDescriptor): pausing it stops reading.
            IPushProducer(self.transport).pauseProducing()

    def when_idle(self) -> Deferred[None]:
        """Fire when no datagram is waiting for the authority or the sink."""
        if not self.in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d


def _peer(addr: object) -> str:
    """``host:port`` for an IPv4 source address; any other shape (an IPv6 socket's
    4-tuple, whatever Twisted's ``tuple[str, int]`` annotation says) as it prints."""
    match addr:
        case (host, port):
            return f"{host}:{port}"
        case _:
            return str(addr)
