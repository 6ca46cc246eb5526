"""Connect codes and OAuth connections, for the command line: `card-mcp connect --tenant NAME` (a one-time code for
the sign-in page, made with the owner's connection) and `card-mcp connections list|revoke` (the admin role's)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from . import tenants
from .db import Connection
from .errors import InvalidArgument, NotFound
from .keys import KEY_PREFIX

_CREATE_CODE = "SELECT card_mcp.oauth_connect_code_create($1, $2, $3)"
_REVOKE = "SELECT card_mcp.oauth_revoke_connection($1)"

_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # 32 symbols, none that read alike
_CODE_GROUPS, _GROUP_LENGTH = 4, 5  # 20 symbols: 100 bits


def new_connect_code() -> str:
    symbols = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(_CODE_GROUPS * _GROUP_LENGTH))
    return "-".join(symbols[i : i + _GROUP_LENGTH] for i in range(0, len(symbols), _GROUP_LENGTH))


async def create_connect_code(conn: Connection, tenant: str, minutes: float) -> tuple[str, datetime]:
    """A one-time connect code for ``tenant``, as the owner: (the code, to show once; when it expires)."""
    try:
        tenant_id = await tenants.tenant_id(conn, tenant)
    except NotFound as exc:
        raise NotFound(exc.message, hint=f"Create it first: card-mcp tenants create {tenant}") from exc
    code = new_connect_code()
    expires: datetime = await conn.fetchval(
        _CREATE_CODE,
        tenant_id,
        normalize_proof(code),
        timedelta(minutes=minutes),
    )
    return code, expires


@dataclass(frozen=True)
class OAuthConnection:
    """A connection as listed: never a token."""

    connection_id: UUID
    tenant: str
    client_id: str
    client_name: str | None
    signed_in_with: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


_LIST = """
SELECT k.connection_id, t.name AS tenant, k.client_id, c.metadata ->> 'client_name' AS client_name, k.signed_in_with,
       k.created_at, k.last_used_at, k.revoked_at
  FROM card_mcp.oauth_connections AS k
  JOIN card_mcp.tenants AS t USING (tenant_id)
  JOIN card_mcp.oauth_clients AS c USING (client_id)
 WHERE $1::text IS NULL OR t.name = $1
 ORDER BY t.name, k.created_at, k.connection_id
"""


async def list_connections(conn: Connection, tenant: str | None = None) -> list[OAuthConnection]:
    """Every OAuth connection (of one tenant, if given), as the admin role."""
    return [OAuthConnection(**dict(row)) for row in await conn.fetch(_LIST, tenant)]


async def revoke_connection(conn: Connection, connection_id: str) -> datetime:
    """Revoke a connection: its tokens stop working at their next request. Revoking twice is harmless."""
    try:
        parsed = UUID(connection_id)
    except ValueError as exc:
        raise InvalidArgument(
            f"{connection_id!r} is not a connection id", hint="Use the id `card-mcp connections list` shows."
        ) from exc
    revoked: datetime | None = await conn.fetchval(_REVOKE, parsed)
    if revoked is None:
        raise NotFound(f"no connection with id {parsed}", hint="`card-mcp connections list` shows them.")
    return revoked


def normalize_proof(proof: str) -> str:
    """An API key as it is; a connect code without spaces and dashes, in capitals (typed codes vary)."""
    proof = proof.strip()
    if proof.startswith(KEY_PREFIX):
        return proof
    return re.sub(r"[\s-]", "", proof).upper()
