"""The metric outbox: rows for MLflow, appended by loggers, claimed and settled by flushers.

The delivery protocol these units implement (the flusher that drives them is
:mod:`rapidfire_state.metric_flusher`):

1. A logger appends rows to its stream (:meth:`MetricOutboxStore.append_metric_rows`);
   nothing else happens on the caller's side.
2. A flusher claims a stream (compare-and-set of ``metric_streams.claim_token``,
   so one batch per stream is in flight at a time, and rows go out in
   ``outbox_id`` order) and, in the same unit, stamps the batch's rows with a
   fresh ``batch_token`` (:meth:`claim_metric_batch`).  The token is committed
   *before* anything is sent.
3. It sends the batch, carrying the token to MLflow in the same ``log_batch``
   as the points (the tag :data:`~rapidfire_state.metric_flusher.BATCH_TAG`,
   which MLflow's stores write after the metrics and parameters of the batch).
4. It settles the batch (:meth:`settle_metric_batch`): delivered, failed for
   good (MLflow refused the row), or to be sent again; and releases the claim.

A row that is pending but carries a ``batch_token`` was sent by a flusher that
did not live to settle it (or whose send failed without an answer): its
outcome is unknown.  The next claim of that stream returns exactly those rows
(``in_doubt``), and the flusher asks MLflow before sending anything again.  A
claim is taken over when its holder's process is gone (this host) or when it is
older than the caller's ``stale_after_seconds`` (any host, by the database clock).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Optional, Sequence

from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from rapidfire_state import states
from rapidfire_state.constants import MetricRowKind
from rapidfire_state.db import schema as tables
from rapidfire_state.db.schema import OUTBOX_PENDING_WHERE, db_now
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.lookups import check_id, optional_str
from rapidfire_state.db.store.processes import HOST, gone_here, own_process
from rapidfire_state.exceptions import ConfigError, DBException
from rapidfire_state.validation import check_name, check_number, check_positive_int

_streams = tables.metric_streams
_outbox = tables.metric_outbox

#: MLflow's limits on one ``log_batch`` (``mlflow.utils.validation``): a batch never
#: exceeds them, so it is one call and one store transaction sequence
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
#: one tag of each batch is the batch token
MAX_ROWS_PER_BATCH = 999
#: candidate streams looked at per claim (oldest pending row first)
_CANDIDATES = 32

_KINDS = frozenset(kind.value for kind in MetricRowKind)

#: claim tokens of the batches this process has in flight (claimed, not settled yet)
_IN_FLIGHT: set[str] = set()


def _abandoned(claim: Any, now: Any, stale_after_seconds: float) -> bool:
    """Whether a stream's claim may be taken over: nobody is delivering under it any more.

    A claim older than ``stale_after_seconds`` (database clock, any host); one
    whose process is gone from this host (a recycled pid is told apart by its
    start time); or one of this very process that no batch is in flight under
    (its settling failed).
    """
    if claim.claimed_at is None or claim.claimed_at < now - timedelta(seconds=stale_after_seconds):
        return True
    if claim.claim_host != HOST:
        return False
    if claim.claim_pid == os.getpid():
        return claim.claim_token not in _IN_FLIGHT
    return gone_here(
        claim.claim_host, claim.claim_pid, claim.claim_process_started_at, claim.claim_process_identity
    ) is not None


def _pending() -> Any:
    return and_(_outbox.c.delivered_at.is_(None), _outbox.c.failed_at.is_(None))


@dataclass(frozen=True)
class OutboxRow:
    """One row of ``metric_outbox`` as a flusher sends it."""

    outbox_id: int
    kind: str
    key: str
    value: Optional[float]
    text_value: Optional[str]
    step: Optional[int]
    timestamp_ms: int


@dataclass(frozen=True)
class MetricBatch:
    """A claimed stream and the rows to deliver now (see the module's protocol).

    ``in_doubt``: the rows were sent before (``batch_token`` is that send's
    token) and nobody knows whether MLflow stored them; ask before sending.
    Otherwise ``batch_token`` was just given to ``rows`` (the same value as
    ``claim_token``).
    """

    stream_id: int
    tracking_uri: str
    metric_run_id: str
    claim_token: str
    batch_token: str
    rows: tuple[OutboxRow, ...]
    in_doubt: bool


#: a metric's NaN is stored as value NULL and this text (SQLite stores a NaN REAL as NULL)
NAN_TEXT = "NaN"


def _row(mapping: Mapping[str, Any]) -> OutboxRow:
    value = mapping["value"]
    if value is None and mapping["kind"] == MetricRowKind.METRIC.value:
        value = float("nan")
    return OutboxRow(
        outbox_id=int(mapping["outbox_id"]), kind=mapping["kind"], key=mapping["key"], value=value,
        text_value=mapping["text_value"], step=mapping["step"], timestamp_ms=int(mapping["timestamp_ms"]),
    )


def next_batch(rows: Sequence[OutboxRow], limit: int) -> list[OutboxRow]:
    """The longest prefix of ``rows`` that is one MLflow call, at most ``limit`` rows.

    A STATUS row is a call of its own (a run update, not ``log_batch``): a batch
    is either one STATUS row or metrics, params and tags up to the next one,
    within MLflow's per-call limits.
    """
    if not rows:
        return []
    if rows[0].kind == MetricRowKind.STATUS.value:
        return [rows[0]]
    batch: list[OutboxRow] = []
    params = tags = 0
    for row in rows:
        if row.kind == MetricRowKind.STATUS.value or len(batch) >= limit:
            break
        if row.kind == MetricRowKind.PARAM.value:
            if params >= MAX_PARAMS_TAGS_PER_BATCH:
                break
            params += 1
        elif row.kind == MetricRowKind.TAG.value:
            if tags >= MAX_PARAMS_TAGS_PER_BATCH - 1:  # the batch token is a tag too
                break
            tags += 1
        batch.append(row)
    return batch


_ROW_COLUMNS = (
    _outbox.c.outbox_id, _outbox.c.kind, _outbox.c.key, _outbox.c.value, _outbox.c.text_value,
    _outbox.c.step, _outbox.c.timestamp_ms,
)

class MetricOutboxStore(StoreCore):
    """Units of work on ``metric_streams`` and ``metric_outbox``."""

    # --- streams --------------------------------------------------------------------

    def metric_stream(
        self,
        tracking_uri: str,
        metric_run_id: str,
        *,
        run_id: Optional[int] = None,
        experiment_id: Optional[int] = None,
        mirror_status: bool = False,
    ) -> int:
        """The stream id of MLflow run ``metric_run_id`` in ``tracking_uri``, created if needed.

        ``run_id``/``experiment_id`` link it to the RapidFire run it tracks; when
        not given they are taken from the run whose ``metric_run_id`` it is, if
        any.  A link once made is kept (a later call without one leaves it).

        From the unit that links a stream to a run on, every status change of
        the run appends its MLflow status to the stream.  With ``mirror_status``
        that unit also appends the run's current status (unless a new MLflow
        run already shows it: RUNNING, or SCHEDULED for NEW, which MLflow cannot
        create), reading it under the run's row lock
        so that no change of the run falls between the two.
        """
        tracking_uri = check_name("tracking_uri", tracking_uri)
        metric_run_id = check_name("metric_run_id", metric_run_id, max_length=64)
        if run_id is not None:
            check_id("run_id", run_id)
        if experiment_id is not None:
            check_id("experiment_id", experiment_id)

        def unit(conn: Connection) -> int:
            found = conn.execute(
                select(_streams.c.stream_id, _streams.c.run_id, _streams.c.experiment_id).where(
                    _streams.c.tracking_uri == tracking_uri, _streams.c.metric_run_id == metric_run_id
                )
            ).first()
            link_run, link_experiment = run_id, experiment_id
            if link_run is not None:
                owner_experiment = conn.execute(
                    select(tables.runs.c.experiment_id).where(tables.runs.c.run_id == link_run)
                ).scalar()
                if owner_experiment is None:
                    raise DBException(f"run_id={link_run} does not exist; cannot link metric run {metric_run_id!r} to it")
                if link_experiment is not None and link_experiment != owner_experiment:
                    raise ConfigError(
                        f"experiment_id={link_experiment} does not hold run_id={link_run} (its experiment is "
                        f"{owner_experiment}); give the run's experiment or none"
                    )
                link_experiment = owner_experiment
            if link_run is None:
                owner = conn.execute(
                    select(tables.runs.c.run_id, tables.runs.c.experiment_id).where(
                        tables.runs.c.metric_run_id == metric_run_id
                    ).order_by(tables.runs.c.run_id).limit(1)
                ).first()
                if owner is not None:
                    link_run, link_experiment = owner.run_id, link_experiment or owner.experiment_id
            if found is not None:
                values = {}
                if found.run_id is None and link_run is not None:
                    values["run_id"] = link_run
                if found.experiment_id is None and link_experiment is not None:
                    values["experiment_id"] = link_experiment
                if values:
                    conn.execute(update(_streams).where(_streams.c.stream_id == found.stream_id).values(**values))
                stream_id = int(found.stream_id)
                linked_now = "run_id" in values
            else:
                stream_id = int(
                    conn.execute(
                        insert(_streams)
                        .values(tracking_uri=tracking_uri, metric_run_id=metric_run_id, run_id=link_run,
                                experiment_id=link_experiment)
                        .returning(_streams.c.stream_id)
                    ).scalar_one()
                )
                linked_now = link_run is not None
            if mirror_status and linked_now:
                _mirror_current_status(conn, stream_id, link_run)
            return stream_id

        # two processes creating one stream: the loser's unit runs again and finds it
        return self._write(unit, retry_on_unique=True)

    def find_metric_stream(self, tracking_uri: str, metric_run_id: str) -> Optional[int]:
        """The stream id of ``metric_run_id`` in ``tracking_uri``, or None (never creates)."""
        return self._read(
            lambda conn: conn.execute(
                select(_streams.c.stream_id).where(
                    _streams.c.tracking_uri == tracking_uri, _streams.c.metric_run_id == metric_run_id
                )
            ).scalar()
        )

    # --- appending --------------------------------------------------------------------

    def append_metric_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append ``rows`` (``stream_id``, ``kind``, ``key``, ``timestamp_ms`` and the kind's
        ``value``/``text_value``/``step``) to the outbox, all in one unit.

        The caller (:class:`~rapidfire_state.metric_manager.MLflowManager`) has
        validated and sanitised them; the database's CHECK refuses an unknown kind.
        """
        if not rows:
            return
        full = []
        for row in rows:
            if row["kind"] not in _KINDS:
                raise ConfigError(f"kind={row['kind']!r} is not a metric row kind; allowed: {', '.join(sorted(_KINDS))}")
            values = {f"rf_{name}": row.get(name) for name in _APPENDED}
            number = values["rf_value"]
            if number is not None and number != number:  # NaN
                values["rf_value"], values["rf_text_value"] = None, NAN_TEXT
            full.append(values)
        writer = self._prepared_writer
        if writer is not None:
            # a logger waits for the write lock in short steps (a flusher's unit is short)
            writer.insert_rows(writer.prepare(_INSERT_ROW), full, prompt=True)
        else:
            self._write(lambda conn: conn.execute(_INSERT_ROW, full))

    # --- claiming and settling ------------------------------------------------------------

    def claim_metric_batch(
        self,
        tracking_uri: str,
        *,
        limit: int = MAX_ROWS_PER_BATCH,
        stale_after_seconds: float = 300.0,
        limits: Mapping[int, int] = {},  # noqa: B006  (read only)
        skip: Sequence[int] = (),
    ) -> Optional[MetricBatch]:
        """Claim the stream of ``tracking_uri`` with the oldest pending row, and its next batch.

        ``limits`` caps the batch size of given streams (a flusher isolating a row
        MLflow refused sends one at a time); ``skip`` names streams not to claim
        now.  Returns None when every stream with pending rows is claimed by a
        live holder (or skipped), or there are none.
        """
        limit = min(check_positive_int("limit", limit), MAX_ROWS_PER_BATCH)
        stale = check_number("stale_after_seconds", stale_after_seconds)
        skipped = frozenset(skip)

        pid, started, identity = own_process()

        def unit(conn: Connection) -> Optional[MetricBatch]:
            now = conn.execute(select(db_now())).scalar_one()
            # a claim of another host is judged by its age alone, so a live one is left
            # out here; this host's claims are judged below by their process
            claimable = or_(
                _streams.c.claim_token.is_(None),
                _streams.c.claimed_at < now - timedelta(seconds=stale),
                _streams.c.claim_host == HOST,
            )
            # each stream's oldest pending row, found in the partial index: the cost
            # is the number of streams, not the backlog (a GROUP BY over the pending
            # rows took 71 ms at 300k of them, with the write lock held)
            first_pending = (
                select(func.min(_outbox.c.outbox_id))
                .where(_outbox.c.stream_id == _streams.c.stream_id, _pending())
                .correlate(_streams)
                .scalar_subquery()
                .label("first_pending")
            )
            ranked = (
                select(
                    _streams.c.stream_id, _streams.c.metric_run_id, _streams.c.claim_token, _streams.c.claim_pid,
                    _streams.c.claim_host, _streams.c.claim_process_started_at, _streams.c.claim_process_identity,
                    _streams.c.claimed_at, first_pending,
                )
                .where(_streams.c.tracking_uri == tracking_uri, claimable)
                .subquery()
            )
            candidates = conn.execute(
                select(ranked)
                .where(ranked.c.first_pending.is_not(None))
                .order_by(ranked.c.first_pending)
                .limit(_CANDIDATES + len(skipped))
            ).all()
            if not candidates:
                return None
            for candidate in candidates:
                if candidate.stream_id in skipped:
                    continue
                if candidate.claim_token is not None:
                    if not _abandoned(candidate, now, stale):
                        continue  # a live flusher has a batch of it in flight
                token = uuid.uuid4().hex
                taken = conn.execute(
                    update(_streams)
                    .where(
                        _streams.c.stream_id == candidate.stream_id,
                        _streams.c.claim_token.is_(None) if candidate.claim_token is None
                        else _streams.c.claim_token == candidate.claim_token,
                    )
                    .values(claim_token=token, claim_pid=pid, claim_host=HOST, claim_process_started_at=started,
                            claim_process_identity=identity, claimed_at=db_now())
                ).rowcount
                if taken != 1:
                    continue  # another flusher took it first
                _IN_FLIGHT.add(token)
                return _batch_of(conn, candidate, tracking_uri, token, limits.get(candidate.stream_id, limit))
            return None

        return self._write(unit)

    def settle_metric_batch(
        self,
        batch: MetricBatch,
        *,
        delivered: Sequence[int] = (),
        failed: Mapping[int, str] = {},  # noqa: B006  (read only)
        resend: Sequence[int] = (),
        notes: Mapping[int, str] = {},  # noqa: B006  (read only)
        error: Optional[str] = None,
    ) -> bool:
        """Record what became of ``batch``'s rows and release its stream, in one unit.

        ``delivered``: MLflow has them (``notes`` may say why a delivered status
        row changed nothing); ``failed``: MLflow refused them for good (the
        message is kept in ``error``); ``resend``: known not to be stored, sent
        again by the next claim.  Rows named nowhere stay in doubt (their
        token is kept).  ``error`` is kept on the stream as its last error.
        Returns False when the claim had been taken over meanwhile (the rows'
        outcome is recorded anyway: it is what happened).
        """
        optional_str("error", error)

        def unit(conn: Connection) -> bool:
            pending = [_outbox.c.stream_id == batch.stream_id, _pending()]
            for ids in _chunks(list(delivered)):
                plain = [i for i in ids if i not in notes]
                if plain:
                    conn.execute(update(_outbox).where(_outbox.c.outbox_id.in_(plain), *pending).values(delivered_at=db_now()))
            for outbox_id, note in notes.items():
                conn.execute(
                    update(_outbox).where(_outbox.c.outbox_id == outbox_id, *pending).values(delivered_at=db_now(), error=note)
                )
            for outbox_id, message in failed.items():
                conn.execute(
                    update(_outbox).where(_outbox.c.outbox_id == outbox_id, *pending).values(failed_at=db_now(), error=message)
                )
            for ids in _chunks(list(resend)):
                conn.execute(update(_outbox).where(_outbox.c.outbox_id.in_(ids), *pending).values(batch_token=None))
            released = conn.execute(
                update(_streams)
                .where(_streams.c.stream_id == batch.stream_id, _streams.c.claim_token == batch.claim_token)
                .values(claim_token=None, claim_pid=None, claim_host=None, claim_process_started_at=None,
                        claim_process_identity=None, claimed_at=None, last_error=error)
            ).rowcount
            return released == 1

        try:
            return self._write(unit)
        finally:
            # settled or not, this process has no batch in flight under the claim any
            # more: should the unit have failed, the claim is free for the next pass
            _IN_FLIGHT.discard(batch.claim_token)

    # --- reading ------------------------------------------------------------------------------

    def pending_metric_rows(
        self,
        *,
        tracking_uri: Optional[str] = None,
        metric_run_id: Optional[str] = None,
        experiment_id: Optional[int] = None,
        run_id: Optional[int] = None,
    ) -> int:
        """How many outbox rows are not delivered yet (nor failed), optionally of one store/run/experiment."""
        conditions = [_pending()]
        if tracking_uri is not None:
            conditions.append(_streams.c.tracking_uri == tracking_uri)
        if metric_run_id is not None:
            conditions.append(_streams.c.metric_run_id == metric_run_id)
        if experiment_id is not None:
            conditions.append(_streams.c.experiment_id == check_id("experiment_id", experiment_id))
        if run_id is not None:
            conditions.append(_streams.c.run_id == check_id("run_id", run_id))
        statement = (
            select(func.count())
            .select_from(_outbox.join(_streams, _streams.c.stream_id == _outbox.c.stream_id))
            .where(*conditions)
        )
        return int(self._read(lambda conn: conn.execute(statement).scalar_one()))

    def list_metric_streams(self, *, experiment_id: Optional[int] = None, every: bool = False) -> list[dict[str, Any]]:
        """One row per MLflow run of the outbox (a stream) with its pending count, in experiment/run order.

        Only streams with pending rows unless ``every``.  Only pending rows are
        joined, so the cost follows the backlog (the partial index), not the
        delivered history.  ``claimed_by`` is ``host:pid`` of the claim, or None.
        """
        pending = func.count(_outbox.c.outbox_id)
        listed = (
            _streams.c.experiment_id, _streams.c.run_id, _streams.c.tracking_uri, _streams.c.metric_run_id,
            _streams.c.claim_host, _streams.c.claim_pid, _streams.c.claimed_at, _streams.c.last_error,
        )
        statement = (
            select(_streams.c.stream_id, *listed, pending.label("pending"))
            .select_from(_streams.outerjoin(_outbox, and_(_outbox.c.stream_id == _streams.c.stream_id, _pending())))
            .group_by(_streams.c.stream_id, *listed)
            # NULLs last on both backends: runs of no experiment after the others
            .order_by(_streams.c.experiment_id.is_(None), _streams.c.experiment_id, _streams.c.run_id.is_(None),
                      _streams.c.run_id, _streams.c.stream_id)
        )
        if experiment_id is not None:
            statement = statement.where(_streams.c.experiment_id == check_id("experiment_id", experiment_id))
        if not every:
            statement = statement.having(pending > 0)
        found = [dict(row) for row in self._read(lambda conn: conn.execute(statement).mappings().all())]
        for row in found:
            row["claimed_by"] = f"{row['claim_host']}:{row['claim_pid']}" if row["claim_host"] else None
        return found

    def pending_metric_rows_by_experiment(self) -> dict[Optional[int], int]:
        """Undelivered outbox rows per experiment id (None: streams not linked to one)."""
        statement = (
            select(_streams.c.experiment_id, func.count())
            .select_from(_outbox.join(_streams, _streams.c.stream_id == _outbox.c.stream_id))
            .where(_pending())
            .group_by(_streams.c.experiment_id)
        )
        return {row[0]: int(row[1]) for row in self._read(lambda conn: conn.execute(statement).all())}

    def failed_metric_rows(self, *, tracking_uri: Optional[str] = None, limit: int = 100) -> list[dict[str, Any]]:
        """Rows MLflow refused for good, newest first: each with its stream's MLflow run and the error."""
        check_positive_int("limit", limit)
        statement = (
            select(*_ROW_COLUMNS, _outbox.c.error, _streams.c.metric_run_id, _streams.c.tracking_uri)
            .select_from(_outbox.join(_streams, _streams.c.stream_id == _outbox.c.stream_id))
            .where(_outbox.c.failed_at.is_not(None))
            .order_by(_outbox.c.outbox_id.desc())
            .limit(limit)
        )
        if tracking_uri is not None:
            statement = statement.where(_streams.c.tracking_uri == tracking_uri)
        found = [dict(row) for row in self._read(lambda conn: conn.execute(statement).mappings().all())]
        for row in found:
            if row["kind"] == MetricRowKind.METRIC.value and row["value"] is None:
                row["value"] = float("nan")
        return found

    def metric_param_value(self, stream_id: int, key: str) -> Optional[str]:
        """The value parameter ``key`` was first logged with on ``stream_id`` (not failed), or None."""
        statement = (
            select(_outbox.c.text_value)
            .where(
                _outbox.c.stream_id == stream_id, _outbox.c.kind == MetricRowKind.PARAM.value,
                _outbox.c.key == key, _outbox.c.failed_at.is_(None),
            )
            .order_by(_outbox.c.outbox_id)
            .limit(1)
        )
        return self._read(lambda conn: conn.execute(statement).scalar())


