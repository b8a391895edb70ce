"""Per-component log files and console output on top of loguru.

A leaf module: it imports only the standard library, loguru,
:mod:`rapidfire_state.constants`, :mod:`rapidfire_state.exceptions` and
:mod:`rapidfire_state.datapaths`.  (It is named ``logging`` inside the package; all
imports are absolute, so it never shadows the standard library's ``logging``.)

Usage, as in the original utilities::

    from rapidfire_state.logging import RFLogger

    logger = RFLogger().create_logger("controller")
    logger.info("Starting controller")
    logger.error("Failed to schedule", run_id=5)   # run_id lands in the record's extra

Files: ``<log dir>/<name>.log`` — ``controller.log``, ``worker_0.log``,
``dispatcher.log`` …, and ``training.log`` for :class:`TrainingLogger`.  The log dir is
``$RF_LOG_PATH/<experiment>`` unless given.  The file name follows the pattern
``$RF_LOG_FILENAME`` (default ``{name}.log``; ``{name}`` is the component), read each
time a logger is created: ``RF_LOG_FILENAME=rf_{name}.log`` gives ``rf_controller.log``,
and a pattern without ``{name}`` (``rapidfire.log``) puts every component of the
experiment in that one file, each line naming its component.

How it behaves with loguru's single global logger:

* each file sink is added once per process per file path and only accepts records
  bound to its own component and experiment, so a message logged through the
  ``controller`` logger never lands in ``worker_0.log``;
* one console sink (stderr) per process shows only records of loggers made here
  (with ``console=True``), so a user's own messages are not echoed twice by it;
* every sink is ``enqueue=True`` and files are opened in append mode with line
  buffering: each record is one ``write()`` to an ``O_APPEND`` file, so many threads
  and processes can share a file (``dispatcher.log``) without lines interleaving;
* it never removes a handler it did not add: :func:`remove_rf_sinks` (also
  :meth:`RFLogger.close_all`) removes exactly the sinks added here.  loguru's own
  default stderr handler (id 0), if the application still has it, is left alone —
  it then prints every message as well; remove it with ``logger.remove(0)`` or pass
  ``console=False`` if the duplicates bother you.

Keyword arguments of a logging call always land in the record's ``extra`` (loguru
captures them) *and* are used to ``str.format`` the message: ``log.error("Failed to
schedule", run_id=5)`` is fine, but a message with literal braces plus keyword
arguments (``log.info("got {}", run_id=5)``) fails to format; use
``log.bind(run_id=5).info(...)`` for such messages.

File line format (one record per line; extras appended as ``key=value``)::

    2024-05-01 12:00:00.123+00:00 | ERROR    | my_exp | controller | pid 4242 | mod:fn:17 - Failed to schedule | run_id=5
"""

from __future__ import annotations

import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from loguru import logger as _logger

from rapidfire_state import constants
from rapidfire_state.datapaths import (
    DataPath,
    ensure_within,
    resolve_base,
    validate_component,
)
from rapidfire_state.exceptions import ConfigError, DataPathException

if TYPE_CHECKING:  # loguru exposes these types only to type checkers
    from loguru import Logger, Record

PathLike = Union[str, "os.PathLike[str]"]

#: Extra keys this module binds on every logger it returns.
COMPONENT_KEY = "component"
EXPERIMENT_KEY = "experiment"
#: Experiment name used when none is given, none is initialised and the env is unset.
DEFAULT_EXPERIMENT = "default"
#: Component (and file stem) of :class:`TrainingLogger`.
TRAINING_COMPONENT = "training"

_BOUND_KEYS = frozenset({COMPONENT_KEY, EXPERIMENT_KEY})

_FILE_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSSZZ} | {level: <8} | {extra[experiment]} | "
    "{extra[component]} | pid {process} | {name}:{function}:{line} - {message}"
)
_CONSOLE_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
    "<cyan>{extra[component]}</cyan> | <level>{message}</level>"
)

# The same pattern loguru's colorizer uses to find markup tags (with any backslashes
# before them); see _escape_template.
_MARKUP_TAG = re.compile(r"(\\*)(</?(?:[fb]g\s)?[^<>\s]*>)")
_SIMPLE_VALUE = re.compile(r"[^\s\"'=|]+\Z")


# --- rendering --------------------------------------------------------------------


