"""RFLogger / TrainingLogger: files, extras, separation, user sinks, processes."""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
from pathlib import Path

import pytest
from loguru import logger

from rapidfire_state.datapaths import DataPath
from rapidfire_state.exceptions import ConfigError, DataPathException
from rapidfire_state.logging import RFLogger, TrainingLogger, remove_rf_sinks, rf_log_files

# time | LEVEL | experiment | component | pid N | where - message[ | extras]
LINE_RE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d{4}) \| (?P<level>[A-Z]+) *"
    r"\| (?P<experiment>\S+) \| (?P<component>\S+) \| pid (?P<pid>\d+) \| (?P<where>\S+) - "
    r"(?P<rest>.*)"
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("RF_LOG_PATH", str(tmp_path / "logs"))
    monkeypatch.delenv("RF_LOG_FILENAME", raising=False)
    monkeypatch.delenv("RF_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    DataPath.reset()
    remove_rf_sinks()
    yield
    remove_rf_sinks()
    DataPath.reset()


@pytest.fixture
def logs(tmp_path) -> Path:
    return (tmp_path / "logs").resolve()


@pytest.fixture
def user_sink():
    """A sink the *user* added, as a list of loguru messages."""
    messages: list = []
    sink_id = logger.add(messages.append, level="DEBUG", format="{message}")
    yield messages
    logger.remove(sink_id)


def read_lines(path: Path) -> list[str]:
    logger.complete()
    return path.read_text(encoding="utf-8").splitlines()


def parse(line: str) -> dict[str, str]:
    match = LINE_RE.fullmatch(line)
    assert match, f"unparseable line: {line!r}"
    return match.groupdict()


# --- where files go -----------------------------------------------------------------------


def test_files_created_where_specified(logs):
    rf = RFLogger("exp", console=False)
    for name in ("controller", "worker_0", "dispatcher"):
        rf.create_logger(name).info(f"hello from {name}")
    logger.complete()
    assert sorted(p.name for p in (logs / "exp").iterdir()) == [
        "controller.log",
        "dispatcher.log",
        "worker_0.log",
    ]
    for name in ("controller", "worker_0", "dispatcher"):
        [line] = read_lines(logs / "exp" / f"{name}.log")
        fields = parse(line)
        assert fields["component"] == name
        assert fields["experiment"] == "exp"
        assert fields["level"] == "INFO"
        assert fields["pid"] == str(os.getpid())
        assert fields["rest"] == f"hello from {name}"
    assert rf_log_files() == sorted(logs / "exp" / f"{n}.log" for n in ("controller", "worker_0", "dispatcher"))


def test_experiment_from_datapath_then_env_then_default(logs, tmp_path, monkeypatch):
    RFLogger(console=False).create_logger("controller").info("a")
    monkeypatch.setenv("RF_EXPERIMENT_NAME", "from_env")
    RFLogger(console=False).create_logger("controller").info("b")
    DataPath.initialize("from_datapath", tmp_path / "experiments")
    RFLogger(console=False).create_logger("controller").info("c")
    assert [parse(l)["rest"] for l in read_lines(logs / "default" / "controller.log")] == ["a"]
    assert [parse(l)["rest"] for l in read_lines(logs / "from_env" / "controller.log")] == ["b"]
    assert [parse(l)["rest"] for l in read_lines(logs / "from_datapath" / "controller.log")] == ["c"]
    # an explicit name wins over all of them
    assert RFLogger("explicit").experiment_name == "explicit"


def test_rf_log_path_read_at_call_time(tmp_path, monkeypatch):
    rf = RFLogger("exp", console=False)  # created before the variable changes
    monkeypatch.setenv("RF_LOG_PATH", str(tmp_path / "later"))
    rf.create_logger("controller").info("x")
    assert read_lines(tmp_path / "later" / "exp" / "controller.log")


def test_explicit_log_dir(tmp_path):
    rf = RFLogger("exp", log_dir=tmp_path / "mine", console=False)
    rf.create_logger("worker_3").info("x")
    assert rf.log_dir == (tmp_path / "mine").resolve()
    assert [parse(l)["component"] for l in read_lines(tmp_path / "mine" / "worker_3.log")] == ["worker_3"]
    assert not (tmp_path / "logs").exists()


def test_braces_in_rf_log_path_taken_literally(tmp_path, monkeypatch):
    # loguru expands "{time}" in file sink paths; ours must be literal
    monkeypatch.setenv("RF_LOG_PATH", str(tmp_path / "logs{time}"))
    RFLogger("exp", console=False).create_logger("controller").info("x")
    assert read_lines(tmp_path / "logs{time}" / "exp" / "controller.log")


# --- extras ---------------------------------------------------------------------------------


def test_run_id_extra_recorded_and_written(logs, user_sink):
    log = RFLogger("exp", console=False).create_logger("controller")
    log.error("Failed to schedule", run_id=5)
    logger.complete()
    [message] = [m for m in user_sink if m.record["message"] == "Failed to schedule"]
    assert message.record["extra"] == {"component": "controller", "experiment": "exp", "run_id": 5}
    [line] = read_lines(logs / "exp" / "controller.log")
    fields = parse(line)
    assert fields["level"] == "ERROR"
    assert fields["rest"] == "Failed to schedule | run_id=5"


def test_extras_with_markup_braces_and_newlines_stay_literal(logs):
    log = RFLogger("exp", console=False).create_logger("controller")
    log.bind(worker="w1").info(
        "tricky",
        tag="<red>",
        esc="\\<red>",
        braces="{x}",
        spaced="a b",
        nl="x\ny",
        level_tag="<level>",
    )
    [line] = read_lines(logs / "exp" / "controller.log")
    assert parse(line)["rest"] == (
        "tricky | worker=w1 tag=<red> esc=\\<red> braces={x} spaced='a b' nl='x\\ny' level_tag=<level>"
    )


def test_message_without_extras_has_no_trailer(logs):
    RFLogger("exp", console=False).create_logger("controller").info("plain")
    [line] = read_lines(logs / "exp" / "controller.log")
    assert parse(line)["rest"] == "plain"


def test_exception_traceback_goes_to_file(logs):
    log = RFLogger("exp", console=False).create_logger("controller")
    try:
        raise RuntimeError("kaboom")
    except RuntimeError:
        log.exception("failed", run_id=2)
    text = "\n".join(read_lines(logs / "exp" / "controller.log"))
    assert "failed | run_id=2" in text
    assert "RuntimeError: kaboom" in text


# --- separation ---------------------------------------------------------------------------------


def test_per_component_separation(logs):
    rf = RFLogger("exp", console=False)
    controller = rf.create_logger("controller")
    worker = rf.create_logger("worker_0")
    controller.info("for the controller")
    worker.info("for the worker")
    logger.info("plain user message")  # bound to no component: in neither file
    assert [parse(l)["rest"] for l in read_lines(logs / "exp" / "controller.log")] == ["for the controller"]
    assert [parse(l)["rest"] for l in read_lines(logs / "exp" / "worker_0.log")] == ["for the worker"]


def test_same_component_of_two_experiments_kept_apart(logs):
    a = RFLogger("exp_a", console=False).create_logger("controller")
    b = RFLogger("exp_b", console=False).create_logger("controller")
    a.info("A")
    b.info("B")
    assert [parse(l)["rest"] for l in read_lines(logs / "exp_a" / "controller.log")] == ["A"]
    assert [parse(l)["rest"] for l in read_lines(logs / "exp_b" / "controller.log")] == ["B"]


def test_two_experiments_sharing_an_explicit_log_dir(tmp_path):
    shared = tmp_path / "shared"
    a = RFLogger("exp_a", log_dir=shared, console=False).create_logger("controller")
    b = RFLogger("exp_b", log_dir=shared, console=False).create_logger("controller")
    a.info("A")
    b.info("B")
    assert [(parse(l)["experiment"], parse(l)["rest"]) for l in read_lines(shared / "controller.log")] == [
        ("exp_a", "A"),
        ("exp_b", "B"),
    ]


def test_sink_added_once_per_file(logs):
    first = RFLogger("exp", console=False).create_logger("controller")
    second = RFLogger("exp", console=False).create_logger("controller")
    first.info("one")
    second.info("two")
    # a second sink on the same file would write every line twice
    assert [parse(l)["rest"] for l in read_lines(logs / "exp" / "controller.log")] == ["one", "two"]
    assert rf_log_files() == [logs / "exp" / "controller.log"]


def test_level_applies_to_added_sinks(logs):
    log = RFLogger("exp", console=False, level="info").create_logger("controller")
    log.debug("hidden")
    log.info("shown")
    assert [parse(l)["rest"] for l in read_lines(logs / "exp" / "controller.log")] == ["shown"]


# --- user sinks are never touched -------------------------------------------------------------------


def test_user_sink_keeps_receiving_after_create_and_close_all(logs, user_sink):
    logger.info("before")
    log = RFLogger("exp").create_logger("controller")
    logger.info("user after create")
    log.info("rf message")
    RFLogger.close_all()
    logger.info("user after close")
    log.info("rf after close")
    logger.complete()
    assert [m.record["message"] for m in user_sink] == [
        "before",
        "user after create",
        "rf message",
        "user after close",
        "rf after close",
    ]
    # our file sink is gone after close_all: the last rf message is not in the file
    assert [parse(l)["rest"] for l in read_lines(logs / "exp" / "controller.log")] == ["rf message"]
    assert rf_log_files() == []


def test_user_file_sink_survives_close_all(tmp_path, logs):
    user_file = tmp_path / "user.log"
    sink_id = logger.add(user_file, format="{message}")
    try:
        RFLogger("exp").create_logger("worker_1").info("rf")
        remove_rf_sinks()
        logger.info("still here")
        logger.complete()
        assert user_file.read_text().splitlines() == ["rf", "still here"]
    finally:
        logger.remove(sink_id)


def test_remove_rf_sinks_is_idempotent_and_sinks_come_back(logs):
    log = RFLogger("exp", console=False).create_logger("controller")
    remove_rf_sinks()
    remove_rf_sinks()
    log.info("lost")  # no sink now
    RFLogger("exp", console=False).create_logger("controller").info("found")
    assert [parse(l)["rest"] for l in read_lines(logs / "exp" / "controller.log")] == ["found"]


# --- console -------------------------------------------------------------------------------------------


def _count(text: str, needle: str) -> int:
    return sum(needle in line for line in text.splitlines())


def test_console_shows_rf_messages_once_and_never_echoes_user_messages(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    logger.info("user-msg-before")
    logger.complete()
    baseline = _count(capsys.readouterr().err, "user-msg-before")  # other stderr handlers (loguru's id 0)
    log = RFLogger("exp").create_logger("controller")
    RFLogger("exp").create_logger("controller")  # no second console sink
    log.warning("rf-console-msg", run_id=9)
    logger.info("user-msg-after")
    logger.complete()
    err = capsys.readouterr().err
    assert _count(err, "user-msg-after") == baseline
    ours = [line for line in err.splitlines() if "| controller | rf-console-msg" in line]
    assert len(ours) == 1
    assert ours[0].endswith("rf-console-msg | run_id=9")
    assert "WARNING" in ours[0]
    assert "\x1b[" not in err  # NO_COLOR honoured


def test_console_colours_levels_when_forced(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    RFLogger("exp").create_logger("controller").error("coloured")
    logger.complete()
    [line] = [l for l in capsys.readouterr().err.splitlines() if "coloured" in l and "controller" in l]
    assert "\x1b[31m" in line  # loguru's ERROR colour (red)


def test_console_false_keeps_logger_off_the_console(capsys, logs):
    RFLogger("exp", console=True).create_logger("controller")
    RFLogger("exp", console=False).create_logger("worker_0").info("quiet-worker")
    logger.complete()
    err = capsys.readouterr().err
    assert not any("| worker_0 |" in line for line in err.splitlines())
    assert read_lines(logs / "exp" / "worker_0.log")


# --- TrainingLogger --------------------------------------------------------------------------------------


def test_training_logger_writes_training_log(logs, capsys):
    tl = TrainingLogger("exp")
    tl.get_logger().info("epoch 1 loss 0.5", run_id=3)
    tl.create_logger("worker_0").info("from worker")
    tl.create_logger().info("default")
    RFLogger("exp", console=False).create_logger("controller").info("controller only")
    lines = [parse(l) for l in read_lines(logs / "exp" / "training.log")]
    assert [(f["component"], f["rest"]) for f in lines] == [
        ("training", "epoch 1 loss 0.5 | run_id=3"),
        ("training", "from worker | source=worker_0"),
        ("training", "default"),
    ]
    assert tl.training_log_file == logs / "exp" / "training.log"
    assert [parse(l)["rest"] for l in read_lines(logs / "exp" / "controller.log")] == ["controller only"]
    assert "epoch 1" not in capsys.readouterr().err  # console off by default for training


# --- refused input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x y", "a..b"])
def test_bad_logger_names_refused(name, tmp_path):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DataPathException, match="invalid logger name"):
        RFLogger("exp", console=False).create_logger(name)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert rf_log_files() == []


@pytest.mark.parametrize("name", ["../escape", "a/b", ".", ""])
def test_bad_experiment_names_refused(name):
    with pytest.raises(DataPathException, match="invalid experiment name"):
        RFLogger(name)


def test_bad_env_experiment_name_is_a_config_error(monkeypatch):
    monkeypatch.setenv("RF_EXPERIMENT_NAME", "../evil")
    with pytest.raises(ConfigError, match="RF_EXPERIMENT_NAME"):
        RFLogger(console=False).create_logger("controller")


@pytest.mark.parametrize("level", ["LOUD", -1, True, 1.5])
def test_bad_level_refused(level):
    with pytest.raises(ConfigError, match="invalid log level"):
        RFLogger("exp", level=level)


# --- concurrency ---------------------------------------------------------------------------------------------

PAYLOAD = "x" * 300  # long lines make a torn write visible


def test_many_threads_one_file(logs):
    log = RFLogger("exp", console=False).create_logger("controller")

    def work(t: int) -> None:
        for i in range(200):
            log.info(f"thread={t} seq={i} payload={PAYLOAD}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen: dict[int, list[int]] = {t: [] for t in range(8)}
    for line in read_lines(logs / "exp" / "controller.log"):
        m = re.fullmatch(rf"thread=(\d) seq=(\d+) payload={PAYLOAD}", parse(line)["rest"])
        assert m, line
        seen[int(m.group(1))].append(int(m.group(2)))
    assert seen == {t: list(range(200)) for t in range(8)}


def _process_main(index: int, log_root: str, lines: int, barrier) -> None:
    """Runs in a spawned process: log to own worker file and to the shared dispatcher file."""
    os.environ["RF_LOG_PATH"] = log_root
    from loguru import logger as child_logger

    from rapidfire_state.logging import RFLogger as ChildRFLogger
    from rapidfire_state.logging import remove_rf_sinks as child_remove

    rf = ChildRFLogger("mp_exp", console=False)
    own = rf.create_logger(f"worker_{index}")
    shared = rf.create_logger("dispatcher")
    barrier.wait(timeout=60)  # all three write at the same time
    for i in range(lines):
        # lengths vary so that line ends fall everywhere relative to any buffer size
        payload = "y" * (50 + (i * 37 + index * 11) % 400)
        own.info(f"worker={index} seq={i} payload={payload}")
        shared.info(f"worker={index} seq={i} payload={payload}")
    child_logger.complete()
    child_remove()


@pytest.mark.slow
def test_three_processes_own_and_shared_files(logs):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    lines = 500
    procs = [
        ctx.Process(target=_process_main, args=(i, str(logs), lines, barrier)) for i in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    pids = {i: str(p.pid) for i, p in enumerate(procs)}

    body = re.compile(r"worker=(\d) seq=(\d+) payload=(y+)")

    def check(fields: dict[str, str], component: str) -> tuple[int, int]:
        assert fields["experiment"] == "mp_exp"
        assert fields["component"] == component
        m = body.fullmatch(fields["rest"])
        assert m, fields["rest"]
        worker, seq, payload = int(m.group(1)), int(m.group(2)), m.group(3)
        assert len(payload) == 50 + (seq * 37 + worker * 11) % 400  # complete, not torn
        assert fields["pid"] == pids[worker]
        return worker, seq

    for i in range(3):
        got = [check(parse(l), f"worker_{i}") for l in read_lines(logs / "mp_exp" / f"worker_{i}.log")]
        assert got == [(i, s) for s in range(lines)]  # exactly its own lines, in order

    shared = [check(parse(l), "dispatcher") for l in read_lines(logs / "mp_exp" / "dispatcher.log")]
    assert len(shared) == 3 * lines
    for i in range(3):
        assert [s for w, s in shared if w == i] == list(range(lines))


# --- RF_LOG_FILENAME: the file naming pattern ---------------------------------------------------


def test_rf_log_filename_pattern_names_the_files(logs, monkeypatch):
    monkeypatch.setenv("RF_LOG_FILENAME", "rf_{name}.log")
    rf = RFLogger("exp", console=False)
    for name in ("controller", "worker_0"):
        rf.create_logger(name).info(f"hello from {name}")
    TrainingLogger("exp").get_logger().info("training line")
    logger.complete()
    assert sorted(p.name for p in (logs / "exp").iterdir()) == [
        "rf_controller.log",
        "rf_training.log",
        "rf_worker_0.log",
    ]
    assert [parse(l)["rest"] for l in read_lines(logs / "exp" / "rf_worker_0.log")] == ["hello from worker_0"]
    assert rf.log_file("controller") == logs / "exp" / "rf_controller.log"
    DataPath.initialize("exp", logs.parent / "experiments")
    assert DataPath.log_path("controller") == logs / "exp" / "rf_controller.log"


def test_rf_log_filename_is_read_when_a_logger_is_made(logs, monkeypatch):
    import rapidfire_state.constants as constants

    rf = RFLogger("exp", console=False)  # made (and the module imported) before the variable is set
    rf.create_logger("controller").info("default name")
    assert constants.RF_LOG_FILENAME == "{name}.log"
    monkeypatch.setenv("RF_LOG_FILENAME", "later_{name}.txt")
    assert constants.RF_LOG_FILENAME == "later_{name}.txt"
    rf.create_logger("worker_1").info("new name")
    assert read_lines(logs / "exp" / "controller.log")
    assert [parse(l)["rest"] for l in read_lines(logs / "exp" / "later_worker_1.txt")] == ["new name"]
    assert not (logs / "exp" / "worker_1.log").exists()


def test_rf_log_filename_without_placeholder_is_one_shared_file(logs, monkeypatch):
    monkeypatch.setenv("RF_LOG_FILENAME", "rapidfire.log")
    rf = RFLogger("exp", console=False)
    controller = rf.create_logger("controller")
    worker = rf.create_logger("worker_0")
    controller.info("from the controller")
    worker.info("from the worker")
    logger.info("plain user message")  # bound to no component: not in the file
    assert sorted(p.name for p in (logs / "exp").iterdir()) == ["rapidfire.log"]
    lines = [parse(l) for l in read_lines(logs / "exp" / "rapidfire.log")]
    assert [(f["component"], f["rest"]) for f in lines] == [
        ("controller", "from the controller"),
        ("worker_0", "from the worker"),
    ]
    assert rf_log_files() == [logs / "exp" / "rapidfire.log"]  # one sink for both


@pytest.mark.parametrize(
    "pattern, hint",
    [
        ("{nme}.log", "only placeholder may be {name}"),
        ("{name}-{experiment}.log", "only placeholder may be {name}"),
        ("x}.log", "no other braces"),
        ("sub/{name}.log", "names a file, not a path"),
        ("..{name}.log", "gives the file name"),
        (".{name}", "gives the file name"),
        ("{name} log", "gives the file name"),
    ],
)
def test_bad_rf_log_filename_refused_and_nothing_created(logs, monkeypatch, pattern, hint):
    monkeypatch.setenv("RF_LOG_FILENAME", pattern)
    with pytest.raises(ConfigError, match=re.escape(hint)) as info:
        RFLogger("exp", console=False).create_logger("controller")
    assert f"RF_LOG_FILENAME={pattern!r}" in str(info.value)
    assert not logs.exists() or not any(logs.rglob("*"))
    assert rf_log_files() == []


def test_empty_rf_log_filename_means_the_default(logs, monkeypatch):
    monkeypatch.setenv("RF_LOG_FILENAME", "  ")
    RFLogger("exp", console=False).create_logger("controller").info("x")
    assert read_lines(logs / "exp" / "controller.log")
