"""Stream entries -> checked positions: the record contract v1 read back (pure).

Every entry of ``telemetry:teltonika`` is checked against :mod:`teltonika.contract`
(version, required fields, the shape of every value) before it may become a row. An
entry that fails is never skipped silently: :func:`parse_entry` raises
:class:`ContractError` with a low-cardinality ``reason`` (a metric label and the
dead-letter stream's ``dead.reason``) and a human ``detail``.

Sentinel reversal (the ``io`` column is ``jsonb``, whose numbers are exact decimals):

* ``{"__bigint": "<decimal>"}`` becomes that integer, digit for digit (a u64 above
  2**53 survives into PostgreSQL exactly);
* ``{"__buffer_b64": "<base64>"}`` (an NX value of codec 8E) becomes a JSON **string of
  lowercase hex**: the only strings in a stored IO bag are raw bytes, so
  ``decode(io->>'<id>', 'hex')`` gives them back as ``bytea``.

Numbers are kept as text (COPY sends text anyway) in their canonical form: the fast path
admits only canonical forms (no leading zeros, ``-0`` or trailing fractional zeros), which
is what the contract's writer produces; anything else takes the general path, which
rewrites it canonically, so a record's :mod:`~teltonika.processor.identity` hash does not
depend on how its numbers were spelled. Every number is bounded by its pattern before it is
converted (a ``__bigint`` of 5,000 digits is ``bad_sentinel``, never a ``ValueError`` from
``int()``). PostgreSQL judges ranges (a value that fits the pattern but not the column
makes the batch fail and is isolated by bisection in :mod:`teltonika.processor.writer`).

:func:`parse_entry` raises nothing but :class:`ContractError`, whatever the fields hold
(a property-based test feeds it arbitrary field maps).
"""

from __future__ import annotations

import re
from base64 import b64decode
from binascii import Error as BinasciiError
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import orjson

from teltonika.contract import CONTRACT_VERSION, FIELDS
from teltonika.processor.identity import canonical_degrees, record_hash

U64_MAX: Final = 2**64 - 1
U64_DIGITS: Final = 20
"""Most digits a ``__bigint`` may have: checked before ``int()`` ever sees them."""
IO_ID_DIGITS: Final = 5
"""Most digits of an IO id (ids are 16-bit on the wire)."""
MAX_FIELDS: Final = 64
"""Most fields an entry may have (contract v1 has 16; room for fields added later):
checked before the entry's fields are looked at one by one."""
MAX_VALUE_CHARS: Final = 1 << 20
"""Most characters any value may have (1 MiB). The largest ``io`` of a real record is a
few hundred KiB even with a raised ``--max-frame``; a larger value is not a record, and
checking it (a regular expression, a JSON parse) would stall the reactor."""

# What the entry may hold (the general path accepts these and rewrites them canonically)
_UNSIGNED = re.compile(r"[0-9]{1,18}")
_SIGNED = re.compile(r"-?[0-9]{1,18}")
_DEGREES = re.compile(r"-?[0-9]{1,3}(?:\.[0-9]{1,7})?")
_IMEI = re.compile(r"[0-9]{15}")
_CODECS: Final = frozenset({"8", "8E", "16"})
# ... and their canonical forms, which the fast path admits (what the contract's writer
# produces): no leading zeros, no "-0", no trailing zeros after a decimal point.
_C_UNSIGNED = r"(?:0|[1-9][0-9]{0,17})"
_C_SIGNED = r"(?:0|-?[1-9][0-9]{0,17})"
_C_DEGREES = r"(?:0|-?(?:[1-9][0-9]{0,2}(?:\.[0-9]{0,6}[1-9])?|0\.[0-9]{0,6}[1-9]))"

REASONS: Final = (
    "oversized",
    "unknown_version",
    "missing_field",
    "bad_field",
    "bad_io",
    "bad_sentinel",
    "rejected_by_database",
    "max_deliveries",
    "check_failed",
)
"""Every dead-letter reason, so metrics can be pre-created at zero. ``check_failed`` is the
safety net of :meth:`teltonika.processor.consumer.Consumer.prepare`: checking the entry
raised something other than :class:`ContractError` (a bug; logged with its traceback).
``oversized``: more than :data:`MAX_FIELDS` fields or a value longer than
:data:`MAX_VALUE_CHARS`."""


