"""The metric outbox's store units on every backend (``db/store/metric_outbox.py``),
and the run-status hook that feeds it (``db/store/status_change.py``).

Covers: streams (creation, links, ``mirror_status``); appends, refusals, and the
database's own CHECK; claim and settle (round trip, mutual exclusion of claims,
takeover from a dead process and of a stale claim from another host, in-doubt
rows, settle after a takeover); how batches are cut (STATUS alone, MLflow's
per-call limits, ``limit``/``limits``); pending and failed counts; and one STATUS
row per recorded run change of a linked run, single or bulk (cleanup), none for
an unlinked run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select, text, update

from rapidfire_state import StateDB
from rapidfire_state.db import schema as tables
from rapidfire_state.db.store.metric_outbox import (
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_ROWS_PER_BATCH,
    MetricBatch,
)
from rapidfire_state.db.store.processes import HOST
from rapidfire_state.exceptions import ConfigError, DBException, InvalidTransitionError

URI = "file:///tmp/rf-test-mlruns"
OTHER_URI = "http://127.0.0.1:5999"
REPO = Path(__file__).resolve().parents[1]


# --- helpers ----------------------------------------------------------------------------


def metric_rows(stream_id: int, count: int, *, key: str = "loss", start: int = 0) -> list[dict]:
    return [
        {"stream_id": stream_id, "kind": "METRIC", "key": key, "value": float(step) / 10, "step": step,
         "timestamp_ms": 1_700_000_000_000 + step}
        for step in range(start, start + count)
    ]


def text_rows(stream_id: int, kind: str, count: int) -> list[dict]:
    return [
        {"stream_id": stream_id, "kind": kind, "key": f"{kind.lower()}_{i}", "text_value": str(i),
         "timestamp_ms": 1_700_000_000_000 + i}
        for i in range(count)
    ]


def status_row(stream_id: int, run_status: str, mlflow_status: str) -> dict:
    return {"stream_id": stream_id, "kind": "STATUS", "key": run_status, "text_value": mlflow_status,
            "timestamp_ms": 1_700_000_000_000}


def outbox(db: StateDB, stream_id: int | None = None) -> list[dict]:
    """Every outbox row (of one stream), in delivery order."""
    statement = select(tables.metric_outbox).order_by(tables.metric_outbox.c.outbox_id)
    if stream_id is not None:
        statement = statement.where(tables.metric_outbox.c.stream_id == stream_id)
    with db.engine.connect() as connection:
        return [dict(row) for row in connection.execute(statement).mappings()]


def stream_row(db: StateDB, stream_id: int) -> dict:
    with db.engine.connect() as connection:
        return dict(connection.execute(
            select(tables.metric_streams).where(tables.metric_streams.c.stream_id == stream_id)
        ).mappings().one())


def set_stream(db: StateDB, stream_id: int, **values) -> None:
    """Rewrite a stream's columns as another process or host would have left them."""
    with db.engine.begin() as connection:
        connection.execute(update(tables.metric_streams).where(tables.metric_streams.c.stream_id == stream_id)
                           .values(**values))


def status_rows(db: StateDB, stream_id: int) -> list[tuple[str, str]]:
    """``(run status, MLflow status)`` of a stream's STATUS rows, in order."""
    return [(r["key"], r["text_value"]) for r in outbox(db, stream_id) if r["kind"] == "STATUS"]


def ids(batch: MetricBatch) -> list[int]:
    return [row.outbox_id for row in batch.rows]


def deliver(db: StateDB, batch: MetricBatch) -> None:
    assert db.settle_metric_batch(batch, delivered=ids(batch)) is True


def drain(db: StateDB, uri: str = URI, **claim) -> list[list[tuple[str, str]]]:
    """Claim and deliver until nothing is pending: each batch as its ``(kind, key)`` pairs."""
    batches = []
    while (batch := db.claim_metric_batch(uri, **claim)) is not None:
        assert not batch.in_doubt
        batches.append([(row.kind, row.key) for row in batch.rows])
        deliver(db, batch)
        assert len(batches) < 100, "the outbox never drained"
    return batches


@pytest.fixture
def linked(db, experiment):
    """A NEW run of a RUNNING experiment and the stream of its MLflow run."""
    run = db.create_run(experiment.experiment_id, {"lr": 0.1})
    stream_id = db.metric_stream(URI, "mlflowrun1", run_id=run.run_id)
    return run, stream_id


