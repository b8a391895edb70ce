"""Argument checks shared by the whole package: ints, numbers and names.

Every public function of the library refuses bad input at its door, naming the
argument, the value and what is allowed, with the same words everywhere:

    run_id=True is a bool; allowed: an int >= 1
    experiment_id=-3 is not valid; allowed: an int 0-2147483647
    timeout=nan is not valid; allowed: a number > 0
    low=inf is not valid: it must be finite; allowed: a finite number
    name='' is not valid; allowed: a non-empty string

A wrong type says "is a <type>", a value of the right type outside the allowed
set says "is not valid".  ``bool`` is refused wherever an int or a number is
asked for: it is an ``int`` subclass, but ``run_id=True`` is always a bug,
never run 1.

A leaf module: it imports only the standard library and
:mod:`rapidfire_state.exceptions`, so every other module may use it.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Literal, Optional, overload

from rapidfire_state.exceptions import ConfigError

__all__ = [
    "check_int",
    "check_positive_int",
    "check_number",
    "check_positive_number",
    "check_name",
]

#: what may be passed as ``error=``: an exception class built from one message
ErrorClass = type[Exception]


#: longer reprs are cut in messages (a 1 MB string is not worth repeating)
_MAX_SHOWN = 200


def _refuse(error: ErrorClass, name: str, value: Any, allowed: str, *, wrong_type: bool, why: str = "") -> Exception:
    shown = repr(value)
    if len(shown) > _MAX_SHOWN:
        shown = shown[:_MAX_SHOWN] + "..."
    if wrong_type:
        return error(f"{name}={shown} is a {type(value).__qualname__}; allowed: {allowed}")
    return error(f"{name}={shown} is not valid{why}; allowed: {allowed}")


def _int_text(minimum: Optional[int], maximum: Optional[int]) -> str:
    if minimum is not None and maximum is not None:
        # "1-65535" is how the package has always written a port range; a negative
        # lower bound would read as a double minus
        return f"an int {minimum}-{maximum}" if minimum >= 0 else f"an int from {minimum} to {maximum}"
    if minimum is not None:
        return f"an int >= {minimum}"
    if maximum is not None:
        return f"an int <= {maximum}"
    return "an int"


@overload
def check_int(
    name: str,
    value: Any,
    *,
    minimum: Optional[int] = ...,
    maximum: Optional[int] = ...,
    optional: Literal[False] = ...,
    any_integral: bool = ...,
    error: ErrorClass = ...,
) -> int: ...


@overload
def check_int(
    name: str,
    value: Any,
    *,
    minimum: Optional[int] = ...,
    maximum: Optional[int] = ...,
    optional: bool,
    any_integral: bool = ...,
    error: ErrorClass = ...,
) -> Optional[int]: ...


def check_int(
    name: str,
    value: Any,
    *,
    minimum: Optional[int] = 0,
    maximum: Optional[int] = None,
    optional: bool = False,
    any_integral: bool = False,
    error: ErrorClass = ConfigError,
) -> Optional[int]:
    """Return ``value`` if it is an int from ``minimum`` to ``maximum`` (both inclusive).

    Args:
        name: how the message names the argument (``"run_id"``, ``"TrainerConfig.epoch"``).
        value: what was passed.
        minimum: the smallest value allowed (default 0); ``None`` for no lower bound.
        maximum: the largest value allowed; ``None`` (default) for no upper bound.
        optional: whether ``None`` is allowed (it is then returned).
        any_integral: also accept other integer types -- anything with ``__index__``
            (numpy integers, a 0-d integer tensor) -- returned as a plain ``int``.
            Without it only ``int`` itself is accepted.
        error: the exception class raised (default :class:`ConfigError`).

    Raises:
        ``error``: for ``bool`` (always), ``float`` (also ``5.0``), ``str`` and any other
            type, ``None`` unless ``optional``, and ints outside the bounds; the message
            names ``name``, the value and what is allowed.
    """
    if value.__class__ is int and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value  # the common case, on every store call: no message is built
    allowed = ("None or " if optional else "") + _int_text(minimum, maximum)
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise _refuse(error, name, value, allowed, wrong_type=True)
    if isinstance(value, int):
        number = value
    elif any_integral and not isinstance(value, (str, bytes)):
        try:
            number = operator.index(value)
        except TypeError:
            raise _refuse(error, name, value, allowed, wrong_type=True) from None
    else:
        raise _refuse(error, name, value, allowed, wrong_type=True)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise _refuse(error, name, value, allowed, wrong_type=False)
    return number


@overload
def check_positive_int(
    name: str,
    value: Any,
    *,
    maximum: Optional[int] = ...,
    optional: Literal[False] = ...,
    error: ErrorClass = ...,
) -> int: ...


@overload
def check_positive_int(
    name: str, value: Any, *, maximum: Optional[int] = ..., optional: bool, error: ErrorClass = ...
) -> Optional[int]: ...


def check_positive_int(
    name: str,
    value: Any,
    *,
    maximum: Optional[int] = None,
    optional: bool = False,
    error: ErrorClass = ConfigError,
) -> Optional[int]:
    """Return ``value`` if it is an int >= 1 (and <= ``maximum``): :func:`check_int` with ``minimum=1``.

    For counts that cannot be zero (``num_workers``, ``num_runs``) and ids that start
    at 1 (runs, experiments, pids).
    """
    return check_int(name, value, minimum=1, maximum=maximum, optional=optional, error=error)


def _number_text(minimum: Optional[float], exclusive: bool, finite: bool) -> str:
    text = "a finite number" if finite else "a number"
    if minimum is None:
        return text
    bound = int(minimum) if float(minimum).is_integer() else minimum  # "> 0", not "> 0.0"
    return f"{text} {'>' if exclusive else '>='} {bound}"


@overload
def check_number(
    name: str,
    value: Any,
    *,
    minimum: Optional[float] = ...,
    exclusive_minimum: bool = ...,
    finite: bool = ...,
    optional: Literal[False] = ...,
    any_real: bool = ...,
    error: ErrorClass = ...,
) -> float: ...


@overload
def check_number(
    name: str,
    value: Any,
    *,
    minimum: Optional[float] = ...,
    exclusive_minimum: bool = ...,
    finite: bool = ...,
    optional: bool,
    any_real: bool = ...,
    error: ErrorClass = ...,
) -> Optional[float]: ...


def check_number(
    name: str,
    value: Any,
    *,
    minimum: Optional[float] = 0,
    exclusive_minimum: bool = False,
    finite: bool = False,
    optional: bool = False,
    any_real: bool = False,
    error: ErrorClass = ConfigError,
) -> Optional[float]:
    """Return ``value`` as a ``float`` if it is an int or float >= ``minimum``.

    NaN is always refused (it is neither above nor below any bound).  Infinity is
    accepted unless ``finite`` (an infinite timeout means "wait forever").

    Args:
        name: how the message names the argument.
        value: what was passed.
        minimum: the lower bound (default 0); ``None`` for none.
        exclusive_minimum: the bound itself is refused (``> minimum`` instead of ``>=``).
        finite: refuse ``inf`` and ``-inf`` too.
        optional: whether ``None`` is allowed (it is then returned).
        any_real: accept any :class:`numbers.Real` (numpy floats and ints, fractions);
            without it only ``int`` and ``float`` are accepted.
        error: the exception class raised (default :class:`ConfigError`).

    Raises:
        ``error``: for ``bool``, ``str`` and other types, ``None`` unless ``optional``,
            NaN, values below the bound, and infinities when ``finite``.
    """
    allowed = ("None or " if optional else "") + _number_text(minimum, exclusive_minimum, finite)
    if value is None and optional:
        return None
    accepted = numbers.Real if any_real else (int, float)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise _refuse(error, name, value, allowed, wrong_type=True)
    number = float(value)
    if finite and not math.isfinite(number):
        raise _refuse(error, name, value, allowed, wrong_type=False, why=": it must be finite")
    # written so that NaN, which compares false with everything, fails
    if math.isnan(number) or (
        minimum is not None and not (number > minimum if exclusive_minimum else number >= minimum)
    ):
        raise _refuse(error, name, value, allowed, wrong_type=False)
    return number


@overload
def check_positive_number(
    name: str, value: Any, *, optional: Literal[False] = ..., error: ErrorClass = ...
) -> float: ...


@overload
def check_positive_number(name: str, value: Any, *, optional: bool, error: ErrorClass = ...) -> Optional[float]: ...


def check_positive_number(
    name: str, value: Any, *, optional: bool = False, error: ErrorClass = ConfigError
) -> Optional[float]:
    """Return ``value`` as a ``float`` if it is a number > 0 (``inf`` included).

    :func:`check_number` with ``minimum=0, exclusive_minimum=True``: for timeouts
    and intervals, where zero would mean "never wait" or "spin".
    """
    return check_number(name, value, minimum=0, exclusive_minimum=True, optional=optional, error=error)


@overload
def check_name(
    name: str,
    value: Any,
    *,
    optional: Literal[False] = ...,
    max_length: Optional[int] = ...,
    allow_blank: bool = ...,
    error: ErrorClass = ...,
) -> str: ...


@overload
def check_name(
    name: str,
    value: Any,
    *,
    optional: bool,
    max_length: Optional[int] = ...,
    allow_blank: bool = ...,
    error: ErrorClass = ...,
) -> Optional[str]: ...


def check_name(
    name: str,
    value: Any,
    *,
    optional: bool = False,
    max_length: Optional[int] = None,
    allow_blank: bool = False,
    error: ErrorClass = ConfigError,
) -> Optional[str]:
    """Return ``value`` unchanged if it is a non-empty ``str`` (a name, key or id).

    Args:
        name: how the message names the argument.
        value: what was passed.
        optional: whether ``None`` is allowed (it is then returned).
        max_length: the most characters allowed; ``None`` (default) for no limit.
        allow_blank: accept a string of only whitespace (``"  "``); by default it
            counts as empty.  ``""`` is refused either way.
        error: the exception class raised (default :class:`ConfigError`).

    Raises:
        ``error``: for other types (``bytes`` included), ``None`` unless ``optional``,
            ``""``, blank strings unless ``allow_blank``, and strings longer than
            ``max_length``.
    """
    allowed = ("None or " if optional else "") + "a non-empty string"
    if max_length is not None:
        allowed += f" of at most {max_length} characters"
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _refuse(error, name, value, allowed, wrong_type=True)
    if value == "" or (not allow_blank and value.strip() == "") or (max_length is not None and len(value) > max_length):
        raise _refuse(error, name, value, allowed, wrong_type=False)
    return value
