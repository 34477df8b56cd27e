"""The per-socket CommandQueue on StringTransport and Clock: docs/design.rst, 'One write path
per socket', 'One outstanding command per socket' and 'The write gate'."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from teltonika.commands.codec import encode_command, reply_text
from teltonika.metrics import ServerMetrics
from teltonika.protocol.queue import (
    CommandExpiredError,
    CommandNackError,
    CommandQueue,
    CommandQueueSettings,
    CommandTimeoutError,
    InvalidCommandError,
    SocketClosedError,
    WriteQueueFullError,
)
from teltonika.wire import decode_messages, unwrap
from teltonika.wire.records import CODEC_12, CODEC_13, CODEC_14, DeviceMessage
from tests.helpers import COMMAND_IMEI as IMEI
from tests.helpers import assertNoResult, failureResultOf, successResultOf
from tests.helpers import command_frame as frame


def reply(text: str, codec: int = CODEC_12, message_type: int = 0x06) -> DeviceMessage:
    return DeviceMessage(
        codec, message_type, text.encode(), imei=IMEI if codec == CODEC_14 else None
    )


class Rig:
    """A queue on a StringTransport and a Clock. Unless a test asks for them, no quiet
    interval and no settle interval: the order and reply tests see writes at once (the
    write gate has tests of its own)."""

    def __init__(self, **kwargs: Any) -> None:
        self.transport = StringTransport()
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.metrics = ServerMetrics.create(self.registry)
        self.idle = True
        kwargs.setdefault("quiet", 0)
        kwargs.setdefault("settle", 0)
        self.queue = CommandQueue(
            self.transport,
            self.clock,
            settings=CommandQueueSettings(**kwargs),
            metrics=self.metrics,
            imei=IMEI,
            connection_idle=lambda: self.idle,
        )

    def take(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def gauge(self) -> float | None:
        return self.registry.get_sample_value("teltonika_command_queue_depth_total")


def test_ack_and_command_bytes_in_submission_order() -> None:
    """ACK, command, ACK submitted in that order reach the wire in that order, whole."""
    rig = Rig()
    ack1 = rig.queue.write(b"\x00\x00\x00\x01")
    handle = rig.queue.submit(frame("getinfo"), CODEC_12, command_id="c1")
    ack2 = rig.queue.write(b"\x00\x00\x00\x02")
    assert rig.take() == b"\x00\x00\x00\x01" + frame("getinfo") + b"\x00\x00\x00\x02"
    assert successResultOf(ack1) is True and successResultOf(ack2) is True
    assert successResultOf(handle.written) is True
    assertNoResult(handle.reply)


def test_acks_are_not_held_behind_an_outstanding_command() -> None:
    """A device keeps logging while a command runs: its ACKs go out at once, the second
    command waits for the first one's reply."""
    rig = Rig()
    first = rig.queue.submit(frame("getinfo"), CODEC_12)
    second = rig.queue.submit(frame("getver"), CODEC_12)
    assert rig.take() == frame("getinfo")
    rig.queue.write(b"\x00\x00\x00\x05")
    assert rig.take() == b"\x00\x00\x00\x05"
    assertNoResult(second.written)
    assert rig.queue.reply_received(reply("INI:ok"))
    assert successResultOf(first.reply).payload == b"INI:ok"
    assert rig.take() == frame("getver")
    assert successResultOf(second.written) is True


def test_one_outstanding_command() -> None:
    """A second command is not written until the first is answered; replies resolve in order."""
    rig = Rig()
    handles = [rig.queue.submit(frame(f"cmd{i}"), CODEC_12) for i in range(3)]
    assert rig.take() == frame("cmd0")
    assert rig.queue.depth == 3 and rig.gauge() == 3
    for i, handle in enumerate(handles):
        assert rig.queue.reply_received(reply(f"r{i}"))
        assert successResultOf(handle.reply).payload == f"r{i}".encode()
        assert rig.take() == (frame(f"cmd{i + 1}") if i < 2 else b"")
    assert rig.queue.depth == 0 and rig.gauge() == 0


