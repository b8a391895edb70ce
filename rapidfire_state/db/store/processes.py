"""Which process made a claim, and whether it is still there (this host only)."""

from __future__ import annotations

import os
import socket
from typing import Optional

from rapidfire_state.exceptions import ConfigError

#: the environment variable naming this host, where ``socket.gethostname()`` does not tell hosts apart
HOST_ENV = "RF_HOST"
#: the longest host name accepted (a DNS name's limit)
MAX_HOST_LENGTH = 255


def resolve_host(environ: Optional[dict] = None) -> str:
    """This process's host name: ``$RF_HOST`` when set, else ``socket.gethostname()``.

    ``RF_HOST`` is for hosts that share a name (containers with host networking,
    network namespaces): pids are judged only for claims of this name, so two
    hosts recording the same name would judge each other's pids.  A set value
    must be 1-255 characters without whitespace or control characters;
    anything else raises :class:`ConfigError` naming it.
    """
    value = (os.environ if environ is None else environ).get(HOST_ENV)
    if value is None:
        return socket.gethostname()
    allowed = (
        f"allowed: 1-{MAX_HOST_LENGTH} characters with no whitespace or control characters"
        f" (unset {HOST_ENV} to use the system host name)"
    )
    if not value.strip():
        raise ConfigError(f"{HOST_ENV}={value!r} is blank; {allowed}")
    if len(value) > MAX_HOST_LENGTH:
        raise ConfigError(f"{HOST_ENV}={value[:40]!r}... is {len(value)} characters long; {allowed}")
    bad = next((c for c in value if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise ConfigError(f"{HOST_ENV}={value!r} contains {bad!r}; {allowed}")
    return value


#: this host's name, as worker rows, claims and history rows record it (``$RF_HOST`` or the system's);
#: read once, at import, so that every record of one process names the same host
HOST = resolve_host()


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
