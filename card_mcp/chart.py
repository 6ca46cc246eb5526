"""`card-mcp usage --chart FILE`: calls and errors per day by tool, as PNG, SVG or a self-contained HTML page.

matplotlib is an optional extra (`pip install 'card-mcp[chart]'`), imported only when a chart is asked for.
"""

from __future__ import annotations

import html
import importlib.util
import io
import os
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from .errors import InvalidArgument, SetupError
from .usage import DailyCalls

FORMATS = (".png", ".svg", ".html")


def check_target(path: Path) -> None:
    """Refuse, before any figure is read or printed, a chart that could not be written: an unknown suffix, a
    folder that does not exist, or no matplotlib."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidArgument(
            f"cannot write a chart as {suffix or 'a file without a suffix'}",
            hint="Name the file .png, .svg or .html.",
        )
    folder = path.parent
    if not folder.is_dir():
        raise InvalidArgument(f"--chart: there is no folder {folder}", hint="Create it, or name a file in another.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgument(f"--chart: cannot write in {folder}", hint="Name a file in a folder you can write.")
    if importlib.util.find_spec("matplotlib") is None:
        raise SetupError("--chart needs matplotlib, which is not installed", hint="pip install 'card-mcp[chart]'")


def write_chart(path: Path, series: Sequence[DailyCalls], *, first: date, last: date, title: str) -> None:
    """Two stacked bar charts sharing the day axis, from ``first`` to ``last`` (UTC days, both included): calls
    per day by tool, and errors per day by tool."""
    check_target(path)
    suffix = path.suffix.lower()
    from matplotlib.figure import Figure

    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    tools = sorted({point.tool for point in series})
    calls = {(p.day, p.tool): p.calls for p in series}
    errors = {(p.day, p.tool): p.errors for p in series}

    figure = Figure(figsize=(max(8.0, min(24.0, len(days) * 0.35)), 7.0), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    positions = list(range(len(days)))
    _stacked(top, positions, days, tools, calls)
    _stacked(bottom, positions, days, tools, errors)
    top.set_title(title)
    top.set_ylabel("calls")
    bottom.set_ylabel("errors")
    if tools:
        top.legend(loc="upper left", fontsize="small", ncols=min(4, len(tools)))
    else:
        top.text(0.5, 0.5, "no calls in this window", ha="center", va="center", transform=top.transAxes)
    step = max(1, len(days) // 15)
    bottom.set_xticks(positions[::step], [d.isoformat() for d in days[::step]], rotation=45, ha="right")

    if suffix == ".html":
        svg = io.StringIO()
        figure.savefig(svg, format="svg")
        path.write_text(_page(title, svg.getvalue()), encoding="utf-8")
    else:
        figure.savefig(path, format=suffix.removeprefix("."), dpi=120)


def _stacked(axes: Any, positions: list[int], days: list[date], tools: list[str], values: dict[Any, int]) -> None:
    from matplotlib.ticker import MaxNLocator

    base = [0] * len(days)
    for tool in tools:
        heights = [values.get((day, tool), 0) for day in days]
        axes.bar(positions, heights, bottom=base, label=tool, width=0.8)
        base = [b + h for b, h in zip(base, heights, strict=True)]
    axes.grid(axis="y", alpha=0.3)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.2 of a call
    axes.set_ylim(bottom=0)


def _page(title: str, svg: str) -> str:
    start = svg.find("<svg")  # drop the XML prolog and doctype: the SVG goes inline
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n<body>\n{svg[start:]}\n</body></html>\n"
    )
