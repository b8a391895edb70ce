"""The console: what ``rapidfire-state status``, ``watch`` and ``doctor`` show, on a :class:`StateDB`.

A service on the store's read-only report methods
(:mod:`rapidfire_state.db.store.reports`); it runs no SQL of its own and
imports neither torch nor mlflow.  ``rich`` is imported only by what draws a
table (:func:`run_table`, :func:`watch` on a terminal), so ``status`` and
``doctor`` stay as cheap as opening the database.

The demo reuses the live table::

    from rapidfire_state.console import snapshot, run_table

    snap = snapshot(db, experiment_id)          # read-only; pass previous=snap to read only what is new
    live.update(run_table(snap))                # a rich.table.Table

Loss and accuracy come from the metric outbox (revision ``0005_metric_outbox``):
its rows stay after MLflow has them, so the last ``train_loss`` and
``val_accuracy`` (or ``val_acc``) of each run are read from the database, never
from MLflow.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, TextIO

from rapidfire_state import states
from rapidfire_state.constants import ExperimentStatus

if TYPE_CHECKING:
    from rich.table import Table

    from rapidfire_state.db import StateDB
    from rapidfire_state.db.records import ExperimentRecord
    from rapidfire_state.db.store.reports import RunMetrics

#: the revision that made the metric outbox; before it nothing is known of metrics
METRIC_OUTBOX_REVISION = "0005_metric_outbox"
#: metric keys read as a run's training loss / validation accuracy (the one logged last wins)
TRAIN_LOSS_KEYS = ("train_loss", "loss", "training_loss")
VAL_ACCURACY_KEYS = ("val_accuracy", "val_acc", "eval_accuracy", "validation_accuracy")
#: the heartbeat age after which a worker counts as stale (``rapidfire-state fail-stale``'s default)
DEFAULT_GRACE_SECONDS = 30.0
#: runs the live table shows at most (the rest are counted in its caption)
DEFAULT_TABLE_ROWS = 200
#: what is shown for a value the database does not have
UNKNOWN = "-"


def has_metric_outbox(db: "StateDB") -> bool:
    """Whether the database has the metric outbox (a database opened for writing is at head)."""
    probe = db.probe
    return probe is None or probe.at_least(METRIC_OUTBOX_REVISION)


def pick_experiment(db: "StateDB", experiment_id: Optional[int]) -> Optional["ExperimentRecord"]:
    """``experiment_id``'s experiment, else the RUNNING one, else the latest (None: there is none)."""
    if experiment_id is not None:
        return db.get_experiment(experiment_id)
    return db.get_running_experiment() or db.latest_experiment()


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _when(value: Optional[datetime]) -> Optional[str]:
    return value.isoformat(sep=" ", timespec="seconds") if value is not None else None


def _by_status(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) or "none"


# --- status ----------------------------------------------------------------------------------


def status_report(
    db: "StateDB", experiment_id: Optional[int] = None, *, grace_seconds: float = DEFAULT_GRACE_SECONDS
) -> dict[str, Any]:
    """What ``rapidfire-state status`` shows, as plain data (what ``--json`` prints).

    The experiment is ``experiment_id``'s (``shown`` "given"), else the RUNNING
    one ("running"), else the latest ("latest").  On a database before the metric outbox,
    ``metrics_pending`` is None (unknown, not 0).
    """
    from rapidfire_state.db.store.reports import owner_gone

    if experiment_id is not None:
        experiment, shown = db.get_experiment(experiment_id), "given"
    else:
        experiment, shown = db.get_running_experiment(), "running"
        if experiment is None:
            experiment, shown = db.latest_experiment(), "latest"
    if experiment is None:
        return {"database": db.url_text, "shown": None, "running": False, "experiment": None}
    counts = db.status_counts(experiment.experiment_id, grace_seconds=grace_seconds)
    owner = None
    if experiment.status == ExperimentStatus.RUNNING:
        owner = owner_gone(experiment)
    alive, stale = [], []
    for worker, why in counts.workers:
        entry = {
            "worker_id": worker.worker_id, "pid": worker.pid, "host": worker.host,
            "heartbeat_age_s": round((counts.now - worker.heartbeat_at).total_seconds(), 1),
        }
        if why is None:
            alive.append(entry)
        else:
            stale.append({**entry, "reason": why})
    pending = db.pending_metric_rows(experiment_id=experiment.experiment_id) if has_metric_outbox(db) else None
    return {
        "database": db.url_text,
        #: how the experiment was chosen: "given" (-e), "running", or "latest" (none is running)
        "shown": shown,
        "running": experiment.status == ExperimentStatus.RUNNING,
        "experiment": {
            "experiment_id": experiment.experiment_id, "name": experiment.name, "status": experiment.status.value,
            "current_task": experiment.current_task.value, "owner_pid": experiment.owner_pid,
            "owner_host": experiment.owner_host, "owner_gone": owner, "created_at": _when(experiment.created_at),
            "started_at": _when(experiment.started_at), "ended_at": _when(experiment.ended_at),
            "error": experiment.error,
        },
        "runs": counts.runs,
        "runs_total": sum(counts.runs.values()),
        "open_tasks": {"worker": counts.worker_tasks, "controller": counts.controller_tasks},
        "workers": {"alive": alive, "stale": stale, "exited": counts.workers_exited, "grace_s": grace_seconds},
        "shm": {location: {"objects": n, "bytes": total} for location, (n, total) in sorted(counts.shm.items())},
        "metrics_pending": pending,
    }


