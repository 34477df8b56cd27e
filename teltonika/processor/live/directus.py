"""Directus as the live broadcast's authority, over treq.

* Authentication: ``GET URL/users/me?fields=id`` with only the client's credential (its
  session cookie, or its bearer token), ``Accept: application/json``, a 3 s timeout
  (inside autobahn's handshake timeout). ``200`` with ``data.id`` is the user; ``401``, or
  ``403`` with code ``INVALID_TOKEN`` (any other 4xx too) is "unauthenticated"; ``429``,
  ``5xx``, a timeout or a refused connection is "upstream unavailable". Outcomes are
  cached by a hash of the credential (success 30 s, refusal 5 s; unavailability is not
  cached) with one call in flight per credential.
* Authorization of an event: ``GET URL/items/<events>/<id>?fields=id`` with the user's
  credential answers 200 (Directus answers 403 for "missing" and "not allowed" alike).
* Membership: ``GET URL/items/<entries>?filter[<event field>][_eq]=<id>&fields=...``
  with the processor's own service token, cached 60 s.
* Devices: one ``filter[imei][_in]=`` query on ``<devices>`` with the user's credential;
  every device must come back (all or nothing).

No cookie jar (an answer's ``Set-Cookie`` must never reach another user's call) and no
redirects (a credential is sent to Directus and nowhere else).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Final

import attrs
import orjson
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from teltonika.interfaces import IProcessReactor
from teltonika.processor.live.cache import SingleFlightCache
from teltonika.processor.live.interfaces import (
    Credential,
    Forbidden,
    IAuthenticator,
    IEventDirectory,
    Unauthenticated,
    UpstreamUnavailable,
    User,
)
from teltonika.processor.live.messages import Member
from teltonika.processor.live.metrics import LiveMetrics
from teltonika.units import SECONDS

TIMEOUT: Final = 3 * SECONDS
SUCCESS_LIFETIME: Final = 30 * SECONDS
REFUSAL_LIFETIME: Final = 5 * SECONDS
MEMBERS_LIFETIME: Final = 60 * SECONDS
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
_IMEI_CHARS: Final = frozenset("0123456789")


@attrs.frozen
class DirectusSettings:
    """Collections and fields (the ``--live-*`` options); dotted fields follow relations."""

    url: str
    service_token: str | None = attrs.field(default=None, repr=False)
    timeout: float = TIMEOUT
    event_collection: str = "events"
    entry_collection: str = "entries"
    entry_event_field: str = "event"
    entry_imei_field: str = "imei"
    entry_label_field: str = "label"
    device_collection: str = "devices"
    device_imei_field: str = "imei"


@attrs.frozen(slots=True)
class Answer:
    """An HTTP answer: the status and the JSON body (None when it was not JSON)."""

    status: int
    body: Any


class _BodyTooLarge(Exception):
    pass


def no_cookie_client(reactor: IProcessReactor) -> HTTPClient:
    """A treq client that keeps no cookies and reuses connections (the reactor connects
    over TCP and times the pool's idle connections)."""
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))
    return HTTPClient(agent, cookiejar=jar)  # type: ignore[arg-type]


def credential_headers(credential: Credential) -> dict[str, str]:
    """The one header that carries *credential* (and nothing else of the client's)."""
    if credential.kind == "cookie":
        return {"Cookie": f"{credential.name}={credential.value}"}
    return {"Authorization": f"Bearer {credential.value}"}


def credential_key(credential: Credential) -> str:
    """The cache key: a hash, so no credential sits in memory as a dict key."""
    raw = f"{credential.kind}\0{credential.name}\0{credential.value}".encode()
    return hashlib.sha256(raw).hexdigest()


def dotted(item: Any, path: str) -> Any:
    """``item["a"]["b"]`` for ``"a.b"`` (None when a step is missing)."""
    for step in path.split("."):
        if not isinstance(item, dict):
            return None
        item = item.get(step)
    return item


def _error_codes(body: Any) -> set[str]:
    codes = set()
    if isinstance(body, dict):
        for error in body.get("errors") or ():
            code = dotted(error, "extensions.code")
            if isinstance(code, str):
                codes.add(code)
    return codes


def _unavailable(status: int) -> bool:
    return status == 429 or status >= 500


