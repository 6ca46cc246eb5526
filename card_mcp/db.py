"""The database: where it is, its pool, the one way tenant queries run, and asyncpg errors as domain errors."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import quote, urlsplit, urlunsplit
from uuid import UUID

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import jsonb
from .config import Settings
from .embedded import EmbeddedPostgres
from .errors import CardMcpError, Conflict, Internal, InvalidArgument, SetupError, Unavailable, UnsafeRoleError

logger = logging.getLogger(__name__)

# A connection as the pool lends it, or one opened directly: every query function accepts either.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

APP_ROLE = "card_mcp_app"
ADMIN_ROLE = "card_mcp_admin"
OWNER_ROLE = "card_mcp_owner"
ANALYST_ROLE = "card_mcp_analyst"
READER_GROUP = "card_mcp_reader"

# A call waits this long for a free pooled connection before it answers `unavailable`.
ACQUIRE_TIMEOUT = 10.0

# A call's transaction starts by setting the tenant, the statement timeout and who is calling (the actor its card
# versions name, schema/0009_card_history.sql), all transaction-locally (a pooled or pgbouncer connection carries
# none of them into its next transaction).
_SET_CALL = (
    "SELECT set_config('app.current_tenant_id', $1::text, true), set_config('statement_timeout', $2::text, true),"
    " set_config('card_mcp.actor', $3::text, true)"
)
# A call declared not durable (one that only reads) also commits without waiting for the WAL flush: the only row it
# writes is its usage row, which only a crash of the database itself could lose; no card ever rides on it.
_SET_RELAXED_CALL = _SET_CALL + ", set_config('synchronous_commit', 'off', true)"
_TENANT_ID_FOR = "SELECT card_mcp.tenant_id_for($1)"

# Why the runtime admin role could do more than its jobs, if it could: the owner (it owns the schema and the
# SECURITY DEFINER functions, and can turn row-level security off) or a superuser must not be held by a server.
_ADMIN_ROLE_AUDIT = """
SELECT session_user::text AS role,
       r.rolsuper AS superuser,
       r.rolbypassrls AS bypassrls,
       r.rolcreaterole AS createrole,
       session_user <> current_user AS switched,
       EXISTS (SELECT FROM pg_roles AS s
                WHERE s.oid <> r.oid AND (s.rolsuper OR s.rolbypassrls OR s.rolcreaterole)
                  AND pg_has_role(r.oid, s.oid, 'MEMBER')) AS member_of_privileged,
       (SELECT string_agg(DISTINCT owner::regrole::text, ', ')
          FROM (SELECT c.relowner FROM pg_class AS c WHERE c.relnamespace = 'card_mcp'::regnamespace
                UNION ALL SELECT p.proowner FROM pg_proc AS p WHERE p.pronamespace = 'card_mcp'::regnamespace
                UNION ALL SELECT n.nspowner FROM pg_namespace AS n WHERE n.nspname = 'card_mcp') AS o(owner)
         WHERE pg_has_role(r.oid, o.owner, 'MEMBER')) AS owners
  FROM pg_roles AS r
 WHERE r.rolname = session_user
"""

# Why the application role could escape row-level security, if it could.
_ROLE_AUDIT = """
SELECT session_user::text AS role,
       r.rolsuper AS superuser,
       r.rolbypassrls AS bypassrls,
       session_user <> current_user AS switched,
       EXISTS (SELECT FROM pg_roles AS s
                WHERE s.oid <> r.oid
                  AND (s.rolsuper OR s.rolbypassrls OR s.rolname IN ('card_mcp_admin', 'card_mcp_owner'))
                  AND pg_has_role(r.oid, s.oid, 'MEMBER')) AS member_of_privileged,
       (SELECT string_agg(DISTINCT c.relowner::regrole::text, ', ')
          FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
           AND n.nspname NOT IN ('pg_catalog', 'information_schema')
           AND n.nspname NOT LIKE 'pg\\_%'
           AND pg_has_role(r.oid, c.relowner, 'MEMBER')) AS owners
  FROM pg_roles AS r
 WHERE r.rolname = session_user