class ContractError(ValueError):
    """An entry that does not satisfy the record contract.

    :ivar reason: low-cardinality label (one of :data:`REASONS`).
    :ivar detail: what exactly was wrong, for the dead-letter entry and the log.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Position(NamedTuple):
    """One checked record, ready for COPY.

    Numeric fields are canonical decimal text (already checked); :attr:`timestamp_ms` and
    :attr:`received_at_ms` are also kept as ints for the device state.

    A NamedTuple rather than a frozen attrs class (our usual record): one is built per
    record on the reactor thread, and a tuple is built in C, about 1 us less per record
    than a frozen attrs instance (``benchmarks/processor.py``); it is just as immutable.
    """

    entry_id: str
    device_id: str
    timestamp_ms: int
    received_at_ms: int
    latitude: str
    longitude: str
    altitude: str
    angle: str
    speed: str
    satellites: str
    priority: str
    event_io_id: str
    generation_type: str | None
    codec: str
    instance_id: str
    io: str
    """The IO bag as compact JSON text with the sentinels already reversed."""
    record_hash: int
    """The third key column (:mod:`teltonika.processor.identity`)."""

    def copy_line(self) -> str:
        """The row as one line of COPY text format (tab separated, ``\\N`` for NULL).

        Only ``instance_id`` can hold characters COPY must escape: ``io`` is compact JSON
        of digit ids and digit or hex values (:func:`reverse_io`), every other value
        matched a digits-only pattern. One f-string: this runs once per record on the
        reactor thread.
        """
        generation = "\\N" if self.generation_type is None else self.generation_type
        return (
            f"{self.device_id}\t{self.timestamp_ms}\t{self.received_at_ms}\t{self.latitude}\t"
            f"{self.longitude}\t{self.altitude}\t{self.angle}\t{self.speed}\t"
            f"{self.satellites}\t{self.priority}\t{self.event_io_id}\t{generation}\t"
            f"{self.codec}\t{_copy_escape(self.instance_id)}\t{self.io}\t{self.record_hash}"
        )

    def copy_row(self) -> tuple[str | None, ...]:
        """The values in :data:`teltonika.processor.writer.COPY_COLUMNS` order."""
        return (
            self.device_id,
            str(self.timestamp_ms),
            str(self.received_at_ms),
            self.latitude,
            self.longitude,
            self.altitude,
            self.angle,
            self.speed,
            self.satellites,
            self.priority,
            self.event_io_id,
            self.generation_type,
            self.codec,
            self.instance_id,
            self.io,
            str(self.record_hash),
        )


def _copy_escape(value: str) -> str:
    """Escape a value for COPY text format (backslash first)."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return (
            value.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return value


def fields_dict(flat: list[object] | None) -> dict[str, object]:
    """A Redis ``field value field value ...`` reply as a dict (names decoded if bytes)."""
    if not flat:
        return {}
    names = flat[0::2]
    try:
        "".join(names)  # type: ignore[arg-type]  # raises unless every name is a str:
    except TypeError:  # the check at C speed, ~1.5 us less per entry than a generator
        pass
    else:
        return dict(zip(names, flat[1::2], strict=False))  # type: ignore[arg-type]
    out: dict[str, object] = {}
    it = iter(flat)
    for name, value in zip(it, it, strict=False):
        key = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        out[key] = value
    return out


def _text(fields: Mapping[str, object], name: str) -> str:
    value = fields.get(name)
    if value is None:
        raise ContractError("missing_field", f"field {name!r} is missing")
    if not isinstance(value, str):
        raise ContractError("bad_field", f"field {name!r} is not UTF-8 text")
    return value


def _free_text(fields: Mapping[str, object], name: str) -> str:
    """A free-text field PostgreSQL can store: UTF-8 without NUL characters."""
    value = _text(fields, name)
    if "\x00" in value:
        raise ContractError("bad_field", f"field {name!r} holds a NUL character")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ContractError("bad_field", f"field {name!r} is not UTF-8 text") from None
    return value