def status_lines(report: dict[str, Any]) -> list[str]:
    """``status_report`` as the lines ``rapidfire-state status`` prints."""
    experiment = report["experiment"]
    if experiment is None:
        return [f"no experiments in {report['database']}"]
    lines = []
    if report["shown"] == "latest":
        lines.append("no experiment is running; the latest:")
    head = f"experiment {experiment['experiment_id']} {experiment['name']!r}: {experiment['status']}"
    if experiment["status"] == "RUNNING":
        head += f", current task {experiment['current_task']}"
        if experiment["owner_pid"] is not None:
            head += f", owner pid {experiment['owner_pid']} on {experiment['owner_host']}"
            if experiment["owner_gone"]:
                head += f" ({experiment['owner_gone']}: `rapidfire-state cleanup -e {experiment['experiment_id']} --failed`)"
    elif experiment["ended_at"]:
        head += f", ended {experiment['ended_at']}"
    lines.append(head)
    if experiment["error"]:
        lines.append(f"  error: {' '.join(str(experiment['error']).split())[:200]}")
    lines.append(f"  runs: {report['runs_total']} ({_by_status(report['runs'])})")
    tasks = report["open_tasks"]
    lines.append(f"  open tasks: worker {_by_status(tasks['worker'])}; controller {_by_status(tasks['controller'])}")
    workers = report["workers"]
    text = f"  workers: {len(workers['alive'])} alive, {len(workers['stale'])} stale, {workers['exited']} exited"
    lines.append(text)
    for worker in workers["stale"]:
        lines.append(
            f"    stale: worker {worker['worker_id']} (pid {worker['pid']} on {worker['host']}) {worker['reason']}"
            f" (`rapidfire-state fail-stale -e {experiment['experiment_id']}`)"
        )
    shm = report["shm"]
    usage = ", ".join(
        f"{location} {entry['objects']} object{'s' if entry['objects'] != 1 else ''} {_bytes(entry['bytes'])}"
        for location, entry in shm.items()
    )
    lines.append(f"  shared memory: {usage or 'none'}")
    pending = report["metrics_pending"]
    lines.append(f"  metric rows pending: {UNKNOWN if pending is None else pending}")
    return lines


# --- the live table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One read of an experiment for the live table: its runs (at most ``limit``) and their last metrics."""

    experiment: "ExperimentRecord"
    #: the runs shown, as plain dicts (columns of ``runs``, no config payload), in id order
    runs: list[dict[str, Any]]
    #: every run of the experiment by status (also those not shown)
    run_counts: dict[str, int]
    #: runs left out of ``runs`` (the table's ``limit``)
    truncated: bool
    #: the outbox's last values per run (None: the database has no metric outbox)
    metrics: Optional["RunMetrics"] = None
    taken_at: float = field(default_factory=time.time)

    @property
    def ended(self) -> bool:
        """True once the experiment is no longer RUNNING (COMPLETED or FAILED, or never started)."""
        return self.experiment.status != ExperimentStatus.RUNNING

    def metric(self, run_id: int, keys: Sequence[str]) -> Optional[float]:
        """The run's value logged last under any of ``keys`` (by outbox order), or None."""
        if self.metrics is None:
            return None
        found = self.metrics.values.get(run_id, {})
        logged = [found[key] for key in keys if key in found]
        return max(logged)[1] if logged else None

    def train_loss(self, run_id: int) -> Optional[float]:
        return self.metric(run_id, TRAIN_LOSS_KEYS)

    def val_accuracy(self, run_id: int) -> Optional[float]:
        return self.metric(run_id, VAL_ACCURACY_KEYS)