# --- streams ------------------------------------------------------------------------------


def test_a_stream_is_made_once_and_keeps_its_first_link(db, experiment):
    run = db.create_run(experiment.experiment_id, {})
    unlinked = db.metric_stream(URI, "loose")
    assert db.metric_stream(URI, "loose") == unlinked == db.find_metric_stream(URI, "loose")
    assert (stream_row(db, unlinked)["run_id"], stream_row(db, unlinked)["experiment_id"]) == (None, None)
    # a later link is made, the experiment is taken from the run, and a call without one keeps it
    assert db.metric_stream(URI, "loose", run_id=run.run_id) == unlinked
    assert db.metric_stream(URI, "loose") == unlinked
    row = stream_row(db, unlinked)
    assert (row["run_id"], row["experiment_id"]) == (run.run_id, experiment.experiment_id)
    # one MLflow run id in two tracking stores: two streams
    assert db.metric_stream(OTHER_URI, "loose") != unlinked
    assert db.find_metric_stream(OTHER_URI, "never-made") is None


def test_a_stream_is_linked_to_the_run_whose_metric_run_id_it_is(db, experiment):
    run = db.create_run(experiment.experiment_id, {})
    db.set_metric_run_id(run.run_id, "abc123")
    row = stream_row(db, db.metric_stream(URI, "abc123"))
    assert (row["run_id"], row["experiment_id"]) == (run.run_id, experiment.experiment_id)


def test_concurrent_creation_of_one_stream_makes_one_row(db):
    barrier = threading.Barrier(4)
    found: list = []

    def make() -> None:
        barrier.wait(timeout=30)
        found.append(db.metric_stream(URI, "raced"))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(found) == 4 and len(set(found)) == 1
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM metric_streams")).scalar() == 1


def test_mirror_status_appends_what_a_new_mlflow_run_cannot_show(db, experiment):
    new = db.create_run(experiment.experiment_id, {})
    ongoing = db.create_run(experiment.experiment_id, {})
    db.transition_run(ongoing.run_id, "ONGOING")
    stopped = db.create_run(experiment.experiment_id, {})
    db.transition_run(stopped.run_id, "ONGOING")
    db.transition_run(stopped.run_id, "STOPPED")
    shown = {
        run.run_id: status_rows(db, db.metric_stream(URI, f"m{run.run_id}", run_id=run.run_id, mirror_status=True))
        for run in (new, ongoing, stopped)
    }
    # NEW shows as a fresh MLflow run (RUNNING), ONGOING is RUNNING: nothing to send
    assert shown == {new.run_id: [], ongoing.run_id: [], stopped.run_id: [("STOPPED", "KILLED")]}
    # only the unit that makes the link mirrors: asking again appends nothing
    again = db.metric_stream(URI, f"m{stopped.run_id}", run_id=stopped.run_id, mirror_status=True)
    assert status_rows(db, again) == [("STOPPED", "KILLED")]


# --- appending and refusing ----------------------------------------------------------------


def test_rows_are_appended_in_order_with_every_column(db, linked):
    _, stream_id = linked
    db.append_metric_rows(metric_rows(stream_id, 3) + text_rows(stream_id, "PARAM", 1) + text_rows(stream_id, "TAG", 1))
    rows = outbox(db, stream_id)
    assert [(r["kind"], r["key"], r["value"], r["text_value"], r["step"]) for r in rows] == [
        ("METRIC", "loss", 0.0, None, 0), ("METRIC", "loss", 0.1, None, 1), ("METRIC", "loss", 0.2, None, 2),
        ("PARAM", "param_0", None, "0", None), ("TAG", "tag_0", None, "0", None),
    ]
    assert [r["timestamp_ms"] for r in rows[:3]] == [1_700_000_000_000 + i for i in range(3)]
    assert all(r["batch_token"] is None and r["delivered_at"] is None and r["failed_at"] is None for r in rows)
    assert [r["outbox_id"] for r in rows] == sorted(r["outbox_id"] for r in rows)
    db.append_metric_rows([])  # nothing to do
    assert len(outbox(db)) == 5


