"""A headless Chromium driven over its DevTools protocol through a pipe (--remote-debugging-pipe: JSON messages
ended by NUL on file descriptors 3 and 4), so the tests need no websocket package. Synchronous: run it in a
thread from async tests."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import subprocess
from pathlib import Path
from typing import Any

_WAIT = 60.0  # seconds without a word from the browser before a test fails rather than hangs


class Chromium:
    """One headless browser with one page; ``send`` runs a DevTools command on that page."""

    def __init__(self, binary: str, profile: Path) -> None:
        command_read, self._command_write = os.pipe()
        self._output_read, output_write = os.pipe()

        def pipes_as_3_and_4() -> None:  # where --remote-debugging-pipe expects them
            os.dup2(command_read, 3)
            os.dup2(output_write, 4)

        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",  # root in a container
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "--window-size=900,800",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=pipes_as_3_and_4,  # the fds must be 3 and 4; pass_fds alone keeps numbers, not places
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(command_read)
        os.close(output_write)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        target = self._send("Target.createTarget", None, url="about:blank")["targetId"]
        self._session = self._send("Target.attachToTarget", None, targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            readable, _, _ = select.select([self._output_read], [], [], _WAIT)
            if not readable:
                raise TimeoutError(f"chromium said nothing for {_WAIT}s")
            chunk = os.read(self._output_read, 1 << 16)
            if not chunk:
                raise EOFError("chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def _send(self, method: str, session: str | None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result
            self._events.append(reply)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self._send(method, self._session, **params)

    def wait_for(self, event: str) -> dict[str, Any]:
        """The next ``event`` of the page (one that arrived already counts)."""
        for index, seen in enumerate(self._events):
            if seen.get("method") == event:
                return self._events.pop(index)
        while True:
            message = self._read()
            if message.get("method") == event:
                return message
            self._events.append(message)

    def navigate(self, url: str) -> None:
        self._events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The test's hand (typing, clicking), not the page's: the pages themselves run no script."""
        answer = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def submit(self, expression: str) -> None:
        """Click what ``expression`` finds and wait for the page it leads to."""
        self._events.clear()
        self.evaluate(f"{expression}.click()")
        self.wait_for("Page.loadEventFired")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        with contextlib.suppress(EOFError, OSError, RuntimeError):  # it may have gone already
            self._send("Browser.close", None)
        try:
            self.process.wait(30)
        finally:
            os.close(self._command_write)
            os.close(self._output_read)
