"""Stored JSON read into Python: what json and jsonb columns decode to on every connection (db.py sets the codec),
including what Python can read only in part.
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from typing import Any

import pydantic_core

logger = logging.getLogger(__name__)


class LossyContent(dict[str, Any]):
    """Stored JSON that Python reads only in part: integers of more than 4,300 digits (read as decimals, shown as
    text), or nesting deeper than its parser goes (shown as a note). A query never fails on such a row (one row
    would otherwise fail a whole page of search results); writing it back unchanged is refused instead
    (cards.update_card), since it is not what is stored."""


_UNREADABLE = {
    "card_mcp_unreadable": "this content is stored, but nested more deeply than card-mcp can read; replace it "
    "with update_card"
}


def read_json(text: str) -> Any:
    """A json/jsonb value: Python's own reading, or for what it cannot read, a LossyContent (logged)."""
    try:
        # pydantic's parser reads a card's content in half the time of json.loads, to the same values; what it
        # refuses (nesting past 200 levels, integers past 4,300 digits) goes on to Python's own reader below.
        return pydantic_core.from_json(text)
    except ValueError:
        pass
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        value = json.loads(text, parse_int=_int_or_decimal)
    except (ValueError, RecursionError) as exc:
        logger.warning("a stored JSON value of %d characters cannot be read (%s): shown as a note", len(text), exc)
        return LossyContent(_UNREADABLE)
    logger.warning("a stored JSON value of %d characters holds integers too long to read: shown as text", len(text))
    return LossyContent(value) if isinstance(value, dict) else value


def _int_or_decimal(digits: str) -> int | Decimal:
    # Python refuses to read integers over 4,300 digits (sys.get_int_max_str_digits): a decimal reads them as text.
    return int(digits) if len(digits) <= 4000 else Decimal(digits)