_APPENDED = ("stream_id", "kind", "key", "value", "text_value", "step", "timestamp_ms")
#: the append of one row: every datum a bound parameter, so the prepared path runs it as is
_INSERT_ROW = insert(_outbox).values(
    **{name: bindparam(f"rf_{name}") for name in _APPENDED}, created_at=db_now()
)


#: MLflow statuses a new MLflow run needs no row for: MLflow creates runs RUNNING, and
#: cannot create one SCHEDULED (a NEW run shows RUNNING until it moves on)
_SHOWN_AT_CREATION = frozenset({"RUNNING", "SCHEDULED"})


def _mirror_current_status(conn: Connection, stream_id: int, run_id: int) -> None:
    # FOR UPDATE (PostgreSQL; SQLite's write lock already serialises): a change of
    # the run waits for this unit, then sees the stream and appends its own status
    status = conn.execute(
        select(tables.runs.c.status).where(tables.runs.c.run_id == run_id).with_for_update()
    ).scalar_one()
    mlflow_status = states.MLFLOW_RUN_STATUS[states.coerce_status("run", status)]
    if mlflow_status in _SHOWN_AT_CREATION:
        return
    conn.execute(
        _INSERT_ROW,
        {"rf_stream_id": stream_id, "rf_kind": MetricRowKind.STATUS.value, "rf_key": status,
         "rf_value": None, "rf_text_value": mlflow_status, "rf_step": None,
         "rf_timestamp_ms": int(time.time() * 1000)},
    )


