"""The main job: hyper-parallel training of a small classifier grid, every fact in the database.

A controller (this process) and N worker processes train several configurations
of an MLP side by side on a synthetic but non-trivial classification task
(three interleaved spirals in 16 dimensions, a train/validation split):

* the configurations come from a ``GridSearch``; each becomes a run with its own
  MLflow run (``run_<id>``, tagged, its config as params) in the embedded store;
* a scheduler over the database: each run keeps its own position (chunks
  visited, epochs completed); whenever a worker is free, the run furthest behind
  gets a TRAIN_VAL task for *its* next chunk (no lockstep); the worker loads the
  run's model from shared memory, trains on that chunk, evaluates on the
  validation set, stores the model back and records progress and metrics;
  a run is COMPLETED only once it visited every chunk of every epoch;
* interventions are controller tasks queued through the database, as
  ``rapidfire-state ic`` queues them from any terminal: by default the job
  stops one run, resumes it later, and clone-modifies the best run so far with
  a warm start; ``--interactive`` leaves them to a person;
* SIGINT/SIGTERM at any moment end the experiment truthfully (FAILED,
  "interrupted", unless every run had completed), kill the live runs, stop every
  child process and exit 130/143 with one line;
* at the end: a leaderboard by validation accuracy, the database state, and the
  commands to look further.

Run it with ``./scripts/demo`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from typing import Any, Optional

from rapidfire_state import (
    ExperimentStatus,
    ExperimentTask,
    RunSource,
    RunStatus,
    SHMObjectType,
    StateDB,
    TaskStatus,
)
from rapidfire_state.automl_utils import GridSearch, List, get_runs
from rapidfire_state.constants import rf_home
from rapidfire_state.logging import RFLogger

FEATURES = 16
CLASSES = 3
TRAIN_SAMPLES = 2400
VAL_SAMPLES = 600
BATCH_SIZE = 50
#: the grid the runs are taken from, in an order where the first few differ meaningfully
GRID = {"hidden": List([64, 4, 16]), "lr": List([0.3, 0.03, 0.003])}
OPEN = (TaskStatus.PENDING, TaskStatus.SCHEDULED, TaskStatus.IN_PROGRESS)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; raised in the main thread so every transaction unwinds first."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: the signal that interrupted the job, once one did
_received: list[int] = []


#: > 0 while the main thread is inside a third-party call that must not be interrupted
_deferring: list[int] = [0]


def _raise_interrupted(signum: int, frame: Any) -> None:
    # only raise: the clean-up runs at the top of the stack, after every open
    # transaction and context manager has been left (never inside one).  Recorded
    # first: a library may catch the exception and raise its own (MLflow wraps
    # what interrupts its store set-up in an MlflowException)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _received.append(signum)
    if _deferring[0]:
        return  # raised when the third-party call returns (signals_deferred)
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_deferred() -> Any:
    """Run a third-party call (MLflow's set-up, a run's creation) whole; a signal raises after it.

    An exception raised from a signal handler lands wherever the main thread
    is: inside MLflow's logging it was swallowed by the log handler, and once the
    job then hung at exit, on a lock that the interrupted code never released.
    """
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    check_interrupted()


def check_interrupted() -> None:
    """Raise again for a signal whose exception some library code caught and dropped.

    Called at the job's checkpoints (each pass of the scheduler, after set-up,
    before the summary): a signal is never lost, only noticed a moment later.
    """
    if _received:
        raise Interrupted(_received[0])


def model_key(run_id: int) -> str:
    return f"run_{run_id}_model"


def build_model(config: dict) -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, config["hidden"]),
        torch.nn.ReLU(),
        torch.nn.Linear(config["hidden"], config["hidden"]),
        torch.nn.ReLU(),
        torch.nn.Linear(config["hidden"], CLASSES),
    )


def dataset() -> tuple[Any, Any, Any, Any]:
    """Three interleaved noisy spirals, embedded in 16 dimensions by a fixed random rotation.

    Linear models reach about a third; the grid's configurations separate clearly.
    """
    import torch

    generator = torch.Generator().manual_seed(7)
    total = TRAIN_SAMPLES + VAL_SAMPLES
    labels = torch.arange(total) % CLASSES
    radius = torch.rand(total, generator=generator)
    angle = labels * (2 * torch.pi / CLASSES) + radius * 3.0 + 0.25 * torch.randn(total, generator=generator)
    plane = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    noise = 0.3 * torch.randn(total, FEATURES - 2, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(FEATURES, FEATURES, generator=generator))
    features = torch.cat([plane * 3.0, noise], dim=1) @ rotation
    order = torch.randperm(total, generator=generator)
    features, labels = features[order], labels[order]
    return features[:TRAIN_SAMPLES], labels[:TRAIN_SAMPLES], features[TRAIN_SAMPLES:], labels[TRAIN_SAMPLES:]


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
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)  # torch's, once per process, not twice
    import torch

    from rapidfire_state.metric_manager import MLflowManager
    from rapidfire_state.shm_manager import SharedMemoryManager
    from rapidfire_state.worker_manager import TaskResult, run_worker

    torch.set_num_threads(1)
    _quiet_default_log_handler()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller decides; a terminal's Ctrl-C reaches us too
    shm = SharedMemoryManager("demo-shm", registry, lock, db)
    metrics = MLflowManager(db=db)  # logs go to the outbox; this process's flusher sends them
    logger = RFLogger(experiment_name, console=False).create_logger(f"worker_{worker_id}")  # the table owns the terminal
    schedule = db.get_experiment(experiment_id).config_options or {}
    chunks, epochs = int(schedule["num_chunks"]), int(schedule["num_epochs"])
    train_x, train_y, val_x, val_y = dataset()
    chunk_size = TRAIN_SAMPLES // chunks

    def train_chunk(task: Any) -> Any:
        run = db.get_run(task.run_id)
        expected = run.num_chunks_visited % chunks
        if task.chunk_id != expected or run.num_chunks_visited >= chunks * epochs:
            raise RuntimeError(f"run {run.run_id} is at chunk {expected} (visited {run.num_chunks_visited}); "
                               f"task {task.task_id} is for chunk {task.chunk_id}")
        config = run.config
        model = build_model(config)
        model.load_state_dict(shm.load(model_key(run.run_id)))
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
        start = task.chunk_id * chunk_size
        features, labels = train_x[start:start + chunk_size], train_y[start:start + chunk_size]
        generator = torch.Generator().manual_seed(run.run_id * 1000 + run.num_chunks_visited)
        order = torch.randperm(chunk_size, generator=generator)
        train_loss = torch.tensor(0.0)
        model.train()
        for first in range(0, chunk_size, BATCH_SIZE):
            batch = order[first:first + BATCH_SIZE]
            optimizer.zero_grad()
            train_loss = torch.nn.functional.cross_entropy(model(features[batch]), labels[batch])
            train_loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(val_x)
            val_loss = float(torch.nn.functional.cross_entropy(logits, val_y))
            val_accuracy = float((logits.argmax(dim=1) == val_y).float().mean())
        # the chunk-boundary swap: same shapes, so an in-place copy into shared memory
        shm.store(model_key(run.run_id), model.state_dict(), experiment_id=experiment_id,
                  run_id=run.run_id, chunk_id=task.chunk_id, object_type=SHMObjectType.MODEL)
        visited = run.num_chunks_visited + 1
        steps = run.completed_steps + (chunk_size + BATCH_SIZE - 1) // BATCH_SIZE
        metrics.log_metrics(
            run.metric_run_id,
            {"train_loss": float(train_loss), "val_loss": val_loss, "val_accuracy": val_accuracy},
            step=visited,
        )
        logger.info("trained chunk", run_id=run.run_id, chunk_id=task.chunk_id, epoch=run.num_chunks_visited // chunks,
                    val_accuracy=round(val_accuracy, 3))
        # the run's position moves in the finish's own transaction: a finish the
        # database refuses (the task was failed meanwhile) cannot advance the run
        return TaskResult(run_progress=dict(
            completed_steps=steps, num_chunks_visited=visited,
            num_epochs_completed=visited // chunks, progress=visited / (chunks * epochs),
        ))

    processed = run_worker(worker_id, db, train_chunk, shutdown_event, experiment_id=experiment_id)
    metrics.close()  # bounded: what is not delivered stays in the outbox for the controller
    logger.info("worker stopping", tasks=processed)


class Controller:
    """Schedules each run's next chunk, applies interactive control, tracks everything in the DB."""

    def __init__(self, db: StateDB, args: argparse.Namespace, say: Any):
        self.db = db
        self.args = args
        self.say = say
        self.experiment_id: Optional[int] = None
        self.name = args.name
        self.metrics: Any = None
        self.utils: Any = None
        self.shm: Any = None
        self.workers: Any = None
        self.logger: Any = None
        self.failures = 0
        self.deferred: list[Any] = []  # control requests waiting for their run's task to finish
        self.plan_done: set[str] = set()

    # --- set-up ----------------------------------------------------------------------------

    def start(self) -> None:
        from rapidfire_state.experiment_utils import ExperimentUtils

        self.utils = ExperimentUtils(self.db)
        base = os.path.join(str(rf_home()), "experiments")
        self.experiment_id, self.name, messages = self.utils.create_experiment(self.args.name, base)
        # the schedule, for the workers and for every reader of the database (watch, status)
        self.db.set_experiment_config(
            self.experiment_id, {"num_chunks": self.args.chunks, "num_epochs": self.args.epochs}
        )
        self.logger = RFLogger(self.name, console=False).create_logger("controller")
        for message in messages:
            self.logger.info(message)
        self.say(f"experiment {self.experiment_id} ({self.name}): {self.args.runs} runs, {self.args.workers} workers, "
                 f"{self.args.chunks} chunks x {self.args.epochs} epochs")
        from rapidfire_state.metric_manager import MLflowManager  # seconds: imports MLflow

        with signals_deferred():
            self.metrics = MLflowManager(db=self.db)
            self.utils.metrics = self.metrics  # the experiment's ending flushes the runs' last statuses
            self.metrics.track_experiment(self.experiment_id)
        from rapidfire_state.shm_manager import SharedMemoryManager

        self.shm = SharedMemoryManager("demo-shm", db=self.db)
        configs = get_runs(GridSearch(GRID), seed=0)[: self.args.runs]
        for config in configs:
            self.add_run(config)
        from rapidfire_state.worker_manager import WorkerManager

        registry, lock = self.shm.get_shm_objects()
        self.workers = WorkerManager(self.args.workers, registry, lock, target=demo_worker, db=self.db)
        self.workers.spawn_workers(self.experiment_id, self.name)
        self.db.set_experiment_task(self.experiment_id, ExperimentTask.RUN_FIT)

    def init_model(self, run: Any, warm_from: Any) -> None:
        """The run's model in shared memory: a copy of ``warm_from``'s current weights, or a fresh one."""
        import torch

        if warm_from is not None:
            self.shm.create_warm_start(model_key(warm_from.run_id), model_key(run.run_id), run_id=run.run_id)
            return
        torch.manual_seed(run.run_id)
        self.shm.store(model_key(run.run_id), build_model(run.config).state_dict(),
                       experiment_id=self.experiment_id, run_id=run.run_id, object_type=SHMObjectType.MODEL)

    def add_run(self, config: dict) -> int:
        run = self.db.create_run(
            self.experiment_id, config, source=RunSource.USER,
            total_steps=self.args.chunks * self.args.epochs * ((TRAIN_SAMPLES // self.args.chunks + BATCH_SIZE - 1) // BATCH_SIZE),
        )
        with signals_deferred():
            self.metrics.create_run_for(run.run_id)
        self.init_model(run, None)
        self.db.transition_run(run.run_id, RunStatus.ONGOING, reason="scheduled")
        self.logger.info("run created", run_id=run.run_id, config=config)
        return run.run_id

    # --- the scheduler ---------------------------------------------------------------------

    @property
    def target_chunks(self) -> int:
        return self.args.chunks * self.args.epochs

    def run(self, progress: Any) -> None:
        while True:
            check_interrupted()
            runs = self.db.list_runs(self.experiment_id)
            open_tasks = self.db.list_tasks("worker", experiment_id=self.experiment_id, statuses=OPEN)
            busy_runs = {task.run_id for task in open_tasks}
            self.fail_runs_of_failed_tasks()
            # a run that visited its last chunk is COMPLETED at that boundary, before any
            # request for it is applied (a stop arriving after that is refused)
            for run in runs:
                if run.status == RunStatus.ONGOING and run.run_id not in busy_runs and run.num_chunks_visited >= self.target_chunks:
                    self.db.transition_run(run.run_id, RunStatus.COMPLETED, reason="every chunk of every epoch trained")
            self.apply_control_requests(busy_runs)
            if not self.args.interactive:
                self.scripted_interventions(self.db.list_runs(self.experiment_id))
            self.dispatch(busy_runs, {task.worker_id for task in open_tasks})
            progress.update(self.snapshot())
            runs = self.db.list_runs(self.experiment_id)
            live = [r for r in runs if r.status in (RunStatus.NEW, RunStatus.ONGOING)]
            stopped = [r for r in runs if r.status == RunStatus.STOPPED]
            requests = self.db.list_tasks("controller", experiment_id=self.experiment_id, statuses=OPEN)
            # done when nothing can move any more; a stopped run waits for a person
            # (interactive: resume or kill it) or for the plan's resume
            waiting_for_resume = stopped and (self.args.interactive or "resume" not in self.plan_done)
            if not live and not requests and not self.deferred and not waiting_for_resume:
                return
            time.sleep(0.05)

    def dispatch(self, busy_runs: set[int], busy_workers: set[int]) -> None:
        free = [worker for worker in range(self.args.workers) if worker not in busy_workers]
        if not free:
            return
        waiting = sorted(
            (r for r in self.db.list_runs(self.experiment_id, statuses=[RunStatus.ONGOING])
             if r.run_id not in busy_runs and r.num_chunks_visited < self.target_chunks),
            key=lambda r: (r.num_chunks_visited, r.run_id),  # the run furthest behind first
        )
        for worker, run in zip(free, waiting):
            self.db.create_worker_task(self.experiment_id, run.run_id, worker, run.num_chunks_visited % self.args.chunks)

    def fail_runs_of_failed_tasks(self) -> None:
        self.db.fail_stale_workers(grace_seconds=60, experiment_id=self.experiment_id)
        for task in self.db.list_tasks("worker", experiment_id=self.experiment_id, statuses=[TaskStatus.FAILED]):
            run = self.db.get_run(task.run_id)
            if run.status in (RunStatus.NEW, RunStatus.ONGOING, RunStatus.STOPPED):
                self.failures += 1
                self.logger.error("task failed; failing its run", run_id=task.run_id, task_id=task.task_id)
                self.db.transition_run(task.run_id, RunStatus.FAILED, error=task.error, reason="chunk failed")

    # --- interactive control ---------------------------------------------------------------

    def apply_control_requests(self, busy_runs: set[int]) -> None:
        """Apply queued requests at their run's task boundary (a run with a chunk in flight waits)."""
        while (task := self.db.claim_controller_task(self.experiment_id)) is not None:
            self.deferred.append(task)
        still = []
        for task in self.deferred:
            if task.run_id in busy_runs:
                still.append(task)
                continue
            self.apply(task)
        self.deferred = still

    def apply(self, task: Any) -> None:
        from rapidfire_state.interactive import apply_control_request

        outcome = apply_control_request(self.db, task, clone_hook=self.prepare_clone)
        log = self.logger.info if outcome.ok else self.logger.warning
        log("control request", task_type=task.task_type.value, run_id=task.run_id, outcome=outcome.message)

    def prepare_clone(self, run: Any, parent: Any, warm: bool) -> None:
        """A clone-modify run: its MLflow run, and its model (the parent's weights when warm)."""
        with signals_deferred():
            self.metrics.create_run_for(run.run_id)
        self.init_model(run, parent if warm else None)

    def scripted_interventions(self, runs: list[Any]) -> None:
        """What a person would do, queued through the database as `rapidfire-state ic` does."""
        originals = [r for r in runs if r.source == RunSource.USER]
        if len(originals) < 2:
            return
        second = originals[1]
        if "stop" not in self.plan_done and second.num_chunks_visited >= 1:
            self.request(second.run_id, "stop")
            self.plan_done.add("stop")
        others = [r for r in originals if r.run_id != second.run_id]
        if "stop" in self.plan_done and "resume" not in self.plan_done and second.status == RunStatus.STOPPED and \
                all(r.num_chunks_visited >= self.args.chunks or r.status != RunStatus.ONGOING for r in others):
            self.request(second.run_id, "resume")
            self.plan_done.add("resume")
        if "clone" not in self.plan_done and all(r.num_chunks_visited >= 2 for r in others):
            best = self.best_run(others)
            if best is not None:
                self.request(best.run_id, "clone", config={"lr": best.config["lr"] / 2}, warm=True)
                self.plan_done.add("clone")

    def request(self, run_id: int, action: str, **options: Any) -> None:
        """Queue a request as ``rapidfire-state ic`` would; one the database refuses is logged, not fatal."""
        from rapidfire_state.db.store import ControlRequestError

        try:
            self.db.request_run_control(run_id, action, experiment_id=self.experiment_id, **options)
        except ControlRequestError as exc:  # e.g. the run completed before the plan got to it
            self.logger.info("scripted request refused", action=action, run_id=run_id, reason=str(exc))

    def best_run(self, runs: list[Any]) -> Any:
        snap = self.snapshot()
        scored = [(snap.val_accuracy(r.run_id) or -1.0, r.run_id, r) for r in runs]
        return max(scored, key=lambda item: (item[0], -item[1]))[2] if scored else None

    # --- reporting ---------------------------------------------------------------------------

    def snapshot(self) -> Any:
        from rapidfire_state.console import snapshot

        self._snapshot = snapshot(self.db, self.experiment_id, previous=getattr(self, "_snapshot", None))
        return self._snapshot


# --- progress display ----------------------------------------------------------------------------


class Progress:
    """The live run table of ``rapidfire-state watch`` on a terminal (rich), plain lines in a pipe."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console()
        self.live: Any = None
        self.last_lines: dict[int, str] = {}
        self.interactive = self.console.is_terminal

    def __enter__(self) -> "Progress":
        if self.interactive:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def update(self, snap: Any) -> None:
        from rapidfire_state.console import run_line, run_table

        if self.live is not None:
            self.live.update(run_table(snap))
            return
        for run in snap.runs:  # a pipe or CI: one line per change of a run
            line = run_line(run, snap)
            if self.last_lines.get(run["run_id"]) != line:
                self.last_lines[run["run_id"]] = line
                self.say(line)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


# --- the end --------------------------------------------------------------------------------------


def print_summary(controller: Controller, progress: Progress) -> None:
    db, experiment_id = controller.db, controller.experiment_id
    snap = controller.snapshot()
    say = progress.say
    say("\nleaderboard (validation accuracy after the run's last chunk)")
    runs = db.list_runs(experiment_id)
    ranked = sorted(runs, key=lambda r: -(snap.val_accuracy(r.run_id) or -1.0))
    for place, run in enumerate(ranked, 1):
        origin = f"  (clone of run {run.cloned_from}{', warm' if run.warm_started_from else ''})" if run.cloned_from else ""
        config = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(run.config.items()))
        say(f"  {place}. run {run.run_id}: val_acc {_fmt(snap.val_accuracy(run.run_id))}  {run.status.value:<9} "
            f"{run.num_chunks_visited}/{controller.target_chunks} chunks  {config}{origin}")
    experiment = db.get_experiment(experiment_id)
    say(f"\nexperiment {experiment_id} ({experiment.name}): {experiment.status.value}; "
        f"MLflow rows still pending: {controller.metrics.pending()}")
    say(f"logs: {RFLogger(experiment.name, console=False).log_file('controller').parent}")
    say("\nlook further:")
    say(f"  rapidfire-state runs -e {experiment_id}")
    say("  rapidfire-state watch            # while an experiment runs")
    store = controller.metrics.tracking_uri
    say(f"  mlflow ui --backend-store-uri {store}")


def _stop_children() -> None:
    """What is left of this process's children (a spawn cut short): SIGTERM, then SIGKILL.

    torch's ``torch_shm_manager`` and multiprocessing's resource tracker are left
    alone: they serve this process until it exits and then leave by themselves.
    """
    import psutil

    children = [c for c in psutil.Process().children(recursive=True) if not _daemon_of_ours(c)]
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=3)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


def _daemon_of_ours(process: Any) -> bool:
    """torch's shared-memory daemon and multiprocessing's resource tracker: they end with us."""
    try:
        return process.name() == "torch_shm_manager" or "resource_tracker" in " ".join(process.cmdline())
    except Exception:  # noqa: BLE001 - gone meanwhile
        return True


def end_interrupted(controller: Optional[Controller], signum: int, progress: Progress) -> int:
    """The truth after SIGINT/SIGTERM: what had completed stays so, the rest is ended, children gone."""
    import logging

    name = signal.Signals(signum).name
    if controller is None:  # not even the database was open
        _stop_children()
        print(f"interrupted by {name}: before the experiment existed; nothing to end", file=sys.stderr)
        return 128 + signum
    db = controller.db
    logging.getLogger("rapidfire_state").setLevel(logging.ERROR)  # one line is printed, below
    if controller.workers is not None:
        try:
            # a chunk takes a fraction of a second: let each worker finish its own and
            # exit cleanly, escalating within 4 s in all
            controller.workers.shutdown_workers(1.5, term_timeout=1.0, kill_timeout=1.0)
        except Exception as exc:  # noqa: BLE001 - the clean-up goes on
            controller.say(f"could not stop the workers: {exc}")
    outcome = "before the experiment existed"
    if controller.experiment_id is None:  # interrupted inside create_experiment, after its commit?
        running = db.get_running_experiment()
        if running is not None and running.owner_pid == os.getpid():
            controller.experiment_id = running.experiment_id
    experiment = db.get_experiment(controller.experiment_id) if controller.experiment_id is not None else None
    if experiment is not None and experiment.status != ExperimentStatus.RUNNING:
        outcome = f"experiment {experiment.experiment_id} had already ended {experiment.status.value}"
    elif experiment is not None:
        runs = db.list_runs(controller.experiment_id)
        all_completed = bool(runs) and all(r.status == RunStatus.COMPLETED for r in runs)
        final = ExperimentStatus.COMPLETED if all_completed else ExperimentStatus.FAILED
        reason = f"interrupted by {name}"
        db.cleanup_experiment_state(
            controller.experiment_id, status=final, run_status=RunStatus.KILLED, reason=reason,
            error=None if all_completed else reason,
        )
        if controller.metrics is not None:
            controller.metrics.flush(timeout=3)
            controller.metrics.close(timeout=1)
        outcome = f"experiment {controller.experiment_id} {final.value}"
    if controller.shm is not None:
        try:
            controller.shm.close()  # its registry process ends with it
        except Exception:  # noqa: BLE001 - the clean-up goes on
            pass
    _stop_children()
    progress.__exit__(None, None, None)
    print(f"interrupted by {name}: {outcome}; live runs killed, workers stopped", file=sys.stderr)
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="demo", help="experiment name (made unique)")
    parser.add_argument("--runs", type=int, default=4, help="configurations from the grid (1-9, default 4)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--chunks", type=int, default=4, help="chunks per epoch (default 4)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs (default 2)")
    parser.add_argument("--interactive", action="store_true",
                        help="no scripted interventions: use `rapidfire-state ic …` from another terminal")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 9 or args.workers < 1 or args.chunks < 1 or args.epochs < 1:
        parser.error("--runs must be 1-9; --workers, --chunks and --epochs at least 1")
    started = time.monotonic()
    _quiet_default_log_handler()
    progress = Progress()
    controller: Optional[Controller] = None
    try:
        db = StateDB()
        controller = Controller(db, args, progress.say)
        progress.say(f"database: {db.url_text}")
        controller.start()
        check_interrupted()
        if args.interactive:
            progress.say(f"interactive: e.g. rapidfire-state ic stop 2 -e {controller.experiment_id}")
        with progress:
            controller.run(progress)
        controller.workers.shutdown_workers()
        check_interrupted()
        controller.utils.end_experiment()  # COMPLETED; flushes the runs' last statuses to MLflow
        print_summary(controller, progress)
        controller.shm.close()
        controller.metrics.close()
        RFLogger.close_all()
    except BaseException:
        if not _received:
            raise
        return end_interrupted(controller, _received[0], progress)
    progress.say(f"done in {time.monotonic() - started:.1f} s")
    db.close()
    if controller.failures:
        print(f"{controller.failures} worker tasks failed; see the error column of worker_tasks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
