"""The demo page in a real browser: run ``dynamiclrp demo --quick``, open ``index.html`` in headless Chromium over
the DevTools protocol (a small stdlib websocket client), take a screenshot, and check that every image loaded
(non-zero natural size) and that the page logged no console error. Skips when Chromium is absent."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser"), shutil.which("google-chrome"))
                 if p and os.path.exists(p)), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/system_deps.sh)")


class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: masked text frames out, (fragmented) frames in."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        m = re.match(r"ws://([^:/]+):(\d+)(/.*)", url)
        assert m, url
        self.sock = socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {m.group(3)} HTTP/1.1\r\nHost: {m.group(1)}:{m.group(2)}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else
                                  bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                  bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            op = b0 & 0x0F
            if op == 8:
                raise ConnectionError("websocket closed by the browser")
            if op in (9, 10):  # ping / pong: not used by DevTools
                continue
            parts.append(payload)
            if b0 & 0x80:
                return b"".join(parts).decode()

    def close(self) -> None:
        self.sock.close()


class DevTools:
    """Commands and collected events of one page."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws, self.next_id, self.events = ws, 0, []

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0):
        end = time.monotonic() + timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while time.monotonic() < end:
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(method)


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "dynamiclrp", "demo", "--quick", "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    index = out / "index.html"
    assert index.is_file() and index.resolve().as_uri() in r.stdout  # it prints where the page is
    return index


def test_demo_outputs(demo_page):
    out = demo_page.parent
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) >= 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for name in ("tokens.html", "conservation.md", "summary.json", "coverage_efficientnet_lite0.txt",
                 "coverage_text_classifier.txt"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["conservation"]:  # seed = inputs + parameters + absorbed
        assert row["seed"] == pytest.approx(row["inputs"] + row["parameters"] + row["absorbed"], rel=1e-3, abs=1e-4)
    assert summary["coverage"]["efficientnet_lite0"] == 1.0


def test_demo_page_in_headless_chromium(demo_page, tmp_path):
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--window-size=1280,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ws = None
    try:
        port = None
        end = time.monotonic() + 60
        while time.monotonic() < end and port is None:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"chromium exited with {proc.returncode}")
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
        assert port, "chromium did not report its DevTools port"
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t.get("type") == "page")
        ws = WebSocket(page["webSocketDebuggerUrl"])
        cdp = DevTools(ws)
        for domain in ("Page", "Runtime", "Log"):
            cdp.call(f"{domain}.enable")
        cdp.call("Page.navigate", url=demo_page.resolve().as_uri())
        cdp.wait_for("Page.loadEventFired", timeout=60)
        images = cdp.call("Runtime.evaluate", returnByValue=True, expression=(
            "Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete, "
            "w: i.naturalWidth, h: i.naturalHeight}))"))["result"]["value"]
        title = cdp.call("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"]
        shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        png = base64.b64decode(shot["data"])
        (tmp_path / "demo_screenshot.png").write_bytes(png)
        errors = [e for e in cdp.events if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error")
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")]
    finally:
        if ws is not None:
            ws.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert title == "dynamiclrp demo"
    assert len(images) >= 2, images
    bad = [i for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert not bad, f"images that did not load: {bad}"
    assert not errors, f"console errors: {errors}"
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    w, h = struct.unpack(">II", png[16:24])
    assert w >= 800 and h >= 900  # the full page, not an empty viewport