def _chunks(ids: list[int], size: int = 500) -> list[list[int]]:
    return [ids[start:start + size] for start in range(0, len(ids), size)]


def _batch_of(conn: Connection, stream: Any, tracking_uri: str, token: str, limit: int) -> MetricBatch:
    """The rows of a just-claimed stream to deliver: the unsettled batch first, else the next one."""
    # an unsettled batch is always the head of its stream's pending rows (batches go
    # out in order, one at a time), and at most one batch long
    head = conn.execute(
        select(*_ROW_COLUMNS, _outbox.c.batch_token)
        .where(_outbox.c.stream_id == stream.stream_id, _pending())
        .order_by(_outbox.c.outbox_id)
        .limit(max(limit, MAX_ROWS_PER_BATCH))
    ).mappings().all()
    in_doubt = [row for row in head if row["batch_token"] is not None]
    if in_doubt:
        # one batch is in flight per stream at a time, so these share one token;
        # should two ever be found, the older batch is resolved first
        first_token = in_doubt[0]["batch_token"]
        rows = tuple(_row(r) for r in in_doubt if r["batch_token"] == first_token)
        return MetricBatch(stream.stream_id, tracking_uri, stream.metric_run_id, token, first_token, rows, True)
    rows = tuple(next_batch([_row(r) for r in head[:limit]], limit))
    ids = [row.outbox_id for row in rows]
    for chunk in _chunks(ids):
        conn.execute(update(_outbox).where(_outbox.c.outbox_id.in_(chunk)).values(batch_token=token))
    return MetricBatch(stream.stream_id, tracking_uri, stream.metric_run_id, token, token, rows, False)


__all__ = [
    "MetricOutboxStore",
    "MetricBatch",
    "OutboxRow",
    "next_batch",
    "MAX_ROWS_PER_BATCH",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_TAGS_PER_BATCH",
    "OUTBOX_PENDING_WHERE",
]
