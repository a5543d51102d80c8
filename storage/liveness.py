"""Whether the process that wrote a record (a lease, a scratch directory) is gone: judged only where it can
be, on this machine during this boot, by its pid (`storage.lock`, `storage.scratch`)."""

from __future__ import annotations

import os
import socket
from typing import Any


def boot_id() -> str | None:
    """This boot of this machine (Linux); None where the kernel does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def this_process() -> dict[str, Any]:
    """What `died_on_this_boot` needs to judge the calling process later."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": boot_id()}


def died_on_this_boot(held: dict[str, Any]) -> bool:
    """True only for a record written on this host during this boot by a pid that no longer exists."""
    boot = boot_id()
    if boot is None or held.get("boot_id") != boot or held.get("host") != socket.gethostname():
        return False
    pid = held.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False
