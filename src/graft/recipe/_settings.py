"""Parameter settings as mergekit writes them, and their resolution for one tensor.

A setting is one of:

* a scalar (``0.5``, ``true``, ``"auto"``);
* a *gradient*: a list of scalars interpolated linearly over the layers of a slice
  (``[0, 0.5, 1]``). ``t`` is the tensor's relative layer position in ``[0, 1]``; tensors
  outside the repeated blocks (embeddings, final norm, head) use ``t = 0``, as mergekit;
* a conditional ``{filter: self_attn, value: ...}`` or a list of them: the first whose
  ``filter`` is a substring of the tensor name (or is absent / ``"*"``) applies; when none
  matches, the next scope in precedence order is consulted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Scalar = bool | int | float | str
# Numeric settings beyond this magnitude are typos or attacks (1e308 overflows to inf in
# the first multiplication); every real weight, density, scale or epsilon is far inside.
MAX_MAGNITUDE = 1e6


class RecipeError(ValueError):
    """A recipe that cannot run; the message says what to change."""


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` shortened, for error messages that must stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Conditional:
    value: Any  # Scalar | tuple[Scalar, ...]
    filter: str | None = None


def parse_setting(raw: Any, where: str, *, kind: type | None = None) -> Any:
    """Validate a raw YAML value and freeze it (lists -> tuples, dicts -> Conditional).

    With ``kind`` (the parameter's), every scalar in it is coerced once here, so a value
    that could never be used (``weight: abc``, ``.nan``, ``1e308``) fails before any file
    is opened.
    """
    if isinstance(raw, bool | int | float | str):
        _check_scalars((raw,), kind, where)
        return raw
    if isinstance(raw, dict):
        return (_parse_conditional(raw, where, kind),)
    if isinstance(raw, list):
        if not raw:
            raise RecipeError(f"{where}: empty list; give a value or a gradient like [0, 1]")
        if all(isinstance(e, bool | int | float | str) for e in raw):
            _check_scalars(raw, kind, where)
            return tuple(raw)
        if all(isinstance(e, dict) for e in raw):
            return tuple(_parse_conditional(e, where, kind) for e in raw)
    raise RecipeError(
        f"{where}: expected a number, a gradient list or {{filter, value}} entries, got {show(raw)}"
    )


def _check_scalars(values, kind: type | None, where: str) -> None:
    if kind in (float, int):
        for v in values:
            coerce(v, float, where)  # int parameters take gradients, rounded when resolved


def _parse_conditional(raw: dict, where: str, kind: type | None = None) -> Conditional:
    unknown = set(raw) - {"value", "filter"}
    if unknown or "value" not in raw:
        got = sorted(map(str, raw))
        raise RecipeError(
            f"{where}: a conditional parameter takes keys 'filter' and 'value', got {show(got)}"
        )
    value = raw["value"]
    if isinstance(value, list):
        if not value or not all(isinstance(e, bool | int | float | str) for e in value):
            raise RecipeError(f"{where}: 'value' must be a scalar or a list of scalars")
        _check_scalars(value, kind, where)
        value = tuple(value)
    elif isinstance(value, bool | int | float | str):
        _check_scalars((value,), kind, where)
    else:
        raise RecipeError(f"{where}: 'value' must be a scalar or a list of scalars")
    flt = raw.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise RecipeError(f"{where}: 'filter' must be a string")
    return Conditional(value=value, filter=flt)


def coerce(value: Any, kind: type, where: str) -> Any:
    """Coerce a scalar to the parameter's kind; YAML's ``1e-3`` arrives as a string."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise RecipeError(f"{where}: expected true or false, got {show(value)}")
    if kind in (float, int):
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: expected a number, got {show(value)}") from None
        except OverflowError:  # an int beyond float's range
            number = math.inf
        if not math.isfinite(number):
            raise RecipeError(f"{where}: expected a finite number, got {show(value)}")
        if abs(number) > MAX_MAGNITUDE:
            raise RecipeError(
                f"{where}: {show(value)} is out of range; numeric settings must lie between "
                f"-{MAX_MAGNITUDE:,.0f} and {MAX_MAGNITUDE:,.0f}"
            )
        if kind is int:
            if number != int(number):
                raise RecipeError(f"{where}: expected an integer, got {value!r}")
            return int(number)
        return number
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def evaluate_setting(
    setting: Any, tensor_name: str, t: float, *, kind: type, where: str
) -> Any | None:
    """Resolve one setting for one tensor; None when no conditional matches."""
    if isinstance(setting, bool | int | float | str):
        return coerce(setting, kind, where)
    if not setting:
        return None
    if isinstance(setting[0], Conditional):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t, kind=kind, where=where)
        return None
    values = [coerce(v, kind, where) for v in setting]
    if not all(_is_number(v) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    result = (1 - frac) * values[i0] + frac * values[i1]
    return coerce(result, kind, where) if kind is int else result
