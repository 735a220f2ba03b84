"""A headless Chromium for the console's tests: Debian's chromium and chromedriver, driven by
Selenium, with nothing fetched from the network (.ci/run installs the two packages).

Also a background event loop, for the sinks a browser test delivers to: the test itself
blocks on the browser, so the sink needs a loop of its own.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Every switch that keeps Chromium off the network and out of first-run chores.
SWITCHES = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--window-size=1280,900")

T = TypeVar("T")


def require_chromium() -> None:
    """Skip where the browser is missing; in CI (which installs it) that is a failure."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    message = f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium" \
              " chromium-driver; .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Browser:
    def __init__(self, profile: Path, screenshots: Path) -> None:
        options = webdriver.ChromeOptions()
        # Both paths given: Selenium Manager (which would download a browser) never runs.
        options.binary_location = str(CHROMIUM)
        for switch in (*SWITCHES, f"--user-data-dir={profile}"):
            options.add_argument(switch)
        self.driver = webdriver.Chrome(options=options,
                                       service=Service(executable_path=str(CHROMEDRIVER)))
        self.screenshots = screenshots
        self.base = ""

    def close(self) -> None:
        self.driver.quit()

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.find(css).text

    def type(self, css: str, text: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def click(self, css: str) -> None:
        self.find(css).click()

    def wait(self, check: Callable[[], T], within: float = 20.0, what: str = "") -> T:
        """Until `check` is truthy (an element replaced meanwhile by a live refresh counts as
        not yet), with a deadline."""

        def ready(_: Any) -> T | bool:
            try:
                return check() or False
            except StaleElementReferenceException:
                return False

        result: T = WebDriverWait(self.driver, within, poll_frequency=0.1).until(
            ready, message=what or "the page never showed it")
        return result

    def page_text(self) -> str:
        return self.find("body").text

    def sign_in(self, token: str) -> None:
        self.open("/sign-in")
        self.type("#token", token)
        self.click("#sign-in")
        self.wait(lambda: self.all("#who"), what="signed in")

    def sign_out(self) -> None:
        if self.all("#sign-out"):
            self.click("#sign-out")
            self.wait(lambda: self.all("#token"), what="the sign-in page")

    def screenshot(self, name: str) -> None:
        """Saved for docs/console.md (make console-screenshots writes them there)."""
        self.screenshots.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(self.screenshots / f"{name}.png"))

    def post(self, path: str, fields: dict[str, str]) -> int:
        """Replay a form from this page's origin and session, as a user could by hand: the
        HTTP status it got."""
        status: int = self.driver.execute_async_script(
            "const [path, fields, done] = arguments;"
            "fetch(path, {method: 'POST', body: new URLSearchParams(fields),"
            " redirect: 'manual'}).then(r => done(r.status), e => done(-1));",
            path, fields)
        return status


class BackgroundLoop:
    """An event loop in a thread, for servers (sinks) a synchronous test talks to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