def test_timeout_fails_the_command_and_the_next_proceeds() -> None:
    """After the timeout the outstanding command fails with CommandTimeoutError and the
    next queued command is written; per-command timeouts override the default."""
    rig = Rig(default_timeout=30)
    first = rig.queue.submit(frame("a"), CODEC_12, timeout=5)
    second = rig.queue.submit(frame("b"), CODEC_12)
    rig.take()
    with capturedLogs() as events:
        rig.clock.advance(4.9)
        assertNoResult(first.reply)
        rig.clock.advance(0.1)
    failureResultOf(first.reply).trap(CommandTimeoutError)
    assert [e["log_format"] for e in events if "did not answer" in e["log_format"]]
    assert rig.take() == frame("b")
    rig.clock.advance(29.9)
    assertNoResult(second.reply)
    rig.clock.advance(0.1)
    failureResultOf(second.reply).trap(CommandTimeoutError)
    assert rig.gauge() == 0


def test_late_reply_after_timeout_is_unsolicited() -> None:
    """A reply arriving after its command timed out resolves nothing (the caller publishes it)."""
    rig = Rig()
    handle = rig.queue.submit(frame("a"), CODEC_12, timeout=1)
    rig.clock.advance(1)
    failureResultOf(handle.reply).trap(CommandTimeoutError)
    assert rig.queue.reply_received(reply("late")) is False


def test_socket_close_fails_every_pending_command() -> None:
    """Closing fails the outstanding and all queued commands with SocketClosedError; a
    later submit fails at once; later writes are dropped, not raised."""
    rig = Rig()
    handles = [rig.queue.submit(frame(f"c{i}"), CODEC_12) for i in range(4)]
    rig.queue.close()
    for handle in handles:
        failureResultOf(handle.reply).trap(SocketClosedError)
    assert successResultOf(handles[0].written) is True
    assert successResultOf(handles[1].written) is False
    assert rig.gauge() == 0 and rig.queue.depth == 0
    late = rig.queue.submit(frame("late"), CODEC_12)
    failureResultOf(late.reply).trap(SocketClosedError)
    assert successResultOf(rig.queue.write(b"\x00")) is False
    assert rig.clock.getDelayedCalls() == []


def test_depth_warning_and_limit() -> None:
    """A warning at warn_depth queued commands, WriteQueueFullError at max_depth."""
    rig = Rig(warn_depth=3, max_depth=4)
    with capturedLogs() as events:
        handles = [rig.queue.submit(frame(f"c{i}"), CODEC_12) for i in range(4)]
    warnings = [e for e in events if e["log_format"] == "{depth} commands queued for {imei}"]
    assert [e["depth"] for e in warnings] == [3, 4]
    refused = rig.queue.submit(frame("c5"), CODEC_12)
    failureResultOf(refused.reply).trap(WriteQueueFullError)
    assert successResultOf(refused.written) is False
    assert rig.gauge() == 4
    rig.queue.reply_received(reply("ok"))
    successResultOf(handles[0].reply)
    again = rig.queue.submit(frame("c6"), CODEC_12)
    assertNoResult(again.reply)


def test_default_limits_are_5_and_20() -> None:
    rig = Rig()
    limits = rig.queue.settings
    assert (limits.warn_depth, limits.max_depth, limits.default_timeout) == (5, 20, 30)
    with capturedLogs():
        for i in range(20):
            rig.queue.submit(frame(f"c{i}"), CODEC_12)
    failureResultOf(rig.queue.submit(frame("x"), CODEC_12).reply).trap(WriteQueueFullError)


def test_reply_matches_only_the_same_codec() -> None:
    """A codec 12 reply does not resolve an outstanding codec 14 command, nor a codec 13
    message, nor a type 0x05 frame; each returns False (unsolicited)."""
    rig = Rig()
    handle = rig.queue.submit(frame("getver", CODEC_14), CODEC_14)
    assert rig.queue.reply_received(reply("scale 12.5kg", CODEC_12)) is False
    assert rig.queue.reply_received(DeviceMessage(CODEC_13, 0x06, b"x", timestamp_ms=1)) is False
    assert rig.queue.reply_received(reply("cmd", CODEC_14, 0x05)) is False
    assertNoResult(handle.reply)
    assert rig.queue.reply_received(reply("Ver:03.18", CODEC_14)) is True
    assert successResultOf(handle.reply).payload == b"Ver:03.18"


def test_unsolicited_reply_without_command() -> None:
    assert Rig().queue.reply_received(reply("weighing scale line")) is False


def test_codec14_nack_fails_the_command() -> None:
    """A codec 14 type 0x11 fails the outstanding command with CommandNackError (reason nack)."""
    rig = Rig()
    handle = rig.queue.submit(frame("getver", CODEC_14), CODEC_14)
    second = rig.queue.submit(frame("getinfo"), CODEC_12)
    with capturedLogs():
        assert rig.queue.reply_received(DeviceMessage(CODEC_14, 0x11, b"", imei=IMEI)) is True
    err = failureResultOf(handle.reply, CommandNackError).value
    assert isinstance(err, CommandNackError)
    assert err.reason == "nack"
    assert successResultOf(second.written) is True