def test_a_kind_that_is_not_allowed_is_refused_naming_it_and_nothing_is_appended(db, linked):
    _, stream_id = linked
    bogus = {"stream_id": stream_id, "kind": "ARTIFACT", "key": "k", "timestamp_ms": 1}
    with pytest.raises(ConfigError) as info:
        db.append_metric_rows(metric_rows(stream_id, 2) + [bogus])
    message = str(info.value)
    assert "'ARTIFACT'" in message and all(kind in message for kind in ("METRIC", "PARAM", "TAG", "STATUS"))
    with pytest.raises(ConfigError, match="'metric'"):  # the exact value, not its upper case
        db.append_metric_rows([dict(bogus, kind="metric")])
    assert outbox(db) == []


def test_rows_the_schema_refuses_are_one_db_exception_and_nothing_is_appended(db, linked):
    _, stream_id = linked
    with pytest.raises(DBException, match="(?i)foreign key"):
        db.append_metric_rows(metric_rows(stream_id, 1) + metric_rows(424242, 1))
    missing_time = dict(metric_rows(stream_id, 1)[0], timestamp_ms=None)
    with pytest.raises(DBException, match="timestamp_ms"):
        db.append_metric_rows(metric_rows(stream_id, 1) + [missing_time])
    assert outbox(db) == []


def test_the_database_itself_refuses_an_unknown_kind(db, linked):
    _, stream_id = linked
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError, match="ck_metric_outbox_kind|CHECK constraint failed"):
        with db.engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO metric_outbox (stream_id, kind, key, timestamp_ms) VALUES (:s, 'BLOB', 'k', 1)"
            ), {"s": stream_id})
    assert outbox(db) == []


@pytest.mark.parametrize("call, needle", [
    (lambda db: db.metric_stream("", "m"), "tracking_uri=''"),
    (lambda db: db.metric_stream(URI, "x" * 65), "at most 64"),
    (lambda db: db.metric_stream(URI, "m", run_id=-1), "run_id=-1"),
    (lambda db: db.claim_metric_batch(URI, limit=0), "limit=0"),
    (lambda db: db.claim_metric_batch(URI, stale_after_seconds=float("nan")), "stale_after_seconds=nan"),
    (lambda db: db.pending_metric_rows(experiment_id=-1), "experiment_id=-1"),
    (lambda db: db.failed_metric_rows(limit=0), "limit=0"),
])
def test_bad_arguments_are_config_errors_naming_the_value(db, call, needle):
    with pytest.raises(ConfigError) as info:
        call(db)
    assert needle in str(info.value)
    assert outbox(db) == []


def test_linking_to_a_missing_run_is_refused_and_makes_no_stream(db):
    with pytest.raises(DBException, match="run_id=999 does not exist"):
        db.metric_stream(URI, "m", run_id=999)
    assert db.find_metric_stream(URI, "m") is None


# --- claim and settle ----------------------------------------------------------------------


def test_claim_and_settle_round_trip(db, linked):
    _, stream_id = linked
    db.append_metric_rows(metric_rows(stream_id, 5))
    assert db.claim_metric_batch(OTHER_URI) is None  # another tracking store has nothing
    batch = db.claim_metric_batch(URI)
    assert batch is not None and not batch.in_doubt
    assert (batch.stream_id, batch.tracking_uri, batch.metric_run_id) == (stream_id, URI, "mlflowrun1")
    assert batch.batch_token == batch.claim_token and len(batch.claim_token) == 32
    assert [row.step for row in batch.rows] == [0, 1, 2, 3, 4]
    assert [row.value for row in batch.rows] == [0.0, 0.1, 0.2, 0.3, 0.4]
    # the claim and the batch's token are committed before anything is sent
    claim = stream_row(db, stream_id)
    assert (claim["claim_token"], claim["claim_pid"]) == (batch.claim_token, os.getpid())
    assert claim["claim_host"] and claim["claimed_at"] is not None
    assert {r["batch_token"] for r in outbox(db, stream_id)} == {batch.batch_token}
    assert db.pending_metric_rows() == 5  # claimed is not delivered

    assert db.settle_metric_batch(batch, delivered=ids(batch)) is True
    assert db.pending_metric_rows() == 0
    rows = outbox(db, stream_id)
    assert all(r["delivered_at"] is not None and r["failed_at"] is None for r in rows)
    assert {r["batch_token"] for r in rows} == {batch.batch_token}  # kept after delivery
    released = stream_row(db, stream_id)
    assert [released[c] for c in ("claim_token", "claim_pid", "claim_host", "claimed_at", "last_error")] == [None] * 5
    assert db.claim_metric_batch(URI) is None
    # settling twice changes nothing: the rows are no longer pending, the claim is gone
    assert db.settle_metric_batch(batch, failed={ids(batch)[0]: "late"}) is False
    assert db.failed_metric_rows() == []