def _matching(fields: Mapping[str, object], name: str, pattern: re.Pattern[str]) -> str:
    value = _text(fields, name)
    if pattern.fullmatch(value) is None:
        raise ContractError("bad_field", f"field {name!r} has a bad value {value[:40]!r}")
    return value


def _integer(fields: Mapping[str, object], name: str, pattern: re.Pattern[str]) -> str:
    """A bounded decimal field, rewritten canonically (``007`` -> ``7``, ``-0`` -> ``0``)."""
    return str(int(_matching(fields, name, pattern)))


def _sentinel(io_id: str, value: dict[str, object]) -> object:
    """Reverse one sentinel object; anything else is ``bad_sentinel``."""
    if len(value) == 1:
        if "__bigint" in value:
            digits = value["__bigint"]
            if (
                isinstance(digits, str)
                and 0 < len(digits) <= U64_DIGITS
                and digits.isascii()
                and digits.isdigit()
            ):
                number = int(digits)
                if number <= U64_MAX:
                    return number
        elif "__buffer_b64" in value:
            encoded = value["__buffer_b64"]
            if isinstance(encoded, str):
                try:
                    return b64decode(encoded, validate=True).hex()
                except (BinasciiError, ValueError):
                    pass
    raise ContractError("bad_sentinel", f"IO {io_id} holds an unknown or malformed sentinel")


# The fast path: a compact bag exactly as the ingestion encoder writes it (orjson, no
# spaces, keys 0..99999 without leading zeros, integers up to 19 digits, well-formed
# sentinels) is recognised by one regular expression and its sentinels replaced by
# another; anything else takes the general path below, which also produces the precise
# error and the same compact text.
_J_INT = r"(?:0|[1-9][0-9]{0,18})"
_J_KEY = r'"(?:0|[1-9][0-9]{0,4})"'
_J_VALUE = (
    rf'(?:{_J_INT}|\{{"__bigint":"[0-9]{{1,20}}"\}}'
    r'|\{"__buffer_b64":"[A-Za-z0-9+/]*={0,2}"\})'
)
_BAG = re.compile(rf"\{{(?:{_J_KEY}:{_J_VALUE}(?:,{_J_KEY}:{_J_VALUE})*)?\}}")
_SENTINEL = re.compile(r'\{"__bigint":"([0-9]+)"\}|\{"__buffer_b64":"([A-Za-z0-9+/]*={0,2})"\}')


def _replace_sentinel(match: re.Match[str]) -> str:
    digits = match.group(1)
    if digits is not None:
        if len(digits) < U64_DIGITS and digits[0] != "0":
            return digits  # canonical and below 10**19 < 2**64: nothing to convert
        number = int(digits)  # at most 20 digits: _BAG matched first
        if number > U64_MAX:
            raise ContractError("bad_sentinel", "a __bigint is above 2**64 - 1")
        return str(number)
    try:
        return '"' + b64decode(match.group(2), validate=True).hex() + '"'
    except (BinasciiError, ValueError):
        raise ContractError("bad_sentinel", "a __buffer_b64 is not base64") from None


def reverse_io(text: str) -> str:
    """Check the ``io`` field and return it as compact JSON for the ``jsonb`` column.

    The result has canonical ids and values and no spaces (what
    :func:`teltonika.processor.identity.record_hash` expects), each id once: an id
    repeated in the text (``{"1":1,"1":2}``, which the contract's writer never produces)
    keeps its last value, as the ingestion side keeps the last of an IO id a device sent
    twice in one record, and as ``jsonb`` would; so the stored bag, the record hash and a
    resend of the same record agree.

    :raise ContractError: ``bad_io`` (not a JSON object of decimal ids to unsigned
        integers or sentinels) or ``bad_sentinel``.
    """
    if _BAG.fullmatch(text) is not None and (
        # every id once: one element per comma (no element holds one), as many keys
        text == "{}" or len(orjson.loads(text)) == text.count(",") + 1
    ):
        if '"__' not in text:
            return text  # no sentinel: the text is already what jsonb should read
        return _SENTINEL.sub(_replace_sentinel, text)
    return _reverse_io_general(text)


