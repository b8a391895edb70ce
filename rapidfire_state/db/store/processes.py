"""Which process made a claim, and whether it is still there (this host only)."""

from __future__ import annotations

import os
import socket
from typing import Optional

#: this host's name, as history rows, claims and shm_objects rows record it
#: (``RF_HOST`` overrides the OS host name; read it as ``processes.HOST`` at call time)
HOST = os.environ.get("RF_HOST") or socket.gethostname()


def process_start_time(pid: int) -> Optional[float]:
    """The OS start time of ``pid`` on this host, or None when it cannot be read."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


_OWN_PROCESS: Optional[tuple[int, Optional[float]]] = None


def own_process() -> tuple[int, Optional[float]]:
    """This process's pid and OS start time, for the claims it makes.

    Cached per pid: one psutil call per process, and a forked child (another
    pid) computes its own.
    """
    global _OWN_PROCESS
    pid = os.getpid()
    cached = _OWN_PROCESS
    if cached is None or cached[0] != pid:
        cached = (pid, process_start_time(pid))
        _OWN_PROCESS = cached
    return cached


def gone_here(host: Optional[str], pid: Optional[int], process_started_at: Optional[float]) -> Optional[str]:
    """Why the process ``pid`` started at ``process_started_at`` on ``host`` is gone.

    None while it runs, and whenever this host cannot tell: another host's
    pid means nothing here, and a process we may not inspect is taken as alive.
    """
    if host != HOST or pid is None:
        return None
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return "has exited (zombie process)"
        if process_started_at is not None and abs(process.create_time() - process_started_at) > 1.0:
            return "has exited (its pid now belongs to another process)"
    except psutil.NoSuchProcess:
        return "has exited (pid not running)"
    except psutil.AccessDenied:
        return None
    return None
