"""The job of the multi-host scenario (tests/test_multihost.py): a controller and its workers, one process each.

``python multihost_job.py controller --shared-dir DIR [--runs 4 --chunks 6 --grace 3]`` creates
an experiment, its runs and their initial checkpoints, then schedules each run's next chunk on a
free live worker (as ``examples/demo_job.py``'s ``Controller.dispatch`` does) until every run
completed; every pass it fails the workers whose heartbeat is older than the grace
(``fail_stale_workers(..., lost_runs="release")``: their tasks FAILED, their runs left ONGOING
to be scheduled again elsewhere).

``python multihost_job.py worker --worker-id N --shared-dir DIR`` waits for the running
experiment, registers itself and runs :func:`run_worker`: each TRAIN_VAL task trains one chunk of
a run's tiny torch model from the run's checkpoint (``SharedMemoryManager`` with the
``cross_host`` placement: a disk copy under DIR, the stand-in of a network file system), stores
it back under the task's claim and returns the run's new chunk counter as a ``TaskResult``, so
that a finish the database refuses cannot advance the run.  The worker stops when the
experiment is no longer RUNNING, or when its heartbeat finds its row marked exited.

Both take the database from ``RF_DB_URL`` and print one JSON line per event on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

FEATURES, CLASSES, CHUNK_SAMPLES, BATCH = 16, 3, 200, 20
#: optimizer steps per chunk: ~0.2 s alone on one core, ~0.4 s with the scenario's processes on two
STEPS_PER_CHUNK = 500
GRID = [{"hidden": 16, "lr": 0.05}, {"hidden": 32, "lr": 0.05}, {"hidden": 32, "lr": 0.01}, {"hidden": 64, "lr": 0.02}]


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": round(time.time(), 3), **fields}), flush=True)


def model_key(run_id: int) -> str:
    return f"run_{run_id}_model"


def build_model(config: dict) -> Any:
    import torch

    hidden = int(config["hidden"])
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, CLASSES),
    )


def chunk_data(chunk_id: int) -> tuple[Any, Any]:
    """A chunk of a fixed synthetic classification set (the same on every host)."""
    import torch

    generator = torch.Generator().manual_seed(1000 + chunk_id)
    features = torch.randn(CHUNK_SAMPLES, FEATURES, generator=generator)
    labels = (features[:, 0] * 2 + features[:, 1] - features[:, 2] > 0).long() + (features[:, 3] > 1).long()
    return features, labels


def weights_digest(state: Any) -> str:
    """A digest of a state dict's tensors, to tell which store a checkpoint came from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class ExperimentEnded:
    """The worker's shutdown event, read from the database: set once the experiment is not RUNNING."""

    def __init__(self, db: Any, experiment_id: int):
        self.db, self.experiment_id = db, experiment_id
        self._set = False

    def is_set(self) -> bool:
        if not self._set:
            from rapidfire_state import ExperimentStatus

            self._set = self.db.get_experiment(self.experiment_id).status != ExperimentStatus.RUNNING
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        time.sleep(timeout or 0)
        return self.is_set()


def cross_host_shm(name: str, db: Any, shared_dir: str) -> Any:
    from rapidfire_state.shm_manager import SharedMemoryManager

    return SharedMemoryManager(name, db=db, placement="cross_host", shared_dir=shared_dir)


# --- the controller --------------------------------------------------------------------------


