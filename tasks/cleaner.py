"""The guarded page cleaner: `tasks.clean` in a child process, with a size cap and a wall-clock budget.

A page that is too large, takes too long (the cleaner is killed and restarted) or fails is skipped
with its reason. Killing a process is the one guard that also stops mwparserfromhell's C
tokenizer, and it works from any thread (a Prefect task runner thread included), unlike signals.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import subprocess
import sys
import threading
import time

import tasks
from storage.errors import RagindexError
from tasks.clean import CleanOptions, options_to_json, read_frame, write_frame


class GuardedCleaner:
    """Cleans pages in a child process; enforces the size cap and the time budget from outside.

    The child is a plain `python -m tasks.clean` subprocess speaking length-prefixed frames on its
    pipes: no pickling, no re-import of the caller's `__main__`, safe to start from any thread.
    """

    _all: list[GuardedCleaner] = []

    def __init__(self, options: CleanOptions) -> None:
        self.options = options
        self._proc: subprocess.Popen | None = None
        self._deadline = 0.0
        self._broken = False  # the last request could not be sent
        GuardedCleaner._all.append(self)

    def _start(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(tasks.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.clean"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, bufsize=0, env=env, close_fds=True)
        write_frame(self._proc.stdin, options_to_json(self.options).encode())
        if read_frame(self._proc.stdout) != b"ready":
            self.close()
            raise RagindexError("the page cleaner process failed to start (run `python -m tasks.clean` to see why)")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def clean(self, text: str) -> tuple[str | None, str | None]:
        """(plain text, None) or (None, skip reason)."""
        return self.result() if self.submit(text) else (None, "too_large")

    def submit(self, text: str) -> bool:
        """Hand one page to the cleaner (False: over the size cap, not sent). Collect it with `result`.

        Between the two calls the caller may parse the next page: XML parsing and cleaning overlap.
        """
        if len(text) > self.options.max_page_chars:
            return False
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start()
        try:
            write_frame(self._proc.stdin, text.encode("utf-8", "replace"))
        except OSError:
            self._broken = True
        self._deadline = time.monotonic() + self.options.page_timeout_s
        return True

    def result(self) -> tuple[str | None, str | None]:
        proc, reply = self._proc, None
        if not self._broken and proc is not None:
            try:
                ready, _, _ = select.select([proc.stdout], [], [], max(0.0, self._deadline - time.monotonic()))
                if not ready:
                    self.close()  # stuck (maybe inside C): the only sure stop is to kill it
                    return None, "timeout"
                reply = read_frame(proc.stdout)
            except OSError:
                reply = None
        self._broken = False
        if reply is None:
            self.close()  # the cleaner died on this page (crash, out of memory)
            return None, "parse_error"
        return (reply[1:].decode(), None) if reply[:1] == b"o" else (None, "parse_error")


_local = threading.local()


def cleaner_for(options: CleanOptions) -> GuardedCleaner:
    """One cleaner per thread, reused across units (its start-up costs a Python interpreter)."""
    cleaner = getattr(_local, "cleaner", None)
    if cleaner is None or cleaner.options != options:
        if cleaner is not None:
            cleaner.close()
        cleaner = _local.cleaner = GuardedCleaner(options)
    return cleaner


@atexit.register
def _close_cleaners() -> None:
    for cleaner in GuardedCleaner._all:
        cleaner.close()