def test_two_claims_of_one_stream_exclude_each_other(db, linked, experiment):
    _, stream_id = linked
    db.append_metric_rows(metric_rows(stream_id, 3))
    first = db.claim_metric_batch(URI)
    assert first is not None
    other = StateDB(db.url.render_as_string(hide_password=False))  # as another flusher would
    try:
        assert other.claim_metric_batch(URI) is None  # held by a live process (this one)
        assert db.claim_metric_batch(URI) is None
        # rows appended meanwhile wait for the holder too
        db.append_metric_rows(metric_rows(stream_id, 2, start=3))
        assert other.claim_metric_batch(URI) is None
        # a second stream with pending rows is free: the other flusher takes that one
        second_stream = db.metric_stream(URI, "mlflowrun2")
        db.append_metric_rows(metric_rows(second_stream, 1))
        second = other.claim_metric_batch(URI)
        assert second is not None and second.stream_id == second_stream
        deliver(other, second)
        deliver(db, first)
        following = other.claim_metric_batch(URI)
        assert following is not None and following.stream_id == stream_id
        assert [row.step for row in following.rows] == [3, 4]
        deliver(other, following)
    finally:
        other.close()
    assert db.pending_metric_rows() == 0


def test_simultaneous_claims_give_one_stream_to_one_claimer(db, linked):
    _, stream_id = linked
    db.append_metric_rows(metric_rows(stream_id, 10))
    barrier = threading.Barrier(4)
    results: list = []
    errors: list = []

    def claim() -> None:
        try:
            barrier.wait(timeout=30)
            results.append(db.claim_metric_batch(URI))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    won = [batch for batch in results if batch is not None]
    assert len(results) == 4 and len(won) == 1
    assert [row.step for row in won[0].rows] == list(range(10))
    assert stream_row(db, stream_id)["claim_token"] == won[0].claim_token


_CHILD_CLAIM = """
import json, os, sys
from rapidfire_state import StateDB
db = StateDB(sys.argv[1])
batch = db.claim_metric_batch(sys.argv[2])
print(json.dumps({"pid": os.getpid(), "token": batch.batch_token, "ids": [r.outbox_id for r in batch.rows]}), flush=True)
sys.stdin.readline()  # hold the claim until told to go; then exit without settling
os._exit(0)
"""


@contextlib.contextmanager
def child_holding_a_claim(db: StateDB) -> Iterator[tuple[subprocess.Popen, dict]]:
    """A real process that claimed a batch of ``URI`` and holds it until told to go (or killed)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_CLAIM, db.url.render_as_string(hide_password=False), URI],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        yield child, json.loads(line)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_claim_held_by_a_process_that_died_is_taken_over_with_its_rows_in_doubt(db, linked):
    _, stream_id = linked
    db.append_metric_rows(metric_rows(stream_id, 4))
    with child_holding_a_claim(db) as (child, sent):
        held = stream_row(db, stream_id)
        assert (held["claim_pid"], held["claim_token"]) == (sent["pid"], sent["token"])
        # alive: its claim is respected, however old a stale limit would call it later
        assert db.claim_metric_batch(URI) is None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    # dead, on this host: taken over at once, long before the stale limit
    batch = db.claim_metric_batch(URI, stale_after_seconds=3600)
    assert batch is not None and batch.in_doubt
    assert batch.batch_token == sent["token"] != batch.claim_token
    assert ids(batch) == sent["ids"]
    assert stream_row(db, stream_id)["claim_pid"] == os.getpid()
    # the flusher found them stored: delivered; the next claim has nothing in doubt
    deliver(db, batch)
    assert db.claim_metric_batch(URI) is None and db.pending_metric_rows() == 0


def test_a_live_claimer_is_told_from_a_recycled_pid_by_its_identity_not_its_start_time(db, linked):
    """A clock step leaves the claim's recorded start time an hour off: the claim is still respected."""
    from rapidfire_state.db.store.processes import process_identity

    _, stream_id = linked
    db.append_metric_rows(metric_rows(stream_id, 2))
    with child_holding_a_claim(db) as (child, _):
        held = stream_row(db, stream_id)
        assert held["claim_process_identity"] == process_identity(child.pid)
        set_stream(db, stream_id, claim_process_started_at=held["claim_process_started_at"] - 3600)
        assert db.claim_metric_batch(URI, stale_after_seconds=3600) is None
        # the same pid as another process (another start since boot) left it: taken over
        boot, _, start = held["claim_process_identity"].partition(":")
        set_stream(db, stream_id, claim_process_identity=f"{boot}:{int(start) + 1}")
        taken = db.claim_metric_batch(URI, stale_after_seconds=3600)
        assert taken is not None and taken.in_doubt
        assert stream_row(db, stream_id)["claim_process_identity"] == process_identity(os.getpid())


