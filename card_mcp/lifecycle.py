"""The commands of a tenant's data from arrival to erasure (issue #22): ``export``, ``import``, ``tenants delete``
and ``usage prune``. cli.py parses their flags and hands them here; the work is in transfer.py, tenants.py and
retention.py."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO
from uuid import UUID

from . import db, migrate, output, readers, retention, tenants, transfer
from .config import Settings
from .errors import InvalidArgument


async def _tenant_id(database: db.Database, name: str) -> UUID:
    async with db.connected(database.require_admin_url()) as admin:
        return await tenants.tenant_id(admin, name)


def _app_url(database: db.Database) -> str:
    return database.app_url


async def export(args: argparse.Namespace, settings: Settings) -> int:
    """``card-mcp export``: the tenant's cards to --output (written whole, then renamed into place) or stdout."""
    bar = output.ProgressBar("exporting cards")
    target = Path(args.output) if args.output else None
    partial = target.with_name(target.name + ".partial") if target else None
    async with migrate.open_migrated(settings) as database:
        tenant_id = await _tenant_id(database, args.tenant)
        # Opened here, not under db.connected, whose error translation would call a file that cannot be written an
        # unreachable database.
        out = _open_output(partial) if partial else sys.stdout
        try:
            async with db.connected(_app_url(database)) as conn:
                report = await transfer.export_cards(
                    conn,
                    tenant_id,
                    args.tenant,
                    out,
                    include_deleted=args.include_deleted,
                    include_history=args.include_history,
                    progress=bar.update,
                )
        except BaseException:
            if partial:
                out.close()
                partial.unlink(missing_ok=True)
            raise
        if partial and target:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            partial.replace(target)
    bar.close()
    deleted = f" ({report.deleted} deleted)" if args.include_deleted else ""
    where = f" to {target}" if target else ""
    print(f"card-mcp: exported {report.cards} cards{deleted} of tenant {args.tenant!r}{where}", file=sys.stderr)
    return 0


def _open_output(path: Path) -> TextIO:
    try:
        return path.open("w", encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(
            f"cannot write {path}: {exc.strerror or exc}", hint="Give --output a file in a folder you can write to."
        ) from None


async def import_(args: argparse.Namespace, settings: Settings) -> int:
    """``card-mcp import``: every line checked first; nothing written if any is invalid (exit 1, each one named)."""
    path: Path = args.file
    bar = output.ProgressBar("importing cards")
    async with migrate.open_migrated(settings) as database:
        tenant_id = await _tenant_id(database, args.tenant)
        async with db.connected(_app_url(database)) as conn:
            report = await transfer.import_cards(
                conn, tenant_id, path, max_bytes=settings.max_content_bytes, progress=bar.update
            )
    bar.close()
    if report.error_count:
        for error in report.errors:
            print(f"{path}: {error}", file=sys.stderr)
        more = report.error_count - len(report.errors)
        if more:
            print(f"{path}: ... and {more} more invalid lines", file=sys.stderr)
        raise InvalidArgument(
            f"{report.error_count} invalid line(s) in {path}; nothing was imported",
            hint="Fix the lines named above and run the same command again.",
        )
    if report.with_history:
        print(f"card-mcp: {report.with_history} cards came with their history", file=sys.stderr)
    print(f"created {report.created}, existing {report.existing} (of {report.cards} cards in {path})")
    return 0


def _confirmed(name: str) -> bool:
    print(
        f"card-mcp: this erases tenant {name!r}: its cards, history, usage, API keys, OAuth connections, readers' "
        "mapping and every other row of it, for good. Type the tenant's name to go on: ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    return sys.stdin.readline().strip() == name


async def delete_tenant(args: argparse.Namespace, settings: Settings) -> int:
    """``card-mcp tenants delete``: after the operator types the name (or --yes), the erase, through the owner."""
    if not args.yes and not _confirmed(args.name):
        raise InvalidArgument("the name typed did not match; nothing was erased", hint="Type it exactly, or --yes.")
    async with (
        migrate.open_migrated(settings) as database,
        db.connected(database.require_owner_url("tenants delete")) as conn,
    ):
        orphans = await readers.list_readers(conn, args.name)
        removed = await tenants.erase_tenant(conn, args.name)
    rows = [{"table": table, "rows_removed": count} for table, count in removed.items()]
    output.print_rows(rows, args.format, key="removed")
    print(
        f"card-mcp: tenant {args.name!r} erased ({sum(removed.values())} rows); its API keys and OAuth tokens "
        "stopped working at once; the erasure is recorded in card_mcp.tenant_erasures",
        file=sys.stderr,
    )
    for reader in orphans:
        print(
            f"card-mcp: reader role {reader.name!r} now reads no tenant; drop it with "
            f"`card-mcp readers revoke {reader.name}`",
            file=sys.stderr,
        )
    return 0


def _before(value: str | None, retention_days: int | None) -> datetime:
    if value is None:
        if retention_days is None:
            raise InvalidArgument(
                "usage prune needs --before or CARD_MCP_USAGE_RETENTION_DAYS",
                hint="For example --before 90d, or --before 2026-01-01.",
            )
        return retention.cut_off(retention_days)
    if value.endswith("d") and value[:-1].isdigit():
        try:
            return retention.cut_off(int(value[:-1]))
        except OverflowError:  # before the first day of the calendar
            raise InvalidArgument(f"{value!r} is too many days", hint="Use fewer days, or a date.") from None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidArgument(f"{value!r} is not a date", hint="Use 90d, 2026-01-01 or 2026-01-01T12:00.") from exc
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


async def prune(args: argparse.Namespace, settings: Settings) -> int:
    """``card-mcp usage prune``: drop the usage partitions that hold only calls before the cut-off."""
    before = _before(args.before, settings.usage_retention_days)
    if before > datetime.now(UTC) + timedelta(minutes=1):
        raise InvalidArgument("--before is in the future", hint="Prune only what is past, e.g. --before 90d.")
    async with migrate.open_migrated(settings) as database, db.connected(database.require_admin_url()) as conn:
        dropped = await retention.prune(conn, before)
    rows = [{"partition": d.partition, "from": d.range_from.isoformat(), "to": d.range_to.isoformat()} for d in dropped]
    output.print_rows(rows, "table", key="partitions dropped")
    print(
        f"card-mcp: usage before {before.isoformat(timespec='seconds')} pruned: {len(dropped)} partitions dropped "
        "(a partition that also holds later calls is kept whole)",
        file=sys.stderr,
    )
    return 0