def snapshot(
    db: "StateDB", experiment_id: int, *, previous: Optional[Snapshot] = None, limit: int = DEFAULT_TABLE_ROWS
) -> Snapshot:
    """Read the experiment, its runs and their last metric values; writes nothing.

    With ``previous`` (the last snapshot of the same experiment) the metric
    outbox is read only past where ``previous`` stopped.
    """
    experiment = db.get_experiment(experiment_id)
    runs, truncated = db.runs_page(experiment_id, limit=limit)
    counts = db.run_status_counts(experiment_id)
    metrics = None
    if has_metric_outbox(db):
        since = previous.metrics if previous is not None and previous.experiment.experiment_id == experiment_id else None
        metrics = db.last_run_metrics(experiment_id, TRAIN_LOSS_KEYS + VAL_ACCURACY_KEYS, since=since)
    return Snapshot(experiment=experiment, runs=runs, run_counts=counts, truncated=truncated, metrics=metrics)


def _number(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return UNKNOWN
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}g}"


def _of_total(done: int, key: str, experiment: "ExperimentRecord") -> str:
    total = (experiment.config_options or {}).get(key)
    return f"{done}/{total}" if isinstance(total, int) and not isinstance(total, bool) else str(done)


def _chunk_of_epoch(visited: int, experiment: "ExperimentRecord") -> str:
    """Chunks visited in the current epoch, of the epoch's (``num_chunks``), or all visited when unknown."""
    total = (experiment.config_options or {}).get("num_chunks")
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        return str(visited)
    epochs = (experiment.config_options or {}).get("num_epochs")
    if isinstance(epochs, int) and visited >= total * epochs:
        return f"{total}/{total}"  # the last epoch is done
    return f"{visited % total}/{total}"


def _config_text(config: Optional[dict], width: int = 40) -> str:
    if not config:
        return UNKNOWN
    text = " ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in config.items()
    )
    return text if len(text) <= width else text[: width - 1] + "…"


_STATUS_STYLE = {
    "NEW": "dim", "ONGOING": "bold cyan", "STOPPED": "yellow", "COMPLETED": "green", "FAILED": "bold red",
    "KILLED": "red",
}


def header_text(snap: Snapshot) -> str:
    """One line about the experiment: id, name, status, current task, runs by status."""
    experiment = snap.experiment
    total = sum(snap.run_counts.values())
    return (
        f"experiment {experiment.experiment_id} {experiment.name!r}: {experiment.status.value}"
        + (f", task {experiment.current_task.value}" if not snap.ended else "")
        + f" | runs {total} ({_by_status(snap.run_counts)})"
    )


