"""The shared argument checks of :mod:`rapidfire_state.validation`."""

from __future__ import annotations

import fractions
import math
import re
from typing import Any

import numpy as np
import pytest

from rapidfire_state.exceptions import ConfigError, DataPathException, RapidFireError
from rapidfire_state.validation import (
    check_int,
    check_name,
    check_number,
    check_positive_int,
    check_positive_number,
)

# --- check_int ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [
        (0, {}),
        (7, {}),
        (2**40, {}),
        (1, {"minimum": 1}),
        (65535, {"minimum": 1, "maximum": 65535}),
        (-5, {"minimum": None}),
        (-5, {"minimum": -5, "maximum": 5}),
        (10**30, {"minimum": None}),
    ],
)
def test_check_int_accepts_ints_in_range(value: int, kwargs: dict[str, Any]) -> None:
    result = check_int("n", value, **kwargs)
    assert result == value and type(result) is int


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (True, "bool"),
        (False, "bool"),
        (1.0, "float"),
        (1.5, "float"),
        (float("nan"), "float"),
        ("1", "str"),
        (b"1", "bytes"),
        (None, "NoneType"),
        ([1], "list"),
        (np.int64(3), "int64"),  # only with any_integral
    ],
)
def test_check_int_refuses_other_types_naming_the_type(value: Any, type_name: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_int("run_id", value, minimum=1)
    assert str(info.value) == f"run_id={value!r} is a {type_name}; allowed: an int >= 1"


@pytest.mark.parametrize(
    ("value", "kwargs", "allowed"),
    [
        (-1, {}, "an int >= 0"),
        (0, {"minimum": 1}, "an int >= 1"),
        (0, {"minimum": 1, "maximum": 65535}, "an int 1-65535"),
        (65536, {"minimum": 1, "maximum": 65535}, "an int 1-65535"),
        (2**31, {"maximum": 2**31 - 1}, "an int 0-2147483647"),
        (6, {"minimum": None, "maximum": 5}, "an int <= 5"),
        (-6, {"minimum": -5, "maximum": 5}, "an int from -5 to 5"),
    ],
)
def test_check_int_refuses_values_out_of_range(value: int, kwargs: dict[str, Any], allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_int("experiment_id", value, **kwargs)
    assert str(info.value) == f"experiment_id={value!r} is not valid; allowed: {allowed}"


def test_check_int_none_only_when_optional() -> None:
    assert check_int("chunk_id", None, optional=True) is None
    with pytest.raises(ConfigError, match=re.escape("chunk_id=None is a NoneType; allowed: an int >= 0")):
        check_int("chunk_id", None)
    with pytest.raises(ConfigError, match=re.escape("chunk_id=-1 is not valid; allowed: None or an int >= 0")):
        check_int("chunk_id", -1, optional=True)
    with pytest.raises(ConfigError, match=re.escape("chunk_id=True is a bool; allowed: None or an int >= 0")):
        check_int("chunk_id", True, optional=True)


def test_check_int_any_integral_takes_numpy_integers_as_plain_ints() -> None:
    result = check_int("step", np.int64(3), any_integral=True)
    assert result == 3 and type(result) is int
    assert check_int("step", np.uint8(200), maximum=255, any_integral=True) == 200
    for bad in (True, np.bool_(True), 1.0, np.float64(1.0), "3", b"3"):
        with pytest.raises(ConfigError, match="allowed: an int >= 0"):
            check_int("step", bad, any_integral=True)
    with pytest.raises(ConfigError, match=r"^step=(np\.int64\()?-1\)? is not valid; allowed: an int >= 0$"):
        check_int("step", np.int64(-1), any_integral=True)


def test_check_int_raises_the_error_class_asked_for() -> None:
    with pytest.raises(DataPathException, match="run_id=-1 is not valid"):
        check_int("run_id", -1, error=DataPathException)
    # the default is the library's ConfigError, also a ValueError
    with pytest.raises(ValueError) as info:
        check_int("run_id", -1)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, RapidFireError)


def test_check_positive_int() -> None:
    assert check_positive_int("num_workers", 1) == 1
    assert check_positive_int("pid", None, optional=True) is None
    assert check_positive_int("port", 80, maximum=65535) == 80
    for bad, what in ((0, "is not valid"), (-1, "is not valid"), (True, "is a bool"), (2.0, "is a float")):
        with pytest.raises(ConfigError, match=re.escape(f"num_workers={bad!r} {what}; allowed: an int >= 1")):
            check_positive_int("num_workers", bad)
    with pytest.raises(ConfigError, match="allowed: an int 1-10"):
        check_positive_int("n", 11, maximum=10)


# --- check_number ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [
        (0, {}),
        (0.0, {}),
        (2, {}),
        (1e-9, {"exclusive_minimum": True}),
        (float("inf"), {}),
        (-3.5, {"minimum": None}),
        (float("-inf"), {"minimum": None}),
        (-3.5, {"minimum": None, "finite": True}),
        (0.5, {"minimum": 0.25}),
        (np.float64(0.5), {}),  # a float subclass
    ],
)
def test_check_number_accepts(value: float, kwargs: dict[str, Any]) -> None:
    result = check_number("seconds", value, **kwargs)
    assert result == float(value) and type(result) is float


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (True, {}, "grace_seconds=True is a bool; allowed: a number >= 0"),
        ("1", {}, "grace_seconds='1' is a str; allowed: a number >= 0"),
        (None, {}, "grace_seconds=None is a NoneType; allowed: a number >= 0"),
        (np.float32(1.0), {}, "grace_seconds=np.float32(1.0) is a float32; allowed: a number >= 0"),
        (-1, {}, "grace_seconds=-1 is not valid; allowed: a number >= 0"),
        (-0.001, {}, "grace_seconds=-0.001 is not valid; allowed: a number >= 0"),
        (0, {"exclusive_minimum": True}, "grace_seconds=0 is not valid; allowed: a number > 0"),
        (float("nan"), {}, "grace_seconds=nan is not valid; allowed: a number >= 0"),
        (float("nan"), {"minimum": None}, "grace_seconds=nan is not valid; allowed: a number"),
        (float("inf"), {"finite": True}, "grace_seconds=inf is not valid: it must be finite; allowed: a finite number >= 0"),
        (float("nan"), {"finite": True}, "grace_seconds=nan is not valid: it must be finite; allowed: a finite number >= 0"),
        (0.1, {"minimum": 0.25}, "grace_seconds=0.1 is not valid; allowed: a number >= 0.25"),
        (-1, {"optional": True}, "grace_seconds=-1 is not valid; allowed: None or a number >= 0"),
    ],
)
def test_check_number_refuses(value: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_number("grace_seconds", value, **kwargs)
    # numpy's repr changed in 2.0 (np.float32(1.0) vs 1.0)
    assert str(info.value) in (message, message.replace("np.float32(1.0)", "1.0"))


def test_check_number_none_only_when_optional() -> None:
    assert check_number("lock_timeout", None, optional=True) is None
    with pytest.raises(ConfigError, match="is a NoneType"):
        check_number("lock_timeout", None)


def test_check_number_any_real() -> None:
    assert check_number("low", np.float32(0.5), minimum=None, any_real=True) == 0.5
    assert check_number("low", np.int64(-2), minimum=None, any_real=True) == -2.0
    assert check_number("low", fractions.Fraction(1, 4), any_real=True) == 0.25
    for bad in (True, np.bool_(True), "1", 1j):
        with pytest.raises(ConfigError, match="is a"):
            check_number("low", bad, minimum=None, any_real=True)
    with pytest.raises(ConfigError, match="must be finite"):
        check_number("low", np.float64("nan"), minimum=None, finite=True, any_real=True)


def test_check_positive_number() -> None:
    assert check_positive_number("timeout", 0.5) == 0.5
    assert math.isinf(check_positive_number("timeout", float("inf")))  # wait forever
    assert check_positive_number("timeout", None, optional=True) is None
    for bad in (0, -1, float("nan"), float("-inf")):
        with pytest.raises(ConfigError, match=re.escape(f"timeout={bad!r} is not valid; allowed: a number > 0")):
            check_positive_number("timeout", bad)
    with pytest.raises(DataPathException, match=re.escape("timeout=True is a bool; allowed: None or a number > 0")):
        check_positive_number("timeout", True, optional=True, error=DataPathException)


# --- check_name --------------------------------------------------------------------------


def test_check_name_returns_the_value_unchanged() -> None:
    assert check_name("name", "my_exp") == "my_exp"
    assert check_name("name", " padded ") == " padded "  # not stripped: callers decide
    assert check_name("key", "   ", allow_blank=True) == "   "
    assert check_name("metric_run_id", None, optional=True) is None
    assert check_name("key", "x" * 10, max_length=10) == "x" * 10


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        ("", {}, "name='' is not valid; allowed: a non-empty string"),
        ("", {"allow_blank": True}, "name='' is not valid; allowed: a non-empty string"),
        ("  \t", {}, "name='  \\t' is not valid; allowed: a non-empty string"),
        (None, {}, "name=None is a NoneType; allowed: a non-empty string"),
        (b"exp", {}, "name=b'exp' is a bytes; allowed: a non-empty string"),
        (7, {}, "name=7 is a int; allowed: a non-empty string"),
        (True, {"optional": True}, "name=True is a bool; allowed: None or a non-empty string"),
        ("", {"optional": True}, "name='' is not valid; allowed: None or a non-empty string"),
        ("abcd", {"max_length": 3}, "name='abcd' is not valid; allowed: a non-empty string of at most 3 characters"),
    ],
)
def test_check_name_refuses(value: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_name("name", value, **kwargs)
    assert str(info.value) == message


def test_long_values_are_cut_in_messages() -> None:
    with pytest.raises(ConfigError) as info:
        check_name("key", "k" * 100_000, max_length=512)
    message = str(info.value)
    assert message.startswith("key='kkk") and "k... is not valid" in message
    assert len(message) < 400 and message.endswith("allowed: a non-empty string of at most 512 characters")
