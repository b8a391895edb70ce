"""A hypothesis state machine drives random transitions (legal and illegal) against
a model built from the tables of ``states.py``.

After every step the database agrees with the model; an illegal change raises
``InvalidTransitionError`` and stores nothing; at teardown the history of every
entity replays to its current status.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from sqlalchemy import select

from rapidfire_state import states
from rapidfire_state.constants import ExperimentStatus, RunStatus, TaskStatus
from rapidfire_state.db import Base
from rapidfire_state.exceptions import InvalidTransitionError

_names = itertools.count()

STEPS_SETTINGS = settings(
    max_examples=20,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    # no shrinking: on these 2 shared cores it takes minutes; a failure prints
    # the whole (short) step sequence instead
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


def snapshot(db) -> dict:
    out = {}
    with db.session() as session:
        for table in Base.metadata.sorted_tables:
            out[table.name] = [tuple(r) for r in session.execute(select(table).order_by(*table.primary_key.columns))]
    return out


def as_given(status, use_value: bool):
    """Pass the status as its enum or as its string value."""
    return status.value if use_value else status


def make_machine(db, tmp_path):
    class StateModel(RuleBasedStateMachine):
        experiments = Bundle("experiments")
        runs = Bundle("runs")
        tasks = Bundle("tasks")

        def __init__(self):
            super().__init__()
            self.exp_status: dict[int, ExperimentStatus] = {}
            self.run_status: dict[int, RunStatus] = {}
            self.run_experiment: dict[int, int] = {}
            self.run_started: dict[int, bool] = {}
            self.task_status: dict[tuple[str, int], TaskStatus] = {}
            self.task_worker: dict[tuple[str, int], int | None] = {}
            # how many history rows each entity should have
            self.changes: dict[tuple[str, int], int] = {}

        # --- creation ---------------------------------------------------------------

        @precondition(lambda self: len(self.exp_status) < 3)
        @rule(target=experiments)
        def create_experiment(self):
            record = db.create_experiment(f"sm_{next(_names)}", str(tmp_path))
            assert record.status is ExperimentStatus.NEW
            self.exp_status[record.experiment_id] = ExperimentStatus.NEW
            self.changes[("experiment", record.experiment_id)] = 1
            return record.experiment_id

        @precondition(lambda self: len(self.run_status) < 8)
        @rule(target=runs, experiment_id=experiments)
        def create_run(self, experiment_id):
            record = db.create_run(experiment_id, {"i": len(self.run_status)})
            assert record.status is RunStatus.NEW and record.ended_by is None
            self.run_status[record.run_id] = RunStatus.NEW
            self.run_experiment[record.run_id] = experiment_id
            self.run_started[record.run_id] = False
            self.changes[("run", record.run_id)] = 1
            return record.run_id

        @precondition(lambda self: len(self.task_status) < 8)
        @rule(
            target=tasks,
            experiment_id=experiments,
            kind=st.sampled_from(["worker", "controller"]),
            initial=st.sampled_from([TaskStatus.PENDING, TaskStatus.SCHEDULED]),
            worker_id=st.integers(0, 1),
        )
        def create_task(self, experiment_id, kind, initial, worker_id):
            if kind == "worker":
                record = db.create_worker_task(experiment_id, None, worker_id, 0, status=initial)
            else:
                record = db.create_controller_task(experiment_id, "RUN_FIT", status=initial)
                worker_id = None
            assert record.status is initial
            key = (kind, record.task_id)
            self.task_status[key] = initial
            self.task_worker[key] = worker_id
            self.changes[(f"{kind}_task", record.task_id)] = 1
            return key

        # --- transitions ----------------------------------------------------------------

        def _expect_refusal(self, call, current, wanted):
            before = snapshot(db)
            with pytest.raises(InvalidTransitionError) as info:
                call()
            assert info.value.current == current and info.value.wanted == wanted
            assert snapshot(db) == before

        @rule(experiment_id=experiments, to=st.sampled_from(list(ExperimentStatus)), use_value=st.booleans())
        def transition_experiment(self, experiment_id, to, use_value):
            current = self.exp_status[experiment_id]
            call = lambda: db.transition_experiment(experiment_id, as_given(to, use_value))  # noqa: E731
            other_running = any(
                s is ExperimentStatus.RUNNING for e, s in self.exp_status.items() if e != experiment_id
            )
            if to == current:
                before = snapshot(db)
                assert call().status is to
                assert snapshot(db) == before  # an idempotent repeat stores nothing
            elif states.can_transition("experiment", current, to) and not (to is ExperimentStatus.RUNNING and other_running):
                record = call()
                assert record.status is to
                if to in states.terminal_states("experiment"):
                    assert record.ended_at is not None
                self.exp_status[experiment_id] = to
                self.changes[("experiment", experiment_id)] += 1
            else:
                self._expect_refusal(call, current, to)

        @rule(
            run_id=runs,
            # weighted towards stop/resume, where the experiment's status matters
            to=st.sampled_from([RunStatus.ONGOING, RunStatus.STOPPED]) | st.sampled_from(list(RunStatus)),
            use_value=st.booleans(),
            expected=st.none() | st.sets(st.sampled_from(list(RunStatus)), min_size=1),
        )
        def transition_run(self, run_id, to, use_value, expected):
            current = self.run_status[run_id]
            experiment_status = self.exp_status[self.run_experiment[run_id]]
            call = lambda: db.transition_run(run_id, as_given(to, use_value), expected=expected)  # noqa: E731
            legal = (
                states.can_transition("run", current, to)
                and (expected is None or current in expected)
                and not (current is RunStatus.STOPPED and to is RunStatus.ONGOING
                         and experiment_status is not ExperimentStatus.RUNNING)
            )
            if to == current:
                before = snapshot(db)
                assert call().status is to
                assert snapshot(db) == before
            elif legal:
                record = call()
                assert record.status is to
                if to in states.terminal_states("run"):
                    assert record.ended_by is not None and record.ended_by.value == to.value
                    assert record.ended_at is not None
                else:
                    assert record.ended_by is None and record.ended_at is None
                if to is RunStatus.ONGOING:
                    self.run_started[run_id] = True
                assert (record.started_at is not None) == self.run_started[run_id]
                self.run_status[run_id] = to
                self.changes[("run", run_id)] += 1
            else:
                self._expect_refusal(call, current, to)

        # stop and resume on their own: whether a resume is legal depends on the
        # experiment's status, the one cross-machine rule
        @rule(run_id=runs)
        def stop_run(self, run_id):
            self.transition_run(run_id, RunStatus.STOPPED, False, None)

        @rule(run_id=runs, use_value=st.booleans())
        def resume_run(self, run_id, use_value):
            self.transition_run(run_id, RunStatus.ONGOING, use_value, None)

        @rule(key=tasks, to=st.sampled_from(list(TaskStatus)), use_value=st.booleans())
        def transition_task(self, key, to, use_value):
            kind, task_id = key
            current = self.task_status[key]
            call = lambda: db.transition_task(kind, task_id, as_given(to, use_value))  # noqa: E731
            if to == current:
                before = snapshot(db)
                assert call().status is to
                assert snapshot(db) == before
            elif states.can_transition("task", current, to):
                record = call()
                assert record.status is to
                assert (record.ended_at is not None) == (to in states.terminal_states("task"))
                self.task_status[key] = to
                self.changes[(f"{kind}_task", task_id)] += 1
            else:
                self._expect_refusal(call, current, to)

        @rule(experiment_id=experiments, worker_id=st.integers(0, 1))
        def claim_worker_task(self, experiment_id, worker_id):
            candidates = sorted(
                task_id
                for (kind, task_id), status in self.task_status.items()
                if kind == "worker" and status is TaskStatus.SCHEDULED and self.task_worker[(kind, task_id)] == worker_id
                and db.get_task("worker", task_id).experiment_id == experiment_id
            )
            claimed = db.claim_worker_task(worker_id, experiment_id=experiment_id)
            if not candidates:
                assert claimed is None
                return
            assert claimed is not None and claimed.task_id == candidates[0]
            assert claimed.status is TaskStatus.IN_PROGRESS and claimed.started_at is not None
            self.task_status[("worker", claimed.task_id)] = TaskStatus.IN_PROGRESS
            self.changes[("worker_task", claimed.task_id)] += 1

        # --- agreement ----------------------------------------------------------------------

        @invariant()
        def database_agrees_with_model(self):
            if not self.exp_status:
                return
            for experiment in db.list_experiments():
                if experiment.experiment_id in self.exp_status:
                    assert experiment.status is self.exp_status[experiment.experiment_id]
            found = {r.run_id: r.status for r in db.list_runs() if r.run_id in self.run_status}
            assert found == self.run_status
            for kind in ("worker", "controller"):
                found = {
                    (kind, t.task_id): t.status for t in db.list_tasks(kind) if (kind, t.task_id) in self.task_status
                }
                assert found == {k: v for k, v in self.task_status.items() if k[0] == kind}
            running = db.get_running_experiment()
            model_running = [e for e, s in self.exp_status.items() if s is ExperimentStatus.RUNNING]
            assert (running.experiment_id if running else None) == (model_running[0] if model_running else None)

        def teardown(self):
            try:
                current = {("experiment", e): s for e, s in self.exp_status.items()}
                current.update({("run", r): s for r, s in self.run_status.items()})
                current.update({(f"{kind}_task", t): s for (kind, t), s in self.task_status.items()})
                for (entity, entity_id), status in current.items():
                    history = db.history(entity, entity_id)
                    assert len(history) == self.changes[(entity, entity_id)], (entity, entity_id)
                    assert history[0].from_status is None
                    assert history[0].to_status in states.ENTRY_STATES["task" if entity.endswith("task") else entity]
                    for previous, row in zip(history, history[1:]):
                        assert row.from_status == previous.to_status, (entity, entity_id, history)
                        machine = "task" if entity.endswith("task") else entity
                        assert states.can_transition(machine, row.from_status, row.to_status)
                    assert history[-1].to_status == status
                    assert [h.transition_id for h in history] == sorted(h.transition_id for h in history)
            finally:
                # the next example starts with no RUNNING experiment
                for experiment_id, status in self.exp_status.items():
                    if status is ExperimentStatus.RUNNING:
                        db.transition_experiment(experiment_id, "COMPLETED")

    return StateModel


def test_random_transitions_agree_with_the_tables(db, tmp_path):
    run_state_machine_as_test(make_machine(db, tmp_path), settings=STEPS_SETTINGS)
