"""A stand-in for Directus: a small twisted.web resource on a free port in the test
process, answering ``/users/me``, ``/items/events/<id>``, ``/items/entries`` and
``/items/devices`` from tables the test controls, and recording every request."""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site


class DirectusStub(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.users: dict[str, Any] = {}
        """session token -> user id, or an int status, or "slow" / "hold"."""
        self.events: dict[str, set[str]] = {}
        """event id -> users allowed to read it."""
        self.entries: dict[str, list[dict[str, Any]]] = {}
        self.devices: dict[str, set[str]] = {}
        """user -> readable IMEIs."""
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.held: list[tuple[Request, str]] = []
        self.port: Any = None

    def start(self) -> int:
        site = Site(self)
        site.noisy = False
        # listenTCP is declared for ServerFactory[its default protocol], an invariant generic
        factory = cast(ServerFactory, site)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        return int(self.port.getHost().port)

    def calls(self, path: str) -> list[dict[str, str]]:
        return [headers for p, headers in self.requests if p.startswith(path)]

    def _user(self, request: Request) -> Any:
        auth = (request.getHeader(b"authorization") or b"").decode()
        if auth.startswith("Bearer "):
            return self.users.get(auth[7:], 401)
        cookie = (request.getHeader(b"cookie") or b"").decode()
        name, _, value = cookie.partition("=")
        if name == "directus_session_token":
            return self.users.get(value, 401)
        return 401

    def answer(self, request: Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"set-cookie", b"directus_refresh_token=leak; Path=/")
        return json.dumps(body).encode()

    def release(self) -> None:
        """Answer every held /users/me request."""
        held, self.held = self.held, []
        for request, user in held:
            request.write(self.answer(request, 200, {"data": {"id": user}}))
            request.finish()

    def render_GET(self, request: Request) -> Any:
        path = request.path.decode()
        headers = {
            k.decode().lower(): b",".join(v).decode()
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append((path, headers))
        user = self._user(request)
        if path == "/users/me":
            if user == "slow":
                d: Deferred[None] = Deferred()
                reactor.callLater(4.0, d.callback, None)

                def late(_: Any) -> None:
                    if not request._disconnected:
                        request.write(self.answer(request, 200, {"data": {"id": "slow"}}))
                        request.finish()

                d.addCallback(late)
                return NOT_DONE_YET
            if isinstance(user, str) and user.startswith("hold:"):
                self.held.append((request, user[5:]))
                return NOT_DONE_YET
            if user == 403:
                return self.answer(
                    request,
                    403,
                    {"errors": [{"message": "x", "extensions": {"code": "INVALID_TOKEN"}}]},
                )
            if isinstance(user, int):
                return self.answer(request, user, {"errors": [{"message": "no"}]})
            return self.answer(request, 200, {"data": {"id": user}})
        if path.startswith("/items/events/"):
            event = path.rsplit("/", 1)[1]
            if isinstance(user, str) and user in self.events.get(event, set()):
                return self.answer(request, 200, {"data": {"id": event}})
            return self.answer(request, 403, {"errors": [{"message": "forbidden"}]})
        if path == "/items/entries":
            if request.getHeader(b"authorization") != b"Bearer service-token":
                return self.answer(request, 401, {})
            event = request.args[b"filter[event][_eq]"][0].decode()
            return self.answer(request, 200, {"data": self.entries.get(event, [])})
        if path == "/items/devices":
            wanted = request.args[b"filter[imei][_in]"][0].decode().split(",")
            readable = self.devices.get(user, set()) if isinstance(user, str) else set()
            return self.answer(
                request, 200, {"data": [{"imei": i} for i in wanted if i in readable]}
            )
        return self.answer(request, 404, {})