def test_a_claim_recorded_for_an_exited_pid_is_taken_over(db, linked):
    _, stream_id = linked
    db.append_metric_rows(metric_rows(stream_id, 2))
    batch = db.claim_metric_batch(URI)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait(timeout=60)
    set_stream(db, stream_id, claim_pid=exited.pid)
    taken = db.claim_metric_batch(URI)
    assert taken is not None and taken.in_doubt and taken.batch_token == batch.batch_token
    assert ids(taken) == ids(batch)


def _make_foreign_and_old(db: StateDB, stream_id: int, *, age: timedelta) -> None:
    """The stream's claim as a flusher on another host left it, ``age`` ago by the database clock."""
    set_stream(db, stream_id, claim_host="elsewhere.example", claim_pid=1, claimed_at=db.now() - age)


def test_a_stale_claim_from_another_host_is_taken_over_and_a_recent_one_is_not(db, linked):
    _, stream_id = linked
    db.append_metric_rows(metric_rows(stream_id, 3))
    lost = db.claim_metric_batch(URI)
    # another host's pid means nothing here: only the age of the claim can free it
    _make_foreign_and_old(db, stream_id, age=timedelta(seconds=5))
    assert db.claim_metric_batch(URI, stale_after_seconds=300) is None
    _make_foreign_and_old(db, stream_id, age=timedelta(hours=2))
    assert db.claim_metric_batch(URI, stale_after_seconds=7300) is None  # younger than the caller's limit
    taken = db.claim_metric_batch(URI, stale_after_seconds=300)
    assert taken is not None and taken.in_doubt
    assert taken.batch_token == lost.batch_token and taken.claim_token != lost.claim_token
    assert ids(taken) == ids(lost)
    claim = stream_row(db, stream_id)
    assert (claim["claim_token"], claim["claim_pid"], claim["claim_host"]) == (taken.claim_token, os.getpid(), HOST)


def test_settle_after_a_takeover_returns_false_and_records_the_outcome(db, linked):
    _, stream_id = linked
    db.append_metric_rows(metric_rows(stream_id, 3))
    slow = db.claim_metric_batch(URI)
    _make_foreign_and_old(db, stream_id, age=timedelta(hours=1))
    taker = db.claim_metric_batch(URI, stale_after_seconds=60)
    assert taker is not None and taker.in_doubt and ids(taker) == ids(slow)
    # the slow flusher comes back: what it learned is recorded, but the stream is not its to release
    first, *rest = ids(slow)
    assert db.settle_metric_batch(slow, delivered=[first], error="slow") is False
    assert db.pending_metric_rows() == 2
    claim = stream_row(db, stream_id)
    assert claim["claim_token"] == taker.claim_token and claim["last_error"] is None
    # the taker settles what is left (the already delivered row is not touched again)
    delivered_at = {r["outbox_id"]: r["delivered_at"] for r in outbox(db, stream_id)}
    assert db.settle_metric_batch(taker, delivered=ids(taker)) is True
    after = {r["outbox_id"]: r["delivered_at"] for r in outbox(db, stream_id)}
    assert after[first] == delivered_at[first] and all(after[i] is not None for i in rest)
    assert db.pending_metric_rows() == 0 and stream_row(db, stream_id)["claim_token"] is None