def _escape_template(text: str) -> str:
    """Make arbitrary text literal inside a loguru format template.

    A format *function* returns a template that loguru parses for colour markup and
    then fills with ``str.format_map``.  Extras are user data, so a value such as
    ``"<red>"`` or ``"{x}"`` must not be read as markup or a placeholder: a tag gets
    an odd number of backslashes before it (loguru's escape rule), braces are doubled.
    """
    text = _MARKUP_TAG.sub(lambda m: m.group(1) * 2 + "\\" + m.group(2), text)
    return text.replace("{", "{{").replace("}", "}}")


def _render_value(value: Any) -> str:
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # a broken __str__ must not lose the log line
        text = object.__repr__(value)
    if text and _SIMPLE_VALUE.match(text):
        return text
    # Quote anything with spaces, quotes, '=' or newlines so the line stays one
    # parseable line of key=value pairs.
    return repr(text).replace("\n", "\\n")


def render_extras(record: Record) -> str:
    """``" | k=v k2=v2"`` for the record's extras other than component/experiment, or ``""``."""
    items = [
        f"{key}={_render_value(value)}"
        for key, value in record["extra"].items()
        if key not in _BOUND_KEYS
    ]
    return " | " + " ".join(items) if items else ""


def _file_format(record: Record) -> str:
    return _FILE_FORMAT + _escape_template(render_extras(record)) + "\n{exception}"


def _console_format(record: Record) -> str:
    return _CONSOLE_FORMAT + _escape_template(render_extras(record)) + "\n{exception}"


# --- sink registry ----------------------------------------------------------------


@dataclass
class _Acceptance:
    """The (component, experiment) pairs a sink accepts.

    Replaced (never mutated) under ``_lock``; filters read it without the lock, which
    is safe because assigning an attribute is atomic and a frozenset never changes.
    """

    pairs: frozenset[tuple[str, str]] = frozenset()

    def accepts(self, record: Record) -> bool:
        extra = record["extra"]
        component = extra.get(COMPONENT_KEY)
        experiment = extra.get(EXPERIMENT_KEY)
        # isinstance first: a user may bind unhashable values under these keys.
        return (
            isinstance(component, str)
            and isinstance(experiment, str)
            and (component, experiment) in self.pairs
        )

    def add(self, pair: tuple[str, str]) -> None:
        if pair not in self.pairs:
            self.pairs = self.pairs | {pair}


@dataclass
class _Sink:
    sink_id: int
    acceptance: _Acceptance


_lock = threading.Lock()
_file_sinks: dict[Path, _Sink] = {}
_console_sink: _Sink | None = None


class _StderrProxy:
    """Writes to whatever ``sys.stderr`` is *now*.

    Binding the sink to the stream object present at ``add`` time would keep writing
    to a stream that was since replaced (and maybe closed) by a test runner, a
    notebook or the application.
    """

    def write(self, message: str) -> None:
        stream = sys.stderr
        if stream is not None:  # pythonw and some daemons have no stderr
            stream.write(message)

    def flush(self) -> None:
        stream = sys.stderr
        if stream is not None and hasattr(stream, "flush"):
            stream.flush()

    def isatty(self) -> bool:  # consulted by loguru to decide on colours
        stream = sys.stderr
        try:
            return bool(stream is not None and stream.isatty())
        except Exception:
            return False


def _console_colorize() -> bool | None:
    # https://no-color.org and the common FORCE_COLOR convention; None = loguru decides
    # (colours when stderr is a terminal).
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return None


def _ensure_file_sink(path: Path, pair: tuple[str, str], level: str | int) -> None:
    """Add the file sink for ``path`` unless this process already has it (hold ``_lock``)."""
    existing = _file_sinks.get(path)
    if existing is not None:
        existing.acceptance.add(pair)
        return
    acceptance = _Acceptance(frozenset({pair}))
    try:
        sink_id = _logger.add(
            # loguru formats a file sink's path ("{time}" placeholders): escape braces
            # that may come from RF_LOG_PATH so the path is taken literally.
            str(path).replace("{", "{{").replace("}", "}}"),
            level=level,
            format=_file_format,
            filter=acceptance.accepts,
            colorize=False,
            # A writer thread per sink: logging calls from many threads never block
            # on file I/O and are serialised in order.
            enqueue=True,
            # Append + line buffering: each record is a single write() on an O_APPEND
            # descriptor, so processes sharing the file never split each other's lines.
            mode="a",
            buffering=1,
            encoding="utf-8",
            # diagnose=True would write local variable values (tokens, passwords)
            # into tracebacks in the log files.
            diagnose=False,
        )
    except OSError as exc:
        raise DataPathException(f"cannot open log file {str(path)!r}: {exc}") from exc
    _file_sinks[path] = _Sink(sink_id, acceptance)


