"""Serving over stdio through the event loop, and the one place card-mcp reaches inside the MCP SDK.

The SDK's own stdio transport reads stdin and writes stdout through worker threads: a thread blocked in read()
cannot be cancelled, so SIGTERM would wait for the client to close stdin, and each answer costs two thread
hand-offs. Here pipes are read and written by the event loop (regular files fall back to the SDK's threads), and
lines that are no JSON-RPC message are answered instead of dropped. The SDK has no public way to run a server on
streams of one's own, so ``serve`` drives MCPServer's low-level server (``_lowlevel_server``) directly; the
dependency is pinned to the minor version this was written for (pyproject.toml), and tests/test_stdio.py fails
loudly when the SDK moves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any, cast

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from mcp.server import MCPServer
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from mcp.types import (
    INVALID_REQUEST,
    PARSE_ERROR,
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
)
from pydantic import ValidationError

logger = logging.getLogger(__name__)

# How long a stopping server waits for a client to read its last answers.
_FLUSH_TIMEOUT = 5.0

# A batch of 1000 cards of 64 KiB each is one line of about 64 MiB.
MAX_MESSAGE_BYTES = 128 * 1024 * 1024


async def serve(server: MCPServer[Any]) -> None:
    """Serve ``server`` over stdin/stdout until the client closes stdin (or the task is cancelled)."""
    lowlevel = server._lowlevel_server  # see the module's docstring
    stdin = await _pipe_lines(sys.stdin.fileno())
    async with (
        _pipe_stdout() as stdout,
        stdio_server(
            stdin=cast("anyio.AsyncFile[str] | None", stdin), stdout=cast("anyio.AsyncFile[str] | None", stdout)
        ) as (read, write),
        anyio.create_task_group() as tasks,
    ):
        readable, readable_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        flight = _InFlight()
        answers = _Answers(write, flight)
        tasks.start_soon(_answer_unreadable, read, answers, _Draining(readable, flight))
        await lowlevel.run(readable_stream, answers, lowlevel.create_initialization_options())


# How long a client that closed stdin waits for the answers to the calls it sent before.
_DRAIN_TIMEOUT = 30.0


class _InFlight:
    """The requests read from stdin and not answered yet. When stdin ends, the SDK cancels every handler still
    running; so the end is passed on only once these are answered (a client may pipe its calls and close stdin
    at once, and expects the answers)."""

    def __init__(self) -> None:
        self.pending: set[str] = set()
        self._changed = anyio.Event()

    def read(self, item: SessionMessage | Exception) -> None:
        message = item.message if isinstance(item, SessionMessage) else None
        if isinstance(message, JSONRPCRequest):
            self.pending.add(repr(message.id))
        elif isinstance(message, JSONRPCNotification) and message.method == "notifications/cancelled":
            self._settle((message.params or {}).get("requestId"))  # a cancelled request is never answered

    def answered(self, item: SessionMessage) -> None:
        if isinstance(item.message, JSONRPCResponse | JSONRPCError):
            self._settle(item.message.id)

    def _settle(self, request_id: object) -> None:
        self.pending.discard(repr(request_id))
        self._changed.set()
        self._changed = anyio.Event()

    async def drained(self) -> None:
        with anyio.move_on_after(_DRAIN_TIMEOUT):
            while self.pending:
                await self._changed.wait()
        if self.pending:
            logger.warning("stdin closed; %d call(s) left unanswered after %.0f s", len(self.pending), _DRAIN_TIMEOUT)


class _Draining(ObjectSendStream[SessionMessage | Exception]):
    """The SDK's side of stdin: each request passed on is noted, and at the end of stdin the stream is closed
    (which ends the session) only once the requests it passed on are answered."""

    def __init__(self, inner: ObjectSendStream[SessionMessage | Exception], flight: _InFlight) -> None:
        self._inner, self._flight = inner, flight

    async def send(self, item: SessionMessage | Exception) -> None:
        self._flight.read(item)
        await self._inner.send(item)

    async def aclose(self) -> None:
        try:
            await self._flight.drained()
        finally:
            await self._inner.aclose()


class _Answers(ObjectSendStream[SessionMessage]):
    """What goes to stdout, each answer noted as such."""

    def __init__(self, inner: ObjectSendStream[SessionMessage], flight: _InFlight) -> None:
        self._inner, self._flight = inner, flight

    async def send(self, item: SessionMessage) -> None:
        # Noted once handed to the stdout writer, not before: the end of stdin cancels every handler still sending,
        # so an answer marked first could be dropped on its way out.
        await self._inner.send(item)
        self._flight.answered(item)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _answer_unreadable(
    read: ObjectReceiveStream[SessionMessage | Exception],
    write: ObjectSendStream[SessionMessage],
    forward: ObjectSendStream[SessionMessage | Exception],
) -> None:
    """Pass stdin's messages on; answer each line that is no JSON-RPC message with the JSON-RPC error for it
    (-32700 not JSON, -32600 JSON but no message; id null, since none can be read), where the SDK would drop it
    and leave a client waiting for an answer. Blank lines are skipped. The line itself is never echoed."""
    async with read, forward:
        async for item in read:
            if not isinstance(item, Exception):
                await forward.send(item)
                continue
            details = item.errors() if isinstance(item, ValidationError) else []
            unparsed = details[0].get("input") if details and details[0]["type"] == "json_invalid" else None
            if isinstance(unparsed, str) and not unparsed.strip():
                continue
            request_id: RequestId | None = None
            if not isinstance(unparsed, str):
                code, message = INVALID_REQUEST, "Invalid Request: a line on stdin is JSON but no JSON-RPC message"
            elif unparsed.startswith(_TOO_LONG):
                request_id = _read_id(unparsed.removeprefix(_TOO_LONG))
                code, message = PARSE_ERROR, f"Parse error: a line on stdin is over {MAX_MESSAGE_BYTES} bytes"
            elif (request_id := _unreadable_request_id(unparsed, details[0]["msg"])) is not None:
                code, message = PARSE_ERROR, _VALID_BUT_UNREADABLE
            else:
                code, message = PARSE_ERROR, "Parse error: a line on stdin is not JSON"
            logger.warning("%s (%s)", message, type(item).__name__)
            error = JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message))
            await write.send(SessionMessage(error))


# What _PipeLines hands the SDK in place of a line over MAX_MESSAGE_BYTES (no JSON starts with a NUL), followed by
# the JSON of the line's id where its start showed one.
_TOO_LONG = "\x00card-mcp: line too long\x00"
_VALID_BUT_UNREADABLE = (
    "Parse error: the message is JSON card-mcp cannot read (nested too deeply, or text with a lone surrogate)"
)
# How much of a line is searched for its id: JSON-RPC clients write it before the parameters.
_ID_SEARCH_CHARS = 64 * 1024
_ID_VALUE = re.compile(r'\s*:\s*(-?[0-9]{1,18}(?![0-9.eE])|"(?:[^"\\\x00-\x1f]|\\.){0,255}")')


def _unreadable_request_id(line: str, problem: str) -> RequestId | None:
    """The id of a line the SDK's parser refused although it may be JSON: nested deeper than the parser goes (its
    id read from the line's start), or holding a lone surrogate (which Python's parser reads). None when the line
    is no JSON, or its id cannot be read."""
    if "recursion limit" in problem:
        return _scan_id(line[:_ID_SEARCH_CHARS])
    if len(line) > _ID_SEARCH_CHARS * 16 or not line.lstrip().startswith("{"):
        return None
    try:
        parsed = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return _valid_id(parsed.get("id")) if isinstance(parsed, dict) and "method" in parsed else None


def _scan_id(text: str) -> RequestId | None:
    """The ``id`` member of the object ``text`` starts with (text that may be cut short): found by walking the
    strings and brackets of its first level, without parsing the rest."""
    if not text.lstrip().startswith("{"):
        return None
    depth, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                return None
            if depth == 1 and text[i + 1 : j] == "id":
                value = _ID_VALUE.match(text, j + 1)
                return _read_id(value.group(1)) if value else None
            i = j + 1
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        i += 1
    return None


def _read_id(text: str) -> RequestId | None:
    try:
        return _valid_id(json.loads(text)) if text else None
    except ValueError:
        return None


def _valid_id(value: object) -> RequestId | None:
    """``value`` as a JSON-RPC request id: an integer, or a string that can be written back."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return None
    return value


