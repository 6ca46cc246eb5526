"""How an HTTP request is answered: one JSON body, or an SSE stream where the request needs one.

MCP lets a server answer a POST with either (clients must accept both). The SDK answers every request of a server
one way, fixed when the app is built (``json_response``), and its SSE answer costs each request a response task
group, its memory streams and their garbage, on the server and the client alike: with SSE answers card-mcp's mixed
HTTP benchmark spent about 2.0 ms of server CPU a call, with JSON answers 1.3 ms (docs/benchmarks.md). A JSON body
carries only the response, so notifications about the request (progress) have no way to the client: a request
that carries a progress token (``batch_create_cards`` reports progress) is answered as SSE, as before.

The SDK reads ``json_response`` as a truth value, in the tasks of the request it is handling: ``PER_REQUEST`` is
that value, true while a request is handled that ``JsonUnlessStreamed`` found needs no stream. A stateless server
makes a transport per request, so everything about a request follows its own value. A stateful session's transport
is made by its ``initialize`` request and its tasks (the router of the session's messages, whether the server may
send the client requests) keep the value they started with: ``initialize`` is always answered as SSE, so those
tasks see false, as with SSE answers throughout, and each later request of the session is answered by its own
value. tests/test_http.py checks both answers and that progress still arrives, statelessly and in a session, so
an SDK that reads the value elsewhere fails there.
"""

from __future__ import annotations

import json
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_AS_JSON: ContextVar[bool] = ContextVar("card_mcp_answer_as_json", default=False)


class _PerRequest:
    """True while a request that needs no stream is handled (``_AS_JSON``), false otherwise."""

    def __bool__(self) -> bool:
        return _AS_JSON.get()

    def __repr__(self) -> str:
        return "JSON answers unless the request needs a stream"


PER_REQUEST = _PerRequest()


def wants_stream(body: bytes) -> bool:
    """Whether a POST body needs an SSE answer: ``initialize``, a JSON-RPC message whose ``params._meta`` has a
    progress token, or anything that is not one JSON object (the transport answers those as it always did). Most
    bodies are told apart without parsing: none of ``progressToken``, ``initialize`` or a ``\\u`` escape (which
    could spell either) in the bytes."""
    if b"progressToken" not in body and b"initialize" not in body and b"\\u" not in body:
        return False
    try:
        message = json.loads(body)
    except ValueError:
        return True
    if not isinstance(message, dict) or message.get("method") == "initialize":
        return True
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and "progressToken" in meta


class JsonUnlessStreamed:
    """Reads an authenticated POST's body to the MCP path (at most ``max_bytes``: the transport refuses a longer
    one, as before), decides how it is answered (``wants_stream``) and hands the body on unchanged. After
    authentication: a request without a valid key is refused without its body being read here."""

    def __init__(self, app: ASGIApp, *, path: str, max_bytes: int) -> None:
        self.app = app
        self.path = path
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user") if scope["type"] == "http" else None
        if (
            scope["type"] != "http"
            or scope["path"] != self.path
            or scope["method"] != "POST"
            or not getattr(user, "is_authenticated", False)
        ):
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
        body = read[0].get("body", b"") if len(read) == 1 else b"".join(m.get("body", b"") for m in read)
        as_json = whole and not wants_stream(body)

        async def replay() -> Message:
            return read.pop(0) if read else await receive()

        token = _AS_JSON.set(as_json)
        try:
            await self.app(scope, replay, send)
        finally:
            _AS_JSON.reset(token)
