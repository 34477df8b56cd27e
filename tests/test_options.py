"""The option coercers both taps share (:mod:`teltonika.options`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage

from teltonika import tap
from teltonika.options import (
    authority_spec,
    device_endpoint,
    durability_mode,
    frame_size,
    group_start,
    metrics_endpoint,
    metrics_option,
    non_empty,
    positive_number,
    positive_seconds,
    positive_whole_number,
    printable_name,
    redis_url,
    seconds,
    seconds_at_most,
    seconds_up_to,
    udp_address,
    whole_number,
)
from teltonika.processor import tap as processor_tap

BOUNDS = [
    (whole_number, lambda n: isinstance(n, int) and n >= 0),
    (positive_whole_number, lambda n: isinstance(n, int) and n >= 1),
    (seconds, lambda n: math.isfinite(n) and n >= 0),
    (positive_seconds, lambda n: math.isfinite(n) and n > 0),
    (positive_number, lambda n: math.isfinite(n) and n > 0),
    (seconds_up_to(300), lambda n: math.isfinite(n) and 0 < n <= 300),
    (seconds_at_most(300), lambda n: math.isfinite(n) and 0 <= n <= 300),
    (frame_size, lambda n: isinstance(n, int) and n >= 20),
]


@given(
    bound=st.sampled_from(BOUNDS),
    text=st.text(max_size=12) | st.floats().map(str) | st.integers().map(str),
)
def test_a_coercer_returns_a_value_within_its_bound_or_refuses(
    bound: tuple[Callable[[str], float], Callable[[float], bool]], text: str
) -> None:
    coerce, holds = bound
    try:
        value = coerce(text)
    except ValueError:
        return
    assert holds(value)


@pytest.mark.parametrize(("coerce", "_"), BOUNDS)
def test_every_coercer_documents_itself_for_help(
    coerce: Callable[[str], float], _: Callable[[float], bool]
) -> None:
    assert getattr(coerce, "coerceDoc")  # noqa: B009 (set by setattr: no declared attribute)


def test_metrics_endpoint() -> None:
    assert metrics_endpoint("9105") == "tcp:9105:interface=127.0.0.1"
    assert metrics_endpoint(" off ") is None and metrics_endpoint("NONE") is None
    assert metrics_endpoint("unix:/tmp/m.sock") == "unix:/tmp/m.sock"
    with pytest.raises(usage.UsageError, match="--metrics must be a port number"):
        metrics_endpoint("bogus:1")


def _processor(*argv: str) -> processor_tap.Options:
    options = processor_tap.Options()
    options.parseOptions(["--postgres", "dbname=x", *argv])
    return options


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_the_processor_refuses_non_finite_seconds(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processor's seconds options went through a coercer of its own that took "nan"
    (nan <= 0 is false) and "inf"; now they use the server's finite check."""
    monkeypatch.delenv("TELTONIKA_POSTGRES_DSN", raising=False)
    with pytest.raises(usage.UsageError, match="not a finite number of seconds"):
        _processor("--shutdown-timeout", value)


def test_the_processor_checks_its_metrics_endpoint_like_the_server() -> None:
    """The processor rewrote a bare port by hand and let any other text through (it
    failed only when the listener started); both taps now share one check."""
    with pytest.raises(usage.UsageError, match="--metrics must be a port number"):
        _processor("--metrics", "bogus:1")
    assert _processor("--metrics", "9106")["metrics"] == "tcp:9106:interface=127.0.0.1"
    assert _processor("--metrics", "off")["metrics"] is None
    server = tap.Options()
    server.parseOptions(["--metrics", "9106"])
    assert server["metrics"] == "tcp:9106:interface=127.0.0.1"


def test_one_name_one_rule_in_both_taps() -> None:
    """`_positive_int` meant >= 0 in the server and >= 1 in the processor; the shared
    names say which."""
    coercers = {
        option[0]: option[4]
        for options in (tap.Options, processor_tap.Options)
        for option in options.optParameters
        if len(option) > 4
    }
    assert coercers["max-connections"] is whole_number  # 0 = no limit
    assert coercers["batch-size"] is positive_whole_number
    assert coercers["idle-timeout"] is seconds  # 0 disables
    assert coercers["sink-timeout"] is positive_seconds
    assert coercers["claim-idle"] is positive_seconds
    assert coercers["redis"] is redis_url


