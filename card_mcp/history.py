"""Card history: the versions every change of a card leaves (schema/0009_card_history.sql writes them by trigger,
in the change's own transaction), read newest first in bounded pages, and their retention.

Restoring a version is a card write and lives in cards.py (restore_card); who made a change is the call's actor,
which the call edge sets (calls.Caller.actor), or the command line's (CLI_ACTOR).
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

import anyio
import asyncpg

from . import __version__, db
from .cards import not_found
from .db import Connection
from .errors import CardMcpError, InvalidArgument
from .models import CardVersion
from .search import MAX_PAGE_BYTES

logger = logging.getLogger(__name__)

# The actor of changes made by card-mcp's own commands (an import, say): set with SET_ACTOR in their transaction.
CLI_ACTOR = json.dumps({"transport": "cli", "client_name": "card-mcp", "client_version": __version__})
SET_ACTOR = "SELECT set_config('card_mcp.actor', $1::text, true)"

# A card's versions below $2 (all, when NULL), newest first, at most $3, each with the fields that differ from the
# version before it (all three for the oldest kept); $4 narrows to one tenant (the admin role sees every tenant,
# the application role its own by row-level security). The key's label comes from a narrow function: the
# application role cannot read api_keys.
_HISTORY = """
SELECT h.version, h.op, h.title, h.content, h.tags, h.content_hash, h.changed_at, h.transport,
       h.api_key_id,
       CASE WHEN h.api_key_id IS NOT NULL THEN card_mcp.api_key_label(h.tenant_id, h.api_key_id) END AS api_key_label,
       h.connection_id, CASE WHEN h.transport = 'database' THEN h.db_role ELSE h.client_name END AS client_name,
       h.client_version,
       array_remove(ARRAY[
           CASE WHEN h.before IS NULL OR h.title IS DISTINCT FROM h.before_title THEN 'title' END,
           CASE WHEN h.before IS NULL OR h.content_hash IS DISTINCT FROM h.before_hash THEN 'content' END,
           CASE WHEN h.before IS NULL OR h.tags IS DISTINCT FROM h.before_tags THEN 'tags' END
       ], NULL) AS changed_fields,
       (SELECT t.name FROM card_mcp.tenants AS t WHERE t.tenant_id = h.tenant_id) AS tenant
  FROM (SELECT v.*, lead(v.version) OVER w AS before, lead(v.title) OVER w AS before_title,
               lead(v.content_hash) OVER w AS before_hash, lead(v.tags) OVER w AS before_tags
          FROM card_mcp.card_versions AS v
         WHERE v.card_id = $1 AND ($2::integer IS NULL OR v.version < $2) AND ($4::uuid IS NULL OR v.tenant_id = $4)
        WINDOW w AS (PARTITION BY v.tenant_id, v.card_id ORDER BY v.version DESC)
         ORDER BY v.version DESC
         LIMIT $3) AS h
 ORDER BY h.version DESC
"""

# The tenants whose card has this id: ids are unique within a tenant only (an import keeps them), so a lookup across
# tenants (the admin role's `card-mcp history` without --tenant) may find several.
_TENANTS_OF = """
SELECT t.name
  FROM card_mcp.tenants AS t
 WHERE EXISTS (SELECT FROM card_mcp.card_versions AS v WHERE v.tenant_id = t.tenant_id AND v.card_id = $1)
 ORDER BY t.name
"""

_PRUNE = "SELECT card_mcp.prune_card_versions($1)"  # every tenant's, as the admin role
# How often a server applies CARD_MCP_HISTORY_KEEP_VERSIONS.
PRUNE_INTERVAL = timedelta(hours=1)


def _version(row: asyncpg.Record) -> CardVersion:
    data = dict(row)
    data["changed_by"] = {
        key: data.pop(key)
        for key in ("transport", "api_key_id", "api_key_label", "connection_id", "client_name", "client_version")
    }
    return CardVersion.model_validate(data)


def encode_cursor(card_id: UUID, before: int) -> str:
    raw = json.dumps({"card": str(card_id), "before": before})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, card_id: UUID) -> int:
    try:
        data: Any = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        before = data["before"]
        valid = data["card"] == str(card_id) and isinstance(before, int) and before >= 1
    except (ValueError, TypeError, KeyError, RecursionError):
        valid = False
    if not valid:
        raise InvalidArgument(
            "the cursor is not one this server made for this card",
            hint="Pass next_cursor exactly as returned, with the same card_id, or omit it.",
        )
    return int(before)


async def card_history(
    conn: Connection,
    card_id: UUID,
    *,
    limit: int = 10,
    cursor: str | None = None,
    tenant_id: UUID | None = None,
    max_bytes: int = MAX_PAGE_BYTES,
) -> tuple[list[CardVersion], str | None, str | None]:
    """One page of the versions of ``card_id`` (active or deleted), newest first: at most ``limit`` and about
    ``max_bytes`` of JSON (always at least one), the cursor of the next page (None on the last), and the card's
    tenant's name. NotFound when the card has no versions ``conn`` may see (no such card, or another tenant's)."""
    before = _decode_cursor(cursor, card_id) if cursor else None
    rows = await conn.fetch(_HISTORY, card_id, before, limit + 1, tenant_id)
    if not rows and cursor is None:
        raise not_found(card_id)
    kept: list[CardVersion] = []
    size = 0
    for row in rows[:limit]:
        version = _version(row)
        size += len(version.model_dump_json()) + 1
        if kept and size > max_bytes:
            break
        kept.append(version)
    more = len(kept) < len(rows)
    tenant = rows[0]["tenant"] if rows else None
    return kept, encode_cursor(card_id, kept[-1].version) if more else None, tenant


async def tenants_of(conn: Connection, card_id: UUID) -> list[str]:
    """The names of the tenants ``conn`` sees that have a card with id ``card_id`` (with versions kept)."""
    return [row["name"] for row in await conn.fetch(_TENANTS_OF, card_id)]


async def prune(admin_url: str, keep: int) -> int:
    """Keep the newest ``keep`` versions of every card of every tenant, through the admin role's narrow function;
    returns how many were removed."""
    conn = await db.connect(admin_url)
    try:
        with db.translate_errors():
            removed: int = await conn.fetchval(_PRUNE, keep)
    finally:
        await conn.close()
    return removed


async def prune_periodically(admin_url: str, keep: int, every: timedelta = PRUNE_INTERVAL) -> None:
    """Apply the retention now and then every ``every``, until cancelled; a failure is logged and retried at the
    next turn, never raised."""
    while True:
        try:
            removed = await prune(admin_url, keep)
        except CardMcpError as exc:
            logger.warning("could not prune card versions: %s", exc.message)
        except Exception:
            logger.exception("could not prune card versions")
        else:
            if removed:
                logger.info("removed %d card versions beyond the newest %d of each card", removed, keep)
        await anyio.sleep(every.total_seconds())
