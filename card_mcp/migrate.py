"""Applies ``schema/*.sql`` in order, each file once, in its own transaction, under an advisory lock.

A file whose first line is ``-- requires extension: NAME VERSION`` is optional: it is applied only where that
extension (at least that version) is installed in the database or can be created there, recorded as applied only
when it ran, and tried again on every later run; a database without it is up to date (``pending`` leaves it out),
and its failure is logged, never raised. It must stand alone: no later required file may depend on it (a later
optional file of the same extension may: it is applied after it, and left out with it)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from . import db
from .config import Settings
from .db import Connection, Database
from .errors import SetupError

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
_DATABASE = "SELECT current_database()"
_LOCK = "SELECT pg_advisory_lock($1)"
_UNLOCK = "SELECT pg_advisory_unlock($1)"
# The owner hands functions to card_mcp_admin in 0001-0004, which takes the right to SET ROLE to it. On PostgreSQL
# 16+, a CREATEROLE owner that created the role (or was given ADMIN on it, as hosted providers do) holds ADMIN
# OPTION without SET or INHERIT, which 0001's membership check mistakes for membership: give itself the full
# membership first (creating the role as 0001 would, where it may). PostgreSQL 15 needs nothing: there, membership
# is membership.
_OWNER_MEMBERSHIP = """
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 160000 THEN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'card_mcp_admin')
           AND (SELECT rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
            CREATE ROLE card_mcp_admin NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
        END IF;
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'card_mcp_admin') THEN
            IF NOT pg_has_role(current_user, 'card_mcp_admin', 'SET')
               AND pg_has_role(current_user, 'card_mcp_admin', 'MEMBER WITH ADMIN OPTION') THEN
                EXECUTE format('GRANT card_mcp_admin TO %I WITH INHERIT TRUE, SET TRUE', current_user);
            END IF;
        END IF;
    END IF;
END
$$;
"""
_APPLIED = "SELECT version, checksum FROM card_mcp.schema_migrations ORDER BY version"
_RECORD = "INSERT INTO card_mcp.schema_migrations (version, checksum) VALUES ($1, $2)"
_LEDGER_EXISTS = "SELECT to_regclass('card_mcp.schema_migrations') IS NOT NULL"
# The extension's version: the one installed in this database, else the one CREATE EXTENSION would install.
_EXTENSION_VERSION = """
SELECT coalesce((SELECT extversion FROM pg_catalog.pg_extension WHERE extname = $1),
                (SELECT default_version FROM pg_catalog.pg_available_extensions WHERE name = $1))
"""
# The extensions a migration creates in card_mcp's schema (its objects are named card_mcp.NAME there).
_CREATES_EXTENSION = re.compile(r"CREATE EXTENSION IF NOT EXISTS ([a-z0-9_]+) WITH SCHEMA card_mcp", re.IGNORECASE)
# Where an extension is installed now, if it is.
_EXTENSION_SCHEMA = """
SELECT n.nspname FROM pg_catalog.pg_extension AS e JOIN pg_catalog.pg_namespace AS n ON n.oid = e.extnamespace
 WHERE e.extname = $1
