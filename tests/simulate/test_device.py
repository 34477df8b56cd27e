"""The simulated device's state machine, driven with StringTransport and Clock (no sleeps)."""

from __future__ import annotations

import random

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from teltonika.codecs import load_codecs
from teltonika.simulate.device import Device, DeviceConfig, SimulatedDeviceProtocol, State
from teltonika.simulate.ledger import Ledger
from teltonika.wire import (
    CODEC_8E,
    CODEC_12,
    CODEC_14,
    MESSAGE_TYPE_NACK,
    MESSAGE_TYPE_RESPONSE,
    AVLPacket,
    CRCError,
    Framer,
    MessagePacket,
    encode_command_frame,
    encode_login,
    tcp_ack,
    unwrap,
)

CODECS = load_codecs()
IMEI = "356307042441013"
START = 1_700_000_000.0


class Harness:
    """One device, a Clock, and the transports of its successive connections."""

    def __init__(self, **config: object) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.ledger = Ledger(devices=1)
        self.dials = 0
        options: dict[str, object] = {
            "codec_id": CODEC_8E,
            "records_per_frame": 2,
            "interval_s": 10.0,
            "ack_timeout_s": 5.0,
            "keepalive_s": 30.0,
        }
        options.update(config)
        self.device = Device(
            IMEI,
            DeviceConfig(**options),  # type: ignore[arg-type]
            self.clock,
            random.Random(7),
            self.ledger,
            self._dial,
        )
        self.transport: StringTransport | None = None
        self.protocol: SimulatedDeviceProtocol | None = None

    def _dial(self, device: Device) -> None:
        self.dials += 1

    def connect(self) -> StringTransport:
        """Complete the pending dial with a fresh StringTransport."""
        self.transport = StringTransport()
        self.protocol = SimulatedDeviceProtocol(self.device)
        self.protocol.makeConnection(self.transport)
        return self.transport

    def login(self) -> StringTransport:
        transport = self.connect()
        assert transport.value() == encode_login(IMEI)
        transport.clear()
        self.send(b"\x01")
        return transport

    def lose(self) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost()

    def send(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def next_frame(self) -> bytes:
        """Advance past one logging interval and return what the device wrote."""
        self.clock.advance(11.1)
        assert self.transport is not None
        data: bytes = self.transport.value()
        self.transport.clear()
        return data


def frames_in(data: bytes) -> list[bytes]:
    return [frame.raw for frame in Framer().feed(data)]  # type: ignore[union-attr]


def records_of(frame: bytes) -> AVLPacket:
    _codec, packet = CODECS.decode_frame(frame)
    assert isinstance(packet, AVLPacket)
    return packet


def test_login_then_frame_then_ack() -> None:
    """The device dials, logs in with its IMEI, sends K records and takes a matching ACK."""
    h = Harness()
    h.device.start()
    assert h.dials == 1
    h.login()
    assert h.device.state is State.READY
    assert h.ledger.online == 1
    frame = h.next_frame()
    packet = records_of(frame)
    assert packet.codec_id == CODEC_8E
    assert len(packet.records) == 2
    assert packet.records[0].timestamp_ms < packet.records[1].timestamp_ms
    h.clock.advance(0.004)
    h.send(tcp_ack(2))
    assert h.device.drained
    assert h.ledger.counts["records_acked"] == 2
    assert h.ledger.acked[IMEI] == [r.timestamp_ms for r in packet.records]
    assert h.ledger.latencies_ms == [pytest.approx(4.0, abs=1e-3)]


def test_ack_zero_resends_the_same_frame_after_backoff() -> None:
    """ACK 0 is a refusal: the records stay buffered and the identical bytes go again."""
    h = Harness()
    h.device.start()
    h.login()
    frame = h.next_frame()
    h.send(tcp_ack(0))
    assert h.ledger.counts["rejected"] == 0  # four zero bytes could start a command frame
    h.clock.advance(0.05)
    assert h.ledger.counts["rejected"] == 1
    assert h.device.drained == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    h.clock.advance(1.0)
    assert h.transport is not None
    assert h.transport.value() == frame
    assert h.ledger.counts["resent"] == 1
    h.send(tcp_ack(2))
    assert h.device.drained
    assert h.ledger.broken_promises == 0


def test_wrong_ack_count_is_a_broken_promise_and_the_frame_is_resent() -> None:
    """An ACK count other than 0 or the number sent is counted as a violation."""
    h = Harness()
    h.device.start()
    h.login()
    frame = h.next_frame()
    h.send(tcp_ack(1))
    assert h.ledger.counts["wrong_ack"] == 1
    assert h.ledger.broken_promises == 1
    assert "ACKed 1 for a frame of 2 records" in h.ledger.violations[0]
    h.clock.advance(1.0)
    assert h.transport is not None and h.transport.value() == frame
    assert h.ledger.counts["records_acked"] == 0


def test_ack_timeout_reconnects_and_resends_identical_bytes() -> None:
    """No ACK within the response timeout: drop, reconnect with backoff, resend the same frame."""
    h = Harness()
    h.device.start()
    first = h.login()
    frame = h.next_frame()
    h.clock.advance(5.0)
    assert h.ledger.counts["ack_timeouts"] == 1
    assert first.disconnecting
    h.lose()
    assert h.device.state is State.DISCONNECTED
    assert h.ledger.online == 0
    h.clock.advance(1.0)
    assert h.dials == 2
    second = h.login()
    assert frames_in(second.value())[0] == frame
    assert h.ledger.counts["resent"] == 1
    h.send(tcp_ack(2))
    assert h.device.drained


def test_reconnect_backoff_grows() -> None:
    """Failed dials wait longer and longer (doubling, jittered, capped)."""
    h = Harness(backoff_initial_s=1.0, backoff_max_s=4.0)
    h.device.start()
    delays = []
    for _ in range(4):
        before = h.dials
        h.device.connect_failed()
        waited = 0.0
        while h.dials == before:
            h.clock.advance(0.1)
            waited += 0.1
        delays.append(waited)
    assert delays[0] < delays[1] < delays[2]
    assert delays[3] <= 4.0 * 1.2 + 0.1
    assert h.ledger.counts["connect_failures"] == 4


def test_corrupt_frame_refused_then_intact_frame_sent() -> None:
    """A frame sent with a broken CRC must be refused; then the intact frame is sent."""
    h = Harness(corrupt_rate=0.999)
    h.device.start()
    h.login()
    bad = h.next_frame()
    with pytest.raises(CRCError):
        unwrap(bad)
    h.send(tcp_ack(0))
    h.clock.advance(0.05)
    assert h.ledger.counts["corrupt_rejected"] == 1
    assert h.transport is not None
    good = h.transport.value()
    unwrap(good)
    assert good[:-1] == bad[:-1]
    assert h.ledger.counts["resent"] == 0
    h.send(tcp_ack(2))
    assert h.device.drained
    assert h.ledger.broken_promises == 0


def test_corrupt_frame_closed_by_server_counts_as_refused() -> None:
    """Closing the connection is also a correct refusal of a corrupt frame."""
    h = Harness(corrupt_rate=0.999)
    h.device.start()
    h.login()
    h.next_frame()
    h.lose()
    assert h.ledger.counts["corrupt_rejected"] == 1
    h.clock.advance(1.0)
    second = h.login()
    unwrap(frames_in(second.value())[0])


def test_corrupt_frame_acked_is_a_broken_promise() -> None:
    """A non-zero ACK for a frame with a broken CRC is reported."""
    h = Harness(corrupt_rate=0.999)
    h.device.start()
    h.login()
    h.next_frame()
    h.send(tcp_ack(2))
    assert h.ledger.counts["corrupt_acked"] == 1
    assert h.ledger.broken_promises == 1


def test_login_refused_drops_and_retries() -> None:
    """``00`` after the IMEI: the device closes and comes back after a backoff."""
    h = Harness()
    h.device.start()
    transport = h.connect()
    h.send(b"\x00")
    assert transport.disconnecting
    assert h.ledger.counts["logins_rejected"] == 1
    h.lose()
    h.clock.advance(1.0)
    assert h.dials == 2


def test_keepalive_after_idle() -> None:
    """An idle logged-in device sends one 0xFF per keepalive period."""
    h = Harness(interval_s=1000.0, keepalive_s=30.0)
    h.device.start()
    transport = h.login()
    h.clock.advance(29.0)
    assert transport.value() == b""
    h.clock.advance(1.5)
    assert transport.value() == b"\xff"
    assert h.ledger.counts["keepalives_sent"] == 1


def reply_of(data: bytes) -> MessagePacket:
    frames = frames_in(data)
    assert len(frames) == 1
    _codec, packet = CODECS.decode_frame(frames[0])
    assert isinstance(packet, MessagePacket)
    return packet


def test_codec12_getinfo_answered_never_acked() -> None:
    """A codec 12 command gets a codec 12 type 06 text reply."""
    h = Harness(interval_s=1000.0)
    h.device.start()
    transport = h.login()
    h.send(encode_command_frame(CODEC_12, b"getinfo"))
    message = reply_of(transport.value()).messages[0]
    assert message.codec_id == CODEC_12
    assert message.message_type == MESSAGE_TYPE_RESPONSE
    assert message.text is not None and message.text.startswith("RTC:")
    assert h.ledger.counts["commands_answered"] == 1


def test_codec14_own_imei_answered_other_imei_nacked() -> None:
    """Codec 14: the device runs a command for its IMEI and nACKs (0x11) any other."""
    h = Harness(interval_s=1000.0)
    h.device.start()
    transport = h.login()
    h.send(encode_command_frame(CODEC_14, b"getver", imei=IMEI))
    message = reply_of(transport.value()).messages[0]
    assert (message.codec_id, message.message_type, message.imei) == (
        CODEC_14,
        MESSAGE_TYPE_RESPONSE,
        IMEI,
    )
    assert message.text is not None and f"IMEI:{IMEI}" in message.text
    transport.clear()
    h.send(encode_command_frame(CODEC_14, b"setdigout 11", imei="352093081452251"))
    message = reply_of(transport.value()).messages[0]
    assert message.message_type == MESSAGE_TYPE_NACK
    assert message.payload == b""
    assert h.device.device_state.outputs == [0, 0]
    assert h.ledger.counts["nacks_sent"] == 1


def test_setdigout_changes_outputs_seen_by_getio() -> None:
    """``setdigout 10`` sets DOUT1 and clears DOUT2, and ``getio`` reports it."""
    h = Harness(interval_s=1000.0)
    h.device.start()
    transport = h.login()
    h.send(encode_command_frame(CODEC_12, b"setdigout 10"))
    assert reply_of(transport.value()).messages[0].text == (
        "DOUT1:1 Timeout:INFINITY DOUT2:0 Timeout:INFINITY"
    )
    transport.clear()
    h.send(encode_command_frame(CODEC_12, b"getio"))
    text = reply_of(transport.value()).messages[0].text
    assert text is not None and "DO1:1 DO2:0" in text


def test_ack_then_command_in_any_chunking_is_understood() -> None:
    """An ACK followed by a command frame, split byte by byte, are both understood."""
    h = Harness()
    h.device.start()
    transport = h.login()
    h.next_frame()
    stream = tcp_ack(2) + encode_command_frame(CODEC_12, b"getstatus")
    for index in range(len(stream)):
        h.send(stream[index : index + 1])
    assert h.ledger.counts["records_acked"] == 2
    assert h.ledger.counts["commands_answered"] == 1
    assert reply_of(transport.value()).messages[0].text.startswith("Data Link")  # type: ignore[union-attr]
    assert h.ledger.broken_promises == 0


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_a_command_where_an_ack_is_awaited_is_a_broken_promise(chunk: int) -> None:
    """Strict like the firmware: while a frame awaits its ACK, a command frame (four zero
    bytes and a message header) counts command_in_place_of_ack and the link drops; the
    frame is sent again on the next connection."""
    h = Harness()
    h.device.start()
    transport = h.login()
    frame = h.next_frame()
    stream = encode_command_frame(CODEC_12, b"getinfo") + tcp_ack(2)
    for index in range(0, len(stream), chunk):
        h.send(stream[index : index + chunk])
    assert h.ledger.counts["command_in_place_of_ack"] == 1
    assert h.ledger.broken_promises == 1
    assert h.ledger.counts["commands_answered"] == 0
    assert transport.disconnecting
    assert "awaited an ACK" in h.ledger.violations[0]
    h.lose()
    h.clock.advance(1.0)
    assert h.login().value() == frame


def test_closed_loop_takes_the_command_behind_its_ack_before_the_next_frame() -> None:
    """A device streaming in a closed loop reads a command written right behind its ACK
    (same read) before it sends its next frame; the next frame follows the reply."""
    h = Harness(interval_s=0.0)
    h.device.start()
    h.clock.advance(0)
    transport = h.login()
    transport.clear()
    h.send(tcp_ack(2) + encode_command_frame(CODEC_12, b"getver"))
    reply, next_frame = frames_in(transport.value())
    assert reply_of(reply).messages[0].message_type == MESSAGE_TYPE_RESPONSE
    records_of(next_frame)
    assert h.ledger.broken_promises == 0
    transport.clear()
    h.send(encode_command_frame(CODEC_12, b"getinfo"))  # now it awaits that frame's ACK
    assert h.ledger.counts["command_in_place_of_ack"] == 1


def test_ack_zero_followed_by_command_in_one_read() -> None:
    """``00000000`` then a command frame: a refusal, then a command (not one long frame)."""
    h = Harness()
    h.device.start()
    h.login()
    frame = h.next_frame()
    h.send(tcp_ack(0) + encode_command_frame(CODEC_12, b"getver"))
    assert h.ledger.counts["rejected"] == 1
    assert h.ledger.counts["commands_answered"] == 1
    assert h.transport is not None
    h.transport.clear()
    h.clock.advance(1.0)
    assert h.transport.value() == frame


def test_bytes_while_no_ack_awaited_are_reported() -> None:
    """A server writing an ACK nobody waits for breaks the protocol: reported, link dropped."""
    h = Harness(interval_s=1000.0)
    h.device.start()
    transport = h.login()
    h.send(tcp_ack(3))
    assert h.ledger.counts["unexpected_bytes"] == 1
    assert transport.disconnecting


def test_stop_reports_never_acked_records() -> None:
    """Records still buffered at power-off are listed as never ACKed."""
    h = Harness()
    h.device.start()
    h.login()
    packet = records_of(h.next_frame())
    h.device.stop()
    assert h.ledger.never_acked[IMEI] == [r.timestamp_ms for r in packet.records]
    assert h.ledger.online == 0
    assert not h.clock.getDelayedCalls()


def test_backlog_is_sent_in_bigger_frames() -> None:
    """After an outage the buffer drains in frames of up to ``backlog_records`` records."""
    h = Harness(records_per_frame=2, backlog_records=10)
    h.device.start()
    for _ in range(5):
        h.device.connect_failed()
        h.clock.advance(11.0)
    h.clock.advance(40.0)
    transport = h.login()
    packet = records_of(frames_in(transport.value())[0])
    assert len(packet.records) == 10


def test_max_frames_stops_logging() -> None:
    """With ``max_frames`` the device logs that many intervals and then stops."""
    h = Harness(max_frames=3)
    h.device.start()
    h.login()
    for _ in range(5):
        frame = h.next_frame()
        if frame:
            h.send(tcp_ack(2))
    assert h.device.frames_logged == 3
    assert not h.device.generating
    assert h.ledger.counts["records_acked"] == 6


def test_interval_zero_is_a_closed_loop() -> None:
    """``interval_s=0``: each ACK immediately logs and sends the next frame (benchmarks)."""
    h = Harness(interval_s=0.0)
    h.device.start()
    h.clock.advance(0)
    transport = h.login()
    for _ in range(5):
        frames = frames_in(transport.value())
        assert len(frames) == 1
        transport.clear()
        h.clock.advance(0.001)
        h.send(tcp_ack(2))
    assert h.ledger.counts["frames_acked"] == 5
    assert not h.clock.getDelayedCalls() or all(
        call.getTime() > h.clock.seconds() for call in h.clock.getDelayedCalls()
    )
