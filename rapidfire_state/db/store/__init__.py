"""``StateDB``: the one entry point to the state database, split by entity.

=====================  ==========================================================
``core``               opening (the migrations' open policy), units of work, reads
``status_change``      every status change: the compare-and-set builder fed by
                       :mod:`rapidfire_state.states`, history rows, claims
``lookups``            row lookups (one :class:`NotFoundError`), argument checks
``experiments``        creation with transactional naming, experiment changes
``runs``               runs, their changes and progress counters
``tasks``              worker/controller tasks: queueing, claims, finishes
``workers``            registration, heartbeats, failing what dead processes left
``processes``          whether a claiming process of this host is still there
``shm_objects``        shared-memory object metadata rows
``cleanup``            ending an experiment's state, cancelling its current task
``history``            reading ``state_transitions``
``metric_outbox``      rows for MLflow: appending, claiming and settling batches
``control``            interactive-control requests: checked and queued, applied
``reports``            read-only reports of the console: counts, limited listings,
                       last metric values, the doctor's checks
=====================  ==========================================================

Helpers that take a connection are named ``…_without_commit`` (writes) or
``load_…`` (reads) and never commit; each public method is one unit of work.
"""

from __future__ import annotations

from typing import Optional

from rapidfire_state.db.store.cleanup import CleanupStore
from rapidfire_state.db.store.control import ControlRequestError, ControlStore
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.experiments import (
    DEFAULT_EXPERIMENT_NAME,
    MAX_EXPERIMENT_NAME_LENGTH,
    ExperimentStore,
    validate_experiment_name,
)
from rapidfire_state.db.store.history import HistoryStore
from rapidfire_state.db.store.metric_outbox import MetricOutboxStore
from rapidfire_state.db.store.reports import ReportStore
from rapidfire_state.db.store.runs import PROGRESS_COUNTERS, RunStore
from rapidfire_state.db.store.shm_objects import SHMObjectStore
from rapidfire_state.db.store.tasks import TaskStore
from rapidfire_state.db.store.workers import WorkerStore


class StateDB(
    ExperimentStore, RunStore, TaskStore, WorkerStore, SHMObjectStore, CleanupStore, HistoryStore,
    MetricOutboxStore, ControlStore, ReportStore, StoreCore,
):
    """The state database of one deployment (SQLite file or PostgreSQL).

    ``StateDB(url=None, *, auto_upgrade=None, read_only=False)``: ``url`` defaults
    to ``$RF_DB_URL``, else ``$RF_HOME/db/rapidfire_state.db``.  Opening for
    writing applies the open policy of :mod:`rapidfire_state.db.migrate` (empty →
    migrate under a lock; behind → SQLite backed up then upgraded, a server
    database refused unless ``auto_upgrade=True``; unknown/newer →
    :class:`SchemaTooNewError`).

    ``read_only=True`` is how readers open: it never creates, migrates or backs
    up anything (a missing or empty database raises
    :class:`DatabaseMissingError`, an unknown revision :class:`SchemaTooNewError`,
    one behind head is read as it is and :attr:`probe` says so), its connections
    refuse writes, and every write method raises :class:`ReadOnlyError`.

    Reads go through :meth:`session`, writes through :meth:`transaction` or the
    store methods, each of which is one unit of work.  Instances pickle as
    their URL, so they can be handed to spawned processes.

    The methods live by entity in this package's modules (experiments, runs,
    tasks, workers, shm objects, cleanup, history); every status change is
    built by :mod:`.status_change` from :mod:`rapidfire_state.states`.
    """


def _reopen(url: str, auto_upgrade: Optional[bool], read_only: bool = False) -> StateDB:
    """Unpickle a ``StateDB`` pickled before the split (it named this function)."""
    return StateDB(url, auto_upgrade=auto_upgrade, read_only=read_only)


__all__ = [
    "StateDB",
    "ControlRequestError",
    "validate_experiment_name",
    "PROGRESS_COUNTERS",
    "DEFAULT_EXPERIMENT_NAME",
    "MAX_EXPERIMENT_NAME_LENGTH",
]