class DirectusClient:
    """GET requests to Directus with a timeout, a size bound and a latency metric."""

    _log = Logger()

    def __init__(
        self,
        settings: DirectusSettings,
        clock: IReactorTime,
        http: HTTPClient,
        metrics: LiveMetrics,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.http = http
        self.metrics = metrics

    async def get(
        self, call: str, path: str, params: Sequence[tuple[str, str]], headers: Mapping[str, str]
    ) -> Answer:
        """GET ``url + path``; raises :class:`UpstreamUnavailable` on timeout or refusal."""
        url = self.settings.url.rstrip("/") + path
        started = time.perf_counter()
        request: Deferred[Any] = self.http.get(
            url,
            params=list(params),
            headers={b"Accept": [b"application/json"]}  # type: ignore[arg-type]
            | {k.encode("latin-1"): [v.encode("latin-1")] for k, v in headers.items()},
            allow_redirects=False,
        )
        request.addTimeout(self.settings.timeout, self.clock)
        try:
            response = await request
            chunks: list[bytes] = []
            size = 0

            def collect(data: bytes) -> None:
                nonlocal size
                size += len(data)
                if size > MAX_BODY_BYTES:
                    raise _BodyTooLarge()
                chunks.append(data)

            from treq import collect as treq_collect

            reading: Deferred[None] = treq_collect(response, collect)
            reading.addTimeout(self.settings.timeout, self.clock)
            await reading
        except Exception as e:
            self.metrics.directus_seconds.labels(call=call).observe(time.perf_counter() - started)
            self._log.warn("Directus {call} failed: {error}", call=call, error=type(e).__name__)
            raise UpstreamUnavailable(f"Directus {call}: {type(e).__name__}") from None
        self.metrics.directus_seconds.labels(call=call).observe(time.perf_counter() - started)
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            body = None
        return Answer(int(response.code), body)


def _lifetime(outcome: Any) -> float:
    if isinstance(outcome, Failure):
        return REFUSAL_LIFETIME if outcome.check(Unauthenticated) else 0.0
    return SUCCESS_LIFETIME


@implementer(IAuthenticator)
class DirectusAuthenticator:
    """``--live-auth directus:URL``; see the module docstring."""

    _log = Logger()

    def __init__(self, client: DirectusClient, clock: IReactorTime, metrics: LiveMetrics) -> None:
        self.client = client
        self.metrics = metrics
        self._credentials: dict[str, Credential] = {}
        self.cache: SingleFlightCache[str, User] = SingleFlightCache(
            clock,
            self._fetch,
            _lifetime,
            on_lookup=lambda hit: metrics.directus_cache.labels(
                result="hit" if hit else "miss"
            ).inc(),
        )

    def applies_user_limit(self) -> bool:
        """IAuthenticator API"""
        return True

    def authenticate(self, credential: Credential | None, fresh: bool = False) -> Deferred[User]:
        """IAuthenticator API"""
        if credential is None:
            return Deferred.fromCoroutine(self._refuse())
        key = credential_key(credential)
        if fresh:
            self.cache.forget(key)
        self._credentials[key] = credential
        d = self.cache.get(key)

        def forget(result: Any) -> Any:
            self._credentials.pop(key, None)
            return result

        d.addBoth(forget)
        return d

    @staticmethod
    async def _refuse() -> User:
        raise Unauthenticated("no credential")

    def _fetch(self, key: str) -> Deferred[User]:
        return Deferred.fromCoroutine(self._users_me(self._credentials[key]))

    async def _users_me(self, credential: Credential) -> User:
        answer = await self.client.get(
            "users_me", "/users/me", [("fields", "id")], credential_headers(credential)
        )
        if answer.status == 200:
            user_id = dotted(answer.body, "data.id")
            if isinstance(user_id, str | int) and str(user_id):
                return User(str(user_id), credential)
            raise UpstreamUnavailable("Directus /users/me answered 200 without data.id")
        if _unavailable(answer.status):
            raise UpstreamUnavailable(f"Directus /users/me answered {answer.status}")
        if answer.status == 403 and "INVALID_TOKEN" not in _error_codes(answer.body):
            self._log.warn(
                "Directus /users/me answered 403 without INVALID_TOKEN: treated as unauthenticated"
            )
        raise Unauthenticated(f"Directus /users/me answered {answer.status}")


@implementer(IEventDirectory)
class DirectusEventDirectory:
    """Events, entries and devices in Directus collections (module docstring)."""

    def __init__(
        self,
        client: DirectusClient,
        clock: IReactorTime,
        metrics: LiveMetrics,
        members_lifetime: float = MEMBERS_LIFETIME,
    ) -> None:
        self.client = client
        self.settings = client.settings
        self.membership: SingleFlightCache[str, Sequence[Member]] = SingleFlightCache(
            clock,
            lambda event: Deferred.fromCoroutine(self._members(event)),
            lambda outcome: 0.0 if isinstance(outcome, Failure) else members_lifetime,
            size=1_000,
            on_lookup=lambda hit: metrics.directus_cache.labels(
                result="hit" if hit else "miss"
            ).inc(),
        )

    def authorize_event(self, user: User, event: str) -> Deferred[Sequence[Member]]:
        """IEventDirectory API"""
        return Deferred.fromCoroutine(self._authorize_event(user, event))

    async def _authorize_event(self, user: User, event: str) -> Sequence[Member]:
        if user.credential is None:
            raise Forbidden("no credential to ask Directus with")
        answer = await self.client.get(
            "event",
            f"/items/{self.settings.event_collection}/{event}",
            [("fields", "id")],
            credential_headers(user.credential),
        )
        if _unavailable(answer.status):
            raise UpstreamUnavailable(f"Directus answered {answer.status}")
        if answer.status != 200:
            raise Forbidden(f"Directus answered {answer.status}")
        members: Sequence[Member] = await self.membership.get(event)
        return members

    def members(self, event: str) -> Deferred[Sequence[Member]]:
        """IEventDirectory API"""
        return self.membership.get(event)

    async def _members(self, event: str) -> Sequence[Member]:
        s = self.settings
        headers = {} if s.service_token is None else {"Authorization": f"Bearer {s.service_token}"}
        answer = await self.client.get(
            "entries",
            f"/items/{s.entry_collection}",
            [
                (f"filter[{s.entry_event_field}][_eq]", event),
                ("fields", f"id,{s.entry_imei_field},{s.entry_label_field}"),
                ("limit", "-1"),
            ],
            headers,
        )
        if answer.status != 200 or not isinstance(dotted(answer.body, "data"), list):
            raise UpstreamUnavailable(f"Directus entries answered {answer.status}")
        members: dict[str, Member] = {}
        for item in answer.body["data"]:
            imei = dotted(item, s.entry_imei_field)
            if not isinstance(imei, str) or len(imei) != 15 or not set(imei) <= _IMEI_CHARS:
                continue
            entry = dotted(item, "id")
            label = dotted(item, s.entry_label_field)
            members[imei] = Member(
                imei,
                None if entry is None else str(entry),
                None if label is None else str(label),
            )
        return tuple(members.values())

    def authorize_devices(self, user: User, devices: Sequence[str]) -> Deferred[None]:
        """IEventDirectory API"""
        return Deferred.fromCoroutine(self._authorize_devices(user, devices))

    async def _authorize_devices(self, user: User, devices: Sequence[str]) -> None:
        if user.credential is None:
            raise Forbidden("no credential to ask Directus with")
        await directus_devices_check(self.client, user.credential, devices)


async def directus_devices_check(
    client: DirectusClient, credential: Credential, devices: Sequence[str]
) -> None:
    """All-or-nothing: every device must be readable in the devices collection."""
    s = client.settings
    answer = await client.get(
        "devices",
        f"/items/{s.device_collection}",
        [
            (f"filter[{s.device_imei_field}][_in]", ",".join(devices)),
            ("fields", s.device_imei_field),
            ("limit", "-1"),
        ],
        credential_headers(credential),
    )
    if _unavailable(answer.status):
        raise UpstreamUnavailable(f"Directus answered {answer.status}")
    data = dotted(answer.body, "data")
    if answer.status != 200 or not isinstance(data, list):
        raise Forbidden(f"Directus answered {answer.status}")
    readable = {str(dotted(item, s.device_imei_field)) for item in data}
    if not set(devices) <= readable:
        raise Forbidden("some devices are not readable")