class _PipeLines:
    """Lines of a pipe or terminal as text, read by the event loop (cancellable)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def __aiter__(self) -> _PipeLines:
        return self

    async def __anext__(self) -> str:
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as end:  # the last line, without its newline
            line = end.partial
        except asyncio.LimitOverrunError as overrun:
            return _TOO_LONG + await self._drop_line(overrun.consumed)
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")

    async def _drop_line(self, consumed: int) -> str:
        """Read past a line over the limit (which the event loop's reader would otherwise end the server on) and
        return the JSON of its id, if its start shows one."""
        start = (await self._reader.readexactly(consumed))[: _ID_SEARCH_CHARS // 16]
        request_id = _scan_id(start.decode("utf-8", errors="replace"))
        while True:
            try:
                await self._reader.readuntil(b"\n")
                break
            except asyncio.LimitOverrunError as overrun:
                await self._reader.readexactly(overrun.consumed)
            except asyncio.IncompleteReadError:
                break
        logger.warning("dropped a line of stdin over %d bytes", MAX_MESSAGE_BYTES)
        return json.dumps(request_id) if request_id is not None else ""


def _pollable(fd: int) -> bool:
    """A pipe, socket or terminal (which the event loop can poll), not a regular file."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


async def _pipe_lines(fd: int) -> _PipeLines | None:
    """stdin as a _PipeLines, or None (the SDK's threaded reader) when it is a regular file, which the event
    loop cannot poll."""
    if not _pollable(fd):
        return None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_MESSAGE_BYTES)
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return _PipeLines(reader)


