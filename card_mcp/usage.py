"""The usage log: one ``card_usage`` row per call, and the figures analysts read from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal
from uuid import UUID

from .db import Connection
from .models import UsageStatsRow

GroupBy = Literal["tool", "card", "day", "client"]


@dataclass
class UsageEntry:
    """What one call did, filled in while it runs and written when it ends."""

    tool: str
    transport: str
    client_name: str = "unknown"
    client_version: str | None = None
    api_key_id: UUID | None = None
    card_ids: list[UUID] = field(default_factory=list)
    status: Literal["ok", "error"] = "ok"
    error_code: str | None = None
    duration_ms: float = 0.0
    recorded: bool = False  # the row is committed: the call must not write another

    def mark_recorded(self) -> None:
        self.recorded = True


_RECORD = """
INSERT INTO card_mcp.card_usage
       (tenant_id, tool, status, error_code, card_ids, duration_ms, client_name, client_version, transport,
        api_key_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
"""


async def record(conn: Connection, tenant_id: UUID, entry: UsageEntry) -> None:
    """Write ``entry`` in the caller's transaction (the effect's, or a transaction of its own on failure)."""
    await conn.execute(
        _RECORD,
        tenant_id,
        entry.tool,
        entry.status,
        entry.error_code,
        list(dict.fromkeys(entry.card_ids)),
        entry.duration_ms,
        entry.client_name[:200],
        entry.client_version[:100] if entry.client_version else None,
        entry.transport,
        entry.api_key_id,
    )


# One query per grouping, so each is plain SQL that the planner sees whole. The window is [since, until).
_STATS_BY: dict[GroupBy, str] = {
    "tool": """
SELECT tool AS key, count(*) AS calls, count(*) FILTER (WHERE status = 'error') AS errors,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms,
       max(called_at) AS last_at
  FROM card_mcp.card_usage
 WHERE called_at >= $1 AND called_at < $2
 GROUP BY tool
 ORDER BY calls DESC, key
 LIMIT $3
""",
    "client": """
SELECT client_name AS key, count(*) AS calls, count(*) FILTER (WHERE status = 'error') AS errors,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms,
       max(called_at) AS last_at
  FROM card_mcp.card_usage
 WHERE called_at >= $1 AND called_at < $2
 GROUP BY client_name
 ORDER BY calls DESC, key
 LIMIT $3
""",
    "day": """
SELECT to_char(called_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS key, count(*) AS calls,
       count(*) FILTER (WHERE status = 'error') AS errors,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms,
       max(called_at) AS last_at
  FROM card_mcp.card_usage
 WHERE called_at >= $1 AND called_at < $2
 GROUP BY 1
 ORDER BY key DESC
 LIMIT $3
""",
    "card": """
SELECT card_id::text AS key, count(*) AS calls, count(*) FILTER (WHERE status = 'error') AS errors,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms,
       max(called_at) AS last_at
  FROM card_mcp.card_usage CROSS JOIN LATERAL unnest(card_ids) AS card_id
 WHERE called_at >= $1 AND called_at < $2
 GROUP BY card_id
 ORDER BY calls DESC, key
 LIMIT $3
""",
}


async def stats(
    conn: Connection, *, since: datetime, until: datetime, group_by: GroupBy, limit: int
) -> list[UsageStatsRow]:
    """Calls, errors, p50/p95 duration and last call per group, for the tenant set on ``conn``."""
    rows = await conn.fetch(_STATS_BY[group_by], since, until, limit)
    return [UsageStatsRow.model_validate(dict(row)) for row in rows]
