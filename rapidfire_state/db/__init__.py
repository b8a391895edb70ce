"""The state core: engine, tables, ORM models, migrations runner and :class:`StateDB`.

Imports only the package's leaf modules.  The ORM (``Base`` and the model
classes) is loaded on first use, so opening a database does not pay for it.
"""

from __future__ import annotations

import importlib
from typing import Any

from rapidfire_state.db.engine import resolve_url
from rapidfire_state.db.records import (
    CancelReport,
    CleanupReport,
    ExperimentRecord,
    RunRecord,
    SHMObjectRecord,
    StaleWorkerReport,
    TaskRecord,
    TransitionRecord,
    WorkerRecord,
)
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store import PROGRESS_COUNTERS, StateDB, validate_experiment_name

_ORM_NAMES = (
    "Base",
    "Experiment",
    "Run",
    "WorkerTaskRow",
    "ControllerTaskRow",
    "Worker",
    "SHMObject",
    "StateTransition",
)


def __getattr__(name: str) -> Any:
    if name in _ORM_NAMES:
        value = getattr(importlib.import_module("rapidfire_state.db.models"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "StateDB",
    "resolve_url",
    "db_now",
    "validate_experiment_name",
    "PROGRESS_COUNTERS",
    *_ORM_NAMES,
    "ExperimentRecord",
    "RunRecord",
    "TaskRecord",
    "WorkerRecord",
    "TransitionRecord",
    "SHMObjectRecord",
    "StaleWorkerReport",
    "CleanupReport",
    "CancelReport",
]
