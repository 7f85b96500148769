"""Types shared by every merge method: how a method declares itself to the engine.

A method is a pure function over tensors::

    fn(tensors, base, **params) -> Tensor

* ``tensors``: the non-base inputs for one output tensor, in recipe order, all the same
  shape, already in the compute dtype (float32, or float64 where the spec asks for it).
* ``base``: the base model's tensor, or ``None`` when the method takes no base.
* per-model parameters arrive as lists aligned with ``tensors``; shared parameters as
  scalars. Names are the Python argument names (``Param.arg``).
* data-aware methods (``stats`` set) receive ``stats=[...]``, one statistic tensor (or
  None) per input model, read from the statistics files the recipe names.
* methods with ``uses_seed`` also receive ``generator=torch.Generator`` seeded for this
  tensor; methods with ``uses_layer`` receive ``layer`` (int or None for tensors outside
  the repeated blocks) and ``num_layers``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

REQUIRED: Any = object()
"""Sentinel default: the recipe must set this parameter."""


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a method.

    Attributes:
        name: the recipe's name for it (mergekit's name where mergekit has one).
        kind: ``float``, ``int``, ``bool`` or ``str``; values are coerced to it.
        default: value when the recipe does not set it, or ``REQUIRED``.
        per_model: resolved once per input model (like mergekit's ``weight``/``density``).
        doc: one line for ``graft methods``.
        arg: the Python keyword the function takes, when it differs (``lambda``).
        check: optional validator returning an error message (or None) for a value.
        choices: allowed values for ``str`` parameters.
    """

    name: str
    kind: type = float
    default: Any = REQUIRED
    per_model: bool = False
    doc: str = ""
    arg: str | None = None
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def argname(self) -> str:
        return self.arg or self.name


@dataclass(frozen=True)
class MethodSpec:
    """How the engine calls a method and what it accepts.

    Attributes:
        name: registry name, as written in ``merge_method:``.
        fn: the pure tensor function.
        summary: one line for ``graft methods``.
        params: accepted parameters.
        base: ``"required"`` (base passed separately, excluded from ``tensors``),
            ``"optional"`` (used when the recipe names one), or ``"none"`` (a base named in
            the recipe is treated as one more input, as mergekit's ``linear`` does).
        min_models / max_models: bounds on ``len(tensors)``.
        uses_seed / uses_layer: extra keyword arguments the engine supplies.
        order_independent: permuting the inputs (with their parameters) leaves the result
            unchanged; the invariant tests hold the method to it.
        compute_dtype: dtype the engine casts inputs to.
        native_inputs: the method takes float32 / bfloat16 / float16 CPU inputs as stored
            and widens them to float32 itself (exactly, as the engine's cast would), so the
            engine hands them over without float32 copies (the fused TIES-family kernel).
        native_output: the method takes ``out_dtype`` (the dtype the engine writes) and
            returns its result in it, rounded as a cast of the float32 result rounds, so
            the fused kernel writes bfloat16 / float16 directly instead of a float32 tensor
            the engine then casts.
        stats: the per-model statistic a data-aware method reads (``"fisher"``,
            ``"gram"``...): each model's ``statistics`` parameter names a file written by
            the statistics pass, and the method receives ``stats=[tensor or None, ...]``
            aligned with ``tensors`` (None where the file has no entry for this tensor).
        stats_shape: the statistic's shape for a tensor of a given shape; the planner
            checks every statistics entry against it before reading any data.
        check_params: a validator of the parameters resolved for one tensor taken
            together (``params`` by keyword, one list entry per model for per-model ones,
            and the models' names), returning an error message or None; the planner runs
            it, so bad combinations fail before any tensor is read (``--dry-run`` too).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "none"] = "required"
    min_models: int = 1
    max_models: int | None = None
    uses_seed: bool = False
    uses_layer: bool = False
    order_independent: bool = True
    compute_dtype: torch.dtype = torch.float32
    native_inputs: bool = False
    native_output: bool = False
    paper: str = ""
    stats: str | None = None
    stats_shape: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None
    check_params: Callable[[Mapping[str, Any], Sequence[str]], str | None] | None = None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None


def density_check(value: float) -> str | None:
    """Shared validator: sparsification densities live in (0, 1]."""
    if not (0.0 < value <= 1.0):
        return f"density must be in (0, 1], got {value}; use e.g. density: 0.5"
    return None
