"""The ``card-mcp`` command: parses flags, builds Settings once, hands them down.

Exit status: 0 on success, 1 on a user error (one line on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import anyio
from pydantic import ValidationError

from . import __version__, admin, lifecycle, logs
from .config import Settings, invalid_setting
from .errors import CardMcpError, SetupError

logger = logging.getLogger("card_mcp")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="card-mcp", description="Brand cards for AI agents, over MCP.")
    parser.add_argument("--version", action="version", version=f"card-mcp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the card tools over MCP (stdio by default)")
    serve.add_argument("--transport", choices=["stdio", "http"], help="the MCP transport (default: stdio)")
    serve.add_argument("--host", help="HTTP bind address (CARD_MCP_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (CARD_MCP_PORT; default 8000; 0 picks a free one)")
    serve.add_argument(
        "--stateless",
        action="store_const",
        const=True,
        help="HTTP without sessions: any instance behind a load balancer can answer any request",
    )
    serve.add_argument("--tenant", help="the tenant to serve over stdio (CARD_MCP_TENANT; default 'default')")
    serve.add_argument(
        "--no-create",
        dest="create_tenant",
        action="store_const",
        const=False,
        help="refuse a --tenant that does not exist instead of creating it (CARD_MCP_CREATE_TENANT=false)",
    )

    mig = commands.add_parser("migrate", help="apply the schema migrations")
    mig.add_argument("--check", action="store_true", help="exit 1 while any migration is pending; apply nothing")

    ten = commands.add_parser("tenants", help="create and list tenants").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = ten.add_parser("create", help="create a tenant")
    create.add_argument("name")
    create.add_argument("--format", choices=["table", "json"], default="table")
    listing = ten.add_parser("list", help="list tenants")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    erase = ten.add_parser(
        "delete", help="erase a tenant and every row of it, in one transaction (through the owner's URL)"
    )
    erase.add_argument("name")
    erase.add_argument("--yes", action="store_true", help="do not ask to type the name to confirm")
    erase.add_argument("--format", choices=["table", "json"], default="table")

    exp = commands.add_parser("export", help="write a tenant's cards as JSON Lines (one snapshot, streamed)")
    exp.add_argument("--tenant", required=True, help="the tenant whose cards to export")
    exp.add_argument("--include-deleted", action="store_true", help="deleted cards too, with when they were deleted")
    exp.add_argument("--include-history", action="store_true", help="each card's earlier versions too")
    exp.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout (complete or not at all)")

    imp = commands.add_parser(
        "import", help="add cards from JSON Lines (an export, or {card_type, title, content, tags} per line)"
    )
    imp.add_argument("file", metavar="FILE", type=Path)
    imp.add_argument("--tenant", required=True, help="the tenant to add the cards to (it must exist)")

    key = commands.add_parser("keys", help="API keys for the HTTP transport").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    make = key.add_parser("create", help="make a key for a tenant; prints it once, alone on stdout")
    make.add_argument("--tenant", required=True, help="the tenant the key belongs to")
    make.add_argument("--label", help="what the key is for, shown by `keys list`")
    keys_list = key.add_parser("list", help="list keys (never the keys themselves)")
    keys_list.add_argument("--tenant", help="only this tenant's keys")
    keys_list.add_argument("--format", choices=["table", "json"], default="table")
    revoke = key.add_parser("revoke", help="revoke a key; it stops working at its next request")
    revoke.add_argument("key_id", metavar="KEY_ID")

    rdr = commands.add_parser(
        "readers", help="per-tenant database readers for people's dashboards (through the owner's URL)"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    r_create = rdr.add_parser("create", help="make a login role that reads one tenant; prints its password once")
    r_create.add_argument("--tenant", required=True, help="the one tenant the reader sees")
    r_create.add_argument(
        "--no-password", action="store_true", help="no password: for your own authentication (certificates, LDAP)"
    )
    r_create.add_argument("name", metavar="READER", help="the role name: lower-case letters, digits and '_'")
    r_list = rdr.add_parser("list", help="list readers and their tenants")
    r_list.add_argument("--tenant", help="only this tenant's readers")
    r_list.add_argument("--format", choices=["table", "json"], default="table")
    r_revoke = rdr.add_parser("revoke", help="drop a reader's role (or, if it cannot be dropped, its login)")
    r_revoke.add_argument("name", metavar="READER")

    con = commands.add_parser("connect", help="a one-time code for the OAuth sign-in page of a remote MCP client")
    con.add_argument("--tenant", required=True, help="the tenant the code signs in to")

    conns = commands.add_parser("connections", help="OAuth connections of remote MCP clients").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    conns_list = conns.add_parser("list", help="list connections (never their tokens)")
    conns_list.add_argument("--tenant", help="only this tenant's connections")
    conns_list.add_argument("--format", choices=["table", "json"], default="table")
    conns_revoke = conns.add_parser("revoke", help="revoke a connection; its tokens stop working at once")
    conns_revoke.add_argument("connection_id", metavar="CONNECTION_ID")

    use = commands.add_parser(
        "usage",
        help="usage figures: calls, errors and durations per tool, card, day or client; `usage prune` drops old usage",
    )
    use.add_argument(
        "action", nargs="?", choices=["prune"], help="prune: drop the usage partitions wholly before --before"
    )
    use.add_argument(
        "--before",
        help="with prune: a UTC date/time or 90d (default: CARD_MCP_USAGE_RETENTION_DAYS ago); whole days go",
    )
    use.add_argument("--tenant", help="one tenant (default: every tenant, with a tenant column)")
    use.add_argument("--since", help="start: 7d, 24h (before --until) or a UTC date/time (default: 30d)")
    use.add_argument("--until", help="end, excluded: 24h (ago) or a UTC date/time; a bare date means its end")
    use.add_argument("--group-by", choices=["tool", "card", "day", "client"], default="tool")
    use.add_argument("--limit", type=int, default=20, help="groups per tenant (default 20)")
    use.add_argument("--format", choices=["table", "json", "csv"], default="table")
    use.add_argument("--chart", metavar="FILE", help="also draw calls and errors per day by tool (.png, .svg, .html)")

    hist = commands.add_parser("history", help="a card's versions, newest first: what changed, when and by whom")
    hist.add_argument("card_id", metavar="CARD_ID")
    hist.add_argument("--tenant", help="the card's tenant (default: whichever tenant has it)")
    hist.add_argument("--format", choices=["table", "json"], default="table")

    emb = commands.add_parser(
        "embed", help="semantic search: embed the cards that lack a vector (or --all), with a progress bar"
    )
    emb.add_argument("--all", action="store_true", help="embed every active card again (after a model change)")

    dbp = commands.add_parser("db", help="the database in use").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    url = dbp.add_parser("url", help="print a connection URL for psql or a BI tool")
    url.add_argument(
        "--role",
        choices=["analyst", "reader", "app", "admin"],
        default="analyst",
        help="analyst (every tenant, read-only) or reader --name READER (one tenant) for people; app and admin are "
        "the server's own (default: analyst)",
    )
    url.add_argument("--name", metavar="READER", help="the reader, with --role reader")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``card-mcp`` console script. Whatever stops a command, at start-up or later, is one line
    on stderr, ``card-mcp: what went wrong (how to fix it)``, and exit status 1; the traceback is logged only at
    CARD_MCP_LOG_LEVEL=DEBUG."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "db" and (args.role == "reader") != (args.name is not None):
        parser.error("db url: --name READER goes with --role reader, and only with it")
    if args.command == "usage" and args.before is not None and args.action != "prune":
        parser.error("usage: --before goes with `usage prune`, and only with it")
    try:
        settings = _settings(args)
    except CardMcpError as exc:
        _log_to_stderr(os.environ.get("CARD_MCP_LOG_LEVEL", "INFO"))
        return _failed(exc, exc)
    _log_to_stderr(settings.log_level)
    handler: Callable[[argparse.Namespace, Settings], Awaitable[int]] = {
        "serve": _serve,
        "export": lifecycle.export,
        "import": lifecycle.import_,
        **admin.COMMANDS,
    }[args.command]
    try:
        uvloop = args.command == "serve" and _has_uvloop()  # a faster loop where it pays: not for one command
        return anyio.run(handler, args, settings, backend_options={"use_uvloop": uvloop})
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:  # task groups nest what stopped them
        leaves = list(_leaves(group))
        known = next((leaf for leaf in leaves if isinstance(leaf, CardMcpError)), None)
        if known is None and any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return 130
        return _failed(known or _unexpected(leaves[0]), group)
    except Exception as exc:  # the one place a command's failure becomes its last words
        return _failed(exc if isinstance(exc, CardMcpError) else _unexpected(exc), exc)


def _log_to_stderr(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The SDK's HTTP transport logs every session's end at INFO, and in stateless mode every request is a session.
    logging.getLogger("mcp.server.streamable_http").setLevel(logging.WARNING)


def _failed(error: CardMcpError, cause: BaseException) -> int:
    """Say what went wrong in one line (and, at DEBUG, log how: the whole traceback); exit status 1."""
    logger.debug("what stopped card-mcp:", exc_info=cause)
    hint = f" ({error.hint})" if error.hint else ""
    print(" ".join(f"card-mcp: {error.message}{hint}".split()), file=sys.stderr)  # one line, whatever it quotes
    return 1


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc``: itself, or those of an exception group (task groups nest them)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _unexpected(exc: BaseException) -> CardMcpError:
    """An error card-mcp did not foresee, named by its type and text, never a traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return SetupError(
            f"{exc.strerror}{where}", hint="Check the path or address named; CARD_MCP_LOG_LEVEL=DEBUG logs where."
        )
    return SetupError(
        f"unexpected {type(exc).__name__}: {exc}",
        hint="CARD_MCP_LOG_LEVEL=DEBUG logs the traceback; please report it.",
    )


