"""Check the built documentation site in a real browser (headless Chromium).

    .venv/bin/python scripts/check_site.py             # build the site, serve it, check it
    .venv/bin/python scripts/check_site.py --site site # check an existing build

The site is served on 127.0.0.1 (a random free port) and Chromium is driven through the DevTools
protocol, over a websocket client written here with the standard library, so the check needs no
Python package beyond the project's own and no driver binary. It checks that:

* every page listed in ``PAGES`` loads, renders its title, its content and its code blocks,
  with no JavaScript exception;
* the figure of the Concepts page is displayed (loaded, non-zero size);
* API pages contain rendered API objects (mkdocstrings output);
* **search works**: typing an API name (``estimate_loss_constraint``) into Material's search box
  yields a result linking to the API reference, once the client-side search (a web worker over
  ``search/search_index.json``) has run; and opening ``/?q=<name>`` does the same.

Exit status 0 when every check passes, 1 when one fails, 2 when Chromium is not installed. The
test ``tests/test_browser.py`` runs the same checks under pytest.

Chromium is looked up as ``$CHROMIUM``, then ``chromium``, ``chromium-browser``,
``google-chrome``. The flags used work as root in containers (``--no-sandbox``) and keep the
browser off the network (no component updates, no background networking).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import http.server
import json
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: ``(path, text the page's first heading must contain, extra check)``.
PAGES: list[tuple[str, str, str | None]] = [
    ("", "oodunleash", None),
    ("getting-started/", "Getting started", None),
    ("concepts/", "Concepts", "figure"),
    ("tutorials/", "Tutorials", None),
    ("tutorials/timm-own-data/", "timm", None),
    ("tutorials/custom-module/", "custom", None),
    ("tutorials/umap-sparse-export/", "UMAP", None),
    ("tutorials/scores/", "score", None),
    ("tutorials/hub/", "Hub", None),
    ("tutorials/intermediate-stage/", "intermediate stage", None),
    ("tutorials/multi-gpu/", "torchrun", None),
    ("howto/", "How-to", None),
    ("howto/loss-constraint/", "ξ", None),
    ("howto/distributed/", "GPU", None),
    ("api/", "API reference", None),
    ("api/oodunleash/", "oodunleash", "api"),
    ("api/wrapper/", "oodunleash.wrapper", "api"),
    ("api/finetune/", "oodunleash.finetune", "api"),
    ("api/scores/", "oodunleash.scores", "api"),
    ("benchmarks/", "Benchmarks", None),
    ("changelog/", "Changelog", None),
]

#: An API name that search must find, and the page its result must link to.
SEARCH_TERM = "estimate_loss_constraint"
SEARCH_TARGET = "api/finetune/"

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
]


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or ``None``."""
    candidates = [os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]
    for name in candidates:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# --------------------------------------------------------------------------- a tiny websocket
