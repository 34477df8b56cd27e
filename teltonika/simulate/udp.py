"""One simulated tracker on the UDP channel (docs/protocol.rst, section 'UDP channel').

Each datagram carries the IMEI, a packet id and an AVL packet id; the server answers
``0005 <packet id> 01 <AVL packet id> <accepted>``. As on TCP, records stay buffered until
a reply echoes the AVL packet id with the full count; without one the same datagram goes
again after the ACK timeout (with backoff). There is no CRC in UDP, so a datagram sent
corrupt on purpose has a wrong "Number of Data 2": a server must not ACK it.
"""

from __future__ import annotations

import random
from collections import deque

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol

from teltonika.simulate.device import DeviceConfig
from teltonika.simulate.ledger import Ledger
from teltonika.simulate.track import Track
from teltonika.wire import AVLRecord, encode_udp


class UDPDevice:
    """A tracker that reports over UDP.

    :ivar send: writes one datagram to the server (the Protocol's connected transport),
        from :meth:`start` until :meth:`stop`; None otherwise.
    """

    def __init__(
        self,
        imei: str,
        config: DeviceConfig,
        clock: IReactorTime,
        rng: random.Random,
        ledger: Ledger,
    ) -> None:
        self.imei = imei
        self.config = config
        self.clock = clock
        self.rng = rng
        self.ledger = ledger
        self.track = Track(rng, config.codec_id)
        self.buffer: deque[AVLRecord] = deque()
        self.send: DatagramSender | None = None
        self.generating = False
        self.frames_logged = 0
        self._packet_id = rng.randrange(0, 0x10000)
        self._avl_id = rng.randrange(0, 0x100)
        self._inflight: tuple[list[AVLRecord], bytes, bool, float, int] | None = None
        self._tick_call: IDelayedCall | None = None
        self._retry_call: IDelayedCall | None = None
        self._backoff = config.ack_timeout_s
        self._last_tick = clock.seconds()

    @property
    def drained(self) -> bool:
        return not self.buffer and self._inflight is None

    def start(self, send: DatagramSender) -> None:
        self.send = send
        self.generating = True
        self.ledger.online += 1
        self._last_tick = self.clock.seconds()
        self._tick_call = self.clock.callLater(
            self.rng.uniform(0, self.config.interval_s), self._tick
        )

    def stop_generating(self) -> None:
        self.generating = False
        if self._tick_call is not None and self._tick_call.active():
            self._tick_call.cancel()
        self._tick_call = None

    def stop(self) -> None:
        self.stop_generating()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self.send is not None:
            self.ledger.online -= 1
            self.send = None
        self.ledger.add_never_acked(self.imei, self.buffer)

    def _tick(self) -> None:
        self._tick_call = None
        now = self.clock.seconds()
        count = self.config.records_per_frame
        self.buffer.extend(self.track.log(now, now - self._last_tick, count))
        self._last_tick = now
        self.frames_logged += 1
        if self.config.max_frames is not None and self.frames_logged >= self.config.max_frames:
            self.generating = False
        if self.generating and self.config.interval_s > 0:
            self._tick_call = self.clock.callLater(
                self.config.interval_s * self.rng.uniform(0.9, 1.1), self._tick
            )
        self._maybe_send()

    def _maybe_send(self) -> None:
        if self._inflight is not None or not self.buffer or self.send is None:
            return
        limit = self.config.records_per_frame
        if len(self.buffer) > 2 * limit:
            limit = min(255, max(limit, self.config.backlog_records))
        records = [self.buffer[i] for i in range(min(limit, len(self.buffer)))]
        self._packet_id = (self._packet_id + 1) & 0xFFFF
        self._avl_id = (self._avl_id + 1) & 0xFF
        datagram = encode_udp(
            self.imei, self.config.codec_id, records, self._packet_id, self._avl_id
        )
        corrupt = self.config.corrupt_rate > 0 and self.rng.random() < self.config.corrupt_rate
        self._inflight = (records, datagram, corrupt, 0.0, 0)
        self._transmit()

    def _transmit(self, resend: bool = True) -> None:
        """Send the datagram in flight; *resend* False: the intact copy after a corrupt one."""
        assert self._inflight is not None and self.send is not None
        records, datagram, corrupt, _, attempts = self._inflight
        if attempts and not corrupt and resend:
            self.ledger.count("resent")
        self.ledger.count("frames_sent")
        self.ledger.count("records_sent", len(records))
        if corrupt:
            self.ledger.count("corrupt_sent")
            wire = datagram[:-1] + bytes(((datagram[-1] + 1) & 0xFF,))
        else:
            wire = datagram
        self.send(wire)
        self._inflight = (records, datagram, corrupt, self.clock.seconds(), attempts + 1)
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = self.clock.callLater(self._backoff, self._timeout)

    def _timeout(self) -> None:
        self._retry_call = None
        if self._inflight is None or self.send is None:
            return
        records, datagram, corrupt, sent_at, attempts = self._inflight
        self.ledger.count("ack_timeouts")
        if corrupt:
            self.ledger.count("corrupt_rejected")
            self._inflight = (records, datagram, False, sent_at, attempts)
            self._transmit(resend=False)
            return
        self._backoff = min(self._backoff * 2, self.config.backoff_max_s)
        self._transmit()

    def datagram_received(self, data: bytes) -> None:
        """The server's reply: check the AVL packet id and the accepted count."""
        if len(data) != 7 or data[:2] != b"\x00\x05":
            self.ledger.violation(
                "unexpected_bytes", f"{self.imei}: UDP reply is not an ACK: {data[:16].hex()}"
            )
            return
        if self._inflight is None:
            return  # a late duplicate ACK of a datagram we already counted
        records, datagram, corrupt, sent_at, _attempts = self._inflight
        if data[5] != self._avl_id:
            return  # the reply to an earlier datagram; devices ignore it
        accepted = data[6]
        if corrupt and accepted:
            self.ledger.violation(
                "corrupt_acked", f"{self.imei}: server ACKed a UDP datagram with N1 != N2"
            )
        elif corrupt:
            self.ledger.count("corrupt_rejected")
            self._inflight = (records, datagram, False, sent_at, _attempts)
            self._transmit(resend=False)
            return
        elif accepted == 0:
            self.ledger.count("rejected")
            return  # the retry timer resends
        elif accepted != len(records):
            self.ledger.violation(
                "wrong_ack",
                f"{self.imei}: server ACKed {accepted} for a datagram of {len(records)} records",
            )
            return
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        latency_ms = (self.clock.seconds() - sent_at) * 1000.0
        self.ledger.ack(self.imei, (r.timestamp_ms for r in records), latency_ms)
        for _ in records:
            self.buffer.popleft()
        self._inflight = None
        self._backoff = self.config.ack_timeout_s
        if self.generating and self.config.interval_s == 0 and not self.buffer:
            self._tick()  # closed loop: log the next frame now (it sends itself)
            return
        self._maybe_send()


class DatagramSender:
    """Callable that writes to a connected UDP transport."""

    def __init__(self, protocol: UDPDeviceProtocol) -> None:
        self.protocol = protocol

    def __call__(self, data: bytes) -> None:
        transport = self.protocol.transport
        if transport is not None:
            transport.write(data, None)


class UDPDeviceProtocol(DatagramProtocol):
    """Thin protocol: one UDP socket per device, connected to the server."""

    def __init__(self, device: UDPDevice, host: str, port: int) -> None:
        self.device = device
        self.host = host
        self.port = port

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.transport.connect(self.host, self.port)
        self.device.start(DatagramSender(self))

    def datagramReceived(self, datagram: bytes, addr: object) -> None:
        self.device.datagram_received(datagram)

    def connectionRefused(self) -> None:  # noqa: N802 (Twisted's name)
        """ICMP port unreachable: the retry timer will try again."""
