"""AutoML search spaces: List/Range specs, GridSearch, RandomSearch, get_runs, flattening."""

from __future__ import annotations

import collections
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rapidfire_state import automl, automl_utils
from rapidfire_state.automl_utils import (
    AutoMLAlgorithm,
    GridSearch,
    List,
    ParamSpec,
    RandomSearch,
    Range,
    get_flattened_config_leaf,
    get_runs,
)
from rapidfire_state.exceptions import AutoMLException, ConfigError
from rapidfire_state.serialize import flatten_config

REPO_ROOT = Path(__file__).resolve().parents[1]
Pair = collections.namedtuple("Pair", "a b")


def specs_in(node: Any) -> list[Any]:
    """Every ParamSpec left anywhere in a run."""
    if isinstance(node, ParamSpec):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in specs_in(value)]
    if isinstance(node, (list, tuple)):
        return [s for item in node for s in specs_in(item)]
    return []


# --- List -------------------------------------------------------------------------


def test_list_accepts_any_non_empty_iterable() -> None:
    assert List([1, 2]).values == (1, 2)
    assert List((x for x in "ab")).values == ("a", "b")
    assert List(range(3)).values == (0, 1, 2)
    assert len(List([{"a": 1}, None])) == 2
    assert repr(List([1, "a"])) == "List([1, 'a'])"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([], "at least one choice"),
        ("adam", "not a string"),
        ({"a": 1}, "not a dict"),
        ({1, 2}, "not a set"),
        (5, "not a int"),
        (None, "not a NoneType"),
    ],
)
def test_list_rejects_bad_values(values: Any, message: str) -> None:
    with pytest.raises(AutoMLException, match=message):
        List(values)


# --- Range ------------------------------------------------------------------------


def test_range_dtype_inference() -> None:
    assert Range(1, 10).dtype is int
    assert Range(1, 10.0).dtype is float
    assert Range(1, 10, dtype=float).dtype is float
    assert Range(1, 10, dtype="float").low == 1.0 and isinstance(Range(1, 10, dtype="float").low, float)
    assert Range(1, 10, dtype="int").dtype is int
    assert Range(3, 3).low == Range(3, 3).high == 3  # a degenerate range is one value
    assert repr(Range(1e-4, 1e-1, log=True)) == "Range(0.0001, 0.1, dtype=float, log=True)"


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((5, 1), {}, "low must be <= high"),
        ((0.5, 0.1), {}, "low must be <= high"),
        ((0, 1), {"log": True}, "needs low > 0"),
        ((-1.0, 1.0), {"log": True}, "needs low > 0"),
        ((1.0, 10.0), {"dtype": int}, "dtype=int needs int bounds"),
        ((1, 10), {"dtype": "double"}, "dtype='double' is not supported"),
        ((1, 10), {"dtype": str}, "is not supported"),
        ((True, 10), {}, "low=True is a bool"),
        ((1, "10"), {}, "high='10' is a str"),
        ((1, None), {}, "high=None is a NoneType"),
        ((float("nan"), 1.0), {}, "must be finite"),
        ((0.0, float("inf")), {}, "must be finite"),
        ((1, 2), {"log": "yes"}, "log='yes' must be True or False"),
    ],
)
def test_range_rejects_bad_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(AutoMLException, match=message) as info:
        Range(*args, **kwargs)
    assert str(info.value).startswith("Range(")  # names the values given


def _sample_many(spec: Range, n: int = 4000, seed: int = 0) -> list[Any]:
    return [run["x"] for run in RandomSearch({"x": spec}, num_runs=n, seed=seed).get_runs()]


def test_int_range_is_inclusive_and_uniform() -> None:
    values = _sample_many(Range(1, 4))
    assert all(type(v) is int for v in values)
    counts = collections.Counter(values)
    assert set(counts) == {1, 2, 3, 4}
    assert all(800 <= c <= 1200 for c in counts.values()), counts


def test_float_range_stays_in_bounds_and_spreads() -> None:
    values = _sample_many(Range(-2.0, 3.0))
    assert all(type(v) is float and -2.0 <= v <= 3.0 for v in values)
    assert 0.4 < sum(v < 0.5 for v in values) / len(values) < 0.6  # median of U(-2, 3)
    assert min(values) < -1.9 and max(values) > 2.9


