"""Local scratch space that no other user can read, plant or predict, and that a killed run does not leak.

Everything lives under one directory per user in the system temp directory (`$TMPDIR/ragindex-<uid>`,
mode 0700, refused when it is a link, another user's, or open to others: whoever planted it could read or
swap our files). Inside, each process has its run directory (`tempfile.mkdtemp`: unpredictable name,
created exclusively, 0700) with an `owner.json` naming its pid, host and boot; inside that, `scratch_dir`
makes the directories a step asks for, and `run_dir` is where upload temp files go (`storage.fs`). A run
removes its directory when it exits; one killed before (SIGKILL, OOM) is swept by the next run on this
machine, as soon as its pid is gone (`storage.liveness`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import threading
import time

from storage.errors import RagindexError
from storage.liveness import died_on_this_boot, this_process

log = logging.getLogger(__name__)

_OWNER = "owner.json"
_RUN_PREFIX = "run-"
_UNOWNED_GRACE_S = 24 * 3600  # a run dir killed before it wrote its owner.json: swept once this old
_lock = threading.Lock()
_runs: dict[int, str] = {}  # pid -> its run directory (a forked child makes its own)


def private_dir(path: str, tighten: bool = True, what: str = "directory", hint: str = "") -> str:
    """Create `path` 0700 if needed and return it; refuse one owned by another user (or reachable by a
    symlink), so nobody else can plant or read files in it. `tighten` makes an existing one 0700 (not
    done to a base directory the user named). The checks and the chmod act on one open descriptor of the
    directory, never on its name again: a name swapped for a link in between changes nothing."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # ELOOP: a symlink; ENOTDIR: not a directory
        raise RagindexError(f"{what} {path} is not a plain directory: refusing to use it{hint}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise RagindexError(f"{what} {path} is owned by uid {st.st_uid}, not by this user ({os.getuid()}): "
                                f"refusing to use it{hint}")
        if tighten and st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def scratch_root() -> str:
    """This user's private scratch directory, created 0700 if absent; `RagindexError` if it is not ours alone."""
    return private_dir(os.path.join(tempfile.gettempdir(), f"ragindex-{os.getuid()}"), what="scratch directory",
                       hint=" (remove it, or set TMPDIR to a directory of your own)")


def run_dir() -> str:
    """This process's run directory (made, after sweeping dead runs' directories, on first use)."""
    pid = os.getpid()
    with _lock:
        if pid not in _runs:
            root = scratch_root()
            sweep(root)
            path = tempfile.mkdtemp(prefix=f"{_RUN_PREFIX}{pid}-", dir=root)
            with open(os.path.join(path, _OWNER), "x") as f:
                json.dump(this_process(), f)
            _runs[pid] = path
            atexit.register(_remove_own, pid, path)
        return _runs[pid]


def scratch_dir(prefix: str) -> str:
    """A new private directory (0700, unpredictable name) for a step's local scratch; the caller removes it
    when done, and the run's exit (or the next run, after a kill) removes whatever is left."""
    return tempfile.mkdtemp(prefix=prefix, dir=run_dir())


def sweep(root: str) -> list[str]:
    """Remove the run directories under `root` of processes that are gone; returns their paths."""
    swept = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not name.startswith(_RUN_PREFIX) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if _abandoned(path):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed scratch %s of a run that is gone", path)
            swept.append(path)
    return swept


def _remove_own(pid: int, path: str) -> None:
    if os.getpid() == pid:  # a forked child inherits the parent's exit hooks: not its directory to remove
        shutil.rmtree(path, ignore_errors=True)


def _abandoned(path: str) -> bool:
    try:
        with open(os.path.join(path, _OWNER)) as f:
            owner = json.load(f)
    except FileNotFoundError:
        try:
            return time.time() - os.lstat(path).st_mtime > _UNOWNED_GRACE_S
        except FileNotFoundError:
            return False  # swept by another run meanwhile
    except (OSError, ValueError):
        return False
    return isinstance(owner, dict) and died_on_this_boot(owner)
