"""Device authorities: open, file (reload on change / SIGHUP) and spec parsing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from teltonika.authority import (
    AuthoritySpecError,
    FileAuthority,
    OpenAuthority,
    parse_authority_spec,
)
from tests.server.helpers import IMEI, OTHER_IMEI, successResultOf


def test_open() -> None:
    assert successResultOf(OpenAuthority().is_allowed(IMEI)) is True


def test_spec() -> None:
    assert parse_authority_spec("open") == ("open", "")
    assert parse_authority_spec("file:/etc/x") == ("file", "/etc/x")
    assert parse_authority_spec("redis:fleet:allowed") == ("redis", "fleet:allowed")
    for bad in ("", "file:", "redis", "other:x"):
        with pytest.raises(AuthoritySpecError):
            parse_authority_spec(bad)


def test_file_reloaded_on_change(tmp_path: Path) -> None:
    """A changed file is picked up by the periodic check without a restart."""
    path = tmp_path / "devices"
    path.write_text(IMEI + "\n")
    clock = Clock()
    authority = FileAuthority(path, clock, poll_interval=5)
    authority.start()
    assert successResultOf(authority.is_allowed(IMEI)) is True
    assert successResultOf(authority.is_allowed(OTHER_IMEI)) is False
    path.write_text(f"{IMEI}\n{OTHER_IMEI}\n")
    os.utime(path, ns=(1, 1))  # a distinct mtime even on coarse filesystems
    clock.advance(5)
    assert successResultOf(authority.is_allowed(OTHER_IMEI)) is True
    authority.stop()
    assert clock.getDelayedCalls() == []


def test_file_unreadable_keeps_old_list(tmp_path: Path, logged_errors: Any) -> None:
    """A reload that fails keeps the previous list and logs an error."""
    path = tmp_path / "devices"
    path.write_text(IMEI + "\n")
    authority = FileAuthority(path, Clock())
    path.write_bytes(b"\xff\xfe\n")
    authority.reload()
    assert authority.allowed == {IMEI}
    assert len(logged_errors.flush()) == 1
