"""The operator page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium) loads ``/live/`` from the real processor fed by
a scripted stream, and the list shows each device's state and age."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.processor.live.helpers import Env, LiveProcessor, entry, imei, now_ms, wait_table

pytestmark = pytest.mark.slow
LIVE, STALE, OFFLINE = imei(501), imei(502), imei(503)


def chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise RuntimeError(
            "headless Chromium is needed (apt-get install chromium chromium-driver); "
            ".ci/run installs it"
        )
    return browser, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    binary, driver = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="teltonika-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page_proc(live_env: Env) -> LiveProcessor:
    events = live_env.tmp / "page-events.json"
    labels = {LIVE: "#7 live", STALE: "#8 stale", OFFLINE: "#9 offline"}
    events.write_text(json.dumps({"events": {"demo": {"devices": labels, "users": ["*"]}}}))
    process = live_env.processor(
        "live-page", "--live-events", f"file:{events}", "--live-tiles", "none"
    )
    wait_table(live_env.dsn)
    return process


def rows(chrome: webdriver.Chrome) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for li in chrome.find_elements(By.CSS_SELECTOR, "#devices li"):
        device = li.get_attribute("data-device")
        assert device is not None  # every row names its device
        out[device] = {
            "state": li.get_attribute("data-state"),
            "lat": li.get_attribute("data-lat"),
            "age": li.find_element(By.CSS_SELECTOR, ".age").text,
            "label": li.find_element(By.CSS_SELECTOR, ".label").text,
        }
    return out


def wait(predicate: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("the page did not get there in time")
        time.sleep(0.1)


def test_page_lists_states_ages_and_never_moves_back(
    live_env: Env, page_proc: LiveProcessor, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """Three devices (live, stale, offline) in state order with their ages; a late
    record sent after a newer one does not move the live marker back, an event record of
    the same second as the newest replaces it; the page is served
    with a strict CSP and nosniff. The screenshot is kept as a test artifact."""
    now = now_ms()
    track = [(now - 20_000 + i * 5_000, f"41.32{70 + i}", f"19.81{80 + i}") for i in range(4)]
    live_env.xadd(
        *(entry(LIVE, ts, lat=lat, lon=lon, angle=45, speed=52) for ts, lat, lon in track),
        entry(STALE, now - 120_000, lat="41.3301", lon="19.8100", angle=180, speed=0),
        entry(OFFLINE, now - 600_000, lat="41.3240", lon="19.8260", sats=0),
    )
    url = f"http://127.0.0.1:{page_proc.port}/live/?event=demo"
    with urllib.request.urlopen(url, timeout=5) as response:
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    browser.get(url)
    found = wait(lambda: len(rows(browser)) == 3 and rows(browser))
    assert [r["state"] for r in found.values()] == ["live", "stale", "offline"]
    assert list(found) == [LIVE, STALE, OFFLINE]  # sorted by state
    assert found[LIVE]["lat"] == "41.3273"
    assert found[LIVE]["age"].endswith(" s")
    assert found[STALE]["age"] == "2 min"
    assert found[OFFLINE]["age"] == "10 min"
    newest = now_ms()
    live_env.xadd(
        entry(LIVE, newest, lat="41.3290", lon="19.8190"),
        entry(LIVE, newest - 60_000, lat="41.0000", lon="19.0000"),  # late: must not show
        # the same second's event record: later by the processor's rule, so it replaces
        entry(LIVE, newest, lat="41.3291", lon="19.8191", event_io_id=239),
        # read after the late record (stream order): once it shows, the late one was seen
        entry(STALE, now - 110_000, lat="41.3302", lon="19.8100", angle=180, speed=0),
    )
    wait(lambda: rows(browser)[STALE]["lat"] == "41.3302")
    assert rows(browser)[LIVE]["lat"] == "41.3291"
    banner = browser.find_element(By.ID, "banner").text
    assert banner.startswith("Connected to live-page")
    shot = tmp_path / "live-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("TELTONIKA_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
