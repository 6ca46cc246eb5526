"""Usage retention: card_usage is partitioned by UTC day (schema/0010_lifecycle.sql); partitions are made ahead of
time, and retention drops the partitions wholly before its cut-off instead of deleting rows. Runs through the admin
role, which may call only the two narrow functions of the owner that do this."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio

from . import db
from .db import Connection
from .errors import CardMcpError

logger = logging.getLogger(__name__)

# Days of partitions kept ready ahead of today: an insert never waits for one (and the default partition catches a
# row that would find none anyway).
DAYS_AHEAD = 7
# How often the server makes partitions and applies retention: hourly, so a missed turn (a lock it did not get
# within 2 seconds) is retried long before the week ahead runs out.
MAINTENANCE_INTERVAL = timedelta(hours=1)

_ENSURE = "SELECT name FROM card_mcp.usage_partitions_ensure($1) AS name"
# One partition per statement, so per transaction: ACCESS EXCLUSIVE on card_usage for one DROP at a time (tens of
# milliseconds), with the call edge's usage inserts going on between, not for the whole of a first 90-day prune.
_PRUNE = "SELECT partition_name, range_from, range_to FROM card_mcp.usage_prune($1, 1)"


@dataclass(frozen=True)
class Dropped:
    """A usage partition that retention dropped, and the calls it held: [range_from, range_to)."""

    partition: str
    range_from: datetime
    range_to: datetime


async def ensure_partitions(conn: Connection, days_ahead: int = DAYS_AHEAD) -> list[str]:
    """Make the daily partitions from today to ``days_ahead`` days ahead that are missing (and move rows the
    default partition caught into theirs); returns the partitions made."""
    return [row["name"] for row in await conn.fetch(_ENSURE, days_ahead)]


async def prune(conn: Connection, before: datetime) -> list[Dropped]:
    """Drop every usage partition that holds only calls before ``before``, oldest first, one transaction each; a
    partition that straddles it stays. ``conn`` must be outside a transaction."""
    dropped: list[Dropped] = []
    while rows := await conn.fetch(_PRUNE, before):
        dropped.extend(Dropped(row["partition_name"], row["range_from"], row["range_to"]) for row in rows)
    return dropped


def cut_off(retention_days: int, now: datetime | None = None) -> datetime:
    """The moment before which usage is no longer kept: ``retention_days`` before now."""
    return (now or datetime.now(UTC)) - timedelta(days=retention_days)


async def maintain(admin_url: str, retention_days: int | None) -> tuple[list[str], list[Dropped]]:
    """One turn: the partitions ahead made, and (with a retention) the old ones dropped."""
    conn = await db.connect(admin_url)
    try:
        with db.translate_errors():
            made = await ensure_partitions(conn)
            dropped = await prune(conn, cut_off(retention_days)) if retention_days is not None else []
    finally:
        await conn.close()
    return made, dropped


async def maintain_periodically(
    admin_url: str, retention_days: int | None, every: timedelta = MAINTENANCE_INTERVAL
) -> None:
    """Run ``maintain`` now and then every ``every`` until cancelled; a failure is logged and retried at the next
    turn, never raised (the server keeps serving; the default partition takes rows meanwhile)."""
    while True:
        try:
            made, dropped = await maintain(admin_url, retention_days)
        except CardMcpError as exc:
            logger.warning("could not maintain the usage partitions: %s", exc.message)
        except Exception:
            logger.exception("could not maintain the usage partitions")
        else:
            if made:
                logger.info("made usage partitions %s", ", ".join(made))
            if dropped:
                logger.info(
                    "usage retention (%s days): dropped %d partitions, calls before %s",
                    retention_days,
                    len(dropped),
                    max(d.range_to for d in dropped).isoformat(),
                )
        await anyio.sleep(every.total_seconds())
