"""MLflow tracking, embedded by default.

:class:`MLflowManager` is a thin, validating wrapper around
:class:`mlflow.tracking.MlflowClient`.  Each RapidFire run maps to one MLflow run:
parameters are logged when the run is created, metrics during training, and
checkpoints as artifacts.

Where the tracking data goes (``tracking_uri``):

* ``None`` (the default): an embedded SQLite store,
  ``sqlite:///$RF_HOME/mlflow/mlflow.db``, with artifacts under
  ``$RF_HOME/mlflow/artifacts``.  No server to start.
* ``sqlite:///...``, ``postgresql[+driver]://...``, ``mysql[+driver]://...``,
  ``mssql[+driver]://...``: that database, used in-process.
* ``http://...`` / ``https://...``: an MLflow tracking server (``mlflow server``);
  the server decides where artifacts go.

A plain directory or ``file:`` URI (MLflow's old file store) is refused with
:class:`~rapidfire_state.exceptions.ConfigError`: MLflow 3 refuses it itself, and
only after importing everything.

Design notes:

* ``mlflow`` is imported inside the constructor and methods, never at module
  import: importing it costs seconds, and ``import rapidfire_state`` and the CLI
  must stay cheap.
* The manager never touches MLflow's global state (``mlflow.set_tracking_uri``,
  ``MLFLOW_TRACKING_URI``, the active run): every call goes through its own
  ``MlflowClient(tracking_uri=...)``, so several managers with different stores
  coexist in one process, and user code that uses ``mlflow.*`` is not disturbed.
* Every MLflow failure is re-raised as a :class:`MetricLoggingError` (or one of
  its subclasses) with the original exception chained (``raise ... from exc``).

MLflow behaviours worth knowing (MLflow 3.17):

* ``NaN`` metric values are stored as such; ``+inf``/``-inf`` are stored by the SQL
  store as ``±sys.float_info.max``.  This manager passes them through unchanged.
* A parameter value longer than MLflow's limit (6000 characters) would be
  *silently truncated* by MLflow; this manager refuses it instead, so a logged
  hyperparameter is never quietly different from the one used.
* Logging a parameter twice with a different value is an error (parameters are
  immutable); logging the same value again is accepted.
* On a *new* ``sqlite:///`` store this manager creates the tables itself so that
  MLflow's "Default" experiment (id 0) keeps its artifacts under ``artifact_root``;
  on other new databases MLflow gives it ``./mlruns/0`` relative to the working
  directory.  Experiments made by :meth:`MLflowManager.get_experiment` always get
  a location under ``artifact_root``.
* A new ``sqlite:///`` store is built in a temporary file beside it
  (``mlflow.db.creating.<pid>.<hex>``) and renamed into place once MLflow's
  migrations finished, under the lock file ``mlflow.db.lock``: a process killed
  while creating it leaves no store, never a half-made one (the next open removes
  the temporary file and builds again).  A half-made store found at open (left by
  an older version, or by MLflow itself: ``_alembic_tmp_*`` tables, no or an old
  schema revision) is rebuilt, with a warning, when it holds no data beyond what
  MLflow puts in a new store; one that holds data is never deleted:
  :class:`MetricLoggingError` says what it holds and the file stays byte-identical.
* Against a server, a connection failure is retried by MLflow with exponential
  backoff (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7) before it is reported,
  which can take minutes.  :meth:`MLflowManager.check_server` answers in seconds.
* Against a server, ``end_run`` makes MLflow print "View run ... at: <url>" on stdout
  (``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true`` silences it; this manager does
  not set it, environment being global state).
* Measured: embedded SQLite ``log_metric`` ~10 ms a call, ``log_batch`` of 1000
  metrics ~0.15 s; prefer :meth:`MLflowManager.log_metrics` for many values.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional
from urllib.parse import urlparse

from rapidfire_state import constants
from rapidfire_state.datapaths import fsync_directory
from rapidfire_state.exceptions import ConfigError, NotFoundError, RapidFireError
from rapidfire_state.states import MLFLOW_RUN_STATUS, mlflow_status_for
from rapidfire_state.validation import check_int, check_name, check_number

if TYPE_CHECKING:  # pragma: no cover - typing only, never imported at runtime
    from mlflow.entities import Experiment
    from mlflow.tracking import MlflowClient

_log = logging.getLogger(__name__)


# --- errors ---------------------------------------------------------------------------


class MetricLoggingError(RapidFireError):
    """MLflow failed or refused a tracking operation (the cause is chained)."""


class MetricInputError(MetricLoggingError, ValueError):
    """An argument of a tracking call is invalid (bad key, value, step or status)."""


class MetricNotFoundError(MetricLoggingError, NotFoundError):
    """The MLflow run or experiment named by the caller does not exist."""


# --- constants --------------------------------------------------------------------------

#: URI schemes (before any ``+driver``) that MLflow serves from a SQL database in-process.
DATABASE_SCHEMES = frozenset({"sqlite", "postgresql", "mysql", "mssql"})
#: URI schemes of an MLflow tracking server.
SERVER_SCHEMES = frozenset({"http", "https"})

_ALLOWED_URIS = (
    "sqlite:///<absolute path>.db, postgresql[+driver]://..., mysql[+driver]://..., "
    "mssql[+driver]://..., or http(s)://<host>:<port> of an MLflow server"
)

#: Statuses an MLflow run may end with.
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
# RapidFire's own vocabulary says COMPLETED where MLflow says FINISHED.
_STATUS_ALIASES = {"COMPLETED": "FINISHED"}

# MLflow's limit on a parameter value; read from mlflow when available (see _max_param_length).
_DEFAULT_MAX_PARAM_LENGTH = 6000

_UNSAFE_DIR_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
# MLflow's limit on a tag value
_MAX_TAG_LENGTH = 8000
# the background flusher is woken early once this many rows were appended
_WAKE_EVERY_ROWS = 1000

_EXIT_FLUSH: "weakref.WeakSet[MLflowManager]" = weakref.WeakSet()
_EXIT_HOOK = False
_EXIT_LOCK = threading.Lock()


def _register_at_exit(manager: "MLflowManager") -> None:
    """Flush ``manager`` (bounded) when the interpreter exits; one hook per process."""
    global _EXIT_HOOK
    with _EXIT_LOCK:
        _EXIT_FLUSH.add(manager)
        if not _EXIT_HOOK:
            atexit.register(_flush_at_exit)
            _EXIT_HOOK = True


def _flush_at_exit() -> None:
    for manager in list(_EXIT_FLUSH):
        try:
            manager.close()
        except Exception as exc:  # exit must go on; what is left stays in the outbox
            _log.warning("flushing %r at exit failed: %s", manager, exc)


def default_tracking_uri() -> str:
    """The embedded store: ``sqlite:///$RF_HOME/mlflow/mlflow.db`` (absolute path)."""
    db_file = (constants.rf_home() / "mlflow" / "mlflow.db").resolve()
    return f"sqlite:///{db_file}"


