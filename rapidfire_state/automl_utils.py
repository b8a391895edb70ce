"""AutoML search spaces: parameter specs, grid and random search, and run extraction.

A config is a plain dict.  Anywhere inside it (in nested dicts, in lists and
tuples, even inside the choices of a ``List``) a value may be a parameter spec:

- ``List(values)``: one of a finite set of choices;
- ``Range(low, high, dtype=None, log=False)``: a number between two bounds.

An :class:`AutoMLAlgorithm` turns one config (or a list of them) into concrete
runs, plain dicts with every spec replaced by a value:

- ``GridSearch(configs)``: every combination of every ``List`` (a ``Range``
  has no finite grid and is refused);
- ``RandomSearch(configs, num_runs, seed=None)``: ``num_runs`` independent
  samples (with replacement: two runs may coincide on a small space).

Runs are deep copies: no two runs, and no run and the user's config, share a
mutable object.  Imports only leaves (``exceptions``, ``serialize``).
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from typing import Any, Union

from rapidfire_state.exceptions import AutoMLException
from rapidfire_state.serialize import JSONValue, flatten_config
from rapidfire_state.validation import check_int, check_number, check_positive_int

__all__ = [
    "ParamSpec",
    "List",
    "Range",
    "AutoMLAlgorithm",
    "GridSearch",
    "RandomSearch",
    "get_runs",
    "get_flattened_config_leaf",
]

Config = dict[str, Any]
ConfigInput = Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]


# --- parameter specs --------------------------------------------------------------


class ParamSpec:
    """Base class of the parameter specs (``List``, ``Range``)."""

    __slots__ = ()


class List(ParamSpec):
    """A parameter taking one of a finite, ordered set of ``values``.

    ``values`` is any non-empty iterable except a string, a mapping or a set (a
    set has no stable order across processes, so seeded sampling would not be
    reproducible; pass ``sorted(the_set)``).  Choices may be anything, including
    dicts that contain further specs.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Iterable[Any]):
        if isinstance(values, (str, bytes, bytearray)):
            raise AutoMLException(
                f"List({values!r}): values must be a sequence of choices, not a string; "
                f"did you mean List([{values!r}])?"
            )
        if isinstance(values, (Mapping, Set)):
            raise AutoMLException(
                f"List({values!r:.200}): values must be an ordered sequence of choices, "
                f"not a {type(values).__qualname__} (pass a list, e.g. sorted(...))"
            )
        if isinstance(values, ParamSpec) or not isinstance(values, Iterable):
            raise AutoMLException(
                f"List({values!r:.200}): values must be a non-empty sequence of choices, "
                f"not a {type(values).__qualname__}"
            )
        choices = tuple(values)
        if not choices:
            raise AutoMLException("List([]): values must hold at least one choice")
        self._values = choices

    @property
    def values(self) -> tuple[Any, ...]:
        """The choices, in order."""
        return self._values

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"List({list(self._values)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, List):
            return NotImplemented
        return self._values == other._values

    __hash__ = None  # type: ignore[assignment]  # choices may be unhashable


_DTYPES: dict[Any, type] = {int: int, float: float, "int": int, "float": float}