def _reverse_io_general(text: str) -> str:
    try:
        bag = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ContractError("bad_io", "io is not JSON") from None
    if type(bag) is not dict:
        raise ContractError("bad_io", "io is not a JSON object")
    out: dict[str, object] = {}
    for key, value in bag.items():
        if not (key.isascii() and key.isdigit()):
            raise ContractError("bad_io", f"IO id {key[:20]!r} is not a decimal number")
        io_id = key.lstrip("0") or "0"
        if len(io_id) > IO_ID_DIGITS:
            raise ContractError("bad_io", f"IO id {key[:20]!r} has more than 5 digits")
        kind = type(value)
        if kind is int:
            if value < 0:
                raise ContractError("bad_io", f"IO {io_id} is negative")
            out[io_id] = value  # orjson reads integers up to 2**64 - 1 only
        elif kind is dict:
            out[io_id] = _sentinel(io_id, value)
        else:
            raise ContractError("bad_io", f"IO {io_id} is a {kind.__name__}, not an integer")
    return orjson.dumps(out).decode("ascii")


_CHECKED: Final = (
    ("imei", _IMEI.pattern),
    ("timestamp_ms", _C_SIGNED),
    ("received_at_ms", _C_SIGNED),
    ("latitude", _C_DEGREES),
    ("longitude", _C_DEGREES),
    ("altitude", _C_SIGNED),
    ("angle", _C_UNSIGNED),
    ("speed", _C_UNSIGNED),
    ("satellites", _C_UNSIGNED),
    ("priority", _C_UNSIGNED),
    ("event_io_id", _C_UNSIGNED),
)
# All checked fields joined by NUL and matched at once (no pattern admits a NUL).
_ALL_CHECKED = re.compile("\x00".join(pattern for _, pattern in _CHECKED))


_WRITER_ORDER: Final = list(FIELDS)
"""Field names in the order the contract's writer puts them (every entry the ingestion
server writes): such an entry is checked from its list of values, without a dict."""


def parse_fields(entry_id: str, flat: list[Any]) -> Position:
    """:func:`parse_entry` for a Redis ``field value field value ...`` reply, which is how
    the consumer reads entries. Checking an entry in the writer's field order from its
    values alone saves building a dict and 16 lookups per record.

    :raise ContractError: with the reason the entry goes to the dead-letter stream.
    """
    if len(flat) == 2 * len(_WRITER_ORDER) and flat[0::2] == _WRITER_ORDER:
        position = _fast_path(entry_id, *flat[1::2])
        if position is not None:
            return position
    if len(flat) > 2 * MAX_FIELDS:
        raise ContractError("oversized", f"{len(flat) // 2} fields (at most {MAX_FIELDS})")
    return parse_entry(entry_id, fields_dict(flat))


def parse_entry(entry_id: str, fields: Mapping[str, object]) -> Position:
    """Check one entry against contract v1, reverse its sentinels, compute its key.

    :raise ContractError: with the reason the entry goes to the dead-letter stream.
    """
    if len(fields) > MAX_FIELDS:
        raise ContractError("oversized", f"{len(fields)} fields (at most {MAX_FIELDS})")
    if len(fields) != len(FIELDS):
        _check_sizes(fields)  # fields the contract does not name are ignored, not unbounded
    get = fields.get
    position = _fast_path(entry_id, *[get(name) for name in FIELDS])
    if position is not None:
        return position
    return _parse_general(entry_id, fields)


