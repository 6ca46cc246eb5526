"""What commands print: rows as a table, JSON or CSV on stdout, and a progress bar on stderr."""

from __future__ import annotations

import csv
import json
import sys
import time
from typing import Any

from .models import CardVersion, ChangedBy


class ProgressBar:
    """A progress bar on stderr: redrawn in place on a terminal, a line every 10% otherwise (logs, CI)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()
        self.shown = -1

    def update(self, done: int, total: int) -> None:
        percent = 100 if total == 0 else done * 100 // total
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        filled = percent * 30 // 100
        line = f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {percent:3d}% {done}/{total} ({rate:.1f}/s)"
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif percent // 10 > self.shown // 10 or (percent == 100 and self.shown != 100):
            print(line, file=sys.stderr, flush=True)
        self.shown = percent

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def print_rows(rows: list[dict[str, Any]], fmt: str, *, key: str) -> None:
    if fmt == "json":
        print(json.dumps({key: rows}, separators=(",", ":")))  # one line, for pipelines
        return
    if fmt == "csv":
        if rows:
            writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return
    if not rows:
        print(f"no {key}", file=sys.stderr)
        return
    columns = list(rows[0])
    cells = [{c: "" if r[c] is None else str(r[c]) for c in columns} for r in rows]  # JSON's null, blank here
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in cells:
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())


def print_history(versions: list[CardVersion], fmt: str, *, card: str, tenant: str | None) -> None:
    """A card's versions (card-mcp history): every field as JSON, or a table of who changed what, when."""
    if fmt == "json":
        print_rows([{"tenant": tenant, **v.model_dump(mode="json")} for v in versions], "json", key="versions")
        return
    rows = [
        {
            "version": v.version,
            "op": v.op,
            "changed_at": v.changed_at.isoformat(timespec="seconds"),
            "changed_by": _who(v.changed_by),
            "changed": ",".join(v.changed_fields),
            "title": _printable(v.title),  # written by agents: no terminal control characters
        }
        for v in versions
    ]
    print(f"card {card} of tenant {tenant!r}", file=sys.stderr)
    print_rows(rows, "table", key="versions")


def _who(by: ChangedBy) -> str:
    """A version's author in one cell: the key's label and id over HTTP, else the client and its version."""
    if by.api_key_id is not None:
        who = f"key {by.api_key_label or '(no label)'} {by.api_key_id}"
    elif by.connection_id is not None:
        who = f"oauth {by.connection_id} {by.client_name or ''}"
    else:
        who = " ".join(part for part in (by.client_name, by.client_version) if part)
    return _printable(f"{by.transport}: {who}".strip())


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)
