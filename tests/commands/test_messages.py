"""The command contract: entries round-trip, and any field values only ever raise
InvalidCommandError (a malformed entry fails its command; it never stops the consumer)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teltonika.commands.messages import Command, Outcome
from teltonika.protocol.queue import InvalidCommandError

NAMES = [
    "v",
    "kind",
    "id",
    "imei",
    "codec",
    "payload",
    "payload_hex",
    "timeout_s",
    "created_at_ms",
    "expires_at_ms",
    "offline",
    "attempt",
]


@given(
    payload=st.binary(min_size=1, max_size=64),
    codec=st.sampled_from(["12", "14"]),
    timeout=st.none() | st.floats(min_value=0.001, max_value=3600),
    expires=st.none() | st.integers(min_value=0, max_value=2**53),
    offline=st.booleans(),
    attempt=st.integers(min_value=0, max_value=1000),
)
def test_fields_round_trip(
    payload: bytes,
    codec: str,
    timeout: float | None,
    expires: int | None,
    offline: bool,
    attempt: int,
) -> None:
    command = Command(
        id="c1",
        imei="352093081452251",
        payload=payload,
        codec=codec,
        timeout_s=timeout,
        created_at_ms=5,
        expires_at_ms=expires,
        offline=offline,
        attempt=attempt,
    )
    parsed = Command.from_fields(command.fields())
    assert parsed.payload == payload and parsed.codec == codec
    assert parsed.expires_at_ms == expires and parsed.offline == offline
    assert parsed.attempt == attempt
    if timeout is None:
        assert parsed.timeout_s is None
    else:
        assert parsed.timeout_s is not None and abs(parsed.timeout_s - timeout) <= 1e-5 * timeout


@given(st.dictionaries(st.sampled_from(NAMES), st.text(max_size=20)))
def test_arbitrary_fields_raise_only_invalid_command(fields: dict[str, str]) -> None:
    with contextlib.suppress(InvalidCommandError):
        Command.from_fields(fields)


ANY_NAME = st.sampled_from(NAMES) | st.text(max_size=8) | st.binary(max_size=8)
ANY_VALUE = (
    st.sampled_from(["", "1", "12", "14", "flush", "352093081452251", "1e400", "nan", "-1"])
    | st.text(max_size=24)
    | st.binary(max_size=24)
    | st.integers()
    | st.none()
)


@given(st.dictionaries(ANY_NAME, ANY_VALUE))
def test_any_names_and_values_raise_only_invalid_command(fields: dict[object, object]) -> None:
    """What txredisapi may hand over (bytes for values that are not UTF-8, and whatever
    else): only InvalidCommandError, never TypeError or AttributeError."""
    with contextlib.suppress(InvalidCommandError):
        Command.from_fields(fields)


def test_huge_integers_are_invalid() -> None:
    fields = Command(id="c", imei="352093081452251", payload=b"x").fields()
    fields["expires_at_ms"] = str(10**400)
    with pytest.raises(InvalidCommandError):
        Command.from_fields(fields)


def test_status_fields_are_the_documented_ones() -> None:
    """The Lua scripts build the same field list (see scripts._STATUS_LUA)."""
    from teltonika.commands import scripts

    fields = Outcome("x", "1", "12", "failed", "timeout").fields(instance_id="a", at_ms=1)
    names = list(fields)
    assert names == [
        "v",
        "id",
        "imei",
        "codec",
        "status",
        "reason",
        "response",
        "response_hex",
        "instance_id",
        "at_ms",
        "attempt",
    ]
    lua = scripts._STATUS_LUA
    positions = [lua.index(f"'{name}'") for name in names]
    assert positions == sorted(positions)


def test_every_failed_reason_has_a_meaning() -> None:
    from teltonika.commands.messages import NEVER_WRITTEN, REASON_MEANINGS, REASONS

    assert set(REASON_MEANINGS) == REASONS
    assert NEVER_WRITTEN <= REASONS
