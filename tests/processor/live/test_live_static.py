"""The vendored Leaflet is exactly npm's leaflet@1.9.4 (scripts/vendor-leaflet.sh
refreshes it), ships with its licence, and the page needs no inline script; the live
options are validated with plain sentences."""

from __future__ import annotations

import hashlib
import re
from importlib.resources import files

import pytest
from twisted.python import usage

from teltonika.processor.live.options import (
    is_loopback,
    live_auth,
    live_endpoint,
    live_events,
    live_origin,
    live_tiles,
)
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
        (["--live-auth", "ldap:x"], "--live-auth: must be"),
        (["--live-auth", "directus:ftp://x"], "http:// or https://"),
        (["--live-allowed-origin", "null"], "--live-allowed-origin"),
        (["--live-events", "x.json"], "--live-events: must be file:PATH or directus, not 'x.json'"),
        (["--live-slow-timeout", "0"], "must be above 0"),
    ):
        with pytest.raises(usage.UsageError, match=re.escape(message)):
            parse(*argv)
    assert parse("--live", "tcp:8090", "--live-auth", "token-file:/x")["live"] == ["tcp:8090"]
    assert is_loopback(live_endpoint("1")) and is_loopback(r"tcp6:1:interface=\:\:1")
    assert not is_loopback("tcp:1:interface=0.0.0.0") and is_loopback("unix:/run/x.sock")


def test_live_auth_coercer() -> None:
    """Three forms; a Directus URL over http(s) only; the message shows the value."""
    assert live_auth(" directus:https://d.example ") == "directus:https://d.example"
    assert live_auth("token-file:/run/t") == "token-file:/run/t"
    assert live_auth("none") == "none"
    for bad in ("ldap:x", "none:x", "token-file:", "directus:ftp://x"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            live_auth(bad)


def test_live_events_coercer() -> None:
    assert live_events("directus") == "directus" and live_events("file:/e.json") == "file:/e.json"
    with pytest.raises(ValueError, match=re.escape("not 'e.json'")):
        live_events("e.json")


def test_live_tiles_coercer() -> None:
    """none, off or nothing mean the plain grid; a template is kept, trimmed."""
    assert live_tiles(" https://t/{z}/{x}/{y}.png ") == "https://t/{z}/{x}/{y}.png"
    assert live_tiles("None") is None and live_tiles("off") is None and live_tiles("") is None


def test_live_allowed_origin_coercer() -> None:
    """Each origin is checked as it is given, the error names the option and the value;
    repeated values accumulate into the allowed set."""
    assert live_origin("https://a.b:8443") == ("https", "a.b", 8443)
    with pytest.raises(usage.UsageError, match=r"^--live-allowed-origin: .*'ftp://x'"):
        live_origin("ftp://x")
    options = parse("--live-allowed-origin", "https://a.b", "--live-allowed-origin", "http://c")
    assert options["live-origins"] == frozenset({("https", "a.b", 443), ("http", "c", 80)})
