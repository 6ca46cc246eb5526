"""Card queries: each SQL text beside the one function that runs it (search has its own module, search.py).

Every function takes a connection inside a call's tenant transaction (calls.Call.transaction): row-level security
limits each statement to that tenant, so no query here filters by tenant itself (inserts name it, and WITH CHECK
verifies it). Every query that returns cards returns the columns of CARD, read by ``to_card``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg

from .db import Connection
from .errors import Conflict, DuplicateContent, InvalidArgument, NotFound
from .jsonb import LossyContent
from .models import DEFAULT_MAX_CONTENT_BYTES, Card, NewCard, content_hash, encode_content, key_order

CreateStatus = Literal["created", "existing"]

# The card as every tool returns it (models.Card): the one column list of every query that reads cards. Queries
# interpolate this constant and nothing else (hence their `noqa: S608`).
CARD = "id, card_type, title, content, tags, version, content_hash, created_at, updated_at"


def to_card(row: asyncpg.Record) -> Card:
    """The Card of a row with the columns of CARD."""
    return Card.model_validate(dict(row))


def not_found(card_id: UUID) -> NotFound:
    return NotFound(f"no card with id {card_id}")


_INSERT = f"""
INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, tags, content_hash, key_order)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (tenant_id, card_type, content_hash) WHERE is_active DO NOTHING
RETURNING {CARD}
"""  # noqa: S608 - only CARD is interpolated
_FIND_ACTIVE = f"""
SELECT {CARD}
  FROM card_mcp.cards
 WHERE card_type = $1 AND content_hash = $2 AND is_active
"""  # noqa: S608 - only CARD is interpolated


async def create_card(
    conn: Connection, tenant_id: UUID, new: NewCard, *, max_bytes: int = DEFAULT_MAX_CONTENT_BYTES
) -> tuple[CreateStatus, Card]:
    """Save ``new``, or return the active card of the same type and content (``existing``), writing nothing.

    Concurrent creates of one content make one card: the loser's INSERT waits for the winner and does
    nothing; its next statement (a fresh snapshot under READ COMMITTED) then sees the winner's row."""
    digest = content_hash(new.content, max_bytes=max_bytes)
    for _ in range(5):
        row = await conn.fetchrow(
            _INSERT, tenant_id, new.card_type, new.title, new.content, new.tags, digest, key_order(new.content)
        )
        if row is not None:
            return "created", to_card(row)
        row = await conn.fetchrow(_FIND_ACTIVE, new.card_type, digest)
        if row is not None:
            return "existing", to_card(row)
        # The conflicting card was deleted or its transaction rolled back in between: try again.
    raise Conflict("the card changed concurrently several times", hint="Retry the call.")


# get_card as a whole call in one statement (schema/0005_calls.sql), for calls.Call.fetch_recorded: the tenant set,
# the active card read (no row when there is none for this tenant) and the call's usage row written, `ok` with the
# card's id or `not_found`.
GET_CARD_CALL = "SELECT * FROM card_mcp.get_card_call($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"

_GET = f"""
SELECT {CARD}
  FROM card_mcp.cards
 WHERE id = $1 AND is_active
"""  # noqa: S608 - only CARD is interpolated


async def get_card(conn: Connection, card_id: UUID) -> Card:
    """The active card ``card_id``; NotFound alike for a missing, deleted or another tenant's card."""
    row = await conn.fetchrow(_GET, card_id)
    if row is None:
        raise not_found(card_id)
    return to_card(row)


_LOCK = f"""
SELECT {CARD}
  FROM card_mcp.cards
 WHERE id = $1 AND is_active
   FOR UPDATE
"""  # noqa: S608 - only CARD is interpolated
_OTHER_WITH_CONTENT = """
SELECT id FROM card_mcp.cards WHERE card_type = $1 AND content_hash = $2 AND is_active AND id <> $3
"""
_UPDATE = f"""
UPDATE card_mcp.cards
   SET title = $2, content = $3, tags = $4, content_hash = $5, key_order = coalesce($6, key_order),
       version = version + 1
 WHERE id = $1 AND is_active
RETURNING {CARD}
"""  # noqa: S608 - only CARD is interpolated


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
        raise not_found(card_id)
    if content is None and isinstance(row["content"], LossyContent):
        raise InvalidArgument(
            "this card's stored content cannot be read back exactly, so it cannot be kept as it is",
            hint="Send the card's content along with your change (it replaces what is stored).",
        )
    card = to_card(row)
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
    order = None if content is None else key_order(content)  # the written order of content sent, else as stored
    try:
        updated = await conn.fetchrow(_UPDATE, card_id, new_title, new_content, new_tags, digest, order)
    except asyncpg.UniqueViolationError as exc:  # another call saved the same content meanwhile
        raise DuplicateContent(
            f"another card of type {card.card_type} got this content meanwhile",
            hint="Search for the card with this content and update that one instead.",
        ) from exc
    assert updated is not None  # the row is locked FOR UPDATE
    return to_card(updated)


