"""Start-up time of `card-mcp serve` over stdio: from launch to the answer of tools/list, on a fresh data
directory (initdb + migrations) and on an existing one, against the same measure for a bare MCPServer with one
no-op tool (the floor: Python, the SDK and the stdio handshake). Prints a table of ratios.

    python bench/startup.py [--runs 5]
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


async def measure(runs: int) -> dict[str, list[float]]:
    """Seconds to the first tools/list answer, per run: the floor, a fresh data dir, an existing one."""
    floor_file = Path(tempfile.mkdtemp()) / "floor.py"
    floor_file.write_text(FLOOR_SERVER)
    floor = [
        await until_tools_listed(StdioServerParameters(command=sys.executable, args=[str(floor_file)]))
        for _ in range(runs)
    ]
    fresh, warm = [], []
    for _ in range(runs):
        folder = data_dir()
        params = StdioServerParameters(command=CARD_MCP, args=["serve"], env={"CARD_MCP_DATA_DIR": str(folder)})
        fresh.append(await until_tools_listed(params))
        warm.append(await until_tools_listed(params))
        shutil.rmtree(folder, ignore_errors=True)
    return {"floor": floor, "fresh": fresh, "warm": warm}


async def main(runs: int) -> None:
    times = await measure(runs)
    floor, fresh, warm = times["floor"], times["fresh"], times["warm"]
    base = statistics.median(floor)
    print(f"{'what':<44} {'median s':>9} {'max s':>7} {'floor s':>8} {'ratio':>6}")
    for name, values in (
        ("bare MCPServer, no-op tool (floor)", floor),
        ("card-mcp serve, fresh data dir (initdb)", fresh),
        ("card-mcp serve, existing data dir", warm),
    ):
        median = statistics.median(values)
        print(f"{name:<44} {median:>9.2f} {max(values):>7.2f} {base:>8.2f} {median / base:>6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    anyio.run(main, parser.parse_args().runs)
