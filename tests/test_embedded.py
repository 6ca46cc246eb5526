"""The zero-setup PostgreSQL: shared by processes, stopped by the last, refusing foreign data directories,
and reachable through a plain `pip install .`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from card_mcp.embedded import EmbeddedPostgres
from tests.conftest import make_tempdir

ROOT = Path(__file__).resolve().parent.parent

HOLDER = """
import sys
from pathlib import Path
from card_mcp.embedded import EmbeddedPostgres
pg = EmbeddedPostgres(Path(sys.argv[1]))
pg.start()
print("ready", flush=True)
sys.stdin.read()
pg.stop()
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    folder = make_tempdir("card-mcp-data-")
    try:
        yield folder
    finally:
        pg = EmbeddedPostgres(folder)
        if pg.is_running():  # never leave a server behind, even when a test fails
            subprocess.run(
                [pg._bin("pg_ctl"), "stop", "-D", str(pg.pgdata), "-m", "immediate"],
                capture_output=True,
                check=False,
                **pg._run_as(),
            )
        shutil.rmtree(folder, ignore_errors=True)


def postgres_processes(pgdata: Path) -> list[int]:
    """PIDs of postmasters serving ``pgdata``, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"postgres") and str(pgdata).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def start_holder(data_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def finish(proc: subprocess.Popen[str], *, kill: bool = False) -> int:
    """End a holder (by closing its stdin, or SIGKILL) and close its pipes; its exit status."""
    if kill:
        proc.kill()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
    return proc.wait(timeout=60)


def test_two_processes_share_one_server_and_the_survivor_of_a_kill_stops_it(data_dir: Path) -> None:
    first = start_holder(data_dir)
    second = start_holder(data_dir)
    pgdata = data_dir / "pgdata"
    assert len(postgres_processes(pgdata)) == 1
    finish(first, kill=True)  # SIGKILL: no clean-up at all
    assert EmbeddedPostgres(data_dir).is_running()  # the second still uses it
    assert finish(second) == 0
    assert postgres_processes(pgdata) == []
    assert not EmbeddedPostgres(data_dir).is_running()


def test_the_last_process_to_exit_stops_the_server_whichever_started_it(data_dir: Path) -> None:
    first = start_holder(data_dir)
    second = start_holder(data_dir)
    assert finish(first) == 0  # the one that started the server leaves first
    assert EmbeddedPostgres(data_dir).is_running()
    assert finish(second) == 0
    assert postgres_processes(data_dir / "pgdata") == []


def test_a_server_orphaned_by_killed_processes_is_adopted_and_stopped(data_dir: Path) -> None:
    orphaner = start_holder(data_dir)
    finish(orphaner, kill=True)
    assert EmbeddedPostgres(data_dir).is_running()
    survivor = start_holder(data_dir)
    assert finish(survivor) == 0
    assert postgres_processes(data_dir / "pgdata") == []


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_mode) for p in sorted(folder.rglob("*"))}


def test_a_data_directory_of_another_major_version_is_refused_untouched(data_dir: Path) -> None:
    pgdata = data_dir / "pgdata"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("17\n")
    (pgdata / "base").mkdir()
    before = snapshot(data_dir)
    result = subprocess.run(
        [sys.executable, "-m", "card_mcp.cli", "migrate"],
        env={**os.environ, "CARD_MCP_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "PostgreSQL 17" in result.stderr and "upgrade" in result.stderr.lower()
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(data_dir) == before


def test_pip_install_then_migrate_and_db_url_work_with_no_other_setup(data_dir: Path, tmp_path: Path) -> None:
    """A non-editable install must carry schema/ inside the wheel and the console script."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The fresh venv borrows this environment's dependencies, so the test needs no network; `.ci/run` does
    # the full `pip install .` from the registry as the README says.
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("card_mcp-*.whl"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "CARD_MCP_DATA_DIR": str(data_dir)}
    elsewhere = tmp_path  # not the source checkout: schema/ must come from the wheel
    migrated = subprocess.run(
        [str(venv / "bin" / "card-mcp"), "migrate"], env=env, cwd=elsewhere, capture_output=True, text=True
    )
    assert migrated.returncode == 0, migrated.stderr
    assert "applied: 0001_foundation" in migrated.stdout
    check = subprocess.run(
        [str(venv / "bin" / "card-mcp"), "migrate", "--check"],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    url = subprocess.run(
        [str(venv / "bin" / "card-mcp"), "db", "url"], env=env, cwd=elsewhere, capture_output=True, text=True
    )
    assert url.returncode == 0
    assert url.stdout.strip().startswith("postgresql://card_mcp_analyst@/card_mcp?host=")  # people get the analyst
    assert postgres_processes(data_dir / "pgdata") == []