_DELETE = """
UPDATE card_mcp.cards SET is_active = false, deleted_at = now(), version = version + 1
 WHERE id = $1 AND is_active
RETURNING deleted_at
"""
# A statement of its own, after _DELETE found nothing: its snapshot sees a delete that committed while _DELETE
# waited for the row (two agents retrying the same delete at once).
_DELETED_AT = "SELECT deleted_at FROM card_mcp.cards WHERE id = $1 AND NOT is_active"


async def delete_card(conn: Connection, card_id: UUID) -> datetime:
    """Soft-delete: the card becomes invisible to every tool but its history and restore_card, and its version counts
    up (the delete is a version of its history). Returns ``deleted_at``; for a card of this tenant deleted already,
    its original ``deleted_at`` (a retried delete is answered as the first was, which is what the tool's
    idempotentHint promises, and writes no second version). NotFound when the tenant has no such card."""
    deleted_at: datetime | None = await conn.fetchval(_DELETE, card_id)
    if deleted_at is None:
        deleted_at = await conn.fetchval(_DELETED_AT, card_id)
    if deleted_at is None:
        raise not_found(card_id)
    return deleted_at


_LOCK_ANY = f"""
SELECT {CARD}, is_active
  FROM card_mcp.cards
 WHERE id = $1
   FOR UPDATE
"""  # noqa: S608 - only CARD is interpolated
_VERSION = """
SELECT title, tags, content_hash FROM card_mcp.card_versions WHERE card_id = $1 AND version = $2
"""
# card_mcp.restored_from marks the version row the history trigger writes (schema/0009_card_history.sql); the
# sub-select sets it before the row is updated, so before the trigger reads it. The content is copied inside the
# database (the card's own for an undelete, $2's version's otherwise), never sent back from Python: stored content
# Python reads only in part (jsonb.LossyContent) would otherwise replace what is stored.
_RESTORE = f"""
UPDATE card_mcp.cards AS c
   SET title = v.v_title, content = v.v_content, tags = v.v_tags, content_hash = v.v_hash, is_active = true,
       deleted_at = NULL, version = c.version + 1
  FROM (SELECT set_config('card_mcp.restored_from', coalesce($2::integer::text, ''), true)) AS marked,
       (SELECT h.title, h.content, h.tags, h.content_hash
          FROM card_mcp.card_versions AS h
         WHERE h.card_id = $1 AND h.version = $2::integer
        UNION ALL
        SELECT k.title, k.content, k.tags, k.content_hash
          FROM card_mcp.cards AS k
         WHERE k.id = $1 AND $2::integer IS NULL) AS v (v_title, v_content, v_tags, v_hash)
 WHERE c.id = $1
RETURNING {", ".join(f"c.{column.strip()}" for column in CARD.split(","))}
"""  # noqa: S608 - only CARD's column names are interpolated


async def restore_card(
    conn: Connection, card_id: UUID, *, version: int | None = None, expected_version: int | None = None
) -> Card:
    """Undelete ``card_id`` (no ``version``), or make a new version of it whose title, content and tags equal
    ``version``'s (undeleting it too). A card already as asked is returned as it is, without a new version, so a
    repeated call changes nothing. A stale ``expected_version`` is a Conflict; content held by another active card
    of the type is DuplicateContent naming it; a version not kept is InvalidArgument."""
    row = await conn.fetchrow(_LOCK_ANY, card_id)
    if row is None:
        raise not_found(card_id)
    card, active = to_card(row), row["is_active"]
    title, tags, digest = card.title, card.tags, card.content_hash
    missing = InvalidArgument(
        f"card {card_id} has no version {version}", hint="get_card_history lists the versions kept; pass one of those."
    )
    if version is not None:
        old = await conn.fetchrow(_VERSION, card_id, version)
        if old is None:
            raise missing
        title, tags, digest = old["title"], old["tags"], old["content_hash"]
    if active and (title, digest, tags) == (card.title, card.content_hash, card.tags):
        return card
    if expected_version is not None and expected_version != card.version:
        raise Conflict(
            f"the card is at version {card.version}, not {expected_version}",
            hint="Read its history again with get_card_history and pass its current version.",
        )
    if not active or digest != card.content_hash:
        other = await conn.fetchval(_OTHER_WITH_CONTENT, card.card_type, digest, card_id)
        if other is not None:
            raise DuplicateContent(
                f"card {other} of type {card.card_type} already has this content",
                card_id=str(other),
                hint="Use that card, or delete or change it first, then restore again.",
            )
    try:
        restored = await conn.fetchrow(_RESTORE, card_id, version)
    except asyncpg.UniqueViolationError as exc:  # another call saved the same content meanwhile
        raise DuplicateContent(
            f"another card of type {card.card_type} got this content meanwhile",
            hint="Search for the card with this content; delete or change it first, or keep it instead.",
        ) from exc
    if restored is None:  # the row is locked FOR UPDATE; the version was pruned meanwhile
        raise missing
    return to_card(restored)


_INSERT_MANY = """
INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, tags, content_hash, key_order)
SELECT $1, b.card_type, b.title, b.content::jsonb, ARRAY(SELECT jsonb_array_elements_text(b.tags::jsonb)),
       b.content_hash, b.key_order::jsonb
  FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
       AS b(card_type, title, content, tags, content_hash, key_order)
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
            [json.dumps(key_order(new_cards[i].content)) for i in chunk],
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
