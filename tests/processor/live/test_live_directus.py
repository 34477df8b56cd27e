"""Authentication and authorization against a real HTTP stand-in for Directus, through
the real ``twistd teltonika-processor --live --live-auth directus:URL``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from tests.processor.live.directus_stub import DirectusStub
from tests.processor.live.helpers import (
    Env,
    LiveProcessor,
    connect,
    eventually,
    imei,
    wait_table,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def directus() -> Iterator[DirectusStub]:
    stub = DirectusStub()
    stub.start()
    yield stub
    stub.port.stopListening()


@pytest.fixture(scope="module")
def proc(live_env: Env, directus: DirectusStub) -> LiveProcessor:
    token = live_env.tmp / "directus-token"
    token.write_text("service-token\n")
    process = live_env.processor(
        "live-d",
        "--live-auth",
        f"directus:http://127.0.0.1:{directus.port.getHost().port}",
        "--live-directus-token-file",
        str(token),
        "--live-reauth",
        "2",
        "--live-resolve-interval",
        "1",
        "--live-max-per-user",
        "60",
        "--live-directus-timeout",
        "10",  # a loaded machine may need seconds to open the 50 connections at once
    )
    wait_table(live_env.dsn)
    return process


def cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"theme=dark; directus_session_token={token}; other=secret"}


@pytest_twisted.ensureDeferred
async def test_session_cookie_only_is_forwarded(
    proc: LiveProcessor, directus: DirectusStub, clients: list[Any]
) -> None:
    """200 with data.id authenticates (cookie or bearer); Directus receives the session
    cookie and nothing else of the client's (no other cookie, no client headers), and
    its Set-Cookie is never sent back on a later call."""
    directus.users.update({"tok-ok": "u-1", "tok-bearer": "u-2"})
    client = await connect(proc.port, headers={**cookie("tok-ok"), "X-Client": "mine"})
    bearer = await connect(proc.port, headers={"Authorization": "Bearer tok-bearer"})
    clients += [client, bearer]
    assert (await client.next("hello"))["user"] == "u-1"
    assert (await bearer.next("hello"))["user"] == "u-2"
    calls = directus.calls("/users/me")
    with_cookie = [h for h in calls if "cookie" in h]
    assert [h["cookie"] for h in with_cookie] == ["directus_session_token=tok-ok"]
    assert all("x-client" not in h and "secret" not in str(h) for h in calls)
    assert all(h["accept"] == "application/json" for h in calls)
    assert [h.get("authorization") for h in calls if "cookie" not in h] == ["Bearer tok-bearer"]


@pytest_twisted.ensureDeferred
async def test_refusals_close_after_the_handshake(
    proc: LiveProcessor, directus: DirectusStub
) -> None:
    """No credential, 401 and 403 INVALID_TOKEN: UNAUTHENTICATED and 4401; 429 and 5xx:
    UPSTREAM_UNAVAILABLE and 4503. The handshake itself succeeds each time."""
    directus.users.update({"tok-401": 401, "tok-403": 403, "tok-429": 429, "tok-502": 502})
    cases = [
        ({}, 4401),
        *(
            (cookie(f"tok-{s}"), c)
            for s, c in (("401", 4401), ("403", 4401), ("429", 4503), ("502", 4503))
        ),
    ]
    for headers, code in cases:
        client = await connect(proc.port, headers=headers)  # the handshake finished
        error = await client.next("error")
        expected = "UNAUTHENTICATED" if code == 4401 else "UPSTREAM_UNAVAILABLE"
        assert error["error"]["code"] == expected and "id" not in error
        assert (await client.wait_closed())[0] == code


@pytest_twisted.ensureDeferred
async def test_slow_upstream(live_env: Env, directus: DirectusStub) -> None:
    """Directus answering after more than the default 3 s: the handshake (autobahn's
    timeout is 5 s) still completes, then UPSTREAM_UNAVAILABLE and 4503."""
    directus.users["tok-slow"] = "slow"
    proc = live_env.processor(
        "live-d-slow", "--live-auth", f"directus:http://127.0.0.1:{directus.port.getHost().port}"
    )
    client = await connect(proc.port, headers=cookie("tok-slow"))
    assert (await client.next("error"))["error"]["code"] == "UPSTREAM_UNAVAILABLE"
    assert (await client.wait_closed())[0] == 4503


@pytest_twisted.ensureDeferred
async def test_cache(proc: LiveProcessor, directus: DirectusStub) -> None:
    """A reconnect with the same credential does not call Directus again (success and
    refusal are both cached)."""
    directus.users.update({"tok-cache": "u-3", "tok-cache-no": 401})
    for _ in range(2):
        client = await connect(proc.port, headers=cookie("tok-cache"))
        await client.next("hello")
        client.sendClose(1000)  # a page reload: the old socket goes, a new one comes
        await client.wait_closed()
        refused = await connect(proc.port, headers=cookie("tok-cache-no"))
        await refused.wait_closed()
    calls = [h["cookie"] for h in directus.calls("/users/me") if "cookie" in h]
    assert calls.count("directus_session_token=tok-cache") == 1
    assert calls.count("directus_session_token=tok-cache-no") == 1


@pytest_twisted.ensureDeferred
async def test_one_call_in_flight(
    proc: LiveProcessor, directus: DirectusStub, clients: list[Any]
) -> None:
    """Fifty simultaneous connects with one cookie make one Directus call."""
    directus.users["tok-many"] = "hold:u-many"
    pending = [
        Deferred.fromCoroutine(connect(proc.port, headers=cookie("tok-many"))) for _ in range(50)
    ]
    # every handshake waits for its answer, and the one call reached the stand-in
    await eventually(
        lambda: directus.held and proc.metric("teltonika_processor_live_authenticating") == 50,
        timeout=20,
    )
    directus.release()
    opened = await gatherResults(pending)
    clients += opened
    for client in opened:
        assert (await client.next("hello"))["user"] == "u-many"
    calls = [h for h in directus.calls("/users/me") if "tok-many" in h.get("cookie", "")]
    assert len(calls) == 1


@pytest_twisted.ensureDeferred
async def test_event_authorization_membership_and_revocation(
    proc: LiveProcessor, directus: DirectusStub, clients: list[Any]
) -> None:
    """An event readable with the user's credential is subscribed with its entries (read
    with the service token); another is FORBIDDEN; devices subscriptions need every
    device readable; a new entry becomes a devices message; a revoked right ends the
    subscription with complete REVOKED."""
    directus.users["tok-ev"] = "u-ev"
    directus.events.update({"7": {"u-ev"}, "8": set()})
    directus.entries["7"] = [{"id": 117, "imei": imei(70), "label": "#205"}]
    directus.devices["u-ev"] = {imei(71)}
    client = await connect(proc.port, headers=cookie("tok-ev"))
    clients.append(client)
    await client.next("hello")
    client.send({"type": "subscribe", "id": "e7", "event": "7"})
    snapshot = await client.next("snapshot")
    assert [(d["device"], d["entry"], d["label"]) for d in snapshot["devices"]] == [
        (imei(70), "117", "#205")
    ]
    client.send({"type": "subscribe", "id": "e8", "event": "8"})
    assert (await client.next("error"))["error"]["code"] == "FORBIDDEN"
    client.send({"type": "subscribe", "id": "d1", "devices": [imei(71)]})
    assert (await client.next("snapshot"))["id"] == "d1"
    client.send({"type": "subscribe", "id": "d2", "devices": [imei(71), imei(72)]})
    error = await client.next("error")
    assert (error["id"], error["error"]["code"]) == ("d2", "FORBIDDEN")
    directus.entries["7"].append({"id": 118, "imei": imei(73), "label": "#212"})
    changed = await client.next("devices", timeout=15)
    assert [d["device"] for d in changed["added"]] == [imei(73)] and changed["removed"] == []
    directus.events["7"] = set()
    complete = await client.next("complete", timeout=15)
    assert (complete["id"], complete["reason"]) == ("e7", "REVOKED")


@pytest_twisted.ensureDeferred
async def test_expired_session_closes_4401(
    proc: LiveProcessor, directus: DirectusStub, clients: list[Any]
) -> None:
    """A session Directus stops accepting is noticed at the next re-check
    (--live-reauth 2 here): UNAUTHENTICATED, then close 4401."""
    directus.users["tok-expiring"] = "u-exp"
    client = await connect(proc.port, headers=cookie("tok-expiring"))
    clients.append(client)
    assert (await client.next("hello"))["user"] == "u-exp"
    directus.users["tok-expiring"] = 401
    error = await client.next("error", timeout=15)
    assert error["error"]["code"] == "UNAUTHENTICATED" and "id" not in error
    assert (await client.wait_closed())[0] == 4401
