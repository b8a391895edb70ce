"""Disk files: where spilled objects go, atomic writes, temp files of dead writers, free space.

Also the small file-system helpers the lock and journal files share (name
components, the host field, liveness of the pid a file name carries).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

from loguru import logger

from rapidfire_state.constants import SHMObjectType, rf_home
from rapidfire_state.datapaths import fsync_directory
from rapidfire_state.shm_manager.errors import SHMKeyError

#: Temp files of disk writes: ``.ckpt-<random>.<writer pid>.rftmp`` next to the target.
TEMP_FILE_RE = re.compile(r"^\..+\.(\d+)\.rftmp$")


# --- names ------------------------------------------------------------------------------


def safe_component(text: str, limit: int = 64) -> str:
    """``text`` as one file-name component: no separators, no leading dot, at most ``limit`` characters."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip(".")[:limit].replace("..", "_")
    return cleaned or "x"


def host_component() -> str:
    """This host's name (``$RF_HOST`` or the system's) as one dot-free field of a lock or journal file name."""
    from rapidfire_state.db.store.processes import HOST

    return safe_component(HOST, 64).replace(".", "_")


def key_file_name(key: str) -> str:
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return f"{safe_component(key)}-{digest}.pt"


def this_host() -> str:
    """This host's name as ``shm_objects.host`` records it (``processes.HOST``, read at each call)."""
    from rapidfire_state.db.store import processes

    return processes.HOST


def copy_file_path(
    shared_dir: Path, manager_name: str, key: str, experiment_id: Optional[int], run_id: Optional[int], token: int
) -> Path:
    """Where a cross-host copy of ``key`` goes: a per-key name under the shared directory.

    ``<shared_dir>/<manager>/[experiment_<id>/[run_<id>/]]<key>-<hash>.<token>.pt``: the
    per-key stem is stable; ``token`` (one per publication) keeps the copy an older
    row still names in place until the newer row has committed.
    """
    directory = shared_dir / safe_component(manager_name, 128)
    if experiment_id is not None:
        directory = directory / f"experiment_{experiment_id}"
        if run_id is not None:
            directory = directory / f"run_{run_id}"
    stem = key_file_name(key)[: -len(".pt")]
    return directory / f"{stem}.{token:016x}.pt"


def sibling_path(key: str, final: Path) -> Path:
    """A key-specific name next to ``final``, for when another key owns ``final``."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    return final.with_name(f"{final.stem}-{digest}{final.suffix}")


def spill_dir(manager_name: str) -> Path:
    """Where a manager's objects without a checkpoint path go: ``<experiment dir or $RF_HOME>/shm_spill/<name>``."""
    from rapidfire_state.datapaths import DataPath

    base = DataPath.experiment_path() if DataPath.is_initialized() else rf_home()
    return base / "shm_spill" / safe_component(manager_name, 128)


def disk_path(manager_name: str, key: str, run_id: Optional[int], chunk_id: Optional[int], object_type: str) -> Path:
    """The file for ``key`` on disk: the run's checkpoint path when DataPath knows it, else the spill dir."""
    from rapidfire_state.datapaths import DataPath

    if run_id is not None and chunk_id is not None and DataPath.is_initialized():
        path = DataPath.checkpoint_path(run_id, chunk_id)
        if object_type != SHMObjectType.CHECKPOINT.value:
            path = path.with_name(f"{object_type.lower()}_chunk_{chunk_id}.pt")
        return path
    return spill_dir(manager_name) / key_file_name(key)


# --- writing and reading ----------------------------------------------------------------


def write_temp(obj: Any, directory: Path) -> Path:
    """``torch.save(obj)`` into a fsynced temp file in ``directory``; returns its path."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".ckpt-", suffix=f".{os.getpid()}.rftmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        unlink_quiet(Path(name))
        raise
    return Path(name)


def commit_temp(temp: Path, final: Path) -> None:
    os.replace(temp, final)
    fsync_directory(final.parent)


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    """``torch.save`` to ``path`` atomically: the file is either absent, the old one, or complete."""
    final = Path(path)
    commit_temp(write_temp(obj, final.parent), final)
    return final


def load_file(key: str, path: Optional[str]) -> Any:
    """An object's disk copy, as private CPU tensors (``torch.load(weights_only=True)``)."""
    import torch

    if not path or not os.path.exists(path):
        raise SHMKeyError(key, f"its disk copy {path!r} is missing (run reconcile())")
    return torch.load(path, weights_only=True, map_location="cpu")


def unlink_quiet(path: Optional[Path | str]) -> bool:
    """Remove ``path`` if it is there; whether it was removed (other errors are logged)."""
    if path is None:
        return False
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning(f"could not remove {path}: {exc}")
        return False


def sweep_temp_files(directories: Iterable[Path]) -> list[str]:
    """Delete the temp files of disk writes whose writer is dead; returns their paths, sorted."""
    removed = []
    for directory in directories:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            match = TEMP_FILE_RE.match(name)
            if match and not pid_alive(int(match.group(1))):
                if unlink_quiet(directory / name):
                    removed.append(str(directory / name))
    return sorted(removed)


# --- processes and space ----------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fs_free(path: Path | str) -> Optional[tuple[int, int]]:
    """(free bytes for an unprivileged user, total bytes) of the filesystem holding ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
