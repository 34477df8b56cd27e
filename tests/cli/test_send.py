"""``teltonika send`` end to end: a subprocess against a running server and a scripted device."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from teltonika.cli import main
from teltonika.cli import send as cli_send
from teltonika.commands import client
from teltonika.commands.client import store_offline
from teltonika.commands.messages import Command, pairs
from teltonika.redis.connect import parse_redis_url
from tests.commands.device import ScriptedDevice, connect_device, echo
from tests.commands.helpers import publish, statuses
from tests.commands.instances import Instance
from tests.helpers import eventually

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
IMEI = "352093081452251"


async def send(redis_url: str, *args: str) -> tuple[int, str, str]:
    """Run ``python -m teltonika send --redis URL ARGS`` without blocking the reactor."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        ["-m", "teltonika", "send", "--redis", redis_url, *args],
        env=env,
        path=str(REPO),
        reactor=reactor,
    )
    return code, out.decode(), err.decode()


@pytest_twisted.async_yield_fixture
async def server(redis_url: str) -> AsyncIterator[Instance]:
    instance = await Instance(redis_url, "a").start()
    yield instance
    await instance.stop()


@pytest_twisted.ensureDeferred
async def test_send_prints_the_reply(redis_url: str, redis: Any, server: Instance) -> None:
    """The reply text on stdout, exit 0."""
    device = await connect_device(reactor, server.port, IMEI, echo("FMB920"))
    try:
        await eventually(lambda: _registered(redis))
        code, out, err = await send(redis_url, IMEI, "getinfo", "--id", "cli-1")
        assert (code, out) == (0, "FMB920:getinfo\n"), err
        assert [m.payload for m in device.commands] == [b"getinfo"]
        code, out, err = await send(redis_url, IMEI, "getver", "--codec", "14", "-q")
        assert (code, out, err) == (0, "FMB920:getver\n", "")
        assert device.commands[-1].imei == IMEI
    finally:
        await device.close()


@pytest_twisted.ensureDeferred
async def test_send_failures_exit_non_zero(redis_url: str, redis: Any, server: Instance) -> None:
    """An unknown device: 'failed: device_not_connected', exit 1. A silent device with
    --timeout: 'failed: timeout', exit 1."""
    code, out, err = await send(redis_url, "490154203237518", "getinfo")
    assert code == 1 and out == "" and "failed: device_not_connected" in err
    silent = await connect_device(reactor, server.port, IMEI)
    try:
        await eventually(lambda: _registered(redis))
        code, out, err = await send(redis_url, IMEI, "getinfo", "--timeout", "0.3", "--id", "t")
        assert code == 1 and "failed: timeout" in err
        assert [s["status"] for s in await statuses(redis, "t")] == ["delivered", "failed"]
    finally:
        await silent.close()


@pytest_twisted.ensureDeferred
async def test_send_waits_for_the_device(redis_url: str, redis: Any, server: Instance) -> None:
    """With --wait-for-device the command waits in Redis; the device logs in later and
    the reply is printed."""
    sending = send(redis_url, IMEI, "setdigout 1", "--wait-for-device", "30", "--id", "w")
    result = Deferred.fromCoroutine(sending)
    await eventually(lambda: redis.exists("commands:offline:command:w"))
    device: ScriptedDevice = await connect_device(reactor, server.port, IMEI, echo("late"))
    try:
        code, out, err = await result
        assert (code, out) == (0, "late:setdigout 1\n"), err
        assert "queued" in err
    finally:
        await device.close()