def test_log_float_range_is_log_uniform() -> None:
    values = _sample_many(Range(1e-4, 1.0, log=True))
    assert all(1e-4 <= v <= 1.0 for v in values)
    # Log-uniform: half the mass below the geometric mean 1e-2 (uniform would put 1% there).
    assert 0.45 < sum(v < 1e-2 for v in values) / len(values) < 0.55
    assert 0.2 < sum(v < 1e-3 for v in values) / len(values) < 0.3


def test_log_int_range_is_inclusive_and_log_uniform() -> None:
    values = _sample_many(Range(1, 1000, log=True))
    assert all(type(v) is int and 1 <= v <= 1000 for v in values)
    # P(v < 32) = log(32) / log(1001) ~ 0.50; a uniform draw would give ~0.03.
    assert 0.45 < sum(v < 32 for v in values) / len(values) < 0.55
    small = collections.Counter(_sample_many(Range(1, 4, log=True)))
    assert set(small) == {1, 2, 3, 4}
    assert small[1] > small[2] > small[4]  # weights log(2/1) > log(3/2) > log(5/4)


# --- GridSearch -------------------------------------------------------------------


def test_grid_is_the_cartesian_product() -> None:
    config = {"lr": List([1e-3, 1e-4, 1e-5]), "opt": List(["adam", "sgd"]), "epochs": 3}
    runs = GridSearch(config).get_runs()
    assert len(runs) == 6
    expected = [
        {"lr": lr, "opt": opt, "epochs": 3}
        for lr, opt in itertools.product([1e-3, 1e-4, 1e-5], ["adam", "sgd"])
    ]
    assert runs == expected  # in order, last key fastest


def test_grid_with_nested_specs_in_dicts_and_lists() -> None:
    config = {
        "model": {"name": List(["a", "b"]), "layers": [List([8, 16, 32]), 4, {"act": List(["relu", "gelu"])}]},
        "pair": Pair(List([1, 2]), "x"),
        "fixed": {"seed": 0},
    }
    runs = GridSearch(config).get_runs(seed=123)
    assert len(runs) == 2 * 3 * 2 * 2
    assert all(not specs_in(run) for run in runs)
    assert len({json.dumps(run, sort_keys=True) for run in runs}) == len(runs)  # all distinct
    assert {run["model"]["layers"][0] for run in runs} == {8, 16, 32}
    assert all(isinstance(run["pair"], Pair) and run["pair"].b == "x" for run in runs)
    assert all(run["model"]["layers"][1] == 4 for run in runs)


def test_grid_expands_specs_inside_list_choices() -> None:
    config = {"optimizer": List([{"name": "adam", "beta": List([0.9, 0.99])}, {"name": "sgd"}])}
    runs = GridSearch(config).get_runs()
    assert runs == [
        {"optimizer": {"name": "adam", "beta": 0.9}},
        {"optimizer": {"name": "adam", "beta": 0.99}},
        {"optimizer": {"name": "sgd"}},
    ]


def test_grid_over_a_list_of_configs_sums() -> None:
    runs = GridSearch([{"a": List([1, 2])}, {"b": List([1, 2, 3])}, {"c": 0}]).get_runs()
    assert len(runs) == 2 + 3 + 1
    assert runs[-1] == {"c": 0}


@pytest.mark.parametrize(
    ("configs", "path"),
    [
        ({"lr": Range(0.1, 1.0)}, "at lr "),
        ({"model": {"layers": [1, Range(1, 4)]}}, "at model.layers.1 "),
        ({"opt": List([{"lr": Range(0.1, 1.0)}])}, r"at opt.<choice 0>.lr "),
        ([{"a": 1}, {"b": {"c": Range(1, 2)}}], r"at configs\[1\]: b.c "),
    ],
)
def test_grid_refuses_range_naming_its_path(configs: Any, path: str) -> None:
    with pytest.raises(AutoMLException, match=f"GridSearch: Range.*{path}has no finite grid"):
        GridSearch(configs)


def test_grid_runs_share_no_mutable_state() -> None:
    shared_tags = ["base"]
    config = {"lr": List([1, 2]), "tags": shared_tags, "opt": List([{"betas": [0.9]}])}
    runs = GridSearch(config).get_runs()
    runs[0]["tags"].append("mutated")
    runs[0]["opt"]["betas"].append(0.5)
    assert runs[1]["tags"] == ["base"] and runs[1]["opt"]["betas"] == [0.9]
    assert shared_tags == ["base"] and config["opt"].values[0] == {"betas": [0.9]}
    assert GridSearch(config).get_runs() == [
        {"lr": 1, "tags": ["base"], "opt": {"betas": [0.9]}},
        {"lr": 2, "tags": ["base"], "opt": {"betas": [0.9]}},
    ]


