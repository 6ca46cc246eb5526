"""A tenant's cards out and in: ``card-mcp export`` and ``card-mcp import``, as the application role under the
tenant's row-level security (the tenant's id is the admin role's to resolve, the caller's to pass).

The format is JSON Lines: a first line naming the format and its version, then one card per line with every field
of a stored card (SPEC section 2), the order its content's keys were written in (where known: schema/0023) and,
for a deleted card, when it was deleted. Import also reads plain lines of ``{card_type, title, content, tags}``,
whose keys' order is the line's own. An export is one snapshot (REPEATABLE READ) read through a cursor, so its
memory does not grow with the tenant. An import validates every line before it writes any, then writes in chunks,
each its own transaction, deduplicating as create_card does (an active card of the same type and content hash is
``existing``), and a card with an id that the tenant has already is ``existing`` too: importing a file again, or
again after an interruption, leaves each card once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO
from uuid import UUID

import pydantic
from pydantic import ConfigDict, Field

from .db import Connection
from .errors import CardMcpError, InvalidArgument
from .models import (
    DEFAULT_MAX_CONTENT_BYTES,
    MAX_KEY_ORDER,
    MAX_KEY_ORDER_BYTES,
    CardType,
    Content,
    KeyPath,
    NewCard,
    Title,
    content_hash,
    key_order,
)

FORMAT = "card-mcp-export"
FORMAT_VERSION = 2  # 2: a card line may say the order its content keys were written in (key_order)
CHUNK = 1000  # cards per import transaction
MAX_ERRORS_SHOWN = 50

Progress = Callable[[int, int], None]

_SET_TENANT = "SELECT set_config('app.current_tenant_id', $1::text, true)"
# An import's writes, for card history (schema/0009, issue #21): the version rows its INSERTs make say `import`, made
# by the command line. Custom settings: harmless where there is no history.
_SET_IMPORT = """
SELECT set_config('app.current_tenant_id', $1::text, true),
       set_config('card_mcp.version_op', 'import', true),
       set_config('card_mcp.actor', '{"transport": "cli", "client_name": "card-mcp import"}', true)
"""
_COUNT = "SELECT count(*) FROM card_mcp.cards WHERE $1::boolean OR is_active"
# In id order: the primary key's order within the tenant, so the cursor streams without a sort. Content (and the
# versions) as PostgreSQL's own JSON text, written to the file as it is: read into Python and written back, content
# Python reads only in part (jsonb.LossyContent: nesting deeper than its parser goes, integers longer than it converts)
# would be exported as the note shown in its place, or not at all.
_CARDS = """
SELECT id, card_type, title, content::text AS content, key_order::text AS key_order, tags, version, content_hash,
       created_at, updated_at, deleted_at
  FROM card_mcp.cards
 WHERE $1::boolean OR is_active
 ORDER BY tenant_id, id
"""
# The same, with each card's versions, oldest first (who made each: transport and client, not the key or connection,
# which belong to the tenant exported from).
_CARDS_WITH_HISTORY = """
SELECT c.id, c.card_type, c.title, c.content::text AS content, c.key_order::text AS key_order, c.tags, c.version,
       c.content_hash, c.created_at, c.updated_at, c.deleted_at,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'version', v.version, 'op', v.op, 'card_type', v.card_type, 'title', v.title, 'content', v.content,
                   'tags', v.tags, 'content_hash', v.content_hash, 'is_active', v.is_active,
                   'restored_from', v.restored_from, 'changed_at', v.changed_at, 'transport', v.transport,
                   'client_name', v.client_name, 'client_version', v.client_version) ORDER BY v.version), '[]')
          FROM card_mcp.card_versions AS v
         WHERE v.tenant_id = c.tenant_id AND v.card_id = c.id)::text AS versions
  FROM card_mcp.cards AS c
 WHERE $1::boolean OR c.is_active
 ORDER BY c.tenant_id, c.id
