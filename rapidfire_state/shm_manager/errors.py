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


class NoSharedMemory(Exception):
    """Internal: /dev/shm cannot hold an allocation; the caller falls back (disk, or a replace)."""