def test_in_doubt_rows_come_back_first_with_their_old_token(db, linked):
    _, stream_id = linked
    db.append_metric_rows(metric_rows(stream_id, 6))
    batch = db.claim_metric_batch(URI, limit=5)
    one, two, three, four, five = ids(batch)
    # delivered, known not stored (sent again later), and two named nowhere: in doubt
    assert db.settle_metric_batch(batch, delivered=[one, two], resend=[three], error="timeout") is True
    assert stream_row(db, stream_id)["last_error"] == "timeout"
    doubt = db.claim_metric_batch(URI)
    assert doubt.in_doubt and doubt.batch_token == batch.batch_token != doubt.claim_token
    assert ids(doubt) == [four, five]
    assert db.settle_metric_batch(doubt, delivered=[four, five]) is True
    assert stream_row(db, stream_id)["last_error"] is None  # a clean settle clears it
    fresh = db.claim_metric_batch(URI)
    assert not fresh.in_doubt and fresh.batch_token == fresh.claim_token != batch.batch_token
    assert ids(fresh)[0] == three and len(fresh.rows) == 2  # the resent row, then the sixth
    deliver(db, fresh)
    tokens = {r["outbox_id"]: r["batch_token"] for r in outbox(db, stream_id)}
    assert tokens[one] == tokens[four] == batch.batch_token and tokens[three] == fresh.batch_token


def test_failed_rows_are_kept_with_their_error_and_leave_the_backlog(db, linked):
    _, stream_id = linked
    other_stream = db.metric_stream(OTHER_URI, "elsewhere")
    db.append_metric_rows(metric_rows(stream_id, 3) + metric_rows(other_stream, 1))
    batch = db.claim_metric_batch(URI)
    first, second, third = ids(batch)
    assert db.settle_metric_batch(batch, delivered=[first], failed={second: "INVALID_PARAMETER_VALUE: nope",
                                                                   third: "too long"}) is True
    elsewhere = db.claim_metric_batch(OTHER_URI)
    assert db.settle_metric_batch(elsewhere, failed={ids(elsewhere)[0]: "refused there"}) is True
    assert db.pending_metric_rows() == 0
    failed = db.failed_metric_rows()
    assert [(r["outbox_id"], r["error"]) for r in failed] == [
        (ids(elsewhere)[0], "refused there"), (third, "too long"), (second, "INVALID_PARAMETER_VALUE: nope"),
    ]
    assert failed[1]["metric_run_id"] == "mlflowrun1" and failed[1]["tracking_uri"] == URI
    assert failed[1]["kind"] == "METRIC" and failed[1]["step"] == 2
    assert [r["outbox_id"] for r in db.failed_metric_rows(tracking_uri=URI)] == [third, second]
    assert len(db.failed_metric_rows(limit=1)) == 1


# --- how batches are cut -------------------------------------------------------------------


def test_status_rows_are_batches_of_their_own(db, linked):
    _, stream_id = linked
    db.append_metric_rows(
        metric_rows(stream_id, 2) + [status_row(stream_id, "ONGOING", "RUNNING"), status_row(stream_id, "COMPLETED", "FINISHED")]
        + text_rows(stream_id, "TAG", 1) + metric_rows(stream_id, 1, start=2)
    )
    assert drain(db) == [
        [("METRIC", "loss"), ("METRIC", "loss")],
        [("STATUS", "ONGOING")],
        [("STATUS", "COMPLETED")],
        [("TAG", "tag_0"), ("METRIC", "loss")],
    ]