def controller(args: argparse.Namespace) -> int:
    import torch

    from rapidfire_state import RunStatus, SHMObjectType, StateDB, TaskStatus
    from rapidfire_state.db.engine import set_application_name

    set_application_name("controller")
    torch.set_num_threads(1)
    db = StateDB()
    experiment = db.create_experiment(
        "multihost", args.shared_dir, config_options={"num_chunks": args.chunks}, owner_pid=os.getpid(),
    )
    experiment_id = experiment.experiment_id
    db.transition_experiment(experiment_id, "RUNNING")
    shm = cross_host_shm("mh-controller", db, args.shared_dir)
    for config in GRID[: args.runs]:
        run = db.create_run(experiment_id, config)
        torch.manual_seed(run.run_id)
        state = build_model(config).state_dict()
        shm.store(model_key(run.run_id), state, experiment_id=experiment_id, run_id=run.run_id,
                  object_type=SHMObjectType.MODEL)
        emit("initial", run_id=run.run_id, digest=weights_digest(state))
        db.transition_run(run.run_id, RunStatus.ONGOING, reason="scheduled")
    emit("experiment", experiment_id=experiment_id, runs=args.runs, chunks=args.chunks)

    open_statuses = (TaskStatus.PENDING, TaskStatus.SCHEDULED, TaskStatus.IN_PROGRESS)
    lost_tasks: set[int] = set()  # failed because their worker was lost: their runs go on elsewhere
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        for report in db.fail_stale_workers(args.grace, experiment_id=experiment_id, lost_runs="release"):
            lost_tasks.update(report.failed_task_ids)
            emit("released", worker_id=report.worker.worker_id if report.worker else None,
                 host=report.worker.host if report.worker else None, reason=report.reason,
                 failed_task_ids=list(report.failed_task_ids), released_run_ids=list(report.released_run_ids))
        live = {w.worker_id for w in db.list_workers(experiment_id, alive_only=True)}
        open_tasks = db.list_tasks("worker", experiment_id=experiment_id, statuses=open_statuses)
        for task in open_tasks:
            # queued for a worker that is gone since: nobody will claim it
            if task.status == TaskStatus.SCHEDULED and task.worker_id not in live:
                try:
                    db.transition_task("worker", task.task_id, TaskStatus.FAILED, expected=[TaskStatus.SCHEDULED],
                                       error=f"worker {task.worker_id} is gone", reason="worker gone")
                    lost_tasks.add(task.task_id)
                except Exception:  # noqa: BLE001 - claimed meanwhile: it runs
                    pass
        open_tasks = db.list_tasks("worker", experiment_id=experiment_id, statuses=open_statuses)
        busy_runs = {task.run_id for task in open_tasks}
        for task in db.list_tasks("worker", experiment_id=experiment_id, statuses=[TaskStatus.FAILED]):
            if task.task_id not in lost_tasks and db.get_run(task.run_id).status == RunStatus.ONGOING:
                emit("run_failed", run_id=task.run_id, task_id=task.task_id, error=task.error)
                db.transition_run(task.run_id, RunStatus.FAILED, error=task.error, reason="chunk failed")
        runs = db.list_runs(experiment_id)
        for run in runs:
            if run.status == RunStatus.ONGOING and run.run_id not in busy_runs and run.num_chunks_visited >= args.chunks:
                db.transition_run(run.run_id, RunStatus.COMPLETED, reason="every chunk trained")
        runs = db.list_runs(experiment_id)
        if all(run.status in (RunStatus.COMPLETED, RunStatus.FAILED) for run in runs):
            break
        free = sorted(live - {task.worker_id for task in open_tasks})
        waiting = sorted(
            (r for r in runs if r.status == RunStatus.ONGOING and r.run_id not in busy_runs
             and r.num_chunks_visited < args.chunks),
            key=lambda r: (r.num_chunks_visited, r.run_id),  # the run furthest behind first
        )
        for worker_id, run in zip(free, waiting):
            task = db.create_worker_task(experiment_id, run.run_id, worker_id, run.num_chunks_visited)
            emit("dispatched", task_id=task.task_id, run_id=run.run_id, worker_id=worker_id, chunk_id=task.chunk_id)
        time.sleep(0.05)
    else:
        emit("timeout")
        db.transition_experiment(experiment_id, "FAILED", error="the scenario's controller timed out")
        return 1
    completed = all(run.status == RunStatus.COMPLETED for run in db.list_runs(experiment_id))
    # a manager of its own: what a reader that never stored these keys finds
    reader = cross_host_shm("mh-reader", db, args.shared_dir)
    for run in db.list_runs(experiment_id):
        emit("final", run_id=run.run_id, status=run.status.value, chunks=run.num_chunks_visited,
             digest=weights_digest(reader.load(model_key(run.run_id))))
    reader.close()
    db.transition_experiment(experiment_id, "COMPLETED" if completed else "FAILED",
                             error=None if completed else "a run failed")
    emit("ended", completed=completed)
    shm.close()
    db.close()
    return 0 if completed else 1