"""
# After migrating: the usage log's daily partitions a week ahead (schema/0010_lifecycle.sql), so that a database
# migrated and then served, or left unserved for a while, never sends a call's usage row to the default partition.
_HAS_USAGE_PARTITIONS = "SELECT to_regprocedure('card_mcp.usage_partitions_ensure(integer)') IS NOT NULL"
_ENSURE_USAGE_PARTITIONS = "SELECT count(*) FROM card_mcp.usage_partitions_ensure(7)"
_REQUIRES = re.compile(r"\A-- requires extension: ([a-z0-9_]+) ([0-9.]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    """One file of ``schema/``: its name (without .sql) is its version, applied in name order."""

    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def requires(self) -> str | None:
        """The extension an optional migration needs (its first line says), else None."""
        found = _REQUIRES.search(self.sql)
        return found.group(1) if found else None

    @property
    def requires_version(self) -> tuple[int, ...]:
        found = _REQUIRES.search(self.sql)
        return _version(found.group(2)) if found else ()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


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
    ledger = await conn.fetchval(_LEDGER_EXISTS)
    applied = {row["version"]: row["checksum"] for row in await conn.fetch(_APPLIED)} if ledger else {}
    for migration in migrations:
        if migration.version in applied and applied[migration.version] != migration.checksum:
            logger.warning("migration %s changed since it was applied; it is not applied again", migration.version)
    # Optional migrations are never pending: the database is up to date without them (migrate tries them).
    return [m for m in migrations if m.version not in applied and m.requires is None]


async def check_current(conn: Connection) -> None:
    """Refuse to serve a database with migrations not applied yet (SetupError saying how to apply them)."""
    if await pending(conn):
        raise SetupError(
            "the database has migrations that are not applied yet",
            hint="Run `card-mcp migrate` with CARD_MCP_OWNER_DATABASE_URL set to the owner's URL.",
        )


@asynccontextmanager
async def open_migrated(settings: Settings) -> AsyncIterator[Database]:
    """The database, ready for use: the embedded one started and migrated (it is card-mcp's own); an external one
    only located (its migrations are the operator's `card-mcp migrate`)."""
    async with db.open_database(settings) as database:
        if database.embedded is not None:
            conn = await db.connect(database.require_owner_url())
            try:
                await migrate(conn)
            finally:
                await conn.close()
        yield database


async def missing_optional(conn: Connection, migrations: list[Migration] | None = None) -> list[Migration]:
    """The optional migrations not applied to the database behind ``conn`` (their extension is missing)."""
    migrations = migrations if migrations is not None else load_migrations()
    if not await conn.fetchval(_LEDGER_EXISTS):
        return [m for m in migrations if m.requires]
    applied = {row["version"] for row in await conn.fetch(_APPLIED)}
    return [m for m in migrations if m.requires and m.version not in applied]


async def migrate(conn: Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply every pending migration; returns the versions applied. Safe to run concurrently and again:
    the advisory lock serialises runners, and each reads the ledger after taking it."""
    migrations = migrations if migrations is not None else load_migrations()
    await conn.execute(_LOCK, _LOCK_KEY)
    try:
        try:
            await conn.execute(_BOOTSTRAP)
            await conn.execute(_OWNER_MEMBERSHIP)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise _privilege_error(exc) from exc
        done: list[str] = []
        waiting = await pending(conn, migrations) + await missing_optional(conn, migrations)  # never overlapping
        await _check_extension_schemas(conn, [m for m in waiting if not m.requires])
        for migration in sorted(waiting, key=lambda m: m.version):
            if migration.requires:
                if await _apply_optional(conn, migration):
                    done.append(migration.version)
                continue
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
        if await conn.fetchval(_HAS_USAGE_PARTITIONS):
            await conn.fetchval(_ENSURE_USAGE_PARTITIONS)
        return done
    finally:
        await conn.execute(_UNLOCK, _LOCK_KEY)


async def _misplaced_extensions(conn: Connection, migration: Migration) -> list[tuple[str, str]]:
    """(extension, schema) for each extension ``migration`` creates in card_mcp that is installed elsewhere already
    (hosted PostgreSQL puts them in a schema such as ``extensions``): its CREATE EXTENSION IF NOT EXISTS would do
    nothing, and the objects it names card_mcp.* would not exist."""
    misplaced = []
    for name in dict.fromkeys(_CREATES_EXTENSION.findall(migration.sql)):
        schema = await conn.fetchval(_EXTENSION_SCHEMA, name)
        if schema is not None and schema != "card_mcp":
            misplaced.append((name, schema))
    return misplaced


async def _check_extension_schemas(conn: Connection, waiting: list[Migration]) -> None:
    """Refuse, before applying anything, when a pending migration needs an extension in card_mcp's schema that was
    created in another one: say exactly what an administrator must run."""
    misplaced: dict[str, str] = {}
    for migration in waiting:
        misplaced.update(await _misplaced_extensions(conn, migration))
    if not misplaced:
        return
    database = await conn.fetchval(_DATABASE)
    where = ", ".join(f"{name} in schema {schema}" for name, schema in misplaced.items())
    statements = " ".join(f"ALTER EXTENSION {name} SET SCHEMA card_mcp;" for name in misplaced)
    raise SetupError(
        f"card-mcp needs its extensions in the schema card_mcp, but this database has {where}; "
        f"a superuser (or the extensions' owner) must run, in database {database}: {statements}",
        hint="Then run `card-mcp migrate` again. (Anything else that uses these extensions must then name them "
        "card_mcp.*; nothing has been applied.)",
    )


async def _apply_optional(conn: Connection, migration: Migration) -> bool:
    """Apply an optional migration if its extension allows; log why not otherwise (it is tried again next time)."""
    assert migration.requires is not None
    found = await conn.fetchval(_EXTENSION_VERSION, migration.requires)
    wanted = ".".join(map(str, migration.requires_version))
    if found is None or _version(found) < migration.requires_version:
        logger.info(
            "migration %s left out: it needs the %s extension %s or newer, and this PostgreSQL has %s (tried again "
            "on every run)",
            migration.version,
            migration.requires,
            wanted,
            found or "none",
        )
        return False
    misplaced = await _misplaced_extensions(conn, migration)
    if misplaced:
        logger.warning(
            "migration %s left out: %s; a superuser (or its owner) can run %s in this database, then migrate again",
            migration.version,
            ", ".join(f"the {name} extension is in schema {schema}, not card_mcp" for name, schema in misplaced),
            " ".join(f"ALTER EXTENSION {name} SET SCHEMA card_mcp;" for name, _ in misplaced),
        )
        return False
    logger.info("applying migration %s", migration.version)
    try:
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(_RECORD, migration.version, migration.checksum)
    except asyncpg.PostgresError as exc:
        logger.warning(
            "migration %s left out (%s); a superuser can run CREATE EXTENSION %s WITH SCHEMA card_mcp in this "
            "database (it must be in that schema), then migrate again",
            migration.version,
            exc,
            migration.requires,
        )
        return False
    return True


def _privilege_error(exc: asyncpg.PostgresError) -> SetupError:
    return SetupError(
        f"the role running migrate lacks a privilege: {exc}",
        hint="Run migrate with the owner's URL (CARD_MCP_OWNER_DATABASE_URL); the README section "
        "'Using your own PostgreSQL' lists what an administrator must run first.",
    )
