"""The main job: a small hyper-parallel training experiment on the embedded defaults.

A controller (this process) and N worker processes train several configurations
of a tiny torch model side by side, chunk by chunk, swapping the models through
shared memory after every chunk, with every fact in the state database:

* the configurations come from a ``GridSearch``; each becomes a run (``runs``),
  with an MLflow run in the embedded tracking store;
* the controller schedules one TRAIN_VAL worker task per live run and chunk;
  workers claim them exactly once (``run_worker``), load the run's model from
  shared memory (zero-copy), train on the chunk, store it back in place and
  record progress and metrics;
* a person's interventions arrive as controller tasks, as a dispatcher would
  queue them: stop a run, resume it, clone-modify another with a warm start
  from its parent's weights;
* at the end the experiment is cleaned up (one transaction) and the state is
  printed with SQL through the inspection views.

Run it with ``./scripts/demo`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from rapidfire_state import (
    ControllerTask,
    ExperimentTask,
    RunSource,
    RunStatus,
    SHMObjectType,
    StateDB,
    TaskStatus,
)
from rapidfire_state.automl_utils import GridSearch, List, get_runs
from rapidfire_state.constants import rf_home
from rapidfire_state.experiment_utils import ExperimentUtils
from rapidfire_state.logging import RFLogger
from rapidfire_state.metric_manager import MLflowManager
from rapidfire_state.shm_manager import SharedMemoryManager
from rapidfire_state.worker_manager import WorkerManager, run_worker

FEATURES = 16
SAMPLES_PER_CHUNK = 256
STEPS_PER_CHUNK = 8


def model_key(run_id: int) -> str:
    return f"run_{run_id}_model"


def build_model(config: dict) -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, config["hidden"]),
        torch.nn.ReLU(),
        torch.nn.Linear(config["hidden"], 1),
    )


def chunk_data(chunk_id: int) -> tuple[Any, Any]:
    """A deterministic synthetic regression chunk (the 'dataset' is y = x·w + noise)."""
    import torch

    generator = torch.Generator().manual_seed(1000 + chunk_id)
    weights = torch.linspace(-1.0, 1.0, FEATURES).unsqueeze(1)
    features = torch.randn(SAMPLES_PER_CHUNK, FEATURES, generator=generator)
    targets = features @ weights + 0.05 * torch.randn(SAMPLES_PER_CHUNK, 1, generator=generator)
    return features, targets


def _quiet_default_log_handler() -> None:
    """This application owns its logging: drop loguru's default stderr handler
    so RFLogger's console sink does not print every line twice."""
    from loguru import logger

    try:
        logger.remove(0)
    except ValueError:
        pass


def demo_worker(
    *, worker_id: int, experiment_id: int, experiment_name: str, db: StateDB,
    registry: Any, lock: Any, shutdown_event: Any, **_: Any,
) -> None:
    """A worker process: claim TRAIN_VAL tasks and train one chunk of one run each."""
    import torch

    torch.set_num_threads(1)
    _quiet_default_log_handler()
    shm = SharedMemoryManager("demo-shm", registry, lock, db)
    metrics = MLflowManager(db=db)  # logs go to the outbox; this process's flusher sends them
    logger = RFLogger(experiment_name).create_logger(f"worker_{worker_id}")

    def train_chunk(task: Any) -> None:
        run = db.get_run(task.run_id)
        config = run.config
        model = build_model(config)
        model.load_state_dict(shm.load(model_key(run.run_id)))
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
        features, targets = chunk_data(task.chunk_id)
        loss = torch.tensor(0.0)
        for _ in range(STEPS_PER_CHUNK):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(features), targets)
            loss.backward()
            optimizer.step()
        # The chunk-boundary swap: same shapes, so an in-place copy into shared memory.
        shm.store(model_key(run.run_id), model.state_dict(), experiment_id=experiment_id,
                  run_id=run.run_id, chunk_id=task.chunk_id, object_type=SHMObjectType.MODEL)
        completed = run.completed_steps + STEPS_PER_CHUNK
        db.update_run_progress(
            run.run_id, completed_steps=completed, num_chunks_visited=run.num_chunks_visited + 1,
            progress=min(1.0, completed / max(run.total_steps, 1)),
        )
        metrics.log_metric(run.metric_run_id, "train_loss", float(loss), step=completed)
        logger.info("trained chunk", run_id=run.run_id, chunk_id=task.chunk_id, loss=round(float(loss), 4))

    processed = run_worker(worker_id, db, train_chunk, shutdown_event, experiment_id=experiment_id)
    metrics.close()  # bounded: what is not delivered stays in the outbox for the controller
    logger.info("worker stopping", tasks=processed)