def test_a_batch_keeps_within_mlflows_limits(db, linked):
    _, stream_id = linked
    params = db.metric_stream(URI, "params")
    tags = db.metric_stream(URI, "tags")
    metrics = db.metric_stream(URI, "metrics")
    mixed = db.metric_stream(URI, "mixed")
    db.append_metric_rows(text_rows(params, "PARAM", 150))
    db.append_metric_rows(text_rows(tags, "TAG", 150))
    db.append_metric_rows(metric_rows(metrics, 1200))
    db.append_metric_rows(metric_rows(mixed, 950) + text_rows(mixed, "PARAM", 30) + text_rows(mixed, "TAG", 30))
    sizes: dict[int, list[int]] = {params: [], tags: [], metrics: [], mixed: []}
    while (batch := db.claim_metric_batch(URI)) is not None:
        sizes[batch.stream_id].append(len(batch.rows))
        kinds = [row.kind for row in batch.rows]
        assert kinds.count("PARAM") <= MAX_PARAMS_TAGS_PER_BATCH
        assert kinds.count("TAG") <= MAX_PARAMS_TAGS_PER_BATCH - 1  # the batch token is a tag too
        assert len(kinds) <= MAX_ROWS_PER_BATCH
        deliver(db, batch)
    assert MAX_PARAMS_TAGS_PER_BATCH == 100 and MAX_ROWS_PER_BATCH == 999
    assert sizes == {params: [100, 50], tags: [99, 51], metrics: [999, 201], mixed: [999, 11]}


def test_limit_and_per_stream_limits_cap_a_batch(db, linked):
    _, stream_id = linked
    db.append_metric_rows(metric_rows(stream_id, 1005))
    batch = db.claim_metric_batch(URI, limit=5000)  # never above MLflow's
    assert len(batch.rows) == MAX_ROWS_PER_BATCH
    assert db.settle_metric_batch(batch, resend=ids(batch)) is True
    batch = db.claim_metric_batch(URI, limit=7)
    assert [row.step for row in batch.rows] == list(range(7))
    assert db.settle_metric_batch(batch, resend=ids(batch)) is True
    batch = db.claim_metric_batch(URI, limit=7, limits={stream_id: 1})  # isolating one row
    assert [row.step for row in batch.rows] == [0]
    deliver(db, batch)


def test_skipped_streams_are_not_claimed(db, linked):
    _, stream_id = linked
    second = db.metric_stream(URI, "second")
    db.append_metric_rows(metric_rows(stream_id, 1) + metric_rows(second, 1))
    assert db.claim_metric_batch(URI, skip=[stream_id, second]) is None
    batch = db.claim_metric_batch(URI, skip=[stream_id])
    assert batch.stream_id == second
    assert stream_row(db, stream_id)["claim_token"] is None


# --- pending counts ------------------------------------------------------------------------


def test_pending_counts_per_experiment_run_store_and_mlflow_run(db, tmp_path):
    first = db.create_experiment("first", str(tmp_path))
    second = db.create_experiment("second", str(tmp_path))
    run_a = db.create_run(first.experiment_id, {})
    run_b = db.create_run(second.experiment_id, {})
    a = db.metric_stream(URI, "run-a", run_id=run_a.run_id)
    b = db.metric_stream(URI, "run-b", run_id=run_b.run_id)
    b_elsewhere = db.metric_stream(OTHER_URI, "run-b", run_id=run_b.run_id)
    loose = db.metric_stream(URI, "loose")
    assert db.pending_metric_rows_by_experiment() == {} and db.pending_metric_rows() == 0
    db.append_metric_rows(metric_rows(a, 3) + metric_rows(b, 2) + metric_rows(b_elsewhere, 1) + metric_rows(loose, 4))
    assert db.pending_metric_rows_by_experiment() == {first.experiment_id: 3, second.experiment_id: 3, None: 4}
    assert db.pending_metric_rows() == 10
    assert db.pending_metric_rows(experiment_id=second.experiment_id) == 3
    assert db.pending_metric_rows(run_id=run_b.run_id) == 3
    assert db.pending_metric_rows(tracking_uri=OTHER_URI) == 1
    assert db.pending_metric_rows(metric_run_id="run-b") == 3
    assert db.pending_metric_rows(tracking_uri=URI, metric_run_id="run-b") == 2
    assert db.pending_metric_rows(experiment_id=424242) == 0
    # delivered and failed rows leave the counts; claimed ones stay in them
    while (batch := db.claim_metric_batch(URI)) is not None and batch.stream_id != a:
        assert db.settle_metric_batch(batch, resend=ids(batch)) is True
    one, two, _ = ids(batch)
    assert db.settle_metric_batch(batch, delivered=[one], failed={two: "no"}) is True
    assert db.pending_metric_rows_by_experiment() == {first.experiment_id: 1, second.experiment_id: 3, None: 4}
    # a run's status changes are pending rows of its experiment too
    db.transition_run(run_a.run_id, "ONGOING")
    assert db.pending_metric_rows(experiment_id=first.experiment_id) == 2


