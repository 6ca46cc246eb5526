"""API keys for the HTTP transport: made, listed and revoked through the admin role, stored only as hashes.

A key is ``cmk_`` and 43 URL-safe base64 characters (244 random bits), made inside the database by
``card_mcp.create_api_key`` (the admin role cannot write api_keys, nor choose a key or its hash). It is shown once,
when made; the database keeps only its SHA-256 and a short prefix for listings. How the server verifies a presented
key is auth.py's.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from .db import Connection
from .errors import InvalidArgument, NotFound

KEY_PREFIX = "cmk_"
# What card_mcp.create_api_key makes; anything else is refused unlooked-up. Listings show the first 12 characters.
KEY_SHAPE = re.compile(r"cmk_[A-Za-z0-9_-]{43}")


def key_hash(key: str) -> bytes:
    """What the database stores and looks up: SHA-256 of the key's text."""
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    """A key as listed: never the key itself."""

    key_id: UUID
    prefix: str
    label: str | None
    tenant: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


_CREATE = "SELECT key_id, key FROM card_mcp.create_api_key($1, $2)"


async def create_key(conn: Connection, tenant: str, label: str | None = None) -> tuple[UUID, str]:
    """A new key for the existing tenant ``tenant``, as the admin role: (key id, the key, to show once)."""
    if label is not None and not 1 <= len(label) <= 200:
        raise InvalidArgument("the label must be 1-200 characters", hint="Use a short label such as 'staging'.")
    try:
        row = await conn.fetchrow(_CREATE, tenant, label)
    except asyncpg.NoDataFoundError as exc:
        raise NotFound(f"no tenant {tenant!r}", hint=f"Create it first: card-mcp tenants create {tenant}") from exc
    assert row is not None  # the function returns one row or raises
    return row["key_id"], row["key"]


_LIST = """
SELECT k.key_id, k.prefix, k.label, t.name AS tenant, k.created_at, k.last_used_at, k.revoked_at
  FROM card_mcp.api_keys AS k JOIN card_mcp.tenants AS t USING (tenant_id)
 WHERE $1::text IS NULL OR t.name = $1
 ORDER BY t.name, k.created_at, k.key_id
"""


async def list_keys(conn: Connection, tenant: str | None = None) -> list[ApiKey]:
    """Every key (of one tenant, if given), as the admin role."""
    return [ApiKey(**dict(row)) for row in await conn.fetch(_LIST, tenant)]


_REVOKE = "SELECT card_mcp.revoke_api_key($1)"


async def revoke_key(conn: Connection, key_id: str) -> datetime:
    """Revoke a key, as the admin role; the next request with it is refused. Revoking twice is harmless."""
    try:
        parsed = UUID(key_id)
    except ValueError as exc:
        raise InvalidArgument(
            f"{key_id!r} is not a key id", hint="Use the id that `card-mcp keys list` shows."
        ) from exc
    revoked_at: datetime | None = await conn.fetchval(_REVOKE, parsed)
    if revoked_at is None:
        raise NotFound(f"no key with id {parsed}", hint="`card-mcp keys list` shows the keys.")
    return revoked_at
