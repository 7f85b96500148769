"""NuSLERP: mergekit's weighted SLERP of two models, optionally of their deltas
(mergekit's ``nuslerp``; Goddard et al. 2024, arXiv:2403.13257; SLERP after Shoemake 1985).

Two models with weights ``w₀, w₁`` are interpolated with ``t = w₁/(w₀ + w₁)`` (0.5 when
``|w₀ + w₁| < 1e-6``). With a base, the two *deltas* are interpolated and added back to
the base (a spherical alternative to task arithmetic); without one, the tensors are.

Vectors: ``nuslerp_flatten: true`` (default) interpolates the whole flattened tensor.
With ``nuslerp_flatten: false`` each slice along the last dim is one vector (the rows of
a ``(out, in)`` weight); adding ``nuslerp_row_wise: true`` makes each slice along dim 0
one vector (the columns of a ``(out, in)`` weight). These are mergekit's exact meanings,
names included.

Conventions that change results (as mergekit):

* Vectors are unit-normalised with norms floored at 1e-7 to get ``cos``; the slerp
  coefficients apply to the unnormalised vectors.
* Only (numerically) exactly collinear vectors, ``1 − cos² ≤ 1e-16``, fall back to the
  lerp ``(1 − t)·v₀ + t·v₁``; unlike ``slerp`` there is no 0.9995 threshold.
* Swapping the models together with their weights gives the same result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import REQUIRED, MethodSpec, Param

_UNIT_FLOOR = 1e-7
_COLLINEAR_EPS = 1e-8
_ZERO_WEIGHT_SUM = 1e-6


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP of each vector along the last dim of ``v0`` toward the same one of ``v1``.

    Args:
        t: interpolation factor (0 gives ``v0``).
        v0: start vectors, ``(..., n)``.
        v1: end vectors, same shape.

    Returns:
        Interpolated vectors, same shape.
    """
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp_min(_UNIT_FLOOR)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp_min(_UNIT_FLOOR)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= _COLLINEAR_EPS**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    sin_theta = torch.where(collinear, 1, torch.sin(theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(collinear, (1 - t) * v0 + t * v1, spherical)


def _interpolate(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool, row_wise: bool):
    if flatten:
        return slerp_vectors(t, v0.reshape(-1), v1.reshape(-1)).reshape(v0.shape)
    if row_wise and v0.dim() >= 2:
        out = slerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1))
        return out.transpose(0, -1)
    return slerp_vectors(t, v0, v1)


def nuslerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    """Weighted SLERP of two models (or of their deltas from ``base``).

    Args:
        tensors: exactly two tensors.
        base: optional base; when given, the deltas are interpolated.
        weight: the two models' weights; ``t = w₁/(w₀ + w₁)``.
        nuslerp_flatten: interpolate the flattened tensor as one vector.
        nuslerp_row_wise: without flattening, vectors run along dim 0 instead of the
            last dim.

    Returns:
        The interpolated tensor.
    """
    w0, w1 = float(weight[0]), float(weight[1])
    total = w0 + w1
    t = 0.5 if abs(total) < _ZERO_WEIGHT_SUM else w1 / total
    a, b = tensors
    if base is None:
        return _interpolate(t, a, b, nuslerp_flatten, nuslerp_row_wise)
    return base + _interpolate(t, a - base, b - base, nuslerp_flatten, nuslerp_row_wise)


SPEC = MethodSpec(
    name="nuslerp",
    fn=nuslerp,
    summary="weighted SLERP of two models, or of their deltas when a base is given",
    params=(
        Param("weight", float, REQUIRED, per_model=True, doc="t = w1 / (w0 + w1)"),
        Param("nuslerp_flatten", bool, True, doc="interpolate the whole tensor as one vector"),
        Param(
            "nuslerp_row_wise",
            bool,
            False,
            doc="without flatten: vectors along dim 0 instead of the last dim",
        ),
    ),
    base="optional",
    min_models=2,
    max_models=2,
    paper="mergekit NuSLERP (Goddard et al. 2024, arXiv:2403.13257); SLERP: Shoemake 1985",
)