def default_artifact_root() -> Path:
    """Where artifacts of embedded/database stores go: ``$RF_HOME/mlflow/artifacts``."""
    return (constants.rf_home() / "mlflow" / "artifacts").resolve()


def validate_tracking_uri(tracking_uri: object) -> str:
    """Return ``tracking_uri`` if MLflow 3 can use it, else raise :class:`ConfigError`.

    Accepted: see :data:`DATABASE_SCHEMES` and :data:`SERVER_SCHEMES`.  Refused: plain
    paths and ``file:`` URIs (MLflow 3 no longer accepts the file store), anything else.
    """
    if isinstance(tracking_uri, Path):
        raise ConfigError(
            f"tracking_uri={str(tracking_uri)!r} is a path; MLflow 3 refuses the plain file "
            f"store. Use sqlite:///{Path(tracking_uri).expanduser().resolve()}/mlflow.db for an "
            f"embedded store there, or one of: {_ALLOWED_URIS}"
        )
    if not isinstance(tracking_uri, str) or not tracking_uri.strip():
        raise ConfigError(
            f"tracking_uri={tracking_uri!r} is not a non-empty string; use None for the "
            f"embedded store, or one of: {_ALLOWED_URIS}"
        )
    uri = tracking_uri.strip()
    scheme = urlparse(uri).scheme.lower()
    base_scheme = scheme.split("+", 1)[0]
    if scheme in ("", "file"):
        raise ConfigError(
            f"tracking_uri={tracking_uri!r} is a plain file store, which MLflow 3 refuses; "
            f"use sqlite:///<absolute path>/mlflow.db for an embedded store, or one of: "
            f"{_ALLOWED_URIS}"
        )
    if scheme in SERVER_SCHEMES:
        if not urlparse(uri).netloc:
            raise ConfigError(
                f"tracking_uri={tracking_uri!r} has no host; use e.g. http://127.0.0.1:8852, or one of: "
                f"{_ALLOWED_URIS}"
            )
        return uri
    if base_scheme in DATABASE_SCHEMES and (scheme == base_scheme or "+" in scheme):
        return uri
    raise ConfigError(f"tracking_uri={tracking_uri!r} has an unsupported scheme {scheme!r}; use {_ALLOWED_URIS}")


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None (in-memory, other backends)."""
    if not uri.lower().startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///") :].split("?", 1)[0]
    if not raw or raw == ":memory:":
        return None
    return Path(raw)


# --- the embedded store's file: inspection, unfinished builds ------------------------------

#: Infix of the temporary file a new SQLite store is built in: ``mlflow.db.creating.<pid>.<hex>``.
_BUILD_INFIX = ".creating."
_TMP_TABLE_PREFIX = "_alembic_tmp_"


@dataclass(frozen=True)
class _StoreState:
    """What an existing SQLite store file holds (read without writing)."""

    tables: tuple[str, ...]
    #: MLflow's schema revision (``alembic_version``), None when there is none
    revision: str | None
    #: rows per table; only filled when asked for (counting a big store costs)
    counts: Mapping[str, int]
    #: experiments other than MLflow's "Default" (id 0), in ``experiments`` and its tmp copy
    user_experiments: int

    @property
    def tmp_tables(self) -> list[str]:
        return [t for t in self.tables if t.startswith(_TMP_TABLE_PREFIX)]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _inspect_store(path: Path, *, counts: bool = False) -> _StoreState:
    """Read the tables, revision (and row counts) of the SQLite file ``path``.

    ``mode=rw`` never creates a file, and a connection that only reads writes nothing
    -- except that SQLite rolls back a hot journal left by a killed writer, which is
    what any next open does anyway and what makes the committed state readable.
    """
    try:
        con = sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise MetricLoggingError(f"cannot read the MLflow store {str(path)!r}: {exc}") from exc
    try:
        tables = tuple(
            row[0]
            for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        )
        revision = None
        if "alembic_version" in tables:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = None if row is None else str(row[0])
        rows: dict[str, int] = {}
        user_experiments = 0
        if counts:
            for table in tables:
                if not table.startswith("sqlite_"):
                    rows[table] = int(con.execute(f"SELECT count(*) FROM {_quote(table)}").fetchone()[0])
            for table in ("experiments", _TMP_TABLE_PREFIX + "experiments"):
                if table in tables:
                    try:
                        user_experiments += int(
                            con.execute(f"SELECT count(*) FROM {_quote(table)} WHERE experiment_id != 0").fetchone()[0]
                        )
                    except sqlite3.OperationalError:  # no experiment_id column: count every row
                        user_experiments += rows.get(table, 0)
    except sqlite3.DatabaseError as exc:
        raise MetricLoggingError(
            f"the MLflow store {str(path)!r} cannot be read as an SQLite database ({exc}); it was left "
            "untouched. Move it aside to start a new store."
        ) from exc
    finally:
        con.close()
    return _StoreState(tables, revision, rows, user_experiments)


@functools.lru_cache(maxsize=1)
def _mlflow_revisions() -> tuple[str, frozenset[str]]:
    """The head and every revision of the installed MLflow's tracking-store migrations."""
    import mlflow.store
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(Path(mlflow.store.__file__).parent / "db_migrations"))
    script = ScriptDirectory.from_config(config)
    heads = script.get_heads()
    if len(heads) != 1:
        raise MetricLoggingError(f"MLflow's migrations have {len(heads)} heads ({heads}); expected one")
    return heads[0], frozenset(r.revision for r in script.walk_revisions())


def _mlflow_version() -> str:
    try:
        import mlflow

        return f"MLflow {mlflow.__version__}"
    except Exception:  # pragma: no cover - mlflow is imported by now
        return "MLflow"


