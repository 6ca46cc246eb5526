"""The call edge: the one way a tool call, a resource read or a prompt reaches the database and the usage log.

    Edge.call(caller, name, durable=...)  yields a Call to the body (tools.py, resources.py, prompts.py); the
                                     pooled connection is taken when the call first needs it, not before
      the body's first query         BEGIN, then the tenant, the statement timeout and the actor its card
                                     versions name (db.begin)
      the body returns               the usage row in the same transaction, COMMIT; a COMMIT whose answer is lost
                                     with its connection is resolved by asking PostgreSQL (db.committed)
      the body raises                ROLLBACK; the usage row in a statement of its own; CallFailed carrying the
                                     domain error (errors.py), which server.py turns into the MCP answer
      the caller cancels             ROLLBACK; the usage row (error "cancelled"); the cancellation goes on
      nothing was read or written    the usage row alone, one statement (record_call_alone)
      one recorded statement         Call.fetch_recorded: the tenant, the work and the usage row in one statement
                                     (one round trip, get_card, search_cards): the edge writes nothing more;
                                     over the statement timeout it is cancelled, and recorded as a failure

Durability is declared by the caller (a tool's registry entry), never read off an annotation: a call that is not
durable commits without waiting for the WAL flush, which only a crash of PostgreSQL itself could lose.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

import anyio
import asyncpg

from . import db, usage
from .config import Settings
from .errors import CardMcpError, Internal, LimitExceeded
from .usage import UsageEntry

if TYPE_CHECKING:
    from .semantic import Semantic

logger = logging.getLogger(__name__)

# How long a cancelled or failed call may take to write its usage row before it lets go.
RECORD_TIMEOUT = 5.0

Progress = Callable[[float, float, str], Awaitable[None]]


@dataclass(frozen=True)
class Caller:
    """Who makes a call: the tenant (from the server's side, never from an argument), the transport, the API key
    over HTTP, and the client as it named itself (printable text only)."""

    tenant_id: UUID
    transport: str
    api_key_id: UUID | None = None
    limit_key: UUID | None = None  # what the per-caller limit counts calls by (the key, or the OAuth connection)
    connection_id: UUID | None = None  # an OAuth call's connection and registered client
    oauth_client_id: str | None = None
    client_name: str = "unknown"
    client_version: str | None = None

    def actor(self) -> str:
        """Who this is, as the card versions of its calls name it (JSON; schema/0009_card_history.sql)."""
        fields = {
            "transport": self.transport,
            "api_key_id": self.api_key_id,
            "connection_id": self.connection_id,
            "oauth_client_id": self.oauth_client_id,
            "client_name": self.client_name,
            "client_version": self.client_version,
        }
        return json.dumps({k: str(v) if isinstance(v, UUID) else v for k, v in fields.items() if v is not None})


class CallFailed(Exception):
    """A call that failed and was recorded as such; carries the domain error the client is told."""

    def __init__(self, error: CardMcpError) -> None:
        super().__init__(error.message)
        self.error = error


class CallLimiter:
    """At most ``limit`` calls running at once per API key, in this process; one more is refused with
    limit_exceeded at once (rather than queued), so one client cannot take every database connection."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: dict[UUID, int] = {}

    @contextmanager
    def slot(self, key_id: UUID | None) -> Iterator[None]:
        if key_id is None:  # stdio: one client, one tenant
            yield
            return
        running = self._running.get(key_id, 0)
        if running >= self.limit:
            raise LimitExceeded(
                f"this API key already has {running} calls running",
                hint="Wait for your running calls to finish, then retry; send fewer calls at once.",
            )
        self._running[key_id] = running + 1
        try:
            yield
        finally:
            if self._running[key_id] == 1:
                del self._running[key_id]
            else:
                self._running[key_id] -= 1


class Call:
    """A running call as its body sees it: the tenant, the transaction (begun by the first ``transaction()``), the
    card ids it touched (for its usage row), and what the server offers (settings, semantic search, progress)."""

    def __init__(
        self,
        held: AsyncExitStack,
        caller: Caller,
        entry: UsageEntry,
        edge: Edge,
        *,
        durable: bool,
        started: float,
        progress: Progress | None,
    ) -> None:
        self.caller = caller
        self.entry = entry
        self.edge = edge
        self.durable = durable
        self._held = held  # the pooled connection is acquired into it on first use, and released with it
        self._connection: db.Connection | None = None
        self._started = started
        self._progress = progress
        self.begun = False
        self.recorded = False  # its usage row is written (or was sent in its statement): never write another
        # The hash of the arguments as sent, where a replay hook computed it (idempotency.arguments_hash), for the
        # body to store with its answer.
        self.arguments_hash: str | None = None

    @property
    def tenant_id(self) -> UUID:
        return self.caller.tenant_id

    @property
    def settings(self) -> Settings:
        return self.edge.settings

    @property
    def semantic(self) -> Semantic | None:
        """Semantic search, once its model has loaded (None until then, and when it is off)."""
        return self.edge.semantic

    @property
    def _conn(self) -> db.Connection:
        if self._connection is None:
            raise RuntimeError("this call has not taken a connection")
        return self._connection

    async def _acquire(self) -> None:
        """Take a pooled connection on first use: a call holds none while it does other work first (a search
        embeds its query before it reads), so a slow embedding never keeps a connection from other calls."""
        if self._connection is None:
            pool = self.edge.pool
            self._connection = await self._held.enter_async_context(pool.acquire(timeout=db.ACQUIRE_TIMEOUT))

    def touched(self, *card_ids: UUID) -> None:
        """Name cards this call read or wrote, for its usage row."""
        self.entry.card_ids.extend(card_ids)

    async def transaction(self) -> db.Connection:
        """The connection, inside the tenant's transaction (begun on first use)."""
        if self.recorded:
            raise RuntimeError("this call was recorded by its single statement; it has no transaction")
        await self._acquire()
        if not self.begun:
            self.begun = True  # before the await: a failed or cancelled BEGIN is rolled back all the same
            await db.begin(
                self._conn,
                self.tenant_id,
                self.settings.statement_timeout_ms,
                durable=self.durable,
                actor=self.caller.actor(),
            )
        return self._conn

    async def fetch_recorded(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """The call's whole work as one statement outside any transaction, which sets the tenant, does the work and
        writes the call's usage row, committing both: one round trip. ``sql`` takes the tenant id, then ``args``,
        then the usage row's fields (tool, client name, client version, transport, API key id, the milliseconds
        the call took before the statement, the OAuth connection id and client id). The statement decides the
        row's status; a body that then fails must raise the error the statement recorded."""
        if self.begun:
            raise RuntimeError("a recorded statement must be the call's only statement")
        await self._acquire()
        self.recorded = True  # before the await: once sent, the statement may have committed
        entry = self.entry
        elapsed_ms = (time.perf_counter() - self._started) * 1000
        # No transaction-local statement_timeout reaches a statement that is its own transaction (a SET inside the
        # function would start counting too late), and a session-level one does not survive a transaction-mode
        # pooler: asyncpg bounds it instead, and on expiry sends PostgreSQL a cancel request and answers
        # TimeoutError. None (no limit set): the pool's command_timeout.
        timeout = self.settings.statement_timeout_ms / 1000 or None
        with anyio.CancelScope(shield=True):  # it commits: its outcome must be known
            try:
                rows = await self._conn.fetch(
                    sql,
                    self.tenant_id,
                    *args,
                    entry.tool,
                    entry.client_name,
                    entry.client_version,
                    entry.transport,
                    entry.api_key_id,
                    elapsed_ms,
                    entry.connection_id,
                    entry.oauth_client_id,
                    timeout=timeout,
                )
            except asyncpg.PostgresError:  # PostgreSQL refused it (a bad value, a timeout): nothing committed, so
                self.recorded = False  # the edge records the failure
                raise
            except TimeoutError as exc:  # cancelled at the timeout: as a transaction's statement over it answers
                self.recorded = False
                raise db.too_slow() from exc
        return rows

    async def report_progress(self, done: float, total: float, message: str) -> None:
        """Progress for the client, when it asked for it (a progress token); nothing otherwise."""
        if self._progress is not None:
            await self._progress(done, total, message)

    async def _abort(self) -> None:
        if self.begun:
            await db.rollback(self._conn)

    async def _commit(self) -> None:
        """The usage row of a call that succeeded, committed with its effect (or alone, if it had none)."""
        if self.recorded:
            return
        self.entry.duration_ms = (time.perf_counter() - self._started) * 1000
        if not self.begun:  # nothing read or written: the row in a statement of its own
            await self._acquire()
            with anyio.CancelScope(shield=True):  # it commits: its outcome must be known
                await usage.record_alone(self._conn, self.tenant_id, self.entry)
            self.recorded = True
            return
        try:
            xid = await usage.record(self._conn, self.tenant_id, self.entry)
        except BaseException:
            await db.rollback(self._conn)
            raise
        try:
            await db.commit(self._conn)
        except Exception as exc:
            # Lost on the way back: the COMMIT may have happened. If it did, so did the call.
            if not db.lost_connection(exc) or not await db.committed(self.edge.pool, xid):
                raise
            logger.warning("the connection was lost after COMMIT; transaction %s committed", xid)
        self.recorded = True


_current: ContextVar[Call] = ContextVar("card_mcp_call")


def current_call() -> Call:
    """The call running in this task, for bodies the SDK dispatches itself (resources and prompts); tool bodies
    receive theirs as an argument."""
    return _current.get()


class Edge:
    """What every call runs through: the application role's pool, the settings, the per-key limiter and, once its
    model has loaded, semantic search."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.limiter = CallLimiter(settings.max_calls_per_key)
        self.semantic: Semantic | None = None

    @asynccontextmanager
    async def call(
        self, caller: Caller, name: str, *, durable: bool, progress: Progress | None = None
    ) -> AsyncIterator[Call]:
        """One call of ``name`` by ``caller``: see the module's docstring. Raises CallFailed (recorded) for any
        failure of the body or the database; a cancellation passes through, recorded."""
        entry = UsageEntry(
            tool=name,
            transport=caller.transport,
            client_name=caller.client_name,
            client_version=caller.client_version,
            api_key_id=caller.api_key_id,
            connection_id=caller.connection_id,
            oauth_client_id=caller.oauth_client_id,
        )
        started = time.perf_counter()
        call: Call | None = None
        committed = False
        try:
            with self.limiter.slot(caller.limit_key), db.translate_errors():
                async with AsyncExitStack() as held:  # the connection, once the body asks for one
                    call = Call(held, caller, entry, self, durable=durable, started=started, progress=progress)
                    token = _current.set(call)
                    try:
                        yield call
                    except BaseException:
                        await call._abort()
                        raise
                    finally:
                        _current.reset(token)
                    await call._commit()
                    committed = True
        except anyio.get_cancelled_exc_class():
            if call is None or not call.recorded:
                await self._record_failure(caller.tenant_id, entry, "cancelled", started)
            raise
        except Exception as exc:
            if committed:  # committed with its usage row; only handing the connection back failed
                logger.warning("a committed call's connection could not be returned: %r", exc)
                return
            error = domain_error(exc)
            if call is None or not call.recorded:
                await self._record_failure(caller.tenant_id, entry, error.code, started)
            raise CallFailed(error) from exc

    async def _record_failure(self, tenant_id: UUID, entry: UsageEntry, code: str, started: float) -> None:
        """A failed call's usage row, in a transaction of its own after the rollback (one statement); shielded from
        cancellation (a call cancelled now still leaves its row) and bounded in time."""
        entry.status, entry.error_code = "error", code
        entry.duration_ms = (time.perf_counter() - started) * 1000
        entry.card_ids = []  # nothing was read or written
        with anyio.move_on_after(RECORD_TIMEOUT, shield=True) as bound:
            try:
                with db.translate_errors():
                    async with self.pool.acquire(timeout=RECORD_TIMEOUT) as conn:
                        await usage.record_alone(conn, tenant_id, entry)
            except Exception:  # the caller still gets its error in the fixed shape
                logger.exception("could not record the failed call of %s (%s)", entry.tool, code)
        if bound.cancelled_caught:
            logger.error("gave up recording the failed call of %s (%s) after %ss", entry.tool, code, RECORD_TIMEOUT)


def domain_error(exc: BaseException) -> CardMcpError:
    """What a failed call tells the client. The one place where any failure becomes a domain error: card-mcp's own
    errors as they are (also when the SDK wrapped them), database errors as db.domain_error says, and anything
    else as ``internal``, logged here with its traceback."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, CardMcpError):  # the SDK wraps what a body raises
        cause = cause.__cause__
    if cause is not None:
        return cause
    translated = db.domain_error(exc.__cause__ if exc.__cause__ is not None else exc) or db.domain_error(exc)
    if translated is not None:
        return translated
    logger.error("call failed unexpectedly", exc_info=exc)
    return Internal("the call failed inside card-mcp")
