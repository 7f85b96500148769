"""Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging",
NeurIPS).

Per entry: ``θ = Σ wᵢF̂ᵢθᵢ / Σ wᵢF̂ᵢ`` with ``F̂ᵢ = max(Fᵢ, ε)`` the diagonal Fisher of
model i floored at ``epsilon`` (default 1e-6, as in the reference implementations), so an
entry that no model's data touches falls back to the weighted average instead of 0/0.

Which Fisher: the statistics pass (``graft stats fisher``, :func:`graft.eval.stats.fisher_diagonal`)
writes, by default, the *empirical* Fisher — the squared gradient of ``log p(y_true | x)``
per example, averaged over N examples of the model's own task. The paper's main
variant takes the expectation over the model's predictive distribution instead
(``target="expected"`` in the statistics pass); both are diagonal and per tensor.

Conventions that change results:

* No base: a ``base_model`` named in the recipe is one more input (like ``linear``), and
  then needs its own ``statistics`` file.
* Fishers are used as stored. ``graft stats fisher`` stores each model's Fisher divided
  by its mean over all the model's entries (``--no-normalize`` keeps it raw): raw Fishers
  of different models can differ by orders of magnitude — on graft's digits zoo the
  2-class task's is 10⁴ times the others' — and the merge would then copy that one model
  almost everywhere. The paper's formula takes the Fishers as computed; MergeLM divides by the global L2 norm.
  Either way it is one factor per model, applied in the statistics pass because a
  per-tensor merge cannot see the whole model. A model's ``weight`` multiplies its Fisher
  (the paper's λᵢ).
* A tensor for which any model's statistics file has no entry (``stats`` holds None) is
  merged by the plain weighted average of all models, never by mixing Fisher-weighted
  and unweighted terms.
* The floor is absolute: with normalised Fishers (mean 1) it is relative to each model's
  mean; with raw ones, Fishers far below ``epsilon`` (a small model that fits its data
  well) are floored to it, which moves the result toward the plain average.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import REQUIRED, MethodSpec, Param
from graft.merge._task_vectors import per_model
from graft.merge.linear import linear


def _positive(value: float) -> str | None:
    if not value > 0:
        return f"epsilon must be > 0, got {value}; use e.g. epsilon: 1e-6"
    return None


def fisher(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    stats: Sequence[torch.Tensor | None] | None = None,
    weight: Sequence[float] | None = None,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """Fisher-weighted average of the inputs.

    Args:
        tensors: the inputs, one per model, same shape.
        base: unused; this method takes no base.
        stats: per model, its diagonal Fisher for this tensor (same shape), or None.
            None (or any None entry) gives the weighted average.
        weight: per model, multiplies its Fisher (default 1.0).
        epsilon: floor applied to every Fisher entry.

    Returns:
        ``Σ wᵢ max(Fᵢ, ε) θᵢ / Σ wᵢ max(Fᵢ, ε)``.
    """
    weights = per_model(weight, len(tensors), 1.0)
    if stats is None or any(f is None for f in stats):
        return linear(tensors, None, weight=weights, normalize=True)
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for theta, f, w in zip(tensors, stats, weights, strict=True):
        wf = f.clamp(min=epsilon).to(num.dtype)
        if w != 1.0:
            wf = wf * w
        num.addcmul_(wf, theta)
        den.add_(wf)
    return num.div_(den)


SPEC = MethodSpec(
    name="fisher",
    fn=fisher,
    summary="per-entry average weighted by each model's diagonal Fisher (data-aware)",
    params=(
        Param(
            "statistics",
            str,
            REQUIRED,
            per_model=True,
            doc="Fisher file of this model, from `graft stats fisher`",
        ),
        Param("weight", float, 1.0, per_model=True, doc="multiplies this model's Fisher"),
        Param("epsilon", float, 1e-6, doc="floor on every Fisher entry", check=_positive),
    ),
    base="none",
    stats="fisher",
    stats_shape=lambda shape: shape,  # one Fisher entry per weight entry
    paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832)",
)
