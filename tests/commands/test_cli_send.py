"""``teltonika send`` end to end: a subprocess against a running server and a scripted device."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue

from teltonika.cli import main
from tests.commands.device import ScriptedDevice, connect_device, echo
from tests.commands.helpers import eventually, statuses
from tests.commands.instances import Instance

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
    result = ensureDeferred(sending)
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
