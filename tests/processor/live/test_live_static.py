"""The vendored Leaflet is exactly npm's leaflet@1.9.4 (scripts/vendor-leaflet.sh
refreshes it), ships with its licence, and the page needs no inline script; the live
options are validated with plain sentences."""

from __future__ import annotations

import hashlib
import re
from importlib.resources import files

import pytest
from twisted.python import usage

from teltonika.processor.live.options import is_loopback, live_endpoint
from teltonika.processor.tap import Options

LEAFLET_SHA256 = {
    "leaflet.js": "db49d009c841f5ca34a888c96511ae936fd9f5533e90d8b2c4d57596f4e5641a",
    "leaflet.css": "a7837102824184820dfa198d1ebcd109ff6d0ff9a2672a074b9a1b4d147d04c6",
    "LICENSE": "53e8dc25862014e4324741ca18fbe3611e11d42ef69f59f86ea8c5389647d4cb",
}
STATIC = files("teltonika.processor.live") / "static"


@pytest.mark.parametrize("name", sorted(LEAFLET_SHA256))
def test_leaflet_checksums(name: str) -> None:
    data = (STATIC / "leaflet" / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == LEAFLET_SHA256[name]


def test_leaflet_version_and_licence() -> None:
    assert b"Leaflet 1.9.4," in (STATIC / "leaflet" / "leaflet.js").read_bytes()
    assert (STATIC / "leaflet" / "LICENSE").read_text().startswith("BSD 2-Clause License")


def test_page_has_no_inline_script() -> None:
    """The CSP allows scripts from the origin only: every script tag has a src and the
    markup has no inline event handler."""
    html = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts)
    assert re.search(r"\son[a-z]+\s*=", html) is None


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(["--postgres", "dbname=x", *argv])
    return options


def test_live_options() -> None:
    """Off by default; a bare port is loopback; none is refused on a public interface;
    bad values are plain-sentence usage errors."""
    assert parse()["live"] == []
    options = parse(
        "--live", "8090", "--live-tiles", "none", "--live-allowed-origin", "https://a.b"
    )
    assert options["live"] == ["tcp:8090:interface=127.0.0.1:backlog=1024"]
    assert options["live-tiles"] is None and options["live-tick"] == 25.0
    assert options["live-origins"] == frozenset({("https", "a.b", 443)})
    for argv, message in (
        (["--live", "tcp:8090"], "only allowed when every --live endpoint listens on loopback"),
        (["--live-auth", "ldap:x"], "--live-auth must be"),
        (["--live-auth", "directus:ftp://x"], "http:// or https://"),
        (["--live-allowed-origin", "null"], "--live-allowed-origin"),
        (["--live-events", "x.json"], "--live-events must be"),
        (["--live-slow-timeout", "0"], "must be above 0"),
    ):
        with pytest.raises(usage.UsageError, match=re.escape(message)):
            parse(*argv)
    assert parse("--live", "tcp:8090", "--live-auth", "token-file:/x")["live"] == ["tcp:8090"]
    assert is_loopback(live_endpoint("1")) and is_loopback(r"tcp6:1:interface=\:\:1")
    assert not is_loopback("tcp:1:interface=0.0.0.0") and is_loopback("unix:/run/x.sock")