def run_table(snap: Snapshot) -> "Table":
    """The live table of a snapshot's runs: status, epoch/chunk, a progress bar, last train loss and val accuracy."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    table = Table(title=header_text(snap), title_justify="left", expand=False)
    table.add_column("run", justify="right")
    table.add_column("status")
    table.add_column("config", overflow="ellipsis", no_wrap=True, max_width=40)
    table.add_column("epoch", justify="right")
    table.add_column("chunk", justify="right")
    table.add_column("progress", min_width=12)
    table.add_column("", justify="right")
    table.add_column("train loss", justify="right")
    table.add_column("val acc", justify="right")
    for run in snap.runs:
        progress = max(0.0, min(1.0, float(run["progress"] or 0.0)))
        status = run["status"]
        label = str(run["run_id"]) + ("*" if run.get("source") == "CLONE_MODIFY" else "")
        table.add_row(
            label,
            Text(status, style=_STATUS_STYLE.get(status, "")),
            _config_text(run.get("flattened_config")),
            _of_total(run["num_epochs_completed"], "num_epochs", snap.experiment),
            _chunk_of_epoch(run["num_chunks_visited"], snap.experiment),
            ProgressBar(total=1.0, completed=progress, width=20),
            f"{progress * 100:.0f}%",
            _number(snap.train_loss(run["run_id"])),
            _number(snap.val_accuracy(run["run_id"])),
        )
    notes = []
    if snap.truncated:
        shown = len(snap.runs)
        notes.append(f"{sum(snap.run_counts.values()) - shown} more runs not shown")
    if snap.metrics is None:
        notes.append("no metric outbox in this database (before 0005_metric_outbox): no loss or accuracy")
    if any(run.get("source") == "CLONE_MODIFY" for run in snap.runs):
        notes.append("* clone-modify run")
    if notes:
        table.caption = "; ".join(notes)
        table.caption_justify = "left"
    return table


def run_line(run: dict[str, Any], snap: Snapshot) -> str:
    """One run as a plain line (what ``watch`` prints when stdout is not a terminal)."""
    progress = float(run["progress"] or 0.0)
    return (
        f"run {run['run_id']} {run['status']} epoch {_of_total(run['num_epochs_completed'], 'num_epochs', snap.experiment)}"
        f" chunk {_chunk_of_epoch(run['num_chunks_visited'], snap.experiment)} {progress * 100:.0f}%"
        f" train_loss {_number(snap.train_loss(run['run_id']))} val_acc {_number(snap.val_accuracy(run['run_id']))}"
    )


def watch(
    db: "StateDB",
    experiment_id: Optional[int] = None,
    *,
    interval: float = 1.0,
    out: Optional[TextIO] = None,
    terminal: Optional[bool] = None,
    limit: int = DEFAULT_TABLE_ROWS,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Show the experiment's runs until it ends; 0 when it ended (Ctrl-C raises KeyboardInterrupt).

    The experiment is ``experiment_id``'s, else the RUNNING one; with neither,
    the latest experiment's table is shown once.  On a terminal the table is
    redrawn in place (``rich.live.Live``) every ``interval`` seconds; otherwise
    each run's line is printed when it changes, so a pipe or a CI log gets
    plain lines.
    """
    out = out or sys.stdout
    if terminal is None:
        terminal = out.isatty()
    experiment = pick_experiment(db, experiment_id)
    if experiment is None:
        out.write(f"no experiments in {db.url_text}\n")
        return 0
    if experiment_id is None and experiment.status != ExperimentStatus.RUNNING:
        out.write("no experiment is running; the latest:\n")
    snap = snapshot(db, experiment.experiment_id, limit=limit)
    if terminal:
        _watch_live(db, snap, interval, out, limit, sleep)
    else:
        _watch_lines(db, snap, interval, out, limit, sleep)
    return 0


def _final_line(snap: Snapshot) -> str:
    experiment = snap.experiment
    line = f"experiment {experiment.experiment_id} {experiment.name!r} {experiment.status.value}"
    if experiment.error:
        line += f": {' '.join(experiment.error.split())[:200]}"
    return line


def _watch_live(db: "StateDB", snap: Snapshot, interval: float, out: TextIO, limit: int, sleep: Callable) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=out)
    # auto_refresh off: the table changes only when a new snapshot is read, so no
    # refresh thread redraws it in between
    with Live(run_table(snap), console=console, auto_refresh=False, transient=False) as live:
        live.refresh()
        while not snap.ended:
            sleep(interval)
            snap = snapshot(db, snap.experiment.experiment_id, previous=snap, limit=limit)
            live.update(run_table(snap), refresh=True)
    console.print(_final_line(snap), highlight=False)


def _watch_lines(db: "StateDB", snap: Snapshot, interval: float, out: TextIO, limit: int, sleep: Callable) -> None:
    shown: dict[int, str] = {}

    def emit(current: Snapshot) -> None:
        for run in current.runs:
            line = run_line(run, current)
            if shown.get(run["run_id"]) != line:
                out.write(line + "\n")
                shown[run["run_id"]] = line
        out.flush()

    out.write(header_text(snap) + "\n")
    emit(snap)
    while not snap.ended:
        sleep(interval)
        snap = snapshot(db, snap.experiment.experiment_id, previous=snap, limit=limit)
        emit(snap)
    if snap.truncated:
        out.write(f"({sum(snap.run_counts.values()) - len(snap.runs)} more runs not shown)\n")
    out.write(_final_line(snap) + "\n")
    out.flush()


