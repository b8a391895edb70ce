"""Which process made a claim, and whether it is still there (this host only)."""

from __future__ import annotations

import os
import socket
from typing import Any, Optional

from rapidfire_state.exceptions import ConfigError

#: the environment variable naming this host, where ``socket.gethostname()`` does not tell hosts apart
HOST_ENV = "RF_HOST"
#: the longest host name accepted (a DNS name's limit)
MAX_HOST_LENGTH = 255


def check_host(name: str, value: Any) -> str:
    """``value`` when it is a host name this library records, else :class:`ConfigError` naming it.

    1-255 characters without whitespace or control characters: the rules of
    ``$RF_HOST``, so that every host column holds a name a reader can compare.
    """
    allowed = f"allowed: 1-{MAX_HOST_LENGTH} characters with no whitespace or control characters"
    if not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} is not a host name; {allowed}")
    if not value.strip():
        raise ConfigError(f"{name}={value!r} is blank; {allowed}")
    if len(value) > MAX_HOST_LENGTH:
        raise ConfigError(f"{name}={value[:40]!r}... is {len(value)} characters long; {allowed}")
    bad = next((c for c in value if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise ConfigError(f"{name}={value!r} contains {bad!r}; {allowed}")
    return value


def resolve_host(environ: Optional[dict] = None) -> str:
    """This process's host name: ``$RF_HOST`` when set, else ``socket.gethostname()``.

    ``RF_HOST`` is for hosts that share a name (containers with host networking,
    network namespaces): pids are judged only for claims of this name, so two
    hosts recording the same name would judge each other's pids.  A set value
    must be 1-255 characters without whitespace or control characters;
    anything else raises :class:`ConfigError` naming it (and saying how to go
    back to the system's name).
    """
    value = (os.environ if environ is None else environ).get(HOST_ENV)
    if value is None:
        return socket.gethostname()
    try:
        return check_host(HOST_ENV, value)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (unset {HOST_ENV} to use the system host name)") from None


#: this host's name, as worker rows, claims and history rows record it (``$RF_HOST`` or the system's);
#: read once, at import, so that every record of one process names the same host
HOST = resolve_host()


def process_start_time(pid: int) -> Optional[float]:
    """The OS start time of ``pid`` on this host (seconds since the epoch), or None when it cannot be read.

    For display and for rows without an identity: it is the boot time plus the
    start offset, and the boot time as the OS reports it moves with every step
    of the wall clock (and by a whole second as NTP slews it), so two reads of
    one process may disagree.  :func:`process_identity` does not.
    """
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


#: where Linux says which boot this is: a random id made at each boot
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_BOOT_ID: Optional[str] = None


def _boot_id() -> Optional[str]:
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open(_BOOT_ID_PATH, encoding="ascii") as file:
                _BOOT_ID = file.read().strip() or None
        except OSError:
            return None
    return _BOOT_ID


#: clock ticks per second of ``/proc/<pid>/stat`` (USER_HZ)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_BOOTTIME_OFFSET: Optional[tuple[int, Optional[int]]] = None


def _boottime_offset_ticks() -> Optional[int]:
    """This process's time namespace's boot-clock offset in clock ticks (0 outside one), or
    None when it is not a whole number of ticks (the start could not be told exactly)."""
    global _BOOTTIME_OFFSET
    pid = os.getpid()
    if _BOOTTIME_OFFSET is None or _BOOTTIME_OFFSET[0] != pid:
        ticks: Optional[int] = 0
        try:
            with open("/proc/self/timens_offsets", encoding="ascii") as file:
                for line in file:
                    clock, seconds, nanoseconds = line.split()
                    if clock == "boottime":
                        per_tick = 1_000_000_000 // _CLOCK_TICKS
                        whole = int(nanoseconds) % per_tick == 0
                        ticks = int(seconds) * _CLOCK_TICKS + int(nanoseconds) // per_tick if whole else None
        except (OSError, ValueError):
            pass  # a kernel without time namespaces: no offset
        _BOOTTIME_OFFSET = (pid, ticks)
    return _BOOTTIME_OFFSET[1]


def process_identity(pid: int) -> Optional[str]:
    """``"<boot id>:<start>"`` of the process ``pid`` on this host, or None where it cannot be read.

    The start is the process's start in clock ticks since boot (field 22 of
    ``/proc/<pid>/stat``), which no change of the wall clock moves; the boot id
    tells one boot from the next, when pids start over.  So it names one process
    for the life of the host: a recycled pid has another start, a host restarted
    since has another boot id.  The kernel shows the start shifted by the
    reader's time namespace (``unshare --time``); it is read back to the host's
    boot clock, so readers in any namespace agree.  Linux only (None elsewhere:
    the OS start time is judged instead).
    """
    boot = _boot_id()
    offset = _boottime_offset_ticks()
    if boot is None or offset is None:
        return None
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as file:
            stat = file.read()
        # the command name (field 2) may hold spaces and parentheses: fields resume after the last ')'
        start = stat[stat.rindex(b")") + 2:].split()[19]
        return f"{boot}:{int(start) - offset}"
    except (OSError, ValueError, IndexError):
        return None


_OWN_PROCESS: Optional[tuple[int, Optional[float], Optional[str]]] = None


def own_process() -> tuple[int, Optional[float], Optional[str]]:
    """This process's pid, OS start time and :func:`process_identity`, for the claims it makes.

    Cached per pid: read once per process, and a forked child (another pid)
    reads its own.
    """
    global _OWN_PROCESS
    pid = os.getpid()
    cached = _OWN_PROCESS
    if cached is None or cached[0] != pid:
        cached = (pid, process_start_time(pid), process_identity(pid))
        _OWN_PROCESS = cached
    return cached


#: how far the OS start time of one process may wander between two reads (rows without an identity):
#: the boot time it is computed from is reported in whole seconds and moves as NTP slews the clock
START_TIME_TOLERANCE_S = 1.5


def identity_changed(recorded: Optional[str], pid: int) -> Optional[str]:
    """Why ``pid`` is not the process of identity ``recorded``; None when it is or this host cannot tell."""
    if not recorded:
        return None
    current = process_identity(pid)
    if current is None or current == recorded:
        return None
    recorded_boot, _, _ = recorded.partition(":")
    current_boot, _, _ = current.partition(":")
    if recorded_boot != current_boot:
        return "has exited (this host has restarted since)"
    return "has exited (its pid now belongs to another process)"


def gone_here(
    host: Optional[str], pid: Optional[int], process_started_at: Optional[float],
    process_identity_recorded: Optional[str] = None,
) -> Optional[str]:
    """Why the process ``pid`` recorded on ``host`` is gone.

    None while it runs, and whenever this host cannot tell: another host's
    pid means nothing here, and a process we may not inspect is taken as alive.
    A recorded :func:`process_identity` decides whether the pid is still that
    process (steps of the wall clock do not move it); a row without one (written
    before revision 0008, or off Linux) is judged by ``process_started_at``
    within :data:`START_TIME_TOLERANCE_S`.
    """
    if host != HOST or pid is None:
        return None
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return "has exited (zombie process)"
        if process_identity_recorded and process_identity(pid) is not None:
            return identity_changed(process_identity_recorded, pid)
        if process_started_at is not None and abs(process.create_time() - process_started_at) > START_TIME_TOLERANCE_S:
            return "has exited (its pid now belongs to another process)"
    except psutil.NoSuchProcess:
        return "has exited (pid not running)"
    except psutil.AccessDenied:
        return None
    return None
