"""Pydantic models at the boundary: the card, its parts and the rules of SPEC section 2."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from .errors import InvalidArgument

CardType = Literal["company", "audience", "voice", "insight"]
CARD_TYPES: tuple[CardType, ...] = ("company", "audience", "voice", "insight")

MAX_TITLE = 200
MAX_TAGS = 20
MAX_TAG = 64
MAX_DEPTH = 32
DEFAULT_MAX_CONTENT_BYTES = 64 * 1024

# No C0 or C1 control character, nor DEL; also a JSON Schema (ECMA-262) pattern, in its shortest spelling.
_NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f]*$"

Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TITLE, pattern=_NO_CONTROL),
]
Tag = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TAG, pattern=_NO_CONTROL)]


def _json_integer(value: Any) -> Any:
    if isinstance(value, bool | str):  # pydantic's lax mode reads true as 1 and "10" as 10
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def _json_date_time(value: Any) -> Any:
    if not isinstance(value, str | datetime):  # pydantic's lax mode reads a number as Unix time
        raise PydanticCustomError("datetime_type", "Input should be a valid ISO 8601 date-time string")
    return value


# Tool arguments take what their inputSchema allows: a JSON integer (10 or 10.0), a date-time string. JsonInteger
# goes after an integer's bounds (Annotated[int, Field(ge=1), JsonInteger]): before them, the schema loses them.
JsonInteger = BeforeValidator(_json_integer)
DateTime = Annotated[datetime, BeforeValidator(_json_date_time)]


def _unique_in_order(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


Tags = Annotated[
    list[Tag],
    Field(max_length=MAX_TAGS),
    AfterValidator(_unique_in_order),
]


def _depth_and_nul(value: Any, depth: int = 1) -> None:
    """Raise ValueError when ``value`` nests deeper than MAX_DEPTH or holds a NUL character."""
    if depth > MAX_DEPTH:
        raise ValueError(f"content nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                raise ValueError("content contains the character \\u0000, which PostgreSQL cannot store")
            _depth_and_nul(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _depth_and_nul(item, depth + 1)
    elif isinstance(value, str) and "\x00" in value:
        raise ValueError("content contains the character \\u0000, which PostgreSQL cannot store")


def _check_content(value: dict[str, Any]) -> dict[str, Any]:
    _depth_and_nul(value)
    return value


Content = Annotated[
    dict[str, Any],
    AfterValidator(_check_content),
    Field(description="At most 64 KiB as JSON, depth 32."),
]


MAX_KEY_ORDER = 256  # keys past these seldom reach the 2,000 characters the model reads of a card (semantic.card_text)
MAX_KEY_ORDER_BYTES = 16 * 1024  # and at most this much JSON: each path repeats its parents' keys, which may be long

KeyPath = list[str | int]


def key_order(content: dict[str, Any]) -> list[KeyPath]:
    """The paths of ``content``'s keys, depth first, in the order they were written (at most MAX_KEY_ORDER, and
    MAX_KEY_ORDER_BYTES as JSON): what jsonb forgets, and what the text a card is embedded from is ordered by
    (schema/0023_key_order.sql). Keys past either bound are read in jsonb's order."""
    paths: list[KeyPath] = []
    budget = MAX_KEY_ORDER_BYTES

    def walk(value: Any, path: KeyPath) -> bool:
        nonlocal budget
        if isinstance(value, dict):
            for key, item in value.items():
                budget -= len(json.dumps([*path, key]))
                if len(paths) >= MAX_KEY_ORDER or budget < 0:
                    return False
                paths.append([*path, key])
                if not walk(item, [*path, key]):
                    return False
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if not walk(item, [*path, index]):
                    return False
        return True

    walk(content, [])
    return paths


def canonical_json(content: dict[str, Any]) -> str:
    """The serialization the content hash is taken over (SPEC section 2)."""
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_hash(content: dict[str, Any], *, max_bytes: int = DEFAULT_MAX_CONTENT_BYTES) -> str:
    """SHA-256 of the canonical JSON of ``content``, after checking every content rule of SPEC section 2."""
    return encode_content(content, max_bytes=max_bytes)[1]


def encode_content(
    content: dict[str, Any], *, max_bytes: int = DEFAULT_MAX_CONTENT_BYTES, validated: bool = False
) -> tuple[str, str]:
    """The canonical JSON of ``content`` and its SHA-256, checking every content rule of SPEC section 2 (with
    ``validated``, the depth and NUL rules are known to hold already: the content passed the ``Content`` type).
    The text is what the database stores, so it is serialized once."""
    if not validated:
        _check_content_or_raise(content)
    try:
        text = canonical_json(content)
        encoded = text.encode()
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise InvalidArgument(
            "content is not plain JSON (NaN, Infinity or an unpaired surrogate)",
            hint="Send content as a JSON object of strings, numbers, booleans, null, lists and objects.",
        ) from exc
    if len(encoded) > max_bytes:
        raise InvalidArgument(
            f"content is {len(encoded)} bytes serialized; the limit is {max_bytes}",
            hint="Split the content into several smaller cards, or keep only what a writer needs.",
        )
    return text, hashlib.sha256(encoded).hexdigest()


