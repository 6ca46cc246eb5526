"""The usage log: one ``card_usage`` row per call, and the figures analysts read from it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal
from uuid import UUID

from .db import Connection
from .errors import InvalidArgument
from .models import UsageStatsRow

GroupBy = Literal["tool", "card", "day", "client"]

# The window's grammar, one for the usage_stats tool and `card-mcp usage`: a span back (7d, 24h) or an ISO 8601
# date or date/time, UTC unless it carries an offset. A span is counted back from the window's end (since) or
# from now (until); a bare date is its midnight (since) or the next midnight (until: that day is included).
MOMENT_PATTERN = r"^\d{1,6}[dh]$|^\d{4}-\d\d-\d\d[T \d:.Z+-]*$"
DEFAULT_SINCE = "30d"
_SPAN = re.compile(r"(\d{1,6})([dh])")


def window(since: str | None, until: str | None, *, now: datetime) -> tuple[datetime, datetime]:
    """The window [start, end) that ``since`` and ``until`` name in the shared grammar (default: the 30 days up
    to ``now``); InvalidArgument when a moment is not in the grammar, outside the years 1-9999 (UTC), or the
    window is empty. Messages name the argument as a tool does; the command line says --since for since."""
    try:
        end = _moment(until, "until", now=now, end_of_day=True) if until else now
        start = _moment(since or DEFAULT_SINCE, "since", now=end, end_of_day=False)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00, which is before year 1 in UTC
        raise InvalidArgument(
            "the window reaches outside the years 1-9999 (UTC)",
            hint="Pass since and until within those years, or omit them for the last 30 days.",
        ) from None
    if start >= end:
        raise InvalidArgument("since must be before until", hint="Swap them, or omit one for the default window.")
    return start, end


def _moment(text: str, name: str, *, now: datetime, end_of_day: bool) -> datetime:
    span = _SPAN.fullmatch(text)
    if span:
        amount = int(span[1])
        return now - (timedelta(days=amount) if span[2] == "d" else timedelta(hours=amount))
    try:
        moment = datetime.fromisoformat(text) if re.fullmatch(MOMENT_PATTERN, text) else None
    except ValueError:
        moment = None
    if moment is None:
        raise InvalidArgument(
            f"{name} is not a span or a date", hint="Use 7d, 24h, 2026-11-01 or 2026-11-01T12:00:00Z; times are UTC."
        )
    if end_of_day and len(text) == 10:
        moment += timedelta(days=1)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass
class UsageEntry:
    """What one call did, filled in while it runs and written when it ends."""

    tool: str
    transport: str
    client_name: str = "unknown"
    client_version: str | None = None
    api_key_id: UUID | None = None
    connection_id: UUID | None = None  # OAuth (#23): the connection and registered client of the call
    oauth_client_id: str | None = None
    card_ids: list[UUID] = field(default_factory=list)
    status: Literal["ok", "error"] = "ok"
    error_code: str | None = None
    duration_ms: float = 0.0
    recorded: bool = False  # the row is committed: the call must not write another

    def mark_recorded(self) -> None:
        self.recorded = True


# The row, and the id of the transaction it commits in (in the same round trip): if the connection is lost during
# the COMMIT, that id tells whether the call happened (db.committed).
_RECORD = (
    "SELECT pg_current_xact_id()::text FROM card_mcp.record_call($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)

_RECORD_ALONE = (
    "SELECT card_mcp.record_call_alone($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"  # OAuth (#23): 12
)


def _values(tenant_id: UUID, entry: UsageEntry) -> tuple[object, ...]:
    return (
        tenant_id,
        entry.tool,
        entry.status,
        entry.error_code,
        list(dict.fromkeys(entry.card_ids)),
        entry.duration_ms,
        entry.client_name,
        entry.client_version,
        entry.transport,
        entry.api_key_id,
        entry.connection_id,  # OAuth (#23)
        entry.oauth_client_id,
    )


async def record(conn: Connection, tenant_id: UUID, entry: UsageEntry) -> str:
    """Write ``entry`` in the caller's transaction (the effect's); returns that transaction's id."""
    xid: str = await conn.fetchval(_RECORD, *_values(tenant_id, entry))
    return xid