# --- doctor ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One thing ``doctor`` found wrong: which check, what, and the command that repairs it."""

    check: str
    what: str
    repair: str

    def line(self) -> str:
        return f"{self.check}: {self.what}; repair: {self.repair}"

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "what": self.what, "repair": self.repair}


#: what doctor checks, in order (the names its findings carry)
DOCTOR_CHECKS = (
    "integrity", "foreign_keys", "schema", "stale_workers", "dead_owner", "completed_progress",
    "open_tasks_of_ended_runs", "shm_rows", "orphan_files",
)


def doctor(
    db: "StateDB", experiment_id: Optional[int] = None, *, grace_seconds: float = DEFAULT_GRACE_SECONDS,
    limit: int = 100,
) -> list[Finding]:
    """Check the database and the experiments' files; each problem found is one :class:`Finding`.

    Reads only.  ``experiment_id`` narrows the per-experiment checks (the
    file's integrity, foreign keys and the schema revision are always checked).
    """
    from rapidfire_state.db import migrate
    from rapidfire_state.db.store.reports import owner_gone

    found: list[Finding] = []
    where = db.sqlite_path or db.url_text
    for problem in db.sqlite_integrity()[:limit]:
        found.append(Finding(
            "integrity", f"PRAGMA integrity_check: {problem}",
            f"restore {where} from a copy or a `{Path(where).name}.<revision>.<time>.bak` beside it "
            f"(or `sqlite3 {shlex.quote(where)} .recover`)",
        ))
    for problem in db.sqlite_foreign_key_problems(limit=limit):
        found.append(Finding(
            "foreign_keys",
            f"{problem['table']} row {problem['rowid']} names a missing {problem['parent']} row",
            f"delete or correct it (`rapidfire-state sql \"SELECT * FROM {problem['table']} WHERE rowid = "
            f"{problem['rowid']}\"` shows it)",
        ))
    revision = db.schema_revision()
    if revision != migrate.HEAD_REVISION:
        found.append(Finding(
            "schema", f"the database is at revision {revision or 'none'}, the library's head is {migrate.HEAD_REVISION}",
            f"`{migrate.UPGRADE_COMMAND}`",
        ))

    for worker, why in db.open_workers(experiment_id, grace_seconds=grace_seconds):
        if why is not None:
            found.append(Finding(
                "stale_workers",
                f"worker {worker.worker_id} of experiment {worker.experiment_id} (pid {worker.pid} on {worker.host}) {why}",
                f"`rapidfire-state fail-stale -e {worker.experiment_id}`",
            ))

    running = [e for e in db.running_experiments() if experiment_id in (None, e.experiment_id)]
    dead = set()
    for experiment in running:
        why = owner_gone(experiment)
        if why is not None:
            dead.add(experiment.experiment_id)
            found.append(Finding(
                "dead_owner",
                f"experiment {experiment.experiment_id} {experiment.name!r} is RUNNING but its owner process "
                f"{experiment.owner_pid} on {experiment.owner_host} {why}",
                f"`rapidfire-state cleanup -e {experiment.experiment_id} --failed`",
            ))

    short, total = db.completed_runs_short_of_progress(experiment_id, limit=limit)
    for run in short:
        found.append(Finding(
            "completed_progress",
            f"run {run['run_id']} of experiment {run['experiment_id']} is COMPLETED with progress "
            f"{run['progress']:.3f} ({run['completed_steps']}/{run['total_steps']} steps, "
            f"{run['num_chunks_visited']} chunks, {run['num_epochs_completed']} epochs)",
            f"none: a finished run's record stands (`rapidfire-state history run {run['run_id']}` shows who ended it)",
        ))
    if total > len(short):
        found.append(Finding(
            "completed_progress", f"{total - len(short)} more COMPLETED runs with progress < 1 not listed",
            "`rapidfire-state sql \"SELECT run_id, progress FROM runs WHERE status = 'COMPLETED' AND progress < 1\"`",
        ))

    ended_experiments = {
        row["experiment_id"]: row for row in db.experiment_directories()
        if row["status"] in {s.value for s in states.terminal_states("experiment")}
    }
    for task in db.open_tasks_of_ended_runs(experiment_id, limit=limit):
        eid = task["experiment_id"]
        repair = (
            f"`rapidfire-state cleanup -e {eid}`" if eid in ended_experiments
            else f"the controller fails them; `rapidfire-state cleanup -e {eid} --failed` ends the experiment"
        )
        found.append(Finding(
            "open_tasks_of_ended_runs",
            f"{task['kind']} task {task['task_id']} ({task['task_type']}) is {task['status']} but its run "
            f"{task['run_id']} is {task['run_status']}",
            repair,
        ))

    for group in db.shm_rows_by_experiment_status():
        eid = group["experiment_id"]
        if eid is None or (experiment_id is not None and eid != experiment_id):
            continue
        if eid in ended_experiments or eid in dead:
            state = group["status"] if eid in ended_experiments else "RUNNING with a dead owner"
            found.append(Finding(
                "shm_rows",
                f"{group['objects']} shm_objects row(s) ({group['location']}, {_bytes(int(group['bytes'] or 0))}) "
                f"of experiment {eid}, which is {state}: their payloads are gone",
                f"`rapidfire-state cleanup -e {eid}{' --failed' if eid in dead else ''}`",
            ))
    known_files: set[str] = set()
    for row in db.disk_shm_rows():
        path = row["disk_path"]
        known_files.add(os.path.realpath(path))
        if experiment_id is not None and row["experiment_id"] != experiment_id:
            continue
        if row["experiment_id"] in ended_experiments:
            continue  # counted above with its experiment's rows
        if not os.path.exists(path):
            eid = row["experiment_id"]
            found.append(Finding(
                "shm_rows",
                f"shm_objects row {row['key']!r} (DISK) names {path}, which is missing",
                "the controller's SharedMemoryManager.reconcile() drops it"
                + (f"; `rapidfire-state cleanup -e {eid}` once the experiment ends" if eid is not None else ""),
            ))

    for path in orphan_files(db, known_files, experiment_id):
        found.append(Finding("orphan_files", f"{path} is under an experiment's directory but no shm_objects row names it",
                             f"`rm -- {shlex.quote(path)}`"))
        if len([f for f in found if f.check == "orphan_files"]) >= limit:
            break
    return found


