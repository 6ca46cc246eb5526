"""Card queries: each SQL text beside the one function that runs it.

Every function takes a connection inside ``db.tenant_transaction``: row-level security limits each statement
to that tenant, so no query here filters by tenant itself (inserts name it, and WITH CHECK verifies it).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg

from .db import Connection
from .errors import Conflict, DuplicateContent, InvalidArgument, NotFound, Unavailable
from .models import DEFAULT_MAX_CONTENT_BYTES, Card, CardType, NewCard, ScoredCard, content_hash, encode_content
from .usage import UsageEntry

CreateStatus = Literal["created", "existing"]


def _card(row: asyncpg.Record) -> Card:
    return Card.model_validate(dict(row))


def _not_found(card_id: UUID) -> NotFound:
    return NotFound(f"no card with id {card_id}")


_INSERT = """
INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, tags, content_hash)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (tenant_id, card_type, content_hash) WHERE is_active DO NOTHING
RETURNING id, card_type, title, content, tags, version, content_hash, created_at, updated_at
"""
_FIND_ACTIVE = """
SELECT id, card_type, title, content, tags, version, content_hash, created_at, updated_at
  FROM card_mcp.cards
 WHERE card_type = $1 AND content_hash = $2 AND is_active
"""


async def create_card(
    conn: Connection, tenant_id: UUID, new: NewCard, *, max_bytes: int = DEFAULT_MAX_CONTENT_BYTES
) -> tuple[CreateStatus, Card]:
    """Save ``new``, or return the active card of the same type and content (``existing``), writing nothing.

    Concurrent creates of one content make one card: the loser's INSERT waits for the winner and does
    nothing; its next statement (a fresh snapshot under READ COMMITTED) then sees the winner's row."""
    digest = content_hash(new.content, max_bytes=max_bytes)
    for _ in range(5):
        row = await conn.fetchrow(_INSERT, tenant_id, new.card_type, new.title, new.content, new.tags, digest)
        if row is not None:
            return "created", _card(row)
        row = await conn.fetchrow(_FIND_ACTIVE, new.card_type, digest)
        if row is not None:
            return "existing", _card(row)
        # The conflicting card was deleted or its transaction rolled back in between: try again.
    raise Conflict("the card changed concurrently several times", hint="Retry the call.")


_GET = """
SELECT id, card_type, title, content, tags, version, content_hash, created_at, updated_at
  FROM card_mcp.cards
 WHERE id = $1 AND is_active
"""


async def get_card(conn: Connection, card_id: UUID) -> Card:
    """The active card ``card_id``; NotFound alike for a missing, deleted or another tenant's card."""
    row = await conn.fetchrow(_GET, card_id)
    if row is None:
        raise _not_found(card_id)
    return _card(row)


# The same read as a whole call: sets the tenant, reads, and writes the usage row (schema/0005_calls.sql).
_GET_RECORDED = "SELECT * FROM card_mcp.get_card_call($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"  # OAuth (#23): 10


async def get_card_recorded(
    conn: Connection, tenant_id: UUID, card_id: UUID, entry: UsageEntry, started: float
) -> Card:
    """get_card as a call's only statement, outside any transaction: one round trip that also commits the call's
    usage row (``ok``, or ``not_found`` before NotFound is raised); ``entry`` is marked recorded. ``started`` is
    the call's perf_counter start. Its time limit is the pool's command timeout, as for a COMMIT."""
    elapsed_ms = (time.perf_counter() - started) * 1000
    rows = await conn.fetch(
        _GET_RECORDED,
        tenant_id,
        card_id,
        entry.tool,
        entry.client_name,
        entry.client_version,
        entry.transport,
        entry.api_key_id,
        elapsed_ms,
        entry.connection_id,  # OAuth (#23)
        entry.oauth_client_id,
    )
    entry.mark_recorded()
    if not rows:
        entry.status, entry.error_code = "error", "not_found"
        raise _not_found(card_id)
    return _card(rows[0])


