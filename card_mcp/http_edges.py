"""What the HTTP transport bounds before any work is done for a request (issue #18), outermost first:

    _BoundedHead        the request line and headers, as uvicorn's httptools protocol reads them: 414 for a target
                        over 8 KiB, 431 for more than 100 headers or a head over 64 KiB; the rest of what the
                        client sends is read and dropped for a moment, so that it sees the answer (no reset)
    HostGuard           the MCP endpoint answers only to a Host it serves, matched exactly (the SDK's own check
                        matches `name:*` by prefix, which `127.0.0.1:1@evil.com` passes)
    NoEcho              the transport's 400 answers to a body that is no JSON-RPC message name what was wrong,
                        never the input (the SDK quotes it)

The ``/mcp/`` redirect is built from the configured public URL, never from the request's Host (``redirect``).
Sessions per API key, which need the caller's name, are sessions.py's.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httptools
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .logs import clean

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # request line and headers together; an OAuth JWT is a few KiB
MAX_HEADERS = 100
MAX_TARGET_BYTES = 8 * 1024
# After a refused head, how long what the client still sends is read and dropped before the connection closes:
# closing with unread data would reset the connection, and the client might never read its answer.
_LINGER_SECONDS = 2.0

_REASONS = {414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class _HeadTooLarge(Exception):
    def __init__(self, status: int, what: str) -> None:
        super().__init__(what)
        self.status = status
        self.what = what


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head bounded. httptools keeps a header's bytes until it is complete
    (a 64 MB header was read in full and cost 120 MB); here the bytes of an unfinished head are counted as they
    arrive, and the head is refused as soon as it passes a bound."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between a message's first byte (or the connection's) and its headers' end
        self._head_bytes = 0
        self._header_count = 0
        self._refused = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._header_count = True, 0, 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_TARGET_BYTES:
            raise _HeadTooLarge(414, "request target")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            raise _HeadTooLarge(431, "header count")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        # uvicorn's, with the head counted and a bound's own status instead of its 400.
        if self._refused:  # lingering after a refusal: read and drop
            return
        if self._in_head:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):  # what our callback raised
                self._refuse(exc.__context__.status, exc.__context__.what)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, "header size")

    def _refuse(self, status: int, what: str) -> None:
        self._refused = True
        logger.warning("refused a request from %s: its %s is over the limit (%d)", _peer(self.client), what, status)
        body = json.dumps({"error": "request_too_large", "error_description": f"the request's {what} is too large"})
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
        self.transport.write(
            head
            + b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            + body.encode()
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_SECONDS, self.transport.close)


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"


# -- Host ------------------------------------------------------------------------------------------------------


def host_matches(host: str, allowed: list[str]) -> bool:
    """Whether the Host header ``host`` is one of ``allowed``: equal to an entry, or for an entry ``name:*`` the
    name itself followed by a port of digits. Nothing else (no prefix match, no user info)."""
    host = host.lower()
    for entry in allowed:
        entry = entry.lower()
        if entry.endswith(":*"):
            name, _, port = host.rpartition(":")
            if name == entry[:-2] and port.isdigit() and len(port) <= 5:
                return True
        elif host == entry:
            return True
    return False


class HostGuard:
    """The MCP endpoint answers 421 to a Host it does not serve (DNS rebinding), by exact match."""

    def __init__(self, app: ASGIApp, *, path: str, allowed_hosts: list[str]) -> None:
        self.app = app
        self.path = path
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path:
            host = Headers(scope=scope).get("host", "")
            if not host_matches(host, self.allowed_hosts):
                logger.warning("refused a request for Host %s", clean(host, 200))
                await PlainTextResponse("Invalid Host header", status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def redirect(target: str) -> Any:
    """An endpoint that sends the client to ``target`` (built from the configured public URL)."""

    async def endpoint(request: Request) -> Response:
        return RedirectResponse(target, status_code=307)

    return endpoint


# -- what a 400 says -------------------------------------------------------------------------------------------

# The SDK's two messages for a body it cannot read quote the input (pydantic's text of the failure); card-mcp's
# say what was wrong with it. Its other 400s (a missing session id, a bad header) are fixed texts already.
_FIXED = {
    "Parse error": "Parse error: the request body is not JSON",
    "Validation error": "Invalid Request: the request body is JSON but no JSON-RPC message",
}
_MAX_ERROR_BODY = 64 * 1024


class NoEcho:
    """Rewrites the transport's 400 answers that quote the request body to a fixed message."""

    def __init__(self, app: ASGIApp, *, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        start: list[Message] = []
        body = bytearray()

        async def rewrite(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] != 400:
                    await send(message)
                    return
                start.append(message)
                return
            if not start or message["type"] != "http.response.body":
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False) and len(body) <= _MAX_ERROR_BODY:
                return
            new = _fixed_error(bytes(body))
            headers = [(k, v) for k, v in start[0]["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(new)).encode()))
            await send({**start[0], "headers": headers})
            await send({"type": "http.response.body", "body": new, "more_body": False})
            start.clear()

        await self.app(scope, receive, rewrite)


def _fixed_error(body: bytes) -> bytes:
    try:
        payload = json.loads(body)
        message = payload["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body  # not the transport's JSON-RPC error
    for prefix, fixed in _FIXED.items():
        if isinstance(message, str) and message.startswith(prefix):
            payload["error"] = {"code": payload["error"].get("code"), "message": fixed}
            return json.dumps(payload).encode()
    return body
