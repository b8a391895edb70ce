"""Delivering the metric outbox to MLflow: transports and the flusher.

:class:`~rapidfire_state.metric_manager.MLflowManager` appends what a process
logs to the ``metric_outbox`` table of the state database and returns; the
:class:`Flusher` of each process sends it on, in the background.  The rows'
side of the protocol (claims, tokens, settling) is in
:mod:`rapidfire_state.db.store.metric_outbox`; this module is MLflow's side.

Exactly once
------------
A batch's rows are stamped with a random token and that is committed *before*
the batch is sent.  The batch goes out as one ``log_batch`` call that also sets
the tag :data:`BATCH_TAG` to the token; MLflow's stores write a batch's
parameters, then its metrics, then its tags, so the tag holds the token only
once the points are stored.  Rows are then marked delivered.

A flusher that dies between sending and marking (or whose call failed without
an answer) leaves rows that are pending *with* a token.  The next flusher to
claim that stream gets exactly those rows back, marked in doubt, and asks MLflow
before sending anything:

* the run's :data:`BATCH_TAG` is the batch's token: everything landed; mark it;
* otherwise (the batch never arrived, or only partly, if the process died
  inside MLflow's own store code): each metric point is looked up in the run's
  history by its identity (key, timestamp, step, value); those found are marked
  delivered, the rest are sent again.  Parameters and tags are sent again
  (MLflow accepts a parameter logged again with the same value, and a tag set
  again to the same value changes nothing); a status is applied again through
  the same guard.

Only one batch per stream is in flight at a time (the stream's claim), so the
tag can only hold this batch's token or an older one, and rows reach MLflow in
``outbox_id`` order per run.  Two flushers never send the same rows: the claim
and the stamping are one compare-and-set unit.

Outages
-------
Against a server, every call of the flusher is made with MLflow's own HTTP
function with retries off and a timeout of its own (``max_retries=0``), so a
dead server costs one refused connection, not MLflow's minutes-long retry loop;
the user's environment (``MLFLOW_HTTP_REQUEST_*``) is neither read for these
calls nor changed.  After a failure the flusher waits, doubling from
:data:`FIRST_BACKOFF_SECONDS` up to :data:`MAX_BACKOFF_SECONDS`, and tries again;
loggers never wait for it.

Garbage collection
------------------
With an in-process (database) store, MLflow's own code runs in the training
process.  Its ORM makes enough objects per batch to set off full collections
of the whole process every few batches (170-280 ms here, every thread stopped);
the flusher pauses Python's cyclic collector for the duration of each
``log_batch`` call into such a store, and restores its previous state after
(see :func:`_collector_paused`).  A server store needs none of this.

Forks
-----
A process that forks (``multiprocessing``'s default start method on Linux)
while a flusher thread runs waits for the flusher's pass in progress to end
(at most :data:`FORK_WAIT_SECONDS`): a child forked mid-pass would inherit
locks held by a thread it does not have.  The child starts its own flusher
when it logs.

Statuses
--------
A STATUS row (appended by the database in the transaction of each run status
change) is applied only when MLflow's current status of the run may become the
new one (:func:`rapidfire_state.states.mlflow_status_may_follow`): a FINISHED or
FAILED MLflow run is never changed, and a lookup that fails changes nothing
(the row stays pending and is tried again later).  MLflow trouble never touches
the state database's runs.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from rapidfire_state import states
from rapidfire_state.constants import MetricRowKind
from rapidfire_state.threads import start_background_thread

_log = logging.getLogger(__name__)

#: the run tag that carries the token of the last batch stored (see the module notes)
BATCH_TAG = "rapidfire.outbox_batch"
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
#: a claim older than this (by the database clock) is taken over from any host
STALE_CLAIM_SECONDS = 300.0
#: the timeout of one HTTP call of the flusher (connect and read)
REQUEST_TIMEOUT_SECONDS = 10.0

#: MLflow error codes that say a row will never be accepted (sending it again cannot help)
_PERMANENT_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"})
_METRIC, _PARAM, _TAG, _STATUS = (kind.value for kind in MetricRowKind)
_END_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})


def error_code(exc: BaseException) -> Optional[str]:
    """MLflow's error code of ``exc`` (``RESOURCE_DOES_NOT_EXIST``, ...), or None."""
    return getattr(exc, "error_code", None)


