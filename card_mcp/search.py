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

import asyncpg

from .cards import CARD
from .db import Connection
from .errors import InvalidArgument, Unavailable
from .models import CardType, ScoredCard

# One page of any search (schema/0014_search_postings.sql, card_mcp.search_page: a listing without words, a
# ranking with them (card_mcp.search_lexical, 0022), hybrid with a query vector too), best first, each hit marked
# kept when it belongs to this page; one more row, unkept, when more exist; each row with the words looked up as
# typos, for the cursor to pin. Each hit's card by one probe of the primary key (a lateral subquery: a join the
# planner could hash reads every card of a small tenant).
_PAGE = f"""
SELECT {CARD}, p.score, p.kept, p.typos
  FROM card_mcp.search_page($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
       WITH ORDINALITY AS p(hit, score, kept, typos, n)
 CROSS JOIN LATERAL (SELECT {CARD} FROM card_mcp.cards WHERE id = p.hit OFFSET 0) AS c
 ORDER BY p.n
"""  # noqa: S608 - only CARD is interpolated
# search_cards as a whole call in one statement, for calls.Call.fetch_recorded: the tenant set, the page ranked,
# the call's usage row written naming the cards of the page, all committed; the rows of _PAGE, but the row after
# the page (which only says that more exist) has no card.
SEARCH_CARDS_CALL = (
    "SELECT * FROM card_mcp.search_cards_call("
    "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)"
)
EXACT_VECTORS = 5000  # a tenant with at most this many vectors is searched exactly (as in search_page)
NEAREST = 200  # a big tenant's vector candidates beyond the cards already served and this page


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


def vector_text(vector: Sequence[float]) -> str:
    """A query vector as pgvector reads it: each number to 9 significant digits, which reads back as the same
    float32 (the model's numbers are float32, and pgvector reads each with strtof), so the same halfvec as
    json.dumps's 17 digits gives; in a quarter of its time (0.09 against 0.3 ms for 384 numbers) and 40% fewer bytes."""
    return "[" + ",".join([f"{x:.9g}" for x in vector]) + "]"


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


def _decode_cursor(cursor: str, pinned: dict[str, Any]) -> tuple[float, datetime, UUID, int, list[int] | None]:
    try:
        data = _read_cursor(cursor)
        score, stamp, card_id = data.pop("after")
        served = int(data.pop("n", 0))
        typos = data.pop("z", None)  # the words the first page looked up as typos: positions 1-16, as it made them
        if typos is not None and not (
            isinstance(typos, list) and len(typos) <= 16 and all(type(k) is int and 1 <= k <= 16 for k in typos)
        ):
            raise ValueError("not a list of word positions")
        position = float(score), datetime.fromisoformat(stamp), UUID(card_id), max(served, 0), typos
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


@dataclass(frozen=True)
class Plan:
    """A search read from its arguments: the search_page arguments, and what its cursor pins."""

    args: tuple[Any, ...]
    pinned: dict[str, Any]


def plan(
    *,
    query: str | None = None,
    card_type: CardType | None = None,
    tags: Sequence[str] | None = None,
    limit: int = 10,
    cursor: str | None = None,
    nearest: Nearest | None = None,
    max_bytes: int = MAX_PAGE_BYTES,
) -> Plan:
    """The search as card_mcp.search_page takes it; InvalidArgument for a cursor this server did not make or made
    for other arguments, Unavailable for a semantic search's cursor while semantic search is not running."""
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
    score, updated_at, after_id, served, typos = (
        _decode_cursor(cursor, pinned) if cursor else (None, None, None, 0, None)
    )
    wanted = list(tags) if tags else None
    semantic: tuple[Any, ...] = (None, None, None, None, None)
    if hybrid:
        assert nearest is not None
        pinned["n"] = served
        semantic = (
            vector_text(nearest.vector),
            nearest.model,
            nearest.floor,
            nearest.ceiling,
            served + limit + NEAREST,
        )
    after = (score, None, after_id) if words else (None, updated_at, after_id)
    return Plan((words, card_type, wanted, *after, limit, max_bytes, *semantic, typos), pinned)


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
    tags (all must match); with ``nearest`` (semantic search), ranked by words and the query's vector. Returns up
    to ``limit + 1`` hits, so the caller can tell whether more exist, and the arguments a cursor must pin."""
    planned = plan(query=query, card_type=card_type, tags=tags, limit=limit, cursor=cursor, nearest=nearest)
    rows = await conn.fetch(_PAGE, *planned.args)
    return [to_hit(row) for row in rows], _pin_typos(rows, planned.pinned)


def to_hit(row: asyncpg.Record) -> ScoredCard:
    return ScoredCard.model_validate({k: v for k, v in row.items() if k not in ("kept", "typos")})


def _pin_typos(rows: Sequence[asyncpg.Record], pinned: dict[str, Any]) -> dict[str, Any]:
    """``pinned`` with the words the page looked up as typos, which the next page must look up alike (whether a
    word looks misspelt depends on the tenant's other cards, which may change between pages)."""
    if rows and rows[0]["typos"] is not None:
        return {**pinned, "z": list(rows[0]["typos"])}
    return pinned


def page_of(rows: Sequence[asyncpg.Record], pinned: dict[str, Any]) -> Page:
    """The page card_mcp.search_page marked (its kept rows), and the cursor of the next when more exist."""
    pinned = _pin_typos(rows, pinned)
    kept = [to_hit(row) for row in rows if row["kept"]]
    more = len(kept) < len(rows)
    if more and "n" in pinned:  # a hybrid search counts the cards served, for its candidates' depth
        pinned = {**pinned, "n": pinned["n"] + len(kept)}
    return Page(kept, encode_cursor(pinned, kept[-1]) if more else None)