def test_a_failed_command_does_not_poison_the_chain(logged_errors: Any) -> None:
    """A write that raises fails only its own command; later writes and commands proceed."""

    class Flaky(StringTransport):
        fail_next = True

        def write(self, data: bytes) -> None:
            if self.fail_next:
                self.fail_next = False
                raise OSError("boom")
            super().write(data)

    transport = Flaky()
    queue = CommandQueue(transport, Clock(), settings=CommandQueueSettings(quiet=0))
    bad = queue.submit(frame("a"), CODEC_12)
    failureResultOf(bad.reply).trap(SocketClosedError)
    assert len(logged_errors.flush("Write to device {imei} failed")) == 1
    good = queue.submit(frame("b"), CODEC_12)
    assert successResultOf(queue.write(b"\x01")) is True
    assert transport.value() == frame("b") + b"\x01"
    assert queue.reply_received(reply("ok"))
    successResultOf(good.reply)


def test_each_caller_gets_its_own_deferred() -> None:
    """Callbacks of one caller (even one that raises) do not change another's result."""
    rig = Rig()
    a = rig.queue.submit(frame("a"), CODEC_12)
    b = rig.queue.submit(frame("b"), CODEC_12)
    assert a.reply is not b.reply
    seen: list[object] = []
    a.reply.addCallback(seen.append)
    rig.queue.reply_received(reply("ra"))
    rig.queue.reply_received(reply("rb"))
    assert successResultOf(b.reply).payload == b"rb"
    assert seen and seen[0] == reply("ra")


def test_cancel_drops_a_queued_command() -> None:
    rig = Rig()
    a = rig.queue.submit(frame("a"), CODEC_12)
    b = rig.queue.submit(frame("b"), CODEC_12)
    c = rig.queue.submit(frame("c"), CODEC_12)
    rig.take()
    b.reply.cancel()
    failureResultOf(b.reply).trap(CancelledError)
    assert rig.queue.depth == 2 and rig.gauge() == 2
    a.reply.cancel()
    failureResultOf(a.reply).trap(CancelledError)
    assert rig.take() == frame("c")
    assertNoResult(c.reply)


def test_written_fires_before_reply_and_reentrant_submit_works() -> None:
    """Submitting from inside a reply callback issues the new command right away."""
    rig = Rig()
    a = rig.queue.submit(frame("a"), CODEC_12)
    follow: list[Deferred[DeviceMessage]] = []
    a.reply.addCallback(lambda _: follow.append(rig.queue.submit(frame("b"), CODEC_12).reply))
    rig.take()
    rig.queue.reply_received(reply("ra"))
    assert rig.take() == frame("b")
    assert rig.queue.reply_received(reply("rb"))
    assert successResultOf(follow[0]).payload == b"rb"


def test_invalid_codec_is_refused() -> None:
    rig = Rig()
    failureResultOf(rig.queue.submit(b"x", CODEC_13).reply).trap(InvalidCommandError)
    assert rig.take() == b""


def test_encoded_frames_match_the_reference_vectors() -> None:
    """The wiki's getinfo (codec 12) and getver (codec 14) frames, byte for byte; a reply
    decodes into text."""
    assert encode_command(CODEC_12, b"getinfo", IMEI).hex().upper() == (
        "000000000000000F0C010500000007676574696E666F0100004312"
    )
    assert encode_command(CODEC_14, b"getver", IMEI).hex().upper() == (
        "00000000000000160E01050000000E0352093081452251676574766572010000D2C1"
    )
    raw = bytes.fromhex("00000000000000160E01050000000E0352093081452251676574766572010000D2C1")
    message = decode_messages(raw, 8, unwrap(raw)).messages[0]
    assert reply_text(message) == "getver"
    assert reply_text(DeviceMessage(CODEC_12, 6, b"\x00\x01")) == "0001"
    assert reply_text(DeviceMessage(CODEC_12, 6, b"DI1:1\r\n")) == "DI1:1"


@pytest.mark.parametrize(
    ("codec", "payload", "imei"),
    [
        (CODEC_12, b"", IMEI),
        (CODEC_12, b"x" * 5000, IMEI),
        (CODEC_14, b"getver", "abc"),
        (0x0D, b"x", IMEI),
    ],
)
def test_invalid_commands(codec: int, payload: bytes, imei: str) -> None:
    with pytest.raises(InvalidCommandError):
        encode_command(codec, payload, imei)