def is_permanent(exc: BaseException) -> bool:
    """True when MLflow refused the request for good (bad value, unknown run)."""
    return error_code(exc) in _PERMANENT_CODES


def _short(exc: BaseException) -> str:
    text = str(exc).strip().split("\n\n", 1)[0]
    return f"{type(exc).__name__}: {text[:500]}"


@dataclass(frozen=True)
class RunView:
    """What the flusher needs to know of an MLflow run."""

    status: str
    tags: Mapping[str, str]
    #: MLflow's ``lifecycle_stage``: ``active``, or ``deleted`` (a run that takes no more data)
    lifecycle_stage: str = "active"


# --- transports ----------------------------------------------------------------------------------


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (nested across threads), then as it was.

    An in-process MLflow store makes some ten thousand ORM objects per batch of
    a thousand points; left to the collector, they survive into its oldest
    generation while the batch runs and set off a full collection of every
    object of the process (MLflow's included: ~300k) every few batches, 170-280
    ms measured here, during which every thread, training included, stops.
    With the collector paused for the call they are freed by reference counting
    when it returns and never reach the old generation; the collector, enabled
    again, takes what is left in its young generations.  Measured on the 2-core
    machine: the longest caller-side ``log_metric`` while a flusher delivers to
    the embedded store went from 200-280 ms to 25-30 ms.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


class StoreTransport:
    """Calls through an :class:`mlflow.tracking.MlflowClient` (database stores, in-process)."""

    def __init__(self, client: Any):
        self._client = client

    def log_batch(self, run_id: str, metrics: Sequence[tuple], params: Sequence[tuple], tags: Sequence[tuple]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        with _collector_paused():  # the entities too: a thousand of them outlive young collections
            self._client.log_batch(
                run_id,
                metrics=[Metric(key=k, value=v, timestamp=t, step=s) for k, v, t, s in metrics],
                params=[Param(k, v) for k, v in params],
                tags=[RunTag(k, v) for k, v in tags],
                synchronous=True,
            )

    def get_run(self, run_id: str) -> RunView:
        run = self._client.get_run(run_id)
        return RunView(str(run.info.status), dict(run.data.tags), str(run.info.lifecycle_stage))

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, int, float]]:
        return [(int(m.timestamp), int(m.step), float(m.value)) for m in self._client.get_metric_history(run_id, key)]

    def set_status(self, run_id: str, status: str, end_time_ms: Optional[int]) -> None:
        if status in _END_STATUSES:
            self._client.set_terminated(run_id, status=status, end_time=end_time_ms)
        else:
            self._client.update_run(run_id, status=status)


def _json_number(value: float) -> Any:
    # protobuf's JSON form, which MLflow's server parses: non-finite values as strings
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _number(value: Any) -> float:
    return float(value) if not isinstance(value, str) else float(value.replace("Infinity", "inf"))


