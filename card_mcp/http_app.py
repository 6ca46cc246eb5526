"""Serving over streamable HTTP: the ASGI app (MCP at /mcp, /healthz, the protected-resource metadata) and the
uvicorn server that runs it inside card-mcp's event loop."""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from ipaddress import ip_address
from typing import cast
from urllib.parse import urlsplit

import anyio
import uvicorn
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from . import http_answers, http_edges, sessions
from .config import Settings
from .errors import SetupError, Unavailable
from .oauth import RegistrationAddress
from .server import CardServer

logger = logging.getLogger(__name__)

MCP_PATH = "/mcp"
_LOOPBACK_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
_LOOPBACK_ORIGINS = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection, always on: requests must name a Host this server answers to (loopback, the
    bind address, the public URL's host, CARD_MCP_ALLOWED_HOSTS) and come from no browser Origin or an allowed
    one."""
    hosts = list(_LOOPBACK_HOSTS)
    origins = list(_LOOPBACK_ORIGINS)
    if not _is_wildcard(settings.host):
        bind = f"[{settings.host}]" if ":" in settings.host else settings.host
        hosts.append(f"{bind}:*")
    public = urlsplit(settings.url)
    hosts.append(public.netloc)
    origins.append(f"{public.scheme}://{public.netloc}")
    hosts += _names(settings.allowed_hosts)
    origins += _names(settings.allowed_origins)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=list(dict.fromkeys(hosts)),
        allowed_origins=list(dict.fromkeys(origins)),
    )


def _is_wildcard(host: str) -> bool:
    try:
        return ip_address(host).is_unspecified
    except ValueError:
        return False


def build_app(server: CardServer, settings: Settings) -> Starlette:
    """The ASGI app; its lifespan is the server's (database, pools, background clean-up). The bounds of
    http_edges.py wrap it (the Host matched exactly, the transport's 400s without the input), and sessions.py's
    sessions per key."""
    security = transport_security(settings)
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        # Stateless: JSON answers, unless a request asks for progress (http_answers.py): a truth value per request.
        json_response=cast(bool, http_answers.PER_REQUEST) if settings.stateless else False,
        stateless_http=settings.stateless,
        max_request_body_size=settings.max_request_bytes,
        transport_security=security,
        host=settings.host,
        session_idle_timeout=settings.session_idle_seconds,
        max_sessions=settings.max_sessions,
    )
    # Starlette would redirect /mcp/ to /mcp on the request's own Host: a redirect anywhere a client names.
    app.router.redirect_slashes = False
    app.add_route(f"{MCP_PATH}/", http_edges.redirect(f"{settings.url}{MCP_PATH}"), methods=["GET", "POST", "DELETE"])
    if settings.stateless:
        # Innermost (after the authentication middleware): only a request with a valid key has its body read.
        app.user_middleware.append(
            Middleware(http_answers.JsonUnlessStreamed, path=MCP_PATH, max_bytes=settings.max_request_bytes)
        )
    else:
        # Innermost (after the authentication middleware): it counts sessions by the caller's key.
        app.user_middleware.append(
            Middleware(
                sessions.SessionQuota,
                path=MCP_PATH,
                per_key=settings.max_sessions_per_key,
                idle_seconds=settings.session_idle_seconds,
            )
        )
    app.add_middleware(http_edges.NoEcho, path=MCP_PATH)
    app.add_middleware(RegistrationAddress)  # OAuth (#23): /register's caller address, for its limit
    app.add_middleware(_UnavailableAs503)  # outside the authentication middleware, whose key lookup may fail
    app.add_middleware(http_edges.HostGuard, path=MCP_PATH, allowed_hosts=security.allowed_hosts)
    return app


class _UnavailableAs503:
    """A key lookup that cannot reach the database is 503 with Retry-After, not a 500 (nor a 401: the key may
    be fine)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Unavailable as exc:
            if scope["type"] != "http":
                raise
            response = JSONResponse(
                {"error": "unavailable", "error_description": exc.message},
                status_code=503,
                headers={"Retry-After": "5"},
            )
            await response(scope, receive, send)


class _Uvicorn(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # card-mcp handles SIGTERM/SIGINT itself (uvicorn's own handling re-raises the signal after shutdown).
        yield


def bind(settings: Settings) -> socket.socket:
    """The listening socket, bound before the server is built, so that with port 0 the URLs the server announces
    (protected-resource metadata, WWW-Authenticate) carry the real port."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise SetupError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
            hint="Pick another --port (or stop what uses it).",
        ) from exc
    sock.set_inheritable(True)
    return sock


async def serve_http(
    server: CardServer,
    settings: Settings,
    sock: socket.socket,
    *,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve on ``sock`` until SIGTERM or SIGINT, then finish the running requests and close the lifespan."""
    config = uvicorn.Config(
        build_app(server, settings),
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_config=None,  # card-mcp's logging: stderr, one format
        access_log=False,
        timeout_graceful_shutdown=10,
        server_header=False,
        http=http_edges.BoundedHttpTools,  # the request line and headers bounded before any work
    )
    web = _Uvicorn(config)

    async def stop_on_signal() -> None:
        # Keeps receiving: a second signal during the graceful shutdown must not kill the process before the
        # lifespan has closed the pools and stopped the embedded database.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for received in signals:
                if web.should_exit:
                    logger.info("received %s again; still shutting down", signal.Signals(received).name)
                    continue
                logger.info("received %s; shutting down", signal.Signals(received).name)
                web.should_exit = True

    async def announce() -> None:
        while not web.started and not web.should_exit:  # noqa: ASYNC110 - uvicorn offers no event to wait on
            await anyio.sleep(0.01)
        if web.started:
            port = web.servers[0].sockets[0].getsockname()[1]
            host = f"[{settings.host}]" if ":" in settings.host else settings.host
            url = f"http://{host}:{port}/mcp"
            logger.info("listening on %s (%s)", url, "stateless" if settings.stateless else "stateful sessions")
            if on_listening is not None:
                on_listening(url)

    def quiet_failed_start(record: logging.LogRecord) -> bool:
        """uvicorn logs a failed start-up as a traceback; card-mcp says it in one line (all of it at DEBUG)."""
        return web.started or record.levelno < logging.ERROR or logger.isEnabledFor(logging.DEBUG)

    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(quiet_failed_start)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(stop_on_signal)
            group.start_soon(announce)
            with suppress(SystemExit):  # uvicorn's way of saying the start-up failed
                await web.serve(sockets=[sock])
            group.cancel_scope.cancel()
    finally:
        uvicorn_log.removeFilter(quiet_failed_start)
    if not web.started:
        raise server.startup_error or SetupError(
            "the HTTP server did not start", hint="CARD_MCP_LOG_LEVEL=DEBUG logs why"
        )
