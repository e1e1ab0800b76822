"""A tiny headless-Chromium driver over the DevTools protocol on a pipe (``--remote-debugging-pipe``).

No websocket library needed: Chromium reads NUL-terminated JSON commands on fd 3 and writes replies
and events on fd 4. Also a dependency-free PNG decoder for checking screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
    # Safety net: nothing but the local server resolves, so a stray external fetch cannot leave.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--window-size=1280,1600",
]


def find_chromium() -> str | None:
    """The Chromium binary (Debian's ``chromium`` package), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with one page (a flattened DevTools session) and its network log."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        cmd = " ".join([f'"{binary}"', *[f"'{f}'" for f in CHROMIUM_FLAGS],
                        f"'--user-data-dir={profile}'", "--remote-debugging-pipe", "about:blank"])
        # Chromium's log goes to a file: a pipe nobody reads would fill and stall it.
        profile.mkdir(parents=True, exist_ok=True)
        self._log = profile.parent / f"{profile.name}.log"
        # bash places the pipe ends on fds 3 and 4 for Chromium, then execs it.
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec {cmd} 3<&{to_chrome_r} 4>&{from_chrome_w}'],
                pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=log,
            )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            # The first command waits for Chromium to start: slow on a loaded 2-core machine.
            target = self.call("Target.createTarget", {"url": "about:blank"}, timeout=90)["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.call("Network.enable", session=True)
            self.call("Page.enable", session=True)
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cv:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._cv.notify_all()

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False,
             timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and wait for its reply (raise on a protocol error)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cv:
            while msg["id"] not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"{method}: no reply from Chromium ({self._state()})")
                self._cv.wait(left)
            reply = self._replies.pop(msg["id"])
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    def _state(self) -> str:
        """Whether Chromium still runs, and what it printed when it did not."""
        code = self.proc.poll()
        err = self._log.read_text(errors="replace")[-2000:]
        return f"{'still running' if code is None else f'exited with {code}'}; its log ends: {err}"

    def wait_event(self, method: str, since: int, timeout: float = 30.0) -> dict[str, Any]:
        """The first event named ``method`` after index ``since`` of ``events``."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for ev in self.events[since:]:
                    if ev.get("method") == method:
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {method} event")
                self._cv.wait(left)

    def open(self, url: str) -> None:
        """Navigate and wait for the load event (then a moment for late requests)."""
        mark = len(self.events)
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_event("Page.loadEventFired", mark)
        time.sleep(0.3)

    def requested_urls(self) -> list[str]:
        """Every URL the page asked for so far (from Network.requestWillBeSent)."""
        with self._cv:
            return [e["params"]["request"]["url"] for e in self.events
                    if e.get("method") == "Network.requestWillBeSent"]

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        return res["result"].get("value")

    def screenshot(self, path: Path) -> bytes:
        """A full-page PNG screenshot, also written to ``path``."""
        res = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=True)
        data = base64.b64decode(res["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        with contextlib.suppress(TimeoutError, RuntimeError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)


def launch(binary: str, folder: Path, tries: int = 2) -> Browser:
    """A started Browser with its profile under ``folder``; a start that stalls is retried afresh."""
    for attempt in range(1, tries + 1):
        try:
            return Browser(binary, folder / f"profile-{attempt}")
        except TimeoutError:
            if attempt == tries:
                raise
    raise AssertionError("unreachable")


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of raw pixel bytes) of an 8-bit RGB/RGBA PNG (filters undone)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def distinct_colours(data: bytes, step: int = 4) -> int:
    """How many distinct colours a PNG has (sampling every ``step``-th pixel of every ``step``-th row)."""
    try:
        import io

        from PIL import Image
    except ImportError:
        pass
    else:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
            w, h = rgb.size
            return len({rgb.getpixel((x, y)) for y in range(0, h, step) for x in range(0, w, step)})
    width, _, rows = png_pixels(data)
    channels = len(rows[0]) // width
    seen = set()
    for row in rows[::step]:
        for x in range(0, width, step):
            seen.add(row[x * channels:x * channels + 3])
    return len(seen)