class _PipeWriter:
    """Protocol messages written by the event loop, in the shape the SDK's stdio transport writes to."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, text: str) -> None:
        self._writer.write(text.encode())

    async def flush(self) -> None:
        await self._writer.drain()


@asynccontextmanager
async def _pipe_stdout() -> AsyncIterator[_PipeWriter | None]:
    """stdout as a _PipeWriter, or None (the SDK's threaded writer) when it is a regular file. As the SDK does for
    its own writer, fd 1 points at stderr meanwhile, so stray output (a print, a library) never lands among the
    protocol messages; it is restored on exit."""
    try:
        fd, err = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced or captured streams: the SDK copes
        yield None
        return
    out_stat, err_stat = os.fstat(fd), os.fstat(err)
    shared = (out_stat.st_dev, out_stat.st_ino) == (err_stat.st_dev, err_stat.st_ino)
    # Only a pipe or socket of its own: the loop makes the file non-blocking, which logging to a shared one
    # (a terminal, `2>&1`) would not survive.
    if shared or os.isatty(fd) or not (stat.S_ISFIFO(out_stat.st_mode) or stat.S_ISSOCK(out_stat.st_mode)):
        yield None
        return
    sys.stdout.flush()
    protocol_fd, saved_fd = os.dup(fd), os.dup(fd)
    os.dup2(err, fd)
    try:
        loop = asyncio.get_running_loop()
        pipe = os.fdopen(protocol_fd, "wb", buffering=0)
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), pipe
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        try:
            yield _PipeWriter(writer)
        finally:
            # Every answer out before the pipe closes, unless the client stopped reading: then not for long.
            transport.set_write_buffer_limits(0)
            with anyio.move_on_after(_FLUSH_TIMEOUT, shield=True), suppress(OSError):
                await writer.drain()
            transport.close()
    finally:
        os.dup2(saved_fd, fd)
        os.set_blocking(saved_fd, True)  # the description is shared with whoever started us
        os.close(saved_fd)