class Range(ParamSpec):
    """A numeric parameter between ``low`` and ``high``, both inclusive.

    The range is of ints when both bounds are ints and ``dtype`` is not float,
    else of floats; ``dtype`` may be ``int``, ``float``, ``"int"``, ``"float"``
    or ``None`` (inferred).  ``low <= high``; ``log=True`` samples
    log-uniformly and needs ``low > 0``.
    """

    __slots__ = ("_low", "_high", "_dtype", "_log")

    def __init__(self, low: float, high: float, *, dtype: Any = None, log: bool = False):
        where = f"Range({low!r}, {high!r}, dtype={getattr(dtype, '__name__', dtype)!r}, log={log!r})"
        for name, bound in (("low", low), ("high", high)):
            check_number(f"{where}: {name}", bound, minimum=None, finite=True, any_real=True, error=AutoMLException)
        if not isinstance(log, bool):
            raise AutoMLException(f"{where}: log={log!r} must be True or False")
        try:
            wanted = _DTYPES[dtype] if dtype is not None else None
        except (KeyError, TypeError):
            raise AutoMLException(
                f"{where}: dtype={dtype!r} is not supported; allowed: None, int, float, 'int', 'float'"
            ) from None
        both_int = isinstance(low, numbers.Integral) and isinstance(high, numbers.Integral)
        if wanted is int and not both_int:
            raise AutoMLException(f"{where}: dtype=int needs int bounds, got {low!r} and {high!r}")
        resolved: type = float if wanted is float or not both_int else int
        low_value, high_value = resolved(low), resolved(high)
        if low_value > high_value:
            raise AutoMLException(f"{where}: low must be <= high")
        if log and low_value <= 0:
            raise AutoMLException(f"{where}: log=True needs low > 0 (a log scale has no zero)")
        self._low: int | float = low_value
        self._high: int | float = high_value
        self._dtype = resolved
        self._log = log

    @property
    def low(self) -> int | float:
        return self._low

    @property
    def high(self) -> int | float:
        return self._high

    @property
    def dtype(self) -> type:
        """``int`` or ``float``."""
        return self._dtype

    @property
    def log(self) -> bool:
        return self._log

    def sample(self, rng: random.Random) -> int | float:
        """Draw one value in ``[low, high]`` (uniformly, or log-uniformly if ``log``)."""
        low, high = self._low, self._high
        if self._dtype is int:
            if not self._log:
                return rng.randint(int(low), int(high))
            # Log-uniform over the integers: floor(exp(U(log low, log(high + 1))))
            # gives k the weight log((k + 1) / k), the discrete analogue.
            drawn = math.floor(math.exp(rng.uniform(math.log(low), math.log(high + 1))))
            return int(min(max(drawn, low), high))
        if self._log:
            value = math.exp(rng.uniform(math.log(low), math.log(high)))
        else:
            value = rng.uniform(low, high)
        # exp/log and a + (b - a) * r can round a hair past a bound.
        return float(min(max(value, low), high))

    def __repr__(self) -> str:
        extra = ", log=True" if self._log else ""
        return f"Range({self._low!r}, {self._high!r}, dtype={self._dtype.__name__}{extra})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Range):
            return NotImplemented
        return (self._low, self._high, self._dtype, self._log) == (
            other._low,
            other._high,
            other._dtype,
            other._log,
        )

    def __hash__(self) -> int:
        return hash((Range, self._low, self._high, self._dtype, self._log))


# --- walking configs --------------------------------------------------------------


def _path_text(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "<top level>"


def _iter_specs(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], ParamSpec]]:
    """Yield ``(path, spec)`` for every spec in ``node``, including inside List choices."""
    if isinstance(node, ParamSpec):
        yield path, node
        if isinstance(node, List):
            for index, choice in enumerate(node.values):
                yield from _iter_specs(choice, (*path, f"<choice {index}>"))
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _iter_specs(value, (*path, str(key)))
    elif isinstance(node, (list, tuple)):
        for index, item in enumerate(node):
            yield from _iter_specs(item, (*path, str(index)))


def _rebuild_sequence(template: list[Any] | tuple[Any, ...], items: Iterable[Any]) -> Any:
    if isinstance(template, list):
        return list(items)
    if hasattr(template, "_fields"):  # a namedtuple keeps its type
        return type(template)._make(items)
    return tuple(items)


