"""Token-file authentication, connection limits, ``seen`` and the shutdown drain, through
the real ``twistd teltonika-processor --live --live-auth token-file:PATH``."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.processor.live.helpers import Env, connect, entry, imei, now_ms, wait_table

pytestmark = pytest.mark.slow


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest_twisted.ensureDeferred
async def test_tokens_limits_seen_and_drain(live_env: Env, clients: list[Any]) -> None:
    """A known bearer token is its user, an unknown one 4401; a user's third connection
    and the server's fifth are refused with TOO_MANY_CONNECTIONS and 4429; a late record
    becomes a seen message; SIGTERM ends subscriptions with complete SHUTDOWN and
    closes 4503."""
    tokens = live_env.tmp / "tokens"
    tokens.write_text("# token user\nt-alice alice\nt-bob bob\nt-carol carol\n")
    proc = live_env.processor(
        "live-tokens",
        "--live-auth",
        f"token-file:{tokens}",
        "--live-max-per-user",
        "2",
        "--live-max-connections",
        "4",
        "--live-seen-interval",
        "0.5",
        "--live-drain",
        "0.5",
    )
    await deferToThread(wait_table, live_env.dsn)
    alice = [await connect(proc.port, headers=bearer("t-alice")) for _ in range(2)]
    clients += alice
    assert [(await c.next("hello"))["user"] for c in alice] == ["alice", "alice"]
    third = await connect(proc.port, headers=bearer("t-alice"))
    assert (await third.next("error"))["error"]["code"] == "TOO_MANY_CONNECTIONS"
    assert (await third.wait_closed())[0] == 4429
    unknown = await connect(proc.port, headers=bearer("t-mallory"))
    assert (await unknown.next("error"))["error"]["code"] == "UNAUTHENTICATED"
    assert (await unknown.wait_closed())[0] == 4401
    bob = await connect(proc.port, headers=bearer("t-bob"))
    clients.append(bob)
    await bob.next("hello")
    carol = await connect(proc.port, headers=bearer("t-carol"))
    clients.append(carol)
    await carol.next("hello")
    fifth = await connect(proc.port, headers=bearer("t-bob"))
    assert (await fifth.next("error"))["error"]["code"] == "TOO_MANY_CONNECTIONS"
    assert (await fifth.wait_closed())[0] == 4429

    device = imei(600)
    bob.send({"type": "subscribe", "id": "b", "devices": [device]})
    await bob.next("snapshot")
    base = now_ms()
    live_env.xadd(entry(device, base, rx=base + 10), entry(device, base - 5_000, rx=base + 900))
    assert (await bob.next("positions"))["positions"][0]["ts"] == base
    seen = await bob.next("seen", timeout=10)
    assert seen["devices"] == [{"device": device, "seen": base + 900}]

    proc.process.send_signal(signal.SIGTERM)
    complete = await bob.next("complete")
    assert (complete["id"], complete["reason"]) == ("b", "SHUTDOWN")
    assert (await bob.wait_closed())[0] == 4503
    assert (await carol.wait_closed())[0] == 4503
    await deferToThread(proc.process.wait, 30)
    assert proc.process.returncode == -signal.SIGTERM  # twistd's exit after a signal
    assert "Live broadcast stopped" in proc.log.read_text()
