"""Idempotency keys for batch_create_cards, as payment APIs keep them: per tenant, with a hash of the request,
replaying the stored response for the same request and refusing the key for a different one."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import anyio

from . import db
from .db import Connection
from .errors import CardMcpError, Conflict, IdempotencyConflict
from .models import NewCard

logger = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(hours=24)
# How often a server removes expired keys (of every tenant, through the admin role).
EXPIRY_INTERVAL = timedelta(hours=1)

# Held until the transaction ends: a second call with the key while the first runs is told to retry shortly.
_CLAIM = "SELECT pg_try_advisory_xact_lock(hashtextextended(current_setting('app.current_tenant_id') || $1, 0))"
_DELETE_EXPIRED = "SELECT card_mcp.delete_expired_idempotency_keys()"  # every tenant's, as the admin role
_STORED = """
SELECT request_hash, response FROM card_mcp.idempotency_store
 WHERE idempotency_key = $1 AND tool = $2 AND expires_at > now()
"""
_STORED_EXACTLY = """
SELECT response FROM card_mcp.idempotency_store
 WHERE idempotency_key = $1 AND tool = $2 AND arguments_hash = $3 AND expires_at > now()
"""
_STORE = """
INSERT INTO card_mcp.idempotency_store
       (tenant_id, idempotency_key, tool, request_hash, arguments_hash, response, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, now() + $7::interval)
ON CONFLICT (tenant_id, idempotency_key) DO UPDATE
   SET tool = EXCLUDED.tool, request_hash = EXCLUDED.request_hash, arguments_hash = EXCLUDED.arguments_hash,
       response = EXCLUDED.response, created_at = now(), expires_at = EXCLUDED.expires_at
 WHERE card_mcp.idempotency_store.expires_at <= now()
"""


def request_hash(cards: Sequence[NewCard], content_hashes: Sequence[str]) -> str:
    """SHA-256 over the validated cards (type, title, tags and the hash of the content), so the same cards hash
    alike however the JSON was spelled, without serializing the contents a second time."""
    fields = [[c.card_type, c.title, c.tags, digest] for c, digest in zip(cards, content_hashes, strict=True)]
    return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


def arguments_hash(arguments: dict[str, Any]) -> str | None:
    """SHA-256 of a call's arguments as sent (keys sorted): equal for a retry that resends the same call. None
    for arguments that are no JSON text (an unpaired surrogate, nesting too deep to serialize), which no stored
    call can have had: their validation refuses them."""
    try:
        text = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()
    except (ValueError, TypeError, RecursionError):
        return None


async def replay_exactly(conn: Connection, key: str, tool: str, sent: str) -> dict[str, Any] | None:
    """The stored response for ``key`` if it answered a call with exactly these arguments (``sent``, their
    arguments_hash); None otherwise, and then the call takes the full path (validation, replay or claim)."""
    response: dict[str, Any] | None = await conn.fetchval(_STORED_EXACTLY, key, tool, sent)
    return response


async def replay(conn: Connection, key: str, tool: str, digest: str) -> dict[str, Any] | None:
    """The stored response for ``key`` if this request was already answered; None if the key is free, and then
    this transaction holds the key until it ends. Conflict while another call with the key runs;
    IdempotencyConflict if the key served another request."""
    stored = await _stored(conn, key, tool, digest)
    if stored is not None:  # answered before: replays never wait for each other
        return stored
    if not await conn.fetchval(_CLAIM, key):
        raise Conflict(
            "another call with this idempotency_key is still running",
            hint="Retry the same call in a few seconds to receive its stored result.",
        )
    # The holder may have committed between the read above and the claim: its response is visible now.
    return await _stored(conn, key, tool, digest)


async def _stored(conn: Connection, key: str, tool: str, digest: str) -> dict[str, Any] | None:
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
    sent: str | None = None,
) -> None:
    """Keep ``response`` under ``key`` in the caller's transaction: it exists exactly when the effect does.
    ``sent`` is the arguments_hash of the call, for replay_exactly."""
    await conn.execute(_STORE, tenant_id, key, tool, digest, sent, response, ttl)


async def delete_expired(admin_url: str) -> int:
    """Remove every tenant's expired keys, through the admin role's narrow function; returns how many."""
    conn = await db.connect(admin_url)
    try:
        with db.translate_errors():
            removed: int = await conn.fetchval(_DELETE_EXPIRED)
    finally:
        await conn.close()
    return removed


async def expire_periodically(admin_url: str, every: timedelta = EXPIRY_INTERVAL) -> None:
    """Run delete_expired now and then every ``every``, until cancelled; a failure is logged and retried at
    the next turn, never raised (the server keeps serving without it)."""
    while True:
        try:
            removed = await delete_expired(admin_url)
        except CardMcpError as exc:
            logger.warning("could not remove expired idempotency keys: %s", exc.message)
        except Exception:
            logger.exception("could not remove expired idempotency keys")
        else:
            if removed:
                logger.info("removed %d expired idempotency keys", removed)
        await anyio.sleep(every.total_seconds())