def _store_problem(state: _StoreState, head: str, known: frozenset[str]) -> str | None:
    """Why the store is unfinished, or None when it is complete (at MLflow's head revision).

    Alembic stamps a revision only after its migration finished, so a store at the
    head revision went through every migration; an ``_alembic_tmp_`` table below the
    head is what a migration killed midway leaves (MLflow's next run of it fails on it).
    """
    if state.revision == head and state.revision is not None:
        return None
    tmp = state.tmp_tables
    if tmp:
        return f"an interrupted migration left {', '.join(tmp)}"
    if not state.tables:
        return "it has no tables"
    if state.revision is None:
        return "it has no MLflow schema revision (no alembic_version row)"
    if state.revision in known:
        return (
            f"it is at MLflow schema revision {state.revision}, not {head} (an interrupted creation, "
            "or a store of an older MLflow)"
        )
    return f"its schema revision {state.revision} is unknown to this MLflow"


def _user_data(old: _StoreState, fresh: _StoreState) -> list[str]:
    """What ``old`` holds beyond the rows MLflow puts in a new store (``fresh``).

    A table rebuilt by a migration may hold its rows only in its ``_alembic_tmp_``
    copy, so such a copy is compared with the table it stands for.  Anything more
    rows than a new store has counts as data: when in doubt, the store is kept.
    """
    found = []
    for table, count in sorted(old.counts.items()):
        if table == "alembic_version":
            continue
        base = table[len(_TMP_TABLE_PREFIX):] if table.startswith(_TMP_TABLE_PREFIX) else table
        if count > fresh.counts.get(base, 0):
            found.append(f"{table}: {count} row{'s' if count != 1 else ''}")
    if old.user_experiments and not any(f.startswith(("experiments:", "_alembic_tmp_experiments:")) for f in found):
        found.append(f"experiments other than Default: {old.user_experiments}")
    return found


def _sidecars(path: Path) -> tuple[Path, ...]:
    """SQLite's journal, WAL and shared-memory files of the database ``path``."""
    return tuple(path.with_name(path.name + suffix) for suffix in ("-journal", "-wal", "-shm"))


def _remove_unfinished_builds(path: Path) -> None:
    """Delete temporary builds of ``path`` left by killed processes (hold the lock file)."""
    prefix = path.name + _BUILD_INFIX
    try:
        leftovers = [entry for entry in path.parent.iterdir() if entry.name.startswith(prefix)]
    except FileNotFoundError:
        return
    for leftover in leftovers:
        _log.info("removing %s, an MLflow store whose creation was interrupted", leftover)
        leftover.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _forget_cached_engine(uri: str) -> None:
    """Close MLflow's cached engine of ``uri``: its pooled connections point at a replaced file.

    ``SqlAlchemyStore`` keeps one engine per URI for the life of the process.
    """
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
    except Exception:  # pragma: no cover - a different MLflow layout: nothing cached to close
        return
    if engine is not None:
        engine.dispose()


# --- input validation ---------------------------------------------------------------------


def _check_str(value: object, what: str) -> str:
    return check_name(what, value, error=MetricInputError)


#: characters MLflow accepts in metric, parameter and tag names (``[/\w.\- :]``)
_UNSAFE_KEY_CHARS = re.compile(r"[^/\w.\- :]")
#: MLflow's limit on a metric, parameter or tag name
MAX_KEY_LENGTH = 250


def sanitize_key(key: str) -> str:
    """The name MLflow will accept for ``key``; ``key`` itself when it is already valid.

    The rules, applied in this order (and documented in the README):

    1. every character MLflow refuses (anything but letters, digits, ``_``,
       ``-``, ``.``, space, ``:`` and ``/``) becomes ``_``;
    2. a name that would resolve to another path is made plain: ``/`` at the
       start or end is dropped, runs of ``/`` become one, and a ``.`` or ``..``
       path segment becomes ``_`` or ``__``;
    3. an empty result becomes ``_``.

    A name longer than :data:`MAX_KEY_LENGTH` is refused (by the callers), never
    cut: two long names that share their start would become one metric.
    """
    cleaned = _UNSAFE_KEY_CHARS.sub("_", key)
    if "/" in cleaned or cleaned in (".", ".."):
        segments = [segment for segment in cleaned.split("/") if segment]
        cleaned = "/".join("_" * len(segment) if segment in (".", "..") else segment for segment in segments)
    return cleaned or "_"


def _check_key(key: object, what: str = "key") -> str:
    # the type check gives a clearer error than MLflow's for the common mistakes
    # (None, ints, enums); the characters are made acceptable (sanitize_key)
    text = check_name(what, key, allow_blank=True, error=MetricInputError)
    if len(text) > MAX_KEY_LENGTH:
        raise MetricInputError(
            f"{what}={text[:40]!r}... is {len(text)} characters; MLflow accepts at most {MAX_KEY_LENGTH} "
            "(a name is never cut: two names would become one)"
        )
    return sanitize_key(text)


def _check_value(key: str, value: object) -> float:
    if isinstance(value, (str, bytes)):
        raise MetricInputError(f"metric {key!r}: value={value!r} is not a number")
    try:
        number = float(value)  # type: ignore[arg-type]  # ints, numpy and 1-element torch scalars
    except Exception as exc:  # TypeError, ValueError, a multi-element tensor's RuntimeError
        raise MetricInputError(f"metric {key!r}: value={value!r} is not a number") from exc
    # NaN and +-inf are accepted (a diverging loss is worth recording); see the module notes.
    return number


def _check_step(step: object) -> int:
    # numpy integers are welcome (any_integral); bool is not: True as a step is always
    # a mistake.  MLflow refuses a negative step too, but its message names 'timestamp'.
    checked = check_int("step", step, optional=True, any_integral=True, error=MetricInputError)
    return 0 if checked is None else checked


def _max_param_length() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    except ImportError:  # pragma: no cover - older/newer mlflow layout
        return _DEFAULT_MAX_PARAM_LENGTH
    return int(MAX_PARAM_VAL_LENGTH)


def _check_param_value(key: str, value: object, limit: int) -> str:
    text = str(value)
    if len(text) > limit:
        raise MetricInputError(
            f"param {key!r}: value is {len(text)} characters; MLflow stores at most {limit} "
            "(and would silently truncate it)"
        )
    return text


def _now_ms() -> int:
    return int(time.time() * 1000)


def _first_paragraph(exc: BaseException) -> str:
    # MLflow's messages sometimes carry a long tutorial after a blank line.
    text = str(exc).strip()
    return text.split("\n\n", 1)[0]


# --- the manager -----------------------------------------------------------------------------