def _ensure_console_sink(pair: tuple[str, str], level: str | int) -> None:
    """Add this process's console sink if missing; let it show ``pair`` (hold ``_lock``)."""
    global _console_sink
    if _console_sink is not None:
        _console_sink.acceptance.add(pair)
        return
    acceptance = _Acceptance(frozenset({pair}))
    sink_id = _logger.add(
        _StderrProxy(),
        level=level,
        format=_console_format,
        filter=acceptance.accepts,
        colorize=_console_colorize(),
        enqueue=True,
        diagnose=False,
    )
    _console_sink = _Sink(sink_id, acceptance)


def remove_rf_sinks() -> None:
    """Flush and remove every sink this module added in this process; no other.

    Pending messages are written first (``logger.complete()``).  Sinks a user added
    keep working.  Safe to call repeatedly, and after the application removed our
    sinks itself (``logger.remove()``).  A later ``create_logger`` adds fresh sinks.
    """
    global _console_sink
    with _lock:
        ids = [sink.sink_id for sink in _file_sinks.values()]
        if _console_sink is not None:
            ids.append(_console_sink.sink_id)
        _file_sinks.clear()
        _console_sink = None
        _logger.complete()
        for sink_id in ids:
            try:
                _logger.remove(sink_id)
            except ValueError:  # already removed by the application
                pass


def rf_log_files() -> list[Path]:
    """The log files this process currently has sinks for (for inspection and tests)."""
    with _lock:
        return sorted(_file_sinks)


# --- public API -------------------------------------------------------------------


def _normalise_level(level: str | int) -> str | int:
    if isinstance(level, bool) or not isinstance(level, (str, int)):
        raise ConfigError(f"invalid log level {level!r}: use a level name such as 'INFO' or an int >= 0")
    if isinstance(level, int):
        if level < 0:
            raise ConfigError(f"invalid log level {level!r}: an integer level must be >= 0")
        return level
    # The exact name first (loguru level names are case-sensitive and a user may have
    # registered a lower-case one), then the upper-cased standard spelling.
    for name in (level.strip(), level.strip().upper()):
        try:
            _logger.level(name)
        except ValueError:
            continue
        return name
    raise ConfigError(
        f"invalid log level {level!r}: use TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, "
        "CRITICAL or a level registered with loguru"
    )


