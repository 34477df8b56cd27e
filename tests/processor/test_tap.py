"""Options, --help, the plugin, and makeService with a MemoryReactor."""

from __future__ import annotations

import sys
from typing import cast

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins
from twisted.python import usage

from teltonika.interfaces import IProcessReactor
from teltonika.processor import tap
from teltonika.processor.tap import Options, makeService


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults are the documented ones; the DSN can come from the environment."""
    monkeypatch.setenv("TELTONIKA_POSTGRES_DSN", "postgresql://u:secret@db/x")
    monkeypatch.delenv("TELTONIKA_REDIS_URL", raising=False)
    o = parse()
    assert o["postgres"] == "postgresql://u:secret@db/x"
    assert o["redis"] == "redis://127.0.0.1:6379/0"
    assert (o["group"], o["batch-size"], o["claim-idle"], o["max-deliveries"]) == (
        "processor",
        500,
        60.0,
        5,
    )
    assert (o["state-size"], o["trim"], o["shutdown-timeout"]) == (100_000, 0, 15.0)
    assert (o["statement-timeout"], o["lock-timeout"], o["retire-idle-consumers"]) == (
        15.0,
        5.0,
        0.0,
    )
    assert o["metrics"] == "tcp:9106:interface=127.0.0.1"
    assert o["consumer"]


def test_timeouts_and_retirement_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timeouts below --claim-idle and a retirement age at least --claim-idle are taken."""
    monkeypatch.delenv("TELTONIKA_POSTGRES_DSN", raising=False)
    o = parse(
        "--postgres",
        "x",
        "--claim-idle",
        "30",
        "--statement-timeout",
        "29",
        "--lock-timeout",
        "0.5",
        "--retire-idle-consumers",
        "30",
    )
    assert (o["statement-timeout"], o["lock-timeout"], o["retire-idle-consumers"]) == (
        29.0,
        0.5,
        30.0,
    )


def test_timeout_defaults_follow_a_short_claim_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a --claim-idle shorter than the timeouts' defaults, the defaults shrink."""
    monkeypatch.delenv("TELTONIKA_POSTGRES_DSN", raising=False)
    o = parse("--postgres", "x", "--claim-idle", "12")
    assert (o["statement-timeout"], o["lock-timeout"]) == (3.0, 1.0)
    assert o["refresh-interval"] == 3.0
    assert parse("--postgres", "x")["refresh-interval"] == 5.0


def test_refresh_interval_is_at_most_half_of_claim_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A held entry idles up to one refresh interval (plus one refresh's duration): the
    interval must leave half of --claim-idle for that, and reaches the consumer."""
    monkeypatch.delenv("TELTONIKA_POSTGRES_DSN", raising=False)
    o = parse("--postgres", "x", "--claim-idle", "10", "--refresh-interval", "5")
    assert o["refresh-interval"] == 5.0
    service = makeService(o)
    assert service.processor.consumer.config.refresh_interval == 5.0
    with pytest.raises(usage.UsageError, match="at most half of --claim-idle"):
        parse("--postgres", "x", "--claim-idle", "10", "--refresh-interval", "5.01")
    with pytest.raises(usage.UsageError):
        parse("--postgres", "x", "--refresh-interval", "0")


def test_overrides_and_metrics_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELTONIKA_POSTGRES_DSN", raising=False)
    o = parse(
        "--postgres",
        "dbname=x",
        "--metrics",
        "9200",
        "--trim",
        "--batch-size",
        "50",
        "--consumer",
        "p2",
        "--redis",
        "redis://h:6390/2",
    )
    assert o["metrics"] == "tcp:9200:interface=127.0.0.1"
    assert (o["trim"], o["batch-size"], o["consumer"]) == (1, 50, "p2")
    assert parse("--postgres", "x", "--metrics", "off")["metrics"] is None


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no DSN anywhere
        ["--postgres", "x", "--redis", "http://nope"],
        ["--postgres", "x", "--batch-size", "0"],
        ["--postgres", "x", "--claim-idle", "-1"],
        ["--postgres", "x", "--consumer", ""],
        ["--postgres", "x", "--statement-timeout", "60"],  # not below --claim-idle
        ["--postgres", "x", "--statement-timeout", "5", "--claim-idle", "4"],
        ["--postgres", "x", "--lock-timeout", "30", "--claim-idle", "20"],
        ["--postgres", "x", "--lock-timeout", "0"],
        ["--postgres", "x", "--retire-idle-consumers", "30"],  # below --claim-idle
        ["--postgres", "x", "--retire-idle-consumers", "-1"],
    ],
)
def test_bad_options(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELTONIKA_POSTGRES_DSN", raising=False)
    with pytest.raises(usage.UsageError):
        parse(*argv)


def test_help_documents_every_option_with_its_default() -> None:
    text = " ".join(str(Options()).split())
    for name in (
        "--redis",
        "--postgres",
        "--group",
        "--consumer",
        "--batch-size",
        "--block-ms",
        "--claim-idle",
        "--max-deliveries",
        "--state-size",
        "--metrics",
        "--trim",
        "--shutdown-timeout",
        "--statement-timeout",
        "--lock-timeout",
        "--retire-idle-consumers",
        "--refresh-interval",
        "TELTONIKA_POSTGRES_DSN",
    ):
        assert name in text
    assert "[default: 500]" in text and "[default: processor]" in text


def test_missing_psycopg_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without psycopg the options fail with the command that installs it."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(usage.UsageError, match=r"pip install 'teltonika\[processor\]'"):
        parse("--postgres", "x")


def test_plugin_is_discovered() -> None:
    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    maker = makers["teltonika-processor"]
    assert maker.options is Options
    assert maker.makeService is makeService


def test_make_service_starts_nothing_and_listens_on_metrics() -> None:
    """makeService builds the tree without touching the network; starting it listens on
    the metrics endpoint (loopback)."""
    reactor = MemoryReactor()
    options = parse(
        "--postgres",
        "dbname=x",
        "--metrics",
        "tcp:9999:interface=127.0.0.1",
        "--redis",
        "redis://127.0.0.1:1/0",
    )
    # a partial reactor (no clock, threads or UDP): this tree only listens on TCP here
    service = makeService(options, cast(IProcessReactor, reactor))
    assert reactor.tcpServers == [] and reactor.tcpClients == []
    assert service.processor.consumer.streams.redis is None  # connects on start only
    ops = next(s for s in service if s is not service.processor)
    ops.startService()
    assert reactor.tcpServers[0][0] == 9999
    assert reactor.tcpServers[0][3] == "127.0.0.1"
    assert tap.DEFAULT_REDIS == "redis://127.0.0.1:6379/0"