class MLflowManager:
    """Experiments, runs, metrics, parameters and artifacts in MLflow.

    Args:
        tracking_uri: ``None`` for the embedded SQLite store under ``$RF_HOME/mlflow``,
            a database URI (``sqlite:///...``, ``postgresql://...``) or the URL of an
            MLflow server (``http(s)://...``).
        artifact_root: Where experiments created by this manager keep their artifacts
            (a directory). Default: next to a ``sqlite:///`` file (``<dir>/artifacts``),
            ``$RF_HOME/mlflow/artifacts`` for the embedded store and other databases;
            ignored for a server, which decides itself.
        db: The state database holding the metric outbox: a
            :class:`~rapidfire_state.db.StateDB`, its URL, or None for the default
            one (``$RF_DB_URL``, else ``$RF_HOME/db/rapidfire_state.db``), opened
            on first use.
        flush_interval: Seconds between the background flusher's passes.
        background: Run the flusher in a daemon thread (False: only :meth:`flush`,
            :meth:`close` and reads deliver).

    Logging (:meth:`log_metric`, :meth:`log_metrics`, :meth:`log_param`,
    :meth:`log_params`, :meth:`set_tag`, :meth:`end_run`) appends to the outbox
    and returns; a flusher per process delivers (see
    :mod:`rapidfire_state.metric_flusher` for the exactly-once protocol).
    Reads (:meth:`get_run_metrics`, ...) flush first, for at most
    :attr:`read_flush_seconds`.  At interpreter exit pending rows are flushed for
    at most :attr:`exit_flush_seconds`; what is left stays in the outbox.

    Raises:
        ConfigError: the URI is not one MLflow 3 can use.
        MetricLoggingError: the store could not be opened.

    Example::

        mlflow = MLflowManager()                      # embedded, no server
        experiment = mlflow.get_experiment("my_experiment")
        run_id = mlflow.create_run(experiment.experiment_id)
        mlflow.log_metric(run_id, "loss", 0.5, step=100)
        mlflow.end_run(run_id)
    """

    #: how long a read, :meth:`end_run` or :meth:`delete_run` waits for pending rows to go out
    read_flush_seconds: float = 10.0
    #: how long :meth:`close` and interpreter exit wait for pending rows to go out
    exit_flush_seconds: float = 5.0
    #: the timeout of each HTTP call of the background flusher (server stores)
    request_timeout: float = 10.0

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        artifact_root: str | Path | None = None,
        db: Any = None,
        flush_interval: float = 1.0,
        background: bool = True,
    ):
        self.flush_interval = check_number("flush_interval", flush_interval, exclusive_minimum=True,
                                           error=ConfigError)
        self.background = bool(background)
        self._db_spec = db
        self._db: Any = None
        self._flusher: Any = None
        self._flusher_pid: Optional[int] = None
        self._streams: dict[str, int] = {}
        self._appended = 0
        self._setup_lock = threading.RLock()
        if tracking_uri is None:
            uri = default_tracking_uri()
        else:
            uri = validate_tracking_uri(tracking_uri)
        scheme = urlparse(uri).scheme.lower()
        self.tracking_uri: str = uri
        self.is_server: bool = scheme in SERVER_SCHEMES

        sqlite_file = _sqlite_file(uri)
        self.artifact_root: Path | None
        if self.is_server:
            self.artifact_root = None
        elif artifact_root is not None:
            self.artifact_root = Path(artifact_root).expanduser().resolve()
        elif sqlite_file is not None and tracking_uri is not None:
            self.artifact_root = sqlite_file.resolve().parent / "artifacts"
        else:
            self.artifact_root = default_artifact_root()

        try:
            if sqlite_file is not None:
                # SQLite does not create missing parent directories.
                sqlite_file.resolve().parent.mkdir(parents=True, exist_ok=True)
            if self.artifact_root is not None:
                self.artifact_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the MLflow directories for {uri!r}: {exc}") from exc

        self._max_param_length = _DEFAULT_MAX_PARAM_LENGTH
        self._client: MlflowClient = self._open(sqlite_file)

    def _open(self, sqlite_file: Path | None) -> MlflowClient:
        try:
            from mlflow.tracking import MlflowClient

            if sqlite_file is None:
                client = MlflowClient(tracking_uri=self.tracking_uri)
            else:
                # MLflow creates and migrates a new SQLite store without any locking:
                # measured, 4 processes opening one new store at once all failed
                # ("duplicate column", "table _alembic_tmp_tags already exists").  The
                # controller and the workers do exactly that, so opening a SQLite store
                # is serialised by a lock file next to the database (an OS lock: it is
                # released when its holder dies, also by SIGKILL).
                from filelock import FileLock

                path = sqlite_file.resolve()
                with FileLock(str(path) + ".lock", timeout=300):
                    self._ensure_sqlite_store(path)
                    client = MlflowClient(tracking_uri=self.tracking_uri)
            self._max_param_length = _max_param_length()
        except ImportError as exc:
            raise MetricLoggingError(f"mlflow is not installed ({exc}); pip install mlflow") from exc
        except RapidFireError:
            raise
        except Exception as exc:
            raise MetricLoggingError(
                f"cannot open the MLflow tracking store {self.tracking_uri!r}: {_first_paragraph(exc)}"
            ) from exc
        return client

    # --- the SQLite store: built beside, renamed into place -------------------------------
    #
    # MLflow makes a new SQLite store by creating its tables and then running ~60
    # Alembic migrations, several of which rebuild a table through an
    # ``_alembic_tmp_<table>`` copy; SQLite commits each DDL statement on its own.
    # A process killed during those ~2 s left a store that every later open refused
    # ("table _alembic_tmp_experiments already exists").  So the store is built in a
    # temporary file in the same directory and renamed over the final name only once
    # MLflow finished with it: the final file is either absent or complete.  All of
    # it runs under the lock file, so nobody else builds, inspects or renames meanwhile.

    def _ensure_sqlite_store(self, path: Path) -> None:
        """Make ``path`` a complete MLflow store (hold the lock file)."""
        _remove_unfinished_builds(path)
        if not path.exists():
            self._install_new_store(path, replacing=None)
            return
        state = _inspect_store(path)
        head, known = _mlflow_revisions()
        problem = _store_problem(state, head, known)
        if problem is None:
            return
        if state.revision is not None and state.revision not in known and not state.tmp_tables:
            # Made by a newer MLflow: not ours to judge, whatever it holds.
            raise MetricLoggingError(
                f"the MLflow store {str(path)!r} is at schema revision {state.revision!r}, which this "
                f"MLflow ({_mlflow_version()}) does not know: it was made by a newer MLflow. Use that "
                "MLflow version, or another tracking store. The file was left untouched."
            )
        self._install_new_store(path, replacing=problem)

    def _install_new_store(self, path: Path, replacing: str | None) -> None:
        """Build a complete store beside ``path`` and rename it into place.

        ``replacing``: what is wrong with the unfinished store at ``path``, None when
        there is none.  It is replaced only when it holds no data (nothing beyond the
        rows MLflow itself puts in a new store); otherwise the new build is discarded
        and :class:`MetricLoggingError` says what was found.
        """
        tmp = path.with_name(f"{path.name}{_BUILD_INFIX}{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            self._build_store(tmp)
            if replacing is not None:
                data = _user_data(_inspect_store(path, counts=True), _inspect_store(tmp, counts=True))
                if data:
                    raise MetricLoggingError(
                        f"the MLflow store {str(path)!r} is unfinished ({replacing}) but holds data "
                        f"({', '.join(data)}); a store with data is never deleted: it was left untouched. Move it "
                        "aside to start a new store, or repair it with MLflow (back it up, then "
                        f"'mlflow db upgrade sqlite:///{path}'; leftover _alembic_tmp_* tables of an "
                        "interrupted migration must be dropped by hand first)."
                    )
                _log.warning(
                    "the MLflow store %s was unfinished (%s) and held no data: rebuilt it "
                    "(a process was probably killed while creating it)", path, replacing,
                )
                # A journal or WAL of the old file must not be applied to the new one.
                for sidecar in _sidecars(path):
                    sidecar.unlink(missing_ok=True)
            _fsync_file(tmp)
            os.replace(tmp, path)
            fsync_directory(path.parent)
        finally:
            for leftover in (tmp, *_sidecars(tmp)):
                leftover.unlink(missing_ok=True)
        if replacing is not None:
            _forget_cached_engine(self.tracking_uri)

    def _build_store(self, file: Path) -> None:
        # A new SQLite store creates its "Default" experiment (id 0) with an artifact
        # location derived from the store's artifact root, which an MlflowClient sets
        # to ./mlruns in the *current directory*.  Creating the store ourselves first,
        # with our root, puts that experiment's artifacts under artifact_root instead;
        # MlflowClient then finds the tables ready.
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        assert self.artifact_root is not None
        uri = f"sqlite:///{file}"
        SqlAlchemyStore(uri, self.artifact_root.as_uri())
        _forget_cached_engine(uri)
        leftovers = [str(f) for f in _sidecars(file) if f.exists()]
        if leftovers:  # pragma: no cover - MLflow's stores use the rollback journal, deleted on commit
            raise MetricLoggingError(f"building the MLflow store left {leftovers} behind; not installing it")

    def __repr__(self) -> str:
        return f"MLflowManager(tracking_uri={self.tracking_uri!r})"

    @property
    def client(self) -> MlflowClient:
        """The underlying :class:`mlflow.tracking.MlflowClient` (for calls not wrapped here)."""
        return self._client

    def check_server(self, timeout: float = 2.0) -> None:
        """Fail fast when the tracking server does not answer ``/health``.

        MLflow itself retries a refused connection with exponential backoff for
        minutes before reporting it; call this first to learn in ``timeout`` seconds.
        A no-op for database stores.

        Raises:
            MetricLoggingError: the server did not answer ``/health`` with 2xx.
        """
        if not self.is_server:
            return
        from rapidfire_state.ping import ping_service  # stdlib only

        url = self.tracking_uri.rstrip("/") + "/health"
        result = ping_service(url, timeout, name="mlflow", max_status=299)
        if not result.up:
            raise MetricLoggingError(f"the MLflow server at {self.tracking_uri} is not healthy: {url}: {result.error}")

    # --- error translation -------------------------------------------------------------

    def _wrap(
        self, exc: Exception, action: str, entity: str | None = None, entity_id: Any = None
    ) -> RapidFireError:
        """Translate an exception raised by MLflow into one of this module's errors."""
        code = getattr(exc, "error_code", None)
        message = _first_paragraph(exc)
        if code == "RESOURCE_DOES_NOT_EXIST" and entity is not None:
            error: RapidFireError = MetricNotFoundError(entity, entity_id)
            error.args = (f"{action}: {entity} {entity_id!r} does not exist in {self.tracking_uri} ({message})",)
            return error
        if code == "INVALID_PARAMETER_VALUE":
            return MetricInputError(f"{action}: {message}")
        return MetricLoggingError(f"{action} failed ({self.tracking_uri}): {type(exc).__name__}: {message}")

    # --- experiments and runs ------------------------------------------------------------

    def get_experiment(self, name: str) -> Experiment:
        """Return the MLflow experiment called ``name``, creating it if needed.

        A deleted experiment of that name is restored (MLflow keeps the name
        reserved, so it could not be created again).  Safe when several processes
        get the same new name at once: the loser of the creation race reads the
        winner's experiment.

        Returns:
            The :class:`mlflow.entities.Experiment` (``.experiment_id``, ``.name``,
            ``.artifact_location``).
        """
        name = _check_str(name, "name")
        client = self._client
        try:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    location = self._artifact_location(name)
                    experiment_id = client.create_experiment(name, artifact_location=location)
                except Exception as exc:
                    if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                        raise
                    # Another process created it between our read and our insert.
                    experiment = client.get_experiment_by_name(name)
                    if experiment is None:
                        raise
                else:
                    return client.get_experiment(experiment_id)
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
                experiment = client.get_experiment(experiment.experiment_id)
            return experiment
        except RapidFireError:
            raise
        except Exception as exc:
            raise self._wrap(exc, f"get_experiment({name!r})") from exc

    def _artifact_location(self, name: str) -> str | None:
        if self.artifact_root is None:
            return None  # a server chooses (its --default-artifact-root / artifact proxy)
        # The experiment id is not known before creation (MLflow's own layout uses it);
        # a readable name plus a random suffix is unique and easy to find on disk.
        safe = _UNSAFE_DIR_CHARS.sub("_", name).strip("._")[:64] or "experiment"
        return (self.artifact_root / f"{safe}-{uuid.uuid4().hex[:8]}").as_uri()

    def create_run(
        self, experiment_id: str | int, run_name: str | None = None, *, tags: Mapping[str, Any] | None = None
    ) -> str:
        """Create a run in ``experiment_id`` (status RUNNING) and return its run id.

        This one call goes to MLflow at once (the run id comes from MLflow); it
        raises :class:`MetricLoggingError` when MLflow cannot be reached.
        """
        if isinstance(experiment_id, bool) or not isinstance(experiment_id, (str, int)) or not str(experiment_id):
            raise MetricInputError(f"experiment_id={experiment_id!r} must be a non-empty string or an integer")
        if run_name is not None:
            _check_str(run_name, "run_name")
        checked_tags = {_check_key(k): str(v) for k, v in (tags or {}).items()}
        try:
            run = self._client.create_run(str(experiment_id), run_name=run_name, tags=checked_tags or None)
        except Exception as exc:
            raise self._wrap(exc, "create_run", "mlflow experiment", str(experiment_id)) from exc
        run_id = run.info.run_id
        self._streams[run_id] = self.db.metric_stream(self.tracking_uri, run_id)
        return run_id

    def track_experiment(self, experiment_id: int) -> str:
        """The MLflow experiment of RapidFire experiment ``experiment_id``, made if needed.

        Named like the RapidFire experiment; its id is stored in
        ``experiments.metric_experiment_id``.  Returns the MLflow experiment id.
        """
        record = self.db.get_experiment(experiment_id)
        if record.metric_experiment_id:
            return record.metric_experiment_id
        metric_experiment_id = str(self.get_experiment(record.name).experiment_id)
        self.db.set_experiment_metric_id(record.experiment_id, metric_experiment_id)
        return metric_experiment_id

    def create_run_for(self, run_id: int) -> str:
        """The MLflow run of RapidFire run ``run_id``: made (once) and linked to it.

        The MLflow run is named ``run_<run_id>`` in the experiment's MLflow
        experiment (:meth:`track_experiment`), tagged ``rapidfire.experiment``,
        ``rapidfire.run_id``, ``rapidfire.source`` and, for a clone-modify,
        ``rapidfire.parent_run_id`` (and ``rapidfire.warm_started_from``); its
        flattened configuration is logged as parameters (a value longer than
        MLflow keeps is left out and named in the tag
        ``rapidfire.params_too_long``).  Its id is stored in
        ``runs.metric_run_id``, and from then on every status change of the run
        reaches the MLflow run through the outbox, in order
        (:func:`mlflow_status_for`).  Calling it again returns the same id.
        """
        record = self.db.get_run(run_id)
        if record.metric_run_id:
            self._streams[record.metric_run_id] = self.db.metric_stream(
                self.tracking_uri, record.metric_run_id, run_id=record.run_id
            )
            return record.metric_run_id
        experiment = self.db.get_experiment(record.experiment_id)
        metric_experiment_id = self.track_experiment(experiment.experiment_id)
        tags = {
            "rapidfire.experiment": experiment.name,
            "rapidfire.run_id": str(record.run_id),
            "rapidfire.source": str(getattr(record.source, "value", record.source)),
        }
        if record.cloned_from is not None:
            tags["rapidfire.parent_run_id"] = str(record.cloned_from)
        if record.warm_started_from is not None:
            tags["rapidfire.warm_started_from"] = str(record.warm_started_from)
        params: dict[str, str] = {}
        too_long: list[str] = []
        for key, value in sorted((record.flattened_config or {}).items()):
            text = str(value)
            if len(text) > self._max_param_length or len(str(key)) > MAX_KEY_LENGTH:
                too_long.append(str(key))
            else:
                params[sanitize_key(str(key))] = text
        if too_long:
            tags["rapidfire.params_too_long"] = ",".join(too_long)[:_MAX_TAG_LENGTH]
        try:
            run = self._client.create_run(metric_experiment_id, run_name=f"run_{record.run_id}", tags=tags)
        except Exception as exc:
            raise self._wrap(exc, "create_run_for", "mlflow experiment", metric_experiment_id) from exc
        metric_run_id = run.info.run_id
        # the link, then the stream: from the stream's unit on, each status change
        # of the run appends its MLflow status; the unit appends the current one
        self.db.set_metric_run_id(record.run_id, metric_run_id)
        stream = self.db.metric_stream(self.tracking_uri, metric_run_id, run_id=record.run_id, mirror_status=True)
        self._streams[metric_run_id] = stream
        if params:
            self._append([
                {"stream_id": stream, "kind": "PARAM", "key": k, "text_value": v, "timestamp_ms": _now_ms()}
                for k, v in params.items()
            ])
        return metric_run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """End run ``run_id`` with ``status``: FINISHED (alias COMPLETED), FAILED or KILLED.

        Goes through the outbox after everything logged before it, then waits
        (at most :attr:`read_flush_seconds`; one attempt while MLflow is failing)
        for delivery.  A run MLflow already
        shows FINISHED or FAILED is left so (a late stop never reopens or
        clobbers a finished run); MLflow being down is not raised: the status is
        delivered when it is back.
        """
        run_id = _check_str(run_id, "run_id")
        raw = getattr(status, "value", status)  # accepts enums such as RunEndedBy
        if not isinstance(raw, str):
            raise MetricInputError(f"status={status!r} must be one of {', '.join(END_STATUSES)}")
        wanted = _STATUS_ALIASES.get(raw.upper(), raw.upper())
        if wanted not in END_STATUSES:
            raise MetricInputError(
                f"status={status!r} is not an end status; use one of {', '.join(END_STATUSES)} "
                "(COMPLETED is accepted for FINISHED)"
            )
        stream = self._stream(run_id)
        self._append([{"stream_id": stream, "kind": "STATUS", "key": "end_run", "text_value": wanted,
                       "timestamp_ms": _now_ms()}])
        self._flush_waiting()

    def delete_run(self, run_id: str) -> None:
        """Delete run ``run_id`` (MLflow's soft delete: hidden, restorable, data kept); flushes first."""
        run_id = _check_str(run_id, "run_id")
        self._flush_before_read()
        try:
            self._client.delete_run(run_id)
        except Exception as exc:
            raise self._wrap(exc, "delete_run", "mlflow run", run_id) from exc

    def get_run_status(self, run_id: str) -> str:
        """The MLflow status of ``run_id``: RUNNING, SCHEDULED, FINISHED, FAILED or KILLED; flushes first."""
        return self._read_run(run_id, "get_run_status", lambda run: str(run.info.status))

    # --- the outbox -------------------------------------------------------------------------

    @property
    def db(self) -> Any:
        """The state database holding this manager's metric outbox (opened on first use)."""
        with self._setup_lock:
            if self._db is None:
                from rapidfire_state.db import StateDB

                given = self._db_spec
                self._db = given if isinstance(given, StateDB) else StateDB(given)
            return self._db

    @property
    def flusher(self) -> Any:
        """This process's :class:`~rapidfire_state.metric_flusher.Flusher` for this store."""
        with self._setup_lock:
            if self._flusher is None or self._flusher_pid != os.getpid():
                from rapidfire_state.metric_flusher import Flusher, RestTransport, StoreTransport

                if self.is_server:
                    transport: Any = RestTransport(self._host_creds, timeout=self.request_timeout)
                else:
                    transport = StoreTransport(self._client)
                self._flusher = Flusher(self.db, self.tracking_uri, transport, interval=self.flush_interval)
                self._flusher_pid = os.getpid()
                _register_at_exit(self)
            flusher = self._flusher
        if self.background:
            flusher.start()
        return flusher

    def _host_creds(self) -> Any:
        store = getattr(getattr(self._client, "_tracking_client", None), "store", None)
        get_creds = getattr(store, "get_host_creds", None)
        if get_creds is not None:
            return get_creds()
        from mlflow.utils.rest_utils import MlflowHostCreds  # pragma: no cover - other MLflow layouts

        return MlflowHostCreds(self.tracking_uri)  # pragma: no cover

    def _stream(self, run_id: str) -> int:
        """The outbox stream of MLflow run ``run_id``; a run never seen is looked up once.

        A run MLflow says does not exist raises :class:`MetricNotFoundError`; when
        MLflow cannot be asked (server down), the run is taken as it is and rows
        for it wait (MLflow's refusal, should it come, is kept on the rows).
        """
        flusher = self.flusher  # per process: streams are cached per process too
        stream = self._streams.get(run_id)
        if stream is not None:
            return stream
        stream = self.db.find_metric_stream(self.tracking_uri, run_id)
        if stream is None:
            try:
                flusher.transport.get_run(run_id)
            except Exception as exc:
                from rapidfire_state.metric_flusher import error_code

                if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                    raise self._wrap(exc, "log to run", "mlflow run", run_id) from exc
                _log.warning("could not check MLflow run %s (%s); logging for it anyway", run_id, _first_paragraph(exc))
            stream = self.db.metric_stream(self.tracking_uri, run_id)
        self._streams[run_id] = stream
        return stream

    def _append(self, rows: list[dict[str, Any]]) -> None:
        self.db.append_metric_rows(rows)
        self._appended += len(rows)
        if self._appended >= _WAKE_EVERY_ROWS:
            self._appended = 0
            self.flusher.wake()

    def flush(self, timeout: Optional[float] = None) -> int:
        """Send this store's pending outbox rows now; return how many were delivered.

        ``timeout`` None: one pass (each claimable batch tried once, the first
        failure ends it); a number: keep trying, backing off, until nothing is
        pending or the time is up.  MLflow trouble is never raised here; see
        :meth:`pending` and ``flusher.stats.last_error``.
        """
        if timeout is not None:
            check_number("timeout", timeout, error=MetricInputError)
        return self.flusher.flush(timeout)

    def pending(self, run_id: Optional[str] = None) -> int:
        """Rows (points, params, tags, statuses) of this store not delivered yet, of one run or all."""
        if run_id is not None:
            run_id = _check_str(run_id, "run_id")
        return self.db.pending_metric_rows(tracking_uri=self.tracking_uri, metric_run_id=run_id)

    def failed(self, limit: int = 100) -> list[dict[str, Any]]:
        """Rows MLflow refused for good (newest first), each with its run and MLflow's message."""
        return self.db.failed_metric_rows(tracking_uri=self.tracking_uri, limit=limit)

    def close(self, timeout: Optional[float] = None) -> int:
        """Flush (at most ``timeout`` seconds, default :attr:`exit_flush_seconds`) and stop the flusher.

        Returns how many rows the final flush delivered.  Rows left pending stay
        in the outbox for any later flusher.
        """
        wait = self.exit_flush_seconds if timeout is None else timeout
        with _EXIT_LOCK:
            _EXIT_FLUSH.discard(self)  # closed: the exit hook has nothing left to do for it
        flusher = self._flusher
        if flusher is None or self._flusher_pid != os.getpid():
            return 0
        # a manager used again after close() gets a new flusher (and exit hook)
        self._flusher = None
        if self._db is not None and self._db.closed:
            # the caller closed the state database first: nothing can be flushed
            # from here; what is pending stays in the outbox for the next flusher
            flusher.stop(timeout=wait)
            return 0
        delivered = 0
        try:
            delivered = flusher.flush(wait)
        finally:
            flusher.stop(timeout=wait)
        return delivered

    # --- metrics and parameters -------------------------------------------------------------

    def log_metric(self, run_id: str, key: str, value: float, step: int | None = None) -> None:
        """Log one metric value at ``step`` (default 0): one insert into the outbox, no MLflow call.

        The key is made acceptable to MLflow by :func:`sanitize_key`.  Delivery
        happens in the background (:meth:`flush` to send now).
        """
        run_id = _check_str(run_id, "run_id")
        key = _check_key(key)
        number = _check_value(key, value)
        step_ = _check_step(step)
        stream = self._stream(run_id)
        self._append([{"stream_id": stream, "kind": "METRIC", "key": key, "value": number, "step": step_,
                       "timestamp_ms": _now_ms()}])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log several metrics at one ``step``: one outbox transaction for all of them.

        All values are validated before anything is written, so a bad value logs nothing.
        """
        run_id = _check_str(run_id, "run_id")
        if not isinstance(metrics, Mapping):
            raise MetricInputError(f"metrics must be a mapping of name to number, got {type(metrics).__name__}")
        step_ = _check_step(step)
        checked = [(_check_key(k), _check_value(str(k), v)) for k, v in metrics.items()]
        if not checked:
            return
        stream = self._stream(run_id)
        timestamp = _now_ms()
        self._append([
            {"stream_id": stream, "kind": "METRIC", "key": k, "value": v, "step": step_, "timestamp_ms": timestamp}
            for k, v in checked
        ])

    def log_param(self, run_id: str, key: str, value: Any) -> None:
        """Log one parameter (stored as ``str(value)``; parameters are immutable)."""
        self.log_params(run_id, {key: value})

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log several parameters in one outbox transaction.

        A parameter already logged for the run with another value is refused at
        once (MLflow keeps the first value); the same value again is accepted.
        """
        run_id = _check_str(run_id, "run_id")
        if not isinstance(params, Mapping):
            raise MetricInputError(f"params must be a mapping of name to value, got {type(params).__name__}")
        checked: dict[str, str] = {}
        for k, v in params.items():
            key = _check_key(k)
            text = _check_param_value(key, v, self._max_param_length)
            if key in checked and checked[key] != text:
                raise MetricInputError(
                    f"log_params: param {key!r} is given twice with different values ({checked[key]!r}, {text!r})"
                )
            checked[key] = text
        if not checked:
            return
        stream = self._stream(run_id)
        rows = []
        for key, text in checked.items():
            logged = self.db.metric_param_value(stream, key)
            if logged is not None and logged != text:
                raise MetricInputError(
                    f"log_param({key!r}): Changing param values is not allowed. Param with key={key!r} was "
                    f"already logged with value={logged!r} for run ID={run_id!r}; attempted value={text!r}"
                )
            if logged is None:
                rows.append({"stream_id": stream, "kind": "PARAM", "key": key, "text_value": text,
                             "timestamp_ms": _now_ms()})
        if rows:
            self._append(rows)

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        """Set tag ``key`` of the run to ``str(value)`` (through the outbox, in order with the metrics)."""
        self.set_tags(run_id, {key: value})

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set several tags in one outbox transaction."""
        run_id = _check_str(run_id, "run_id")
        if not isinstance(tags, Mapping):
            raise MetricInputError(f"tags must be a mapping of name to value, got {type(tags).__name__}")
        rows = []
        for k, v in tags.items():
            key = _check_key(k)
            text = str(v)
            if len(text) > _MAX_TAG_LENGTH:
                raise MetricInputError(
                    f"tag {key!r}: value is {len(text)} characters; MLflow stores at most {_MAX_TAG_LENGTH}"
                )
            rows.append({"stream_id": None, "kind": "TAG", "key": key, "text_value": text, "timestamp_ms": _now_ms()})
        if not rows:
            return
        stream = self._stream(run_id)
        for row in rows:
            row["stream_id"] = stream
        self._append(rows)

    def get_run_metrics(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        """Every metric of ``run_id`` with its full history: ``{key: [(step, value), ...]}``.

        Histories are ordered by step, then by logging time.  Pending outbox rows
        are flushed first (at most :attr:`read_flush_seconds`), so a process reads
        what it logged.
        """
        run_id = _check_str(run_id, "run_id")
        self._flush_before_read()
        try:
            run = self._client.get_run(run_id)
            result: dict[str, list[tuple[int, float]]] = {}
            for key in sorted(run.data.metrics):
                history = self._client.get_metric_history(run_id, key)
                ordered = sorted(history, key=lambda m: (m.step, m.timestamp))
                result[key] = [(int(m.step), float(m.value)) for m in ordered]
            return result
        except Exception as exc:
            raise self._wrap(exc, "get_run_metrics", "mlflow run", run_id) from exc

    def get_run_params(self, run_id: str) -> dict[str, str]:
        """The parameters of ``run_id`` (values are strings, as MLflow stores them); flushes first."""
        return self._read_run(run_id, "get_run_params", lambda run: dict(run.data.params))

    def get_run_tags(self, run_id: str) -> dict[str, str]:
        """The tags of ``run_id`` (MLflow's own ``mlflow.*`` tags included); flushes first."""
        return self._read_run(run_id, "get_run_tags", lambda run: dict(run.data.tags))

    def _read_run(self, run_id: str, action: str, read: Any) -> Any:
        """``read(run)`` of MLflow's run ``run_id``, after the pending rows went out."""
        run_id = _check_str(run_id, "run_id")
        self._flush_before_read()
        try:
            return read(self._client.get_run(run_id))
        except Exception as exc:
            raise self._wrap(exc, action, "mlflow run", run_id) from exc

    def _flush_before_read(self) -> None:
        # rows logged by any manager of this store (this process or a dead one) go first
        if self.pending():
            self._flush_waiting()

    def _flush_waiting(self) -> None:
        """Flush for at most :attr:`read_flush_seconds`; one pass only while MLflow is failing.

        During an outage a bounded wait would cost every read and ``end_run`` its
        whole length: the flusher, backing off after a failure, makes one attempt.
        """
        flusher = self.flusher
        self.flush()  # one pass: learns whether MLflow answers
        if not flusher.backing_off and self.pending():
            self.flush(self.read_flush_seconds)  # rows another process has in flight

    # --- artifacts -------------------------------------------------------------------------------

    def log_artifact(self, run_id: str, artifact_path: str | Path, artifact_dir: str | None = None) -> None:
        """Copy the local file (or directory) ``artifact_path`` into the run's artifacts.

        Args:
            run_id: The MLflow run.
            artifact_path: A local file or directory that must exist.
            artifact_dir: Optional sub-directory inside the run's artifact root.
        """
        run_id = _check_str(run_id, "run_id")
        if not isinstance(artifact_path, (str, Path)) or str(artifact_path) == "":
            raise MetricInputError(f"artifact_path={artifact_path!r} must be a path to a local file")
        path = Path(artifact_path).expanduser()
        if not path.exists():
            raise MetricInputError(f"artifact_path={str(artifact_path)!r} does not exist; nothing was logged")
        if artifact_dir is not None:
            _check_str(artifact_dir, "artifact_dir")
        try:
            if path.is_dir():
                target = f"{artifact_dir}/{path.name}" if artifact_dir else path.name
                self._client.log_artifacts(run_id, str(path), artifact_path=target)
            else:
                self._client.log_artifact(run_id, str(path), artifact_path=artifact_dir)
        except Exception as exc:
            raise self._wrap(exc, f"log_artifact({str(path)!r})", "mlflow run", run_id) from exc

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """The artifact paths directly under ``path`` (the root by default) of ``run_id``."""
        run_id = _check_str(run_id, "run_id")
        try:
            return [info.path for info in self._client.list_artifacts(run_id, path)]
        except Exception as exc:
            raise self._wrap(exc, "list_artifacts", "mlflow run", run_id) from exc


__all__ = [
    "MLflowManager",
    "mlflow_status_for",
    "MLFLOW_RUN_STATUS",
    "sanitize_key",
    "MAX_KEY_LENGTH",
    "MetricLoggingError",
    "MetricInputError",
    "MetricNotFoundError",
    "DATABASE_SCHEMES",
    "SERVER_SCHEMES",
    "END_STATUSES",
    "default_tracking_uri",
    "default_artifact_root",
    "validate_tracking_uri",
]