"""


@dataclass
class Database:
    """Where card-mcp's PostgreSQL is, and as whom to connect for what."""

    app_url: str
    admin_url: str | None
    owner_url: str | None
    embedded: EmbeddedPostgres | None = None

    def require_admin_url(self) -> str:
        if self.admin_url is None:
            raise SetupError(
                "this command needs the admin connection, but CARD_MCP_ADMIN_DATABASE_URL is not set",
                hint="Set CARD_MCP_ADMIN_DATABASE_URL to the admin role's URL (card_mcp_admin), never the owner's.",
            )
        return self.admin_url

    def url_for(self, user: str) -> str:
        """A URL of this database for ``user`` (a person's role): the embedded socket, or the application role's URL
        with the user replaced and no password (the person brings their own)."""
        if self.embedded is not None:
            return self.embedded.url(user)
        parts = urlsplit(self.app_url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{quote(user)}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))

    def require_owner_url(self, command: str = "migrate") -> str:
        if self.owner_url is None:
            raise SetupError(
                f"{command} needs the owner's connection, but CARD_MCP_OWNER_DATABASE_URL is not set",
                hint="Set CARD_MCP_OWNER_DATABASE_URL to the URL of the role that owns the card_mcp schema "
                "(only for this command: a running server never holds it).",
            )
        return self.owner_url


def locate(settings: Settings) -> Database:
    """Where the database is, without starting or connecting to anything."""
    if settings.database_url is not None:
        return Database(settings.database_url, settings.admin_database_url, settings.owner_database_url)
    pg = EmbeddedPostgres(settings.data_dir, lock_timeout=settings.lock_timeout_seconds)
    return Database(pg.url(APP_ROLE), pg.url(ADMIN_ROLE), pg.url(OWNER_ROLE), embedded=pg)


@asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[Database]:
    """The database, reachable: the embedded server started (and stopped on exit) when it is ours; an external one
    is only located. Migrating is the caller's (migrate.open_migrated)."""
    database = locate(settings)
    pg = database.embedded
    if pg is None:
        yield database
        return
    try:
        # Inside the try: a SIGTERM while the server starts (in a worker thread) still stops it below.
        await anyio.to_thread.run_sync(pg.start)
        yield database
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(pg.stop)


async def connect(url: str) -> asyncpg.Connection[asyncpg.Record]:
    """One connection (for commands and migrations), with card-mcp's codecs."""
    try:
        conn = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SetupError(f"cannot connect to PostgreSQL: {exc}", hint="Check the database URL and server.") from exc
    await _init_connection(conn)
    return conn


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[Connection]:
    """One connection for a command: database errors inside become card-mcp's errors (one line, exit 1); closed
    when the block ends."""
    conn = await connect(url)
    try:
        with translate_errors():
            yield conn
    finally:
        await conn.close()