def test_endpoint_coercers() -> None:
    assert device_endpoint("5027") == "tcp:5027"
    assert device_endpoint("tcp:5027:interface=127.0.0.1") == "tcp:5027:interface=127.0.0.1"
    with pytest.raises(usage.UsageError, match=r"--port must be a port number.*'bogus:1'"):
        device_endpoint("bogus:1")
    assert metrics_option("9105") == "tcp:9105:interface=127.0.0.1"
    assert metrics_option("off") is None
    assert udp_address("5027") == ("", 5027)
    assert udp_address("10.0.0.1:5027") == ("10.0.0.1", 5027)
    for bad in ("x:y", "70000", ""):
        with pytest.raises(usage.UsageError, match=f"--udp-port must be .* not {bad!r}"):
            udp_address(bad)


def test_value_coercers_show_the_bad_value() -> None:
    assert redis_url("redis://h:1/2") == "redis://h:1/2"
    with pytest.raises(ValueError, match="must start with redis://"):
        redis_url("http://x")
    with pytest.raises(ValueError, match=r"\*\*\*"):  # the password never shows
        redis_url("redis://:secret@h:x/0")
    assert durability_mode("fsync") == "fsync"
    with pytest.raises(ValueError, match="must be one of memory, fsync, replicated, not 'disk'"):
        durability_mode("disk")
    assert authority_spec("file:/x") == "file:/x" and authority_spec("open") == "open"
    with pytest.raises(usage.UsageError, match=r"--devices must be 'open'.*'ldap:x'"):
        authority_spec("ldap:x")
    assert frame_size("20") == 20
    with pytest.raises(ValueError, match="at least 20 bytes, not 19"):
        frame_size("19")
    assert printable_name("ing-1") == "ing-1"
    for bad in ("", "a\x00b", "a\nb"):
        with pytest.raises(ValueError, match="must be non-empty printable text"):
            printable_name(bad)
    assert non_empty("x") == "x"
    with pytest.raises(ValueError, match="must not be empty"):
        non_empty("")
    with pytest.raises(ValueError, match=r"at most 300 seconds \(why\), not 0"):
        seconds_up_to(300, why="why")("0")
    with pytest.raises(ValueError, match="at most 5 seconds, not 6"):
        seconds_at_most(5)("6")
    assert [group_start(v) for v in ("$", "0", "1-2", "17")] == ["$", "0", "1-2", "17"]
    with pytest.raises(ValueError, match=r"must be \$, 0 or an entry id .*, not 'latest'"):
        group_start("latest")


@pytest.mark.parametrize(
    ("options", "argv", "message"),
    [
        (tap.Options, ["--max-frame", "10"], "--max-frame: must be at least 20 bytes, not 10"),
        (tap.Options, ["--redis-replicas", "0"], "--redis-replicas: must be at least 1, not 0"),
        (tap.Options, ["--redis", "http://x"], "--redis: Redis URL must start with redis://"),
        (processor_tap.Options, ["--consumer", ""], "--consumer: must not be empty"),
        (processor_tap.Options, ["--batch-size", "0"], "--batch-size: must be at least 1, not 0"),
        (
            processor_tap.Options,
            ["--redis", "http://x"],
            "--redis: Redis URL must start with redis://",
        ),
        (
            processor_tap.Options,
            ["--group-start", "x"],
            "--group-start: must be $, 0 or an entry id",
        ),
    ],
)
def test_a_usage_error_names_the_option_and_the_value(
    options: type[usage.Options], argv: list[str], message: str
) -> None:
    """Twisted says only "Parameter type enforcement failed"; both taps name the option."""
    with pytest.raises(usage.UsageError) as info:
        options().parseOptions(argv)
    assert message in str(info.value)
