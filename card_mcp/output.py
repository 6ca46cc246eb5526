"""What commands print: rows as a table, JSON or CSV on stdout, and a progress bar on stderr."""

from __future__ import annotations

import csv
import json
import sys
import time
from typing import Any


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
