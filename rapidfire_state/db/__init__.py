"""The state core: engine, ORM models, migrations runner and :class:`StateDB`.

Imports only the package's leaf modules.
"""

from rapidfire_state.db.engine import resolve_url
from rapidfire_state.db.models import (
    Base,
    ControllerTaskRow,
    Experiment,
    Run,
    SHMObject,
    StateTransition,
    Worker,
    WorkerTaskRow,
    db_now,
)
from rapidfire_state.db.records import (
    CleanupReport,
    ExperimentRecord,
    RunRecord,
    SHMObjectRecord,
    StaleWorkerReport,
    TaskRecord,
    TransitionRecord,
    WorkerRecord,
)
from rapidfire_state.db.store import PROGRESS_COUNTERS, StateDB, validate_experiment_name

__all__ = [
    "Base",
    "StateDB",
    "resolve_url",
    "db_now",
    "validate_experiment_name",
    "PROGRESS_COUNTERS",
    "Experiment",
    "Run",
    "WorkerTaskRow",
    "ControllerTaskRow",
    "Worker",
    "SHMObject",
    "StateTransition",
    "ExperimentRecord",
    "RunRecord",
    "TaskRecord",
    "WorkerRecord",
    "TransitionRecord",
    "SHMObjectRecord",
    "StaleWorkerReport",
    "CleanupReport",
]