class RestTransport:
    """Calls to an MLflow server's REST API, each once: no retries, a timeout of its own.

    Uses MLflow's ``http_request`` with ``max_retries=0`` and the credentials of
    the manager's own client (``get_host_creds``), so authentication and TLS
    settings are MLflow's, and the retry policy applies to these calls only.
    """

    def __init__(self, get_host_creds: Callable[[], Any], timeout: float = REQUEST_TIMEOUT_SECONDS):
        self._get_host_creds = get_host_creds
        self._timeout = timeout

    def _call(self, endpoint: str, method: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        import json

        from mlflow.utils.rest_utils import http_request, verify_rest_response

        arguments: dict[str, Any] = {"params": body} if method == "GET" else {"json": body}
        response = http_request(
            self._get_host_creds(), endpoint, method, max_retries=0, backoff_factor=0, backoff_jitter=0,
            timeout=self._timeout, respect_retry_after_header=False, retry_timeout_seconds=1, **arguments,
        )
        response = verify_rest_response(response, endpoint)
        text = response.text.strip()
        return json.loads(text) if text else {}

    def log_batch(self, run_id: str, metrics: Sequence[tuple], params: Sequence[tuple], tags: Sequence[tuple]) -> None:
        self._call(
            "/api/2.0/mlflow/runs/log-batch", "POST",
            {
                "run_id": run_id,
                "metrics": [{"key": k, "value": _json_number(v), "timestamp": t, "step": s} for k, v, t, s in metrics],
                "params": [{"key": k, "value": v} for k, v in params],
                "tags": [{"key": k, "value": v} for k, v in tags],
            },
        )

    def get_run(self, run_id: str) -> RunView:
        run = self._call("/api/2.0/mlflow/runs/get", "GET", {"run_id": run_id})["run"]
        tags = {tag["key"]: tag.get("value", "") for tag in run.get("data", {}).get("tags", [])}
        return RunView(str(run["info"]["status"]), tags, str(run["info"].get("lifecycle_stage", "active")))

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, int, float]]:
        found: list[tuple[int, int, float]] = []
        token: Optional[str] = None
        while True:
            body: dict[str, Any] = {"run_id": run_id, "metric_key": key, "max_results": 25000}
            if token:
                body["page_token"] = token
            page = self._call("/api/2.0/mlflow/metrics/get-history", "GET", body)
            for metric in page.get("metrics", []):
                found.append((int(metric["timestamp"]), int(metric.get("step", 0)), _number(metric["value"])))
            token = page.get("next_page_token")
            if not token:
                return found

    def set_status(self, run_id: str, status: str, end_time_ms: Optional[int]) -> None:
        body: dict[str, Any] = {"run_id": run_id, "run_uuid": run_id, "status": status}
        if end_time_ms is not None and status in _END_STATUSES:
            body["end_time"] = end_time_ms
        self._call("/api/2.0/mlflow/runs/update", "POST", body)


def _identity(timestamp: int, step: int, value: float) -> tuple:
    """A metric point as MLflow's SQL store keys it: NaN as one value, +-inf as +-max float."""
    if math.isnan(value):
        return (timestamp, step, "nan")
    if math.isinf(value):
        value = math.copysign(sys.float_info.max, value)
    return (timestamp, step, value)


# --- the flusher ---------------------------------------------------------------------------------


@dataclass
class FlushStats:
    """What a flusher did since it started (for tests, benchmarks and ``repr``)."""

    delivered: int = 0
    failed: int = 0
    batches: int = 0
    resolved_in_doubt: int = 0
    resent_after_doubt: int = 0
    errors: int = 0
    last_error: Optional[str] = None
    history: list = field(default_factory=list, repr=False)


#: every flusher of this process (for the fork hooks below)
_FLUSHERS: "weakref.WeakSet[Flusher]" = weakref.WeakSet()
#: how long a fork waits for a flusher's pass in progress to end
FORK_WAIT_SECONDS = 30.0
_held_for_fork: list[Any] = []


def _hold_flushers_for_fork() -> None:
    """Before ``fork()``: let each flusher's pass in progress end, and start none.

    A child forked while a flusher thread is inside the database driver or
    MLflow inherits whatever locks that thread held at that instant, with no
    thread to release them; its first use of them would hang (seen: a forked
    worker that never registered).  Holding every flusher's pass lock across
    the fork makes the fork happen between passes.
    """
    for flusher in list(_FLUSHERS):
        lock = flusher._lock
        if lock.acquire(timeout=FORK_WAIT_SECONDS):
            _held_for_fork.append(lock)