ACK_1 = b"\x00\x00\x00\x01"


def test_command_waits_for_the_quiet_interval() -> None:
    """With nothing from the device for `quiet` seconds the command is written; every
    read starts the interval again."""
    rig = Rig(quiet=1)
    handle = rig.queue.submit(frame("getinfo"), CODEC_12)
    rig.clock.advance(0.6)
    rig.queue.received()
    rig.clock.advance(0.9)
    assert rig.take() == b""
    assertNoResult(handle.written)
    rig.clock.advance(0.1)
    assert rig.take() == frame("getinfo")
    assert successResultOf(handle.written) is True


def test_command_goes_out_right_after_an_ack() -> None:
    """An ACK is the other moment a device reads a command correctly: ACK, then the
    command, written in the same turn, without waiting for the quiet interval."""
    rig = Rig(quiet=1)
    rig.queue.submit(frame("getinfo"), CODEC_12)
    rig.queue.received()
    rig.queue.write(ACK_1)
    rig.queue.ack_written()
    assert rig.take() == ACK_1 + frame("getinfo")


def test_an_ack_written_starts_the_quiet_interval_again() -> None:
    """The device answers an ACK with its next frame (or its backlog): a command that
    arrives just after an ACK written on a slow store (more than `quiet` after the last
    byte received) waits a whole quiet interval from the ACK, not from the last read."""
    rig = Rig(quiet=1)
    rig.queue.received()
    rig.clock.advance(1.5)  # the frame took 1.5 s to store
    rig.queue.write(ACK_1)
    rig.queue.ack_written()  # nothing waiting yet
    assert rig.take() == ACK_1
    rig.clock.advance(0.1)
    handle = rig.queue.submit(frame("getinfo"), CODEC_12)
    assert rig.take() == b""
    rig.clock.advance(0.89)
    assert rig.take() == b""
    assertNoResult(handle.written)
    rig.clock.advance(0.01)
    assert rig.take() == frame("getinfo")


def test_a_busy_connection_gets_no_command() -> None:
    """While a frame is queued, being stored or partly received, neither an ACK nor the
    quiet interval lets a command out; once the connection is idle again it goes."""
    rig = Rig(quiet=1)
    rig.idle = False
    rig.queue.submit(frame("getinfo"), CODEC_12)
    rig.queue.write(ACK_1)
    rig.queue.ack_written()
    rig.clock.advance(5)
    assert rig.take() == ACK_1
    rig.idle = True
    rig.clock.advance(1)
    assert rig.take() == frame("getinfo")


def test_acks_are_never_held_back_by_waiting_commands() -> None:
    """ACKs go out at once whatever the commands are waiting for."""
    rig = Rig(quiet=10, settle=10)
    rig.queue.submit(frame("a"), CODEC_12)
    assert successResultOf(rig.queue.write(ACK_1)) is True
    assert rig.take() == ACK_1


def test_after_a_timeout_the_next_command_waits_the_settle_interval() -> None:
    """A late reply to a timed-out command arrives while nothing is outstanding (it is
    unsolicited) instead of resolving the next command."""
    rig = Rig(settle=2)
    first = rig.queue.submit(frame("getver"), CODEC_12, timeout=5)
    second = rig.queue.submit(frame("setdigout 1"), CODEC_12)
    assert rig.take() == frame("getver")
    with capturedLogs():
        rig.clock.advance(5)
        failureResultOf(first.reply).trap(CommandTimeoutError)
        assert rig.take() == b""
        rig.clock.advance(1)
        assert rig.queue.reply_received(reply("Ver:03.18")) is False
        rig.queue.write(ACK_1)
        rig.queue.ack_written()
        assert rig.take() == ACK_1
        rig.clock.advance(1)
    assert rig.take() == frame("setdigout 1")
    assertNoResult(second.reply)
    assert rig.queue.reply_received(reply("DOUT1:1"))
    assert successResultOf(second.reply).payload == b"DOUT1:1"


def test_a_command_that_expires_while_waiting_is_never_written() -> None:
    """A command stuck behind a slow one fails with expired when its expiry passes; it is
    not written when its turn comes."""
    rig = Rig()
    slow = rig.queue.submit(frame("getver"), CODEC_12, timeout=30)
    stuck = rig.queue.submit(frame("setdigout 1"), CODEC_12, expires_in=1)
    rig.take()
    with capturedLogs() as events:
        rig.clock.advance(1)
    err = failureResultOf(stuck.reply, CommandExpiredError).value
    assert isinstance(err, CommandExpiredError)
    assert err.reason == "expired"
    assert successResultOf(stuck.written) is False
    assert [e for e in events if "expired before" in e["log_format"]]
    assert rig.queue.reply_received(reply("Ver:1"))
    successResultOf(slow.reply)
    rig.clock.advance(60)
    assert rig.take() == b""
    assert rig.queue.depth == 0 and rig.gauge() == 0


