"""The state machines of ``states.py``: the tables, the helpers, and the README diagrams."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rapidfire_state import states
from rapidfire_state.constants import ExperimentStatus, RunStatus, TaskStatus
from rapidfire_state.exceptions import ConfigError, RapidFireError

REPO = Path(__file__).resolve().parents[1]

# The tables of DESIGN.md ("The state machines"), copied literally: a change to
# states.py that is not a change to the design fails here.
DESIGN_TABLES = {
    "experiment": {
        "NEW": {"RUNNING", "FAILED"},
        "RUNNING": {"COMPLETED", "FAILED"},
        "COMPLETED": set(),
        "FAILED": set(),
    },
    "run": {
        "NEW": {"ONGOING", "STOPPED", "FAILED", "KILLED"},
        "ONGOING": {"STOPPED", "COMPLETED", "FAILED", "KILLED"},
        "STOPPED": {"ONGOING", "FAILED", "KILLED"},
        "COMPLETED": set(),
        "FAILED": set(),
        "KILLED": set(),
    },
    "task": {
        "PENDING": {"SCHEDULED", "FAILED"},
        "SCHEDULED": {"IN_PROGRESS", "FAILED"},
        "IN_PROGRESS": {"COMPLETED", "FAILED"},
        "COMPLETED": set(),
        "FAILED": set(),
    },
}
ENUMS = {"experiment": ExperimentStatus, "run": RunStatus, "task": TaskStatus}
MACHINES = tuple(DESIGN_TABLES)


def all_pairs(machine):
    members = list(ENUMS[machine])
    return [(a, b) for a in members for b in members]


@pytest.mark.parametrize("machine", MACHINES)
def test_tables_match_design(machine):
    enum_cls, table = states.MACHINES[machine]
    assert enum_cls is ENUMS[machine]
    # every status of the enum is a key, and nothing else
    assert set(table) == set(enum_cls)
    as_text = {source.value: {t.value for t in targets} for source, targets in table.items()}
    assert as_text == DESIGN_TABLES[machine]
    for targets in table.values():
        assert isinstance(targets, frozenset)
        assert all(isinstance(t, enum_cls) for t in targets)


def test_named_tables_are_the_machine_tables():
    assert states.MACHINES["experiment"][1] is states.EXPERIMENT_TRANSITIONS
    assert states.MACHINES["run"][1] is states.RUN_TRANSITIONS
    assert states.MACHINES["task"][1] is states.TASK_TRANSITIONS
    assert set(states.MACHINES) == {"experiment", "run", "task"}


def test_tables_are_read_only():
    with pytest.raises(TypeError):
        states.RUN_TRANSITIONS[RunStatus.COMPLETED] = frozenset({RunStatus.ONGOING})  # type: ignore[index]
    with pytest.raises(TypeError):
        states.MACHINES["bogus"] = (RunStatus, {})  # type: ignore[index]
    assert RunStatus.ONGOING not in states.RUN_TRANSITIONS[RunStatus.COMPLETED]


def test_initial_states():
    assert states.INITIAL_STATES == {
        "experiment": ExperimentStatus.NEW,
        "run": RunStatus.NEW,
        "task": TaskStatus.SCHEDULED,
    }
    assert states.ENTRY_STATES == {
        "experiment": {ExperimentStatus.NEW},
        "run": {RunStatus.NEW},
        "task": {TaskStatus.PENDING, TaskStatus.SCHEDULED},
    }
    for machine in MACHINES:
        assert states.INITIAL_STATES[machine] in states.ENTRY_STATES[machine]


def test_the_store_creates_rows_in_the_entry_states_only(db, tmp_path):
    experiment = db.create_experiment("entry", tmp_path)
    run = db.create_run(experiment.experiment_id, {"a": 1})
    assert experiment.status is states.INITIAL_STATES["experiment"]
    assert run.status is states.INITIAL_STATES["run"]
    assert db.create_worker_task(experiment.experiment_id, None, 0, None).status is states.INITIAL_STATES["task"]
    assert db.create_controller_task(experiment.experiment_id, "RUN_FIT").status is states.INITIAL_STATES["task"]
    for status in TaskStatus:
        if status in states.ENTRY_STATES["task"]:
            assert db.create_worker_task(experiment.experiment_id, None, 0, None, status=status).status is status
        else:
            with pytest.raises(ConfigError, match=f"a task is created PENDING or SCHEDULED, not {status.value}"):
                db.create_worker_task(experiment.experiment_id, None, 0, None, status=status)


def test_enum_values_equal_names():
    for enum_cls in ENUMS.values():
        for member in enum_cls:
            assert member.value == member.name
            assert str(member) == member.name


@pytest.mark.parametrize("machine", MACHINES)
def test_can_transition_agrees_with_the_design_everywhere(machine):
    for a, b in all_pairs(machine):
        expected = b.value in DESIGN_TABLES[machine][a.value]
        assert states.can_transition(machine, a, b) is expected, (a, b)
        # exact string values are accepted and mean the same
        assert states.can_transition(machine, a.value, b.value) is expected
        assert states.can_transition(machine, a, b.value) is expected


def test_can_transition_examples():
    assert states.can_transition("run", "STOPPED", "ONGOING")
    assert not states.can_transition("run", "COMPLETED", "ONGOING")
    assert not states.can_transition("run", "NEW", "COMPLETED")  # must run first
    assert not states.can_transition("run", "ONGOING", "ONGOING")  # no self-loops in the table
    assert not states.can_transition("experiment", "NEW", "COMPLETED")
    assert not states.can_transition("task", "PENDING", "IN_PROGRESS")
    assert states.can_transition("task", "PENDING", "FAILED")


@pytest.mark.parametrize("machine", MACHINES)
def test_allowed_from_is_the_inverse_table(machine):
    for wanted in ENUMS[machine]:
        expected = {source for source, targets in DESIGN_TABLES[machine].items() if wanted.value in targets}
        got = states.allowed_from(machine, wanted)
        assert isinstance(got, frozenset)
        assert {s.value for s in got} == expected
        assert all(isinstance(s, ENUMS[machine]) for s in got)
        assert states.allowed_from(machine, wanted.value) == got


def test_allowed_from_examples():
    assert states.allowed_from("run", RunStatus.ONGOING) == {RunStatus.NEW, RunStatus.STOPPED}
    assert states.allowed_from("run", RunStatus.NEW) == frozenset()
    assert states.allowed_from("task", "IN_PROGRESS") == {TaskStatus.SCHEDULED}
    assert states.allowed_from("experiment", "FAILED") == {ExperimentStatus.NEW, ExperimentStatus.RUNNING}


def test_terminal_states():
    assert states.terminal_states("experiment") == {ExperimentStatus.COMPLETED, ExperimentStatus.FAILED}
    assert states.terminal_states("run") == {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.KILLED}
    assert states.terminal_states("task") == {TaskStatus.COMPLETED, TaskStatus.FAILED}
    for machine in MACHINES:
        for status in states.terminal_states(machine):
            assert not any(states.can_transition(machine, status, other) for other in ENUMS[machine])


@pytest.mark.parametrize("machine", MACHINES)
def test_every_status_is_reachable_from_the_initial_state(machine):
    _, table = states.MACHINES[machine]
    seen = set(states.ENTRY_STATES[machine])
    frontier = list(seen)
    while frontier:
        for target in table[frontier.pop()]:
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(ENUMS[machine])


@pytest.mark.parametrize("machine", MACHINES)
def test_coerce_status_accepts_enum_and_exact_value(machine):
    for member in ENUMS[machine]:
        assert states.coerce_status(machine, member) is member
        assert states.coerce_status(machine, member.value) is member


@pytest.mark.parametrize(
    "machine, bad",
    [
        ("run", "ongoing"),  # values are case-sensitive
        ("run", " ONGOING"),
        ("run", "BOGUS"),
        ("run", ""),
        ("run", None),
        ("run", 1),
        ("run", True),
        ("run", b"ONGOING"),
        ("run", ["ONGOING"]),
        ("run", ExperimentStatus.RUNNING),  # another machine's enum
        ("run", TaskStatus.COMPLETED),  # same value as RunStatus.COMPLETED, wrong machine
        ("experiment", RunStatus.NEW),
        ("experiment", "ONGOING"),
        ("task", RunStatus.FAILED),
        ("task", "NEW"),
    ],
)
def test_coerce_status_refuses_what_is_not_a_status_of_the_machine(machine, bad):
    with pytest.raises(ConfigError) as info:
        states.coerce_status(machine, bad)
    assert isinstance(info.value, RapidFireError)
    message = str(info.value)
    assert repr(bad) in message
    # names what would have been allowed
    for member in ENUMS[machine]:
        assert member.value in message


@pytest.mark.parametrize("bad_machine", ["runs", "Run", "", None, 3, "worker_task"])
def test_unknown_machine_is_refused_by_every_helper(bad_machine):
    for call in (
        lambda: states.coerce_status(bad_machine, "NEW"),
        lambda: states.can_transition(bad_machine, "NEW", "ONGOING"),
        lambda: states.allowed_from(bad_machine, "NEW"),
        lambda: states.terminal_states(bad_machine),
        lambda: states.mermaid_diagram(bad_machine),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert repr(bad_machine) in message
        assert "experiment" in message and "run" in message and "task" in message


def test_can_transition_refuses_bad_statuses_rather_than_answering_false():
    with pytest.raises(ConfigError):
        states.can_transition("run", "NEW", "DONE")
    with pytest.raises(ConfigError):
        states.can_transition("run", "DONE", "NEW")
    with pytest.raises(ConfigError):
        states.allowed_from("task", "ONGOING")


# --- diagrams ---------------------------------------------------------------------------


def _edges(diagram: str) -> set[tuple[str, str]]:
    edges = set()
    for line in diagram.splitlines()[1:]:
        match = re.fullmatch(r"\s+(\S+) --> (\S+)", line)
        assert match, f"unexpected diagram line {line!r}"
        edges.add((match[1], match[2]))
    return edges


@pytest.mark.parametrize("machine", MACHINES)
def test_mermaid_diagram_is_generated_from_the_table(machine):
    diagram = states.mermaid_diagram(machine)
    assert diagram.splitlines()[0] == "stateDiagram-v2"
    expected = {("[*]", status.value) for status in states.ENTRY_STATES[machine]}
    for source, targets in DESIGN_TABLES[machine].items():
        expected |= {(source, target) for target in targets}
        if not targets:
            expected.add((source, "[*]"))
    assert _edges(diagram) == expected
    # deterministic (the README embeds it verbatim)
    assert states.mermaid_diagram(machine) == diagram


def _readme_blocks() -> dict[str, str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = {}
    for machine in MACHINES:
        pattern = re.compile(
            rf"<!-- states:{machine} -->\s*```mermaid\n(?P<body>.*?)\n```\s*<!-- /states:{machine} -->",
            re.S,
        )
        found = pattern.findall(readme)
        assert len(found) == 1, (
            f"README.md must hold exactly one ```mermaid block between <!-- states:{machine} --> "
            f"and <!-- /states:{machine} -->; found {len(found)}"
        )
        blocks[machine] = found[0]
    return blocks


@pytest.mark.parametrize("machine", MACHINES)
def test_readme_diagrams_agree_with_the_tables(machine):
    body = _readme_blocks()[machine]
    expected = states.mermaid_diagram(machine)
    assert body.strip("\n") == expected, (
        f"README.md's {machine} diagram differs from states.mermaid_diagram({machine!r}); "
        "regenerate it from the table"
    )
    # and, independently of the generator, the README's edges are the design's
    assert {e for e in _edges(body) if "[*]" not in e} == {
        (source, target) for source, targets in DESIGN_TABLES[machine].items() for target in targets
    }
