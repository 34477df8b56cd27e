"""Authorities that need no Directus: a token file, no authentication, an events file.

* ``--live-auth token-file:PATH``: lines ``TOKEN USER_ID`` (``#`` starts a comment); the
  client sends ``Authorization: Bearer TOKEN``. The file is re-read when it changes.
* ``--live-auth none``: everyone is the user ``anonymous``; the tap allows it only when
  every live endpoint listens on loopback.
* ``--live-events file:PATH``: ``{"events": {"42": {"devices": {"IMEI": "label", ...},
  "users": ["u-1", "*"]}}}``; ``*`` admits every user. Re-read when it changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Final

import orjson
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from teltonika.processor.live.interfaces import (
    Credential,
    Forbidden,
    IAuthenticator,
    IEventDirectory,
    Unauthenticated,
    User,
)
from teltonika.processor.live.messages import Member

ANONYMOUS: Final = "anonymous"


class ConfigFileError(ValueError):
    """A token or events file that cannot be used; the message says why."""


class _Reloading:
    """A file parsed again whenever its modification time or size changes."""

    def __init__(self, path: str, parse: Callable[[bytes], Any]) -> None:
        self.path = path
        self.parse = parse
        self._stamp: tuple[float, int] | None = None
        self._value: Any = None
        self.load()

    def load(self) -> Any:
        """The parsed content (the previous one if the file became unreadable)."""
        try:
            stat = os.stat(self.path)
        except OSError as e:
            if self._stamp is None:
                raise ConfigFileError(f"cannot read {self.path}: {e.strerror}") from None
            return self._value
        stamp = (stat.st_mtime, stat.st_size)
        if stamp != self._stamp:
            with open(self.path, "rb") as f:
                value = self.parse(f.read())
            self._stamp, self._value = stamp, value
        return self._value


def parse_token_file(data: bytes) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for number, raw in enumerate(data.decode("utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigFileError(f"token file line {number}: expected 'TOKEN USER_ID'")
        tokens[parts[0]] = parts[1]
    return tokens


@implementer(IAuthenticator)
class TokenFileAuthenticator:
    """Bearer tokens from a file (module docstring)."""

    def __init__(self, path: str) -> None:
        self.file = _Reloading(path, parse_token_file)

    def applies_user_limit(self) -> bool:
        """IAuthenticator API"""
        return True

    def authenticate(self, credential: Credential | None, fresh: bool = False) -> Deferred[User]:
        """IAuthenticator API"""
        if credential is None or credential.kind != "bearer":
            return fail(Unauthenticated("no bearer token"))
        try:
            tokens: dict[str, str] = self.file.load()
        except (ConfigFileError, UnicodeDecodeError) as e:
            return fail(Unauthenticated(f"token file unusable: {e}"))
        user = tokens.get(credential.value)
        if user is None:
            return fail(Unauthenticated("unknown token"))
        return succeed(User(user))


@implementer(IAuthenticator)
class NoAuthenticator:
    """Everyone is :data:`ANONYMOUS` (loopback only; see the tap)."""

    def applies_user_limit(self) -> bool:
        """IAuthenticator API"""
        return False

    def authenticate(self, credential: Credential | None, fresh: bool = False) -> Deferred[User]:
        """IAuthenticator API"""
        return succeed(User(ANONYMOUS))


def parse_events_file(data: bytes) -> dict[str, tuple[tuple[Member, ...], frozenset[str]]]:
    """event id -> (members, users) from the events file's JSON."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ConfigFileError(f"events file is not JSON: {e}") from None
    events = document.get("events") if isinstance(document, dict) else None
    if not isinstance(events, dict):
        raise ConfigFileError('events file needs an object {"events": {...}}')
    out: dict[str, tuple[tuple[Member, ...], frozenset[str]]] = {}
    for event, spec in events.items():
        devices = spec.get("devices") if isinstance(spec, dict) else None
        users = spec.get("users", []) if isinstance(spec, dict) else None
        if not isinstance(devices, dict) or not isinstance(users, list):
            raise ConfigFileError(f"event {event!r} needs devices {{IMEI: label}} and users [...]")
        members = tuple(
            Member(str(imei), None, None if label is None else str(label))
            for imei, label in devices.items()
        )
        out[str(event)] = (members, frozenset(str(u) for u in users))
    return out


@implementer(IEventDirectory)
class FileEventDirectory:
    """Events from a JSON file (module docstring).

    :param devices_check: how ``devices`` subscriptions are authorized (default: any
        device, as with ``token-file`` and ``none``; with Directus authentication the
        Directus devices collection decides).
    """

    def __init__(
        self,
        path: str,
        devices_check: Callable[[User, Sequence[str]], Deferred[None]] | None = None,
    ) -> None:
        self.file = _Reloading(path, parse_events_file)
        self.devices_check = devices_check

    def _event(self, event: str) -> tuple[tuple[Member, ...], frozenset[str]] | None:
        events: dict[str, tuple[tuple[Member, ...], frozenset[str]]] = self.file.load()
        return events.get(event)

    def authorize_event(self, user: User, event: str) -> Deferred[Sequence[Member]]:
        """IEventDirectory API"""
        found = self._event(event)
        if found is None:
            return fail(Forbidden("no such event"))
        members, users = found
        if "*" not in users and user.id not in users:
            return fail(Forbidden("not allowed"))
        return succeed(members)

    def members(self, event: str) -> Deferred[Sequence[Member]]:
        """IEventDirectory API"""
        found = self._event(event)
        return succeed(() if found is None else found[0])

    def authorize_devices(self, user: User, devices: Sequence[str]) -> Deferred[None]:
        """IEventDirectory API"""
        if self.devices_check is None:
            return succeed(None)
        return self.devices_check(user, devices)


@implementer(IEventDirectory)
class NoEventDirectory:
    """No events file and no Directus: every event is forbidden; ``devices``
    subscriptions are allowed for any device."""

    def authorize_event(self, user: User, event: str) -> Deferred[Sequence[Member]]:
        """IEventDirectory API"""
        return fail(Forbidden("no events are configured"))

    def members(self, event: str) -> Deferred[Sequence[Member]]:
        """IEventDirectory API"""
        return succeed(())

    def authorize_devices(self, user: User, devices: Sequence[str]) -> Deferred[None]:
        """IEventDirectory API"""
        return succeed(None)