"""

# A chunk of validated cards as one JSON array. ON CONFLICT DO NOTHING with no target skips a card that meets any
# unique key: the tenant's card with that id, or its active card of the same type and content (the dedup key of
# create_card), including one inserted earlier in the same statement.
_INSERT = """
INSERT INTO card_mcp.cards AS k
       (tenant_id, id, card_type, title, content, key_order, tags, content_hash, version, is_active, created_at,
        updated_at, deleted_at)
SELECT $1, coalesce(c.id, gen_random_uuid()), c.card_type, c.title, c.content, c.key_order, c.tags, c.content_hash,
       coalesce(c.version, 1), c.deleted_at IS NULL, coalesce(c.created_at, now()), coalesce(c.updated_at, now()),
       c.deleted_at
  FROM jsonb_to_recordset($2::jsonb) AS c(id uuid, card_type text, title text, content jsonb, key_order jsonb,
                                          tags text[], content_hash text, version integer, created_at timestamptz,
                                          updated_at timestamptz, deleted_at timestamptz)
ON CONFLICT DO NOTHING
RETURNING k.id
"""
# The earlier versions of the cards a chunk created ($3), as exported. The current version's row was made by the
# INSERT above (its history trigger, op `import`), so that one is skipped here.
_INSERT_VERSIONS = """
INSERT INTO card_mcp.card_versions
       (tenant_id, card_id, version, op, card_type, title, content, tags, content_hash, is_active, restored_from,
        changed_at, transport, client_name, client_version)
SELECT $1, v.card_id, v.version, v.op, v.card_type, v.title, v.content, v.tags, v.content_hash, v.is_active,
       v.restored_from, v.changed_at, v.transport, v.client_name, v.client_version
  FROM jsonb_to_recordset($2::jsonb) AS v(card_id uuid, version integer, op text, card_type text, title text,
                                          content jsonb, tags text[], content_hash text, is_active boolean,
                                          restored_from integer, changed_at timestamptz, transport text,
                                          client_name text, client_version text)
 WHERE v.card_id = ANY ($3::uuid[])
ON CONFLICT DO NOTHING
"""


class CardVersion(pydantic.BaseModel):
    """One entry of a card's history in an export (schema/0009_card_history.sql)."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    op: Literal["create", "update", "delete", "restore", "import"]
    card_type: CardType
    title: Title
    content: Content
    tags: list[str]
    content_hash: str
    is_active: bool
    restored_from: int | None = None
    changed_at: datetime
    transport: Literal["stdio", "http", "memory", "cli", "database"]
    client_name: str | None = None
    client_version: str | None = None


class ImportedCard(NewCard):
    """A card line of an import file: a new card, or a card as ``export`` wrote it (its id, times and versions)."""

    model_config = ConfigDict(extra="forbid")

    id: UUID | None = None
    version: int | None = Field(default=None, ge=1)
    content_hash: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    deleted_at: datetime | None = None
    versions: list[CardVersion] | None = None  # export --include-history
    # The paths of the content's keys in the order written (models.key_order, schema/0023); without it, the order
    # of the line's own content.
    key_order: Annotated[list[Annotated[KeyPath, Field(min_length=1)]], Field(max_length=MAX_KEY_ORDER)] | None = None


@dataclass
class ImportReport:
    """What an import did (or, with errors, why it wrote nothing)."""

    lines: int = 0
    cards: int = 0
    created: int = 0
    existing: int = 0
    with_history: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0


@dataclass(frozen=True)
class ExportReport:
    cards: int
    deleted: int


def _card_line(row: Any) -> str:
    """One card's line; its content (and versions) are JSON text from PostgreSQL, put in as they are."""
    card = {
        "id": str(row["id"]),
        "card_type": row["card_type"],
        "title": row["title"],
        "tags": list(row["tags"]),
        "version": row["version"],
        "content_hash": row["content_hash"],
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
    }
    if row["deleted_at"] is not None:
        card["deleted_at"] = row["deleted_at"].isoformat()
    fields = json.dumps(card, ensure_ascii=False, separators=(",", ":"))
    order = f',"key_order":{row["key_order"]}' if row["key_order"] is not None else ""
    versions = f',"versions":{row["versions"]}' if "versions" in row else ""
    return f'{fields[:-1]},"content":{row["content"]}{order}{versions}}}\n'