def test_send_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad arguments exit 3 with a sentence, before touching Redis."""
    assert main(["send", "--redis", "http://x", IMEI, "getinfo"]) == 3
    assert "redis://" in capsys.readouterr().err
    assert main(["send", "--redis", "redis://127.0.0.1:1/0", "12", "getinfo"]) == 3
    assert "imei" in capsys.readouterr().err
    assert main(["send", "--redis", "redis://x", IMEI, "getinfo", "--timeout", "0"]) == 3


async def _registered(redis: Any) -> bool:
    return bool(await redis.hget("connections:registry", IMEI) == "a")


def parse_send(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_send.add_arguments(parser)
    return parser.parse_args(["--redis", "redis://unused", IMEI, *argv])


def make_command(args: argparse.Namespace) -> Command:
    return Command(
        id=args.id or "cli-x", imei=IMEI, payload=args.command.encode(), timeout_s=args.timeout
    )


async def run_send(redis_url: str, *argv: str) -> int:
    """``teltonika send`` in this process (its coroutine on the test's reactor)."""
    args = parse_send(*argv)
    assert not cli_send._expiry_problem(args)
    outcome: dict[str, Any] = {}
    await cli_send._send(reactor, parse_redis_url(redis_url), make_command(args), args, outcome)
    status: int = outcome["status"]
    return status


SETTINGS = (
    '{"at_ms":1,"command_timeout_s":45,"command_quiet_s":0.1,"command_settle_s":0.1,'
    '"command_due_margin_s":0.5}'
)


async def fake_instance(redis: Any) -> None:
    """A live instance "z" holding IMEI (registry + heartbeat), with no server behind."""
    await redis.hset("connections:registry", IMEI, "z")
    await redis.set("instance:heartbeat:z", SETTINGS)


async def entries_of(redis: Any, stream: str) -> list[dict[str, str]]:
    return [pairs(list(v)) for _id, v in await redis.execute_command("XRANGE", stream, "-", "+")]


@pytest_twisted.ensureDeferred
async def test_an_unreachable_redis_is_a_plain_sentence(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Redis that accepts the connection but never answers: exit 3 and a sentence, not
    ``Redis error: TimeoutError(5.0, 'Deferred')``."""
    monkeypatch.setattr(cli_send, "CONNECT_TIMEOUT", 0.3)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        code = await run_send(f"redis://127.0.0.1:{port}/0", "getinfo")
    assert code == 3
    err = capsys.readouterr().err
    assert "did not answer within 0.3 s" in err and "Deferred" not in err


@pytest_twisted.ensureDeferred
async def test_a_duplicate_id_says_so(
    redis_url: str, redis: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """An id already used by a stored offline command, or by a command still unsettled
    on the instance, is refused with exit 3 and a sentence saying so."""
    stored = Command(id="dup", imei=IMEI, payload=b"x", offline=True, expires_at_ms=2**50)
    await store_offline(redis, stored, 1)
    assert await run_send(redis_url, "getinfo", "--id", "dup", "--wait-for-device", "5") == 3
    assert "command id dup is already in use" in capsys.readouterr().err
    assert await run_send(redis_url, "getinfo", "--id", "dup") == 3
    assert "command id dup is already in use" in capsys.readouterr().err
    await fake_instance(redis)
    await publish(redis, "z", IMEI, "getver", id="busy")
    assert await run_send(redis_url, "getinfo", "--id", "busy") == 3
    assert "already in use (a command with this id is on z)" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_the_default_expiry_and_wait_follow_the_queue_ahead(
    redis_url: str, redis: Any
) -> None:
    """The command gets an expiry: by when it should have been written, i.e. after the
    command queued ahead of it (timeout_s 100) and one without a timeout (the instance's
    announced 45 s), each with the announced settle interval and the longest wait for a
    write moment (quiet interval plus twice the margin around a periodic device's next
    frame), the same for itself, plus 5 s of routing. send waits until then plus its own
    timeout (7 s) plus 5 s."""
    await fake_instance(redis)
    await publish(redis, "z", IMEI, "getver", timeout_s=100)
    await publish(redis, "z", IMEI, "getio")
    await publish(redis, "z", "490154203237518", "getinfo")  # another device's: not ahead
    deadlines: list[float] = []
    wait_for_terminal = client.wait_for_terminal

    async def spy(redis: Any, command_id: str, after: str, deadline: float, *rest: Any) -> Any:
        deadlines.append(deadline)
        return await wait_for_terminal(redis, command_id, after, deadline, *rest)

    started = reactor.seconds()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client, "wait_for_terminal", spy)
        sending = Deferred.fromCoroutine(
            run_send(redis_url, "setdigout 1", "--id", "mine", "--timeout", "7")
        )
        stream = "commands:outbound:z"
        [entry] = await eventually(
            lambda: _matching(entries_of(redis, stream), lambda e: e.get("id") == "mine")
        )
        moment = 0.1 + 2 * 0.5
        window = (0.1 + moment + 100) + (0.1 + moment + 45) + (0.1 + moment) + 5.0
        expires_s = int(entry["expires_at_ms"]) / 1000
        assert started + window - 0.5 <= expires_s <= reactor.seconds() + window
        assert entry["timeout_s"] == "7"
        await redis.execute_command(
            "XADD", "commands:responses", "*", "id", "mine", "status", "responded", "response", "ok"
        )
        assert await sending == 0
    assert deadlines == [pytest.approx(expires_s + 7 + cli_send.MARGIN, abs=0.01)]


@pytest.mark.parametrize(
    ("argv", "delivered", "says"),
    [
        (["--expires", "0.2"], False, "no server reported delivering it, and none writes it"),
        (["--no-expiry"], False, "it has no expiry: it may still be delivered and run later"),
        (["--expires", "0", "--no-expiry"], True, "delivered to the device, which may have"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_exit_2_says_whether_the_command_can_still_run(
    redis_url: str,
    redis: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    delivered: bool,
    says: str,
) -> None:
    monkeypatch.setattr(cli_send, "MARGIN", 0.2)
    monkeypatch.setattr(client, "ROUTING_MARGIN", 0.2)
    await fake_instance(redis)
    sending = Deferred.fromCoroutine(
        run_send(redis_url, "getinfo", "--id", "late", "--timeout", "0.2", *argv)
    )
    if delivered:
        await eventually(lambda: redis.exists("commands:outbound:z"))
        await redis.execute_command(
            "XADD", "commands:responses", "*", "id", "late", "status", "delivered"
        )
    assert await sending == 2
    assert says in capsys.readouterr().err


def test_expiry_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    """--expires 0 needs --no-expiry; --expires S with --no-expiry, or with
    --wait-for-device, is refused."""
    for argv, words in [
        (["--expires", "0"], "add --no-expiry"),
        (["--expires", "5", "--no-expiry"], "contradict"),
        (["--expires", "5", "--wait-for-device", "9"], "--wait-for-device S is the expiry"),
        (["--expires", "-1"], "between 0 and"),
    ]:
        assert main(["send", "--redis", "redis://127.0.0.1:1/0", IMEI, "getinfo", *argv]) == 3
        assert words in capsys.readouterr().err


async def _matching(entries: Any, predicate: Any) -> list[dict[str, str]]:
    return [e for e in await entries if predicate(e)]


@pytest.mark.parametrize(
    ("reason", "delivered", "says"),
    [
        ("timeout", True, "did not answer within the command's timeout; it was delivered, so "
         "the device may have run it"),
        ("instance_gone", False, "died before it answered; no delivered status was seen, so it "
         "most likely did not run"),
        ("expired", False, "its expiry passed before it could be written; it was not sent and "
         "will not be"),
        ("nack", True, "the device refused it (codec 14: the IMEI is not its own); it did not run"),
        ("brand_new", False, "the server gave no known reason"),
    ],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_exit_1_names_the_reason_and_what_it_means(
    redis_url: str,
    redis: Any,
    capsys: pytest.CaptureFixture[str],
    reason: str,
    delivered: bool,
    says: str,
) -> None:
    """A failed status exits 1 with the reason, what it means, and whether the device may
    have run the command (from the delivered status)."""
    await fake_instance(redis)
    sending = Deferred.fromCoroutine(run_send(redis_url, "getinfo", "--id", "f", "-q"))
    await eventually(lambda: redis.exists("commands:outbound:z"))
    if delivered:
        await redis.execute_command(
            "XADD", "commands:responses", "*", "id", "f", "status", "delivered"
        )
    await redis.execute_command(
        "XADD", "commands:responses", "*", "id", "f", "status", "failed", "reason", reason
    )
    assert await sending == 1
    err = capsys.readouterr().err
    assert err.startswith(f"failed: {reason} (command f): ") and says in err, err
