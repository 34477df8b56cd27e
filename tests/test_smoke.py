"""The throwaway Redis fixture works (a real server, not a skip)."""

from __future__ import annotations

from typing import Any


def test_redis_fixture(redis_server: Any, redis_url: str) -> None:
    """The session redis-server answers PING on its own port."""
    assert redis_server.cli("PING").strip() == "PONG"
    assert redis_url.startswith("redis://127.0.0.1:")