class RFLogger:
    """Factory of per-component loggers writing ``<log dir>/<name>.log`` and the console.

    Args:
        experiment_name: the experiment the records belong to.  Default, resolved at
            each :meth:`create_logger` call: ``DataPath.experiment_name()`` if
            :class:`~rapidfire_state.datapaths.DataPath` is initialised, else
            ``$RF_EXPERIMENT_NAME``, else ``"default"``.
        log_dir: the directory of the log files.  Default ``$RF_LOG_PATH/<experiment>``,
            with ``RF_LOG_PATH`` read at each call.
        console: also show this factory's loggers on stderr (one console sink per
            process, colour-coded levels when stderr is a terminal).
        level: the minimum level of the sinks this factory *adds*.  A sink that
            already exists in this process (same file, or the console) keeps the level
            it was created with.

    Raises:
        DataPathException: an experiment name that is not a safe path component.
        ConfigError: an unknown level.
    """

    def __init__(
        self,
        experiment_name: str | None = None,
        *,
        log_dir: PathLike | None = None,
        console: bool = True,
        level: str | int = "DEBUG",
    ) -> None:
        self._experiment_name = (
            None if experiment_name is None else validate_component(experiment_name, "experiment name")
        )
        self._log_dir = None if log_dir is None else resolve_base(log_dir, "log_dir")
        self._console = bool(console)
        self._level = _normalise_level(level)

    @property
    def experiment_name(self) -> str:
        """The experiment name records are bound to (resolved now; see the class doc)."""
        if self._experiment_name is not None:
            return self._experiment_name
        try:
            return DataPath.experiment_name()
        except DataPathException:
            pass  # not initialised in this process
        raw = os.environ.get("RF_EXPERIMENT_NAME")
        if raw:
            try:
                return validate_component(raw, "experiment name")
            except DataPathException as exc:
                raise ConfigError(f"RF_EXPERIMENT_NAME: {exc}") from exc
        return DEFAULT_EXPERIMENT

    @property
    def log_dir(self) -> Path:
        """The resolved directory of this factory's log files (not created here)."""
        if self._log_dir is not None:
            return self._log_dir
        base = resolve_base(constants.log_path(), "log path (RF_LOG_PATH)")
        return ensure_within(base / self.experiment_name, base, "log directory")

    def log_file(self, name: str) -> Path:
        """The log file of component ``name`` (not created here).

        ``<log dir>/<file name>``, the file name made from ``$RF_LOG_FILENAME`` (read
        now; default ``{name}.log``, so ``controller`` → ``controller.log``).

        Raises:
            DataPathException: ``name`` is not a safe path component.
            ConfigError: ``RF_LOG_FILENAME`` does not give a safe file name.
        """
        component = validate_component(name, "logger name")
        filename = constants.log_file_name(component)
        try:
            validate_component(filename, "log file name")
        except DataPathException as exc:
            raise ConfigError(
                f"RF_LOG_FILENAME={constants.log_filename()!r} gives the file name {filename!r} for "
                f"logger {component!r}: {exc}"
            ) from exc
        directory = self.log_dir
        return ensure_within(directory / filename, directory, "log file")

    def create_logger(self, name: str) -> Logger:
        """A loguru logger bound to ``component=name`` and this ``experiment``.

        Adds the file sink :meth:`log_file` (``<log dir>/<name>.log`` by default; see
        ``RF_LOG_FILENAME``) and the console sink unless this process already has them.
        Keyword arguments of a logging call are recorded in the record's extra and
        written as ``key=value``::

            log = RFLogger().create_logger("controller")
            log.error("Failed to schedule", run_id=5)

        Raises:
            DataPathException: a name that is not a safe path component (``worker_0``,
                ``controller`` are fine), or a log file that cannot be opened.
        """
        return self._create(name, {})

    def _create(self, component: str, extra: dict[str, Any]) -> Logger:
        component = validate_component(component, "logger name")
        experiment = self.experiment_name
        path = self.log_file(component)
        pair = (component, experiment)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataPathException(f"cannot create log directory {str(path.parent)!r}: {exc}") from exc
        with _lock:
            _ensure_file_sink(path, pair, self._level)
            if self._console:
                _ensure_console_sink(pair, self._level)
        return _logger.bind(**{COMPONENT_KEY: component, EXPERIMENT_KEY: experiment}, **extra)

    @staticmethod
    def close_all() -> None:
        """Flush and remove every sink this module added (see :func:`remove_rf_sinks`)."""
        remove_rf_sinks()


class TrainingLogger(RFLogger):
    """Logger for training output, written to ``<log dir>/training.log``.

    Same mechanism and arguments as :class:`RFLogger`, except that ``console``
    defaults to ``False`` (training output is high-volume; it belongs in its file)::

        log = TrainingLogger().get_logger()
        log.info("epoch 1 loss 0.42", run_id=3)

    ``create_logger(source)`` also writes to ``training.log`` (component
    ``"training"``); a ``source`` such as ``"worker_0"`` is recorded as the extra
    ``source=worker_0`` so lines from different workers stay distinguishable.
    """

    def __init__(
        self,
        experiment_name: str | None = None,
        *,
        log_dir: PathLike | None = None,
        console: bool = False,
        level: str | int = "DEBUG",
    ) -> None:
        super().__init__(experiment_name, log_dir=log_dir, console=console, level=level)

    @property
    def training_log_file(self) -> Path:
        """``<log dir>/training.log``."""
        return self.log_file(TRAINING_COMPONENT)

    def get_logger(self) -> Logger:
        """The logger bound to component ``"training"`` of this experiment."""
        return self._create(TRAINING_COMPONENT, {})

    def create_logger(self, name: str | None = None) -> Logger:
        """Like :meth:`get_logger`; a ``name`` other than ``"training"`` is bound as ``source``."""
        if name is None or name == TRAINING_COMPONENT:
            return self.get_logger()
        source = validate_component(name, "logger name")
        return self._create(TRAINING_COMPONENT, {"source": source})


def _reinit_lock_in_child() -> None:
    # A fork taken while another thread held the lock would deadlock the child's
    # first create_logger; the child is single-threaded here, so a new lock is safe.
    # The registry itself is kept: the inherited loguru handlers still exist in the
    # child (their queues feed the parent's writer threads), so re-adding would
    # write every line twice.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_lock_in_child)


__all__ = [
    "RFLogger",
    "TrainingLogger",
    "remove_rf_sinks",
    "rf_log_files",
    "render_extras",
    "COMPONENT_KEY",
    "EXPERIMENT_KEY",
    "DEFAULT_EXPERIMENT",
    "TRAINING_COMPONENT",
]