# No words: the newest-updated first, keyset-paged on (updated_at, id); every card scores 0.
_LIST = """
SELECT id, card_type, title, content, tags, version, content_hash, created_at, updated_at, 0::float8 AS score
  FROM card_mcp.cards
 WHERE is_active
   AND ($1::text IS NULL OR card_type = $1)
   AND ($2::text[] IS NULL OR tags @> $2)
   AND ($3::timestamptz IS NULL OR (updated_at, id) < ($3, $4))
 ORDER BY updated_at DESC, id DESC
 LIMIT $5
"""
# Words: ranked by card_mcp.search_cards (see schema/0004_search.sql), which pages on (score, id) and returns ids
# of the tenant set in this transaction; the cards themselves are read here, under this role's own policy.
_RANKED = """
SELECT c.id, c.card_type, c.title, c.content, c.tags, c.version, c.content_hash, c.created_at, c.updated_at,
       s.score
  FROM card_mcp.search_cards($1, $2, $3, $4, $5, $6) AS s
  JOIN card_mcp.cards AS c ON c.id = s.id
 WHERE c.is_active
 ORDER BY s.score DESC, c.id DESC
"""


# Words and the query's vector (semantic search): a card's score is 0.2 x its lexical score (card_mcp.search_cards,
# full-text and trigram, in [0, 1]) + 0.8 x its cosine similarity to the query, scaled from the model's floor..ceiling
# ($6, $7) to 0..1; candidates are the lexical matches (the best 10,000) and the 200 cards nearest the query (HNSW
# index; row-level security keeps the tenant's, the iterative scan reads on until 200 are found) above the floor.
# Ties break by id. Like the lexical score, the fused one depends only on the query and the card, so keyset paging
# on (score, id) never serves a card twice while others are written. (Reciprocal rank fusion was measured first;
# it ranks a card against the others, which breaks that paging rule, and it did no better: docs/benchmarks.md.)
_HYBRID = """
WITH lexical AS (
    SELECT s.id, s.score FROM card_mcp.search_cards($1, $2, $3, NULL, NULL, 10000) AS s
), nearest AS (
    SELECT n.id, n.similarity
      FROM (SELECT c.id, 1 - (v.embedding OPERATOR(card_mcp.<=>) $4::text::card_mcp.halfvec) AS similarity
              FROM card_mcp.card_vectors AS v
              JOIN card_mcp.cards AS c ON c.tenant_id = v.tenant_id AND c.id = v.card_id
             WHERE c.is_active AND v.model = $5
               AND ($2::text IS NULL OR c.card_type = $2)
               AND ($3::text[] IS NULL OR c.tags @> $3)
             ORDER BY v.embedding OPERATOR(card_mcp.<=>) $4::text::card_mcp.halfvec
             LIMIT 200) AS n
     WHERE n.similarity > $6
), fused AS (
    SELECT id,
           (0.2 * coalesce(l.score, 0)
            + 0.8 * least(greatest((coalesce(n.similarity, 0) - $6) / ($7 - $6), 0), 1))::float8 AS score
      FROM lexical AS l FULL JOIN nearest AS n USING (id)
)
SELECT c.id, c.card_type, c.title, c.content, c.tags, c.version, c.content_hash, c.created_at, c.updated_at,
       f.score
  FROM fused AS f
  JOIN card_mcp.cards AS c ON c.id = f.id
 WHERE c.is_active AND ($8::float8 IS NULL OR (f.score, c.id) < ($8, $9))
 ORDER BY f.score DESC, c.id DESC
 LIMIT $10
"""
# The HNSW index under a filter (row-level security, type, tags): keep scanning until the page is full.
_NEAREST_SETTINGS = (
    "SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true), set_config('hnsw.ef_search', '100', true)"
)


@dataclass(frozen=True)
class Nearest:
    """A search query's embedding, the model that made it (only its vectors are compared), and the cosine
    similarities that model gives an unrelated card (floor) and a close paraphrase (ceiling)."""

    model: str
    vector: list[float]
    floor: float
    ceiling: float


