"""Where an experiment's files live on disk.

A leaf module: it imports only the standard library, :mod:`rapidfire_state.constants`
and :mod:`rapidfire_state.exceptions`.

:class:`DataPath` holds the current experiment as class-level state, the way the
original utilities use it::

    DataPath.initialize("my_experiment", "/path/to/experiments")
    DataPath.checkpoint_path(run_id=5, chunk_id=2)
    # /path/to/experiments/my_experiment/runs/run_5/checkpoints/checkpoint_chunk_2.pt

Layout under ``<base>/<experiment>/``::

    runs/run_<id>/checkpoints/checkpoint_chunk_<chunk>.pt
    datasets/dataset.dill

and the logs under ``$RF_LOG_PATH/<experiment>/<logger_name>.log``.

Safety rules, applied to every path this module returns:

* names that become path components (the experiment name, a logger name) must be a
  single safe component: ASCII letters, digits, ``-``, ``_`` and ``.``, no leading
  dot, no ``..``, at most 128 characters; ids must be non-negative integers;
* every path is resolved (symlinks followed) and must lie inside its base directory
  (the experiment directory, or the log directory); a path that would escape, for
  example through a symlink planted in the tree, raises
  :class:`~rapidfire_state.exceptions.DataPathException` *before* any directory is
  created.

The state is per process: a spawned worker must call :meth:`DataPath.initialize`
itself (a forked one inherits its parent's).
"""

from __future__ import annotations

import numbers
import os
import re
import threading
from pathlib import Path
from typing import Union

from rapidfire_state import constants
from rapidfire_state.exceptions import DataPathException

PathLike = Union[str, "os.PathLike[str]"]

#: Longest name accepted as a path component (well under every filesystem's 255).
MAX_COMPONENT_LENGTH = 128

# First character excludes "." so that hidden names and "." / ".." are impossible;
# the character class excludes separators, control characters, spaces and anything
# a shell or another OS might treat specially.  ASCII only, so that names compare
# the same on every filesystem (no Unicode normalisation surprises).
_COMPONENT_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*\Z")


