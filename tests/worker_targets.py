"""Top-level worker targets for ``test_worker_manager``.

Workers are spawned, so every target must be importable by name in a fresh
interpreter: they live here (not in the test module, which imports pytest).
Each writes what the test needs to see into files under ``record_dir``; every
file is written atomically (temp file + rename) or appended with one ``write``.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rapidfire_state.worker_manager import WorkerManager, run_worker


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _describe(record_dir: str, worker_id: int, **extra: Any) -> None:
    write_json(
        Path(record_dir) / f"worker_{worker_id}.json",
        {"pid": os.getpid(), "ppid": os.getppid(), "pgrp": os.getpgrp(), **extra},
    )


def record_handler(record_dir: str, worker_id: int, db: Any, task: Any) -> None:
    """Handle one task as its ``config_options`` say: sleep, fail, then record it."""
    options = task.config_options or {}
    if options.get("check_heartbeat"):
        before = db.list_workers(task.experiment_id)[worker_id].heartbeat_at
        time.sleep(options["sleep"])
        after = db.list_workers(task.experiment_id)[worker_id].heartbeat_at
        write_json(Path(record_dir) / f"heartbeat_{task.task_id}.json", [before.isoformat(), after.isoformat()])
    elif options.get("sleep"):
        time.sleep(options["sleep"])
    if options.get("fail"):
        raise ValueError(f"boom in task {task.task_id}")
    line = f"{worker_id} {task.task_id} {os.getpid()}\n".encode()
    fd = os.open(Path(record_dir) / "processed.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write to an O_APPEND file: lines never interleave
    finally:
        os.close(fd)


def task_worker(
    *,
    worker_id: int,
    experiment_id: int,
    experiment_name: str,
    db: Any,
    registry: Any,
    lock: Any,
    shutdown_event: Any,
    record_dir: str,
    heartbeat_seconds: float = 0.5,
    poll_seconds: float = 0.05,
) -> None:
    """``run_worker`` with :func:`record_handler`; writes how many tasks it processed."""
    _describe(record_dir, worker_id, experiment_name=experiment_name)
    handler = functools.partial(record_handler, record_dir, worker_id, db)
    processed = run_worker(
        worker_id, db, handler, shutdown_event, experiment_id=experiment_id,
        heartbeat_seconds=heartbeat_seconds, poll_seconds=poll_seconds,
    )
    write_json(Path(record_dir) / f"done_{worker_id}.json", {"processed": processed})


def stubborn_worker(
    *, worker_id: int, shutdown_event: Any, record_dir: str, ignore_sigterm: Any = True, **_: Any
) -> None:
    """Ignores the shutdown event; ignores SIGTERM too when told (per worker id, or all)."""
    if ignore_sigterm is True or (isinstance(ignore_sigterm, list) and worker_id in ignore_sigterm):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _describe(record_dir, worker_id)
    while True:
        time.sleep(0.05)


def grandchild_worker(*, worker_id: int, shutdown_event: Any, record_dir: str, **_: Any) -> None:
    """Starts a long-lived child of its own, then waits for the shutdown event and
    returns *without* stopping that child: the manager must clean it up."""
    child = subprocess.Popen(["sleep", "300"])
    _describe(record_dir, worker_id, grandchild=child.pid)
    while not shutdown_event.wait(0.05):
        pass


def _forbidden(name: str):
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(1, f"Operation not permitted ({name} forbidden, as in Colab)")

    return forbidden


class ForbidProcessGroups:
    """Target wrapper that makes the *child* behave like Colab.

    Unpickling happens in the spawned child before the worker bootstrap runs, so
    ``__setstate__`` replaces ``os.setpgrp``/``os.getpgid``/``os.killpg`` there with
    functions raising ``PermissionError``: the bootstrap's real attempt to create a
    process group meets the error and must fall back.  The parent's object (made by
    ``__init__``) patches nothing.
    """

    def __init__(self, target: Any):
        self.target = target

    def __getstate__(self) -> dict:
        return {"target": self.target}

    def __setstate__(self, state: dict) -> None:
        self.target = state["target"]
        for name in ("setpgrp", "getpgid", "killpg"):
            setattr(os, name, _forbidden(name))

    def __call__(self, **kwargs: Any) -> Any:
        return self.target(**kwargs)


class BrokenInChild:
    """Target wrapper whose unpickling fails in the child for ``worker_id`` 1: that
    worker dies during start-up, before its handshake with the manager."""

    def __init__(self, target: Any):
        self.target = target

    def __getstate__(self) -> dict:
        return {"target": self.target}

    def __setstate__(self, state: dict) -> None:
        self.target = state["target"]
        if multiprocessing.current_process().name == "rf-worker-1":
            raise RuntimeError("cannot start this worker")

    def __call__(self, **kwargs: Any) -> Any:
        return self.target(**kwargs)


def controller_main(db_url: str, experiment_id: int, record_dir: str, parent_death_signal: Any) -> None:
    """A stand-in controller: spawns two idle workers, writes their pids, waits to be killed."""
    from rapidfire_state import StateDB

    db = StateDB(db_url)
    manager = WorkerManager(
        2, target=task_worker, db=db, heartbeat_seconds=0.5,
        worker_kwargs={"record_dir": record_dir}, parent_death_signal=parent_death_signal,
    )
    pids = manager.spawn_workers(experiment_id, "controller_test")
    write_json(Path(record_dir) / "controller.json", {"pid": os.getpid(), "workers": pids})
    while True:
        time.sleep(1)


# --- task handlers named in an experiment's config (WorkerManager without a target) ---


def _append(path: Path, record: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())  # one write: lines never interleave
    finally:
        os.close(fd)


def context_handler(task: Any, context: Any) -> None:
    """Named as ``worker_targets:context_handler``; records what it was given."""
    options = context.db.get_experiment(task.experiment_id).config_options
    with context.lock:
        context.registry[f"task_{task.task_id}"] = context.worker_id
    if (task.config_options or {}).get("fail"):
        raise ValueError(f"handler failed task {task.task_id}")
    _append(
        Path(options["record_dir"]) / "handled.jsonl",
        {
            "task_id": task.task_id, "task_worker": task.worker_id, "worker_id": context.worker_id,
            "pid": os.getpid(), "experiment_id": context.experiment_id,
            "experiment_name": context.experiment_name, "handler_name": context.handler_name,
            "shutdown_set": context.shutdown_event.is_set(),
        },
    )


def task_only_handler(task: Any) -> None:
    """A handler that takes the task alone (``handler(task)``)."""
    _append(Path(task.config_options["record_dir"]) / "handled.jsonl", {"task_id": task.task_id, "pid": os.getpid()})


class HandlerHolder:
    @staticmethod
    def handle(task: Any, context: Any) -> None:
        context_handler(task, context)


NOT_CALLABLE = 42


def three_arguments(task: Any, context: Any, extra: Any) -> None:  # pragma: no cover - never called
    raise AssertionError("a handler that needs three arguments must be refused")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("import me")
