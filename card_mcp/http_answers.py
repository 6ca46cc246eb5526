"""How a stateless HTTP request is answered: one JSON body, or an SSE stream where the request asks for progress.

MCP lets a server answer a POST with either (clients must accept both). The SDK answers every request of a server
one way, fixed when the app is built (``json_response``), and its SSE answer costs each request a response task
group, its memory streams and their garbage, on the server and the client alike: with SSE answers card-mcp's mixed
HTTP benchmark spent about 2.0 ms of server CPU a call, with JSON answers 1.3 ms (docs/benchmarks.md). A JSON body
carries only the response, so notifications about the request (progress) have no way to the client: a request
that carries a progress token (``batch_create_cards`` reports progress) is answered as SSE, as before.

In stateless mode the SDK makes a transport per request, and reads ``json_response`` as a truth value in that
request's tasks (the transport's, its message router's, the handler's): ``PER_REQUEST`` is that value, true while
a request is handled that ``JsonUnlessStreamed`` found needs no stream. A stateful session's router is one task
for the whole session, made by its ``initialize``: it could not tell a JSON request's notifications from an SSE
one's, so stateful sessions keep SSE answers (build_app passes False). tests/test_http.py checks both answers,
that progress still arrives and that a client that goes away cancels its call, so an SDK that reads the value
elsewhere fails there.
"""

from __future__ import annotations

from contextvars import ContextVar

import anyio
import anyio.lowlevel
import pydantic_core
from mcp.server.streamable_http import check_accept_headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_AS_JSON: ContextVar[bool] = ContextVar("card_mcp_answer_as_json", default=False)
_PARSED_IN_A_THREAD = 1 << 20  # a body this long (a big batch) is looked through, and parsed if need be, off the loop


class _PerRequest:
    """True while a request that needs no stream is handled (``_AS_JSON``), false otherwise."""

    def __bool__(self) -> bool:
        return _AS_JSON.get()

    def __repr__(self) -> str:
        return "JSON answers unless the request asks for progress"


PER_REQUEST = _PerRequest()


def wants_stream(body: bytes) -> bool:
    """Whether a POST body needs an SSE answer: a JSON-RPC message whose ``params._meta`` has a progress token, or
    anything that is not one JSON object (the transport answers those as it always did). Most bodies are told apart
    without parsing: no ``progressToken`` and no ``\\u`` escape (which could spell it) in the bytes. Parsed as the
    SDK parses (pydantic-core: the last of duplicate keys wins, too deep a nesting is a ValueError)."""
    if b"progressToken" not in body and b"\\u" not in body:
        return False
    try:
        message = pydantic_core.from_json(body)
    except ValueError:
        return True
    if not isinstance(message, dict):
        return True
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and "progressToken" in meta


class JsonUnlessStreamed:
    """Reads an authenticated POST's JSON body to the MCP path (at most ``max_bytes``: the transport refuses a
    longer one, as before), decides how it is answered (``wants_stream``) and hands the body on unchanged.
    Innermost, after authentication: a request without a valid key is refused without its body being read here;
    so is one the transport refuses from its head alone (a body declared too long, not JSON, or a client that does
    not accept both answers: those keep the SDK's answers, the same as before).

    An SSE answer notices a client that goes away and the call is cancelled (its transaction rolled back); a JSON
    answer waits for the response alone, so here a client's disconnect before its answer has gone out cancels the
    call the same way."""

    def __init__(self, app: ASGIApp, *, path: str, max_bytes: int) -> None:
        self.app = app
        self.path = path
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._may_answer_json(scope):
            await self.app(scope, receive, send)
            return
        read: list[Message] = []
        size = 0
        whole = False
        while size <= self.max_bytes:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":  # the client went away
                break
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                whole = size <= self.max_bytes
                break
        as_json = whole and not await _wants_stream(read)
        token = _AS_JSON.set(as_json)
        try:
            if as_json:
                await self._answer_unless_gone(scope, read, receive, send)
            else:

                async def replay() -> Message:
                    return read.pop(0) if read else await receive()

                await self.app(scope, replay, send)
        finally:
            _AS_JSON.reset(token)

    def _may_answer_json(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return False
        if not getattr(scope.get("user"), "is_authenticated", False):
            return False
        request = Request(scope)
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return False
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return False
        return all(check_accept_headers(request))

    async def _answer_unless_gone(self, scope: Scope, read: list[Message], receive: Receive, send: Send) -> None:
        """The app, cancelled if the client disconnects before the answer's last byte is sent. The body has been
        read whole, so the next message from the client is that disconnect: a task of its own waits for it, the
        one reader of ``receive`` from here on (the app gets the body, then that disconnect when it comes). As
        with SSE answers, uvicorn's httptools protocol tells only the newest request of a connection that the
        client went away, so a call with a pipelined request queued behind it runs to its end."""
        answered = False
        gone = anyio.Event()

        async def replay() -> Message:
            if read:
                return read.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def sent(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        failure: Exception | None = None
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                await receive()  # after a whole body, only http.disconnect comes
                gone.set()
                if not answered:
                    group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self.app(scope, replay, sent)
            except Exception as exc:  # raised as itself below, not in the task group's ExceptionGroup
                failure = exc
            if answered:  # uvicorn ends the watcher's receive() as the answer's last byte goes: let it finish
                await anyio.lowlevel.checkpoint()
            if not gone.is_set():  # no whole answer, or the watcher still waiting: end it
                group.cancel_scope.cancel()  # (not on every request: anyio formats the task's repr for it)
        if failure is not None:
            raise failure


async def _wants_stream(read: list[Message]) -> bool:
    body = read[0].get("body", b"") if len(read) == 1 else b"".join(m.get("body", b"") for m in read)
    if len(body) >= _PARSED_IN_A_THREAD:
        return await anyio.to_thread.run_sync(wants_stream, body)
    return wants_stream(body)