@dataclass(frozen=True)
class Page:
    """One page of hits and the cursor of the next (None on the last page)."""

    cards: list[ScoredCard]
    next_cursor: str | None


MAX_PAGE_BYTES = 100 * 1024


def paginate(hits: list[ScoredCard], pinned: dict[str, Any], limit: int, *, max_bytes: int = MAX_PAGE_BYTES) -> Page:
    """At most ``limit`` hits and about ``max_bytes`` of JSON (always at least one hit); a cursor when more
    exist, so nothing is cut silently."""
    kept: list[ScoredCard] = []
    size = 0
    for hit in hits[:limit]:
        size += len(hit.model_dump_json()) + 1
        if kept and size > max_bytes:
            break
        kept.append(hit)
    more = len(kept) < len(hits)
    return Page(kept, encode_cursor(pinned, kept[-1]) if more else None)


def _words(query: str | None) -> str:
    """The query's words as the search function reads them (lower case, letters and digits), space-separated;
    empty when there are none, which lists instead of ranking."""
    return " ".join(word for word in re.split(r"[\W_]+", (query or "").lower()) if word)


def encode_cursor(pinned: dict[str, Any], last: ScoredCard) -> str:
    """An opaque cursor: the search it belongs to, and the position after ``last``."""
    raw = json.dumps({**pinned, "after": [last.score, last.updated_at.isoformat(), str(last.id)]})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def has_words(query: str | None) -> bool:
    """Whether ``query`` has a word to search for (else search_cards lists)."""
    return bool(_words(query))


def semantic_cursor(cursor: str) -> bool:
    """Whether ``cursor`` continues a semantic search (False for a lexical one and for garbage, which
    search_cards refuses)."""
    try:
        earlier = _read_cursor(cursor)
    except InvalidArgument:
        return False
    return isinstance(earlier, dict) and earlier.get("m") is not None


