"""Search: ranked (words), hybrid (words and the query's embedding, where semantic search is on) or a listing
(no words), keyset-paged by an opaque cursor that pins the search; each SQL text beside the function that runs it.

Like cards.py, every function takes a connection inside a call's tenant transaction: row-level security limits
every statement to that tenant. A hit's score depends only on the query and that card, so paging never serves a
card twice while others are written (SPEC section 3).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from .cards import CARD
from .db import Connection
from .errors import InvalidArgument, Unavailable
from .models import CardType, ScoredCard

# No words: the newest-updated first, keyset-paged on (updated_at, id); every card scores 0.
_LIST = f"""
SELECT {CARD}, 0::float8 AS score
  FROM card_mcp.cards
 WHERE is_active
   AND ($1::text IS NULL OR card_type = $1)
   AND ($2::text[] IS NULL OR tags @> $2)
   AND ($3::timestamptz IS NULL OR (updated_at, id) < ($3, $4))
 ORDER BY updated_at DESC, id DESC
 LIMIT $5
"""  # noqa: S608 - only CARD is interpolated
# Words: ranked by card_mcp.search_cards (see schema/0004_search.sql), which pages on (score, id) and returns ids
# of the tenant set in this transaction; the cards themselves are read here, under this role's own policy.
_RANKED = f"""
SELECT {CARD}, score
  FROM card_mcp.search_cards($1, $2, $3, $4, $5, $6) AS s
  JOIN card_mcp.cards AS c USING (id)
 WHERE c.is_active
 ORDER BY score DESC, id DESC
"""  # noqa: S608 - only CARD is interpolated


# Words and the query's vector (semantic search): a card's score is 0.2 x its lexical score (card_mcp.search_cards,
# in [0, 1]) + 0.8 x its own vector's cosine similarity to the query, scaled from the model's floor..ceiling ($6, $7)
# to 0..1: a function of the query and the card alone, so keyset paging on (score, id) never serves a card twice.
# Candidates: every lexical match (uncapped), and the cards whose vectors are above the floor. A tenant with at most
# EXACT_VECTORS vectors compares every one of them (exact; a few thousand take a millisecond or two); a bigger one
# takes its $11 nearest through the HNSW index, whose iterative scan reads on (with no scan budget: the settings
# below) until that many of the tenant's own are found, so other tenants' vectors never starve it; $11 grows with
# the pages already served (the cursor counts them), so page N never runs out of candidates page 1 had.
EXACT_VECTORS = 5000
NEAREST = 200  # the vector candidates of a big tenant beyond the cards already served and this page
_HYBRID = f"""
WITH lexical AS (
    SELECT s.id, s.score FROM card_mcp.search_cards($1, $2, $3, NULL, NULL, NULL) AS s
), few AS (
    SELECT count(*) <= {EXACT_VECTORS} AS yes
      FROM (SELECT FROM card_mcp.card_vectors LIMIT {EXACT_VECTORS + 1}) AS v
), exact AS (
    SELECT v.card_id AS id
      FROM card_mcp.card_vectors AS v
     WHERE (SELECT yes FROM few) AND v.model = $5
       AND 1 - (v.embedding OPERATOR(card_mcp.<=>) $4::text::card_mcp.halfvec) > $6
), nearest AS (
    SELECT n.id
      FROM (SELECT c.id, 1 - (v.embedding OPERATOR(card_mcp.<=>) $4::text::card_mcp.halfvec) AS similarity
              FROM card_mcp.card_vectors AS v
              JOIN card_mcp.cards AS c ON c.tenant_id = v.tenant_id AND c.id = v.card_id
             WHERE NOT (SELECT yes FROM few) AND c.is_active AND v.model = $5
               AND ($2::text IS NULL OR c.card_type = $2)
               AND ($3::text[] IS NULL OR c.tags @> $3)
             ORDER BY v.embedding OPERATOR(card_mcp.<=>) $4::text::card_mcp.halfvec
             LIMIT $11) AS n
     WHERE n.similarity > $6
), candidates AS (
    SELECT id FROM lexical UNION SELECT id FROM exact UNION SELECT id FROM nearest
), fused AS (
    SELECT k.id,
           (0.2 * coalesce(l.score, 0)
            + 0.8 * least(greatest((coalesce(1 - (v.embedding OPERATOR(card_mcp.<=>) $4::text::card_mcp.halfvec), 0)
                                    - $6) / ($7 - $6), 0), 1))::float8 AS score
      FROM candidates AS k
      LEFT JOIN lexical AS l ON l.id = k.id
      LEFT JOIN card_mcp.card_vectors AS v ON v.card_id = k.id AND v.model = $5
)
SELECT {{CARD}}, score
  FROM fused AS f
  JOIN card_mcp.cards AS c USING (id)
 WHERE c.is_active AND ($8::float8 IS NULL OR (score, id) < ($8, $9))
   AND ($2::text IS NULL OR c.card_type = $2)
   AND ($3::text[] IS NULL OR c.tags @> $3)
 ORDER BY score DESC, id DESC
 LIMIT $10
""".replace("{CARD}", CARD)  # noqa: S608 - only constants are interpolated
# The HNSW index under a filter (row-level security, type, tags): keep scanning until the page is full, with no
# budget of tuples (pgvector's default, 20,000, would stop short for a tenant among a million other vectors).
_NEAREST_SETTINGS = (
    "SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true), set_config('hnsw.ef_search', '100', true),"
    " set_config('hnsw.max_scan_tuples', '2147483647', true)"
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
    if more and "n" in pinned:  # a hybrid search counts the cards served, for its candidates' depth
        pinned = {**pinned, "n": pinned["n"] + len(kept)}
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


def _decode_cursor(cursor: str, pinned: dict[str, Any]) -> tuple[float, datetime, UUID, int]:
    try:
        data = _read_cursor(cursor)
        score, stamp, card_id = data.pop("after")
        served = int(data.pop("n", 0))
        position = float(score), datetime.fromisoformat(stamp), UUID(card_id), max(served, 0)
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
    score, updated_at, after_id, served = _decode_cursor(cursor, pinned) if cursor else (None, None, None, 0)
    wanted = list(tags) if tags else None
    if hybrid:
        assert nearest is not None
        await conn.execute(_NEAREST_SETTINGS)
        vector = json.dumps(nearest.vector)
        args = (words, card_type, wanted, vector, nearest.model, nearest.floor, nearest.ceiling, score, after_id)
        rows = await conn.fetch(_HYBRID, *args, limit + 1, served + limit + NEAREST)
        pinned["n"] = served
    elif words:
        rows = await conn.fetch(_RANKED, words, card_type, wanted, score, after_id, limit + 1)
    else:
        rows = await conn.fetch(_LIST, card_type, wanted, updated_at, after_id, limit + 1)
    return [ScoredCard.model_validate(dict(row)) for row in rows], pinned
