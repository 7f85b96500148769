"""Karcher mean: the Riemannian barycenter of the models' directions on the unit sphere,
scaled by their mean norm (mergekit's ``karcher``; Karcher 1977, "Riemannian center of
mass and mollifier smoothing", CPAM; for merging: arXiv:2603.04972, "Functionality-Oriented
LLM Merging on the Fisher-Rao Manifold", which mergekit cites).

Per tensor, flattened, with ``T`` models and equal weights ``αᵢ = 1/T``:

1. ``uᵢ = xᵢ/‖xᵢ‖`` for the models with ``‖xᵢ‖ > tol``; the others take no part in the
   direction, and the weights of the rest are renormalised to sum to 1.
2. Start at the normalised weighted mean ``m = Σ αᵢuᵢ / ‖Σ αᵢuᵢ‖`` (the first
   direction when that norm is below ``tol``).
3. Up to ``max_iter`` times: the tangent (log-map) mean
   ``v = Σ αᵢ θᵢ/sin θᵢ · (uᵢ − cos θᵢ·m)`` with ``θᵢ = arccos(uᵢ·m)`` (terms with
   ``θᵢ < tol`` are left out); stop when ``‖v‖ < tol``; else step along the geodesic,
   ``m ← cos‖v‖·m + sin‖v‖·v/‖v‖``, and renormalise.
4. Result ``m · (1/T) Σᵢ ‖xᵢ‖`` (the mean norm over *all* models, including those left
   out of step 1).

Conventions that change results (as mergekit 0.1.5, ``karcher_merge_tensors``):

* Equal weights: mergekit's ``karcher`` takes no ``weight``; graft rejects one.
* No base: a ``base_model`` named in the recipe is one more input (mergekit ignores the
  base role and merges it with the others, as ``linear`` does).
* ``tol`` is three thresholds at once: the norm below which a model has no direction,
  the angle below which a model adds nothing to the tangent, and the convergence test.
* One model: returned unchanged.
* Where every model's norm is ``≤ tol`` graft returns the plain mean ``(1/T) Σ xᵢ``;
  mergekit returns zeros there (so equal tiny inputs do not come back). The two differ
  by at most ``tol`` in norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import MethodSpec, Param


def karcher_direction(units: torch.Tensor, *, max_iter: int, tol: float) -> torch.Tensor:
    """Equal-weight Karcher mean of unit vectors by Riemannian gradient steps.

    Args:
        units: ``(T, n)`` unit rows.
        max_iter: maximum number of steps.
        tol: angle and tangent-norm threshold.

    Returns:
        The mean direction, a unit vector of length ``n``.
    """
    alpha = 1.0 / units.shape[0]
    mean = units.sum(dim=0) * alpha
    norm = mean.norm()
    mean = units[0].clone() if norm < tol else mean / norm
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1, 1)
        theta = torch.arccos(dots)
        # θ/sin θ is the log map's length factor; rows already at the mean add nothing.
        factor = torch.where(theta < tol, 0.0, alpha * theta / torch.sin(theta))
        tangent = (factor[:, None] * (units - dots[:, None] * mean)).sum(dim=0)
        length = tangent.norm()
        if length < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        norm = mean.norm()
        if norm > tol:
            mean = mean / norm
    return mean


def karcher(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Karcher mean of the models on the sphere, at their mean norm.

    Args:
        tensors: one or more tensors, same shape.
        base: unused (a recipe's base is one more input).
        max_iter: maximum Riemannian gradient steps.
        tol: norm, angle and convergence threshold.

    Returns:
        The merged tensor.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    flat = torch.stack([t.reshape(-1) for t in tensors])
    norms = flat.norm(dim=1)
    valid = norms > tol
    if not bool(valid.any()):
        return flat.mean(dim=0).reshape(tensors[0].shape)
    units = flat[valid] / norms[valid, None]
    direction = karcher_direction(units, max_iter=max_iter, tol=tol)
    return (direction * norms.mean()).reshape(tensors[0].shape)


def _non_negative(name: str):
    def check(value: float) -> str | None:
        return None if value >= 0 else f"{name} must be >= 0, got {value}"

    return check


SPEC = MethodSpec(
    name="karcher",
    fn=karcher,
    summary="Riemannian (Karcher) mean of the models' directions, at their mean norm",
    params=(
        Param(
            "max_iter",
            int,
            10,
            doc="maximum Riemannian gradient steps",
            check=_non_negative("max_iter"),
        ),
        Param(
            "tol",
            float,
            1e-5,
            doc="norm / angle / convergence threshold",
            check=_non_negative("tol"),
        ),
    ),
    base="none",
    paper="Karcher 1977, Riemannian center of mass; mergekit karcher (arXiv:2603.04972)",
)
