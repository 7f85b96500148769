"""Multi-SLERP: weighted interpolation of any number of models on a hypersphere
(mergekit's ``multislerp``; C. Goddard 2025, "multislerp", goddard.blog; the tangent-space
approach follows Buss & Fillmore 2001, "Spherical averages and applications to spherical
splines and interpolation", ACM TOG).

Per tensor, flattened, with ``xᵢ`` the models (or their deltas when a base is given):
``uᵢ = xᵢ/(‖xᵢ‖ + eps)``; ``m`` = the normalised weighted mean ``Σ wᵢuᵢ``. mergekit then
maps the ``uᵢ`` to the tangent space at ``m``, averages there and maps back. Because the
tangent point is the weighted Euclidean mean itself, the weighted tangent vectors sum to
exactly zero and the map back returns ``m``; so the result is

    ``m · Σ wᵢ‖xᵢ‖``  (plus the base, when given),

the weighted mean direction scaled to the weighted mean norm. graft computes this closed
form directly; it equals mergekit's output up to its 1e-8 guards. It is one step of
Buss & Fillmore's iteration, not the exact spherical (Karcher) mean.

Conventions that change results:

* ``normalize_weights`` (default true) divides the weights by their sum first.
* One model: returned unchanged (as mergekit, even when a base is given).
* When the weighted mean direction vanishes (``‖Σ wᵢuᵢ‖ < eps``, e.g. antipodal inputs at
  equal weights, or all deltas zero) graft returns the weighted sum ``Σ wᵢxᵢ`` (plus
  base) for any number of models; mergekit does so for two models and raises for more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import REQUIRED, MethodSpec, Param


def multislerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Weighted spherical interpolation of several models (or their deltas).

    Args:
        tensors: one or more tensors, same shape.
        base: optional base; when given, the deltas are interpolated.
        weight: one weight per model.
        normalize_weights: divide the weights by their sum.
        eps: guard added to norms and used as the zero threshold.

    Returns:
        The interpolated tensor.

    Raises:
        ValueError: ``normalize_weights`` with weights summing to zero.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    x = torch.stack(list(tensors))
    if base is not None:
        x = x - base
    flat = x.reshape(len(tensors), -1)
    w = torch.tensor([float(v) for v in weight], dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        total = w.sum()
        if total.abs() < eps:
            raise ValueError(
                "multislerp: weights sum to zero; change the weights or set "
                "normalize_weights: false"
            )
        w = w / total
    norms = flat.norm(dim=1)
    direction = (w[:, None] * flat / (norms[:, None] + eps)).sum(dim=0)
    length = direction.norm()
    if length < eps:  # no mean direction (antipodal inputs, zero deltas): weighted sum
        out = (w[:, None] * flat).sum(dim=0).reshape(tensors[0].shape)
        return out if base is None else base + out
    out = (direction * ((w * norms).sum() / length)).reshape(tensors[0].shape)
    return out if base is None else base + out


SPEC = MethodSpec(
    name="multislerp",
    fn=multislerp,
    summary="weighted interpolation of several models on the hypersphere",
    params=(
        Param("weight", float, REQUIRED, per_model=True, doc="weight of this model"),
        Param("normalize_weights", bool, True, doc="divide the weights by their sum"),
        Param("eps", float, 1e-8, doc="numerical guard for norms"),
    ),
    base="optional",
    paper="mergekit Multi-SLERP (Goddard 2025); Buss & Fillmore 2001, Spherical averages",
)
