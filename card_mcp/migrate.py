"""Applies ``schema/*.sql`` in order, each file once, in its own transaction, under an advisory lock."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg

from .errors import SetupError

if TYPE_CHECKING:
    from .db import Connection

logger = logging.getLogger(__name__)

# pg_advisory_lock key: "card-mcp migrate" as a stable 63-bit number.
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"card-mcp migrate").digest()[:8], "big") >> 1

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS card_mcp;
CREATE TABLE IF NOT EXISTS card_mcp.schema_migrations (
    version     text        PRIMARY KEY,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
"""
_APPLIED = "SELECT version, checksum FROM card_mcp.schema_migrations ORDER BY version"
_RECORD = "INSERT INTO card_mcp.schema_migrations (version, checksum) VALUES ($1, $2)"
_LEDGER_EXISTS = "SELECT to_regclass('card_mcp.schema_migrations') IS NOT NULL"


@dataclass(frozen=True)
class Migration:
    """One file of ``schema/``: its name (without .sql) is its version, applied in name order."""

    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def schema_dir() -> Path:
    """``schema/`` inside the installed wheel, or at the top of a source checkout."""
    packaged = Path(str(resources.files("card_mcp"))) / "schema"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "schema"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Every migration file, in the order they are applied."""
    folder = directory or schema_dir()
    files = sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    if not files:
        raise SetupError(f"no migrations found in {folder}", hint="Reinstall card-mcp.")
    return [Migration(path.stem, path.read_text(encoding="utf-8")) for path in files]


async def pending(conn: Connection, migrations: list[Migration] | None = None) -> list[Migration]:
    """The migrations not yet applied to the database behind ``conn``."""
    migrations = migrations if migrations is not None else load_migrations()
    if not await conn.fetchval(_LEDGER_EXISTS):
        return migrations
    applied = {row["version"]: row["checksum"] for row in await conn.fetch(_APPLIED)}
    for migration in migrations:
        if migration.version in applied and applied[migration.version] != migration.checksum:
            logger.warning("migration %s changed since it was applied; it is not applied again", migration.version)
    return [m for m in migrations if m.version not in applied]


async def migrate(conn: Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply every pending migration; returns the versions applied. Safe to run concurrently and again:
    the advisory lock serialises runners, and each reads the ledger after taking it."""
    migrations = migrations if migrations is not None else load_migrations()
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        try:
            await conn.execute(_BOOTSTRAP)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise _privilege_error(exc) from exc
        done: list[str] = []
        for migration in await pending(conn, migrations):
            logger.info("applying migration %s", migration.version)
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(_RECORD, migration.version, migration.checksum)
            except asyncpg.InsufficientPrivilegeError as exc:
                raise _privilege_error(exc) from exc
            except asyncpg.PostgresError as exc:
                raise SetupError(
                    f"migration {migration.version} failed: {exc}", hint="Nothing of it was applied."
                ) from exc
            done.append(migration.version)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


def _privilege_error(exc: asyncpg.PostgresError) -> SetupError:
    return SetupError(
        f"the role running migrate lacks a privilege: {exc}",
        hint="Run migrate with the owner's URL (CARD_MCP_ADMIN_DATABASE_URL); the README section "
        "'Using your own PostgreSQL' lists what an administrator must run first.",
    )
