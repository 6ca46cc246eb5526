"""Tenant administration, run through the admin role: it reads every tenant (its policy) and creates one only
through card_mcp.create_tenant, a SECURITY DEFINER function of the owner (it has no INSERT of its own). Erasing a
tenant is the owner's alone (card_mcp.erase_tenant, through the owner's URL)."""

from __future__ import annotations

from uuid import UUID

import asyncpg

from .db import Connection
from .errors import Conflict, InvalidArgument, NotFound
from .models import Tenant

_CREATE = "SELECT tenant_id, name, created_at FROM card_mcp.create_tenant($1)"
_ID = "SELECT tenant_id FROM card_mcp.tenants WHERE name = $1"
_LIST = "SELECT tenant_id, name, created_at FROM card_mcp.tenants ORDER BY name"
_ID_FOR = "SELECT card_mcp.tenant_id_for($1)"  # the tenant's id, created if there is none
_OTHERS = (  # the nearest names first: a typo of one of them is the likely reason
    "SELECT name FROM card_mcp.tenants WHERE name <> $1 ORDER BY card_mcp.similarity(name, $1) DESC, name LIMIT $2"
)
# The owner's only (schema/0010_lifecycle.sql): one statement, so one transaction.
_ERASE = "SELECT table_name, rows_removed FROM card_mcp.erase_tenant($1)"


async def create_tenant(conn: Connection, name: str) -> Tenant:
    """Create the tenant ``name``; Conflict if it exists."""
    try:
        row = await conn.fetchrow(_CREATE, name)
        assert row is not None  # INSERT ... RETURNING returns the row
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"tenant {name!r} exists already", hint="Pick another name.") from exc
    except asyncpg.CheckViolationError as exc:
        raise InvalidArgument(
            f"invalid tenant name {name!r}",
            hint="Use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit.",
        ) from exc
    return Tenant.model_validate(dict(row))


async def list_tenants(conn: Connection) -> list[Tenant]:
    """Every tenant, by name."""
    return [Tenant.model_validate(dict(row)) for row in await conn.fetch(_LIST)]


async def tenant_id(conn: Connection, name: str) -> UUID:
    """The id of the existing tenant ``name`` (admin role); NotFound if there is none."""
    found: UUID | None = await conn.fetchval(_ID, name)
    if found is None:
        raise NotFound(f"no tenant {name!r}", hint="`card-mcp tenants list` shows the tenants.")
    return found


async def served_tenant(conn: Connection, name: str, *, create: bool) -> tuple[UUID, list[str] | None]:
    """The id of the tenant ``serve`` serves over stdio, and, when it had to be created, the names of the tenants
    that existed already (up to 10): a typo in --tenant makes a new, empty tenant, which the log should say. With
    ``create`` false an unknown tenant is refused instead (NotFound, naming the existing ones)."""
    found: UUID | None = await conn.fetchval(_ID, name)
    if found is not None:
        return found, None
    others: list[str] = [row["name"] for row in await conn.fetch(_OTHERS, name, 10)]
    if not create:
        existing = ", ".join(others) if others else "none"
        raise NotFound(
            f"no tenant {name!r} (existing tenants: {existing}), and --no-create is set",
            hint=f"fix --tenant, or create it first: card-mcp tenants create {name}",
        )
    created: UUID = await conn.fetchval(_ID_FOR, name)
    return created, others


async def erase_tenant(conn: Connection, name: str) -> dict[str, int]:
    """Erase the tenant ``name`` and every row of it, in every table that has a tenant_id column, in one
    transaction, as the owner; returns the rows removed per table (tenants last). Its API keys stop working at once
    (each deletion is announced on the revocation channel); the erasure is recorded in card_mcp.tenant_erasures.
    NotFound if there is no such tenant."""
    try:
        rows = await conn.fetch(_ERASE, name)
    except asyncpg.NoDataFoundError as exc:
        raise NotFound(f"no tenant {name!r}", hint="`card-mcp tenants list` shows the tenants.") from exc
    return {row["table_name"]: row["rows_removed"] for row in rows}