def _release_flushers_after_fork() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()


def _reset_flushers_in_child() -> None:
    global _gc_pauses
    _held_for_fork.clear()
    for flusher in list(_FLUSHERS):
        flusher._after_fork()
    if _gc_pauses and _gc_was_enabled:  # cannot happen while the passes were held; be sure
        gc.enable()
    _gc_pauses = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_hold_flushers_for_fork,
        after_in_parent=_release_flushers_after_fork,
        after_in_child=_reset_flushers_in_child,
    )


class _Transient(Exception):
    """A call failed in a way that may pass (server down, timeout, busy store)."""


class Flusher:
    """Sends one tracking store's pending outbox rows, in batches, exactly once.

    ``db`` is the :class:`~rapidfire_state.db.StateDB` holding the outbox,
    ``transport`` one of :class:`StoreTransport` / :class:`RestTransport`.
    :meth:`flush` runs in the caller's thread; :meth:`start` runs the same work
    in a daemon thread every ``interval`` seconds (sooner when :meth:`wake` is
    called), backing off after failures.
    """

    def __init__(
        self,
        db: Any,
        tracking_uri: str,
        transport: Any,
        *,
        interval: float = 1.0,
        stale_after_seconds: float = STALE_CLAIM_SECONDS,
    ):
        self.db = db
        self.tracking_uri = tracking_uri
        self.transport = transport
        self.interval = interval
        self.stale_after_seconds = stale_after_seconds
        self.stats = FlushStats()
        #: streams sent one row at a time (after MLflow refused one of their batches): rows left so
        self._isolate: dict[int, int] = {}
        self._lock = threading.Lock()  # one pass at a time in this process
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()
        self._backoff = 0.0
        self._retry_at = 0.0
        _FLUSHERS.add(self)

    def _after_fork(self) -> None:
        # the parent's thread does not exist here, and its locks are the parent's
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self._thread = None

    def __repr__(self) -> str:
        return f"Flusher({self.tracking_uri!r}, {self.stats!r})"

    # --- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Run in a daemon thread of this process (again after a fork: threads do not survive one)."""
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self._thread = start_background_thread(self._run, "rapidfire-metric-flusher")

    def wake(self) -> None:
        """Ask the background thread for a pass now (it still honours its back-off)."""
        self._wakeup.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background thread, waiting at most ``timeout`` seconds for its pass to end."""
        self._stopping.set()
        self._wakeup.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            wait = self.interval
            try:
                if time.monotonic() >= self._retry_at:
                    self._pass(deadline=None)
                if self._retry_at > time.monotonic():
                    wait = self._retry_at - time.monotonic()
            except Exception as exc:  # the flusher must never die of one bad pass
                self._failed(exc)
                _log.warning("metric flusher pass failed: %s", _short(exc))
            self._wakeup.wait(max(wait, 0.01))
            self._wakeup.clear()

    # --- one pass ------------------------------------------------------------------------------

    def flush(self, timeout: Optional[float] = None) -> int:
        """Deliver pending rows now; return how many were delivered by this call.

        With ``timeout`` None, one pass: every batch this process can claim is
        tried once, and the first failure ends it.  With a timeout, passes are
        repeated (with the back-off) until nothing of this store is pending or
        the time is up.  MLflow trouble is never raised here; see
        :attr:`stats` and ``pending()``.
        """
        if timeout is None:
            return self._pass(deadline=None, ignore_backoff=True)
        deadline = time.monotonic() + max(0.0, timeout)
        delivered = 0
        while True:
            delivered += self._pass(deadline=deadline, ignore_backoff=True)
            if self.db.pending_metric_rows(tracking_uri=self.tracking_uri) == 0:
                return delivered
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return delivered
            pause = self._retry_at - time.monotonic() if self._retry_at > time.monotonic() else 0.05
            time.sleep(max(0.01, min(pause, remaining)))

    def _pass(self, deadline: Optional[float], ignore_backoff: bool = False) -> int:
        if not ignore_backoff and time.monotonic() < self._retry_at:
            return 0
        with self._lock:
            delivered = 0
            while deadline is None or time.monotonic() < deadline:
                batch = self.db.claim_metric_batch(
                    self.tracking_uri, stale_after_seconds=self.stale_after_seconds,
                    limits={stream: 1 for stream in self._isolate},
                )
                if batch is None:
                    return delivered
                try:
                    delivered += self._deliver(batch)
                except _Transient as exc:
                    self._failed(exc)
                    return delivered
                except Exception as exc:  # the state database itself failed: the rows stay, retried later
                    self._failed(exc)
                    _log.warning("metric flusher: %s; the outbox rows stay for the next pass", _short(exc))
                    return delivered
                self._succeeded()
            return delivered

    @property
    def backing_off(self) -> bool:
        """True while waiting after a failed pass (MLflow unreachable, or refusing for now)."""
        return self._retry_at > time.monotonic()

    def _failed(self, exc: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = str(exc)
        self._backoff = FIRST_BACKOFF_SECONDS if self._backoff == 0 else min(self._backoff * 2, MAX_BACKOFF_SECONDS)
        self._retry_at = time.monotonic() + self._backoff * random.uniform(0.8, 1.2)

    def _succeeded(self) -> None:
        self._backoff = 0.0
        self._retry_at = 0.0

    # --- one batch ------------------------------------------------------------------------------

    def _deliver(self, batch: Any) -> int:
        """Deliver one claimed batch and settle it; the rows delivered.  Raises _Transient."""
        if batch.in_doubt:
            return self._resolve(batch)
        if batch.rows[0].kind == _STATUS:
            return self._apply_status(batch)
        metrics = [(r.key, float(r.value), r.timestamp_ms, int(r.step or 0)) for r in batch.rows if r.kind == _METRIC]
        params = [(r.key, r.text_value or "") for r in batch.rows if r.kind == _PARAM]
        tags = [(r.key, r.text_value or "") for r in batch.rows if r.kind == _TAG]
        try:
            self.transport.log_batch(batch.metric_run_id, metrics, params, [*tags, (BATCH_TAG, batch.batch_token)])
        except Exception as exc:
            return self._send_failed(batch, exc)
        return self._settled(batch, delivered=[r.outbox_id for r in batch.rows])

    def _send_failed(self, batch: Any, exc: BaseException) -> int:
        message = _short(exc)
        if is_permanent(exc) and (len(batch.rows) == 1 or error_code(exc) == "RESOURCE_DOES_NOT_EXIST"):
            # this row (or every row of a run MLflow does not have) will never be accepted
            _log.warning("MLflow refused %d outbox row(s) of run %s for good: %s", len(batch.rows), batch.metric_run_id, message)
            self._settled(batch, failed={r.outbox_id: message for r in batch.rows}, error=message)
            return 0
        if is_permanent(exc) and self._run_is_deleted(batch.metric_run_id):
            # a deleted run takes nothing: every row would be refused alike
            _log.warning("MLflow run %s is deleted; %d outbox row(s) for it failed", batch.metric_run_id, len(batch.rows))
            self._settled(batch, failed={r.outbox_id: message for r in batch.rows}, error=message)
            return 0
        if is_permanent(exc):
            # one row of the batch is refused: find it by sending the batch's rows one at a
            # time; first learn what (if anything) of the refused call was stored
            self._isolate[batch.stream_id] = len(batch.rows)
            self._settled(batch, error=message)
            return 0
        # no answer, or an answer that may pass: the rows stay in doubt (their token is kept)
        self._settled(batch, error=message)
        raise _Transient(message) from exc

    def _run_is_deleted(self, run_id: str) -> bool:
        try:
            return self.transport.get_run(run_id).lifecycle_stage == "deleted"
        except Exception:  # unknown: isolate rows one by one, as for any refusal
            return False

    def _settled(self, batch: Any, **outcome: Any) -> int:
        delivered = outcome.get("delivered", ())
        failed = outcome.get("failed", {})
        if not self.db.settle_metric_batch(batch, **outcome):
            _log.warning("the claim of metric stream %s was taken over while its batch was in flight", batch.stream_id)
        self.stats.batches += 1
        self.stats.delivered += len(delivered)
        self.stats.failed += len(failed)
        if batch.stream_id in self._isolate and (delivered or failed):
            left = self._isolate[batch.stream_id] - len(delivered) - len(failed)
            if left <= 0:
                del self._isolate[batch.stream_id]
            else:
                self._isolate[batch.stream_id] = left
        return len(delivered)

    def _resolve(self, batch: Any) -> int:
        """Settle a batch sent before with an unknown outcome, asking MLflow what it has."""
        try:
            run = self.transport.get_run(batch.metric_run_id)
        except Exception as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return self._send_failed(batch, exc)
            self._settled(batch, error=_short(exc))
            raise _Transient(_short(exc)) from exc
        self.stats.resolved_in_doubt += 1
        if run.tags.get(BATCH_TAG) == batch.batch_token:
            return self._settled(batch, delivered=[r.outbox_id for r in batch.rows])
        delivered: list[int] = []
        resend: list[int] = []
        histories: dict[str, dict[tuple, int]] = {}
        try:
            for row in batch.rows:
                if row.kind != _METRIC:
                    resend.append(row.outbox_id)
                    continue
                if row.key not in histories:
                    counts: dict[tuple, int] = {}
                    for point in self.transport.metric_history(batch.metric_run_id, row.key):
                        identity = _identity(*point)
                        counts[identity] = counts.get(identity, 0) + 1
                    histories[row.key] = counts
                identity = _identity(row.timestamp_ms, int(row.step or 0), float(row.value))
                if histories[row.key].get(identity, 0) > 0:
                    delivered.append(row.outbox_id)
                else:
                    resend.append(row.outbox_id)
        except Exception as exc:
            self._settled(batch, error=_short(exc))
            raise _Transient(_short(exc)) from exc
        self.stats.resent_after_doubt += len(resend)
        return self._settled(batch, delivered=delivered, resend=resend)

    def _apply_status(self, batch: Any) -> int:
        """Mirror one run status in MLflow, unless MLflow's status may not become it."""
        row = batch.rows[0]
        wanted = row.text_value or ""
        try:
            current = self.transport.get_run(batch.metric_run_id).status
        except Exception as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return self._send_failed(batch, exc)
            # never write a status blind: try again later
            self._settled(batch, resend=[row.outbox_id], error=_short(exc))
            raise _Transient(_short(exc)) from exc
        if current == wanted:
            return self._settled(batch, delivered=[row.outbox_id])
        if not states.mlflow_status_may_follow(current, wanted):
            note = f"MLflow run was {current}; left so ({wanted} for {row.key} not applied)"
            return self._settled(batch, delivered=[row.outbox_id], notes={row.outbox_id: note})
        try:
            self.transport.set_status(batch.metric_run_id, wanted, row.timestamp_ms)
        except Exception as exc:
            if is_permanent(exc):
                return self._send_failed(batch, exc)
            self._settled(batch, resend=[row.outbox_id], error=_short(exc))
            raise _Transient(_short(exc)) from exc
        return self._settled(batch, delivered=[row.outbox_id])


__all__ = [
    "BATCH_TAG",
    "Flusher",
    "FlushStats",
    "RestTransport",
    "StoreTransport",
    "RunView",
    "is_permanent",
    "FIRST_BACKOFF_SECONDS",
    "MAX_BACKOFF_SECONDS",
    "STALE_CLAIM_SECONDS",
    "REQUEST_TIMEOUT_SECONDS",
]
