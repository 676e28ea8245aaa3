"""Headless Chromium for tests: open a page, let its scripts run, read what it shows.

Debian's `chromium` (installed by `scripts/install-extras.sh chromium`, which `make test` runs)
is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: Chromium reads
commands from its descriptor 3 and writes replies and events to descriptor 4, one JSON message
per NUL-terminated chunk), so no port is opened and nothing else is needed. Every browser gets a
new empty profile.

    with Browser() as browser:
        browser.open("http://127.0.0.1:4200/runs/flow-run/<id>")
        browser.click("Task Runs")
        text = browser.wait_for_text(["ingest-", "Completed"], timeout=60)
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-pipe", "--window-size=1400,1000",
]
INSTALL = "scripts/install-extras.sh chromium"


def chromium_missing() -> str | None:
    """Why no browser test can run here (with the fix), or None."""
    if shutil.which("chromium") is None:
        return f"chromium is not installed; run `{INSTALL}`"
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, executable: str = "chromium"):
        self.profile = tempfile.mkdtemp(prefix="mft-chromium-")
        low_r, self._to_child = os.pipe()
        self._from_child, low_w = os.pipe()
        # Above 3 and 4, so that placing one of them there cannot clobber or close the other.
        to_child_r, from_child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (low_r, low_w))
        os.close(low_r)
        os.close(low_w)
        self._log = tempfile.TemporaryFile()  # chromium's own messages, for the error of a crash
        # bash (dash takes one-digit descriptors only) puts the pipes on the descriptors 3 and 4 Chromium reads and writes, whatever
        # numbers they have here (placing them in a preexec hook needs 3 and 4 open in this process).
        place = f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w} {to_child_r}<&- {from_child_w}>&-'
        self.process = subprocess.Popen(
            ["bash", "-c", place, executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            pass_fds=(to_child_r, from_child_w), start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None

    # ------------------------------------------------------------------ protocol

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("no reply from chromium in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 16)
                if not chunk:
                    raise BrowserError(f"chromium exited: {self._stderr_tail()}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def _stderr_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    # ------------------------------------------------------------------ pages

    def open(self, url: str) -> None:
        """Load `url` in this browser's one tab."""
        if self._session is None:
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.navigate", {"url": url}, session=self._session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session=self._session)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        """What the page shows (document.body.innerText)."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def scroll_down(self) -> None:
        """Scroll the page and every scrolled box in it to the bottom: lists that render their
        items only once they come into view (the Prefect UI's artifacts) render them all."""
        self.evaluate("[document.scrollingElement, ...document.querySelectorAll('*')]"
                      ".forEach(e => { if (e && e.scrollHeight > e.clientHeight) e.scrollTop = e.scrollHeight })")

    def wait_for_text(self, expected: list[str], timeout: float = 60, scroll: bool = False) -> str:
        """Wait until the page's visible text holds every string of `expected` (scrolling down
        between looks, with `scroll`); that text."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            if scroll:
                self.scroll_down()
            text = self.text()
            if all(item in text for item in expected):
                return text
            time.sleep(0.5)
        missing = [item for item in expected if item not in text]
        raise AssertionError(f"{self.evaluate('location.href')} did not show {missing} within {timeout:.0f} s; "
                             f"it showed:\n{text[:3000]}")

    def click(self, text: str, timeout: float = 60) -> None:
        """Click the first button, link or tab whose visible text is exactly `text`, once there is one."""
        find = ("[...document.querySelectorAll('button, a, [role=tab], .p-tab')]"
                f".find(e => e.innerText && e.innerText.trim() === {json.dumps(text)})")
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"!!({find})"):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} to click on {self.evaluate('location.href')} within {timeout:.0f} s")
            time.sleep(0.5)
        self.evaluate(f"({find}).click()")

    def screenshot(self, path, full_page: bool = True) -> None:
        """Save what the page shows as a PNG (the whole page's height with `full_page`)."""
        import base64

        params = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics", session=self._session)["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.call("Page.captureScreenshot", params, session=self._session)["data"]
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.call("Browser.close", timeout=5)
                self.process.wait(timeout=10)
        except (BrowserError, OSError, subprocess.TimeoutExpired):
            pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
