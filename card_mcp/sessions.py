"""Stateful sessions per API key (or OAuth connection), below the process-wide bound, so that one credential cannot
lock every other tenant out (issue #18). SessionQuota sits inside the authentication middleware, which has named
the caller; it also ends a session in order: a DELETE waits for the session's POSTs in flight, a request after it
for the DELETE's answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

# How long a DELETE waits for its session's requests in flight before it ends the session anyway.
END_WAIT_SECONDS = 10.0


@dataclass
class _Open:
    last: float
    in_flight: int = 0
    posts: int = 0  # POST requests in flight
    posts_done: anyio.Event | None = None  # set when the last POST in flight ends, while a DELETE waits for it
    deleting: anyio.Event | None = None  # a DELETE is on its way; set once it is answered


@dataclass
class _Holder:
    sessions: dict[str, _Open] = field(default_factory=dict)
    opening: int = 0  # initialize requests on their way


class SessionQuota:
    """At most ``per_key`` stateful sessions per API key (or OAuth connection, or external token's subject).
    A session counts from the answer that opened it until its client deletes it, the SDK answers 404 for it, or
    it has had no request in flight for ``idle_seconds`` (when the SDK closes it too). One request more that would
    open a session is answered 429 at once; other keys are served as before.

    A session ends in order. The SDK checks that a session is open when a request arrives, then reads its body
    and hands it on: a DELETE that ends the session in between closed the streams under the request, which
    answered 500 or a cut-off event stream and logged a traceback (python-sdk issue 2741; a client that sends
    its last notification and ends its session at once meets it). Here a DELETE first waits, up to
    END_WAIT_SECONDS, for the session's POST requests in flight to be answered (not for its GET stream, which
    lasts as long as the session), and a request that comes while a DELETE is on its way waits for its answer:
    then the SDK answers it 404 if the session ended, or serves it if the DELETE was refused."""

    def __init__(self, app: ASGIApp, *, path: str, per_key: int, idle_seconds: float) -> None:
        self.app = app
        self.path = path
        self.per_key = per_key
        self.idle_seconds = idle_seconds
        self._holders: dict[Hashable, _Holder] = {}
        self._swept = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user") if scope["type"] == "http" and scope["path"] == self.path else None
        if not isinstance(user, AuthenticatedUser):  # not the MCP endpoint, or the request will be 401
            await self.app(scope, receive, send)
            return
        who = _holder_of(user)
        session_id = Headers(scope=scope).get("mcp-session-id")
        if session_id is None:
            await self._open(who, scope, receive, send)
        else:
            await self._use(who, session_id, scope, receive, send)

    def open_sessions(self, who: Hashable) -> int:
        holder = self._holders.get(who)
        if holder is None:
            return 0
        now = time.monotonic()
        for session_id, seen in list(holder.sessions.items()):
            if seen.in_flight == 0 and now - seen.last >= self.idle_seconds:
                del holder.sessions[session_id]
        return len(holder.sessions) + holder.opening

    async def _open(self, who: Hashable, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        self._sweep()
        if self.open_sessions(who) >= self.per_key:
            logger.warning("refused a new session: this key already holds %d open sessions", self.per_key)
            await _too_many(self.per_key, self.idle_seconds)(scope, receive, send)
            return
        holder = self._holders.setdefault(who, _Holder())
        holder.opening += 1
        opened: list[str] = []
        answered = [False]

        async def note(message: Message) -> None:
            # Settled when the answer starts (the client may send its next request before this one's task ends).
            if message["type"] == "http.response.start" and not answered[0]:
                answered[0] = True
                holder.opening -= 1
                session_id = Headers(raw=message["headers"]).get("mcp-session-id")
                if message["status"] < 400 and session_id is not None:
                    holder.sessions[session_id] = _Open(last=time.monotonic(), in_flight=1)
                    opened.append(session_id)
            await send(message)

        try:
            await self.app(scope, receive, note)
        finally:
            if not answered[0]:
                holder.opening -= 1
            for session_id in opened:
                seen = holder.sessions.get(session_id)
                if seen is not None:
                    seen.in_flight, seen.last = seen.in_flight - 1, time.monotonic()
            self._forget_if_empty(who)

    async def _use(self, who: Hashable, session_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        holder = self._holders.get(who)
        seen = holder.sessions.get(session_id) if holder is not None else None
        if holder is None or seen is None:  # not one this key opened here: the SDK answers 404
            await self.app(scope, receive, send)
            return
        while seen.deleting is not None:  # after a DELETE: once it is answered, served or told the session ended
            await seen.deleting.wait()
        if holder.sessions.get(session_id) is not seen:  # the DELETE ended it: the SDK answers 404
            await self.app(scope, receive, send)
            return
        is_delete = scope["method"] == "DELETE"
        seen.in_flight += 1

        async def note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 404 or (is_delete and 200 <= status < 300):
                    holder.sessions.pop(session_id, None)  # the session has ended
            await send(message)

        try:
            if is_delete:
                seen.deleting = anyio.Event()
                try:
                    if seen.posts:
                        logger.info("a session's DELETE waits for its %d requests in flight", seen.posts)
                        seen.posts_done = anyio.Event()
                        with anyio.move_on_after(END_WAIT_SECONDS):
                            await seen.posts_done.wait()
                        seen.posts_done = None
                    await self.app(scope, receive, note)
                finally:
                    answered, seen.deleting = seen.deleting, None
                    answered.set()
            elif scope["method"] == "POST":
                seen.posts += 1
                try:
                    await self.app(scope, receive, note)
                finally:
                    seen.posts -= 1
                    if not seen.posts and seen.posts_done is not None:
                        seen.posts_done.set()
            else:  # the GET stream lasts as long as the session: a DELETE does not wait for it
                await self.app(scope, receive, note)
        finally:
            seen.in_flight, seen.last = seen.in_flight - 1, time.monotonic()
            self._forget_if_empty(who)

    def _sweep(self) -> None:
        """Now and then, forget the expired sessions of every key (a key that never comes back keeps none)."""
        now = time.monotonic()
        if now - self._swept < self.idle_seconds:
            return
        self._swept = now
        for who in list(self._holders):
            self.open_sessions(who)
            self._forget_if_empty(who)

    def _forget_if_empty(self, who: Hashable) -> None:
        holder = self._holders.get(who)
        if holder is not None and not holder.sessions and holder.opening == 0:
            del self._holders[who]


def _too_many(per_key: int, idle_seconds: float) -> Response:
    return JSONResponse(
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": -32000,
                "message": f"this API key already holds {per_key} open sessions: reuse one, or end one (DELETE)",
            },
        },
        status_code=429,
        headers={"Retry-After": str(max(1, int(idle_seconds)))},
    )


def _holder_of(user: AuthenticatedUser) -> Hashable:
    token = user.access_token
    return getattr(token, "limit_key", None) or getattr(token, "key_id", None) or ("client", token.client_id)
