"""Start-up time of `card-mcp serve` over stdio: from launch to the answer of tools/list, on a fresh data
directory (initdb + migrations) and on an existing one, against the same measure for a bare MCPServer with one
no-op tool (the floor: Python, the SDK and the stdio handshake). Prints a table of ratios.

    python bench/startup.py [--runs 5] [--before /path/to/another/card-mcp]

The measures are interleaved (floor, then each server, in every run), so that a shared machine's changing load
weighs on all of them alike; ``--before`` adds another installation's `card-mcp` (e.g. main's) to compare.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

CARD_MCP = str(Path(sys.executable).parent / "card-mcp")
# A bare MCPServer with one no-op tool: the floor of every benchmark of calls (bench/calls.py serves it over HTTP).
FLOOR_TOOL = textwrap.dedent(
    """
    import sys
    from mcp.server import MCPServer
    server = MCPServer("floor")

    @server.tool()
    async def noop() -> str:
        return "ok"
    """
)
FLOOR_SERVER = FLOOR_TOOL + 'server.run("stdio")\n'


async def until_tools_listed(params: StdioServerParameters) -> float:
    started = time.perf_counter()
    async with Client(params, mode="legacy") as client:
        await client.list_tools()
        elapsed = time.perf_counter() - started
    return elapsed


def data_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="card-mcp-bench-", dir="/tmp"))
    path.chmod(0o755)  # reachable by the embedded PostgreSQL's service user when run as root
    return path


async def measure(runs: int, servers: dict[str, str]) -> dict[str, list[float]]:
    """Seconds to the first tools/list answer, per run: the floor, and for each server a fresh data dir and an
    existing one (its second start)."""
    floor_file = Path(tempfile.mkdtemp()) / "floor.py"
    floor_file.write_text(FLOOR_SERVER)
    floor_params = StdioServerParameters(command=sys.executable, args=[str(floor_file)])
    times: dict[str, list[float]] = {"floor": []}
    for _ in range(runs):
        times["floor"].append(await until_tools_listed(floor_params))
        for label, command in servers.items():
            folder = data_dir()
            params = StdioServerParameters(command=command, args=["serve"], env={"CARD_MCP_DATA_DIR": str(folder)})
            times.setdefault(f"{label}, fresh data dir (initdb)", []).append(await until_tools_listed(params))
            times.setdefault(f"{label}, existing data dir", []).append(await until_tools_listed(params))
            shutil.rmtree(folder, ignore_errors=True)
    return times


async def main(runs: int, before: str | None) -> None:
    servers = {"card-mcp serve": CARD_MCP} if before is None else {"before": before, "after": CARD_MCP}
    times = await measure(runs, servers)
    base = statistics.median(times["floor"])
    print(f"{'what':<44} {'median s':>9} {'max s':>7} {'floor s':>8} {'ratio':>6}")
    for name, values in times.items():
        median = statistics.median(values)
        label = "bare MCPServer, no-op tool (floor)" if name == "floor" else name
        print(f"{label:<44} {median:>9.2f} {max(values):>7.2f} {base:>8.2f} {median / base:>6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", help="another installation's card-mcp executable, measured beside this one")
    arguments = parser.parse_args()
    anyio.run(main, arguments.runs, arguments.before)
