"""The errors of the shared-memory manager (all :class:`~rapidfire_state.exceptions.RapidFireError`)."""

from __future__ import annotations

from rapidfire_state.exceptions import RapidFireError


class SHMKeyError(RapidFireError, KeyError):
    """No object is stored under the key (also a :class:`KeyError`)."""

    def __init__(self, key: str, detail: str = ""):
        self.key = key
        message = f"no shared-memory object is stored under key {key!r}"
        super().__init__(f"{message}: {detail}" if detail else message)

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SHMRegistryUnavailableError(RapidFireError):
    """The registry's Manager process cannot be reached (it exited or was killed)."""


class SHMLockTimeoutError(RapidFireError):
    """The registry lock was not acquired within ``lock_timeout`` seconds."""


class SHMNotOnThisHostError(RapidFireError):
    """The object is held by another host, and no copy of it can be read here.

    Not a :class:`KeyError` on purpose: the checkpoint exists (its row says
    where), so a caller must not take it for "nothing stored" and start over.
    Carries ``key``, ``host`` (the host holding it) and ``here`` (this host).
    """

    def __init__(self, key: str, host: str, here: str, detail: str = ""):
        self.key = key
        self.host = host
        self.here = here
        message = (
            f"shared-memory object {key!r} is held by host {host!r}, not by this host {here!r}, and no copy "
            f"of it can be read here{': ' + detail if detail else ''}; store it with "
            f"SharedMemoryManager(..., placement='cross_host', shared_dir=...) or call copy_to_shared({key!r}) "
            f"on {host!r}, so that every host can read a disk copy under the shared directory"
        )
        super().__init__(message)


class NoSharedMemory(Exception):
    """Internal: /dev/shm cannot hold an allocation; the caller falls back (disk, or a replace)."""