def test_expiry_is_checked_at_the_moment_of_writing() -> None:
    """Even when the expiry timer has not run yet (the ACK comes first in the same
    reactor iteration), a command past its expiry is failed instead of written."""
    rig = Rig(quiet=10)
    handle = rig.queue.submit(frame("setdigout 1"), CODEC_12, expires_in=1)
    rig.clock.rightNow += 1.0  # time passed; the timer has not been run yet
    with capturedLogs():
        rig.queue.write(ACK_1)
        rig.queue.ack_written()
    assert rig.take() == ACK_1
    failureResultOf(handle.reply).trap(CommandExpiredError)
    assert rig.clock.getDelayedCalls() == []


def test_an_already_expired_command_is_refused() -> None:
    rig = Rig()
    handle = rig.queue.submit(frame("a"), CODEC_12, expires_in=0)
    failureResultOf(handle.reply).trap(CommandExpiredError)
    assert rig.take() == b"" and rig.queue.depth == 0


def test_closing_cancels_every_timer() -> None:
    """Waiting commands with expiries and the quiet timer leave nothing scheduled."""
    rig = Rig(quiet=5)
    handles = [rig.queue.submit(frame(f"c{i}"), CODEC_12, expires_in=10) for i in range(3)]
    rig.queue.close()
    for handle in handles:
        failureResultOf(handle.reply).trap(SocketClosedError)
    assert rig.clock.getDelayedCalls() == []


def frames_every(rig: Rig, period: float, count: int) -> None:
    """The device sends *count* frames *period* seconds apart (the last one now)."""
    for index in range(count):
        if index:
            rig.clock.advance(period)
        rig.queue.received()
        rig.queue.frame_received(rig.clock.seconds())


def test_no_quiet_path_while_a_periodic_frame_is_due() -> None:
    """A device reporting about once a second: one second after its last frame its next
    one is due, so the quiet interval alone does not let a command out; its next ACK
    does, or a silence of one and a half periods."""
    rig = Rig(quiet=1)
    frames_every(rig, 1.0, 3)
    rig.queue.submit(frame("getinfo"), CODEC_12)
    rig.clock.advance(1.0)
    assert rig.take() == b""
    frames_every(rig, 0.05, 2)  # the next frame (and one more: period now 0.05 s)
    rig.queue.write(ACK_1)
    rig.queue.ack_written()
    assert rig.take() == ACK_1 + frame("getinfo")

    silent = Rig(quiet=1)
    frames_every(silent, 1.0, 3)
    silent.queue.submit(frame("getinfo"), CODEC_12)
    silent.clock.advance(1.49)
    assert silent.take() == b""
    silent.clock.advance(0.01)
    assert silent.take() == frame("getinfo")


def test_a_slow_reporter_gets_its_command_after_the_quiet_interval() -> None:
    """Every 10 s: one second after a frame is mid-period, far from the next frame."""
    rig = Rig(quiet=1)
    frames_every(rig, 10.0, 2)
    rig.queue.submit(frame("getinfo"), CODEC_12)
    rig.clock.advance(1.0)
    assert rig.take() == frame("getinfo")


def test_the_window_around_a_slow_reporters_next_frame_is_bounded() -> None:
    """A device reporting every 10 minutes: only 5 s either side of its next frame's due
    time is kept for the ACK path, not half a period either side (which made a command
    wait up to 15 minutes, far beyond any sender's expiry); a command in that window
    goes at the window's end if the frame does not come, or right after its ACK."""
    rig = Rig(quiet=1)
    frames_every(rig, 600.0, 2)
    rig.clock.advance(590)
    rig.queue.submit(frame("early"), CODEC_12)
    assert rig.take() == frame("early")
    assert rig.queue.reply_received(reply("ok"))
    rig.clock.advance(6)  # 596 s after the last frame: 4 s before the next is due
    rig.queue.submit(frame("getinfo"), CODEC_12)
    rig.clock.advance(8.99)
    assert rig.take() == b""
    rig.clock.advance(0.01)
    assert rig.take() == frame("getinfo")
