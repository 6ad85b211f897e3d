"""Screenshots of the FiftyOne App in real headless Chromium, driven over the DevTools
protocol on a pipe (``--remote-debugging-pipe``: NUL-separated JSON on fds 3 and 4), so no
browser-automation package is needed.

The protocol lets the page's local storage be set before the App loads: FiftyOne 1.22 opens
an "Explore Enterprise" pop-up over the grid until ``fiftyone-enterprise-tooltip-seen`` is
set, and it would cover part of every screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]
SEEN_POPUP = "localStorage.setItem('fiftyone-enterprise-tooltip-seen', 'true');"


class Browser:
    """A headless Chromium with one page, for ``with`` blocks.

    Arguments:
      width, height: the page's size in CSS pixels (device scale 1).
    """

    def __init__(self, width: int = 1400, height: int = 900):
        self.size = (width, height)
        self._next_id = 0
        self._buffer = b""

    def __enter__(self) -> Browser:
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_chrome, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome = os.pipe()
        command = " ".join([str(CHROMIUM), *FLAGS, f"--user-data-dir={self._profile}"])
        self._process = subprocess.Popen(
            ["bash", "-c", f"exec {command} about:blank 3<&{to_chrome} 4>&{from_chrome}"],
            pass_fds=(to_chrome, from_chrome),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self._call("Page.enable", session=True)
        width, height = self.size
        self._call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self._call("Page.addScriptToEvaluateOnNewDocument", session=True, source=SEEN_POPUP)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._call("Browser.close")
        except OSError:
            pass
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        shutil.rmtree(self._profile, ignore_errors=True)

    def _call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise OSError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def screenshot(self, url: str, out: Path, settle: float = 12.0) -> Path:
        """Open ``url``, wait ``settle`` seconds for the App to render, save a PNG to ``out``."""
        self._call("Page.navigate", session=True, url=url)
        time.sleep(settle)
        return self.save_screenshot(out)

    def click_text(self, text: str, settle: float = 8.0) -> None:
        """Click the innermost element whose text is ``text``, then wait ``settle`` seconds."""
        script = f"""(() => {{
            const hit = [...document.querySelectorAll('body *')].filter(
                e => e.childElementCount === 0 && e.textContent.trim() === {json.dumps(text)});
            if (!hit.length) return false;
            hit[0].click();
            return true;
        }})()"""
        reply = self._call("Runtime.evaluate", session=True, expression=script, returnByValue=True)
        if not reply["result"].get("value"):
            raise RuntimeError(f"no element with the text {text!r} on the page")
        time.sleep(settle)

    def save_screenshot(self, out: Path) -> Path:
        """Save the page as it is now to ``out`` (PNG)."""
        data = self._call("Page.captureScreenshot", session=True, format="png")["data"]
        out.write_bytes(base64.b64decode(data))
        return out