def validate_component(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a safe single path component, else raise.

    Allowed: ASCII letters, digits, ``-``, ``_`` and ``.``; not starting with a dot;
    not containing ``..``; 1 to :data:`MAX_COMPONENT_LENGTH` characters.

    Raises:
        DataPathException: naming the value and what is allowed.
    """
    allowed = (
        f"the {what} must be 1-{MAX_COMPONENT_LENGTH} ASCII letters, digits, "
        "'-', '_' or '.', not start with '.', and not contain '..'"
    )
    if not isinstance(value, str):
        raise DataPathException(f"invalid {what} {value!r} ({type(value).__name__}): {allowed}")
    if (
        not value
        or len(value) > MAX_COMPONENT_LENGTH
        or ".." in value
        or _COMPONENT_RE.match(value) is None
    ):
        raise DataPathException(f"invalid {what} {value!r}: {allowed}")
    return value


def validate_index(value: object, what: str = "id") -> int:
    """Return ``value`` as an ``int`` if it is a non-negative integer, else raise.

    Any :class:`numbers.Integral` is accepted (so numpy integers work), but ``bool``
    is refused: ``True`` as a run id is always a bug, never a run.

    Raises:
        DataPathException: naming the value.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataPathException(
            f"invalid {what} {value!r} ({type(value).__name__}): must be a non-negative integer"
        )
    number = int(value)
    if number < 0:
        raise DataPathException(f"invalid {what} {value!r}: must be a non-negative integer")
    return number


def resolve_base(path: PathLike, what: str = "base path") -> Path:
    """Expand ``~`` and resolve ``path`` to an absolute path (it need not exist).

    Raises:
        DataPathException: if ``path`` is empty or contains a NUL or other control
            character (refused rather than silently meaning the current directory).
    """
    try:
        raw = os.fspath(path)
    except TypeError:
        raise DataPathException(
            f"invalid {what} {path!r} ({type(path).__name__}): must be a str or os.PathLike"
        ) from None
    if not isinstance(raw, str):
        raise DataPathException(f"invalid {what} {path!r}: must be a text path, not bytes")
    if raw.strip() == "":
        raise DataPathException(f"invalid {what} {path!r}: must not be empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in raw):
        raise DataPathException(f"invalid {what} {path!r}: contains a control character")
    try:
        return Path(raw).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataPathException(f"cannot resolve {what} {raw!r}: {exc}") from exc


def ensure_within(path: Path, base: Path, what: str = "path") -> Path:
    """Resolve ``path`` (following symlinks) and check it lies inside ``base``.

    ``base`` must already be resolved.  Returns the resolved path.

    Raises:
        DataPathException: if the resolved path is outside ``base``.
    """
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on older Pythons
        raise DataPathException(f"cannot resolve {what} {str(path)!r}: {exc}") from exc
    if not resolved.is_relative_to(base):  # True for base itself too
        raise DataPathException(
            f"{what} {str(path)!r} resolves to {str(resolved)!r}, outside its base {str(base)!r}"
        )
    return resolved


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable (best effort).

    A rename is visible at once but survives a power loss only once its
    directory is synced; platforms that cannot open a directory are skipped.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mkdir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataPathException(f"cannot create {what} {str(path)!r}: {exc}") from exc


class DataPath:
    """The current experiment's directories and files, as class-level state.

    Call :meth:`initialize` once per process, then the path methods.  Every method is
    a classmethod; the class is never instantiated.  Methods that return a directory
    create it; methods that return a file create its parent directory (never the
    file).  All returned paths are absolute and resolved.
    """

    # (experiment name, resolved base path, resolved experiment dir) or None.  One
    # tuple, replaced atomically under the lock, so a reader never sees the name of
    # one experiment with the base of another.
    _state: tuple[str, Path, Path] | None = None
    _lock = threading.Lock()

    def __new__(cls, *args: object, **kwargs: object) -> DataPath:
        raise TypeError("DataPath is used through its classmethods; do not instantiate it")

    # --- state ------------------------------------------------------------------------

    @classmethod
    def initialize(cls, experiment_name: str, base_path: PathLike) -> Path:
        """Set the current experiment and create its directory tree.

        Creates ``<base_path>/<experiment_name>/`` with ``runs/`` and ``datasets/``
        (``base_path`` too if missing).  Calling it again switches to another
        experiment (or is a no-op for the same one).

        Args:
            experiment_name: a single safe path component (see :func:`validate_component`).
            base_path: the experiments directory; resolved to an absolute path.

        Returns:
            The resolved experiment directory.

        Raises:
            DataPathException: bad name, bad base path, an experiment directory that
                resolves outside ``base_path`` (symlink), or a directory that cannot be
                created.  The current state is left unchanged.
        """
        name = validate_component(experiment_name, "experiment name")
        base = resolve_base(base_path, "base path")
        # Check before creating anything: a symlink named like the experiment must not
        # make us create runs/ and datasets/ somewhere else.
        exp_dir = ensure_within(base / name, base, "experiment directory")
        if exp_dir == base:
            raise DataPathException(f"experiment directory for {name!r} resolves to the base itself")
        _mkdir(exp_dir, "experiment directory")
        for sub in ("runs", "datasets"):
            _mkdir(ensure_within(exp_dir / sub, exp_dir, f"{sub} directory"), f"{sub} directory")
        # Resolve again after creation: closes most of the window in which someone
        # could have swapped the directory for a symlink between check and mkdir.
        exp_dir = ensure_within(exp_dir, base, "experiment directory")
        with cls._lock:
            cls._state = (name, base, exp_dir)
        return exp_dir

    @classmethod
    def reset(cls) -> None:
        """Forget the current experiment (nothing on disk is touched)."""
        with cls._lock:
            cls._state = None

    @classmethod
    def is_initialized(cls) -> bool:
        """Whether :meth:`initialize` has been called (and not :meth:`reset`) in this process."""
        return cls._state is not None

    @classmethod
    def _current(cls) -> tuple[str, Path, Path]:
        with cls._lock:
            state = cls._state
        if state is None:
            raise DataPathException(
                "DataPath is not initialized: call DataPath.initialize(experiment_name, "
                "base_path) first (once per process; spawned workers must call it too)"
            )
        return state

    @classmethod
    def experiment_name(cls) -> str:
        """The current experiment's name."""
        return cls._current()[0]

    @classmethod
    def base_path(cls) -> Path:
        """The resolved experiments directory given to :meth:`initialize`."""
        return cls._current()[1]

    @classmethod
    def experiment_path(cls) -> Path:
        """``<base>/<experiment>/`` (created)."""
        name, base, exp_dir = cls._current()
        exp_dir = ensure_within(exp_dir, base, "experiment directory")
        _mkdir(exp_dir, "experiment directory")
        return exp_dir

    # --- experiment artifacts ---------------------------------------------------------

    @classmethod
    def _experiment_dir(cls, *parts: str, what: str) -> Path:
        """Resolve, check and create ``<experiment>/<parts...>``."""
        _, _, exp_dir = cls._current()
        path = ensure_within(exp_dir.joinpath(*parts), exp_dir, what)
        _mkdir(path, what)
        return path

    @classmethod
    def run_path(cls, run_id: int) -> Path:
        """``<base>/<experiment>/runs/run_<run_id>/`` (created)."""
        rid = validate_index(run_id, "run_id")
        return cls._experiment_dir("runs", f"run_{rid}", what="run directory")

    @classmethod
    def checkpoints_dir(cls, run_id: int) -> Path:
        """``<base>/<experiment>/runs/run_<run_id>/checkpoints/`` (created)."""
        rid = validate_index(run_id, "run_id")
        return cls._experiment_dir("runs", f"run_{rid}", "checkpoints", what="checkpoints directory")

    @classmethod
    def checkpoint_path(cls, run_id: int, chunk_id: int) -> Path:
        """``<base>/<experiment>/runs/run_<run_id>/checkpoints/checkpoint_chunk_<chunk_id>.pt``.

        The parent directory is created; the file is not.
        """
        rid = validate_index(run_id, "run_id")
        cid = validate_index(chunk_id, "chunk_id")
        directory = cls.checkpoints_dir(rid)
        return ensure_within(directory / f"checkpoint_chunk_{cid}.pt", directory, "checkpoint path")

    @classmethod
    def dataset_path(cls) -> Path:
        """``<base>/<experiment>/datasets/dataset.dill`` (the ``datasets/`` directory is created)."""
        directory = cls._experiment_dir("datasets", what="datasets directory")
        return ensure_within(directory / "dataset.dill", directory, "dataset path")

    # --- logs -------------------------------------------------------------------------

    @classmethod
    def log_dir(cls) -> Path:
        """``$RF_LOG_PATH/<experiment>/`` (created).

        ``RF_LOG_PATH`` is read on every call (:func:`rapidfire_state.constants.log_path`),
        so a process that sets it after initialising still gets the right directory.
        """
        name = cls._current()[0]
        log_base = resolve_base(constants.log_path(), "log path (RF_LOG_PATH)")
        path = ensure_within(log_base / name, log_base, "log directory")
        _mkdir(path, "log directory")
        return path

    @classmethod
    def log_path(cls, logger_name: str) -> Path:
        """``$RF_LOG_PATH/<experiment>/<logger_name>.log`` (the directory is created).

        ``logger_name`` must be a safe path component (``controller``, ``worker_0``…).
        The file name follows ``$RF_LOG_FILENAME`` (default ``{name}.log``), as the
        loggers' files do.
        """
        logger = validate_component(logger_name, "logger name")
        filename = validate_component(constants.log_file_name(logger), "log file name (RF_LOG_FILENAME)")
        directory = cls.log_dir()
        return ensure_within(directory / filename, directory, "log file")


def _reinit_lock_in_child() -> None:
    # A fork taken while another thread held the lock would leave the child's copy
    # locked forever; the child is single-threaded at this point, so a fresh lock is safe.
    DataPath._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_lock_in_child)


__all__ = [
    "fsync_directory",
    "DataPath",
    "MAX_COMPONENT_LENGTH",
    "validate_component",
    "validate_index",
    "resolve_base",
    "ensure_within",
]
