"""One simulated tracker on TCP: a state machine behind a thin Protocol.

The exchange a device runs (docs/protocol.rst, sections 'The TCP session', 'ACK and
retransmission' and 'Commands on a live socket')::

    connect -> IMEI packet -> 01 -> [AVL frame -> u32 ACK]* ... FF keepalives when idle
                              00 -> close, come back after a backoff
    any time: codec 12/14 command (type 05) -> reply (type 06; codec 14 nACK 11 for another IMEI)

What makes it a *device* rather than a load generator:

* records are logged on the device's own schedule and stay in its buffer until a frame
  holding them is ACKed with exactly the number of records sent;
* one frame is in flight at a time; after an ACK timeout, a refusal (ACK 0) or a lost
  connection the *same bytes* are sent again (after reconnecting with a growing backoff);
* a frame corrupted on purpose (``corrupt_rate``) must not be ACKed; once refused, the
  intact frame is sent.

The server's side of the stream is not self-delimiting: an ACK is four bare bytes and a
command frame starts with four zero bytes. Like the firmware, the device is strictly
sequential: while it awaits an ACK it reads the next four bytes as that ACK. A command
frame there (four zero bytes followed by a message-codec header) is a broken promise,
``command_in_place_of_ack``: a real tracker would read "ACK 0", resend, and take the
rest for garbage. (Four lone zero bytes wait :data:`AMBIGUITY_S` for such a header
before counting as ACK 0.) A command in the same read as the ACK, right behind it, is
what a server may send: the device finishes reading what it received before it sends its
next frame.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from enum import Enum

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from teltonika.simulate.answers import SimulatedDeviceState, answer
from teltonika.simulate.ledger import Ledger
from teltonika.simulate.track import Track
from teltonika.wire import (
    CODEC_12,
    CODEC_14,
    MESSAGE_TYPE_COMMAND,
    MESSAGE_TYPE_NACK,
    MESSAGE_TYPE_RESPONSE,
    AVLRecord,
    DecodeError,
    decode_messages,
    encode_avl_frame,
    encode_login,
    encode_message,
    unwrap,
    wrap,
)
from teltonika.wire.frames import BODY_OFFSET

MAX_COMMAND_FRAME = 64 * 1024
AMBIGUITY_S = 0.05
"""How long four zero bytes may wait for the rest of a command header before they are
taken as an ACK of 0 (the server's stream does not say which it is)."""
_MESSAGE_CODECS = frozenset({0x0C, 0x0D, 0x0E})
_PREAMBLE = b"\x00\x00\x00\x00"


@attrs.frozen
class DeviceConfig:
    """How every device of a fleet behaves.

    :ivar codec_id: AVL codec of the data frames (0x08, 0x8E or 0x10).
    :ivar records_per_frame: records logged per interval, sent together in one frame.
    :ivar interval_s: mean time between frames; each wait is jittered by +-10%. 0 means
        closed loop (benchmarks): the next frame is logged as soon as the last is ACKed.
    :ivar ack_timeout_s: the device's "response timeout": no ACK by then -> reconnect, resend.
    :ivar keepalive_s: idle time after which ``FF`` is sent; 0 turns keepalives off.
    :ivar corrupt_rate: probability that a new frame is first sent with a broken CRC.
    :ivar backoff_initial_s: first reconnect delay; doubles up to ``backoff_max_s``.
    :ivar max_frames: stop logging after this many intervals (None: until told to stop).
    :ivar backlog_records: most records one frame carries when the buffer is behind.
    """

    codec_id: int = 0x08
    records_per_frame: int = 1
    interval_s: float = 10.0
    ack_timeout_s: float = 30.0
    keepalive_s: float = 60.0
    corrupt_rate: float = 0.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_frames: int | None = None
    backlog_records: int = 50


class State(Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    LOGIN = "login"
    READY = "ready"
    STOPPED = "stopped"


@attrs.define
class InFlight:
    """The frame being sent: its records, intact bytes, and whether it goes out corrupt."""

    records: list[AVLRecord]
    frame: bytes
    corrupt: bool
    sent_at: float = 0.0
    attempts: int = 0
    last_corrupt: bool = False
    awaiting_ack: bool = False
    """Sent on this connection and not answered yet: the next 4 bytes are its ACK."""


def corrupt_frame(frame: bytes) -> bytes:
    """The frame with its CRC's low byte flipped: framing intact, CRC wrong."""
    return frame[:-1] + bytes((frame[-1] ^ 0x5A,))


class Device:
    """One tracker's logic; the Protocol feeds it, the clock drives it.

    :param imei: the device's IMEI (15 digits).
    :param config: behaviour shared by the fleet.
    :param clock: timers and the device's wall clock (``seconds()``).
    :param rng: the device's own random source (track, jitter, corruption).
    :param ledger: where counters and ACKed records go (shared by the fleet).
    :param connect: called to open a connection; the Protocol then calls :meth:`connected`,
        or the connector calls :meth:`connect_failed`.
    """

    def __init__(
        self,
        imei: str,
        config: DeviceConfig,
        clock: IReactorTime,
        rng: random.Random,
        ledger: Ledger,
        connect: Callable[[Device], None],
    ) -> None:
        self.imei = imei
        self.config = config
        self.clock = clock
        self.rng = rng
        self.ledger = ledger
        self._connect = connect
        self.track = Track(rng, config.codec_id)
        self.device_state = SimulatedDeviceState(imei=imei, started_s=clock.seconds())
        self.state = State.DISCONNECTED
        self.buffer: deque[AVLRecord] = deque()
        self.inflight: InFlight | None = None
        self.transport: ITransport | None = None
        self.frames_logged = 0
        self.generating = False
        self._rx = b""
        self._dropping = False
        self._reading = False
        self._after_read: list[Callable[[], None]] = []
        self._backoff = config.backoff_initial_s
        self._last_write = 0.0
        self._tick_call: IDelayedCall | None = None
        self._ack_call: IDelayedCall | None = None
        self._keepalive_call: IDelayedCall | None = None
        self._reconnect_call: IDelayedCall | None = None
        self._resend_call: IDelayedCall | None = None
        self._ambiguous_call: IDelayedCall | None = None
        self._last_tick = clock.seconds()

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Boot: start logging records and dial the server."""
        self.generating = True
        self._last_tick = self.clock.seconds()
        first = self.rng.uniform(0.0, self.config.interval_s)
        self._tick_call = self.clock.callLater(first, self._tick)
        self._dial()

    def stop_generating(self) -> None:
        """Log no more records; what is buffered is still sent."""
        self.generating = False
        self._cancel("_tick_call")

    @property
    def drained(self) -> bool:
        """Nothing left to send: the buffer is empty and no frame is in flight."""
        return not self.buffer and self.inflight is None

    def stop(self) -> None:
        """Power off: cancel every timer, close the link, report unACKed records."""
        self.stop_generating()
        for name in (
            "_ack_call",
            "_keepalive_call",
            "_reconnect_call",
            "_resend_call",
            "_ambiguous_call",
        ):
            self._cancel(name)
        previous = self.state
        self.state = State.STOPPED
        if previous is State.READY:
            self.ledger.online -= 1
        if self.transport is not None:
            self.transport.loseConnection()
        self.ledger.add_never_acked(self.imei, self.buffer)

    # -- record logging ----------------------------------------------------------------

    def _tick(self) -> None:
        """One logging interval: K records, then try to send."""
        self._tick_call = None
        now = self.clock.seconds()
        config = self.config
        self.buffer.extend(self.track.log(now, now - self._last_tick, config.records_per_frame))
        self._last_tick = now
        self.frames_logged += 1
        if config.max_frames is not None and self.frames_logged >= config.max_frames:
            self.generating = False
        if self.generating and config.interval_s > 0:
            delay = config.interval_s * self.rng.uniform(0.9, 1.1)
            self._tick_call = self.clock.callLater(delay, self._tick)
        self._maybe_send()

    # -- connection -------------------------------------------------------------------

    def _dial(self) -> None:
        if self.state is not State.DISCONNECTED:
            return
        self.state = State.CONNECTING
        self._connect(self)

    def connected(self, transport: ITransport) -> None:
        """The TCP connection is up: send the IMEI packet."""
        if self.state is State.STOPPED:
            transport.loseConnection()
            return
        self.ledger.count("connects")
        self.transport = transport
        self.state = State.LOGIN
        self._rx = b""
        self._dropping = False
        self._write(encode_login(self.imei))
        self._arm_ack_timer()

    def connect_failed(self) -> None:
        """The connection attempt failed: try again after the backoff."""
        self.ledger.count("connect_failures")
        if self.state is State.STOPPED:
            return
        self.state = State.DISCONNECTED
        self._schedule_reconnect()

    def connection_lost(self) -> None:
        """The link went down (either side): keep the records, reconnect after a backoff."""
        self.transport = None
        self._rx = b""
        self._after_read.clear()
        if self.inflight is not None:
            self.inflight.awaiting_ack = False  # resent after the next login
        for name in ("_ack_call", "_keepalive_call", "_resend_call", "_ambiguous_call"):
            self._cancel(name)
        if self.state is State.STOPPED:
            return
        self.ledger.count("disconnects")
        if self.state is State.READY:
            self.ledger.online -= 1
        inflight = self.inflight
        if inflight is not None and inflight.corrupt and inflight.attempts:
            # Closing the connection is one correct way to refuse a corrupt frame.
            self.ledger.count("corrupt_rejected")
            inflight.corrupt = False
        self.state = State.DISCONNECTED
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        delay = self._backoff * self.rng.uniform(0.8, 1.2)
        self._backoff = min(self._backoff * 2, self.config.backoff_max_s)
        self._cancel("_reconnect_call")
        self._reconnect_call = self.clock.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._reconnect_call = None
        self._dial()

    def _drop(self) -> None:
        """Give up on this connection (timeout or garbage); connection_lost follows."""
        self._rx = b""
        self._dropping = True
        if self.transport is not None:
            self.transport.loseConnection()
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()

    # -- sending ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self._last_write = self.clock.seconds()
        self.transport.write(data)

    def _maybe_send(self) -> None:
        """Send the next frame if logged in, nothing is in flight and records wait."""
        if self.state is not State.READY or self.inflight is not None or not self.buffer:
            return
        limit = self.config.records_per_frame
        if len(self.buffer) > 2 * limit:
            limit = min(255, max(limit, self.config.backlog_records))
        records = [self.buffer[i] for i in range(min(limit, len(self.buffer)))]
        frame = encode_avl_frame(self.config.codec_id, records)
        corrupt = self.config.corrupt_rate > 0 and self.rng.random() < self.config.corrupt_rate
        self.inflight = InFlight(records, frame, corrupt)
        self._send_inflight()

    def _send_inflight(self) -> None:
        inflight = self.inflight
        assert inflight is not None
        if inflight.attempts and not inflight.last_corrupt:
            self.ledger.count("resent")  # the intact frame after a corrupt one is no resend
        inflight.last_corrupt = inflight.corrupt
        inflight.attempts += 1
        self.ledger.count("frames_sent")
        self.ledger.count("records_sent", len(inflight.records))
        if inflight.corrupt:
            self.ledger.count("corrupt_sent")
            self._write(corrupt_frame(inflight.frame))
        else:
            self._write(inflight.frame)
        inflight.sent_at = self.clock.seconds()
        inflight.awaiting_ack = True
        self._arm_ack_timer()

    def _resend_later(self) -> None:
        """A refused frame goes again after the backoff, on the same connection."""
        delay = self._backoff * self.rng.uniform(0.8, 1.2)
        self._backoff = min(self._backoff * 2, self.config.backoff_max_s)
        self._cancel("_resend_call")
        self._resend_call = self.clock.callLater(delay, self._resend)

    def _resend(self) -> None:
        self._resend_call = None
        if self.state is State.READY and self.inflight is not None:
            self._send_inflight()

    def _arm_ack_timer(self) -> None:
        self._cancel("_ack_call")
        self._ack_call = self.clock.callLater(self.config.ack_timeout_s, self._ack_timeout)

    def _ack_timeout(self) -> None:
        """No reply in time: a device treats the transfer as failed and reconnects."""
        self._ack_call = None
        self.ledger.count("ack_timeouts")
        self._drop()

    def _arm_keepalive(self) -> None:
        self._cancel("_keepalive_call")
        if self.config.keepalive_s > 0:
            self._keepalive_call = self.clock.callLater(self.config.keepalive_s, self._keepalive)

    def _keepalive(self) -> None:
        self._keepalive_call = None
        if self.state is not State.READY:
            return
        idle = self.clock.seconds() - self._last_write
        if idle >= self.config.keepalive_s:
            self.ledger.count("keepalives_sent")
            self._write(b"\xff")
        self._arm_keepalive()

    # -- receiving --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Bytes from the server: login reply, ACKs and command frames, in any chunking.

        Frames the device decides to send while reading go out once the whole read is
        consumed (a command right behind its ACK is read before the next frame leaves).
        """
        self._cancel("_ambiguous_call")
        if self._dropping:
            return
        self._rx += data
        self._reading = True
        try:
            while self._rx and not self._dropping:
                if not self._consume_one():
                    break
        finally:
            self._reading = False
        actions, self._after_read = self._after_read, []
        for action in actions:
            if self._dropping or self.state is not State.READY:
                break
            action()

    def _soon(self, action: Callable[[], None]) -> None:
        """Run *action* now, or after the read being consumed."""
        if self._reading:
            self._after_read.append(action)
        else:
            action()

    def _consume_one(self) -> bool:
        """Handle one item at the front of the receive buffer; False when more is needed."""
        buf = self._rx
        if self.state is State.LOGIN:
            self._rx = buf[1:]
            self._login_reply(buf[0])
            return True
        awaiting = self._awaiting_ack()
        if awaiting:
            if len(buf) < 4:
                return False
            if buf[:4] == _PREAMBLE:
                command = self._looks_like_command(buf, awaiting)
                if command is None:
                    if self._ambiguous_call is None:
                        self._ambiguous_call = self.clock.callLater(AMBIGUITY_S, self._ack_zero)
                    return False
                if command:
                    self.ledger.violation(
                        "command_in_place_of_ack",
                        f"{self.imei}: server sent a command frame while the device awaited "
                        f"an ACK: {buf[:16].hex()}",
                    )
                    self._drop()
                    return False
            self._rx = buf[4:]
            self._ack(int.from_bytes(buf[:4], "big"))
            return True
        if buf[0] != 0 or (len(buf) >= 4 and buf[:4] != _PREAMBLE):
            self._unexpected(buf[:16], "bytes while no ACK was awaited")
            return False
        command = self._looks_like_command(buf, awaiting)
        if command is None:
            return False
        if not command:
            self._unexpected(buf[:16], "bytes while no ACK was awaited")
            return False
        total = int.from_bytes(buf[4:8], "big") + 12
        if len(buf) < total:
            return False
        self._rx = buf[total:]
        self._command_frame(buf[:total])
        return True

    def _looks_like_command(self, buf: bytes, awaiting: bool) -> bool | None:
        """Whether the zero-prefixed bytes start a command frame (None: cannot tell yet).

        Only a message-codec header with a sane length counts; when an ACK is awaited,
        four zero bytes followed by something else are an ACK of 0, and four zero bytes
        followed by nothing for :data:`AMBIGUITY_S` are too (see :meth:`_ack_zero`).
        """
        if len(buf) < 9:
            if awaiting and len(buf) >= 8 and int.from_bytes(buf[4:8], "big") < 8:
                return False
            return None
        length = int.from_bytes(buf[4:8], "big")
        return 8 <= length <= MAX_COMMAND_FRAME and buf[8] in _MESSAGE_CODECS

    def _ack_zero(self) -> None:
        """Nothing followed four zero bytes while an ACK was awaited: it was an ACK of 0."""
        self._ambiguous_call = None
        awaiting = self._awaiting_ack()
        if self._dropping or not awaiting or self._rx[:4] != _PREAMBLE:
            return
        self._rx = self._rx[4:]
        self._ack(0)
        self.data_received(b"")

    def _awaiting_ack(self) -> bool:
        return self.inflight is not None and self.inflight.awaiting_ack

    def _unexpected(self, data: bytes, what: str) -> None:
        self.ledger.violation("unexpected_bytes", f"{self.imei}: server sent {what}: {data.hex()}")
        self._drop()

    def _login_reply(self, byte: int) -> None:
        self._cancel("_ack_call")
        if byte == 0x01:
            self.ledger.count("logins_accepted")
            self.ledger.online += 1
            self.state = State.READY
            self._arm_keepalive()
            if self.inflight is not None:
                self._soon(self._send_inflight)
            else:
                self._soon(self._maybe_send)
        else:
            self.ledger.count("logins_rejected")
            self._drop()  # stays out of READY; connection_lost reconnects

    def _ack(self, count: int) -> None:
        inflight = self.inflight
        if inflight is None or not inflight.awaiting_ack:
            self._unexpected(count.to_bytes(4, "big"), "an ACK while none was awaited")
            return
        inflight.awaiting_ack = False
        self._cancel("_ack_call")
        sent = len(inflight.records)
        if inflight.corrupt:
            if count == 0:
                self.ledger.count("corrupt_rejected")
                inflight.corrupt = False
                self._soon(self._send_inflight)
                return
            self.ledger.violation(
                "corrupt_acked",
                f"{self.imei}: server ACKed {count} for a frame with a broken CRC",
            )
            inflight.corrupt = False
            # The records themselves were intact; fall through and take the ACK.
            count = sent
        if count == sent:
            latency_ms = (self.clock.seconds() - inflight.sent_at) * 1000.0
            self.ledger.ack(self.imei, (r.timestamp_ms for r in inflight.records), latency_ms)
            for _ in range(sent):
                self.buffer.popleft()
            self.inflight = None
            self._backoff = self.config.backoff_initial_s
            if self.generating and self.config.interval_s == 0 and not self.buffer:
                self._soon(self._tick)  # closed loop: log the next frame now (it sends itself)
                return
            self._soon(self._maybe_send)
            return
        if count == 0:
            self.ledger.count("rejected")
        else:
            self.ledger.violation(
                "wrong_ack", f"{self.imei}: server ACKed {count} for a frame of {sent} records"
            )
        self._resend_later()

    def _command_frame(self, frame: bytes) -> None:
        """A codec 12/14 frame from the server: answer it as a device would; never ACK it."""
        try:
            end = unwrap(frame)
            packet = decode_messages(frame, BODY_OFFSET, end)
        except DecodeError as error:
            self._unexpected(frame[:32], f"an undecodable command frame ({error})")
            return
        for message in packet.messages:
            if message.message_type != MESSAGE_TYPE_COMMAND or message.codec_id not in (
                CODEC_12,
                CODEC_14,
            ):
                self._unexpected(frame[:32], "a message frame that is not a command")
                return
            self.ledger.count("commands_received")
            if message.codec_id == CODEC_14 and message.imei != self.imei:
                reply = encode_message(CODEC_14, b"", MESSAGE_TYPE_NACK, imei=message.imei)
                self.ledger.count("nacks_sent")
            else:
                text = answer(
                    message.payload.decode("latin-1"),
                    self.device_state,
                    self.track,
                    self.clock.seconds(),
                    len(self.buffer),
                )
                imei = self.imei if message.codec_id == CODEC_14 else None
                reply = encode_message(
                    message.codec_id, text.encode("ascii"), MESSAGE_TYPE_RESPONSE, imei=imei
                )
                self.ledger.count("commands_answered")
            self._write(wrap(reply))

    def _cancel(self, name: str) -> None:
        call: IDelayedCall | None = getattr(self, name)
        if call is not None and call.active():
            call.cancel()
        setattr(self, name, None)


class SimulatedDeviceProtocol(Protocol):
    """The thin Protocol: turns Twisted callbacks into calls on its :class:`Device`."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.device.connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.device.data_received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.device.connection_lost()
