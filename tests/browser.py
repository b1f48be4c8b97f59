"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`), so the tests need
no websocket client: messages are JSON, each ended by a NUL byte; Chromium reads fd 3 and writes fd 4."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


class Chromium:
    def __init__(self, exe: str, profile: Path):
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()

        def pipes_to_3_and_4():  # via fresh copies: dup2 onto the same number would keep close-on-exec
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={profile}", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--window-size=1200,900"],
            preexec_fn=pipes_to_3_and_4, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self.buf, self.next_id, self.events = b"", 0, []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.from_r, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        msg: dict = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_event(self, name: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.events:
                if m.get("method") == name:
                    self.events.remove(m)
                    return m
            self.events.append(self._read(deadline))

    def open(self, url: str) -> tuple[str, list[dict]]:
        """Load `url` in a new tab; returns (session id, the protocol events seen while loading)."""
        self.events = []
        tid = self.send("Target.createTarget", url="about:blank")["targetId"]
        sid = self.send("Target.attachToTarget", targetId=tid, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", sid)
        self.events = []
        self.send("Page.navigate", sid, url=url)
        self.wait_event("Page.loadEventFired")
        time.sleep(0.2)  # late console messages
        self.send("Runtime.evaluate", sid, expression="1")
        return sid, list(self.events)

    def evaluate(self, sid: str, expression: str):
        res = self.send("Runtime.evaluate", sid, expression=f"JSON.stringify({expression})", returnByValue=True)
        return json.loads(res["result"]["value"])

    def screenshot(self, sid: str, clip: dict) -> bytes:
        shot = self.send("Page.captureScreenshot", sid, format="png", captureBeyondViewport=True,
                         clip=clip | {"scale": 1})
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, TimeoutError, EOFError, RuntimeError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_w)
        os.close(self.from_r)


def problems(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions, browser log errors (CSP violations among them) and any request that
    is not for the page file itself or an embedded data: URI."""
    out = []
    for m in events:
        p = m.get("params", {})
        if m.get("method") == "Runtime.exceptionThrown":
            out.append(f"exception: {p['exceptionDetails'].get('text')}")
        elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
            out.append(f"console {p['type']}: {[a.get('value') for a in p.get('args', [])]}")
        elif m.get("method") == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
            out.append(f"log {p['entry']['level']}: {p['entry']['text']}")
        elif m.get("method") == "Network.requestWillBeSent":
            url = p["request"]["url"]
            if not url.startswith(("file:", "data:")):
                out.append(f"request: {url}")
    return out
