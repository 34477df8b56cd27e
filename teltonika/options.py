"""Option coercers and endpoint checks shared by ``twistd teltonika`` and
``twistd teltonika-processor``, so that one name means one rule in both.

A coercer is the fourth item of an ``optParameters`` entry: ``usage.Options`` calls it
on the value given on the command line (not on the default) and turns its
``ValueError`` into a ``UsageError``; ``coerceDoc`` is what ``--help`` shows. Checks
that involve one option belong here; ``postOptions`` keeps the rules between options.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final, TypeVar

from twisted.internet.endpoints import serverFromString
from twisted.python import usage

OFF: Final = ("off", "none", "")
"""Values that switch an optional listener off."""
LOOPBACK: Final = "127.0.0.1"

_T = TypeVar("_T")


def _documented(doc: str) -> Callable[[Callable[[str], _T]], Callable[[str], _T]]:
    """Attach the ``--help`` text Twisted reads from a coercer's ``coerceDoc``."""

    def attach(coerce: Callable[[str], _T]) -> Callable[[str], _T]:
        setattr(coerce, "coerceDoc", doc)  # noqa: B010 (a function has no declared slot)
        return coerce

    return attach


@_documented("A whole number >= 0.")
def whole_number(value: str) -> int:
    """A count where 0 means none (or no limit, as the option says)."""
    number = int(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, not {value}")
    return number


@_documented("A whole number, at least 1.")
def positive_whole_number(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return number


def _finite(value: str, unit: str = "seconds") -> float:
    number = float(value)
    if not math.isfinite(number):
        # float() takes "nan" and "inf": a nan timer never fires (and Twisted's callLater
        # asserts on it), an infinite one never ends; neither is a bound.
        raise ValueError(f"{value} is not a finite number of {unit}")
    return number


@_documented("Seconds (a finite decimal number >= 0).")
def seconds(value: str) -> float:
    number = _finite(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, not {value}")
    return number


@_documented("Seconds (a finite decimal number above 0).")
def positive_seconds(value: str) -> float:
    number = _finite(value)
    if number <= 0:
        raise ValueError(f"must be above 0, not {value}")
    return number


@_documented("A finite decimal number above 0.")
def positive_number(value: str) -> float:
    number = _finite(value, "units")
    if number <= 0:
        raise ValueError(f"must be above 0, not {value}")
    return number


def normalize_endpoint(value: str, option: str, default_interface: str | None = None) -> str:
    """Bare digits become ``tcp:N`` (with *default_interface* if given); anything else
    must parse as a strports description.

    :raise usage.UsageError: with a plain sentence.
    """
    text = value.strip()
    if text.isdigit():
        text = f"tcp:{text}"
        if default_interface:
            text += f":interface={default_interface}"
    try:
        serverFromString(None, text)  # parses only; nothing listens
    except Exception as error:
        raise usage.UsageError(
            f"{option} must be a port number or an endpoint such as "
            f"tcp:5027:interface=127.0.0.1, not {value!r} ({error})"
        ) from None
    return text


def metrics_endpoint(value: object) -> str | None:
    """``--metrics``: ``off``/``none`` -> ``None``, a bare port -> that port on loopback,
    anything else a strports description that must parse.

    :raise usage.UsageError: with a plain sentence.
    """
    text = str(value).strip()
    if text.lower() in OFF:
        return None
    return normalize_endpoint(text, "--metrics", LOOPBACK)
