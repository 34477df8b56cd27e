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
    metrics_endpoint,
    positive_number,
    positive_seconds,
    positive_whole_number,
    seconds,
    whole_number,
)
from teltonika.processor import tap as processor_tap

BOUNDS = [
    (whole_number, lambda n: isinstance(n, int) and n >= 0),
    (positive_whole_number, lambda n: isinstance(n, int) and n >= 1),
    (seconds, lambda n: math.isfinite(n) and n >= 0),
    (positive_seconds, lambda n: math.isfinite(n) and n > 0),
    (positive_number, lambda n: math.isfinite(n) and n > 0),
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
    assert coercers["sink-timeout"] is seconds
    assert coercers["claim-idle"] is positive_seconds