# --- the run-status hook -------------------------------------------------------------------


def test_each_run_change_appends_one_status_row_to_each_linked_stream_only(db, experiment, linked):
    run, stream_id = linked
    unlinked = db.create_run(experiment.experiment_id, {})
    second_store = db.metric_stream(OTHER_URI, "mlflowrun1-copy", run_id=run.run_id)
    loose = db.metric_stream(URI, "loose")  # tracks no run: gets nothing
    for status in ("ONGOING", "STOPPED", "ONGOING", "COMPLETED"):
        db.transition_run(run.run_id, status)
        db.transition_run(unlinked.run_id, status)
    expected = [("ONGOING", "RUNNING"), ("STOPPED", "KILLED"), ("ONGOING", "RUNNING"), ("COMPLETED", "FINISHED")]
    assert status_rows(db, stream_id) == expected
    assert status_rows(db, second_store) == expected
    assert outbox(db, loose) == []
    assert len(outbox(db)) == 8  # nothing for the unlinked run
    # a repeat records no change (and no row); a refused change rolls back whole
    db.transition_run(run.run_id, "COMPLETED")
    with pytest.raises(InvalidTransitionError):
        db.transition_run(run.run_id, "ONGOING")
    assert status_rows(db, stream_id) == expected and len(outbox(db)) == 8
    # STATUS rows carry the time of the change and go out alone, in order
    assert all(r["timestamp_ms"] > 1_700_000_000_000 and r["value"] is None for r in outbox(db))
    assert [batch for batch in drain(db)] == [[("STATUS", s)] for s, _ in expected]


def test_a_failed_run_change_with_an_error_reaches_the_outbox(db, linked):
    run, stream_id = linked
    db.transition_run(run.run_id, "ONGOING")
    db.transition_run(run.run_id, "FAILED", error="CUDA out of memory")
    assert status_rows(db, stream_id) == [("ONGOING", "RUNNING"), ("FAILED", "FAILED")]


def test_a_bulk_change_by_cleanup_appends_one_row_per_changed_linked_run(db, experiment, tmp_path):
    runs = {name: db.create_run(experiment.experiment_id, {"name": name}) for name in
            ("new", "ongoing", "stopped", "done", "unlinked")}
    for name in ("ongoing", "stopped", "done", "unlinked"):
        db.transition_run(runs[name].run_id, "ONGOING")
    db.transition_run(runs["stopped"].run_id, "STOPPED")
    db.transition_run(runs["done"].run_id, "COMPLETED")
    streams = {name: db.metric_stream(URI, f"m-{name}", run_id=runs[name].run_id)
               for name in ("new", "ongoing", "stopped", "done")}
    other = db.create_experiment("other", str(tmp_path))
    bystander = db.create_run(other.experiment_id, {})
    db.transition_run(bystander.run_id, "ONGOING")
    bystander_stream = db.metric_stream(URI, "m-bystander", run_id=bystander.run_id)
    assert outbox(db) == []  # linked after the changes, without mirroring

    report = db.cleanup_experiment_state(experiment.experiment_id)
    assert set(report.ended_run_ids) == {runs[n].run_id for n in ("new", "ongoing", "unlinked")}
    assert {name: status_rows(db, stream) for name, stream in streams.items()} == {
        "new": [("KILLED", "KILLED")], "ongoing": [("KILLED", "KILLED")], "stopped": [], "done": [],
    }
    assert outbox(db, bystander_stream) == []
    assert len(outbox(db)) == 2
    # cleanup again: nothing changes, nothing is appended
    db.cleanup_experiment_state(experiment.experiment_id)
    assert len(outbox(db)) == 2


def test_a_bulk_change_to_failed_after_a_crash(db, experiment):
    run = db.create_run(experiment.experiment_id, {})
    db.transition_run(run.run_id, "ONGOING")
    stream_id = db.metric_stream(URI, "crashed", run_id=run.run_id)
    db.cleanup_experiment_state(experiment.experiment_id, status="FAILED", run_status="FAILED", error="boom")
    assert status_rows(db, stream_id) == [("FAILED", "FAILED")]