# --- RandomSearch -----------------------------------------------------------------

SPACE = {
    "lr": Range(1e-5, 1e-1, log=True),
    "batch": Range(8, 128),
    "opt": List(["adam", "sgd", {"name": "lamb", "wd": Range(0.0, 0.1)}]),
    "layers": [List([1, 2, 3]), {"dropout": Range(0.0, 0.5)}],
}


def test_random_search_count_and_concrete_values() -> None:
    runs = RandomSearch(SPACE, num_runs=50, seed=7).get_runs()
    assert len(runs) == 50
    for run in runs:
        assert not specs_in(run)
        assert 1e-5 <= run["lr"] <= 1e-1 and 8 <= run["batch"] <= 128
        assert run["opt"] in ("adam", "sgd") or (run["opt"]["name"] == "lamb" and 0 <= run["opt"]["wd"] <= 0.1)
        assert run["layers"][0] in (1, 2, 3) and 0.0 <= run["layers"][1]["dropout"] <= 0.5


def test_random_search_is_deterministic_per_seed() -> None:
    first = RandomSearch(SPACE, num_runs=20, seed=42).get_runs()
    assert RandomSearch(SPACE, num_runs=20, seed=42).get_runs() == first
    assert RandomSearch(SPACE, num_runs=20).get_runs(seed=42) == first  # get_runs seed
    assert get_runs(RandomSearch(SPACE, num_runs=20), seed=42) == first  # forwarded
    assert RandomSearch(SPACE, num_runs=20, seed=43).get_runs() != first
    assert RandomSearch(SPACE, num_runs=20, seed=1).get_runs(seed=42) == first  # override
    unseeded = RandomSearch(SPACE, num_runs=20)
    assert unseeded.get_runs() != unseeded.get_runs()  # fresh randomness each time


def test_random_search_list_choices_are_all_reached() -> None:
    runs = RandomSearch({"opt": List(["a", "b", "c"])}, num_runs=300, seed=0).get_runs()
    counts = collections.Counter(run["opt"] for run in runs)
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 60


def test_random_search_over_several_configs() -> None:
    search = RandomSearch([{"kind": "a", "x": Range(0, 9)}, {"kind": "b"}], num_runs=200, seed=3)
    kinds = collections.Counter(run["kind"] for run in search.get_runs())
    assert set(kinds) == {"a", "b"} and min(kinds.values()) > 60
    # A dict and a one-element list of it give the same runs.
    assert RandomSearch([SPACE], 5, seed=9).get_runs() == RandomSearch(SPACE, 5, seed=9).get_runs()


def test_random_runs_share_no_mutable_state() -> None:
    config = {"x": Range(0, 1), "tags": ["base"], "ids": {1}, "opt": List([{"betas": [0.9], "seen": set()}])}
    runs = RandomSearch(config, num_runs=2, seed=0).get_runs()
    runs[0]["tags"].append("mutated")
    runs[0]["opt"]["betas"].append(0.5)
    runs[0]["ids"].add(2)  # leaves that are not dicts/lists must be copied too
    runs[0]["opt"]["seen"].add(3)
    assert runs[1]["tags"] == ["base"] and runs[1]["opt"]["betas"] == [0.9]
    assert runs[1]["ids"] == {1} and runs[1]["opt"]["seen"] == set()
    assert config["tags"] == ["base"] and config["ids"] == {1}
    assert config["opt"].values[0] == {"betas": [0.9], "seen": set()}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_runs": 0}, "num_runs=0"),
        ({"num_runs": -1}, "num_runs=-1"),
        ({"num_runs": True}, "num_runs=True"),
        ({"num_runs": 2.0}, "num_runs=2.0"),
        ({"num_runs": 2, "seed": "42"}, "seed='42'"),
        ({"num_runs": 2, "seed": 1.5}, "seed=1.5"),
    ],
)
def test_random_search_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(AutoMLException, match=message):
        RandomSearch({"a": 1}, **kwargs)


