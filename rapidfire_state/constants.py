"""Enums, configuration classes and paths.

A leaf module: it imports nothing of the rest of the package but ``exceptions``,
and never torch or mlflow.

Paths and service addresses are read from the environment each time they are
used, never frozen at import, so a process that sets ``RF_HOME`` after importing
the library still gets the right database.  Module attributes such as
``constants.DB_PATH``, ``constants.RF_LOG_FILENAME`` and ``constants.RF_MLFLOW_PORT``
are computed on access (PEP 562); the functions :func:`rf_home`, :func:`db_path`,
:func:`log_path`, :func:`log_filename` and the ``PORT``/``HOST``/``URL`` attributes
of the config classes do the same explicitly.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from rapidfire_state.exceptions import ConfigError


class StrEnum(str, Enum):
    """An enum whose values equal their names, so SQL and JSON read naturally."""

    def __str__(self) -> str:  # "ONGOING", not "RunStatus.ONGOING"
        return self.value


class ExperimentStatus(StrEnum):
    NEW = "NEW"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class RunStatus(StrEnum):
    NEW = "NEW"
    ONGOING = "ONGOING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    KILLED = "KILLED"


class RunSource(StrEnum):
    USER = "USER"
    CLONE_MODIFY = "CLONE_MODIFY"


class RunEndedBy(StrEnum):
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    STOPPED = "STOPPED"


class TaskStatus(StrEnum):
    PENDING = "PENDING"
    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class ExperimentTask(StrEnum):
    IDLE = "IDLE"
    CREATE_MODELS = "CREATE_MODELS"
    IC_OPS = "IC_OPS"
    RUN_FIT = "RUN_FIT"


class ControllerTask(StrEnum):
    RUN_FIT = "RUN_FIT"
    CREATE_MODELS = "CREATE_MODELS"
    IC_DELETE = "IC_DELETE"
    IC_STOP = "IC_STOP"
    IC_RESUME = "IC_RESUME"
    IC_CLONE_MODIFY = "IC_CLONE_MODIFY"
    IC_CLONE_MODIFY_WARM = "IC_CLONE_MODIFY_WARM"
    EPOCH_BOUNDARY = "EPOCH_BOUNDARY"
    GET_RUN_METRICS = "GET_RUN_METRICS"


class WorkerTask(StrEnum):
    CREATE_MODELS = "CREATE_MODELS"
    TRAIN_VAL = "TRAIN_VAL"


class SHMObjectType(StrEnum):
    MODEL = "MODEL"
    CHECKPOINT = "CHECKPOINT"


class SHMLocation(StrEnum):
    """Where the payload of a ``shm_objects`` row lives."""

    SHM = "SHM"
    DISK = "DISK"


class MetricRowKind(StrEnum):
    """What a row of the metric outbox (``metric_outbox.kind``) carries to MLflow."""

    METRIC = "METRIC"
    PARAM = "PARAM"
    TAG = "TAG"
    #: a run status change recorded by the database, for MLflow's run status
    STATUS = "STATUS"


# --- environment helpers ------------------------------------------------------------


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use one of 1/0, true/false, yes/no, on/off")


def _env_port(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip()
    if value.startswith("-") and value[1:].isascii() and value[1:].isdigit():
        raise ConfigError(f"{name}={raw!r} is out of range; use an integer 1-65535")
    # ASCII digits only: int() would also take '+80', '1_000' and other scripts' digits
    if not (value.isascii() and value.isdigit()):
        raise ConfigError(f"{name}={raw!r} is not a port number; use an integer 1-65535")
    port = int(value)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name}={raw!r} is out of range; use an integer 1-65535")
    return port


def rf_home() -> Path:
    """``$RF_HOME``, default ``~/rapidfireai``."""
    raw = os.environ.get("RF_HOME")
    return Path(raw).expanduser() if raw else Path.home() / "rapidfireai"


def db_path() -> Path:
    """The embedded SQLite database: ``$RF_HOME/db/rapidfire_state.db``."""
    return rf_home() / "db" / "rapidfire_state.db"


def log_path() -> Path:
    """``$RF_LOG_PATH``, default ``$RF_HOME/logs``."""
    raw = os.environ.get("RF_LOG_PATH")
    return Path(raw).expanduser() if raw else rf_home() / "logs"


#: Default of ``RF_LOG_FILENAME``: one file per component (``controller.log``, ``worker_0.log``).
DEFAULT_LOG_FILENAME = "{name}.log"
_NAME_FIELD = "{name}"


def log_filename() -> str:
    """``$RF_LOG_FILENAME``, the log file naming pattern; default ``{name}.log``.

    ``{name}`` stands for the logger's component (``controller``, ``worker_0``,
    ``training``); a pattern without it names one file that every component of
    the experiment shares (``rapidfire.log``), each line still saying its component.
    Checked here (see :func:`log_file_name`), read on every call.
    """
    raw = os.environ.get("RF_LOG_FILENAME")
    if raw is None or raw.strip() == "":
        return DEFAULT_LOG_FILENAME
    _check_log_pattern(raw)
    return raw


def _check_log_pattern(pattern: str) -> None:
    rest = pattern.replace(_NAME_FIELD, "")
    problem = None
    if "{" in rest or "}" in rest:
        problem = "its only placeholder may be {name} (the logger's component); no other braces"
    elif "/" in pattern or "\\" in pattern or os.sep in pattern:
        problem = "it names a file, not a path (set the directory with RF_LOG_PATH)"
    if problem:
        raise ConfigError(
            f"RF_LOG_FILENAME={pattern!r} is not a log file naming pattern: {problem}; "
            f"e.g. {DEFAULT_LOG_FILENAME!r} (the default) or 'rapidfire.log' (one file for all)"
        )


def log_file_name(name: str) -> str:
    """The log file name of the component ``name`` under ``$RF_LOG_FILENAME`` (read now)."""
    return log_filename().replace(_NAME_FIELD, name)


def use_shared_memory() -> bool:
    """``$RF_USE_SHARED_MEMORY``, default True."""
    return _env_bool("RF_USE_SHARED_MEMORY", True)


_DYNAMIC: dict[str, Callable[[], Any]] = {
    "RF_HOME": rf_home,
    "DB_PATH": db_path,
    "RF_LOG_PATH": log_path,
    "RF_LOG_FILENAME": log_filename,
    "USE_SHARED_MEMORY": use_shared_memory,
}


def __getattr__(name: str) -> Any:
    try:
        return _DYNAMIC[name]()
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


# --- configuration classes ----------------------------------------------------------


class _EnvValue:
    """A class attribute read from the environment on every access."""

    def __init__(self, read: Callable[[type], Any]):
        self._read = read

    def __get__(self, obj: Any, owner: type) -> Any:
        return self._read(owner)


class _ServiceConfig:
    """Host, port and URL of one service; ``RF_<NAME>_HOST/PORT/URL`` override."""

    ENV_PREFIX = ""
    DEFAULT_PORT = 0
    DEFAULT_HOST = "127.0.0.1"

    HOST = _EnvValue(lambda cls: os.environ.get(f"RF_{cls.ENV_PREFIX}_HOST") or cls.DEFAULT_HOST)
    PORT = _EnvValue(lambda cls: _env_port(f"RF_{cls.ENV_PREFIX}_PORT", cls.DEFAULT_PORT))
    URL = _EnvValue(
        lambda cls: os.environ.get(f"RF_{cls.ENV_PREFIX}_URL") or f"http://{cls.HOST}:{cls.PORT}/"
    )


class DispatcherConfig(_ServiceConfig):
    """The dispatcher (REST API for interactive control); default port 8851."""

    ENV_PREFIX = "DISPATCHER"
    DEFAULT_PORT = 8851


class MLFlowConfig(_ServiceConfig):
    """The MLflow tracking server; default port 8852."""

    ENV_PREFIX = "MLFLOW"
    DEFAULT_PORT = 8852


class FrontendConfig(_ServiceConfig):
    """The dashboard front end; default port 8853."""

    ENV_PREFIX = "FRONTEND"
    DEFAULT_PORT = 8853


#: The services whose address settings are also module attributes, as the spec's
#: ``start_colab.py`` uses them: ``RF_MLFLOW_PORT``, ``RF_MLFLOW_HOST``, ``RF_MLFLOW_URL``
#: and the same for ``DISPATCHER`` and ``FRONTEND``.  Each is read from the
#: environment when accessed (``from rapidfire_state.constants import RF_MLFLOW_PORT``
#: reads it at that import), with the class's default and validation.
_SERVICE_CONFIGS: dict[str, type[_ServiceConfig]] = {
    "DISPATCHER": DispatcherConfig,
    "MLFLOW": MLFlowConfig,
    "FRONTEND": FrontendConfig,
}
for _service, _config in _SERVICE_CONFIGS.items():
    for _field in ("HOST", "PORT", "URL"):
        _DYNAMIC[f"RF_{_service}_{_field}"] = lambda c=_config, f=_field: getattr(c, f)
del _service, _config, _field


class DBConfig:
    """Where the state database lives and how it is opened.

    ``URL`` is ``$RF_DB_URL`` or the embedded SQLite file; ``BUSY_TIMEOUT_MS``
    (``$RF_DB_BUSY_TIMEOUT_MS``) is SQLite's wait for a lock before the write
    unit is retried; ``WRITE_RETRY_SECONDS`` (``$RF_DB_WRITE_RETRY_SECONDS``) bounds
    the total time a write unit is retried.  On PostgreSQL every library
    connection ends a transaction left idle for ``IDLE_IN_TRANSACTION_TIMEOUT_S``
    (``$RF_DB_IDLE_IN_TRANSACTION_TIMEOUT_S``) and cancels a statement running for
    ``STATEMENT_TIMEOUT_S`` (``$RF_DB_STATEMENT_TIMEOUT_S``); 0 turns either off.
    ``NETWORK_TIMEOUT_S`` (``$RF_DB_NETWORK_TIMEOUT_S``) bounds how long a
    PostgreSQL connection waits on a network that stopped answering (connect,
    unacknowledged data, TCP keepalives); 0 leaves the system's (minutes).
    """

    URL = _EnvValue(lambda cls: os.environ.get("RF_DB_URL") or f"sqlite:///{db_path()}")
    BUSY_TIMEOUT_MS = _EnvValue(lambda cls: _env_int("RF_DB_BUSY_TIMEOUT_MS", 5000))
    WRITE_RETRY_SECONDS = _EnvValue(lambda cls: float(_env_int("RF_DB_WRITE_RETRY_SECONDS", 120)))
    IDLE_IN_TRANSACTION_TIMEOUT_S = _EnvValue(lambda cls: _env_seconds("RF_DB_IDLE_IN_TRANSACTION_TIMEOUT_S", 60.0))
    STATEMENT_TIMEOUT_S = _EnvValue(lambda cls: _env_seconds("RF_DB_STATEMENT_TIMEOUT_S", 120.0))
    NETWORK_TIMEOUT_S = _EnvValue(lambda cls: _env_seconds("RF_DB_NETWORK_TIMEOUT_S", 30.0))


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name}={raw!r} must be a finite number of seconds >= 0 (0: no limit)")
    return value


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r} must be >= 0")
    return value


__all__ = [
    "StrEnum",
    "MetricRowKind",
    "ExperimentStatus",
    "RunStatus",
    "RunSource",
    "RunEndedBy",
    "TaskStatus",
    "ExperimentTask",
    "ControllerTask",
    "WorkerTask",
    "SHMObjectType",
    "SHMLocation",
    "DBConfig",
    "DispatcherConfig",
    "MLFlowConfig",
    "FrontendConfig",
    "rf_home",
    "db_path",
    "log_path",
    "log_filename",
    "log_file_name",
    "DEFAULT_LOG_FILENAME",
    "use_shared_memory",
    "RF_HOME",
    "DB_PATH",
    "RF_LOG_PATH",
    "RF_LOG_FILENAME",
    "USE_SHARED_MEMORY",
    *(f"RF_{service}_{field}" for service in _SERVICE_CONFIGS for field in ("HOST", "PORT", "URL")),
]