async def _init_connection(conn: Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(type_name, encoder=json.dumps, decoder=jsonb.read_json, schema="pg_catalog")


async def _keep_session(conn: Connection) -> None:
    """What a connection needs when it goes back to the pool, beyond the rollback of an open transaction that
    asyncpg always does: nothing. card-mcp sets nothing session-level (every setting is transaction-local, every
    advisory lock transaction-scoped, no LISTEN, no cursors), so asyncpg's default reset query (RESET ALL, UNLISTEN
    *, CLOSE ALL, pg_advisory_unlock_all) would cost a round trip per call to undo nothing."""


async def create_pool(url: str, settings: Settings) -> asyncpg.Pool:
    """The application role's pool, after checking that the role cannot bypass row-level security."""
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=min(settings.pool_min_size, settings.pool_max_size),
            max_size=settings.pool_max_size,
            statement_cache_size=settings.statement_cache_size,
            command_timeout=settings.command_timeout,
            init=_init_connection,
            reset=_keep_session,
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SetupError(f"cannot connect to PostgreSQL: {exc}", hint="Check CARD_MCP_DATABASE_URL.") from exc
    try:
        async with pool.acquire() as conn:
            await check_app_role(conn)
    except BaseException:
        await pool.close()
        raise
    return pool


async def create_admin_pool(url: str, settings: Settings) -> asyncpg.Pool:
    """A small pool of the admin role, for what runs before a tenant is known (API-key lookups), after checking
    that the role is not the owner or a superuser."""
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=max(2, settings.pool_max_size // 2),  # one lookup per HTTP request
            statement_cache_size=settings.statement_cache_size,
            command_timeout=settings.command_timeout,
            init=_init_connection,
            reset=_keep_session,  # key lookups set nothing either
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SetupError(
            f"cannot connect to PostgreSQL as the admin role: {exc}", hint="Check CARD_MCP_ADMIN_DATABASE_URL."
        ) from exc
    try:
        async with pool.acquire() as conn:
            await check_admin_role(conn)
    except BaseException:
        await pool.close()
        raise
    return pool


async def check_admin_role(conn: Connection) -> None:
    """Refuse a runtime admin role that is a superuser, BYPASSRLS or CREATEROLE, owns anything of card_mcp (the
    owner: it could replace the SECURITY DEFINER functions or turn row-level security off), or is a member of a
    role that is or does any of those."""
    row = await conn.fetchrow(_ADMIN_ROLE_AUDIT)
    assert row is not None
    reasons = []
    for flag, reason in (
        ("superuser", "is a superuser"),
        ("bypassrls", "has BYPASSRLS"),
        ("createrole", "has CREATEROLE"),
        ("switched", "was switched to another role with SET ROLE"),
        ("member_of_privileged", "is a member of a superuser, BYPASSRLS or CREATEROLE role"),
    ):
        if row[flag]:
            reasons.append(reason)
    if row["owners"]:
        reasons.append(f"owns objects of the card_mcp schema, itself or through membership (owners: {row['owners']})")
    if reasons:
        raise UnsafeRoleError(
            f"refusing to serve: the admin role {row['role']!r} " + " and ".join(reasons),
            hint=f"Connect CARD_MCP_ADMIN_DATABASE_URL as {ADMIN_ROLE}, which owns nothing; the owner's URL is for "
            "`card-mcp migrate` only (CARD_MCP_OWNER_DATABASE_URL).",
        )


async def check_app_role(conn: Connection) -> None:
    """Refuse a role that row-level security would not bind: a superuser, BYPASSRLS, a table owner (FORCE
    binds owners, but an owner can turn it off), or a member of a role that is any of those."""
    row = await conn.fetchrow(_ROLE_AUDIT)
    assert row is not None
    reasons = []
    if row["superuser"]:
        reasons.append("is a superuser")
    if row["bypassrls"]:
        reasons.append("has BYPASSRLS")
    if row["switched"]:
        reasons.append("was switched to another role with SET ROLE")
    if row["member_of_privileged"]:
        reasons.append("is a member of a superuser, BYPASSRLS, card_mcp_admin or card_mcp_owner role")
    if row["owners"]:
        reasons.append(f"owns tables, itself or through membership (owners: {row['owners']})")
    if reasons:
        raise UnsafeRoleError(
            f"refusing to serve: the application role {row['role']!r} " + " and ".join(reasons),
            hint=f"Connect CARD_MCP_DATABASE_URL as a role like {APP_ROLE} that owns nothing and is neither "
            "superuser nor BYPASSRLS; the README shows how to create it.",
        )


def domain_error(exc: BaseException) -> CardMcpError | None:
    """The domain error for an asyncpg or connection error (None for anything else); database text goes to the
    log, never further."""
    if isinstance(exc, CardMcpError):
        return exc
    if isinstance(exc, asyncpg.QueryCanceledError):
        logger.warning("database statement cancelled: %s", exc)
        return too_slow()
    if isinstance(exc, asyncpg.DeadlockDetectedError | asyncpg.SerializationError):
        logger.warning("transaction aborted by a concurrent one: %s", exc)
        return Conflict("a concurrent call touched the same cards", hint="Retry the same call; nothing was saved.")
    if isinstance(exc, asyncpg.CheckViolationError | asyncpg.DataError | asyncpg.NotNullViolationError):
        logger.warning("database refused a value: %s", exc)
        return InvalidArgument("a value breaks a rule of the card store", hint="Check the arguments.")
    if isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.PostgresConnectionError
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError
        | asyncpg.AdminShutdownError,
    ):
        logger.warning("database unavailable: %r", exc)
        return Unavailable("the card store is unreachable right now")
    if isinstance(exc, asyncpg.PostgresError):
        logger.error("unexpected database error", exc_info=exc)
        return Internal("the card store failed unexpectedly")
    return None


def too_slow() -> Unavailable:
    """What a call over its statement timeout is told: by PostgreSQL (a cancelled statement of a transaction) or
    by asyncpg (a call's one statement, which no transaction-local timeout reaches: Call.fetch_recorded)."""
    return Unavailable("the database took too long to answer")


@contextmanager
def translate_errors() -> Iterator[None]:
    """asyncpg and connection errors raised inside become domain errors."""
    try:
        yield
    except Exception as exc:
        error = domain_error(exc)
        if error is None or error is exc:
            raise
        raise error from exc


async def begin(
    conn: Connection, tenant_id: UUID, statement_timeout_ms: int, *, durable: bool = True, actor: str = ""
) -> None:
    """Start the tenant's transaction on ``conn``: BEGIN, then the tenant, the statement timeout (0 for none) and
    the ``actor`` (JSON naming who calls, for the card versions written; empty: the database role), all
    transaction-locally, so the pooled connection carries nothing into its next use. Not ``durable``: its COMMIT
    does not wait for the WAL flush."""
    # READ WRITE said, not assumed: a default_transaction_read_only set on the role or database changes nothing.
    await conn.execute("BEGIN READ WRITE")
    await conn.execute(_SET_CALL if durable else _SET_RELAXED_CALL, str(tenant_id), str(statement_timeout_ms), actor)


async def commit(conn: Connection) -> None:
    """COMMIT, shielded from cancellation: a COMMIT once sent finishes, so its outcome is known. If it fails, the
    transaction is rolled back and the error raised."""
    with anyio.CancelScope(shield=True):
        try:
            await conn.execute("COMMIT")
        except BaseException:
            await rollback(conn)
            raise


# Errors that leave a COMMIT's outcome unknown: the connection went away before PostgreSQL's answer arrived. (An
# error PostgreSQL sent in answer to the COMMIT means it did not commit.)
_LOST = (OSError, asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError, TimeoutError)
_OUTCOME = "SELECT pg_xact_status($1::text::xid8)"


def lost_connection(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection was lost, leaving what it last sent undecided."""
    return isinstance(exc, _LOST)


async def committed(pool: asyncpg.Pool, xid: str, *, seconds: float = 10.0) -> bool | None:
    """Whether transaction ``xid``, whose COMMIT lost its connection, committed: asked on another connection, and
    asked again while PostgreSQL is still finishing it. None when that cannot be known (the database is
    unreachable too, or the id is older than PostgreSQL's commit log keeps)."""
    try:
        with anyio.CancelScope(shield=True), anyio.fail_after(seconds):  # a cancelled call must learn it too
            while True:
                async with pool.acquire() as conn:
                    status = await conn.fetchval(_OUTCOME, xid)
                if status != "in progress":
                    return {"committed": True, "aborted": False}.get(status)
                await anyio.sleep(0.05)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        logger.warning("could not learn whether transaction %s committed: %r", xid, exc)
    return None


async def rollback(conn: Connection) -> None:
    """Roll back the open transaction, if any; shielded (a cancelled call still rolls back here, at once, rather
    than leaving the pool to find an open transaction), and quiet on a broken connection."""
    with anyio.CancelScope(shield=True):
        try:
            if not conn.is_closed() and conn.is_in_transaction():  # else the backend is gone, or nothing is open
                await conn.execute("ROLLBACK")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.info("no rollback on a broken connection (the pool discards it): %r", exc)


async def tenant_id_for(admin_url: str, name: str, *, check_role: bool = False) -> UUID:
    """The id of the tenant called ``name``, created on first use; through the admin role, the only one allowed
    to map names to tenant ids. ``check_role``: refuse first an admin connection a server must not hold (the
    owner, a superuser), as ``serve`` over stdio does."""
    conn = await connect(admin_url)
    try:
        if check_role:
            await check_admin_role(conn)
        with translate_errors():
            value: Any = await conn.fetchval(_TENANT_ID_FOR, name)
    finally:
        await conn.close()
    return UUID(str(value))
