"""Every error card-mcp raises on purpose, under one base class.

    CardMcpError                      code, one-line message, hint for the caller
    ├── InvalidArgument               invalid_argument: the input breaks a rule of the card contract
    ├── NotFound                      not_found: no such card for this tenant (missing, deleted or foreign alike)
    ├── Conflict                      conflict: a stale expected_version, or a concurrent call holds the resource
    ├── DuplicateContent              duplicate_content: another active card of the type has this content
    ├── IdempotencyConflict           idempotency_conflict: the key was used with a different request
    ├── LimitExceeded                 limit_exceeded: a size, count or rate limit
    ├── Unavailable                   unavailable: the database is unreachable or timed out
    ├── Internal                      internal: a bug or an unexpected database state (details only in the log)
    └── SetupError                    the server cannot start or a command cannot run (never sent to a client)
        └── UnsafeRoleError           the application role could escape row-level security

asyncpg errors become these in ``db.py``; these become MCP tool errors only in ``server.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CardMcpError(Exception):
    """Base of card-mcp's own errors: a stable ``code``, a one-line ``message`` and a ``hint``."""

    code: ClassVar[str] = "internal"
    default_hint: ClassVar[str] = "This is a bug in card-mcp; the server log has the details."

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def to_payload(self) -> dict[str, Any]:
        """The fixed error shape of the MCP contract: ``{"error": {"code", "message", "hint"}}``."""
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint}}


class InvalidArgument(CardMcpError):
    code = "invalid_argument"
    default_hint = "Fix the argument as the message says and call again."


class NotFound(CardMcpError):
    code = "not_found"
    default_hint = "Check the id, or use search_cards to find the card; deleted cards cannot be read."


class Conflict(CardMcpError):
    code = "conflict"
    default_hint = "Read the card again with get_card and retry with its current version."


class DuplicateContent(CardMcpError):
    code = "duplicate_content"
    default_hint = "Another active card of this type already has this content: update that card instead."

    def __init__(self, message: str, *, card_id: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.card_id = card_id


class IdempotencyConflict(CardMcpError):
    code = "idempotency_conflict"
    default_hint = "Use a new idempotency_key for a different request."


class LimitExceeded(CardMcpError):
    code = "limit_exceeded"
    default_hint = "Send less at once, or wait a moment and retry."


class Unavailable(CardMcpError):
    code = "unavailable"
    default_hint = "The card store is unreachable or busy; retry in a few seconds."


class Internal(CardMcpError):
    code = "internal"


class SetupError(CardMcpError):
    """The server cannot start, or a command cannot do its work; the message says what to do."""

    code = "setup"
    default_hint = ""


class UnsafeRoleError(SetupError):
    """The application role could bypass row-level security, so card-mcp refuses to use it."""