# --- a worker --------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch

    from rapidfire_state import SHMObjectType, StateDB
    from rapidfire_state.db.engine import set_application_name
    from rapidfire_state.worker_manager import TaskResult, run_worker

    set_application_name(f"worker_{args.worker_id}")
    torch.set_num_threads(1)
    db = StateDB()
    deadline = time.monotonic() + args.timeout
    while (experiment := db.get_running_experiment()) is None:
        if time.monotonic() > deadline:
            emit("no_experiment")
            return 1
        time.sleep(0.1)
    experiment_id = experiment.experiment_id
    chunks = int(experiment.config_options["num_chunks"])
    record = db.register_worker(experiment_id, args.worker_id, os.getpid())
    emit("registered", worker_id=args.worker_id, host=record.host, pid=os.getpid())
    shm = cross_host_shm(f"mh-worker-{args.worker_id}", db, args.shared_dir)

    def train_chunk(task: Any) -> Any:
        run = db.get_run(task.run_id)
        if task.chunk_id != run.num_chunks_visited or run.num_chunks_visited >= chunks:
            raise RuntimeError(f"run {run.run_id} visited {run.num_chunks_visited} chunks; task {task.task_id} "
                               f"is for chunk {task.chunk_id}")
        config = run.config
        model = build_model(config)
        loaded = shm.load(model_key(run.run_id))
        emit("training", task_id=task.task_id, run_id=run.run_id, chunk_id=task.chunk_id,
             loaded=weights_digest(loaded))
        model.load_state_dict(loaded)
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
        features, labels = chunk_data(task.chunk_id)
        for step in range(STEPS_PER_CHUNK):
            first = (step * BATCH) % CHUNK_SAMPLES
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(features[first:first + BATCH]), labels[first:first + BATCH])
            loss.backward()
            optimizer.step()
        state = model.state_dict()
        # refused (InvalidTransitionError) when this claim is no longer the task's
        shm.store(model_key(run.run_id), state, experiment_id=experiment_id, run_id=run.run_id,
                  chunk_id=task.chunk_id, object_type=SHMObjectType.MODEL, claim=task)
        emit("stored", task_id=task.task_id, run_id=run.run_id, chunk_id=task.chunk_id, digest=weights_digest(state))
        visited = run.num_chunks_visited + 1
        # applied by the finish only if the finish's compare-and-set succeeds
        return TaskResult(run_progress={"num_chunks_visited": visited, "progress": visited / chunks,
                                        "completed_steps": run.completed_steps + STEPS_PER_CHUNK})

    processed = run_worker(args.worker_id, db, train_chunk, ExperimentEnded(db, experiment_id),
                           experiment_id=experiment_id, heartbeat_seconds=args.heartbeat, poll_seconds=0.1)
    emit("stopped", worker_id=args.worker_id, processed=processed)
    shm.close()
    db.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    control = sub.add_parser("controller")
    control.add_argument("--runs", type=int, default=4)
    control.add_argument("--chunks", type=int, default=6)
    control.add_argument("--grace", type=float, default=3.0)
    for mode in (control, sub.add_parser("worker")):
        mode.add_argument("--shared-dir", required=True)
        mode.add_argument("--timeout", type=float, default=90.0, help="give up after this many seconds")
        if mode is not control:
            mode.add_argument("--worker-id", type=int, required=True)
            mode.add_argument("--heartbeat", type=float, default=0.5)
    args = parser.parse_args(argv)
    if not 1 <= getattr(args, "runs", 1) <= len(GRID):
        parser.error(f"--runs must be 1-{len(GRID)}")
    return controller(args) if args.mode == "controller" else worker(args)


if __name__ == "__main__":
    sys.exit(main())
