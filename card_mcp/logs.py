"""Log lines a client cannot forge or flood: client text reaches the log (a URI, a Host header, the SDK's own
messages) and a newline in it would start a line of its own, a 5 MB URI a 5 MB line. ``clean`` escapes control
characters and bounds the length; ``keep_lines_clean`` puts it on every record of the server's handlers, the
traceback included (each of its lines marked as a continuation, so none can pass for a record of its own)."""

from __future__ import annotations

import logging

MAX_MESSAGE = 2000  # characters of one record's message
MAX_TRACEBACK = 8000  # characters of its traceback, head and tail kept

_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def clean(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line: control characters (C0, DEL, C1, line and paragraph separators) escaped, at most
    ``limit`` characters kept and what was cut counted."""
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    escaped = text.translate(_ESCAPES)
    if not escaped.isprintable():  # rarer: C1 controls, U+2028, bidi and other format characters
        escaped = "".join(ch if ch.isprintable() or ch == " " else f"\\u{ord(ch):04x}" for ch in escaped)
    return escaped + (f"... [{cut} more characters]" if cut > 0 else "")


class _Clean(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = clean(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            text = record.exc_text
            if len(text) > MAX_TRACEBACK:
                half = MAX_TRACEBACK // 2
                text = f"{text[:half]}\n... [{len(text) - MAX_TRACEBACK} characters]\n{text[-half:]}"
            record.exc_text = "\n".join("  | " + clean(line, MAX_TRACEBACK) for line in text.splitlines())
        return True


def keep_lines_clean(handlers: list[logging.Handler]) -> None:
    """Clean every record these handlers write (the server's stderr handler)."""
    for handler in handlers:
        if not any(isinstance(f, _Clean) for f in handler.filters):
            handler.addFilter(_Clean())
