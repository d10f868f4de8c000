"""The chat page in headless Chromium, driven over the DevTools protocol.

The test pastes the API key, asks a question, waits for the streamed answer and its numbered
citations, then sends a thumbs-up and checks it reached the feedback file. Chromium is
Debian's package (``apt-get install chromium``); the test is skipped where it is missing.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.conftest import CHAT_KEY, Served

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    import websockets.sync.client  # noqa: F401 - the DevTools protocol client
    HAVE_WEBSOCKETS = True
except ImportError:
    HAVE_WEBSOCKETS = False
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0",
]  # fmt: skip

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
    pytest.mark.skipif(not HAVE_WEBSOCKETS, reason="the 'websockets' package is not installed (pip install -e '.[dev]')"),
]


class Page:
    """A minimal Chrome DevTools Protocol client for one page (websocket, request/response)."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self._ws = connect(ws_url, max_size=None, open_timeout=20)
        self._ids = itertools.count(1)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a CDP method and return its result (events in between are skipped)."""
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (promises awaited) and return its value."""
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 90.0) -> Any:
        """Poll ``expression`` until it is truthy."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for: {expression}\nlog: {self.js('document.body.innerText')}")

    def close(self) -> None:
        self._ws.close()


@pytest.fixture
def chromium() -> Iterator[str]:
    """A headless Chromium with a fresh profile; yields its DevTools HTTP address."""
    profile = Path(tempfile.mkdtemp(prefix="ragops-chromium-"))
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port_file.read_text().splitlines()[0].strip()}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _page(devtools: str) -> Page:
    targets = httpx.get(f"{devtools}/json/list", timeout=10).json()
    page = next(t for t in targets if t.get("type") == "page")
    return Page(page["webSocketDebuggerUrl"])


def test_chat_page_streams_an_answer_with_citations_and_sends_feedback(served: Served, chromium: str) -> None:
    page = _page(chromium)
    try:
        page.send("Page.enable")
        page.send("Page.navigate", url=served.url + "/")
        page.wait("document.readyState === 'complete' && !!document.getElementById('question')")
        # Paste the key, reload the model list with it, pick the FiD reader (it always cites).
        page.js(f"""(() => {{
            const key = document.getElementById('apikey');
            key.value = {json.dumps(CHAT_KEY)};
            key.dispatchEvent(new Event('change'));
            document.getElementById('reader').value = 'fid';
            document.getElementById('k').value = '3';
        }})()""")
        page.wait("document.getElementById('model').options.length > 0")
        assert "tiny-lora" in page.js("Array.from(document.getElementById('model').options).map(o => o.value)")
        page.js("""(() => {
            document.getElementById('question').value = 'How does MIG partition a GPU?';
            document.getElementById('send').click();
        })()""")
        state = page.wait("(() => { const t = document.querySelector('.turn'); return t && t.dataset.state !== 'streaming' && t.dataset.state; })()")
        assert state == "done", page.js("document.body.innerText")
        turn = page.js("""(() => {
            const t = document.querySelector('.turn');
            return {answer: t.querySelector('.answer').textContent,
                    citations: Array.from(t.querySelectorAll('.citation')).map(li => li.textContent),
                    requestId: t.dataset.requestId};
        })()""")
        assert turn["answer"].strip()
        assert turn["citations"] and turn["citations"][0].startswith("[")
        assert any(".md" in c or ".html" in c or ".txt" in c for c in turn["citations"])  # the sources are shown
        page.js("document.querySelector('.turn .up').click()")
        page.wait("document.querySelector('.turn .feedback-status').textContent.includes('thanks')")
    finally:
        page.close()
    lines = (served.feedback_dir / "feedback.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if json.loads(x)["request_id"] == turn["requestId"]]
    assert records and records[-1]["rating"] == "up" and records[-1]["question"] == "How does MIG partition a GPU?"
