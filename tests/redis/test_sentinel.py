"""Sentinel URLs, the master discovery's schedule (on a Clock), the READONLY rule (on a
StringTransport), and what ``replicated`` verifies and confirms (pure)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from teltonika.redis.connect import (
    RedisAddress,
    RedisURLError,
    SentinelAddress,
    parse_redis_url,
    redact_url,
)
from teltonika.redis.connection import Reply
from teltonika.redis.durability import (
    Durability,
    DurabilityCheck,
    DurabilityError,
    ReplicasNotConfirmedError,
    replicas_confirmed,
)
from teltonika.redis.sentinel import (
    MasterDiscovery,
    MasterNotFoundError,
    master_state,
    usable_master,
)

# -- URLs -------------------------------------------------------------------------------

hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,15}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
    st.ip_addresses().map(str),
)
sentinels = st.lists(st.tuples(hosts, st.integers(1, 65535)), min_size=1, max_size=4)
names = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=20)
secrets = st.one_of(st.none(), st.text(string.ascii_letters + string.digits + "@:!", min_size=1))


@given(sentinels, names, st.integers(0, 15), secrets, st.booleans())
def test_sentinel_url_round_trip(
    nodes: list[tuple[str, int]], service: str, db: int, password: str | None, tls: bool
) -> None:
    """Every address written as a URL parses back to itself; str() shows no password."""
    from urllib.parse import quote

    hosts_text = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in nodes)
    scheme = "rediss+sentinel" if tls else "redis+sentinel"
    credentials = f":{quote(password, safe='')}@" if password else ""
    url = f"{scheme}://{credentials}{hosts_text}/{service}/{db}"
    address = parse_redis_url(url)
    assert address == SentinelAddress(
        sentinels=tuple(nodes), service=service, db=db, password=password, tls=tls
    )
    assert parse_redis_url(str(address)) == SentinelAddress(
        sentinels=tuple(nodes), service=service, db=db, tls=tls
    )
    if password:
        for text in (str(address), repr(address), redact_url(url)):
            assert f":{quote(password, safe='')}@" not in text


@given(st.text(max_size=80))
def test_any_text_parses_or_is_refused_plainly(text: str) -> None:
    """Hostile --redis text never raises anything but RedisURLError."""
    for url in (text, "redis+sentinel://" + text, "redis://" + text):
        try:
            address = parse_redis_url(url)
        except RedisURLError:
            continue
        assert isinstance(address, RedisAddress | SentinelAddress)


def test_sentinel_url_defaults_and_sentinel_password() -> None:
    address = parse_redis_url(
        "redis+sentinel://app:pw@s1,s2:26380/mymaster?sentinel_password=sp%40ss"
    )
    assert address == SentinelAddress(
        sentinels=(("s1", 26379), ("s2", 26380)),
        service="mymaster",
        db=0,
        username="app",
        password="pw",
        sentinel_password="sp@ss",
    )
    assert "sp@ss" not in repr(address) and "sp%40ss" not in redact_url(
        "redis+sentinel://s1/m?sentinel_password=sp%40ss"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "names the service"),
        ("redis+sentinel://s1:26379/", "names the service"),
        ("redis+sentinel:///svc", "no sentinel"),
        ("redis+sentinel://s1:0/svc", "bad sentinel port"),
        ("redis+sentinel://s1:x/svc", "bad sentinel port"),
        ("redis+sentinel://s1,,s2/svc", "bad sentinel host"),
        ("redis+sentinel://s1/svc/x", "must be a number"),
        ("redis+sentinel://s1/svc?password=x", "unknown parameter"),
    ],
)
def test_bad_sentinel_urls(url: str, message: str) -> None:
    with pytest.raises(RedisURLError, match=message):
        parse_redis_url(url)


# -- what a sentinel says ------------------------------------------------------------------


def _state(flags: str, ip: str = "10.0.0.1", port: str = "6379") -> list[Reply]:
    return ["name", "svc", "ip", ip, "port", port, "flags", flags]


@pytest.mark.parametrize(
    ("flags", "usable"),
    [
        ("master", True),
        ("master,s_down", False),
        ("master,s_down,o_down", False),
        ("master,failover_in_progress", False),
        ("master,disconnected", False),
        ("slave", False),
    ],
)
def test_usable_master(flags: str, usable: bool) -> None:
    found = usable_master(master_state(_state(flags)))
    assert found == (("10.0.0.1", 6379) if usable else None)


@given(st.lists(st.one_of(st.text(), st.binary(), st.integers(), st.none()), max_size=12))
def test_any_sentinel_reply_is_judged_without_raising(reply: list[object]) -> None:
    usable_master(master_state(reply))


# -- discovery on a Clock ----------------------------------------------------------------


class Sentinels:
    """What each sentinel answers at each round: a list of replies per sentinel, the
    last repeated; ``None`` leaves the question unanswered (a hung sentinel)."""

    def __init__(self, *scripts: list[Reply | Exception]) -> None:
        self.scripts = [list(script) for script in scripts]
        self.asked = [0] * len(scripts)

    def ask(self, index: int) -> Deferred[Reply]:
        script = self.scripts[index]
        reply = script[min(self.asked[index], len(script) - 1)]
        self.asked[index] += 1
        if reply is None:
            return Deferred()
        if isinstance(reply, Exception):
            return fail(reply)
        return succeed(reply)


def test_discovery_asks_again_every_interval_until_a_usable_master() -> None:
    """The old master is marked down for three rounds, then the new one is named: found
    at the fourth round, 0.6 s in (txredisapi's discovery would have waited 10 s)."""
    clock = Clock()
    down, new = _state("master,s_down"), _state("master", ip="10.0.0.2")
    sentinels = Sentinels([down, down, down, new], [ConnectionError("refused")])
    found: list[object] = []
    MasterDiscovery(sentinels.ask, 2, "svc", clock).discover().addCallback(found.append)
    for _ in range(2):
        clock.advance(0.2)
    assert found == [] and sentinels.asked == [3, 3]
    clock.advance(0.2)
    assert found == [("10.0.0.2", 6379)]
    assert sentinels.asked[0] == 4


def test_first_usable_answer_wins_over_a_hung_sentinel() -> None:
    clock = Clock()
    sentinels = Sentinels([None], [_state("master")])
    found: list[object] = []
    MasterDiscovery(sentinels.ask, 2, "svc", clock).discover().addCallback(found.append)
    assert found == [("10.0.0.1", 6379)]


def test_discovery_is_bounded() -> None:
    """No sentinel names a usable master: MasterNotFoundError after the timeout, with
    what the sentinels said; hung questions time out on their own."""
    clock = Clock()
    sentinels = Sentinels([None], [_state("master,o_down")])
    failures: list[object] = []
    discovery = MasterDiscovery(sentinels.ask, 2, "svc", clock, timeout=2.0, ask_timeout=0.5)
    discovery.discover().addErrback(failures.append)
    for _ in range(40):
        clock.advance(0.1)
    assert len(failures) == 1
    error = failures[0].value  # type: ignore[attr-defined]
    assert isinstance(error, MasterNotFoundError)
    assert "o_down" in str(error) and "svc" in str(error)
    assert not clock.getDelayedCalls()


# -- READONLY closes the connection (StringTransport) ------------------------------------


def test_readonly_reply_drops_the_connection() -> None:
    """A master demoted under a live connection answers READONLY: the command fails and
    the connection is closed, so the next attempt rediscovers the master."""
    import txredisapi

    from teltonika.redis.sentinel import _master_protocol

    protocol = _master_protocol(txredisapi.HiredisProtocol)(replyTimeout=None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.value() == b"*1\r\n$4\r\nROLE\r\n"
    protocol.dataReceived(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
    assert protocol._ready and transport.disconnecting == False  # noqa: E712 (`not` would narrow it for mypy past the next call)
    result: list[object] = []
    protocol.execute_command("SET", "k", "v").addBoth(result.append)
    protocol.dataReceived(b"-READONLY You can't write against a read only replica.\r\n")
    assert transport.disconnecting
    assert isinstance(result[0].value, txredisapi.ResponseError)  # type: ignore[attr-defined]


def test_a_replica_at_connect_is_dropped(logged_errors: object) -> None:
    import txredisapi

    from teltonika.redis.sentinel import _master_protocol

    protocol = _master_protocol(txredisapi.HiredisProtocol)(replyTimeout=None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:1\r\n"
    )
    assert transport.disconnecting and not protocol._ready


# -- replicated durability (pure) --------------------------------------------------------


def test_replicated_verifies_role_and_replica_count() -> None:
    check = DurabilityCheck("replicated", replicas=2)
    check._judge_replication("master", 2)
    with pytest.raises(DurabilityError, match="1 replica"):
        check._judge_replication("master", 1)
    with pytest.raises(DurabilityError, match="not a master"):
        check._judge_replication("slave", 0)


def test_only_online_replicas_count() -> None:
    from teltonika.redis.durability import _online_replicas

    info = (
        "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n"
        "slave0:ip=127.0.0.1,port=7001,state=online,offset=42,lag=0\r\n"
        "slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=0\r\n"
        "slave_read_repl_offset:1\r\n"
    )
    assert _online_replicas(info) == 1
    assert _online_replicas(info.encode()) == 1
    assert _online_replicas(None) == 0


def test_replicated_batches_end_with_wait_and_need_the_count() -> None:
    check = DurabilityCheck("replicated", replicas=2, replica_timeout=1.5)
    assert check.batch_commands(Durability.REPLICATED)[0] == (b"WAIT", b"2", b"1500")
    assert check.batch_commands(Durability.REPLICATED_WAITAOF)[0] == (
        b"WAITAOF",
        b"1",
        b"2",
        b"1500",
    )
    name = "teltonika-durability-checked"
    check.confirm(Durability.REPLICATED, [2, name])
    with pytest.raises(ReplicasNotConfirmedError, match="1 of 2"):
        check.confirm(Durability.REPLICATED, [1, name])
    with pytest.raises(ReplicasNotConfirmedError):
        check.confirm(Durability.REPLICATED_WAITAOF, [[0, 2], name])  # no local fsync
    check.confirm(Durability.REPLICATED_WAITAOF, [[1, 2], name])


@given(st.one_of(st.none(), st.integers(), st.text(), st.binary(), st.lists(st.integers())))
def test_any_wait_reply_counts_without_raising(reply: object) -> None:
    for durability in (Durability.REPLICATED, Durability.REPLICATED_WAITAOF):
        assert isinstance(replicas_confirmed(reply, durability), int)


@pytest.mark.parametrize(("replicas", "timeout"), [(0, 1.0), (1, 0.0)])
def test_replicated_needs_a_replica_and_a_timeout(replicas: int, timeout: float) -> None:
    with pytest.raises(DurabilityError):
        DurabilityCheck("replicated", replicas=replicas, replica_timeout=timeout)
