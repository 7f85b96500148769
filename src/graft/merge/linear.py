"""Linear merge / uniform model soup (Wortsman et al. 2022, "Model soups", ICML).

``Σ wᵢθᵢ``, divided by ``Σ wᵢ`` when ``normalize`` (the default, as in mergekit).

Conventions that change results:

* No base: a ``base_model`` named in the recipe is one more input with its own weight
  (mergekit does the same).
* With ``normalize`` and weights summing to (almost) zero (``|Σ wᵢ| < 1e-8``) the sum is
  returned undivided; mergekit divides by zero there and writes inf/NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import REQUIRED, MethodSpec, Param

_ZERO_WEIGHT_SUM = 1e-8


def linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float],
    normalize: bool = True,
) -> torch.Tensor:
    """Weighted average (or sum) of the inputs.

    Args:
        tensors: the inputs, one per model, same shape.
        base: unused; this method takes no base.
        weight: one weight per input.
        normalize: divide by ``Σ wᵢ``.

    Returns:
        ``Σ wᵢθᵢ / Σ wᵢ`` (or ``Σ wᵢθᵢ``).
    """
    out = torch.zeros_like(tensors[0])
    for tensor, w in zip(tensors, weight, strict=True):
        out.add_(tensor, alpha=float(w))
    total = float(sum(weight))
    if normalize and abs(total) >= _ZERO_WEIGHT_SUM:
        out.div_(total)
    return out


SPEC = MethodSpec(
    name="linear",
    fn=linear,
    summary="weighted average of the models (model soup)",
    params=(
        Param("weight", float, REQUIRED, per_model=True, doc="weight of this model"),
        Param("normalize", bool, True, doc="divide by the sum of the weights"),
    ),
    base="none",
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
)