class Controller:
    """Schedules chunks, applies interactive-control requests, tracks everything in the DB."""

    def __init__(self, db: StateDB, args: argparse.Namespace):
        self.db = db
        self.args = args
        self.metrics = MLflowManager(db=db)
        # the experiment's ending flushes the runs' final statuses to MLflow
        self.utils = ExperimentUtils(db, metrics=self.metrics)
        base = os.path.join(str(rf_home()), "experiments")
        self.experiment_id, self.name, messages = self.utils.create_experiment(args.name, base)
        self.logger = RFLogger(self.name).create_logger("controller")
        for message in messages:
            self.logger.info(message)
        self.metric_experiment_id = self.metrics.track_experiment(self.experiment_id)
        self.shm = SharedMemoryManager("demo-shm", db=db)
        self.workers: WorkerManager | None = None
        self.failures = 0
        self.current_chunk = 0

    def add_run(self, config: dict, *, source: Any = RunSource.USER, parent: Any = None) -> int:
        import torch

        run = self.db.create_run(
            self.experiment_id, config, source=source,
            cloned_from=parent.run_id if parent else None,
            warm_started_from=parent.run_id if parent else None,
            total_steps=(self.args.chunks - self.current_chunk) * STEPS_PER_CHUNK,
        )
        # its MLflow run (run_<id>, tagged, config as params); from now on every
        # status change of the run reaches MLflow through the outbox
        self.metrics.create_run_for(run.run_id)
        if parent is None:
            torch.manual_seed(run.run_id)
            self.shm.store(model_key(run.run_id), build_model(config).state_dict(),
                           experiment_id=self.experiment_id, run_id=run.run_id,
                           object_type=SHMObjectType.MODEL)
        else:  # warm start: a copy of the parent's current weights
            self.shm.create_warm_start(model_key(parent.run_id), model_key(run.run_id), run_id=run.run_id)
        self.db.transition_run(run.run_id, RunStatus.ONGOING, reason="scheduled")
        self.logger.info("run created", run_id=run.run_id, config=config)
        return run.run_id

    def apply_control_requests(self) -> None:
        """Interactive control: what a person asked for through the dispatcher."""
        while (task := self.db.claim_controller_task(self.experiment_id)) is not None:
            try:
                if task.task_type == ControllerTask.IC_STOP:
                    self.db.transition_run(task.run_id, RunStatus.STOPPED, reason="stopped by user")
                elif task.task_type == ControllerTask.IC_RESUME:
                    self.db.transition_run(task.run_id, RunStatus.ONGOING, reason="resumed by user")
                elif task.task_type == ControllerTask.IC_CLONE_MODIFY_WARM:
                    parent = self.db.get_run(task.run_id)
                    self.add_run(task.config, source=RunSource.CLONE_MODIFY, parent=parent)
                self.db.finish_controller_task(task.task_id, ok=True)
            except Exception as exc:  # a bad request fails its task, not the experiment
                self.db.finish_controller_task(task.task_id, ok=False, error=repr(exc))
            self.logger.info("control request handled", task_type=task.task_type.value, run_id=task.run_id)

    def run_chunk(self, chunk_id: int) -> None:
        live = self.db.list_runs(self.experiment_id, statuses=[RunStatus.ONGOING])
        tasks = [
            self.db.create_worker_task(self.experiment_id, run.run_id, index % self.args.workers, chunk_id)
            for index, run in enumerate(live)
        ]
        pending = {task.task_id for task in tasks}
        deadline = time.monotonic() + 300
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"chunk {chunk_id} did not finish: tasks {sorted(pending)}")
            self.db.fail_stale_workers(grace_seconds=60, experiment_id=self.experiment_id)
            finished = self.db.list_tasks(
                "worker", experiment_id=self.experiment_id,
                statuses=[TaskStatus.COMPLETED, TaskStatus.FAILED],
            )
            pending -= {task.task_id for task in finished}
            time.sleep(0.05)
        for task in self.db.list_tasks("worker", experiment_id=self.experiment_id, statuses=[TaskStatus.FAILED]):
            if task.task_id in {t.task_id for t in tasks}:
                self.failures += 1
                self.logger.error("task failed; failing its run", run_id=task.run_id, task_id=task.task_id)
                self.db.transition_run(task.run_id, RunStatus.FAILED, error=task.error, reason="chunk failed")
        self.logger.info("chunk finished", chunk_id=chunk_id, runs=len(live))

    def run(self) -> None:
        configs = get_runs(GridSearch({"lr": List([0.02, 0.1]), "hidden": List([8, 32])}), seed=0)
        run_ids = [self.add_run(config) for config in configs]
        registry, lock = self.shm.get_shm_objects()
        self.workers = WorkerManager(self.args.workers, registry, lock, target=demo_worker, db=self.db)
        self.workers.spawn_workers(self.experiment_id, self.name)
        self.utils.setup_signal_handlers(self.workers)
        self.db.set_experiment_task(self.experiment_id, ExperimentTask.RUN_FIT)
        try:
            for chunk_id in range(self.args.chunks):
                self.current_chunk = chunk_id
                # What a person would do from the dashboard, queued as the dispatcher would.
                if chunk_id == 1:
                    self.db.create_controller_task(self.experiment_id, ControllerTask.IC_STOP, run_id=run_ids[1])
                    self.db.create_controller_task(
                        self.experiment_id, ControllerTask.IC_CLONE_MODIFY_WARM, run_id=run_ids[0],
                        config_leaf={**configs[0], "lr": configs[0]["lr"] / 2},
                    )
                if chunk_id == 2:
                    self.db.create_controller_task(self.experiment_id, ControllerTask.IC_RESUME, run_id=run_ids[1])
                self.apply_control_requests()
                self.run_chunk(chunk_id)
            for run in self.db.list_runs(self.experiment_id, statuses=[RunStatus.ONGOING]):
                self.db.transition_run(run.run_id, RunStatus.COMPLETED, reason="all chunks trained")
        finally:
            self.workers.shutdown_workers()
            self.utils.end_experiment()
            self.shm.close()
            RFLogger.close_all()


