"""The seams of the live broadcast: who is the client (:class:`IAuthenticator`) and what
may it watch (:class:`IEventDirectory`).

Implementations: Directus (:mod:`teltonika.processor.live.directus`), a token file, no
authentication and a JSON events file (:mod:`teltonika.processor.live.local`). Every
method answers with a Deferred and fails only with the errors below, so the connection
knows which close code or error code to send.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Interface

from teltonika.processor.live.messages import Member


class Unauthenticated(Exception):
    """The credential is missing, unknown or expired (close 4401)."""


class UpstreamUnavailable(Exception):
    """The authority could not answer (429, 5xx, timeout, refused): close 4503 or
    ``UPSTREAM_UNAVAILABLE``; nothing is cached."""


class Forbidden(Exception):
    """The user may not read this event or these devices (``FORBIDDEN``)."""


@attrs.frozen(slots=True)
class Credential:
    """What the client presented: a session cookie or a bearer token.

    :ivar kind: ``"cookie"`` or ``"bearer"``.
    :ivar name: the cookie's name (for ``cookie``).
    """

    kind: str
    value: str = attrs.field(repr=False)
    name: str = ""


@attrs.frozen(slots=True)
class User:
    """An authenticated client. *credential* is what Directus calls made on the user's
    behalf present (None without Directus)."""

    id: str
    credential: Credential | None = attrs.field(default=None, repr=False)


class IAuthenticator(Interface):
    """Turns a handshake's credential into a :class:`User`."""

    def authenticate(credential: Credential | None, fresh: bool = False) -> Deferred[User]:  # noqa: N805
        """The user, or a failure with :class:`Unauthenticated` or
        :class:`UpstreamUnavailable`. *fresh* (the periodic re-check) does not accept a
        cached success: an expired session must be noticed at the next re-check."""

    def applies_user_limit() -> bool:
        """Whether the per-user connection limit means anything (False when every
        client is the same anonymous user)."""


class IEventDirectory(Interface):
    """Events, their devices, and who may read them."""

    def authorize_event(user: User, event: str) -> Deferred[Sequence[Member]]:  # noqa: N805
        """The event's devices when *user* may read *event*; fails with
        :class:`Forbidden` or :class:`UpstreamUnavailable`."""

    def members(event: str) -> Deferred[Sequence[Member]]:  # noqa: N805
        """The event's devices now (re-resolved while someone is subscribed)."""

    def authorize_devices(user: User, devices: Sequence[str]) -> Deferred[None]:  # noqa: N805
        """Succeeds when *user* may read every one of *devices* (all or nothing)."""
