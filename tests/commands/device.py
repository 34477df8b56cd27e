"""A scripted tracker over real TCP: logs in, answers command frames, records what it got."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from teltonika.wire import decode_messages, encode_login, encode_message, unwrap, wrap
from teltonika.wire.records import CODEC_14, MESSAGE_TYPE_RESPONSE, DeviceMessage

Responder = Callable[[DeviceMessage], bytes | None]


def echo(tag: str) -> Responder:
    """Answer every command with ``"<tag>:<command text>"`` in the command's codec."""

    def respond(message: DeviceMessage) -> bytes | None:
        payload = f"{tag}:{message.payload.decode()}".encode()
        return reply_frame(message.codec_id, payload, message.imei)

    return respond


def reply_frame(codec_id: int, payload: bytes, imei: str | None = None) -> bytes:
    """A device's type 0x06 reply frame."""
    return wrap(
        encode_message(
            codec_id, payload, MESSAGE_TYPE_RESPONSE, imei=imei if codec_id == CODEC_14 else None
        )
    )


class ScriptedDevice(Protocol):
    """Logs in as *imei*; every command frame received is recorded and answered by
    *respond* (None: stay silent)."""

    def __init__(self, imei: str, respond: Responder | None) -> None:
        self.imei = imei
        self.respond = respond
        self.accepted: Deferred[bool] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.commands: list[DeviceMessage] = []
        self.acks: list[int] = []
        self._buffer = b""
        self._logged_in = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(encode_login(self.imei))

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._logged_in:
            verdict, self._buffer = self._buffer[0], self._buffer[1:]
            self._logged_in = verdict == 1
            self.accepted.callback(self._logged_in)
        while len(self._buffer) >= 4:
            if self._buffer[:4] != b"\x00\x00\x00\x00":
                self.acks.append(int.from_bytes(self._buffer[:4], "big"))
                self._buffer = self._buffer[4:]
                continue
            if len(self._buffer) < 8:
                return
            size = 8 + int.from_bytes(self._buffer[4:8], "big") + 4
            if len(self._buffer) < size:
                return
            frame, self._buffer = self._buffer[:size], self._buffer[size:]
            message = decode_messages(frame, 8, unwrap(frame)).messages[0]
            self.commands.append(message)
            if self.respond is not None:
                answer = self.respond(message)
                if answer is not None and self.transport is not None:
                    self.transport.write(answer)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.accepted.called:
            self.accepted.callback(False)
        self.lost.callback(None)

    async def close(self) -> None:
        if self.transport is not None and not self.lost.called:
            self.transport.loseConnection()
        await self.lost


async def connect_device(
    reactor: Any, port: int, imei: str, respond: Responder | None = None
) -> ScriptedDevice:
    """Connect and log in; fails if the server refuses the login."""
    device = ScriptedDevice(imei, respond)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), device)
    assert await device.accepted, f"login of {imei} refused"
    return device