def _read_cursor(cursor: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidArgument(
            "the cursor is not one this server made", hint="Pass next_cursor exactly as returned, or omit it."
        ) from exc


def _decode_cursor(cursor: str, pinned: dict[str, Any]) -> tuple[float, datetime, UUID]:
    try:
        data = _read_cursor(cursor)
        score, stamp, card_id = data.pop("after")
        position = float(score), datetime.fromisoformat(stamp), UUID(card_id)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise InvalidArgument(
            "the cursor is not one this server made", hint="Pass next_cursor exactly as returned, or omit it."
        ) from exc
    if data != pinned:
        raise InvalidArgument(
            "the cursor belongs to a search with other arguments",
            hint="Repeat the same query, card_type and tags with the cursor, or start again without it.",
        )
    return position


async def search_cards(
    conn: Connection,
    *,
    query: str | None = None,
    card_type: CardType | None = None,
    tags: Sequence[str] | None = None,
    limit: int = 10,
    cursor: str | None = None,
    nearest: Nearest | None = None,
) -> tuple[list[ScoredCard], dict[str, Any]]:
    """Active cards matching ``query`` best first (newest-updated first without one), filtered by type and by
    tags (all must match); with ``nearest`` (semantic search), ranked by lexical and vector rankings fused.
    Returns up to ``limit + 1`` hits, so the caller can tell whether more exist, and the arguments a cursor must
    pin."""
    words = _words(query)
    pinned: dict[str, Any] = {"q": words, "t": card_type, "g": sorted(tags) if tags else None}
    hybrid = bool(words) and nearest is not None
    if cursor:  # a search goes on the way its first page was ranked
        earlier = _read_cursor(cursor)
        hybrid = isinstance(earlier, dict) and earlier.get("m") is not None
        if hybrid and (nearest is None or earlier.get("m") != nearest.model):
            raise Unavailable(
                "the cursor belongs to a semantic search this server cannot go on with now",
                hint="Retry shortly (the server may be starting), or search again without the cursor.",
            )
    if hybrid:
        assert nearest is not None
        pinned["m"] = nearest.model
    score, updated_at, after_id = _decode_cursor(cursor, pinned) if cursor else (None, None, None)
    wanted = list(tags) if tags else None
    if hybrid:
        assert nearest is not None
        await conn.execute(_NEAREST_SETTINGS)
        vector = json.dumps(nearest.vector)
        args = (words, card_type, wanted, vector, nearest.model, nearest.floor, nearest.ceiling, score, after_id)
        rows = await conn.fetch(_HYBRID, *args, limit + 1)
    elif words:
        rows = await conn.fetch(_RANKED, words, card_type, wanted, score, after_id, limit + 1)
    else:
        rows = await conn.fetch(_LIST, card_type, wanted, updated_at, after_id, limit + 1)
    return [ScoredCard.model_validate(dict(row)) for row in rows], pinned


_LOCK = """
SELECT id, card_type, title, content, tags, version, content_hash, created_at, updated_at
  FROM card_mcp.cards
 WHERE id = $1 AND is_active
   FOR UPDATE
"""
_OTHER_WITH_CONTENT = """
SELECT id FROM card_mcp.cards WHERE card_type = $1 AND content_hash = $2 AND is_active AND id <> $3
"""
_UPDATE = """
UPDATE card_mcp.cards
   SET title = $2, content = $3, tags = $4, content_hash = $5, version = version + 1
 WHERE id = $1 AND is_active
RETURNING id, card_type, title, content, tags, version, content_hash, created_at, updated_at
"""


async def update_card(
    conn: Connection,
    card_id: UUID,
    *,
    title: str | None = None,
    content: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    expected_version: int | None = None,
    max_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
) -> Card:
    """Change the fields given (None leaves one as it is). An update that changes nothing returns the card
    as it is, without a new version. A stale ``expected_version`` is a Conflict; content equal to another
    active card of the type is DuplicateContent naming that card."""
    row = await conn.fetchrow(_LOCK, card_id)
    if row is None:
        raise _not_found(card_id)
    card = _card(row)
    if expected_version is not None and expected_version != card.version:
        raise Conflict(
            f"the card is at version {card.version}, not {expected_version}",
            hint="Read the card again with get_card, reapply your change, and pass its current version.",
        )
    new_title = card.title if title is None else title
    new_content = card.content if content is None else content
    new_tags = card.tags if tags is None else tags
    digest = card.content_hash if content is None else content_hash(content, max_bytes=max_bytes)
    if (new_title, digest, new_tags) == (card.title, card.content_hash, card.tags):
        return card
    if digest != card.content_hash:
        other = await conn.fetchval(_OTHER_WITH_CONTENT, card.card_type, digest, card_id)
        if other is not None:
            raise DuplicateContent(
                f"card {other} of type {card.card_type} already has this content", card_id=str(other)
            )
    try:
        updated = await conn.fetchrow(_UPDATE, card_id, new_title, new_content, new_tags, digest)
    except asyncpg.UniqueViolationError as exc:  # another call saved the same content meanwhile
        raise DuplicateContent(
            f"another card of type {card.card_type} got this content meanwhile",
            hint="Search for the card with this content and update that one instead.",
        ) from exc
    assert updated is not None  # the row is locked FOR UPDATE
    return _card(updated)


_DELETE = """
UPDATE card_mcp.cards SET is_active = false, deleted_at = now()
 WHERE id = $1 AND is_active
RETURNING deleted_at
"""


async def delete_card(conn: Connection, card_id: UUID) -> datetime:
    """Soft-delete: the card becomes invisible to every tool but stays for audit. Returns ``deleted_at``."""
    deleted_at: datetime | None = await conn.fetchval(_DELETE, card_id)
    if deleted_at is None:
        raise _not_found(card_id)
    return deleted_at


_INSERT_MANY = """
INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, tags, content_hash)
SELECT $1, b.card_type, b.title, b.content::jsonb, ARRAY(SELECT jsonb_array_elements_text(b.tags::jsonb)),
       b.content_hash
  FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
       AS b(card_type, title, content, tags, content_hash)
ON CONFLICT (tenant_id, card_type, content_hash) WHERE is_active DO NOTHING
RETURNING id, card_type, content_hash
"""
_FIND_MANY = """
SELECT id, card_type, content_hash FROM card_mcp.cards
 WHERE is_active AND (card_type, content_hash) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""


@dataclass(frozen=True)
class BatchItem:
    """The outcome for one card of a batch, by its index in the request."""

    index: int
    status: CreateStatus
    card_id: UUID


def encode_cards(new_cards: Sequence[NewCard], *, max_bytes: int = DEFAULT_MAX_CONTENT_BYTES) -> list[tuple[str, str]]:
    """Each card's canonical content JSON and hash (see models.encode_content); an error names the card's index."""
    encoded = []
    for index, new in enumerate(new_cards):
        try:
            encoded.append(encode_content(new.content, max_bytes=max_bytes, validated=True))
        except InvalidArgument as exc:
            raise InvalidArgument(f"cards[{index}]: {exc.message}", hint=exc.hint) from exc
    return encoded


async def insert_cards(
    conn: Connection,
    tenant_id: UUID,
    new_cards: Sequence[NewCard],
    encoded: Sequence[tuple[str, str]] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
    chunk_size: int = 250,
    on_progress: Callable[[int, int], Awaitable[None]] | None = None,
) -> list[BatchItem]:
    """Insert many cards with bulk statements, within the caller's transaction (so all or none).

    Every card is checked before anything is written (``encoded``: encode_cards of these cards, if the caller
    has it already); an error names the index of the bad card. A card equal to an earlier one of the batch is
    ``existing`` with the earlier one's id; one equal to a stored active card is ``existing`` with that card's
    id."""
    if encoded is None:
        encoded = encode_cards(new_cards, max_bytes=max_bytes)
    digests = [digest for _, digest in encoded]
    first: dict[tuple[str, str], int] = {}
    for index, new in enumerate(new_cards):
        first.setdefault((new.card_type, digests[index]), index)
    # Inserted in (type, hash) order: two batches sharing cards wait for each other in one order, never in a
    # cycle (which PostgreSQL would break by aborting one as a deadlock).
    unique = [first[key] for key in sorted(first)]
    ids: dict[tuple[str, str], UUID] = {}
    created: set[tuple[str, str]] = set()
    for start in range(0, len(unique), chunk_size):
        chunk = unique[start : start + chunk_size]
        rows = await conn.fetch(
            _INSERT_MANY,
            tenant_id,
            [new_cards[i].card_type for i in chunk],
            [new_cards[i].title for i in chunk],
            [encoded[i][0] for i in chunk],  # the canonical JSON text, serialized once
            [json.dumps(new_cards[i].tags) for i in chunk],  # JSON text: a list of lists would be a 2-D array
            [digests[i] for i in chunk],
        )
        for row in rows:
            key = (row["card_type"], row["content_hash"])
            ids[key] = row["id"]
            created.add(key)
        missing = [
            (new_cards[i].card_type, digests[i]) for i in chunk if (new_cards[i].card_type, digests[i]) not in ids
        ]
        if missing:
            found = await conn.fetch(_FIND_MANY, [m[0] for m in missing], [m[1] for m in missing])
            for row in found:
                ids[(row["card_type"], row["content_hash"])] = row["id"]
            if any(m not in ids for m in missing):
                raise Conflict("cards of this batch changed concurrently", hint="Retry the whole batch.")
        if on_progress is not None:
            await on_progress(min(start + chunk_size, len(unique)), len(unique))
    results = []
    for index, new in enumerate(new_cards):
        key = (new.card_type, digests[index])
        status: CreateStatus = "created" if key in created and first[key] == index else "existing"
        results.append(BatchItem(index, status, ids[key]))
    return results
