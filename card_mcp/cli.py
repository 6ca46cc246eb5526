"""The ``card-mcp`` command: parses flags, builds Settings once, hands them down.

Exit status: 0 on success, 1 on a user error (one line on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from . import __version__, db, migrate, tenants
from .config import Settings
from .errors import CardMcpError

logger = logging.getLogger("card_mcp")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="card-mcp", description="Brand cards for AI agents, over MCP.")
    parser.add_argument("--version", action="version", version=f"card-mcp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the card tools over MCP (stdio by default)")
    serve.add_argument("--transport", choices=["stdio"], help="the MCP transport (default: stdio)")
    serve.add_argument("--host", help="HTTP bind address (CARD_MCP_HOST)")
    serve.add_argument("--port", type=int, help="HTTP port (CARD_MCP_PORT)")
    serve.add_argument("--tenant", help="the tenant to serve over stdio (CARD_MCP_TENANT; default 'default')")

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

    dbp = commands.add_parser("db", help="the database in use").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    url = dbp.add_parser("url", help="print a connection URL for psql or a BI tool")
    url.add_argument("--role", choices=["app", "admin"], default="app")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``card-mcp`` console script."""
    args = _parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        stream=sys.stderr,
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace, Settings], Awaitable[int]] = {
        "serve": _serve,
        "migrate": _migrate,
        "tenants": _tenants,
        "db": _db,
    }[args.command]
    try:
        return anyio.run(handler, args, settings)
    except CardMcpError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        print(f"card-mcp: {exc.message}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from .server import build_server  # the MCP SDK loads only for the command that serves

    flags = {name: getattr(args, name) for name in ("transport", "host", "port", "tenant")}
    settings = Settings.model_validate({**settings.model_dump(), **{k: v for k, v in flags.items() if v is not None}})
    server = build_server(settings)
    async with anyio.create_task_group() as group:
        group.start_soon(_stop_on_signal, group.cancel_scope)
        await server.run_stdio_async()  # returns when the client closes stdin
        group.cancel_scope.cancel()
    return 0


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    """SIGTERM and SIGINT end the server cleanly: the lifespan closes the pool and stops the embedded database."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            logger.info("received %s; shutting down", signal.Signals(received).name)
            scope.cancel()
            return


async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    async with db.open_database(settings, apply_migrations=False) as database:
        conn = await db.connect(database.require_owner_url())
        try:
            if args.check:
                waiting = await migrate.pending(conn)
                for migration in waiting:
                    print(f"pending: {migration.version}")
                return 1 if waiting else 0
            applied = await migrate.migrate(conn)
        finally:
            await conn.close()
    for version in applied:
        print(f"applied: {version}")
    if not applied:
        print("up to date", file=sys.stderr)
    return 0


async def _tenants(args: argparse.Namespace, settings: Settings) -> int:
    async with db.open_database(settings) as database:
        conn = await db.connect(database.require_admin_url())
        try:
            if args.action == "create":
                rows = [await tenants.create_tenant(conn, args.name)]
            else:
                rows = await tenants.list_tenants(conn)
        finally:
            await conn.close()
    _print_rows(
        [{"tenant_id": str(t.tenant_id), "name": t.name, "created_at": t.created_at.isoformat()} for t in rows],
        args.format,
        key="tenants",
    )
    return 0


async def _db(args: argparse.Namespace, settings: Settings) -> int:
    database = db.locate(settings)
    if args.role == "admin":
        print(database.require_admin_url())
    else:
        print(database.app_url)
    if database.embedded is not None and not database.embedded.is_running():
        print(
            "card-mcp: note: the embedded PostgreSQL is not running now; the URL works while any card-mcp "
            "process (such as `card-mcp serve`) runs",
            file=sys.stderr,
        )
    return 0


def _print_rows(rows: list[dict[str, Any]], fmt: str, *, key: str) -> None:
    if fmt == "json":
        print(json.dumps({key: rows}, indent=2))
        return
    if not rows:
        print(f"no {key}", file=sys.stderr)
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


if __name__ == "__main__":
    sys.exit(main())
