"""Options, --help, the plugin, and makeService with a MemoryReactor."""

from __future__ import annotations

import re
import sys
from typing import cast

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage

from teltonika.interfaces import IProcessReactor
from teltonika.options import group_start
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
        ["--postgres", "x", "--group-start", "latest"],
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


def test_options_reach_the_objects_they_configure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-default values arrive in the ProcessorService, its Consumer and its Streams."""
    monkeypatch.delenv("TELTONIKA_REDIS_URL", raising=False)
    options = parse(
        "--postgres",
        "dbname=x",
        "--metrics",
        "off",
        "--trim",
        "--trim-interval",
        "33",
        "--stats-interval",
        "7",
        "--shutdown-timeout",
        "21",
        "--batch-size",
        "77",
        "--group-start",
        "$",
        "--dead-stream",
        "dead:elsewhere",
        "--dead-maxlen",
        "4321",
    )
    service = makeService(options, cast(IProcessReactor, MemoryReactorClock()))
    processor = service.processor
    assert (processor.trim, processor.trim_interval, processor.stats_interval) == (True, 33.0, 7.0)
    assert processor.shutdown_timeout == 21.0
    config = processor.consumer.config
    assert (config.batch_size, config.group_start) == (77, "$")
    streams = processor.consumer.streams
    assert (streams.dead_stream, streams.dead_maxlen) == ("dead:elsewhere", 4321)


def test_option_defaults_are_the_settings_defaults() -> None:
    """Each default is written once: the tap's --help shows what the settings classes use."""
    from teltonika.processor.consumer import ConsumerConfig
    from teltonika.processor.service import ExitPolicy, Housekeeping
    from teltonika.processor.streams import StreamsSettings

    defaults = {name: default for name, _short, default, *_rest in Options.optParameters}
    housekeeping, exits, config = Housekeeping(), ExitPolicy(), ConsumerConfig()
    streams = StreamsSettings()
    assert defaults["trim-interval"] == housekeeping.trim_interval
    assert defaults["stats-interval"] == housekeeping.stats_interval
    assert defaults["shutdown-timeout"] == exits.shutdown_timeout
    assert defaults["batch-size"] == config.batch_size
    assert defaults["group-start"] == config.group_start
    assert (defaults["dead-stream"], defaults["dead-maxlen"]) == (
        streams.dead_stream,
        streams.dead_maxlen,
    )


@pytest.mark.parametrize("value", ["$", "0", "1700000000000-3", "1700000000000"])
def test_group_start_takes_what_xgroup_create_takes(value: str) -> None:
    assert group_start(value) == value


@pytest.mark.parametrize("value", ["", "latest", "-1", "1-", "1-2-3", " 0", ">"])
def test_group_start_refuses_anything_else_naming_option_and_value(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TELTONIKA_POSTGRES_DSN", raising=False)
    with pytest.raises(usage.UsageError, match=re.escape("--group-start: must be $, 0")) as e:
        parse("--postgres", "x", "--group-start", value)
    assert repr(value) in str(e.value)


def test_redis_from_the_command_line_and_the_environment_share_one_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--redis is checked by its coercer (naming the option); $TELTONIKA_REDIS_URL goes
    through the same coercer, and its error names the variable."""
    monkeypatch.setenv("TELTONIKA_REDIS_URL", "redis://envhost:6390/3")
    o = parse("--postgres", "x")
    assert o["redis"] == "redis://envhost:6390/3" and o["redis-address"].host == "envhost"
    with pytest.raises(usage.UsageError, match=r"^--redis: .*'http://nope'"):
        parse("--postgres", "x", "--redis", "http://nope")
    monkeypatch.setenv("TELTONIKA_REDIS_URL", "http://env-nope")
    with pytest.raises(usage.UsageError, match=r"^\$TELTONIKA_REDIS_URL: .*'http://env-nope'"):
        parse("--postgres", "x")
    assert parse("--postgres", "x", "--redis", "redis://h/1")["redis"] == "redis://h/1"
