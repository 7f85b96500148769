"""SLERP: spherical linear interpolation between the base and one model (Shoemake 1985,
"Animating rotation with quaternion curves", SIGGRAPH), as mergekit applies it to weights.

Per tensor, flattened: ``dot`` = cosine of the two tensors (each divided by its norm;
a norm ≤ 1e-8 is taken as 1), clamped to [−1, 1]. If ``|dot| > 0.9995`` (near-parallel or
near-antiparallel) the result is the lerp ``(1 − t)·v₀ + t·v₁``; otherwise
``θ = arccos(dot)`` and the result is
``sin((1 − t)θ)/sin θ · v₀ + sin(tθ)/sin θ · v₁`` applied to the *unnormalised* tensors,
as mergekit does (so norms are interpolated along with the direction).

Conventions that change results:

* ``v₀`` is the base and ``v₁`` the other model: ``t = 0`` gives the base, ``t = 1`` the
  model. The method is not symmetric in its inputs.
* Computed in float32 (the engine casts inputs to ``compute_dtype``), as mergekit does for
  non-float64 inputs; never in bf16.
* ``t`` is not clipped; values outside [0, 1] extrapolate along the arc.
* A per-model ``weight`` is accepted and ignored, as mergekit 0.1.5 does: its ``slerp``
  declares only ``t``, and its parameter resolver looks up only declared parameters, so
  recipes that give the models weights (common in shared slerp recipes) run unchanged.
  The interpolation factor is ``t`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from graft.merge._spec import REQUIRED, MethodSpec, Param

DOT_THRESHOLD = 0.9995
_NORM_EPS = 1e-8


def slerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1), whole-tensor.

    Args:
        t: interpolation factor.
        v0: start tensor.
        v1: end tensor, same shape.

    Returns:
        The interpolated tensor.
    """
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    if a.numel() == 0:
        return (1 - t) * v0 + t * v1
    na = a.norm()
    nb = b.norm()
    na = torch.where(na > _NORM_EPS, na, 1)
    nb = torch.where(nb > _NORM_EPS, nb, 1)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * v0 + (math.sin(t * theta) / sin_theta) * v1


def slerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    t: float,
    weight: Sequence[float] | None = None,
) -> torch.Tensor:
    """SLERP from the base (t = 0) to the single other model (t = 1).

    Args:
        tensors: exactly one tensor (the non-base model).
        base: the base model's tensor.
        t: interpolation factor.
        weight: accepted for mergekit recipes; ignored, as mergekit ignores it.

    Returns:
        The interpolated tensor.
    """
    return slerp_pair(float(t), base, tensors[0])


SPEC = MethodSpec(
    name="slerp",
    fn=slerp,
    summary="spherical interpolation between base (t=0) and one model (t=1)",
    params=(
        Param("t", float, REQUIRED, doc="interpolation factor: 0 = base, 1 = model"),
        Param(
            "weight",
            float,
            1.0,
            per_model=True,
            doc="accepted for mergekit recipes; ignored, as mergekit ignores it",
        ),
    ),
    base="required",
    min_models=1,
    max_models=1,
    order_independent=False,
    compute_dtype=torch.float32,
    paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
)