async def export_cards(
    conn: Connection,
    tenant_id: UUID,
    tenant_name: str,
    out: TextIO,
    *,
    include_deleted: bool = False,
    include_history: bool = False,
    progress: Progress | None = None,
) -> ExportReport:
    """Write the tenant's cards to ``out`` as JSON Lines, from one snapshot, through a cursor. ``conn`` is the
    application role's, outside any transaction."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(_SET_TENANT, str(tenant_id))
        total: int = await conn.fetchval(_COUNT, include_deleted)
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tenant": tenant_name,
            "exported_at": datetime.now(UTC).isoformat(),
            "cards": total,
            "include_deleted": include_deleted,
            "include_history": include_history,
        }
        out.write(json.dumps(header, separators=(",", ":")) + "\n")
        done = deleted = 0
        query = _CARDS_WITH_HISTORY if include_history else _CARDS
        async for row in conn.cursor(query, include_deleted, prefetch=500):
            out.write(_card_line(row))
            done += 1
            deleted += row["deleted_at"] is not None
            if progress is not None and (done % 1000 == 0 or done == total):
                progress(done, total)
    if progress is not None and total == 0:
        progress(0, 0)
    return ExportReport(cards=done, deleted=deleted)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The file's lines as bytes (each is decoded by _parse, so that one that is not UTF-8 is named by its number)."""
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def _parse(number: int, raw: bytes, max_bytes: int) -> ImportedCard | dict[str, Any]:
    """The card of one line (or the header, as a dict, on line 1); InvalidArgument naming what is wrong."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"not UTF-8 text (byte {exc.start + 1} of the line)") from exc
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"not JSON ({exc.msg} at column {exc.colno})") from exc
    except ValueError as exc:  # text json cannot decode (an unpaired surrogate, an integer of over 4,300 digits)
        raise InvalidArgument("not JSON that card-mcp can read") from exc
    except RecursionError as exc:
        raise InvalidArgument("nested more deeply than card-mcp can read") from exc
    if not isinstance(value, dict):
        raise InvalidArgument("not a JSON object")
    if "format" in value:
        if number != 1:
            raise InvalidArgument("a format line is allowed only as the first line")
        if value.get("format") != FORMAT or not isinstance(value.get("version"), int):
            raise InvalidArgument(f"unknown format {value.get('format')!r}; expected {FORMAT!r}")
        if value["version"] > FORMAT_VERSION:
            raise InvalidArgument(f"format version {value['version']} is newer than this card-mcp reads")
        return value
    try:
        card = ImportedCard.model_validate(value)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'card'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise InvalidArgument(problems) from exc
    digest = content_hash(card.content, max_bytes=max_bytes)
    if card.content_hash is not None and card.content_hash != digest:
        raise InvalidArgument("content_hash does not match the content (the file was changed or damaged)")
    numbers = [kept.version for kept in card.versions or []]
    if len(set(numbers)) < len(numbers):
        raise InvalidArgument("a version is listed twice")
    if numbers and max(numbers) > (card.version or 1):  # the card's next change is written as its version + 1
        raise InvalidArgument(f"version {max(numbers)} is after the card's own version {card.version or 1}")
    for kept in card.versions or []:  # restore_card writes a version's content and hash as they are
        if content_hash(kept.content, max_bytes=max_bytes) != kept.content_hash:
            raise InvalidArgument(
                f"version {kept.version}: content_hash does not match the content (the file was changed or damaged)"
            )
    if (card.deleted_at is not None or card.versions is not None) and card.id is None:
        raise InvalidArgument("a deleted card or one with versions needs its id, so that importing it again finds it")
    if card.key_order is None:  # a line written by hand or by another tool: its keys' order is its authors'
        card.key_order = key_order(card.content)
    elif sum(len(json.dumps(path)) for path in card.key_order) > MAX_KEY_ORDER_BYTES:  # as models.key_order counts
        raise InvalidArgument(f"key_order: paths of more than {MAX_KEY_ORDER_BYTES} bytes (an export writes fewer)")
    elif not all(_storable(part) for path in card.key_order for part in path):  # jsonb refuses it, mid-import
        raise InvalidArgument("key_order: a key with \\u0000 or an unpaired surrogate, which PostgreSQL cannot store")
    card.content_hash = digest
    return card


def _storable(part: str | int) -> bool:
    """Whether PostgreSQL's jsonb can hold ``part`` of a key's path (content's keys are checked as content)."""
    if isinstance(part, int):
        return True
    try:
        part.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in part


def validate(path: Path, *, max_bytes: int = DEFAULT_MAX_CONTENT_BYTES) -> ImportReport:
    """Read every line of ``path`` and report every invalid one with its line number; writes nothing."""
    if not path.is_file():
        raise InvalidArgument(f"no file {str(path)!r}", hint="Give the path of a .jsonl file.")
    report = ImportReport()
    # An id on two lines: the second would count as existing while its versions joined the first's history.
    first_line_of: dict[UUID, int] = {}
    for number, line in _lines(path):
        report.lines = number
        try:
            parsed = _parse(number, line, max_bytes)
            if isinstance(parsed, ImportedCard) and parsed.id is not None:
                first = first_line_of.setdefault(parsed.id, number)
                if first != number:
                    raise InvalidArgument(f"card id {parsed.id} is on line {first} too")
        except CardMcpError as exc:
            report.error_count += 1
            if len(report.errors) < MAX_ERRORS_SHOWN:
                report.errors.append(f"line {number}: {exc.message}")
            continue
        if isinstance(parsed, ImportedCard):
            report.cards += 1
            report.with_history += parsed.versions is not None
    return report


def _row(card: ImportedCard) -> dict[str, Any]:
    return {
        "id": None if card.id is None else str(card.id),
        "card_type": card.card_type,
        "title": card.title,
        "content": card.content,
        "key_order": card.key_order,
        "tags": card.tags,
        "content_hash": card.content_hash,
        "version": card.version,
        "created_at": None if card.created_at is None else card.created_at.isoformat(),
        "updated_at": None if card.updated_at is None else card.updated_at.isoformat(),
        "deleted_at": None if card.deleted_at is None else card.deleted_at.isoformat(),
    }


async def import_cards(
    conn: Connection,
    tenant_id: UUID,
    path: Path,
    *,
    max_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
    chunk: int = CHUNK,
    progress: Progress | None = None,
) -> ImportReport:
    """Validate ``path`` whole; if any line is invalid, return the report with its errors having written nothing.
    Otherwise write its cards to the tenant in chunks of ``chunk``, each committed on its own, and count what was
    created and what existed already. ``conn`` is the application role's, outside any transaction."""
    report = validate(path, max_bytes=max_bytes)
    if report.error_count:
        return report
    batch: list[dict[str, Any]] = []
    versions: list[dict[str, Any]] = []
    done = 0

    async def write() -> None:
        nonlocal done
        async with conn.transaction():
            await conn.execute(_SET_IMPORT, str(tenant_id))
            created = await conn.fetch(_INSERT, tenant_id, batch)
            if versions and created:
                await conn.execute(_INSERT_VERSIONS, tenant_id, versions, [row["id"] for row in created])
        versions.clear()
        report.created += len(created)
        report.existing += len(batch) - len(created)
        done += len(batch)
        batch.clear()
        if progress is not None:
            progress(done, report.cards)

    for number, line in _lines(path):
        parsed = _parse(number, line, max_bytes)
        if isinstance(parsed, ImportedCard):
            batch.append(_row(parsed))
            if parsed.versions and parsed.id is not None:
                versions.extend({"card_id": str(parsed.id), **v.model_dump(mode="json")} for v in parsed.versions)
            if len(batch) >= chunk:
                await write()
    if batch:
        await write()
    if progress is not None and report.cards == 0:
        progress(0, 0)
    return report