def _fast_path(
    entry_id: str,
    version: Any,
    imei: Any,
    codec: Any,
    ts: Any,
    received: Any,
    lat: Any,
    lon: Any,
    alt: Any,
    angle: Any,
    speed: Any,
    sats: Any,
    prio: Any,
    event: Any,
    generation: Any,
    instance: Any,
    io: Any,
) -> Position | None:
    """The values (in :data:`~teltonika.contract.FIELDS` order) as a Position when every
    one is already canonical, as the contract's writer produces them, checked with one
    regular expression; None sends the entry to the general path, which also says exactly
    what is wrong."""
    if (
        version != CONTRACT_VERSION
        or type(codec) is not str
        or codec not in _CODECS
        or type(instance) is not str
        or not instance.isascii()
        or "\x00" in instance
        or type(io) is not str
        or len(io) > MAX_VALUE_CHARS
        or len(instance) > MAX_VALUE_CHARS
        or not (
            generation == ""
            or (
                type(generation) is str
                and generation.isdigit()
                and generation.isascii()
                and len(generation) < 6
                and (generation[0] != "0" or generation == "0")
            )
        )
    ):
        return None
    try:
        checked = "\x00".join((imei, ts, received, lat, lon, alt, angle, speed, sats, prio, event))
    except TypeError:  # a value that is not text
        return None
    if _ALL_CHECKED.fullmatch(checked) is None:
        return None
    return _position(
        entry_id,
        imei,
        ts,
        int(received),
        lat,
        lon,
        alt,
        angle,
        speed,
        sats,
        prio,
        event,
        generation or None,
        codec,
        instance,
        reverse_io(io),
    )


def _check_sizes(fields: Mapping[str, object]) -> None:
    """:raise ContractError: ``oversized`` when a name or value exceeds
    :data:`MAX_VALUE_CHARS` (the count of fields was checked before)."""
    for name, value in fields.items():
        if len(name) > MAX_VALUE_CHARS:
            raise ContractError("oversized", f"a field name of {len(name)} characters")
        if isinstance(value, str | bytes) and len(value) > MAX_VALUE_CHARS:
            raise ContractError(
                "oversized",
                f"field {name[:40]!r} holds {len(value)} characters (at most {MAX_VALUE_CHARS})",
            )


def _parse_general(entry_id: str, fields: Mapping[str, object]) -> Position:
    """The field-by-field check: slower, names exactly what is wrong, and rewrites every
    number in its canonical form."""
    _check_sizes(fields)
    version = fields.get("v")
    if version != CONTRACT_VERSION:
        if version is None:
            raise ContractError("missing_field", "field 'v' is missing")
        raise ContractError("unknown_version", f"contract version {str(version)[:20]!r}")
    generation = _text(fields, "generation_type")
    if generation and _UNSIGNED.fullmatch(generation) is None:
        raise ContractError("bad_field", "field 'generation_type' has a bad value")
    codec = _text(fields, "codec")
    if codec not in _CODECS:
        raise ContractError("bad_field", f"unknown codec {codec[:20]!r}")
    return _position(
        entry_id,
        _matching(fields, "imei", _IMEI),
        _integer(fields, "timestamp_ms", _SIGNED),
        int(_matching(fields, "received_at_ms", _SIGNED)),
        canonical_degrees(_matching(fields, "latitude", _DEGREES)),
        canonical_degrees(_matching(fields, "longitude", _DEGREES)),
        _integer(fields, "altitude", _SIGNED),
        _integer(fields, "angle", _UNSIGNED),
        _integer(fields, "speed", _UNSIGNED),
        _integer(fields, "satellites", _UNSIGNED),
        _integer(fields, "priority", _UNSIGNED),
        _integer(fields, "event_io_id", _UNSIGNED),
        str(int(generation)) if generation else None,
        codec,
        _free_text(fields, "instance_id"),
        reverse_io(_text(fields, "io")),
    )


def _position(
    entry_id: str,
    device_id: str,
    timestamp_ms: str,
    received_at_ms: int,
    lat: str,
    lon: str,
    alt: str,
    angle: str,
    speed: str,
    sats: str,
    prio: str,
    event: str,
    generation_type: str | None,
    codec: str,
    instance_id: str,
    io: str,
) -> Position:
    """A Position from checked canonical values (both paths end here), with its hash."""
    return Position(
        entry_id,
        device_id,
        int(timestamp_ms),
        received_at_ms,
        lat,
        lon,
        alt,
        angle,
        speed,
        sats,
        prio,
        event,
        generation_type,
        codec,
        instance_id,
        io,
        record_hash(
            timestamp_ms, lat, lon, alt, angle, speed, sats, prio, event, generation_type, io
        ),
    )


__all__ = [
    "FIELDS",
    "MAX_FIELDS",
    "MAX_VALUE_CHARS",
    "REASONS",
    "ContractError",
    "Position",
    "fields_dict",
    "parse_entry",
    "parse_fields",
    "reverse_io",
]
