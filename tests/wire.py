"""Round trips to PostgreSQL, counted on the wire: a proxy that tests and benchmarks put between card-mcp and the
database."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, urlsplit

_COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"  # the simple-protocol message a client sends to commit


class TurnCounter:
    """A proxy in front of PostgreSQL (listening on a Unix socket of its own) that counts round trips: one each
    time a client speaks after the server has spoken (or first, on a new connection). Set ``cut_after_commit`` to
    N and the next N connections that send COMMIT lose their connection once PostgreSQL has answered it, before
    the answer reaches the client: a commit the client cannot know happened."""

    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
        self.port = parts.port or 5432
        self.target_unix = f"{host}/.s.PGSQL.{self.port}" if host.startswith("/") else None
        self.target_host = host
        self.folder = tempfile.mkdtemp(prefix="card-mcp-turns-")
        self.turns = 0
        self.cut_after_commit = 0
        self._server: asyncio.AbstractServer | None = None

    def url(self, user: str, database: str) -> str:
        return f"postgresql://{user}@/{database}?host={self.folder}&port={self.port}"

    async def __aenter__(self) -> TurnCounter:
        path = f"{self.folder}/.s.PGSQL.{self.port}"
        self._server = await asyncio.start_unix_server(self._serve, path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @classmethod
    @contextmanager
    def threaded(cls, target_url: str) -> Iterator[TurnCounter]:
        """The proxy on an event loop of its own, in a thread: for code that blocks the caller's loop (a test
        waiting for a subprocess to start)."""
        counter = cls(target_url)
        loop = asyncio.new_event_loop()
        started = threading.Event()
        stop = asyncio.Event()

        async def serve() -> None:
            async with counter:
                started.set()
                await stop.wait()

        thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
        thread.start()
        started.wait(10)
        try:
            yield counter
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.target_unix:
            server_r, server_w = await asyncio.open_unix_connection(self.target_unix)
        else:
            server_r, server_w = await asyncio.open_connection(self.target_host, self.port)
        last = ["server"]
        cutting = [False]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, side: str) -> None:
            try:
                while data := await source.read(1 << 16):
                    if side == "client" and last[0] != "client":
                        self.turns += 1
                    last[0] = side
                    if side == "client" and self.cut_after_commit > 0 and data.endswith(_COMMIT):
                        self.cut_after_commit -= 1
                        cutting[0] = True
                    elif side == "server" and cutting[0]:  # PostgreSQL answered the COMMIT: drop the answer
                        client_w.close()
                        server_w.close()
                        return
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(client_r, server_w, "client"), pump(server_r, client_w, "server"))