@pytest.mark.parametrize(
    ("configs", "message"),
    [
        (None, "configs is a NoneType"),
        ("lr=1", "configs is a str"),
        ([], "empty list"),
        ([{"a": 1}, 3], r"configs\[1\] is a int"),
    ],
)
def test_algorithms_reject_bad_configs(configs: Any, message: str) -> None:
    with pytest.raises(AutoMLException, match=message):
        GridSearch(configs)
    with pytest.raises(AutoMLException, match=message):
        RandomSearch(configs, num_runs=1)


def test_automl_algorithm_is_abstract() -> None:
    with pytest.raises(TypeError):
        AutoMLAlgorithm({"a": 1})  # type: ignore[abstract]

    class Fixed(AutoMLAlgorithm):
        def get_runs(self, seed: int | None = None) -> list[dict[str, Any]]:
            return [dict(self.configs)]

    assert get_runs(Fixed({"a": 1})) == [{"a": 1}]


# --- get_runs ---------------------------------------------------------------------


def test_get_runs_on_a_plain_dict_returns_a_deep_copy() -> None:
    config = {"lr": 0.1, "model": {"layers": [1, 2]}}
    runs = get_runs(config, seed=0)
    assert runs == [config]
    assert runs[0] is not config and runs[0]["model"]["layers"] is not config["model"]["layers"]
    assert type(runs[0]) is dict
    assert get_runs(collections.OrderedDict(a=1)) == [{"a": 1}]


def test_get_runs_on_lists_and_algorithms() -> None:
    assert get_runs([{"a": 1}, {"a": 2}]) == [{"a": 1}, {"a": 2}]
    assert get_runs(GridSearch({"a": List([1, 2])})) == [{"a": 1}, {"a": 2}]
    mixed = get_runs([{"a": 0}, GridSearch({"a": List([1, 2])}), RandomSearch({"a": Range(5, 5)}, 2)])
    assert mixed == [{"a": 0}, {"a": 1}, {"a": 2}, {"a": 5}, {"a": 5}]


def test_get_runs_refuses_a_dict_with_specs() -> None:
    with pytest.raises(AutoMLException, match=r"model.lr holds Range.*GridSearch.*RandomSearch"):
        get_runs({"model": {"lr": Range(0.1, 1.0)}})
    with pytest.raises(AutoMLException, match=r"param_config\[1\]: a holds List"):
        get_runs([{"a": 1}, {"a": List([1, 2])}])


@pytest.mark.parametrize(
    ("param_config", "message"),
    [
        (None, "param_config is a NoneType"),
        (5, "param_config is a int"),
        ("config", "param_config is a str"),
        (List([1]), "param_config is a List"),
        ([], "empty list"),
        ([{"a": 1}, "b"], r"param_config\[1\] is a str"),
    ],
)
def test_get_runs_refuses_other_input(param_config: Any, message: str) -> None:
    with pytest.raises(AutoMLException, match=message):
        get_runs(param_config)


def test_get_runs_rejects_a_bad_seed() -> None:
    with pytest.raises(AutoMLException, match="seed="):
        get_runs({"a": 1}, seed="x")  # type: ignore[arg-type]


# --- flattening and the alias module -------------------------------------------------


def test_flattened_config_leaf_of_a_sampled_run() -> None:
    run = RandomSearch({"opt": {"lr": Range(1e-4, 1e-2, log=True)}, "layers": [List([1, 2]), {"d": 0.1}]}, 1, seed=0).get_runs()[0]
    flat = get_flattened_config_leaf(run)
    assert flat == flatten_config(run)
    assert set(flat) == {"opt.lr", "layers.0", "layers.1.d"}
    assert json.loads(json.dumps(flat, allow_nan=False)) == flat
    assert get_flattened_config_leaf({"x": math.nan, "s": Range(1, 2)}) == {"x": "nan", "s": "Range(1, 2, dtype=int)"}
    with pytest.raises(ConfigError, match="list"):
        get_flattened_config_leaf([1, 2])  # type: ignore[arg-type]


def test_automl_alias_module_reexports_the_same_objects() -> None:
    for name in automl_utils.__all__:
        assert getattr(automl, name) is getattr(automl_utils, name), name
    assert sorted(automl.__all__) == sorted(automl_utils.__all__)


def test_import_loads_neither_torch_nor_mlflow() -> None:
    code = (
        "import sys, json, rapidfire_state.automl;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