async def record_alone(conn: Connection, tenant_id: UUID, entry: UsageEntry) -> None:
    """Write ``entry`` in a transaction of its own (a failed call's row, after the rollback): one statement."""
    await conn.execute(_RECORD_ALONE, *_values(tenant_id, entry))


# Calls, errors, p50/p95 duration and last call per group, in the window [$1, $2), grouped by $3, at most $5
# groups per tenant, for one tenant ($4) or every tenant the reader may see (row-level security decides: the
# application role with a tenant set sees one, the admin role all). Most-called first; newest day first by day.
_STATS = """
WITH calls AS (
    SELECT u.tenant_id,
           CASE $3::text
               WHEN 'tool' THEN u.tool
               WHEN 'client' THEN u.client_name
               WHEN 'day' THEN to_char(u.called_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')
               ELSE c.card_id::text
           END AS key,
           u.status, u.duration_ms, u.called_at
      FROM card_mcp.card_usage AS u
      LEFT JOIN LATERAL unnest(CASE WHEN $3::text = 'card' THEN u.card_ids END) AS c(card_id) ON true
     WHERE u.called_at >= $1 AND u.called_at < $2
       AND ($4::uuid IS NULL OR u.tenant_id = $4)
), grouped AS (
    SELECT tenant_id, key, count(*) AS calls, count(*) FILTER (WHERE status = 'error') AS errors,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms,
           max(called_at) AS last_at
      FROM calls
     WHERE key IS NOT NULL
     GROUP BY tenant_id, key
), ranked AS (
    SELECT g.*, row_number() OVER (
               PARTITION BY g.tenant_id
               ORDER BY CASE WHEN $3::text = 'day' THEN g.key END DESC NULLS LAST, g.calls DESC, g.key
           ) AS rank
      FROM grouped AS g
)
SELECT t.name AS tenant, r.key, r.calls, r.errors, r.p50_ms, r.p95_ms, r.last_at
  FROM ranked AS r JOIN card_mcp.tenants AS t USING (tenant_id)
 WHERE r.rank <= $5
 ORDER BY t.name, r.rank
"""


@dataclass(frozen=True)
class TenantRow:
    """One row of figures and the tenant it belongs to."""

    tenant: str
    row: UsageStatsRow


async def stats(
    conn: Connection,
    *,
    since: datetime,
    until: datetime,
    group_by: GroupBy,
    limit: int,
    tenant_id: UUID | None = None,
) -> list[TenantRow]:
    """Usage figures per group, for ``tenant_id`` or every tenant ``conn`` may see."""
    rows = await conn.fetch(_STATS, since, until, group_by, tenant_id, limit)
    return [
        TenantRow(row["tenant"], UsageStatsRow.model_validate({k: v for k, v in row.items() if k != "tenant"}))
        for row in rows
    ]


_DAILY_BY_TOOL = """
SELECT (u.called_at AT TIME ZONE 'UTC')::date AS day, u.tool, count(*) AS calls,
       count(*) FILTER (WHERE u.status = 'error') AS errors
  FROM card_mcp.card_usage AS u
 WHERE u.called_at >= $1 AND u.called_at < $2
   AND ($3::uuid IS NULL OR u.tenant_id = $3)
 GROUP BY 1, 2
 ORDER BY 1, 2
"""


@dataclass(frozen=True)
class DailyCalls:
    """Calls and errors of one tool on one UTC day (summed over the tenants read)."""

    day: date
    tool: str
    calls: int
    errors: int


async def daily_by_tool(
    conn: Connection, *, since: datetime, until: datetime, tenant_id: UUID | None = None
) -> list[DailyCalls]:
    """Calls and errors per UTC day and tool in [since, until), for the chart."""
    return [DailyCalls(**dict(row)) for row in await conn.fetch(_DAILY_BY_TOOL, since, until, tenant_id)]
