"""Lock files private to the user who runs card-mcp: their folder 0700 and each file 0600, both this user's, so
that no other local user can take a lock and hang every command (embedded.py's control and users locks).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import stat
import time
from pathlib import Path
from typing import IO

from .errors import SetupError


def user_name() -> str:
    """This process's user, as the hints name it."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def open_private(folder: Path, name: str) -> IO[bytes]:
    """The lock file ``name`` of ``folder``, opened for this process (both made 0700 and 0600 if new). A folder or
    file another user owns, or a link, is refused: whoever owns it could take the lock."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise SetupError(
                f"{folder} is not a folder of this user's",
                hint=f"Remove it; card-mcp makes it again, private (0700) to {user_name()}.",
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            folder.chmod(0o700)
        fd = os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SetupError(
            f"cannot open the lock file {folder / name}: {exc.strerror}",
            hint=f"Check that {folder} belongs to {user_name()} and is not a link.",
        ) from exc
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:  # made by an older card-mcp, or under another umask
        os.fchmod(fd, 0o600)
    return os.fdopen(fd, "r+b")


def wait_exclusive(handle: IO[bytes], seconds: float) -> None:
    """An exclusive lock on ``handle``, waited for at most ``seconds`` (TimeoutError after), polling: a blocking
    flock could not be given up."""
    deadline = time.monotonic() + seconds
    delay = 0.01
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
