"""Per-tenant readers: a login role per dashboard, bound to one tenant on the server side.

A reader is a PostgreSQL login role in the group ``card_mcp_reader``, mapped to its tenant in ``card_mcp.readers``.
Its policies find the tenant from ``current_user`` through that mapping, which it can read (its own row) but not
write, so setting ``app.current_tenant_id`` changes nothing for it. Readers are made and dropped through the
owner's connection (CARD_MCP_OWNER_DATABASE_URL): creating a role takes CREATEROLE, which no role a running server
holds has, and no SECURITY DEFINER function hands it on. docs/security.md says why.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from .db import Connection
from .errors import Conflict, InvalidArgument, NotFound

# Lower case, so the name needs no quoting in psql or a BI tool's login form; pg_ and card_mcp_ are reserved.
_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_RESERVED = ("pg_", "card_mcp_")
# A reader holds at most 5 connections (CONNECTION LIMIT below): one dashboard cannot use up the server's.
_SCRAM_ITERATIONS = 4096


@dataclass(frozen=True)
class Reader:
    """A reader as listed."""

    name: str
    tenant: str
    created_at: datetime
    can_login: bool


def check_name(name: str) -> str:
    """``name`` if it may name a reader; InvalidArgument otherwise."""
    if not _NAME.fullmatch(name) or name.startswith(_RESERVED):
        raise InvalidArgument(
            f"invalid reader name {name!r}",
            hint="Use 1-63 lower-case letters, digits or '_', starting with a letter, not with pg_ or card_mcp_.",
        )
    return name


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = _SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, 7677): sent instead of the password,
    so the password itself is never in a statement (or a server log)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


_TENANT = "SELECT tenant_id FROM card_mcp.tenants WHERE name = $1"
_ROLE_EXISTS = "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = $1)"
_MAP = "INSERT INTO card_mcp.readers (tenant_id, role_name) VALUES ($1, $2)"
# Role names and passwords cannot be bind parameters of CREATE ROLE: PostgreSQL's format() quotes them (%I, %L).
_CREATE_ROLE = """
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE INHERIT CONNECTION LIMIT 5
               PASSWORD %L IN ROLE card_mcp_reader', $1::text, $2::text)
"""


async def create_reader(conn: Connection, tenant: str, name: str, *, password: bool = True) -> str | None:
    """Make the login role ``name``, reading only the tenant ``tenant``, as the owner; returns its generated
    password (None with ``password=False``: a role for the operator's own authentication, such as certificates)."""
    check_name(name)
    secret = secrets.token_urlsafe(24) if password else None
    async with conn.transaction():
        tenant_id = await conn.fetchval(_TENANT, tenant)
        if tenant_id is None:
            raise NotFound(f"no tenant {tenant!r}", hint="`card-mcp tenants list` shows the tenants.")
        if await conn.fetchval(_ROLE_EXISTS, name):
            raise Conflict(f"a role named {name!r} exists already", hint="Pick another reader name.")
        # The mapping first: the role never exists in the readers' group without its tenant.
        await conn.execute(_MAP, tenant_id, name)
        statement: str = await conn.fetchval(_CREATE_ROLE, name, scram_verifier(secret) if secret else None)
        try:
            await conn.execute(statement)
        except asyncpg.DuplicateObjectError as exc:  # made concurrently
            raise Conflict(f"a role named {name!r} exists already", hint="Pick another reader name.") from exc
    return secret


_LIST = """
SELECT r.role_name AS name, t.name AS tenant, r.created_at, coalesce(p.rolcanlogin, false) AS can_login
  FROM card_mcp.readers AS r
  JOIN card_mcp.tenants AS t USING (tenant_id)
  LEFT JOIN pg_catalog.pg_roles AS p ON p.rolname = r.role_name
 WHERE $1::text IS NULL OR t.name = $1
 ORDER BY t.name, r.role_name
"""


async def list_readers(conn: Connection, tenant: str | None = None) -> list[Reader]:
    """Every reader (of one tenant, if given), as the owner."""
    return [Reader(**dict(row)) for row in await conn.fetch(_LIST, tenant)]


_UNMAP = "DELETE FROM card_mcp.readers WHERE role_name = $1 RETURNING tenant_id"
_DROP_ROLE = "SELECT format('DROP ROLE IF EXISTS %I', $1::text)"
_DISABLE_ROLE = "SELECT format('ALTER ROLE %I NOLOGIN; REVOKE card_mcp_reader FROM %I', $1::text, $1::text)"


async def revoke_reader(conn: Connection, name: str) -> bool:
    """Unbind the reader ``name`` and drop its role, as the owner; True if dropped. A role that still holds
    something elsewhere (privileges someone granted it, objects it owns) cannot be dropped: it loses its login and
    the readers' group instead (False). Either way it reads nothing from its next statement on."""
    check_name(name)
    async with conn.transaction():
        if await conn.fetchval(_UNMAP, name) is None:
            raise NotFound(f"no reader {name!r}", hint="`card-mcp readers list` shows the readers.")
        try:
            async with conn.transaction():  # a savepoint: a failed DROP leaves the unmapping standing
                await conn.execute(await conn.fetchval(_DROP_ROLE, name))
            return True
        except asyncpg.DependentObjectsStillExistError:
            await conn.execute(await conn.fetchval(_DISABLE_ROLE, name))
            return False