def _grid(node: Any) -> list[Any]:
    """Every concrete value ``node`` can take (List choices multiplied out)."""
    if isinstance(node, List):
        return [value for choice in node.values for value in _grid(choice)]
    if isinstance(node, Mapping):
        keys = list(node.keys())
        options = [_grid(node[key]) for key in keys]
        return [dict(zip(keys, combo)) for combo in itertools.product(*options)]
    if isinstance(node, (list, tuple)):
        options = [_grid(item) for item in node]
        return [_rebuild_sequence(node, combo) for combo in itertools.product(*options)]
    # Range is refused when the GridSearch is built, so only plain values get here.
    return [node]


def _sample(node: Any, rng: random.Random) -> Any:
    """One concrete value of ``node``; walks dicts and lists in order (reproducible)."""
    if isinstance(node, List):
        return _sample(node.values[rng.randrange(len(node.values))], rng)
    if isinstance(node, Range):
        return node.sample(rng)
    if isinstance(node, Mapping):
        return {key: _sample(value, rng) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return _rebuild_sequence(node, [_sample(item, rng) for item in node])
    return node


def _deepcopy(value: Any, what: str) -> Any:
    try:
        return copy.deepcopy(value)
    except Exception as exc:  # an object holding a lock, a socket, a CUDA stream...
        raise AutoMLException(f"cannot deep-copy {what}: {type(exc).__name__}: {exc}") from exc


def _as_config_list(configs: Any) -> list[Mapping[str, Any]]:
    """Validate ``configs`` (a dict, or a non-empty list/tuple of dicts) as a list."""
    if isinstance(configs, Mapping):
        return [configs]
    if isinstance(configs, (list, tuple)):
        if not configs:
            raise AutoMLException("configs is an empty list; give at least one config dict")
        for index, config in enumerate(configs):
            if not isinstance(config, Mapping):
                raise AutoMLException(
                    f"configs[{index}] is a {type(config).__qualname__}; allowed: a dict"
                )
        return list(configs)
    raise AutoMLException(
        f"configs is a {type(configs).__qualname__}; allowed: a dict or a list of dicts"
    )


def _check_seed(seed: Any) -> None:
    check_int("seed", seed, minimum=None, optional=True, error=AutoMLException)


def _where(index: int, count: int, path: tuple[str, ...]) -> str:
    prefix = f"configs[{index}]: " if count > 1 else ""
    return f"{prefix}{_path_text(path)}"


# --- algorithms -------------------------------------------------------------------


class AutoMLAlgorithm(ABC):
    """A search over one config or several: turns specs into concrete runs.

    ``configs`` is kept as given (a dict or a list of dicts); runs never share
    objects with it.
    """

    def __init__(self, configs: ConfigInput):
        self._config_list = _as_config_list(configs)
        self.configs = configs

    @abstractmethod
    def get_runs(self, seed: int | None = None) -> list[Config]:
        """Return the concrete runs: plain dicts, specs replaced by values, deep copies."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.configs!r:.300})"


class GridSearch(AutoMLAlgorithm):
    """Every combination of every ``List`` in the config(s), in order.

    The number of runs is the product of the sizes of the Lists of each config
    (a List whose choices hold Lists counts the runs of each choice), summed
    over the configs.  The last key varies fastest.  A ``Range`` raises
    ``AutoMLException`` naming its path: it has no finite grid.
    """

    def __init__(self, configs: ConfigInput):
        super().__init__(configs)
        count = len(self._config_list)
        for index, config in enumerate(self._config_list):
            for path, spec in _iter_specs(config, ()):
                if isinstance(spec, Range):
                    raise AutoMLException(
                        f"GridSearch: {spec!r} at {_where(index, count, path)} has no finite "
                        "grid; use List([...]) of the values to try, or RandomSearch"
                    )

    def get_runs(self, seed: int | None = None) -> list[Config]:
        """All grid points; ``seed`` is accepted for a uniform API and ignored."""
        _check_seed(seed)
        runs: list[Config] = []
        for config in self._config_list:
            # _grid reuses the same leaf objects across combinations; the deep copy
            # per run is what makes runs independent.
            runs.extend(_deepcopy(run, "a grid run") for run in _grid(config))
        return runs


class RandomSearch(AutoMLAlgorithm):
    """``num_runs`` configs sampled independently from the config(s).

    A ``List`` picks a choice uniformly; a ``Range`` draws uniformly, or
    log-uniformly when ``log=True`` (int ranges include both bounds).  With
    several configs, each run first picks one of them uniformly.  The same seed
    always gives the same runs; ``seed=None`` gives fresh randomness.
    """

    def __init__(self, configs: ConfigInput, num_runs: int, seed: int | None = None):
        super().__init__(configs)
        check_positive_int("RandomSearch: num_runs", num_runs, error=AutoMLException)
        _check_seed(seed)
        self.num_runs = num_runs
        self.seed = seed

    def get_runs(self, seed: int | None = None) -> list[Config]:
        """Sample the runs; ``seed`` overrides the seed given at construction."""
        _check_seed(seed)
        effective = self.seed if seed is None else seed
        rng = random.Random(effective)  # None: seeded from os.urandom
        configs = self._config_list
        runs: list[Config] = []
        for _ in range(self.num_runs):
            # Draw a config index only when there is a choice, so that a dict and a
            # one-element list of it give the same runs for the same seed.
            config = configs[rng.randrange(len(configs))] if len(configs) > 1 else configs[0]
            runs.append(_deepcopy(_sample(config, rng), "a sampled run"))
        return runs

    def __repr__(self) -> str:
        return f"RandomSearch({self.configs!r:.300}, num_runs={self.num_runs}, seed={self.seed!r})"


# --- the spec's helpers -----------------------------------------------------------


def _plain_config(config: Mapping[str, Any], where: str) -> Config:
    for path, spec in _iter_specs(config, ()):
        location = f"{where}{_path_text(path)}"
        raise AutoMLException(
            f"{location} holds {spec!r}, a search space: wrap the config in GridSearch(...) "
            "or RandomSearch(...) to expand it"
        )
    copied = _deepcopy(config, "the config")
    return copied if type(copied) is dict else dict(copied)


def get_runs(param_config: Any, seed: int | None = None) -> list[Config]:
    """Return the concrete runs of ``param_config``.

    - an :class:`AutoMLAlgorithm`: its ``get_runs(seed)``;
    - a dict: ``[a deep copy of it]`` (a dict that still holds a ``List`` or
      ``Range`` is refused: wrap it in ``GridSearch``/``RandomSearch``);
    - a list or tuple of dicts and/or algorithms: the runs of each, in order.

    Anything else raises ``AutoMLException`` naming its type.
    """
    _check_seed(seed)
    if isinstance(param_config, AutoMLAlgorithm):
        return param_config.get_runs(seed)
    if isinstance(param_config, Mapping):
        return [_plain_config(param_config, "")]
    if isinstance(param_config, (list, tuple)):
        if not param_config:
            raise AutoMLException("param_config is an empty list; give at least one config")
        runs: list[Config] = []
        for index, item in enumerate(param_config):
            if isinstance(item, AutoMLAlgorithm):
                runs.extend(item.get_runs(seed))
            elif isinstance(item, Mapping):
                runs.append(_plain_config(item, f"param_config[{index}]: "))
            else:
                raise AutoMLException(
                    f"param_config[{index}] is a {type(item).__qualname__}; allowed: a dict "
                    "or an AutoMLAlgorithm"
                )
        return runs
    raise AutoMLException(
        f"param_config is a {type(param_config).__qualname__}; allowed: a dict, a list of "
        "dicts, or an AutoMLAlgorithm (GridSearch, RandomSearch)"
    )


def get_flattened_config_leaf(config: Mapping[str, Any]) -> dict[str, JSONValue]:
    """Flatten a run config to ``{"a.b": json_value}`` (see ``serialize.flatten_config``)."""
    return flatten_config(config)
