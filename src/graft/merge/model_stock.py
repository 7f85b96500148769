"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned
models", ECCV).

Per tensor, with ``δᵢ = θᵢ − θ₀`` flattened and ``T ≥ 2`` models:
``cos θ`` = mean over pairs ``i < j`` of ``cos(δᵢ, δⱼ)``;
``t = T cos θ / (1 + (T − 1) cos θ)``; result ``t·mean(θᵢ) + (1 − t)·θ₀``.

Conventions that change results (as mergekit):

* ``filter_wise: true`` computes ``t`` per row instead of per tensor. graft views a tensor
  of two or more dims as ``(shape[0], -1)`` rows (one per output filter); mergekit uses the
  last dim, which is the same for 2-D weights and differs for conv kernels. A 0-d or 1-d
  tensor is one row.
* A pair's norm product is floored at 1e-6, so a zero delta has cosine 0 with everything.
* Where ``|1 + (T − 1) cos θ| < 1e-6`` there is no finite estimate and ``t = 0`` (the base).
* ``t`` is not clipped: a negative mean cosine gives ``t < 0`` (extrapolation away from the
  models' mean), as the formula says.
* A per-model ``weight`` is accepted and ignored, as mergekit 0.1.5 does (its
  ``model_stock`` declares only ``filter_wise`` and its resolver looks up only declared
  parameters): the models' mean is unweighted, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import MethodSpec, Param

_NORM_FLOOR = 1e-6
_SINGULAR = 1e-6


def _rows(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    if filter_wise and x.dim() >= 2:
        return x.reshape(x.shape[0], -1)
    return x.reshape(1, -1)


def stock_ratio(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model Stock's interpolation ratio ``t`` per row.

    Args:
        deltas: ``T ≥ 2`` deltas, each ``(rows, n)``.

    Returns:
        ``t``, shape ``(rows, 1)``.
    """
    norms = [d.norm(dim=-1) for d in deltas]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            dot = (deltas[i] * deltas[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp_min(_NORM_FLOOR)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(deltas)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < _SINGULAR
    t = count * cos / torch.where(singular, 1, denominator)
    return torch.where(singular, 0, t)


def model_stock(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    filter_wise: bool = False,
    weight: Sequence[float] | None = None,
) -> torch.Tensor:
    """Interpolate between the models' mean and the base by their delta geometry.

    Args:
        tensors: ``T ≥ 2`` fine-tuned tensors.
        base: the base model's tensor.
        filter_wise: one ratio per row instead of one per tensor.
        weight: accepted for mergekit recipes; ignored, as mergekit ignores it.

    Returns:
        ``t·mean(θᵢ) + (1 − t)·θ₀``.
    """
    base_rows = _rows(base, filter_wise)
    models = [_rows(t, filter_wise) for t in tensors]
    t = stock_ratio([m - base_rows for m in models])
    mean = torch.stack(models).mean(dim=0)
    return (t * mean + (1 - t) * base_rows).reshape(base.shape)


SPEC = MethodSpec(
    name="model_stock",
    fn=model_stock,
    summary="interpolate models' mean toward base by the angle between their deltas",
    params=(
        Param("filter_wise", bool, False, doc="one ratio per row instead of per tensor"),
        Param(
            "weight",
            float,
            1.0,
            per_model=True,
            doc="accepted for mergekit recipes; ignored, as mergekit ignores it",
        ),
    ),
    base="required",
    min_models=2,
    paper="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
)
