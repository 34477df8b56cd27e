"""Option coercers and endpoint checks shared by ``twistd teltonika`` and
``twistd teltonika-processor``, so that one name means one rule in both.

A coercer is the fourth item of an ``optParameters`` entry: ``usage.Options`` calls it
on the value given on the command line (not on the default, so a default is written the
way the coercer would return it) and :class:`CoercedOptions` turns its ``ValueError``
into a ``UsageError`` that names the option (``--max-frame: must be at least 20 bytes,
not 10``); ``coerceDoc`` is what ``--help`` shows. A coercer's message therefore says
what is wrong with the value and shows it, and leaves naming the option to the caller.
Checks that involve one option belong here; ``postOptions`` keeps the rules between
options.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Final, TypeVar

from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from teltonika.authority import AuthoritySpecError, parse_authority_spec
from teltonika.redis.connect import RedisURLError, parse_redis_url
from teltonika.redis.durability import DURABILITY_MODES
from teltonika.wire.framer import FRAME_OVERHEAD, MIN_DATA_LENGTH

OFF: Final = ("off", "none", "")
"""Values that switch an optional listener off."""
LOOPBACK: Final = "127.0.0.1"

_T = TypeVar("_T")


def documented(doc: str) -> Callable[[Callable[[str], _T]], Callable[[str], _T]]:
    """Attach the ``--help`` text Twisted reads from a coercer's ``coerceDoc``."""

    def attach(coerce: Callable[[str], _T]) -> Callable[[str], _T]:
        setattr(coerce, "coerceDoc", doc)  # noqa: B010 (a function has no declared slot)
        return coerce

    return attach


@documented("A whole number >= 0.")
def whole_number(value: str) -> int:
    """A count where 0 means none (or no limit, as the option says)."""
    number = int(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, not {value}")
    return number


@documented("A whole number, at least 1.")
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


@documented("Seconds (a finite decimal number >= 0).")
def seconds(value: str) -> float:
    number = _finite(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, not {value}")
    return number


@documented("Seconds (a finite decimal number above 0).")
def positive_seconds(value: str) -> float:
    number = _finite(value)
    if number <= 0:
        raise ValueError(f"must be above 0, not {value}")
    return number


@documented("A finite decimal number above 0.")
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


class _NamedCoercion(usage.CoerceParameter):
    """Twisted's coercion, with the option named in the error: its own message,
    ``Parameter type enforcement failed: ...``, does not say which option failed."""

    def __init__(self, options: usage.Options, coerce: Callable[[str], object]) -> None:
        self.options = options
        self.coerce = coerce
        self.doc = getattr(coerce, "coerceDoc", "")

    def dispatch(self, parameterName: str, value: str | None) -> None:  # noqa: N803 (Twisted's)
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            coerced = self.coerce(value)
        except ValueError as error:
            raise usage.UsageError(f"--{parameterName}: {error}") from None
        self.options.opts[parameterName] = coerced


class CoercedOptions(usage.Options):
    """``usage.Options`` whose coercion errors name the option (the base of both taps'
    options)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        for name, dispatcher in self._dispatch.items():
            if type(dispatcher) is usage.CoerceParameter:
                self._dispatch[name] = _NamedCoercion(self, dispatcher.coerce)


@documented("A port number or a server endpoint description such as tcp:5027.")
def device_endpoint(value: str) -> str:
    """``--port``: a bare port becomes ``tcp:N`` (:func:`normalize_endpoint`)."""
    return normalize_endpoint(value, "--port")


@documented("A port number (on loopback), a server endpoint description, or off.")
def metrics_option(value: str) -> str | None:
    """``--metrics`` (:func:`metrics_endpoint`)."""
    return metrics_endpoint(value)


@documented("PORT or INTERFACE:PORT.")
def udp_address(value: str) -> tuple[str, int]:
    """``--udp-port``: ``PORT`` or ``INTERFACE:PORT`` -> (interface, port)."""
    interface, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise usage.UsageError(f"--udp-port must be PORT or INTERFACE:PORT, not {value!r}")
    return (interface, int(port))


@documented("A redis://, rediss:// or redis+sentinel:// URL.")
def redis_url(value: str) -> str:
    """A Redis URL that parses (:func:`teltonika.redis.connect.parse_redis_url`); the
    URL itself is kept, the message never shows its password."""
    try:
        parse_redis_url(value)
    except RedisURLError as error:
        raise ValueError(str(error)) from None
    return value


@documented(f"One of {', '.join(DURABILITY_MODES)}.")
def durability_mode(value: str) -> str:
    """``--redis-durability``."""
    if value not in DURABILITY_MODES:
        raise ValueError(f"must be one of {', '.join(DURABILITY_MODES)}, not {value!r}")
    return value


@documented("open, file:PATH or redis:KEY.")
def authority_spec(value: str) -> str:
    """``--devices`` (:func:`teltonika.authority.parse_authority_spec`)."""
    try:
        parse_authority_spec(value)
    except AuthoritySpecError as error:
        raise usage.UsageError(str(error)) from None
    return value


@documented(f"Bytes, at least {MIN_DATA_LENGTH + FRAME_OVERHEAD}.")
def frame_size(value: str) -> int:
    """``--max-frame``: no smaller than the smallest data frame."""
    number = int(value)
    if number < MIN_DATA_LENGTH + FRAME_OVERHEAD:
        raise ValueError(f"must be at least {MIN_DATA_LENGTH + FRAME_OVERHEAD} bytes, not {value}")
    return number


@documented("Printable text, not empty.")
def printable_name(value: str) -> str:
    """A name that goes into records, keys and logs (``--instance-id``, ``--consumer``)."""
    if not value or not value.isprintable():
        raise ValueError(f"must be non-empty printable text, not {value!r}")
    return value


def seconds_up_to(limit: float, *, why: str = "") -> Callable[[str], float]:
    """A coercer of seconds above 0 and at most *limit* (*why*: the reason for the lower
    bound, shown in the message)."""
    reason = f" ({why})" if why else ""

    @documented(f"Seconds, above 0 and at most {limit:g}.")
    def coerce(value: str) -> float:
        number = _finite(value)
        if not 0 < number <= limit:
            raise ValueError(
                f"must be more than 0 and at most {limit:g} seconds{reason}, not {value}"
            )
        return number

    return coerce


def seconds_at_most(limit: float) -> Callable[[str], float]:
    """A coercer of seconds from 0 to *limit*."""

    @documented(f"Seconds, from 0 to {limit:g}.")
    def coerce(value: str) -> float:
        number = seconds(value)
        if number > limit:
            raise ValueError(f"must be at most {limit:g} seconds, not {value}")
        return number

    return coerce


@documented("Text, not empty.")
def non_empty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


_STREAM_ID = re.compile(r"\d+(-\d+)?")


@documented("$ (new entries only), 0 (everything) or an entry id MS-SEQ or MS.")
def group_start(value: str) -> str:
    """``--group-start``: an id ``XGROUP CREATE`` takes; Redis would refuse anything else
    only when the group is first created, long after the command line was read."""
    if value != "$" and not _STREAM_ID.fullmatch(value):
        raise ValueError(f"must be $, 0 or an entry id such as 1700000000000-0, not {value!r}")
    return value
