"""Headless Chromium driven over the DevTools protocol (CDP), for tests of the HTML views.

    with Chromium(find_chromium(), tmp_path / "profile") as br:
        br.open("file:///tmp/view.html", ready="document.body.dataset.ready === '1'")
        ids = br.eval("[...document.querySelectorAll('.sample')].map(e => e.dataset.sampleId)")
        br.hover(".tok[data-s='0'][data-p='1']"); br.click(...)      # real mouse events
        br.screenshot(tmp_path / "view.png")

Chromium is Debian's `chromium` package; the websocket client is `websockets` (a Prefect dependency).
When no browser is found the test FAILS with the install command: it never skips.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

INSTALL = "apt-get update && apt-get install -y chromium   (or: make browser)"


def find_chromium() -> str:
    """The Chromium executable ($OPD_CHROMIUM, else chromium / chromium-browser on PATH); fails the test
    with the install command when there is none."""
    for name in (os.environ.get("OPD_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    pytest.fail(f"headless Chromium is needed for this test and was not found on PATH: install it with `{INSTALL}` "
                f"or point $OPD_CHROMIUM at a Chromium/Chrome executable", pytrace=False)


class Chromium:
    def __init__(self, exe: str, profile: Path, width: int = 1400, height: int = 900, timeout: float = 60.0):
        profile = Path(profile)
        profile.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", f"--window-size={width},{height}",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"chromium did not start (exit {self.proc.returncode}); check `{exe} --headless "
                            f"--no-sandbox --dump-dom about:blank`", pytrace=False)
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        from websockets.sync.client import connect
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout)
        self._id = 0

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
            self.ws = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def send(self, method: str, **params) -> dict:
        """One CDP command; its result (events that arrive meanwhile are dropped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=self.timeout))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str):
        """The JSON value of a JS expression in the page (exceptions raise)."""
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, url: str, ready: str) -> None:
        """Navigate and wait until the JS expression `ready` is true."""
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + self.timeout
        while not self.eval(f"!!(document.body && ({ready}))"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: not ready ({ready}) after {self.timeout} s")
            time.sleep(0.05)

    def center(self, selector: str) -> tuple[float, float]:
        """Viewport coordinates of the element's center, scrolled into view first."""
        box = self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
                        f" e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();"
                        f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        if box is None:
            raise AssertionError(f"no element matches {selector!r}")
        return box[0], box[1]

    def hover(self, selector: str) -> None:
        x, y = self.center(selector)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def click(self, selector: str) -> None:
        x, y = self.center(selector)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def select(self, selector: str, value: str, event: str = "change") -> None:
        """Set a form control's value and fire the event the page listens to."""
        self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.value = {json.dumps(value)};"
                  f" e.dispatchEvent(new Event({json.dumps(event)}, {{bubbles: true}})); }})()")

    def screenshot(self, path: Path) -> Path:
        data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
        return Path(path)