def _check_content_or_raise(content: dict[str, Any]) -> None:
    if not isinstance(content, dict):
        raise InvalidArgument("content must be a JSON object", hint="Wrap the content in an object: {...}.")
    try:
        _depth_and_nul(content)
    except ValueError as exc:
        raise InvalidArgument(str(exc), hint="Remove NUL characters and flatten deeply nested content.") from exc


class NewCard(BaseModel):
    """A card as an agent sends it, before the server gives it an id."""

    model_config = ConfigDict(extra="forbid")

    card_type: CardType
    title: Title
    content: Content
    tags: Tags = Field(default_factory=list)


class Card(BaseModel):
    """A stored card, as every tool returns it."""

    id: UUID
    card_type: CardType
    title: str
    content: dict[str, Any]
    tags: list[str]
    version: int
    content_hash: str
    created_at: datetime
    updated_at: datetime


# Figures as a reader takes them in: a score to 3 decimals, a duration to 0.1 ms. Rounded when written out (the
# tools' results, `card-mcp usage --format json|csv`), never in the value: a search cursor pages on the exact score.
Score = Annotated[float, PlainSerializer(lambda value: round(value, 3), return_type=float)]
Milliseconds = Annotated[float, PlainSerializer(lambda value: round(value, 1), return_type=float)]


class ScoredCard(Card):
    """A search hit: the card and how well it matched (0..1; 0 when listing without a query)."""

    score: Score


class CreateCardResult(BaseModel):
    """What create_card returns: ``existing`` when an active card of the type already had this content."""

    status: Literal["created", "existing"]
    card: Card


class CardResult(BaseModel):
    """One card, as get_card and update_card return it."""

    card: Card


class SearchCardsResult(BaseModel):
    """One page of hits; pass ``next_cursor`` back (with the same arguments) for the next page."""

    cards: list[ScoredCard]
    next_cursor: str | None


class DeleteCardResult(BaseModel):
    """The soft-deleted card's id and when it was deleted."""

    card_id: UUID
    deleted_at: datetime


class ChangedBy(BaseModel):
    """Who made a change: over HTTP the API key (id and label) or OAuth connection, over stdio the client; for a
    change made outside card-mcp's tools (transport ``database``), client_name is the database role."""

    transport: Literal["stdio", "http", "memory", "cli", "database"]
    api_key_id: UUID | None = None
    api_key_label: str | None = None
    connection_id: UUID | None = None
    client_name: str | None = None
    client_version: str | None = None


HistoryOp = Literal["create", "update", "delete", "restore", "import"]


class CardVersion(BaseModel):
    """A card as one change left it; ``changed_fields``: those that differ from the version before."""

    version: int
    op: HistoryOp
    title: str
    content: dict[str, Any]
    tags: list[str]
    content_hash: str
    changed_at: datetime
    # Listed as an object: its keys are plain in every value, and tools/list is read by every conversation.
    changed_by: Annotated[ChangedBy, WithJsonSchema({"type": "object"})]
    changed_fields: list[Literal["title", "content", "tags"]]


class CardHistoryResult(BaseModel):
    """One page of a card's versions, newest first; pass ``next_cursor`` back for older ones."""

    versions: list[CardVersion]
    next_cursor: str | None


class BatchItemResult(BaseModel):
    """The outcome for ``cards[index]`` of a batch."""

    index: int
    status: Literal["created", "existing"]
    card_id: UUID


class BatchCreateResult(BaseModel):
    """What batch_create_cards returns; ``replayed`` is true when an idempotency key replayed a stored answer."""

    results: list[BatchItemResult]
    created: int
    existing: int
    replayed: bool


class UsageStatsRow(BaseModel):
    """Figures for one group of calls: a tool name, card id, ISO date or client name."""

    key: str
    calls: int
    errors: int
    p50_ms: Milliseconds
    p95_ms: Milliseconds
    last_at: datetime


class UsageStatsResult(BaseModel):
    """Usage figures of this tenant, most-called first (newest day first when grouped by day)."""

    rows: list[UsageStatsRow]


class Tenant(BaseModel):
    """A brand's workspace: every card belongs to exactly one."""

    tenant_id: UUID
    name: str
    created_at: datetime
