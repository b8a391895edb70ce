"""rapidfire_state: the database-first state layer of a hyper-parallel training system.

Importing the package is cheap: it loads neither torch nor mlflow (nor alembic),
and the public names below are resolved lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from rapidfire_state.constants import (
    ControllerTask,
    ExperimentStatus,
    ExperimentTask,
    RunEndedBy,
    RunSource,
    RunStatus,
    SHMLocation,
    SHMObjectType,
    TaskStatus,
    WorkerTask,
)
from rapidfire_state.exceptions import *  # noqa: F401,F403  (every error class)
from rapidfire_state.exceptions import __all__ as _exception_names

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access
_LAZY = {
    "StateDB": "rapidfire_state.db",
    "ExperimentRecord": "rapidfire_state.db",
    "RunRecord": "rapidfire_state.db",
    "TaskRecord": "rapidfire_state.db",
    "WorkerRecord": "rapidfire_state.db",
    "TransitionRecord": "rapidfire_state.db",
    "SHMObjectRecord": "rapidfire_state.db",
    "encode_payload": "rapidfire_state.serialize",
    "decode_db_payload": "rapidfire_state.serialize",
    "DataPath": "rapidfire_state.datapaths",
    "RFLogger": "rapidfire_state.logging",
    "TrainingLogger": "rapidfire_state.logging",
    "TrainerConfig": "rapidfire_state.trainer_config",
    "get_runs": "rapidfire_state.automl_utils",
    "get_flattened_config_leaf": "rapidfire_state.automl_utils",
    "AutoMLAlgorithm": "rapidfire_state.automl_utils",
    "GridSearch": "rapidfire_state.automl_utils",
    "RandomSearch": "rapidfire_state.automl_utils",
    "ExperimentUtils": "rapidfire_state.experiment_utils",
    "SharedMemoryManager": "rapidfire_state.shm_manager",
    "WorkerManager": "rapidfire_state.worker_manager",
    "run_worker": "rapidfire_state.worker_manager",
    "TaskResult": "rapidfire_state.worker_manager",
    "MLflowManager": "rapidfire_state.metric_manager",
    "mlflow_status_for": "rapidfire_state.states",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ControllerTask",
    "ExperimentStatus",
    "ExperimentTask",
    "RunEndedBy",
    "RunSource",
    "RunStatus",
    "SHMLocation",
    "SHMObjectType",
    "TaskStatus",
    "WorkerTask",
    *_exception_names,
    *_LAZY,
]
