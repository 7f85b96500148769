"""Passthrough: copy one input unchanged (mergekit's ``passthrough``).

Used with ``slices`` to stack layer ranges of source models (depth up-scaling, as SOLAR:
Kim et al. 2023, arXiv:2312.15166); the engine does the slicing and layer renumbering,
this function only copies one tensor.

Conventions: mergekit's per-model ``scale`` (default 1, i.e. unchanged) multiplies the
tensor. Exactly one input; a ``base_model`` in the recipe counts as that input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import MethodSpec, Param


def passthrough(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    scale: Sequence[float] | None = None,
) -> torch.Tensor:
    """Return the single input, times its ``scale``.

    Args:
        tensors: exactly one tensor.
        base: unused.
        scale: one factor (default 1.0).

    Returns:
        A new tensor equal to ``scale · tensors[0]``.
    """
    factor = 1.0 if scale is None else float(scale[0])
    return tensors[0] * factor


SPEC = MethodSpec(
    name="passthrough",
    fn=passthrough,
    summary="copy one model's tensor (for slices / layer stacking)",
    params=(Param("scale", float, 1.0, per_model=True, doc="multiply the tensor by this"),),
    base="none",
    max_models=1,
    paper="mergekit (Goddard et al. 2024, arXiv:2403.13257); depth up-scaling: SOLAR",
)