class WebSocket:
    """A minimal RFC 6455 client: text frames, masking, fragmentation, ping/close."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        assert url.startswith("ws://"), url
        host_port, _, path = url[len("ws://") :].partition("/")
        host, _, port = host_port.partition(":")
        self.sock = socket.create_connection((host, int(port or 80)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("The DevTools websocket closed during the handshake.")
            response += chunk
        head, _, self._buffer = response.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"Websocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buffer)))
            if not chunk:
                raise ConnectionError("The DevTools websocket closed.")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def send(self, text: str) -> None:
        payload = text.encode()
        header = bytearray([0x81])  # FIN + text
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(header) + mask + masked)

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("The DevTools websocket was closed by the browser.")
            if opcode in (0x9, 0xA):  # ping / pong: not part of a message
                continue
            message += payload
            if first & 0x80:
                return message.decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------- DevTools session
@dataclass
class Browser:
    """One Chromium page driven through the DevTools protocol."""

    ws: WebSocket
    next_id: int = 0
    exceptions: list[str] = field(default_factory=list)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("method") == "Runtime.exceptionThrown":
                details = message["params"]["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text")
                self.exceptions.append(str(text))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str, timeout: float = 20.0) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href", timeout)

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"Timed out after {timeout:.0f}s waiting for {expression!r}.")
            time.sleep(0.1)


@contextlib.contextmanager
def chromium(binary: str) -> Iterator[Browser]:
    """Start a headless Chromium with a fresh profile and yield a page session."""
    profile = tempfile.mkdtemp(prefix="oodunleash-chromium-")
    process = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ws = None
    try:
        port_file = pathlib.Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium ({binary}) did not start its DevTools server.")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        page = next(t for t in targets if t.get("type") == "page")
        ws = WebSocket(page["webSocketDebuggerUrl"])
        browser = Browser(ws)
        browser.call("Page.enable")
        browser.call("Runtime.enable")
        yield browser
    finally:
        if ws is not None:
            ws.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


# --------------------------------------------------------------------------- serving the site
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@contextlib.contextmanager
def serve(site: pathlib.Path) -> Iterator[str]:
    """Serve ``site`` on 127.0.0.1 at a free port; yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def build_site(destination: pathlib.Path) -> pathlib.Path:
    """``mkdocs build --strict`` into ``destination``."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(destination)],
        cwd=ROOT,
        check=True,
        env=env,
    )
    return destination


# --------------------------------------------------------------------------- the checks
PAGE_STATE = """(() => {
  const h1 = document.querySelector('.md-content h1');
  const img = document.querySelector('.md-content img');
  return {
    title: document.title,
    h1: h1 ? h1.textContent.trim() : null,
    paragraphs: document.querySelectorAll('.md-content p').length,
    code: document.querySelectorAll('.md-content .highlight').length,
    api: document.querySelectorAll('.md-content .doc-object').length,
    image: img ? {src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0,
                  width: img.getBoundingClientRect().width} : null,
    notFound: document.body.textContent.includes('404 - Not found'),
  };
})()"""

SEARCH_RESULTS = """(() => {
  const items = [...document.querySelectorAll('.md-search-result__item a')];
  return items.length ? items.map(a => a.getAttribute('href')) : null;
})()"""


def check_pages(browser: Browser, base: str) -> list[str]:
    """Problems found on the pages of ``PAGES`` (empty when all is well)."""
    problems = []
    for path, heading, extra in PAGES:
        before = len(browser.exceptions)
        browser.goto(base + path)
        state = browser.evaluate(PAGE_STATE)
        where = f"/{path}"
        if state["notFound"] or not state["h1"]:
            problems.append(f"{where}: no content rendered ({state})")
            continue
        if heading.lower() not in state["h1"].lower():
            problems.append(f"{where}: heading {state['h1']!r} lacks {heading!r}")
        if "oodunleash" not in state["title"]:
            problems.append(f"{where}: title {state['title']!r}")
        if extra == "figure" and not (state["image"] and state["image"]["ok"]):
            problems.append(f"{where}: the figure is not displayed ({state['image']})")
        if extra == "api" and state["api"] == 0:
            problems.append(f"{where}: no rendered API object")
        if len(browser.exceptions) > before:
            problems.append(f"{where}: JavaScript exception {browser.exceptions[before:]}")
    return problems


def check_search(browser: Browser, base: str, timeout: float = 30.0) -> list[str]:
    """Problems with search: typing the term into the box, and opening ``?q=term``."""
    problems = []
    # 1. Type into the search box, as a user would.
    browser.goto(base)
    browser.wait_for("!!document.querySelector('.md-search__input')")
    browser.evaluate("document.querySelector('.md-search__input').focus()")
    browser.call("Input.insertText", text=SEARCH_TERM)
    # 2. Then the q parameter, which Material reads on load.
    for how, action in (("typed", None), ("?q=", f"{base}?q={SEARCH_TERM}")):
        if action is not None:
            browser.goto(action)
        try:
            hrefs = browser.wait_for(SEARCH_RESULTS, timeout)
        except TimeoutError:
            problems.append(f"search ({how}) for {SEARCH_TERM!r}: no result within {timeout:.0f}s")
            continue
        if not any(SEARCH_TARGET in href for href in hrefs):
            problems.append(
                f"search ({how}) for {SEARCH_TERM!r}: no result links to {SEARCH_TARGET} "
                f"(got {hrefs[:5]})"
            )
    return problems


def run_checks(site: pathlib.Path, binary: str) -> list[str]:
    """All checks against the built ``site``; returns the problems found."""
    with serve(site) as base, chromium(binary) as browser:
        return check_pages(browser, base) + check_search(browser, base)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=pathlib.Path, help="an existing build (default: build)")
    args = parser.parse_args(argv)
    binary = find_chromium()
    if binary is None:
        print("Chromium not found: apt-get install -y chromium (or set $CHROMIUM).")
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oodunleash-site-") as tmp:
        site = args.site or build_site(pathlib.Path(tmp) / "site")
        built = time.perf_counter()
        problems = run_checks(site, binary)
    for problem in problems:
        print(f"FAIL {problem}")
    print(
        f"{len(PAGES)} pages and search checked in {time.perf_counter() - built:.1f}s "
        f"(build {built - started:.1f}s): {'all good' if not problems else 'problems found'}."
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