#: files the shared-memory manager writes under an experiment's directory (see shm_manager/files.py)
_MANAGED_GLOBS = ("runs/run_*/checkpoints/*.pt", "runs/run_*/checkpoints/.*.rftmp", "shm_spill/*/*.pt", "shm_spill/*/.*.rftmp")


def orphan_files(db: "StateDB", known: set[str], experiment_id: Optional[int] = None) -> list[str]:
    """Checkpoint and spill files under the experiments' directories that no ``shm_objects`` row names.

    Only the file names the shared-memory manager writes are looked at
    (``runs/run_<id>/checkpoints/*.pt``, ``shm_spill/<manager>/*.pt`` and the
    temp files of disk writes, ``.…rftmp``); the temp file of a writer still
    alive is a write in progress, not an orphan.
    """
    from rapidfire_state.shm_manager.files import TEMP_FILE_RE, pid_alive

    found = []
    for row in db.experiment_directories():
        if experiment_id is not None and row["experiment_id"] != experiment_id:
            continue
        base = Path(row["experiments_path"]) / row["name"]
        if not base.is_dir():
            continue
        for pattern in _MANAGED_GLOBS:
            for path in sorted(base.glob(pattern)):
                if not path.is_file() or os.path.realpath(path) in known:
                    continue
                temp = TEMP_FILE_RE.match(path.name)
                if temp and pid_alive(int(temp.group(1))):
                    continue
                found.append(str(path))
    return found


__all__ = [
    "Snapshot", "snapshot", "run_table", "run_line", "header_text", "watch", "status_report", "status_lines",
    "doctor", "Finding", "DOCTOR_CHECKS", "orphan_files", "has_metric_outbox", "pick_experiment",
    "TRAIN_LOSS_KEYS", "VAL_ACCURACY_KEYS", "DEFAULT_GRACE_SECONDS",
]
