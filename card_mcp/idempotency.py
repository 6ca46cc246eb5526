"""Idempotency keys for batch_create_cards, as payment APIs keep them: per tenant, with a hash of the request,
replaying the stored response for the same request and refusing the key for a different one."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from .db import Connection
from .errors import Conflict, IdempotencyConflict
from .models import NewCard

DEFAULT_TTL = timedelta(hours=24)

# Held until the transaction ends: a second call with the key while the first runs is told to retry shortly.
_CLAIM = "SELECT pg_try_advisory_xact_lock(hashtextextended(current_setting('app.current_tenant_id') || $1, 0))"
_STORED = """
SELECT request_hash, response FROM card_mcp.idempotency_store
 WHERE idempotency_key = $1 AND tool = $2 AND expires_at > now()
"""
_STORE = """
INSERT INTO card_mcp.idempotency_store (tenant_id, idempotency_key, tool, request_hash, response, expires_at)
VALUES ($1, $2, $3, $4, $5, now() + $6::interval)
ON CONFLICT (tenant_id, idempotency_key) DO UPDATE
   SET tool = EXCLUDED.tool, request_hash = EXCLUDED.request_hash, response = EXCLUDED.response,
       created_at = now(), expires_at = EXCLUDED.expires_at
 WHERE card_mcp.idempotency_store.expires_at <= now()
"""


def request_hash(cards: Sequence[NewCard]) -> str:
    """SHA-256 over the validated cards, so the same cards hash alike however the JSON was spelled."""
    canonical = json.dumps([c.model_dump(mode="json") for c in cards], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def replay(conn: Connection, key: str, tool: str, digest: str) -> dict[str, Any] | None:
    """The stored response for ``key`` if this request was already answered; None if the key is free.
    Conflict while another call with the key runs; IdempotencyConflict if the key served another request."""
    if not await conn.fetchval(_CLAIM, key):
        raise Conflict(
            "another call with this idempotency_key is still running",
            hint="Retry the same call in a few seconds to receive its stored result.",
        )
    row = await conn.fetchrow(_STORED, key, tool)
    if row is None:
        return None
    if row["request_hash"] != digest:
        raise IdempotencyConflict("this idempotency_key was already used with different cards")
    response: dict[str, Any] = row["response"]
    return response


async def store(
    conn: Connection,
    tenant_id: Any,
    key: str,
    tool: str,
    digest: str,
    response: dict[str, Any],
    ttl: timedelta = DEFAULT_TTL,
) -> None:
    """Keep ``response`` under ``key`` in the caller's transaction: it exists exactly when the effect does."""
    await conn.execute(_STORE, tenant_id, key, tool, digest, response, ttl)