# The flags that override a setting, by the setting they name.
_FLAGS = {
    "transport": "--transport",
    "host": "--host",
    "port": "--port",
    "tenant": "--tenant",
    "stateless": "--stateless",
    "create_tenant": "--no-create",
}


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment and the command's flags; a value they refuse is a SetupError naming the
    variable (or flag) and what it takes."""
    flags = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    try:
        settings = Settings()
        return Settings.model_validate({**settings.model_dump(), **flags}) if flags else settings
    except ValidationError as exc:
        raise invalid_setting(exc, {name: _FLAGS[name] for name in flags}) from exc


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from . import stdio  # the MCP SDK loads only for the command that serves
    from .server import build_server

    logs.keep_lines_clean(logging.getLogger().handlers)  # clients' text reaches the log from here on
    if settings.transport == "http":
        from . import http_app

        if args.tenant is not None:
            logger.warning("--tenant is ignored over HTTP: each request's API key names its tenant")
        with http_app.bind(settings) as sock:
            settings = settings.model_copy(update={"port": sock.getsockname()[1]})
            await http_app.serve_http(build_server(settings, owns_process=True), settings, sock)
        return 0
    server = build_server(settings, owns_process=True)
    async with anyio.create_task_group() as group:
        group.start_soon(_stop_on_signal, group.cancel_scope)
        await stdio.serve(server)  # returns when the client closes stdin
        group.cancel_scope.cancel()
    return 0


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    """SIGTERM and SIGINT end the server cleanly: the lifespan closes the pool and stops the embedded database."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            logger.info("received %s; shutting down", signal.Signals(received).name)
            scope.cancel()
            return


def _has_uvloop() -> bool:
    """uvloop, a faster event loop, is a dependency on the platforms it supports; elsewhere asyncio's own runs."""
    return importlib.util.find_spec("uvloop") is not None


if __name__ == "__main__":
    sys.exit(main())