def print_state(db: StateDB, experiment_id: int) -> None:
    from sqlalchemy import text

    def table(title: str, sql: str) -> None:
        with db.session() as session:
            result = session.execute(text(sql), {"e": experiment_id})
            columns = list(result.keys())
            rows = [[("" if v is None else str(v)) for v in row] for row in result]
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
        print(f"\n{title}")
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))

    table("experiment", "SELECT experiment_id, name, status, current_task, metric_experiment_id "
          "FROM experiments WHERE experiment_id = :e")
    table("MLflow runs and their outbox (metric_streams, metric_outbox)",
          "SELECT s.run_id, s.metric_run_id, COUNT(o.outbox_id) AS rows_logged, "
          "SUM(CASE WHEN o.delivered_at IS NOT NULL THEN 1 ELSE 0 END) AS delivered "
          "FROM metric_streams s LEFT JOIN metric_outbox o ON o.stream_id = s.stream_id "
          "WHERE s.experiment_id = :e GROUP BY s.run_id, s.metric_run_id ORDER BY s.run_id")
    table("runs (SELECT … FROM run_overview)",
          "SELECT run_id, status, ended_by, source, warm_started_from AS warm_from, completed_steps AS steps, "
          "total_steps AS total, num_chunks_visited AS chunks, ROUND(progress, 2) AS progress "
          "FROM run_overview WHERE experiment_id = :e ORDER BY run_id")
    table("status history of every run (state_transitions)",
          "SELECT t.entity_id AS run_id, t.from_status, t.to_status, t.reason FROM state_transitions t "
          "JOIN runs r ON r.run_id = t.entity_id WHERE t.entity = 'run' AND r.experiment_id = :e "
          "ORDER BY t.transition_id")
    table("tasks", "SELECT 'worker' AS kind, task_type, status, COUNT(*) AS n FROM worker_tasks "
          "WHERE experiment_id = :e GROUP BY task_type, status UNION ALL "
          "SELECT 'controller', task_type, status, COUNT(*) FROM controller_tasks "
          "WHERE experiment_id = :e GROUP BY task_type, status")
    table("workers", "SELECT worker_id, pid, exited_at IS NOT NULL AS exited, exit_code FROM workers "
          "WHERE experiment_id = :e ORDER BY worker_id")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="demo", help="experiment name (made unique)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--chunks", type=int, default=4, help="chunks per run (default 4)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.chunks < 3:
        parser.error("--workers must be >= 1 and --chunks >= 3 (the interventions happen at chunks 1 and 2)")
    started = time.monotonic()
    _quiet_default_log_handler()
    db = StateDB()
    controller = Controller(db, args)
    print(f"database: {db.url_text}")
    print(f"experiment {controller.experiment_id} ({controller.name}): "
          f"{args.workers} workers, {args.chunks} chunks")
    controller.run()
    print_state(db, controller.experiment_id)
    print("\ntrain_loss per chunk (MLflow)")
    for run in db.list_runs(controller.experiment_id):
        losses = controller.metrics.get_run_metrics(run.metric_run_id).get("train_loss", [])
        print(f"run {run.run_id}: " + "  ".join(f"{value:.4f}" for _, value in losses))
    pending = controller.metrics.pending()
    print(f"\nMLflow store: {controller.metrics.tracking_uri} (metric rows still pending: {pending})")
    print(f"done in {time.monotonic() - started:.1f} s; inspect with: rapidfire-state runs -e {controller.experiment_id}")
    controller.metrics.close()
    db.close()
    if controller.failures:
        print(f"{controller.failures} worker tasks failed; see the error column of worker_tasks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
